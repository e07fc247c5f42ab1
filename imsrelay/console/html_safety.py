"""Showing hostile mail safely: Content-Security-Policies and an HTML neutraliser.

A message's HTML part is shown in an ``<iframe sandbox>`` (no ``allow-scripts``, no
``allow-same-origin``, no forms, no top navigation) whose document is served with
``MESSAGE_CSP`` (no script, no remote loads, no forms, its own sandbox).  Before
that, ``neutralise_html`` rebuilds the HTML without the parts that act on their own
— scripts, event handlers, ``<meta http-equiv>`` (a refresh would navigate the frame
to a remote address), ``<base>``, frames, objects, forms, ``javascript:`` links —
and without remote ``src``es, so even a browser that ignored the policy would load
nothing.  Pure functions.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

# The console's own pages: scripts and styles only from its own files, never inline.
CONSOLE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")

# A message's HTML: inline styles and inline images only; nothing runs, nothing loads.
MESSAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src 'none'; "
               "script-src 'none'; object-src 'none'; connect-src 'none'; frame-src 'none'; "
               "form-action 'none'; base-uri 'none'; frame-ancestors 'self'; sandbox")

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Resource-Policy": "same-origin"}

# elements dropped with everything inside them
_DROP_WITH_CONTENT = {"script", "style", "iframe", "frame", "frameset", "object", "embed", "applet",
                      "noscript", "template", "title", "svg", "math", "form", "textarea", "select", "button"}
# elements dropped, their content kept
_DROP_TAG = {"html", "head", "body", "meta", "base", "link", "input", "portal", "param", "source", "track", "audio", "video"}
_URL_ATTRS = {"href", "src", "srcset", "action", "formaction", "background", "poster", "xlink:href", "ping",
              "data", "lowsrc", "dynsrc", "cite", "longdesc", "usemap", "manifest"}
_VOID = {"area", "br", "col", "hr", "img", "wbr"}


def _safe_url(name: str, value: str) -> str | None:
    v = "".join(value.split()).lower()
    if name == "href":
        if v.startswith(("http:", "https:", "mailto:")) or v.startswith("#"):
            return value  # a link is shown; the sandbox keeps the frame where it is
        return None
    if name == "src" and v.startswith("data:image/") and not v.startswith("data:image/svg"):
        return value
    return None  # remote or script URLs are not loaded


class _Neutraliser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_depth = 0
        self.skip_tag: str | None = None
        self.blocked = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, closed=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, closed=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], *, closed: bool) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag and not closed:
                self.skip_depth += 1
            return
        if tag in _DROP_WITH_CONTENT:
            self.blocked += 1
            if not closed:
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in _DROP_TAG:
            self.blocked += tag not in ("html", "head", "body") or any(n.lower().startswith("on") for n, _ in attrs)
            return
        kept = []
        for name, value in attrs:
            name = name.lower()
            if name.startswith("on") or (name == "style" and value and "url(" in value.lower()):
                self.blocked += 1
                continue
            if name in _URL_ATTRS:
                safe = _safe_url(name, value or "")
                if safe is None:
                    self.blocked += 1
                    continue
                value = safe
            kept.append(f' {name}="{html.escape(value or "", quote=True)}"' if value is not None else f" {name}")
        if tag == "a":
            kept.append(' rel="noopener noreferrer" target="_blank"')
        self.out.append(f"<{tag}{''.join(kept)}{' /' if closed and tag in _VOID else ''}>")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in _DROP_WITH_CONTENT or tag in _DROP_TAG or tag in _VOID:
            return
        self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None:
            self.out.append(html.escape(data, quote=False))

    def handle_comment(self, data: str) -> None:  # conditional comments can hide markup: drop all
        self.blocked += "<" in data

    def handle_decl(self, decl: str) -> None:
        pass

    def unknown_decl(self, data: str) -> None:
        pass

    def handle_pi(self, data: str) -> None:
        pass


def neutralise_html(text: str) -> tuple[str, int]:
    """(HTML without active or remote parts, how many parts were removed)."""
    parser = _Neutraliser()
    parser.feed(text)
    parser.close()
    return "".join(parser.out), parser.blocked


def message_document(text: str) -> str:
    """The document the sandboxed frame shows: the neutralised HTML, in a UTF-8 page."""
    body, blocked = neutralise_html(text)
    note = ""
    if blocked:
        note = (f'<p style="font:12px sans-serif;color:#7a5b00;background:#fff6d5;padding:4px 8px;margin:0 0 8px">'
                f"{blocked} active or remote part{'s' if blocked != 1 else ''} of this message "
                f"(scripts, remote images, forms, refreshes) were not loaded.</p>")
    return f'<!doctype html><html><head><meta charset="utf-8"></head><body>{note}{body}</body></html>'

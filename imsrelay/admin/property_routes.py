"""Admin endpoints that change a site's property pages, as Exchange Administrator
did: the IMS's Connected Sites, the E-Mail Domain table, the Directory Replication
Connectors (written to the site's TOML file) and a mailbox's General and E-mail
Addresses pages (in the directory).

=======  =========================================  ================================
GET      /config/file                               the file, and whether the running
                                                    IMS has loaded what it says now
POST     /ims/restart                               restart the IMS now (it loads its file)
GET      /kcc/known                                 the sites the last Check Now made
                                                    appear (and which await replication)
POST     /config/connected-sites                    ``{name, routing_address, cost?}``
PUT      /config/connected-sites/NAME               Properties: the same fields
DELETE   /config/connected-sites/NAME               Remove
POST     /config/email-domains                      ``{domain, host, port?}``
PUT      /config/email-domains/DOMAIN               Edit
DELETE   /config/email-domains/DOMAIN               Remove
POST     /config/replication-connectors             ``{site, server?, schedule?,
                                                    remote_on_network: false}``
PUT      /config/replication-connectors/SITE        Properties: ``{server?, schedule?}``
DELETE   /config/replication-connectors/SITE        Remove
PUT      /directory/mailboxes/ALIAS                 ``{display_name?, addresses?}``
=======  =========================================  ================================

A file change keeps the person's lines and comments (``imsrelay.config.toml_edit``),
is checked by the loader that starts the site (a file the site would refuse is never
written: the answer is 400 with the loader's reason), and is written atomically (a
temporary file in the same directory, flushed, then renamed over the old one).  Like
Exchange 5.5, whose Administrator asked to restart the Internet Mail Service after
such a change, the running IMS takes it when it starts again: every answer says
``restart_needed``, and ``GET /config/file`` says whether the running site still
runs an older file (``imsrelay lab`` restarts a site whose file changed by itself).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from imsrelay.config import toml_edit
from imsrelay.config.loader import config_from_mapping, load_config
from imsrelay.directory.kcc import known_after_check
from imsrelay.directory.store import Directory
from imsrelay.model.errors import ConfigError, ConfigErrors
from imsrelay.model.objects import Mailbox
from imsrelay.model.settings import SiteConfig

RESTART_TEXT = ("The Internet Mail Service takes this change when it starts again (Exchange Administrator asked "
                "to restart it): restart the site (imsrelay serve); the lab restarts a site whose file changed "
                "by itself.")


class PropertySite(Protocol):
    """What these endpoints use of a site (``imsrelay.site.Site``)."""

    config: SiteConfig
    directory: Directory
    log: Any
    workers: int
    on_restart: Callable[[], None] | None  # set by what runs the site: serve, the lab

    @property
    def learned_sites(self) -> tuple[tuple[str, str], ...]: ...


class PropertyError(Exception):
    """Bad input for a property page: answered 400 with the reason."""


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def write_atomically(path: Path, text: str) -> None:
    """``text`` replaces ``path`` whole or not at all (same directory, fsync, rename)."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------ the entries, checked (pure)


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise PropertyError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise PropertyError(f"{name} must be a string")
    if len(value) > 255:
        raise PropertyError(f"{name} is too long (at most 255 characters)")
    return value.strip()


def _number(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PropertyError(f"{name} must be a whole number from {low} to {high}")
    return value


def connected_site_entry(body: dict[str, Any], own_site: str, name: str | None = None) -> dict[str, Any]:
    """A Connected Sites entry from the General and Routing Address tabs."""
    name = name or _text(body, "name")
    assert name is not None
    if name.lower() == own_site.lower():
        raise PropertyError(f"{name} is this site: Connected Sites lists the other sites")
    kind = (_text(body, "type", required=False) or "SMTP")
    if kind != "SMTP":
        raise PropertyError(f"routing address type {kind!r}: type SMTP, in upper case (KB Q196927 step 4)")
    routing = _text(body, "routing_address")
    assert routing is not None
    if not routing.startswith("@"):
        routing = "@" + routing
    entry: dict[str, Any] = {"name": name, "routing_address": routing}
    cost = _number(body, "cost", 0, 100)
    if cost is not None:
        entry["cost"] = cost
    return entry


def email_domain_entry(body: dict[str, Any], domain: str | None = None,
                       old: dict[str, Any] | None = None) -> dict[str, Any]:
    """An E-Mail Domain entry: "Forward all messages for this domain to host" (one host,
    or several as ``host1,host2``).  A change keeps what the page does not show (TLS
    level, ETRN, the Security tab's credentials)."""
    domain = domain or _text(body, "domain")
    host = _text(body, "host")
    entry: dict[str, Any] = {"domain": domain, "host": host}
    port = _number(body, "port", 1, 65535)
    if port is not None:
        entry["port"] = port
    entry.update({k: v for k, v in (old or {}).items() if k not in ("domain", "host", "port")})
    return entry


SECRET_KEYS = ("password",)  # keys of an entry's auth table never shown (the admin API, the console)


def without_secrets(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """An entry of the site file as the property pages may see it: the Security tab's
    password (``auth.password``) replaced by stars."""
    if entry is None or not isinstance(entry.get("auth"), dict):
        return entry
    auth = {k: ("********" if k in SECRET_KEYS else v) for k, v in entry["auth"].items()}
    return {**entry, "auth": auth}


def connector_entry(body: dict[str, Any], site: str | None, known: dict[str, str], own_site: str,
                    old: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Directory Replication Connector from the New dialog (or its Properties).
    ``known``: the sites this one has a route to (name → routing domain)."""
    site = site or _text(body, "site")
    assert site is not None
    if site.lower() == own_site.lower():
        raise PropertyError(f"{site} is this site: a replication connector goes to another site")
    if old is None:
        if body.get("remote_on_network") is True:
            raise PropertyError("the remote site is reached through the Internet Mail Service here: choose "
                                "'No, the remote site is not available on this network' (KB Q196927 step 4)")
        match = next((n for n in known if n.lower() == site.lower()), None)
        if match is None:
            raise PropertyError(f"no route to site {site}: add it to Connected Sites first (or let Check Now "
                                f"learn it); sites offered: {', '.join(sorted(known)) or 'none'}")
        site = match
    entry: dict[str, Any] = {"site": site}
    server = _text(body, "server", required=False) if "server" in body else (old or {}).get("server")
    if server:
        entry["server"] = server
    if "schedule" in body:
        schedule = _text(body, "schedule", required=False)
        if schedule:
            entry["schedule"] = schedule
    elif old is not None and "schedule" in old:
        entry["schedule"] = old["schedule"]
    return entry


# ------------------------------------------------------------------ routes


# (request body, key of the entry changed or None for New, its old entry, the file's data) → the entry
Builder = Callable[[dict[str, Any], str | None, dict[str, Any] | None, dict[str, Any]], dict[str, Any]]

ARRAYS = {  # URL name → (TOML array, key field, what Exchange called it)
    "connected-sites": ("connected_sites", "name", "Connected Sites"),
    "email-domains": ("email_domains", "domain", "E-Mail Domain"),
    "replication-connectors": ("replication.connectors", "site", "Directory Replication Connector"),
}


def add_property_routes(app: web.Application, site: PropertySite) -> None:
    """Register the property pages' endpoints (behind the admin token middleware)."""
    path = site.config.path
    loaded = file_digest(path)
    lock = asyncio.Lock()

    def known_sites(raw: dict[str, Any] | None = None) -> dict[str, str]:
        """Sites with a route: Connected Sites as the file says now, and those Check Now learned."""
        if raw is None:
            known = {c.name: c.routing_address for c in site.config.connected_sites}
        else:
            known = {str(c.get("name")): str(c.get("routing_address"))
                     for c in toml_edit.entries(raw, "connected_sites") if isinstance(c, dict)}
        known.update({n: "@" + d for n, d in site.learned_sites})
        return known

    async def change(kind: str, action: str, make: Callable[[str, dict[str, Any]], toml_edit.Edit],
                     key: str) -> web.Response:
        array, key_field, label = ARRAYS[kind]
        async with lock:
            try:
                text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            except OSError as exc:
                raise PropertyError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
            raw = toml_edit.parse(text, path.name)
            edit = make(text, raw)
            try:
                config_from_mapping(edit.data, path)  # never write a file the site would refuse
            except ConfigErrors as exc:
                raise PropertyError("; ".join(f"{e.key}: {e.message}" for e in exc.errors)) from None
            except ConfigError as exc:
                raise PropertyError(f"{exc.key}: {exc.message}") from None
            try:
                await asyncio.to_thread(write_atomically, path, edit.text)
            except OSError as exc:  # e.g. a file mounted read-only (the Docker lab's config/docker/)
                raise PropertyError(f"{path} cannot be written ({exc.strerror or exc}): nothing changed; "
                                    "change it where it is kept, then restart the site") from None
        site.log.info("config.changed", file=str(path), page=label, action=action, key=key,
                      rewritten=edit.rewritten)
        entry = without_secrets(toml_edit.find(edit.data, array, key_field, key))
        return web.json_response({"site": site.config.site, "file": str(path), "page": label, "action": action,
                                  "entry": entry, "rewritten": edit.rewritten, "restart_needed": True,
                                  "message": f"{label} {key}: {action}. Saved to {path.name}. {RESTART_TEXT}"},
                                 status=201 if action == "added" else 200)

    def handlers(kind: str, build: Builder) -> tuple[Callable[..., Awaitable[web.Response]], ...]:
        array, key_field, _ = ARRAYS[kind]
        note = f"{ARRAYS[kind][2]} (the console)"

        async def post(request: web.Request) -> web.Response:
            body = await _body(request)
            text = await asyncio.to_thread(path.read_text, encoding="utf-8") if path.exists() else ""
            entry = build(body, None, None, toml_edit.parse(text, path.name))
            key = str(entry[key_field])

            def make(text: str, raw: dict[str, Any]) -> toml_edit.Edit:
                return toml_edit.add_entry(text, array, key_field, build(body, None, None, raw),
                                           note=f"Added by {note}", file_name=path.name)
            return await change(kind, "added", make, key)

        async def put(request: web.Request) -> web.Response:
            key = request.match_info["key"]
            body = await _body(request)

            def make(text: str, raw: dict[str, Any]) -> toml_edit.Edit:
                old = toml_edit.find(raw, array, key_field, key)
                if old is None:
                    raise web.HTTPNotFound(reason=f"{path.name} has no {ARRAYS[kind][2]} {key}")
                entry = build(body, str(old[key_field]), old, raw)
                return toml_edit.replace_entry(text, array, key_field, key, entry, note=f"Changed by {note}",
                                               file_name=path.name)
            return await change(kind, "changed", make, key)

        async def delete(request: web.Request) -> web.Response:
            key = request.match_info["key"]

            def make(text: str, raw: dict[str, Any]) -> toml_edit.Edit:
                if toml_edit.find(raw, array, key_field, key) is None:
                    raise web.HTTPNotFound(reason=f"{path.name} has no {ARRAYS[kind][2]} {key}")
                return toml_edit.remove_entry(text, array, key_field, key, file_name=path.name)
            return await change(kind, "removed", make, key)
        return post, put, delete

    own = site.config.site
    builders: dict[str, Builder] = {
        "connected-sites": lambda body, key, old, raw: connected_site_entry(body, own, key),
        "email-domains": lambda body, key, old, raw: email_domain_entry(body, key, old),
        "replication-connectors": lambda body, key, old, raw: connector_entry(body, key, known_sites(raw), own,
                                                                              old),
    }
    for kind, build in builders.items():
        post, put, delete = handlers(kind, build)
        app.router.add_post(f"/config/{kind}", post)
        app.router.add_put(f"/config/{kind}/{{key}}", put)
        app.router.add_delete(f"/config/{kind}/{{key}}", delete)

    async def get_file(request: web.Request) -> web.Response:
        """What the file says now (the property pages show it) and whether the running
        IMS has taken it."""
        now = await asyncio.to_thread(file_digest, path)
        try:
            raw: dict[str, Any] | None = toml_edit.parse(await asyncio.to_thread(path.read_text, encoding="utf-8"),
                                                         path.name)
            error = None
        except (OSError, toml_edit.EditError) as exc:
            raw, error = None, str(exc)
        lists = {name: [without_secrets(dict(e)) for e in toml_edit.entries(raw, array) if isinstance(e, dict)]
                 if raw else []
                 for name, (array, _, _) in (("connected_sites", ARRAYS["connected-sites"]),
                                             ("email_domains", ARRAYS["email-domains"]),
                                             ("replication_connectors", ARRAYS["replication-connectors"]))}
        return web.json_response({"site": site.config.site, "file": str(path), "pending_restart": now != loaded,
                                  "sites_offered": sorted(n for n in known_sites(raw) if n != site.config.site),
                                  "error": error, **lists,
                                  "message": RESTART_TEXT if now != loaded else None})

    async def put_mailbox(request: web.Request) -> web.Response:
        alias = request.match_info["alias"]
        body = await _body(request)
        display = body.get("display_name")
        addresses = body.get("addresses")
        if display is not None and not isinstance(display, str):
            raise PropertyError("display_name must be a string")
        if addresses is not None and (not isinstance(addresses, list) or len(addresses) > 100
                                      or not all(isinstance(a, str) for a in addresses)):
            raise PropertyError("addresses must be a list of at most 100 SMTP addresses")
        directory = site.directory
        mbx: Mailbox = await directory.run(lambda: directory.set_mailbox_properties(
            alias, display_name=display, secondary=addresses))
        site.log.info("directory.mailbox_changed", alias=alias, display_name=mbx.display_name,
                      proxy_addresses=list(mbx.proxy_addresses))
        return web.json_response({"alias": mbx.alias, "display_name": mbx.display_name, "home_site": mbx.home_site,
                                  "primary_address": mbx.primary_address,
                                  "proxy_addresses": list(mbx.proxy_addresses)})

    async def get_known(request: web.Request) -> web.Response:
        directory = site.directory
        known = await directory.run(known_after_check, directory)
        return web.json_response({"site": site.config.site, "checked": known is not None,
                                  **(known or {"known_sites": [], "awaiting_replication": []})})

    async def post_restart(request: web.Request) -> web.Response:
        """Restart the Internet Mail Service now (Exchange Administrator's question
        after a change; the Services applet's Restart): the site starts again from its
        file.  Refused, with the reason, when the file would not load."""
        if site.on_restart is None or site.workers > 1:
            raise PropertyError(f"restart {site.config.site} where it runs (imsrelay serve"
                                + (f" --workers {site.workers}): a restart from here is for one-process sites"
                                   if site.workers > 1 else "): nothing here can restart it") + ")")
        try:
            await asyncio.to_thread(load_config, path, data_dir=site.config.data_dir)
        except ConfigErrors as exc:
            raise PropertyError(f"{path.name} would not load: " + "; ".join(
                f"{e.key}: {e.message}" for e in exc.errors)) from None
        except ConfigError as exc:
            raise PropertyError(f"{path.name} would not load: {exc.key}: {exc.message}") from None
        site.log.info("site.restart_requested", by="admin", file=str(path))
        site.on_restart()
        return web.json_response({"site": site.config.site, "restarting": True,
                                  "message": f"{site.config.site}'s Internet Mail Service is restarting with "
                                             f"{path.name}."}, status=202)

    app.router.add_get("/config/file", get_file)
    app.router.add_post("/ims/restart", post_restart)
    app.router.add_get("/kcc/known", get_known)
    app.router.add_put("/directory/mailboxes/{alias}", put_mailbox)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise PropertyError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise PropertyError("the request body must be a JSON object")
    return body


@web.middleware
async def property_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """Bad input for a property page: 400 with the reason (and an edit refused: 409)."""
    try:
        return await handler(request)
    except PropertyError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except toml_edit.EditError as exc:
        return web.json_response({"error": str(exc)}, status=409)

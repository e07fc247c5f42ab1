"""The configuration reference, from the code: which keys a site file may have and what
TOML type each is read as (the loader itself, run on a probe file with a section that
records every read), and each key's default and meaning (``imsrelay.model.settings``:
the dataclass field's default and the docstring under the field, or ``KEY_DOCS`` for the
keys that are no field).  ``tools/docs_reference.py`` writes
``docs/reference/configuration.md`` from it; a test fails when that page is stale."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import ipaddress
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imsrelay.config.loader import MISSING, _Section, config_from_root
from imsrelay.model import settings
from imsrelay.model.errors import ConfigErrors

# A file that gives one entry of every array of tables, so that their keys are read too.
_PROBE: dict[str, Any] = {
    "site": {"organisation": "Org", "name": "SiteA", "server": "ServerA", "email_domain": "a.example"},
    "mailboxes": [{"alias": "User1", "display_name": "User One"}],
    "custom_recipients": [{"alias": "Partner", "target": "partner@example.net"}],
    "distribution_lists": [{"alias": "Staff"}],
    "connected_sites": [{"name": "SiteB", "routing_address": "@b.example"}],
    "email_domains": [{"domain": "b.example", "host": "127.0.0.2",
                       "auth": {"username": "ims", "password_env": "IMS_B_PASSWORD"}}],
    "internet_mail": [{"domain": "*"}],
    "delivery": {"tls": [{"domain": "b.example", "starttls": "require"}],
                 "smart_host_auth": {"username": "ims", "password_env": "IMS_SMART_HOST_PASSWORD"}},
    "replication": {"connectors": [{"site": "SiteB"}], "trusted_keys": {}},
    "etrn": {"requests": [{"host": "127.0.0.3", "domain": "a.example"}]},
    "link_monitors": [{"name": "Sites", "targets": ["SiteB"]}],
    "auth": {"mechanisms": ["PLAIN"]},  # read only when given
}

# TOML key -> dataclass field, where the two names differ
_FIELD_NAMES = {"site.name": "site", "site.email_domain": "site_domain", "delivery.tls": "tls_policies",
                "mailboxes[].addresses": "extra_addresses", "custom_recipients[].addresses": "extra_addresses",
                "distribution_lists[].addresses": "extra_addresses"}


@dataclass(frozen=True)
class Key:
    """One key of a site file: ``smtp.port``, ``mailboxes[].alias``."""

    name: str
    kind: str  # the TOML type the loader reads it as
    default: str  # as written in a file ("required" when it must be given)
    doc: str

    @property
    def section(self) -> str:
        """The table the key belongs to: ``smtp``, ``[[mailboxes]]``, ``[[replication.connectors]]``."""
        head, _, _ = self.name.rpartition(".")
        if head.endswith("[]"):
            return f"[[{head[:-2]}]]"
        # a table inside an array's entry: `[email_domains.auth]` under its `[[email_domains]]`
        return f"[{head.replace('[]', '')}]" if head else "(top level)"

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]


class _Recording(_Section):
    """A section that notes, per dotted key, what it was first read as."""

    kinds: dict[str, str] = {}
    required: set[str] = set()

    def _note(self, name: str, kind: str, required: bool = False) -> None:
        key = re.sub(r"\[\d+\]", "[]", self.key(name))
        self.kinds.setdefault(key, kind)
        if required:
            self.required.add(key)

    def string(self, name: str, *, required: bool = False) -> Any:
        self._note(name, "string", required)
        return super().string(name, required=required)

    def choice(self, name: str, choices: tuple[str, ...], *, required: bool = False, fold: bool = False) -> Any:
        self._note(name, "one of " + ", ".join(f'`"{c}"`' for c in choices), required)
        return super().choice(name, choices, required=required, fold=fold)

    def integer(self, name: str, *, minimum: int | None = 0, maximum: int | None = None) -> Any:
        bounds = (f" ≥ {minimum}" if minimum is not None else "") + (f", ≤ {maximum}" if maximum is not None else "")
        self._note(name, "integer" + bounds)
        return super().integer(name, minimum=minimum, maximum=maximum)

    def port(self, name: str, *, allow_zero: bool = False) -> Any:
        self._note(name, "port (0–65535)" if allow_zero else "port (1–65535)")
        return super().port(name, allow_zero=allow_zero)

    def boolean(self, name: str) -> Any:
        self._note(name, "boolean")
        return super().boolean(name)

    def duration(self, name: str, *, off: Any = MISSING) -> Any:
        self._note(name, "duration" + ("" if off is MISSING else ' or `"never"`'))
        return super().duration(name, off=off)

    def listing(self, name: str) -> list[Any]:
        self._note(name, "array")
        return super().listing(name)

    def strings(self, name: str) -> list[tuple[int, str]]:
        self._note(name, "array of strings")
        return super().strings(name)

    def table_of(self, name: str) -> _Section:
        self._note(name, "table")
        return super().table_of(name)

    def tables(self, name: str) -> list[_Section]:
        self._note(name, "array of tables")
        return super().tables(name)


def loader_keys() -> dict[str, str]:
    """Every key the loader reads, with the TOML type it reads it as (in reading order);
    the keys a file must give are in ``_Recording.required`` afterwards."""
    _Recording.kinds, _Recording.required = {}, set()
    root = _Recording(Path("probe.toml"), "", _PROBE, [])
    try:
        config_from_root(root, data_dir=Path("probe-data"))
    except ConfigErrors as exc:  # the probe is a valid file: an error here is a bug of the probe
        raise AssertionError(f"the configuration probe does not load: {exc}") from exc
    kinds = dict(_Recording.kinds)
    # a table of named entries, not a key of its own
    kinds["replication.trusted_keys"] = "table: site name = `\"ed25519:<base64>\"`"
    return {k: v for k, v in kinds.items() if kinds.get(k) not in ("table", "array of tables")}


def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (attribute docstrings)."""
    source = inspect.getsource(cls)
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for stmt, after in zip(body.body, body.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _element(hint: Any) -> Any:
    """``ConnectedSite`` of ``tuple[ConnectedSite, ...]``, ``OutboundAuth`` of
    ``OutboundAuth | None``; the hint itself otherwise."""
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return hint


def _classes() -> dict[str, type]:
    """Section path (``smtp``, ``mailboxes[]``, ``replication.connectors[]``) -> its dataclass."""
    out: dict[str, type] = {"site": settings.SiteConfig}

    def walk(prefix: str, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            inner = _element(hint)
            if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
                continue
            name = next((k.rpartition(".")[2] for k, v in _FIELD_NAMES.items()
                         if v == f.name and k.startswith(prefix)), f.name)
            path = f"{prefix}{name}" + ("[]" if typing.get_origin(hint) is tuple else "")
            out[path] = inner
            walk(path + ".", inner)

    walk("", settings.SiteConfig)
    return out


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f'"{int(seconds // size)}{unit}"'
    return f'"{int(seconds * 1000)}ms"' if seconds < 1 else f'"{seconds:g}s"'


def toml_value(value: Any, kind: str) -> str:
    """A default as it would be written in the file."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind.startswith("duration") and isinstance(value, int | float):
        return _duration(float(value))
    if isinstance(value, tuple):
        items = [toml_value(v, "duration" if kind == "array of durations" else "string") for v in value]
        return "[" + ", ".join(items) + "]"
    if isinstance(value, str | Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return f'"{value}"'
    return str(value)


def _code(value: Any, kind: str) -> str:
    text = toml_value(value, kind)
    return text if text == "unset" else f"`{text}`"


def keys() -> list[Key]:
    """The configuration reference: every key of a site file, in the order of
    ``SiteConfig``'s sections and of each dataclass's fields."""
    classes = _classes()
    docs = {path: _field_docs(cls) for path, cls in classes.items()}
    kinds = loader_keys()
    out = []
    for name, kind in kinds.items():
        head, _, leaf = name.rpartition(".")
        extra = settings.KEY_DOCS.get(name)
        if extra is not None:
            default, doc = extra
            out.append(Key(name, kind, default if isinstance(default, settings.DefaultText) else _code(default, kind),
                           doc))
            continue
        cls = classes.get(head)
        field_name = _FIELD_NAMES.get(name, leaf)
        if cls is None or field_name not in {f.name for f in dataclasses.fields(cls)}:
            raise LookupError(f"{name}: the loader reads it, but it is no field of imsrelay.model.settings "
                              "and has no entry in settings.KEY_DOCS")
        field = next(f for f in dataclasses.fields(cls) if f.name == field_name)
        if kind == "array" and isinstance(field.default, tuple) and all(isinstance(v, float) for v in field.default):
            kind = "array of durations"
        if name in _Recording.required:
            default = "required"
        elif field.default is not dataclasses.MISSING:
            default = _code(field.default, kind)
        elif field.default_factory is not dataclasses.MISSING:
            default = _code(field.default_factory(), kind)
        else:
            default = "see meaning"
        field_doc = docs[head].get(field_name)
        if not field_doc:
            raise LookupError(f"{name}: no docstring under {cls.__name__}.{field_name} in imsrelay/model/settings.py")
        out.append(Key(name, kind, default, field_doc))
    sections = [f.name for f in dataclasses.fields(settings.SiteConfig)]

    heads = list(dict.fromkeys(k.rpartition(".")[0] for k in kinds))  # sub-tables in the order read

    def place(key: Key) -> tuple[int, int, int]:
        top = key.name.split(".")[0].split("[")[0]
        head = key.name.rpartition(".")[0]
        cls = classes.get(head)
        fields = [f.name for f in dataclasses.fields(cls)] if cls else []
        field_name = _FIELD_NAMES.get(key.name, key.leaf)
        top_index = 0 if top == "site" else (sections.index(top) if top in sections else len(sections))
        return (top_index * 10 + head.count("."), heads.index(head),
                (fields.index(field_name) if field_name in fields else len(fields)))

    return sorted(out, key=place)


def markdown() -> str:
    """``docs/reference/configuration.md``."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by tools/docs_reference.py from imsrelay/model/settings.py and the loader "
        "(imsrelay/config/loader.py); do not edit: ./dev docs gen -->",
        "",
        "A site is one TOML file. Every key below, with the type the loader reads it as, its "
        "default and what it does. Durations are seconds or a string such as `\"500ms\"`, "
        "`\"15m\"`, `\"4h\"`, `\"2d\"`. Every key is checked when the file is loaded, and every "
        "error of the file is reported at once, one line each (`imsrelay: configuration error: "
        "FILE: KEY: message`), by `imsrelay check-config` and by every command that reads the "
        "file; an unknown key is an error.",
        "",
        "This page is generated from the code: the keys and their types from "
        "`imsrelay/config/loader.py` (the code that reads the file), the defaults and meanings "
        "from `imsrelay/model/settings.py`, where each default is written once.",
        "",
    ]
    section = None
    for key in keys():
        if key.section != section:
            section = key.section
            lines += ["", f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        doc = key.doc.replace("|", "\\|")
        lines.append(f"| `{key.leaf}` | {key.kind} | {key.default} | {doc} |")
    return "\n".join(lines) + "\n"


__all__ = ["Key", "keys", "loader_keys", "markdown", "toml_value"]

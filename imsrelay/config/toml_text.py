"""TOML text the way a person writes a site file: tables as ``[section]`` and arrays
of tables as ``[[connected_sites]]`` blocks — the form the docs tell people to
add — never inline ``name = [{...}]`` arrays (which a ``[[name]]`` added by hand
could not extend).  Values are rendered by tomli_w; this module only lays out the
headers (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import tomli_w

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else tomli_w.dumps({name: 0}).split(" = ")[0]


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _body(mapping: Mapping[str, Any]) -> str:
    """The ``key = value`` lines of a table (its scalars and plain arrays)."""
    plain = {k: v for k, v in mapping.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    return tomli_w.dumps(plain) if plain else ""


def _tables(path: list[str], mapping: Mapping[str, Any], out: list[str]) -> None:
    for name, value in mapping.items():
        here = path + [_key(name)]
        if isinstance(value, Mapping):
            out.append(f"[{'.'.join(here)}]\n" + _body(value))
            _tables(here, value, out)
        elif _is_table_array(value):
            for item in value:
                out.append(f"[[{'.'.join(here)}]]\n" + _body(item))
                _tables(here, item, out)


def dumps(mapping: Mapping[str, Any]) -> str:
    """``mapping`` as TOML with ``[table]`` and ``[[array.of.tables]]`` headers."""
    out = [_body(mapping)] if _body(mapping) else []
    _tables([], mapping, out)
    return "\n".join(part.rstrip("\n") + "\n" for part in out)


def table_block(name: str, entry: Mapping[str, Any]) -> str:
    """One ``[[name]]`` block, to append to a file a person may have edited."""
    return f"[[{name}]]\n" + _body(entry)

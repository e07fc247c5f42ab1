"""Change one ``[[array]]`` entry of a site file the way a person would by hand:
add a block at the end, rewrite one block's ``key = value`` lines, or take one block
out, keeping every other line and comment of the file (pure).

Each edit is checked against the data it must produce: the edited text is parsed
again and compared with the file's parsed content changed in memory.  When a plain
text edit cannot give that (the array is written inline, ``connected_sites = [...]``,
or a block holds what a line edit cannot reach), the file is written again from the
data in ``[[table]]`` form with its leading comment lines kept, as ``imsrelay lab
next`` does (``imsrelay.config.toml_text``).
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from imsrelay.config import toml_text

_HEADER = re.compile(r"^\s*\[")
_KEY_LINE = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")


class EditError(Exception):
    """The edit cannot be made (one line saying why)."""


@dataclass(frozen=True)
class Edit:
    """The new text of the file and how it was made."""

    text: str
    data: dict[str, Any]
    rewritten: bool  # True: the whole file was written again from its data


def entries(raw: Mapping[str, Any], array: str) -> list[Any]:
    """The entries of ``array`` (dotted: ``replication.connectors``) in parsed TOML."""
    value: Any = raw
    for part in array.split("."):
        value = value.get(part, {}) if isinstance(value, Mapping) else {}
    return value if isinstance(value, list) else []


def _same_key(entry: Any, key_field: str, key: str) -> bool:
    return isinstance(entry, Mapping) and str(entry.get(key_field, "")).lower() == key.lower()


def find(raw: Mapping[str, Any], array: str, key_field: str, key: str) -> dict[str, Any] | None:
    """The entry of ``array`` whose ``key_field`` is ``key`` (compared without case)."""
    for e in entries(raw, array):
        if _same_key(e, key_field, key):
            return dict(e)
    return None


def _changed(raw: Mapping[str, Any], array: str, change: Callable[[list[Any]], list[Any]]) -> dict[str, Any]:
    data = copy.deepcopy(dict(raw))
    table: dict[str, Any] = data
    *parents, leaf = array.split(".")
    for part in parents:
        table = table.setdefault(part, {})
    new = change(list(table.get(leaf, [])))
    if new:
        table[leaf] = new
    else:
        table.pop(leaf, None)
    return data


def _blocks(lines: list[str], array: str) -> list[tuple[int, int]]:
    """(first line, end line) of each ``[[array]]`` block: its header up to the next header."""
    header = re.compile(r"^\s*\[\[\s*" + re.escape(array).replace(r"\.", r"\s*\.\s*") + r"\s*\]\]\s*(#.*)?$")
    found = []
    for i, line in enumerate(lines):
        if header.match(line):
            end = next((j for j in range(i + 1, len(lines)) if _HEADER.match(lines[j])), len(lines))
            while end > i + 1 and (lines[end - 1].strip() == "" or (
                    end < len(lines) and lines[end - 1].lstrip().startswith("#"))):
                end -= 1  # blank lines and the next block's comment stay with the next block
            found.append((i, end))
    return found


def _block_key(lines: list[str], span: tuple[int, int], key_field: str) -> str | None:
    try:
        body = tomllib.loads("".join(lines[span[0] + 1:span[1]]))
    except tomllib.TOMLDecodeError:
        return None
    value = body.get(key_field)
    return None if value is None else str(value)


def _lead_comments(text: str) -> str:
    """The comment lines at the top of a file (kept when it is written again)."""
    out = []
    for line in text.splitlines(keepends=True):
        if not line.lstrip().startswith("#"):
            break
        out.append(line)
    return "".join(out)


def _result(text: str, new_text: str | None, data: dict[str, Any]) -> Edit:
    if new_text is not None:
        try:
            if tomllib.loads(new_text) == data:
                return Edit(new_text, data, False)
        except tomllib.TOMLDecodeError:
            pass
    return Edit(_lead_comments(text) + toml_text.dumps(data), data, True)


def parse(text: str, file_name: str) -> dict[str, Any]:
    """The file's data, or ``EditError`` saying it must be corrected by hand."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EditError(f"{file_name} is not valid TOML ({exc}): correct it by hand first") from None


def add_entry(text: str, array: str, key_field: str, entry: Mapping[str, Any], *, note: str,
              file_name: str = "the site file") -> Edit:
    """``entry`` appended as a ``[[array]]`` block after a ``# note`` line."""
    raw = parse(text, file_name)
    key = str(entry[key_field])
    if find(raw, array, key_field, key) is not None:
        raise EditError(f"{file_name} already has a [[{array}]] entry with {key_field} = {key!r}")
    data = _changed(raw, array, lambda old: old + [dict(entry)])
    block = toml_text.table_block(array, entry)
    new_text = text.rstrip("\n") + f"\n\n# {note}\n" + block if text.strip() else f"# {note}\n" + block
    return _result(text, new_text, data)


def replace_entry(text: str, array: str, key_field: str, key: str, entry: Mapping[str, Any], *,
                  note: str, file_name: str = "the site file") -> Edit:
    """The ``[[array]]`` block whose ``key_field`` is ``key`` now says ``entry``: its
    ``key = value`` lines are replaced, its comment lines kept."""
    raw = parse(text, file_name)
    if find(raw, array, key_field, key) is None:
        raise EditError(f"{file_name} has no [[{array}]] entry with {key_field} = {key!r}")
    new_key = str(entry[key_field])
    if new_key.lower() != key.lower() and find(raw, array, key_field, new_key) is not None:
        raise EditError(f"{file_name} already has a [[{array}]] entry with {key_field} = {new_key!r}")
    data = _changed(raw, array, lambda old: [dict(entry) if _same_key(e, key_field, key) else e for e in old])
    lines = text.splitlines(keepends=True)
    new_text = None
    for span in _blocks(lines, array):
        found = _block_key(lines, span, key_field)
        if found is not None and found.lower() == key.lower():
            kept = [ln for ln in lines[span[0] + 1:span[1]] if not _KEY_LINE.match(ln) and ln.strip()]
            body = toml_text.table_block(array, entry).splitlines(keepends=True)[1:]
            head = lines[span[0]] if lines[span[0]].endswith("\n") else lines[span[0]] + "\n"
            if not any(ln.strip() == f"# {note}" for ln in kept):
                kept.append(f"# {note}\n")
            new_text = "".join(lines[:span[0]] + [head] + kept + body + lines[span[1]:])
            break
    return _result(text, new_text, data)


def remove_entry(text: str, array: str, key_field: str, key: str, *, file_name: str = "the site file") -> Edit:
    """The ``[[array]]`` block whose ``key_field`` is ``key`` taken out (with its own
    comment lines); every other line stays."""
    raw = parse(text, file_name)
    if find(raw, array, key_field, key) is None:
        raise EditError(f"{file_name} has no [[{array}]] entry with {key_field} = {key!r}")
    data = _changed(raw, array, lambda old: [e for e in old if not _same_key(e, key_field, key)])
    lines = text.splitlines(keepends=True)
    new_text = None
    for span in _blocks(lines, array):
        found = _block_key(lines, span, key_field)
        if found is not None and found.lower() == key.lower():
            start = span[0]
            # a comment written by an edit of this console just above the block goes with it
            while start > 0 and lines[start - 1].lstrip().startswith("# ") and "console" in lines[start - 1]:
                start -= 1
            new_text = "".join(lines[:start] + lines[span[1]:])
            break
    return _result(text, new_text, data)

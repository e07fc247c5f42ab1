"""Sub-commands of the ``imsrelay`` CLI, one module per group (see ``imsrelay.cli``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def add_site_options(p: argparse.ArgumentParser, *, data: bool = True, offline: bool = False,
                     data_help: str = "data directory (overrides site.data_dir)",
                     offline_help: str = "work on the stopped site's database directly instead of its admin endpoint",
                     ) -> None:
    """The options every per-site command takes: ``--config`` (and ``--data``,
    ``--offline`` where they make sense)."""
    p.add_argument("--config", "-c", required=True, type=Path, help="the site's TOML file")
    if data:
        p.add_argument("--data", type=Path, help=data_help)
    if offline:
        p.add_argument("--offline", action="store_true", help=offline_help)


def whole_number(minimum: int, maximum: int | None = None, what: str = "a whole number") -> Callable[[str], int]:
    """An argparse ``type`` for a bounded whole number (a bad value is a one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({what}: {bounds})")
        return value
    parse.__name__ = what
    return parse


def positive_seconds(text: str) -> float:
    """An argparse ``type`` for a time in seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


PORT = whole_number(1, 65535, "a TCP port")


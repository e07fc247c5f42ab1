"""Sub-commands of the ``imsrelay`` CLI, one module per group (see ``imsrelay.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_site_options(p: argparse.ArgumentParser, *, data: bool = True, offline: bool = False,
                     data_help: str = "data directory (overrides site.data_dir)") -> None:
    """The options every per-site command takes: ``--config`` (and ``--data``,
    ``--offline`` where they make sense)."""
    p.add_argument("--config", "-c", required=True, type=Path, help="the site's TOML file")
    if data:
        p.add_argument("--data", type=Path, help=data_help)
    if offline:
        p.add_argument("--offline", action="store_true",
                       help="work on the stopped site's database directly instead of its admin endpoint")

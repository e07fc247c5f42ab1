"""``imsrelay`` command line: a thin dispatcher over ``imsrelay.commands.*``.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)``, which adds its
sub-commands and sets ``func`` (``args -> exit code``) on them.  Errors a user can
cause (bad config, bad arguments, a site that is not running) print one clear line
on stderr and exit non-zero — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from imsrelay import __version__
from imsrelay.config import ConfigError

COMMAND_MODULES = [
    "imsrelay.commands.serve",
    "imsrelay.commands.directory",
    "imsrelay.commands.route",
    "imsrelay.commands.queue",
    "imsrelay.commands.replicate",
    "imsrelay.commands.kcc",
    "imsrelay.commands.site_addressing",
    "imsrelay.commands.lab",
    "imsrelay.commands.org_setup",
    "imsrelay.commands.console",
    "imsrelay.commands.track",
]


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2 (or .status)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imsrelay",
        description="Exchange 5.5 Internet Mail Service emulation: one SMTP relay per site.")
    parser.add_argument("--version", action="version", version=f"imsrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"imsrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"imsrelay: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `imsrelay check-config F | head`
        sys.stderr.close()
        return 0

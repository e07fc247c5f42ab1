"""``imsrelay`` command line: a thin dispatcher over ``imsrelay.commands.*``.

Each module in ``COMMANDS`` has ``register(subparsers)``, which adds its
sub-commands and sets ``func`` (``args -> exit code``) on them.  Errors a user can
cause (bad config, bad arguments, a site that is not running) print one clear line
on stderr and exit non-zero — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from imsrelay import __version__
from imsrelay.errors import ConfigError, ConfigErrors, UserError

# The sub-command each module registers: only the module of the command given is
# imported (the CLI's deliberate lazy loading: ``check-config`` or ``queue list``
# need not load the SMTP server, aiohttp and dnspython).  Help and unknown commands
# load them all.
COMMANDS = {
    "serve": "imsrelay.commands.serve",
    "check-config": "imsrelay.commands.check_config",
    "directory": "imsrelay.commands.directory",
    "route": "imsrelay.commands.route",
    "queue": "imsrelay.commands.queue",
    "replicate": "imsrelay.commands.replicate",
    "kcc": "imsrelay.commands.kcc",
    "site-addressing": "imsrelay.commands.site_addressing",
    "lab": "imsrelay.commands.lab",
    "org-setup": "imsrelay.commands.org_setup",
    "track": "imsrelay.commands.track",
    "console": "imsrelay.commands.console",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (None: every sub-command, as for ``--help``)."""
    chosen = next((a for a in argv or [] if not a.startswith("-")), None)
    modules = [COMMANDS[chosen]] if chosen in COMMANDS else COMMAND_MODULES
    parser = argparse.ArgumentParser(
        prog="imsrelay",
        description="Exchange 5.5 Internet Mail Service emulation: one SMTP relay per site.")
    parser.add_argument("--version", action="version", version=f"imsrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # every error of the file, one line each
        for line in exc.lines() if isinstance(exc, ConfigErrors) else [str(exc)]:
            print(f"imsrelay: configuration error: {line}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"imsrelay: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `imsrelay check-config F | head`
        sys.stderr.close()
        return 0

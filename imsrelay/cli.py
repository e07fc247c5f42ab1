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
from typing import NoReturn

from imsrelay import __version__
from imsrelay.model.errors import ConfigError, ConfigErrors, UserError

# The sub-command each module registers: only the module of the command given is
# imported (the CLI's deliberate lazy loading: ``check-config`` or ``queue list``
# need not load the SMTP server, aiohttp and dnspython).  Help and unknown commands
# load them all.
COMMANDS = {
    "serve": "imsrelay.commands.serve",
    "check-config": "imsrelay.commands.check_config",
    "directory": "imsrelay.commands.directory",
    "route": "imsrelay.commands.route",
    "restrictions": "imsrelay.commands.restrictions",
    "queue": "imsrelay.commands.queue",
    "replicate": "imsrelay.commands.replicate",
    "kcc": "imsrelay.commands.kcc",
    "site-addressing": "imsrelay.commands.site_addressing",
    "lab": "imsrelay.commands.lab",
    "org-setup": "imsrelay.commands.org_setup",
    "transfer-mode": "imsrelay.commands.transfer_mode",
    "faults": "imsrelay.commands.faults",
    "track": "imsrelay.commands.track",
    "console": "imsrelay.commands.console",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


# Exit statuses of every command (listed by ``imsrelay --help``).
EXIT_USAGE = 2  # bad arguments, bad configuration, input the site refused
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit status:
  0    done
  1    nothing matched (no such queue id or mailbox), or a check found problems
       (kcc check-now errors, org-setup --check not done)
  2    usage or input error: bad arguments, a bad configuration file (one line per
       error), a value the site refused (invalid alias, address or domain)
  3    the site is not running (its admin endpoint does not answer)
  130  interrupted (Ctrl-C)"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (None: every sub-command, as for ``--help``)."""
    chosen = next((a for a in argv or [] if not a.startswith("-")), None)
    modules = [COMMANDS[chosen]] if chosen in COMMANDS else COMMAND_MODULES
    parser = OneLineParser(
        prog="imsrelay",
        description="Exchange 5.5 Internet Mail Service emulation: one SMTP relay per site.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"imsrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    describe(parser)
    return parser


def describe(parser: argparse.ArgumentParser) -> None:
    """Every sub-command's ``--help`` page opens with what it does: its one-line help
    (as ``imsrelay --help`` lists it) unless it has a description of its own."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            if sub.description is None and helps.get(name):
                text = str(helps[name])
                sub.description = text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")
            describe(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # every error of the file, one line each
        for line in exc.lines() if isinstance(exc, ConfigErrors) else [str(exc)]:
            print(f"imsrelay: configuration error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as exc:
        print(f"imsrelay: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `imsrelay check-config F | head`
        sys.stderr.close()
        return 0
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named: a real bug, keep its traceback
            raise
        print(f"imsrelay: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE

"""Errors a user can cause, and how they are told (one clear line, never a traceback).

``ConfigError`` names the file and the key of a bad setting; ``ConfigErrors`` carries
every such error of one file (``load_config`` reports them all at once, in the
order it checks the file's sections);
``UserError`` is anything else the user can fix (a bad argument, a site that is not
running): the CLI prints it as one line and exits with ``status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2 (or .status)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class ConfigError(Exception):
    """A problem in a configuration file, naming the file and the key."""

    def __init__(self, path: Path | str, key: str, message: str) -> None:
        self.path = str(path)
        self.key = key
        self.message = message
        super().__init__(f"{self.path}: {key}: {message}")


class ConfigErrors(ConfigError):
    """Every problem found in one configuration file (at least one).

    It reads as its first error (``key``, ``message``, ``str``), so code that handles
    one ``ConfigError`` still works; ``errors`` holds them all."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = errors[0]
        super().__init__(first.path, first.key, first.message)
        self.errors = tuple(errors)

    def lines(self) -> list[str]:
        return [str(e) for e in self.errors]

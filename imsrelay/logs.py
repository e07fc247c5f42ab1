"""structlog set-up: one event per line, JSON when not on a TTY, key=value on one.

Event names are stable and documented in docs/events.md; every event about a
message carries ``queue_id``, every event about a peer carries ``peer``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
                      site: str | None = None) -> None:
    stream = stream or sys.stderr
    fmt = os.environ.get("IMSRELAY_LOG_FORMAT") or fmt
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if site:
        processors.insert(0, _bind_site(site))
    if use_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # aiosmtpd, asyncio and aiohttp log through the stdlib: route them into the same
    # one-event-per-line stream, quiet unless debugging.
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StdlibBridge):
            root.removeHandler(h)
    root.addHandler(_StdlibBridge())
    root.setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


class _StdlibBridge(logging.Handler):
    """Forward stdlib log records (libraries) to structlog as ``library.log`` events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(
                record.levelno, "library.log", logger=record.name, message=record.getMessage())
        except Exception:  # never let logging break the server
            self.handleError(record)


def _bind_site(site: str) -> Callable[[Any, str, dict[str, Any]], dict[str, Any]]:
    def processor(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("site", site)
        return event
    return processor


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

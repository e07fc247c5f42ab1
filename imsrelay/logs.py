"""structlog set-up: one event per line, JSON when not on a TTY, key=value on one.

Event names are stable and documented in docs/events.md; every event about a
message carries ``queue_id``, every event about a peer carries ``peer``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
                      site: str | None = None) -> None:
    stream = stream or sys.stderr
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
    # aiosmtpd and asyncio log through the stdlib; keep them quiet unless debugging.
    logging.basicConfig(level=logging.WARNING if level != "debug" else logging.DEBUG, stream=stream)
    logging.getLogger("mail.log").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


def _bind_site(site: str):
    def processor(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("site", site)
        return event
    return processor


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

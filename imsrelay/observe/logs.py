"""structlog set-up: one event per line, JSON when not on a TTY, key=value on one.

Event names are stable and documented in docs/events.md; every event about a
message carries ``queue_id``, every event about a peer carries ``peer``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from imsrelay.model.settings import EVENT_CATEGORIES

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
        logger_factory=lambda *args: LineLogger(stream),
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
    for name in ("asyncio", "aiohttp.server"):
        lib = logging.getLogger(name)
        if not any(isinstance(f, ClientFaultFilter) for f in lib.filters):
            lib.addFilter(ClientFaultFilter())


# What a client's garbage makes the libraries log at error level (asyncio: TLS from a
# client that hangs up or speaks no TLS; aiohttp: a request it cannot parse or a client
# that goes mid-request): the client's fault, not ours.  Anything else stays an error.
_CLIENT_FAULT_MESSAGES = ("Fatal error on SSL protocol", "SSL handshake failed", "Error handling request",
                          "Fatal read error on socket transport", "Fatal write error on socket transport")


def _client_fault(exc: BaseException | None) -> bool:
    if exc is None or isinstance(exc, (OSError, EOFError, TimeoutError)):  # ssl.SSLError, ConnectionError too
        return True
    try:
        from aiohttp.http_exceptions import HttpProcessingError
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        return False
    return isinstance(exc, HttpProcessingError)


class ClientFaultFilter(logging.Filter):
    """Lower the libraries' error lines caused by a client (``_CLIENT_FAULT_MESSAGES``
    with a network, TLS or HTTP-parsing exception) to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and isinstance(record.msg, str) \
                and record.msg.startswith(_CLIENT_FAULT_MESSAGES):
            exc = record.exc_info[1] if record.exc_info else None
            if _client_fault(exc):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


PIPE_BUF = 4096  # writes up to this size are atomic on a pipe


class LineLogger:
    """Each event as one ``write`` of one whole line, so processes sharing a stream
    (``serve --workers``) never interleave their lines.  Lines longer than PIPE_BUF
    (tracebacks) also take a lock file shared by those processes (``share_lock``)."""

    _lock_path: str | None = None
    _lock: tuple[int, int] | None = None  # (pid, fd): each process opens its own

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    @classmethod
    def share_lock(cls, path: str) -> None:
        cls._lock_path = path

    def _lock_fd(self) -> int | None:
        if LineLogger._lock_path is None:
            return None
        held = LineLogger._lock
        if held is None or held[0] != os.getpid():
            fd = os.open(LineLogger._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            LineLogger._lock = held = (os.getpid(), fd)
        return held[1]

    def msg(self, message: str) -> None:
        line = (message + "\n").encode("utf-8", "replace")
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (tests' StringIO)
            self._stream.write(message + "\n")
            self._stream.flush()
            return
        self._stream.flush()
        lock = self._lock_fd() if len(line) > PIPE_BUF else None
        if lock is not None:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        finally:
            if lock is not None:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_UN)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _StdlibBridge(logging.Handler):
    """Forward stdlib log records (libraries) to structlog as ``library.log`` events."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.root.level:  # lowered by ClientFaultFilter after the level check
            return
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


# ------------------------------------------------------------------ Diagnostics Logging (Q146669)

# Exchange's levels, and the lowest structlog level each lets through
CATEGORY_LEVELS = {"none": logging.ERROR, "minimum": logging.WARNING, "medium": logging.INFO,
                   "maximum": logging.DEBUG}
_FROM_LOGGING_LEVEL = {"debug": "maximum", "info": "medium", "warning": "minimum", "error": "none"}
# event name prefix -> category (the first match wins; the rest is internal processing)
_CATEGORY_PREFIXES = (
    (("site.", "admin.started", "admin.stopped", "directory.provisioned", "queue.recovered", "queue.adopted",
      "lab."), "initialization_termination"),
    (("recipient.", "message.rewritten", "route.", "directory.", "site_addressing.", "kcc."), "addressing"),
    (("message.", "queue."), "message_archival"),
    (("smtp.", "delivery.connect", "delivery.smtp_reply", "delivery.tls", "delivery.auth", "delivery.host",
      "delivery.connection", "delivery.reuse", "delivery.dns_failed", "delivery.loop", "fault.", "etrn.", "transfer_mode."),
     "smtp_interface_events"),
)
_METHOD_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
                  "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL,
                  "msg": logging.INFO}


def category_of(event: str) -> str:
    """The Diagnostics Logging category of an event name (pure)."""
    for prefixes, category in _CATEGORY_PREFIXES:
        if event.startswith(prefixes):
            return category
    return "internal_processing"


def category_levels(config: Any) -> dict[str, int]:
    """Category -> lowest logging level let through, from [diagnostics] (each category
    defaults to logging.level: debug = maximum, info = medium, warning = minimum)."""
    default = _FROM_LOGGING_LEVEL.get(config.logging.level, "medium")
    return {c: CATEGORY_LEVELS[config.diagnostics.level(c, default)] for c in EVENT_CATEGORIES}


class CategoryFilter:
    """structlog processor: drop an event below its category's level."""

    def __init__(self, levels: dict[str, int]) -> None:
        self.levels = levels

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        name = str(event.get("event", ""))
        if _METHOD_LEVELS.get(method, logging.INFO) < self.levels.get(category_of(name), logging.INFO):
            raise structlog.DropEvent
        return event


def site_logger(config: Any) -> Any:
    """A site's logger with its Diagnostics Logging levels; the output (processors,
    stream) is the process's (``configure_logging``)."""
    levels = category_levels(config)
    if not config.diagnostics.levels:
        return structlog.get_logger("imsrelay")  # no per-category setting: logging.level alone
    current = structlog.get_config()
    return structlog.wrap_logger(
        None, processors=[CategoryFilter(levels), *current["processors"]],
        wrapper_class=structlog.make_filtering_bound_logger(min(levels.values())),
        logger_factory_args=("imsrelay",))

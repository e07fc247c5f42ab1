"""Log lines a person can read, JSON when asked: ``logging.format`` and the
``IMSRELAY_LOG_FORMAT`` override the Docker lab relies on (pure set-up, real structlog)."""

from __future__ import annotations

import io
import json

import structlog

from imsrelay.observe.logs import configure_logging, get_logger


def emit(monkeypatch, fmt: str, env: str | None) -> str:
    if env is None:
        monkeypatch.delenv("IMSRELAY_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("IMSRELAY_LOG_FORMAT", env)
    stream = io.StringIO()
    saved = structlog.get_config()
    try:
        configure_logging("info", fmt, stream=stream)
        get_logger("t").info("site.started", site="SiteA", listen="10.10.10.10", port=25)
    finally:
        structlog.configure(**saved)
    return stream.getvalue().strip()


def test_console_lines_by_default_in_docker_and_json_when_asked(monkeypatch):
    line = emit(monkeypatch, "console", None)
    assert "site.started" in line and "listen=10.10.10.10" in line and not line.startswith("{")
    assert json.loads(emit(monkeypatch, "console", "json"))["event"] == "site.started"
    # "auto" off a terminal is JSON; the environment can ask for key=value lines
    assert emit(monkeypatch, "auto", None).startswith("{")
    assert "listen=10.10.10.10" in emit(monkeypatch, "auto", "console")



def test_client_garbage_is_not_logged_as_our_error():
    """Issue 27: asyncio's "Fatal error on SSL protocol" and aiohttp's "Error handling
    request" caused by a client (TLS garbage, a hang-up, an unparsable request) are
    debug lines; the same messages with one of our own exceptions stay errors."""
    import logging
    import ssl

    from aiohttp.http_exceptions import BadStatusLine

    from imsrelay.observe.logs import ClientFaultFilter, configure_logging
    configure_logging("warning", "json")
    assert any(isinstance(f, ClientFaultFilter) for f in logging.getLogger("asyncio").filters)
    assert any(isinstance(f, ClientFaultFilter) for f in logging.getLogger("aiohttp.server").filters)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        for name, msg, exc in [
                ("asyncio", "Fatal error on SSL protocol\nprotocol: <x>", ssl.SSLError(1, "WRONG_VERSION_NUMBER")),
                ("asyncio", "SSL handshake failed", ConnectionResetError(104, "reset")),
                ("aiohttp.server", "Error handling request", BadStatusLine("\x16\x03")),
                ("aiohttp.server", "Error handling request", ConnectionResetError()),
                ("aiohttp.server", "Error handling request", KeyError("ours")),
                ("asyncio", "Fatal error on SSL protocol", AttributeError("ours"))]:
            try:
                raise exc
            except BaseException as caught:  # noqa: B036 - a record with exc_info, as the libraries log it
                logging.getLogger(name).error(msg, exc_info=caught)
    finally:
        logging.getLogger().removeHandler(keep)
    levels = [r.levelno for r in seen]
    assert levels == [logging.DEBUG] * 4 + [logging.ERROR] * 2, levels

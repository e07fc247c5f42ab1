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

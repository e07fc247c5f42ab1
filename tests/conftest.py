"""Shared pytest set-up.  Test helpers live in tests/sitekit.py (real sites on
loopback, sending mail, free ports, an organisation of sites), tests/nsd_server.py
(a real nsd) and tests/smtp_sink.py (Postfix's smtp-sink); ``tests`` is on the
import path through ``pythonpath`` in pyproject.toml."""

from imsrelay.logs import configure_logging

configure_logging("warning", "json")

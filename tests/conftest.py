"""Shared pytest set-up.  Test helpers live in tests/sitekit.py (real sites on
loopback) and tests/nsd_server.py (a real nsd)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from imsrelay.logs import configure_logging  # noqa: E402

configure_logging("warning", "json")

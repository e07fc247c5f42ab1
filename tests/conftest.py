"""Shared pytest set-up.  Test helpers live in tests/sitekit.py (real sites on
loopback) and tests/nsd_server.py (a real nsd)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import hypothesis  # noqa: E402,F401  - imported up front: its plugin's late import at the session's end trips

#                    a CPython 3.11 AST recursion-depth check after TLS tests ("AST constructor recursion depth mismatch")
from imsrelay.logs import configure_logging  # noqa: E402

configure_logging("warning", "json")

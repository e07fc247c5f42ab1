"""The accept queue of every listening socket the project opens.

SMTP, submission and implicit-TLS listeners (``imsrelay.ingress.listeners``), the admin
endpoint, the lab endpoint and the web console all take their backlog from here:
``[smtp] listen_backlog``, or with 0 (the default) the kernel's maximum.
"""

from __future__ import annotations

from pathlib import Path

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
FALLBACK_BACKLOG = 4096  # where the kernel's maximum cannot be read (Linux's own default since 5.4)


def accept_backlog(configured: int = 0) -> int:
    """The accept queue of a listening socket: ``configured``, or with 0 the kernel's
    maximum (``net.core.somaxconn``; listen(2) caps any larger value to it anyway).
    asyncio's and aiohttp's defaults (100, 128) drop SYNs once a burst of clients
    outruns the accept loop, and each dropped SYN costs its client a 1 s retransmit."""
    if configured > 0:
        return configured
    try:
        return max(1, int(SOMAXCONN.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return FALLBACK_BACKLOG

"""The IMS's Transfer mode (Connections tab; KB Q238719, Q156063), as pure decisions.

=======================  =====================  ==========================================
mode                     new mail over SMTP     queued mail
=======================  =====================  ==========================================
``inbound-outbound``     accepted               delivered (local and remote)
``inbound``              accepted               local delivery; outbound SMTP is held
``outbound``             refused (4xx)          delivered (local and remote)
``none``                 refused (4xx)          every queue held (nothing is attempted)
=======================  =====================  ==========================================

"Held" is not "failed": a held recipient is not attempted, gets no retry count and
no NDR; switching the mode back releases it at once.  The mode is part of the site's
state (its directory database), changed at run time by ``imsrelay transfer-mode set``
or ``PUT /transfer-mode``; ``[transfer] mode`` is only the mode of the first start.
"""

from __future__ import annotations

from enum import StrEnum


class TransferMode(StrEnum):
    INBOUND_OUTBOUND = "inbound-outbound"
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    NONE = "none"


_ALIASES = {
    "inbound-outbound": TransferMode.INBOUND_OUTBOUND, "inbound-and-outbound": TransferMode.INBOUND_OUTBOUND,
    "inbound&outbound": TransferMode.INBOUND_OUTBOUND, "both": TransferMode.INBOUND_OUTBOUND,
    "inbound": TransferMode.INBOUND, "inbound-only": TransferMode.INBOUND,
    "outbound": TransferMode.OUTBOUND, "outbound-only": TransferMode.OUTBOUND,
    "none": TransferMode.NONE,
}

MODE_NAMES = "inbound-outbound, inbound, outbound, none"
TRANSFER_MODE_KEY = "transfer_mode"  # where the site's mode is kept: the directory database's meta table

# RFC 3463 4.3.2 "System not accepting network messages"
REFUSAL = "421 4.3.2 {host}: transfer mode is {mode}: not accepting messages now, try again later"
TRANSACTION_REFUSAL = "451 4.3.2 Transfer mode is {mode}: not accepting messages now, try again later"


def parse_mode(text: str) -> TransferMode:
    """A mode from its name (also ``both``, ``inbound-only``, ``outbound-only``); ValueError."""
    mode = _ALIASES.get(text.strip().lower().replace(" ", "-").replace("_", "-"))
    if mode is None:
        raise ValueError(f"{text!r} is not a transfer mode ({MODE_NAMES})")
    return mode


def accepts_inbound(mode: TransferMode) -> bool:
    """Whether SMTP clients may hand this site new mail."""
    return mode in (TransferMode.INBOUND_OUTBOUND, TransferMode.INBOUND)


def holds(mode: TransferMode, *, remote: bool) -> bool:
    """Whether a queued recipient waits instead of being attempted: ``remote`` for
    an outbound SMTP route, else local delivery, the directory or an NDR-bound failure."""
    if mode is TransferMode.NONE:
        return True
    if mode is TransferMode.INBOUND:
        return remote
    return False

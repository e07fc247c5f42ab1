"""Site Addressing change as a bulk job (Exchange 5.5's "update all recipient
e-mail addresses"), shared by the admin endpoint, the offline CLI and the lab."""

from __future__ import annotations

from typing import Any

from imsrelay.directory.store import Directory, DirectoryError, site_addressing_domain
from imsrelay.model.objects import BulkReport


def site_addressing_job(directory: Directory, log: Any, address: str, *, update_mailboxes: bool,
                        keep_old: bool) -> BulkReport:
    """Change Site Addressing and (optionally) re-address every local mailbox, logging
    Exchange's bulk-update events: started (2043), substitutes (2053), finished (2044).
    Synchronous: run it on the directory's thread (``directory.run``) or offline.
    A malformed address is refused (``DirectoryInputError``) before the job starts."""
    site_addressing_domain(address)
    log.info("site_addressing.started", event_id=2043, address=address, update_mailboxes=update_mailboxes,
             keep_old=keep_old)
    try:
        report = directory.set_site_addressing(address, update_mailboxes=update_mailboxes, keep_old=keep_old)
    except DirectoryError as exc:
        log.warning("site_addressing.failed", address=address, error=str(exc))
        raise
    for alias, substitute in report.substitutes:
        log.warning("site_addressing.substitute", event_id=2053, alias=alias, address=substitute,
                    reason="the address was not unique; a substitute was generated")
    log.info("site_addressing.finished", event_id=2044, address=address, scanned=report.scanned,
             updated=report.updated, failed=report.failed, substitutes=len(report.substitutes))
    return report


def report_dict(address: str, report: BulkReport, *, update_mailboxes: bool, keep_old: bool) -> dict[str, Any]:
    return {"address": address, "update_mailboxes": update_mailboxes, "keep_old": keep_old,
            "scanned": report.scanned, "updated": report.updated, "failed": report.failed,
            "substitutes": [{"alias": a, "address": s} for a, s in report.substitutes]}

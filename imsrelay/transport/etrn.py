"""Issuing ETRN (RFC 1985) to a host on a schedule: ``[[etrn.requests]]``.

A dial-up style peer holds mail for this site's domain until asked; this site asks
it every ``schedule`` (Q175494, Q258292: the IMS "can issue ETRN on a schedule").
The answer is logged (``etrn.issued``); a failure is logged and tried again at the
next round, never stopping the schedule.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtplib

from imsrelay.model.settings import EtrnRequest


async def issue_etrn(request: EtrnRequest, *, hostname: str, timeout: float = 30.0) -> tuple[int, str]:
    """One ETRN session: EHLO, ``ETRN domain``, QUIT; returns the ETRN reply."""
    client = aiosmtplib.SMTP(hostname=request.host, port=request.port, local_hostname=hostname,
                             timeout=timeout, start_tls=False, use_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        reply = await client.execute_command(b"ETRN", request.domain.encode("ascii"))
        return reply.code, reply.message
    finally:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


async def etrn_schedule(request: EtrnRequest, *, hostname: str, timeout: float, log: Any) -> None:
    """Issue ``request`` every ``request.schedule`` seconds, until cancelled (``hostname``:
    this site's EHLO name; ``timeout``: per command)."""
    log = log.bind(component="etrn", peer=f"{request.host}:{request.port}")
    while True:
        try:
            code, message = await issue_etrn(request, hostname=hostname, timeout=timeout)
            log.info("etrn.issued", node=request.domain, code=code, reply=" ".join(message.split()))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.warning("etrn.failed", node=request.domain, error=str(exc) or type(exc).__name__)
        await asyncio.sleep(request.schedule)

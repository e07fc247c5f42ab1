"""The per-session SMTP protocol log (Diagnostics Logging, "SMTP protocol log"; Q189731).

When ``diagnostics.smtp_protocol_log`` is not ``none``, every command and reply of
every SMTP session — inbound (clients talking to this site) and outbound (this site
talking to next hops) — goes to ``<data>/logs/smtp-protocol.log``, one line each::

    2026-12-01T20:15:02.123Z in  s=3f9a01c2 peer=127.0.0.1:40112 q=- C: MAIL FROM:<a@b>
    2026-12-01T20:15:02.124Z in  s=3f9a01c2 peer=127.0.0.1:40112 q=- S: 250 2.1.0 <a@b> sender ok
    2026-12-01T20:15:02.300Z out s=77c0aa10 peer=127.0.0.1:2526 q=6610A0D6C1026AD0BDA4F C: RCPT TO:<x@y>

``in``/``out`` is the session's direction, ``C:`` what the client sent, ``S:`` what
the server answered; ``q`` the queue id once known (outbound: always; inbound: from
the ``250`` that queued the message).  Message content is not logged (``C: <message,
N bytes>``), nor AUTH secrets: neither the AUTH command's initial response nor any
line answering a ``334`` challenge (``C: <credentials not logged>``).  The files are
created mode 0600: session metadata is for the administrator.  The file is rotated at ``protocol_log_max_bytes``,
keeping ``protocol_log_files`` old files.  Lines are written by a background thread
(logging's QueueListener): the event loop never waits for the disk.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import re
import secrets
import time
from pathlib import Path

_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def session_id() -> str:
    return secrets.token_hex(4)


def format_line(*, when: float, direction: str, session: str, peer: str, queue_id: str | None,
                who: str, text: str) -> str:
    """One protocol log line (pure); control characters are escaped."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z"
    clean = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text.rstrip("\r\n"))
    return f"{stamp} {direction:<3} s={session} peer={peer} q={queue_id or '-'} {who}: {clean}"


LOG_MODE = 0o600  # the protocol log's files: the site's owner only


class _PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating file created 0600 whatever the umask (each new file after rotation too)."""

    def _open(self):  # type: ignore[no-untyped-def]  # logging's own signature
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE)
        os.fchmod(fd, LOG_MODE)  # a file left by an older version (0644) is closed up too
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


class ProtocolLog:
    def __init__(self, data_dir: Path, *, max_bytes: int, files: int, name: str) -> None:
        self.path = Path(data_dir) / "logs" / "smtp-protocol.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for old in self.path.parent.glob(self.path.name + "*"):  # rotated files of an older version
            old.chmod(LOG_MODE)
        self._file = _PrivateRotatingFile(self.path, maxBytes=max_bytes, backupCount=files,
                                          encoding="utf-8", delay=True)
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, self._file)
        self._logger = logging.getLogger(f"imsrelay.protocol.{name}.{id(self):x}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._listener.start()

    def line(self, *, direction: str, session: str, peer: str, queue_id: str | None, who: str, text: str) -> None:
        self._logger.info(format_line(when=time.time(), direction=direction, session=session, peer=peer,
                                      queue_id=queue_id, who=who, text=text))

    def flush(self) -> None:
        """Wait until every line so far is on disk (tests, shutdown)."""
        self._listener.stop()
        self._file.flush()
        self._listener.start()

    def close(self) -> None:
        self._listener.stop()
        for h in list(self._logger.handlers):
            self._logger.removeHandler(h)
        self._file.close()

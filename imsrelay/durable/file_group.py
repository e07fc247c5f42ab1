"""The files of one group-commit round (Maildir deliveries), made durable together.

A round's files used to be written, fsynced and renamed one after the other: one
wait for the disk per file, with the next file's write queued behind it.  Now:

1. each file is written under a temporary name in its ``tmp/`` directory;
2. write-back of all of them is started at once (a hint to the kernel), then each
   one is ``fdatasync``'ed: while the first flush waits, the kernel writes the
   others' data too, so one file-system journal commit serves many files and the
   flushes that follow mostly find their data on disk already;
3. only then is each renamed to its final name (Maildir ``new/``), and each
   directory that gained or lost a name is fsynced once.

Why ``fdatasync`` per file and not one ``syncfs(2)``: syncfs flushes every dirty page
of the whole file system — other programs' too — so its cost is not ours to bound,
and before Linux 5.8 it did not report write-back errors of our own files;
``fdatasync`` names exactly our file, reports its errors and is what POSIX
promises.  The per-file calls stay; what is grouped is the waiting.
(``fdatasync`` and not ``fsync``: it flushes the data and the size needed to read
it back; a new file's timestamps are not worth a second journal write.)

Crash safety (docs/design.md invariant 1): a file gets its final name only after its data
is durable, and the round's callers hear "done" only after the directory fsync, so
a recipient is recorded as delivered only once its file is there for good.  A crash
before the rename leaves only a temporary file in ``tmp/`` (the spool clears its
own at start; Maildir readers never look in ``tmp/``).  Files are flushed in chunks
of ``MAX_OPEN`` so a round never holds more than that many descriptors.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from imsrelay.durable.journal import write_chunks

MAX_OPEN = 64  # staged files (open descriptors) before a chunk is flushed and renamed


@dataclass
class _Staged:
    request: int
    fd: int
    tmp: Path
    path: Path
    durable: bool


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages now (Linux's
    POSIX_FADV_DONTNEED does; elsewhere a harmless hint).  Durability still
    comes from the fdatasync that follows."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


class FileGroup:
    """Used by one thread (the spool's writer) for one round."""

    def __init__(self, default_tmp: Path) -> None:
        self.default_tmp = default_tmp
        self._staged: list[_Staged] = []
        self._dirs: dict[Path, set[int]] = {}  # directory to fsync -> requests that need it
        self._errors: dict[int, OSError] = {}

    def stage(self, request: int, path: Path, data: bytes | tuple[bytes, ...], *, tmp_dir: Path | None = None, durable: bool = True,
              unless_exists: tuple[Path, ...] = (), owner: tuple[int, int] | None = None) -> None:
        """Write ``data`` under a temporary name; it becomes ``path`` in ``finish``.
        Skipped when one of ``unless_exists`` is there (an earlier delivery).
        ``owner``: the (uid, gid) the file is given.
        OSError (the temporary file removed) when it cannot be written."""
        if unless_exists and any(p.exists() for p in unless_exists):
            return
        tmp = (tmp_dir or self.default_tmp) / f"{path.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            if isinstance(data, tuple):  # parts back to back (writev): never joined in memory
                write_chunks(fd, data)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        except OSError:
            os.close(fd)
            _unlink(tmp)
            raise
        self._staged.append(_Staged(request, fd, tmp, path, durable))
        if len(self._staged) >= MAX_OPEN:
            self._flush_staged()

    def touched(self, request: int, directory: Path) -> None:
        """``directory`` gained or lost a name for ``request``: fsync it at the end."""
        self._dirs.setdefault(directory, set()).add(request)

    def discard(self, request: int) -> None:
        """The request failed: its files not yet in place never appear."""
        keep = []
        for s in self._staged:
            if s.request == request:
                os.close(s.fd)
                _unlink(s.tmp)
            else:
                keep.append(s)
        self._staged = keep
        for requests in self._dirs.values():
            requests.discard(request)

    def finish(self) -> dict[int, OSError]:
        """Flush, rename and fsync what is left; the errors, by request."""
        self._flush_staged()
        for directory, requests in self._dirs.items():
            if not requests:
                continue
            try:
                fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                for r in requests:
                    self._errors.setdefault(r, exc)
        self._dirs.clear()
        return self._errors

    def _flush_staged(self) -> None:
        staged, self._staged = self._staged, []
        for s in staged:
            if s.durable:
                _start_writeback(s.fd)
        for s in staged:
            try:
                if s.durable and s.request not in self._errors:
                    os.fdatasync(s.fd)
            except OSError as exc:
                self._errors.setdefault(s.request, exc)
            finally:
                os.close(s.fd)
        for s in staged:
            if s.request in self._errors:  # none of a failed request's files appears
                _unlink(s.tmp)
                continue
            try:
                os.replace(s.tmp, s.path)
            except OSError as exc:
                self._errors.setdefault(s.request, exc)
                _unlink(s.tmp)
                continue
            if s.durable:
                self.touched(s.request, s.path.parent)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

"""``MailboxAccess``: one server's IMAP4 and POP3 service, as the site composes it.

It owns the auth bridge and the Dovecot process.  Started after the SMTP listeners
(it uses their certificate); when Dovecot is missing or cannot run it logs one
line saying why (``access.unavailable``) and the site runs on without IMAP/POP3.

Run as root, the Maildirs must be readable by Dovecot's mail user (``access.mail_user``,
default ``mail``): the site gives new Maildirs and delivered files to that user
(``mail_owner``), and at start gives it the ones already there.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imsrelay.access.bridge import AuthBridge
from imsrelay.access.dovecot import DovecotProcess, DovecotUnavailable, find_dovecot
from imsrelay.access.dovecot_config import DovecotPlan
from imsrelay.access.ports import AccessSite
from imsrelay.model.object_rules import safe_alias
from imsrelay.model.settings import ACCESS_PROTOCOLS, AccessConfig, DiagnosticsConfig


def mail_owner(config: AccessConfig) -> tuple[int, int] | None:
    """(uid, gid) of the user Dovecot's mail processes run as, when it is not the
    site's own user (the site runs as root); None otherwise."""
    if not config.enabled or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(config.mail_user)
    except KeyError:
        return None  # MailboxAccess.start says so
    return entry.pw_uid, entry.pw_gid


def unreachable(path: Path, uid: int, gid: int) -> str | None:
    """The first directory above ``path`` (and itself) that user ``uid``/``gid``
    cannot enter, described; None when it can reach it."""
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except FileNotFoundError:
            return None
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return f"{d} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


@dataclass(frozen=True)
class AccessEndpoints:
    """Where this server's IMAP4 and POP3 listen (for the admin endpoint and the lab)."""

    host: str
    ports: dict[str, int]  # imap, imaps, pop3, pop3s


class MailboxAccess:
    def __init__(self, config: AccessConfig, *, site: AccessSite, site_name: str, data_dir: Path,
                 listen: str, allow_plaintext: bool, diagnostics: DiagnosticsConfig,
                 certificate: Callable[[], tuple[Path, Path] | None], log: Any) -> None:
        """``certificate()``: the SMTP listener's (certificate, key) files, if any."""
        self.config = config
        self.site = site
        self.site_name = site_name
        self.data_dir = data_dir
        self.listen = config.listen or listen
        self.allow_plaintext = allow_plaintext
        self.diagnostics = diagnostics
        self.certificate = certificate
        self.log = log
        self.dir = data_dir / "dovecot"
        self.mail_root = data_dir / "mailboxes"
        self.log_dir = data_dir / "logs"
        self.owner = mail_owner(config)
        self.bridge: AuthBridge | None = None
        self.dovecot: DovecotProcess | None = None
        self.problem: str | None = "not started"

    @property
    def endpoints(self) -> AccessEndpoints | None:
        if self.dovecot is None or not self.dovecot.running:
            return None
        return AccessEndpoints(self.listen, self.dovecot.ports())

    def home_of(self, alias: str) -> Path:
        if not safe_alias(alias):
            raise ValueError(f"{alias!r} is not a mailbox alias")
        return self.mail_root / alias

    def prepare(self, alias: str) -> None:
        """A mailbox about to be opened by Dovecot: its Maildir exists and belongs to the
        mail user; its protocol log directories too."""
        home = self.home_of(alias)
        dirs = [home, home / "tmp", home / "new", home / "cur"]
        dirs += [self.log_dir / p / alias for p in ACCESS_PROTOCOLS if self.diagnostics.access_log_enabled(p)]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            if self.owner is not None and (d.stat().st_uid, d.stat().st_gid) != self.owner:
                os.chown(d, *self.owner)

    def _give_existing(self) -> None:
        """Run as root: every Maildir and file already there to the mail user."""
        if self.owner is None or not self.mail_root.is_dir():
            return
        for top, dirs, files in os.walk(self.mail_root):
            for name in [*dirs, *files]:
                path = os.path.join(top, name)
                st = os.lstat(path)
                if (st.st_uid, st.st_gid) != self.owner:
                    os.lchown(path, *self.owner)

    def plan(self) -> DovecotPlan:
        cfg = self.config
        cert = self.certificate()
        uid, gid = self.owner if self.owner is not None else (os.getuid(), os.getgid())
        rawlog = {p: self.log_dir / p for p in ACCESS_PROTOCOLS if self.diagnostics.access_log_enabled(p)}
        return DovecotPlan(
            instance=f"imsrelay-{self.site_name}", base_dir=self.dir / "run", state_dir=self.dir / "state",
            log_path=self.log_dir / "imap-pop3.log", listen=self.listen,
            imap_port=cfg.imap_port, imaps_port=cfg.imaps_port, pop3_port=cfg.pop3_port, pop3s_port=cfg.pop3s_port,
            checkpassword=self.dir / "checkpassword", mail_root=self.mail_root, mail_uid=uid, mail_gid=gid,
            root=os.geteuid() == 0, own_user=pwd.getpwuid(os.geteuid()).pw_name,
            own_group=grp.getgrgid(os.getegid()).gr_name,
            tls_cert=cert[0] if cert else None, tls_key=cert[1] if cert else None,
            allow_plaintext=self.allow_plaintext, rawlog=rawlog)

    def _check_user(self) -> None:
        if os.geteuid() != 0:
            return
        if self.owner is None:
            raise DovecotUnavailable(f"access.mail_user {self.config.mail_user!r} is not a user here "
                                     "(Dovecot never runs mail processes as root)")
        for name in ("dovecot", "dovenull"):
            try:
                pwd.getpwnam(name)
                grp.getgrnam(name)
            except KeyError:
                raise DovecotUnavailable(f"the {name} user is missing (the dovecot-core package makes it)") from None
        blocked = unreachable(self.mail_root, *self.owner)
        if blocked is not None:
            raise DovecotUnavailable(f"the mail user {self.config.mail_user} cannot enter {blocked}: keep the data "
                                     "directory where other users may enter (chmod o+x), or run as another user")

    async def start(self) -> None:
        """Start the bridge and Dovecot; on any problem, say it in one line and run without."""
        try:
            binary = find_dovecot(self.config.dovecot)
            self._check_user()
            self.dir.mkdir(parents=True, exist_ok=True)
            self.mail_root.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(self._give_existing)
            plan = self.plan()
            bridge = AuthBridge(self.dir / "auth-bridge", self.site, home_of=self.home_of, prepare=self.prepare,
                                log=self.log)
            dovecot = DovecotProcess(binary, plan, config_path=self.dir / "dovecot.conf", log=self.log)
            dovecot.write_files(bridge.socket_path)
            await bridge.start()
            self.bridge = bridge
            await dovecot.start()
            self.dovecot = dovecot
            self.problem = None
        except (DovecotUnavailable, OSError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, DovecotUnavailable) else f"{type(exc).__name__}: {exc}"
            self.problem = reason
            self.log.warning("access.unavailable", reason=f"no IMAP4/POP3: {reason}")
            if self.bridge is not None:
                await self.bridge.stop()
                self.bridge = None

    async def stop(self) -> None:
        if self.dovecot is not None:
            await self.dovecot.stop()
            self.dovecot = None
        if self.bridge is not None:
            await self.bridge.stop()
            self.bridge = None

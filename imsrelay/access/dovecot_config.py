"""The Dovecot configuration of one server's IMAP4 and POP3 service (pure).

``render(plan)`` turns a ``DovecotPlan`` into the text of ``dovecot.conf``: its own
``base_dir`` and ``state_dir`` (several labs and sites run side by side), logins
through the checkpassword wrapper (the auth bridge: no password database of
Dovecot's own), the site's Maildirs as the users' homes, the SMTP listener's
certificate for STARTTLS and implicit TLS, and the listeners the settings ask for.

Run as root, Dovecot's login processes run as ``dovenull`` and its internal
processes as ``dovecot``; its mail processes as the mail user (Dovecot never runs
them as root), the auth process as imsrelay's own user (the bridge's socket is
its alone).  Run as another user, everything runs as that user (Dovecot's
rootless set-up: no chroot).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GREETING = "Microsoft Exchange IMAP4rev1/POP3 server version 5.5 (imsrelay) ready"


@dataclass(frozen=True)
class DovecotPlan:
    instance: str  # Dovecot's instance name (shown in ps)
    base_dir: Path  # run-time sockets and the master's pid file
    state_dir: Path
    log_path: Path
    listen: str
    imap_port: int | None
    imaps_port: int | None
    pop3_port: int | None
    pop3s_port: int | None
    checkpassword: Path  # the wrapper Dovecot runs per login
    mail_root: Path  # <data>/mailboxes: a user's home is mail_root/<alias>
    mail_uid: int
    mail_gid: int
    root: bool  # Dovecot starts as root
    own_user: str  # imsrelay's user: the auth process, and every process when not root
    own_group: str  # its group: Dovecot's internal sockets' group when not root
    tls_cert: Path | None
    tls_key: Path | None
    allow_plaintext: bool  # plaintext logins before TLS (a lab switch, as smtp's auth.allow_plaintext)
    rawlog: dict[str, Path]  # protocol ("imap4"/"pop3") -> directory of its protocol log


def _quote(value: str | Path) -> str:
    text = str(value)
    if any(c in text for c in '"\\\n\r'):
        raise ValueError(f"{text!r} cannot be written into a Dovecot configuration")
    return f'"{text}"'


def _listener(name: str, port: int | None, *, ssl: bool) -> list[str]:
    lines = [f"  inet_listener {name} {{", f"    port = {port or 0}"]
    if ssl and port:
        lines.append("    ssl = yes")
    return lines + ["  }"]


def render(plan: DovecotPlan) -> str:
    tls = plan.tls_cert is not None and plan.tls_key is not None
    protocols = [p for p, ports in (("imap", (plan.imap_port, plan.imaps_port)),
                                     ("pop3", (plan.pop3_port, plan.pop3s_port))) if any(ports)]
    lines = [
        "# Written by imsrelay (imsrelay/access) at every start: edits are lost.",
        f"base_dir = {_quote(plan.base_dir)}",
        f"state_dir = {_quote(plan.state_dir)}",
        f"instance_name = {_quote(plan.instance)}",
        f"protocols = {' '.join(protocols) or 'none'}",
        f"listen = {plan.listen}",
        f"log_path = {_quote(plan.log_path)}",
        f"info_log_path = {_quote(plan.log_path)}",
        "log_timestamp = \"%Y-%m-%dT%H:%M:%S \"",
        "auth_verbose = yes",
        f"login_greeting = {GREETING}",
        "login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{session}>",
        f"default_login_user = {'dovenull' if plan.root else plan.own_user}",
        f"default_internal_user = {'dovecot' if plan.root else plan.own_user}",
        f"default_internal_group = {'dovecot' if plan.root else plan.own_group}",
        f"first_valid_uid = {plan.mail_uid}",
        f"last_valid_uid = {plan.mail_uid}",
        f"first_valid_gid = {plan.mail_gid}",
        f"last_valid_gid = {plan.mail_gid}",
        "auth_username_format = %u",
        "auth_mechanisms = plain login",
        "auth_failure_delay = 0",  # the bridge delays refusals as SMTP AUTH does
        "auth_cache_size = 0",  # every login asks the directory: a changed password counts at once
        f"disable_plaintext_auth = {'no' if plan.allow_plaintext else 'yes'}",
        f"ssl = {'yes' if tls else 'no'}",
    ]
    if tls:
        lines += [f"ssl_cert = <{plan.tls_cert}", f"ssl_key = <{plan.tls_key}", "ssl_min_protocol = TLSv1.2"]
    lines += [
        "mail_location = maildir:~",
        "mail_fsync = always",
        "maildir_very_dirty_syncs = no",
        "mailbox_idle_check_interval = 1 secs",
        "mail_plugins = mail_log notify",
        "plugin {",
        "  mail_log_events = delete undelete expunge copy flag_change save mailbox_create",
        "  mail_log_fields = uid box msgid from subject flags",
        "}",
        "passdb {",
        "  driver = checkpassword",
        f"  args = {plan.checkpassword}",
        "}",
        "userdb {",
        "  driver = static",
        f"  args = uid={plan.mail_uid} gid={plan.mail_gid} home={plan.mail_root}/%u",
        "}",
        "service auth {",
        f"  user = {plan.own_user}",
        "}",
        "service imap-login {",
        *_listener("imap", plan.imap_port, ssl=False),
        *_listener("imaps", plan.imaps_port if tls else None, ssl=True),
    ]
    if not plan.root:
        lines.append("  chroot =")
    lines += ["}", "service pop3-login {",
              *_listener("pop3", plan.pop3_port, ssl=False),
              *_listener("pop3s", plan.pop3s_port if tls else None, ssl=True)]
    if not plan.root:
        lines += ["  chroot =", "}", "service anvil {", "  chroot ="]
    lines.append("}")
    for protocol, name in (("imap4", "imap"), ("pop3", "pop3")):
        lines.append(f"protocol {name} {{")
        if protocol in plan.rawlog:
            lines.append(f"  rawlog_dir = {plan.rawlog[protocol]}/%u")
        lines.append("}")
    return "\n".join(lines) + "\n"

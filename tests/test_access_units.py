"""Mailbox access without Dovecot running: the protocol decision, the Dovecot
configuration, the settings, the auth bridge's answers, the checkpassword helper
against a bridge socket, the directory's protocol settings and their replication,
Maildir ownership, and the CLI's ``directory show`` / ``directory protocols``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sitekit import config_of, run_cli, site_mapping, write_site_file

from imsrelay.access import checkpassword
from imsrelay.access.bridge import AuthBridge
from imsrelay.access.dovecot import DovecotUnavailable, find_dovecot, wrapper_text
from imsrelay.access.dovecot_config import DovecotPlan, render
from imsrelay.access.service import unreachable
from imsrelay.config.loader import ConfigError, config_from_mapping
from imsrelay.directory.store import Directory, DirectoryInputError, DirectoryNotFound
from imsrelay.model.object_rules import object_problem
from imsrelay.model.objects import Protocols
from imsrelay.policy import protocols
from imsrelay.policy.auth import AuthLimits, GuessGuard, GuessLimits, Identity
from imsrelay.transport.maildir import delivery_write, ensure_maildir

# ------------------------------------------------------------------ the decision (pure)


DEFAULTS = Protocols()  # nothing set: every level uses the one above


def refusal(protocol: str, site: Protocols = DEFAULTS, server: bool | None = None,
            mailbox: Protocols = DEFAULTS) -> str | None:
    return protocols.refusal(protocol, site=site, server=server, mailbox=mailbox, site_name="SiteA",
                             server_name="ServerA", alias="User1")


def test_protocols_follow_site_then_server_then_mailbox():
    assert refusal("imap4") is None  # Exchange's defaults: enabled everywhere
    assert refusal("pop3", site=Protocols(pop3=False)) == "POP3 is disabled at site SiteA"
    assert refusal("imap4", site=Protocols(pop3=False)) is None
    # the server's own setting overrides the site's defaults, either way
    assert refusal("pop3", site=Protocols(pop3=False), server=True) is None
    assert refusal("imap4", site=Protocols(imap4=True), server=False) == "IMAP4 is disabled at server ServerA"
    # a mailbox may turn a protocol off, never on where the server does not serve it
    assert refusal("imap4", mailbox=Protocols(imap4=False)) == "IMAP4 is disabled for mailbox User1"
    assert refusal("imap4", server=False, mailbox=Protocols(imap4=True)) == "IMAP4 is disabled at server ServerA"
    assert refusal("pop3", mailbox=Protocols(pop3=True)) is None
    with pytest.raises(ValueError):
        Protocols().get("smtp")


# ------------------------------------------------------------------ settings


def test_access_settings_and_their_errors():
    cfg = config_of(site_mapping("SiteA"))
    assert not cfg.access.enabled and cfg.access.imap_port == 143 and cfg.access.pop3s_port == 995
    cfg = config_of(site_mapping("SiteA", smtp={"tls_generate": True},
                                 access={"enabled": True, "imap_port": 2143, "pop3s_port": 0, "pop3": False}))
    assert (cfg.access.imap_port, cfg.access.pop3s_port, cfg.access.server_setting("pop3")) == (2143, None, False)
    assert cfg.access.server_setting("imap4") is None
    with pytest.raises(ConfigError) as exc:
        config_from_mapping(site_mapping("SiteA", access={"enabled": True}), Path("SiteA.toml"), data_dir=Path("x"))
    assert "access.imaps_port: implicit TLS needs a certificate" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        config_from_mapping(site_mapping("SiteA", access={"mail_user": "root", "imap_ports": 1}),
                            Path("SiteA.toml"), data_dir=Path("x"))
    lines = " | ".join(exc.value.lines())  # type: ignore[attr-defined]
    assert "access.mail_user: 'root' is not a user name other than root" in lines
    assert "access.imap_ports: is not a known setting" in lines
    cfg = config_of(site_mapping("SiteA", diagnostics={"pop3_protocol_log": "maximum"}))
    assert cfg.diagnostics.access_log_enabled("pop3") and not cfg.diagnostics.access_log_enabled("imap4")


# ------------------------------------------------------------------ the Dovecot configuration (pure)


def plan(**changes) -> DovecotPlan:
    base = {"instance": "imsrelay-SiteA", "base_dir": Path("/d/run"), "state_dir": Path("/d/state"),
            "log_path": Path("/d/logs/imap-pop3.log"), "listen": "127.10.10.10", "imap_port": 2143,
            "imaps_port": 2993, "pop3_port": 2110, "pop3s_port": 2995, "checkpassword": Path("/d/checkpassword"),
            "mail_root": Path("/d/mailboxes"), "mail_uid": 8, "mail_gid": 8, "root": True, "own_user": "root", "own_group": "root",
            "tls_cert": Path("/d/tls/SiteA.crt"), "tls_key": Path("/d/tls/SiteA.key"), "allow_plaintext": False,
            "rawlog": {}}
    return DovecotPlan(**{**base, **changes})


def test_dovecot_config_as_root_keeps_login_and_mail_processes_off_root():
    text = render(plan(rawlog={"imap4": Path("/d/logs/imap4")}))
    lines = set(text.splitlines())
    for line in ("default_login_user = dovenull", "default_internal_user = dovecot", "first_valid_uid = 8",
                 "last_valid_uid = 8", "disable_plaintext_auth = yes", "ssl = yes", "ssl_cert = </d/tls/SiteA.crt",
                 "  args = /d/checkpassword", "  args = uid=8 gid=8 home=/d/mailboxes/%u", "  user = root",
                 "listen = 127.10.10.10", "protocols = imap pop3", "  rawlog_dir = /d/logs/imap4/%u",
                 'base_dir = "/d/run"', "auth_username_format = %u", "mail_location = maildir:~"):
        assert line in lines, line
    assert "  chroot =" not in lines  # as root, the login processes stay chrooted
    assert text.count("    ssl = yes") == 2  # imaps and pop3s


def test_dovecot_config_without_root_or_tls():
    text = render(plan(root=False, own_user="imsrelay", own_group="imsrelay", mail_uid=1000, mail_gid=1000, tls_cert=None, tls_key=None,
                       allow_plaintext=True, pop3_port=None, pop3s_port=None))
    lines = text.splitlines()
    assert "default_login_user = imsrelay" in lines and "default_internal_user = imsrelay" in lines
    assert "default_internal_group = imsrelay" in lines
    assert "ssl = no" in lines and "disable_plaintext_auth = no" in lines
    assert "protocols = imap" in lines  # no POP3 listener: no POP3
    assert "  chroot =" in lines
    assert "    ssl = yes" not in lines  # no implicit-TLS listener without a certificate
    with pytest.raises(ValueError):
        render(plan(base_dir=Path('/d/"run')))


def test_checkpassword_wrapper_runs_the_helper_with_this_python(tmp_path: Path):
    text = wrapper_text(tmp_path / "auth-bridge")
    assert text.startswith("#!/bin/sh\n")
    assert sys.executable in text and "-I -S" in text and str(Path(checkpassword.__file__).resolve()) in text


def test_missing_dovecot_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(DovecotUnavailable) as exc:
        find_dovecot("no-such-dovecot-binary")
    assert "apt-get install dovecot-imapd dovecot-pop3d" in str(exc.value)
    with pytest.raises(DovecotUnavailable):
        find_dovecot(str(tmp_path / "dovecot"))


def test_unreachable_names_the_closed_directory(tmp_path: Path):
    closed = tmp_path / "closed"
    inner = closed / "data"
    inner.mkdir(parents=True)
    os.chmod(closed, 0o700)
    other = 54321  # a user that owns nothing here
    if any(not (p.stat().st_mode & stat.S_IXOTH) for p in tmp_path.parents if p.exists()):
        assert unreachable(inner, other, other) is not None
    else:
        assert unreachable(inner, other, other) == f"{closed} (mode 0700)"
    os.chmod(closed, 0o711)
    assert unreachable(inner, os.getuid(), os.getgid()) is None


# ------------------------------------------------------------------ the auth bridge's answers


class FakeSite:
    def __init__(self) -> None:
        limits = AuthLimits(max_failures=2, window=60, lockout=60, failure_delay=0)
        wide = AuthLimits(max_failures=20, window=60, lockout=60, failure_delay=0)
        self.auth_guard = GuessGuard(GuessLimits(pair=limits, address=wide, account=wide))
        self.refusals: dict[str, str] = {}
        self.asked: list[str] = []

    async def account_of(self, login: str) -> str:
        return "user1" if login in ("User1", "u1@SiteA.microsoft.com") else login.lower()

    async def authenticate(self, login: str, password: bytes) -> Identity | None:
        self.asked.append(login)
        if login in ("User1", "u1@SiteA.microsoft.com") and password == b"right":
            return Identity("User1", "SiteA", ("u1@SiteA.microsoft.com",))
        return None

    async def protocol_refusal(self, identity: Identity, protocol: str) -> str | None:
        return self.refusals.get(protocol)


def request(login: str, password: str, service: str = "imap", ip: str = "127.0.0.7") -> bytes:
    return checkpassword.request(login.encode(), password.encode(), service=service, remote_ip=ip, secured=True)


def test_bridge_answers_ok_nologin_fail_lockout_and_malformed(tmp_path: Path):
    site = FakeSite()
    prepared: list[str] = []
    bridge = AuthBridge(tmp_path / "sock", site, home_of=lambda a: tmp_path / "mailboxes" / a,
                        prepare=prepared.append, log=_Log(), clock=lambda: 1000.0)

    async def main() -> None:
        ok = await bridge.answer(request("u1@SiteA.microsoft.com", "right"))
        assert ok == {"result": "ok", "user": "User1", "home": str(tmp_path / "mailboxes" / "User1")}
        assert prepared == ["User1"]
        site.refusals["pop3"] = "POP3 is disabled for mailbox User1"
        refused = await bridge.answer(request("User1", "right", service="pop3"))
        assert refused["nologin"] == "POP3 is disabled for mailbox User1" and prepared == ["User1"]
        assert (await bridge.answer(request("User1", "wrong")))["result"] == "fail"
        assert (await bridge.answer(request("User1", "wrong")))["result"] == "fail"  # the second: locked out
        site.asked.clear()
        assert (await bridge.answer(request("User1", "right")))["result"] == "fail"
        assert site.asked == []  # a locked-out client's password is not even checked
        assert (await bridge.answer(request("User1", "right", ip="127.0.0.8")))["result"] == "ok"
        assert (await bridge.answer(b"not json\n"))["result"] == "tempfail"
        assert (await bridge.answer(request("User1", "right", service="smtp")))["result"] == "tempfail"

    asyncio.run(main())


class _Log:
    def __getattr__(self, name):
        return lambda *a, **k: None


# ------------------------------------------------------------------ the checkpassword helper, as Dovecot runs it


def _bridge_stub(path: Path, answer: dict, seen: list) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                data += conn.recv(4096)
            seen.append(json.loads(data))
            conn.sendall((json.dumps(answer) + "\n").encode())
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def run_helper(tmp_path: Path, answer: dict | None) -> tuple[int, dict, list]:
    sock = tmp_path / "bridge"
    seen: list = []
    if answer is not None:
        _bridge_stub(sock, answer, seen)
    reply = tmp_path / "reply.sh"  # stands for checkpassword-reply: shows what it was given
    reply.write_text(f"#!/bin/sh\nenv > {tmp_path / 'env.out'}\nexit 0\n")
    reply.chmod(0o755)
    read_end, write_end = os.pipe()
    os.write(write_end, b"User1\0right\0\0")
    os.close(write_end)
    launcher = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execv(sys.argv[2], sys.argv[2:])"
    proc = subprocess.run([sys.executable, "-c", launcher, str(read_end),  # the login on descriptor 3
                           sys.executable, "-I", "-S", checkpassword.__file__, str(sock), str(reply)],
                          pass_fds=(read_end,), timeout=30,
                          env={"SERVICE": "pop3", "TCPREMOTEIP": "127.0.0.5", "PATH": "/usr/bin:/bin"},
                          capture_output=True)
    os.close(read_end)
    assert proc.returncode != 111 or answer is None, proc.stderr
    env = {}
    if (tmp_path / "env.out").exists():
        env = dict(line.split("=", 1) for line in (tmp_path / "env.out").read_text().splitlines() if "=" in line)
    return proc.returncode, env, seen


def test_checkpassword_helper_accepts_refuses_and_reports_a_missing_bridge(tmp_path: Path):
    code, env, seen = run_helper(tmp_path, {"result": "ok", "user": "User1", "home": "/m/User1",
                                            "nologin": "POP3 is disabled at site SiteA"})
    assert code == 0
    assert (env["USER"], env["HOME"], env["nologin"], env["reason"]) == (
        "User1", "/m/User1", "Y", "POP3 is disabled at site SiteA")
    assert env["EXTRA"] == "nologin reason"
    assert seen[0]["service"] == "pop3" and seen[0]["remote_ip"] == "127.0.0.5"
    assert base64.b64decode(seen[0]["password"]) == b"right"
    (tmp_path / "env.out").unlink()
    (tmp_path / "bridge").unlink(missing_ok=True)
    code, env, _ = run_helper(tmp_path, {"result": "fail"})
    assert code == checkpassword.FAILED and env == {}
    (tmp_path / "bridge").unlink(missing_ok=True)
    code, env, _ = run_helper(tmp_path, None)  # no bridge: Dovecot says "try again later"
    assert code == checkpassword.TEMPORARY and env == {}


# ------------------------------------------------------------------ the directory's settings, replicated


@pytest.fixture
def directory(tmp_path: Path):
    d = Directory(tmp_path / "a.sqlite3", "SiteA")
    d.provision(organisation="ExchangeORG", server="ServerA", site_domain="SiteA.microsoft.com", hostname="h",
                mailboxes=[("User1", "User One", [])])
    yield d
    d.close()


def test_protocol_settings_replicate_with_the_mailbox_and_the_site(tmp_path: Path, directory: Directory):
    mbx = directory.set_mailbox_protocols("User1", {"imap4": False})
    assert mbx.protocols == Protocols(imap4=False)
    site = directory.set_site_protocols({"pop3": False})
    assert site.protocols == Protocols(pop3=False)
    peer = Directory(tmp_path / "b.sqlite3", "SiteB")
    try:
        objects = directory.all_objects()
        assert all(object_problem(o, receiving_site="SiteB") is None for o in objects)
        peer.apply(objects)
        assert peer.mailbox("User1", "SiteA").protocols == Protocols(imap4=False)
        assert peer.site_object("SiteA").protocols == Protocols(pop3=False)
        # back to the defaults: the setting is gone, and that replicates too
        directory.set_mailbox_protocols("User1", {"imap4": None})
        peer.apply(directory.all_objects())
        assert peer.mailbox("User1", "SiteA").protocols == Protocols()
    finally:
        peer.close()
    with pytest.raises(DirectoryInputError):
        directory.set_mailbox_protocols("User1", {"smtp": True})
    with pytest.raises(DirectoryNotFound):
        directory.set_mailbox_protocols("Nobody", {"imap4": True})
    bad = directory.all_objects()[-1]
    forged = type(bad)(bad.object_id, bad.kind, bad.home_site, bad.stamp, False,
                       {**bad.data, "protocols": {"imap4": "yes"}})
    assert "bad protocol settings" in (object_problem(forged, receiving_site="SiteB") or "")


# ------------------------------------------------------------------ Maildir ownership (root: Dovecot's mail user)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_maildir_and_delivered_files_go_to_the_mail_user(tmp_path: Path):
    mail = pwd.getpwnam("mail")
    owner = (mail.pw_uid, mail.pw_gid)
    box = tmp_path / "mailboxes" / "User1"
    ensure_maildir(box, owner)
    assert all((d.stat().st_uid, d.stat().st_gid) == owner for d in (box, box / "new", box / "cur", box / "tmp"))
    write = delivery_write(box, queue_id="Q1", index=0, message=b"Subject: x\r\n\r\nx\r\n", sender="a@b",
                           recipient="User1@x", hostname="h", owner=owner)
    assert write.owner == owner
    from imsrelay.durable.file_group import FileGroup
    group = FileGroup(box / "tmp")
    group.stage(1, write.path, write.data, tmp_dir=write.tmp_dir, owner=write.owner)
    group.touched(1, write.path.parent)
    assert group.finish() == {}
    st = write.path.stat()
    assert (st.st_uid, st.st_gid) == owner and stat.S_IMODE(st.st_mode) == 0o600


# ------------------------------------------------------------------ the CLI


def test_directory_protocols_and_show_offline(tmp_path: Path):
    path, config = write_site_file(tmp_path, site_mapping("SiteA", access={"imap4": False},
                                                         smtp={"tls_generate": True}))
    Directory(config.data_dir / "directory.sqlite3", "SiteA").close()
    d = Directory(config.data_dir / "directory.sqlite3", "SiteA")
    d.provision(organisation="ExchangeORG", server="ServerA", site_domain="SiteA.microsoft.com", hostname="h",
                mailboxes=[("User1", "User One", [])])
    d.close()
    code, out, err = run_cli("directory", "protocols", "User1", "--pop3", "off", "--offline", "--config", str(path))
    assert code == 0, err
    assert "POP3   site default  server default  mailbox off      -> disabled (POP3 is disabled for mailbox User1)" \
        in out
    assert "IMAP4  site default  server off      mailbox default  -> disabled (IMAP4 is disabled at server " \
           "ServerA)" in out
    code, out, err = run_cli("directory", "protocols", "--site-defaults", "--imap4", "off", "--offline",
                             "--config", str(path))
    assert code == 0 and "site protocol defaults: IMAP4 off, POP3 default" in out
    code, out, err = run_cli("directory", "show", "User1", "--config", str(path))
    assert code == 0, err
    assert "User1 (User One), homed at SiteA" in out and "Protocols:" in out and "mailbox off" in out
    code, out, err = run_cli("directory", "show", "User1", "--json", "--config", str(path))
    shown = json.loads(out)
    assert shown["protocols"] == {"imap4": None, "pop3": False} and shown["site_protocols"]["imap4"] is False
    code, out, err = run_cli("directory", "protocols", "--config", str(path))
    assert code != 0 and "name a mailbox (ALIAS) or give --site-defaults" in err

"""Dovecot's checkpassword helper: asks the site's auth bridge about one login.

Dovecot runs it for every login (``passdb { driver = checkpassword }``, through the
wrapper ``<data>/dovecot/checkpassword`` that ``imsrelay.access.dovecot`` writes):
the login and password arrive on descriptor 3 (``login NUL password NUL ...``), the
client's address in ``TCPREMOTEIP`` and the protocol in ``SERVICE``.  The helper
sends them to the bridge (``imsrelay.access.bridge``, a UNIX socket) as one JSON
line and reads one JSON line back.  Accepted: it sets ``USER`` (the mailbox alias,
Dovecot's user name from then on) and ``HOME`` (its Maildir) and executes the
program Dovecot named in its first argument (checkpassword-reply); a login that is
right but not allowed here also gets ``nologin`` and ``reason``, which Dovecot shows
the client.  Refused: exit 1; the bridge unreachable: exit 111 (temporary failure).

The standard library only, and no imsrelay import: it starts as ``python -I -S``
in well under 100 ms.  The wire format is the bridge's: ``request``/``answer`` below
are what both sides use.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys

FAILED, TEMPORARY = 1, 111  # checkpassword's exit codes (Dovecot: refused / try again later)
MAX_INPUT = 4096
TIMEOUT = 30.0


def request(login: bytes, password: bytes, *, service: str, remote_ip: str, secured: bool) -> bytes:
    """One request line (the login and password base64: they may be any bytes)."""
    return (json.dumps({"login": base64.b64encode(login).decode(), "password": base64.b64encode(password).decode(),
                        "service": service, "remote_ip": remote_ip, "secured": secured}) + "\n").encode()


def read_credentials(fd: int = 3) -> tuple[bytes, bytes]:
    data = b""
    while len(data) < MAX_INPUT:
        chunk = os.read(fd, MAX_INPUT - len(data))
        if not chunk:
            break
        data += chunk
    parts = data.split(b"\0")
    if len(parts) < 2:
        raise ValueError("no login and password on descriptor 3")
    return parts[0], parts[1]


def ask(socket_path: str, line: bytes) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(socket_path)
        s.sendall(line)
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < MAX_INPUT:
            chunk = s.recv(MAX_INPUT)
            if not chunk:
                break
            reply += chunk
    answer = json.loads(reply)
    if not isinstance(answer, dict):
        raise ValueError("the bridge did not answer with an object")
    return {str(k): str(v) for k, v in answer.items()}


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: checkpassword.py BRIDGE-SOCKET REPLY-PROGRAM [ARGS...]", file=sys.stderr)
        return TEMPORARY
    socket_path, reply = argv[1], argv[2:]
    try:
        login, password = read_credentials()
    except (OSError, ValueError) as exc:
        print(f"imsrelay checkpassword: {exc}", file=sys.stderr)
        return TEMPORARY
    env = os.environ
    line = request(login, password, service=env.get("SERVICE", ""),
                   remote_ip=env.get("TCPREMOTEIP", env.get("REMOTE_IP", "")),
                   secured=bool(env.get("AUTH_SECURED")))
    try:
        answer = ask(socket_path, line)
    except (OSError, ValueError) as exc:
        print(f"imsrelay checkpassword: the auth bridge {socket_path} did not answer: {exc}", file=sys.stderr)
        return TEMPORARY
    result = answer.get("result")
    if result == "tempfail":
        print(f"imsrelay checkpassword: {answer.get('reason', 'temporary failure')}", file=sys.stderr)
        return TEMPORARY
    if result != "ok":
        return FAILED
    env["USER"] = answer["user"]
    env["HOME"] = answer["home"]
    if answer.get("nologin"):
        env["nologin"] = "Y"
        env["reason"] = answer["nologin"]
        env["EXTRA"] = "nologin reason"
    os.execv(reply[0], reply)
    return TEMPORARY  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv))

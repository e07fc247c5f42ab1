"""Site configurations of the Docker compose lab at each stage of KB Q196927's walk.

The compose lab (docker-compose.yml) normally mounts ``config/docker/siteX.toml``:
the article's configuration steps all done.  To walk the article against the
compose lab from its first step, the sites need the configuration of every stage
in between; this module generates it, the way :func:`imsrelay.lab.embedded.site_mapping`
does for the embedded lab, but with the compose lab's network: each site listens on
``0.0.0.0:25`` (admin ``0.0.0.0:8025``) in its container, keeps its data in the
volume at ``/var/lib/imsrelay``, resolves through the lab nsd (10.10.10.53), reaches
the Internet by DNS MX (no smart host; the lab DNS answers every outside domain with
the lab's Internet host, and the site is sealed to 10.10.10.0/24 and loopback), signs replication with its own Ed25519 key
(the lab's throwaway ``config/docker/keys/siteX.pem``, mounted at
``/etc/imsrelay/replication-key.pem``) and trusts the three sites' public keys, and
takes its admin token from the container's environment.  Connected Sites, E-Mail Domain entries
(the peers' 10.10.10.x, port 25) and Directory Replication Connectors appear only
from the stage that adds them.  At the last stage the result is the configuration
of ``config/docker/siteX.toml`` (tests/test_compose_walkthrough.py checks that).

:func:`compose_site_mapping` is pure; :func:`compose_site_toml` reads the committed
keys (their public halves) unless given them.  ``python -m imsrelay.lab.docker_configs
regenerate-keys`` (``docker/lab.sh keys``) makes new throwaway keys and writes their
public halves into ``config/docker/siteX.toml`` — this module is the one writer of
both the stage configurations and the committed files' keys.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from imsrelay.config import toml_text
from imsrelay.config.loader import config_from_mapping
from imsrelay.directory.keys import (
    generate_private_key,
    load_private_key,
    public_key_text,
    write_private_key,
)
from imsrelay.lab.embedded import (
    COMPANY_DOMAIN,
    LAB_PASSWORD_HASHES,
    ORGANISATION,
    SITES,
    STAGE_NAMES,
    LabServer,
    LabSite,
    site_servers,
    stage_index,
)
from imsrelay.model.errors import ConfigError

# The compose lab's addresses (docker-compose.yml, network 10.10.10.0/24).
COMPOSE_ADDRESSES = {"SiteA": "10.10.10.10", "SiteB": "10.10.10.15", "SiteC": "10.10.10.20"}
COMPOSE_NAMESERVER = "10.10.10.53"
COMPOSE_NETWORKS = ("10.10.10.0/24", "127.0.0.0/8")  # the sealed lab: the compose network and loopback
COMPOSE_GATEWAY = "10.10.10.1"  # clients on the host come in through the Docker gateway
COMPOSE_DATA_DIR = "/var/lib/imsrelay"
COMPOSE_SMTP_PORT = 25
COMPOSE_ADMIN_PORT = 8025
COMPOSE_SUBMISSION_PORT = 587  # published on 127.0.0.1:5810/5815/5820 (docker-compose.yml)
COMPOSE_SMTPS_PORT = 465  # published on 127.0.0.1:4610/4615/4620
# IMAP4 and POP3 (imsrelay.access, Dovecot in the site's container), published on 127.0.0.1
# (docker-compose.yml): 143 on 1410/1415/1420, 993 on 9910/..., 110 on 1110/..., 995 on 9510/...
COMPOSE_ACCESS_PORTS = {"imap_port": 143, "imaps_port": 993, "pop3_port": 110, "pop3s_port": 995}
COMPOSE_KEY_PATH = "/etc/imsrelay/replication-key.pem"  # where docker-compose.yml mounts the site's key
REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "config" / "docker"  # siteX.toml and keys/siteX.pem (lab-only, committed)
# SiteA as two servers (issue 24; docker/servers.override.yml): ServerA on SiteA's address, Server1
# (the seed's MX) on the next; each server's file in config/docker/servers/, generated here
SERVERS_DIR = "servers"
SERVERS_SITE = SITES[0]
SERVERS_INTRASITE_INTERVAL = "60s"  # the lab's backstop between the two (Exchange: 300 s + 30 s per server)


def compose_servers(site: LabSite = SERVERS_SITE) -> tuple[LabServer, ...]:
    """The servers of the two-server compose topology, on the compose network (pure):
    the embedded lab's names (``imsrelay lab --servers SiteA=2``), 10.10.10.10 and .11."""
    base = COMPOSE_ADDRESSES[site.name].rsplit(".", 1)[0]
    return tuple(LabServer(v.site, v.name, f"{base}.{v.address.rsplit('.', 1)[1]}") for v in site_servers(site, 2))


def server_config_name(server: LabServer) -> str:
    return f"{config_name(server.site)}-{server.name}"  # siteA-Server1: servers/siteA-Server1.toml


def compose_server_mapping(server: LabServer, trusted_keys: Mapping[str, str]) -> dict[str, Any]:
    """One server's file of the two-server compose topology (pure): the site's compose
    configuration at the walk's end, this server's name and address, the site's
    ``[[servers]]``, the mailboxes homed on the first server, which is the bridgehead."""
    servers = compose_servers(server.site)
    mapping = compose_site_mapping(server.site, len(STAGE_NAMES) - 1, trusted_keys)
    mapping["site"]["server"] = server.name
    mapping["servers"] = [{"name": v.name, "host": v.address, "port": COMPOSE_SMTP_PORT,
                           "admin": f"http://{v.address}:{COMPOSE_ADMIN_PORT}"} for v in servers]
    for m in mapping["mailboxes"]:
        m["home_server"] = servers[0].name
    mapping["replication"]["bridgehead"] = servers[0].name
    mapping["replication"]["intrasite_interval"] = SERVERS_INTRASITE_INTERVAL
    return mapping


def compose_server_toml(server: LabServer, trusted_keys: Mapping[str, str] | None = None) -> str:
    keys = committed_public_keys() if trusted_keys is None else trusted_keys
    return (f"# {server.name} of {server.site.name} in the compose lab's two-server topology "
            f"({server.address}; docker/servers.override.yml), generated by imsrelay.lab.docker_configs\n"
            "# (python -m imsrelay.lab.docker_configs servers): edit the generator, not this file\n"
            + toml_text.dumps(compose_server_mapping(server, keys)))


def write_server_configs(config_dir: Path = CONFIG_DIR, trusted_keys: Mapping[str, str] | None = None,
                         say: Callable[[str], None] = print) -> list[Path]:
    """Write ``servers/siteA-<Server>.toml`` for every server of the two-server topology."""
    keys = committed_public_keys(config_dir) if trusted_keys is None else trusted_keys
    written = []
    for server in compose_servers():
        path = config_dir / SERVERS_DIR / f"{server_config_name(server)}.toml"
        text = compose_server_toml(server, keys)
        config_from_mapping(tomllib.loads(text), path)  # never write a file the server would refuse
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        say(f"{path}: {server.name} of {server.site.name}")
        written.append(path)
    return written


def config_name(site: LabSite) -> str:
    return f"site{site.name[-1]}"  # "SiteA" -> "siteA": siteA.toml, keys/siteA.pem


def key_file(site: LabSite, config_dir: Path = CONFIG_DIR) -> Path:
    return config_dir / "keys" / f"{config_name(site)}.pem"


def committed_public_keys(config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """The public halves of the committed lab keys, by site (what every site trusts)."""
    return {s.name: public_key_text(load_private_key(key_file(s, config_dir))) for s in SITES}


def compose_site_mapping(site: LabSite, stage: int, trusted_keys: Mapping[str, str]) -> dict[str, Any]:
    """``site``'s compose-lab configuration at ``stage`` (an index into ``imsrelay.lab.embedded.STAGES``);
    ``trusted_keys``: every site's public key (``ed25519:...``) by site name."""
    if not 0 <= stage < len(STAGE_NAMES):
        raise ValueError(f"stage {stage} out of range 0..{len(STAGE_NAMES) - 1}")
    others = [s for s in SITES if s is not site]
    mapping: dict[str, Any] = {
        "site": {"organisation": ORGANISATION, "name": site.name, "server": site.server,
                 "email_domain": site.domain, "company_domain": COMPANY_DOMAIN, "data_dir": COMPOSE_DATA_DIR},
        "smtp": {"listen": "0.0.0.0", "port": COMPOSE_SMTP_PORT, "max_message_size": 10485760, "max_hops": 15,
                 "max_recipients": 100, "relay_networks": ["127.0.0.0/8", f"{COMPOSE_GATEWAY}/32"],
                 "idle_timeout": "5m", "session_timeout": "30m", "max_errors": 20, "tls_generate": True},
        "submission": {"port": COMPOSE_SUBMISSION_PORT, "tls_port": COMPOSE_SMTPS_PORT, "sender_must_match": True},
        "mailboxes": [{"alias": site.user, "display_name": site.display_name,
                       "password_hash": LAB_PASSWORD_HASHES[site.user]},
                      {"alias": "Administrator", "display_name": f"{site.name} Administrator",
                       "password_hash": LAB_PASSWORD_HASHES["Administrator"]}],
        # lab pace, as config/docker/*.toml; no smart host: the Internet by DNS MX
        "delivery": {"retry_intervals": ["5s", "10s", "30s"], "lifetime": "2d", "connect_timeout": "10s",
                     "starttls": "opportunistic"},
        # the site's own key, mounted by docker-compose.yml; the admin token from $IMSRELAY_ADMIN_TOKEN
        "replication": {"signing_key": COMPOSE_KEY_PATH, "startup_delay": "5m",
                        "trusted_keys": {name: trusted_keys[name] for name in sorted(trusted_keys)}},
        "dns": {"nameservers": [COMPOSE_NAMESERVER], "timeout": "5s"},
        "admin": {"listen": "0.0.0.0", "port": COMPOSE_ADMIN_PORT},
        "logging": {"level": "info", "format": "console"},
        # sealed: no connection outside the compose network; every other domain's MX is the
        # lab's Internet (config/dns/root.zone), which keeps it in rest-of-internet's Maildir
        "lab": {"sealed": True, "networks": list(COMPOSE_NETWORKS)},
    }
    mapping["access"] = compose_access_mapping()
    if stage >= stage_index("connected-sites"):
        mapping["connected_sites"] = [{"name": o.name, "routing_address": f"@{o.domain}"} for o in others]
    if stage >= stage_index("domain-table"):
        mapping["email_domains"] = [{"domain": o.domain, "host": COMPOSE_ADDRESSES[o.name],
                                     "port": COMPOSE_SMTP_PORT} for o in others]
    if stage >= stage_index("replication-connectors"):
        mapping["replication"]["connectors"] = [{"site": o.name, "schedule": "always"} for o in others]
    return mapping


def compose_access_mapping() -> dict[str, Any]:
    """A compose-lab site's ``[access]``: IMAP4 and POP3 on the standard ports in its container."""
    return {"enabled": True, **COMPOSE_ACCESS_PORTS}


def compose_site_toml(site: LabSite, stage: int, trusted_keys: Mapping[str, str] | None = None) -> str:
    """The same as TOML text, with a header naming the stage (the committed keys'
    public halves unless ``trusted_keys`` is given)."""
    keys = committed_public_keys() if trusted_keys is None else trusted_keys
    return (f"# {site.name} of the compose lab at KB Q196927 stage {STAGE_NAMES[stage]} "
            "(generated by imsrelay.lab.docker_configs)\n" + toml_text.dumps(compose_site_mapping(site, stage, keys)))


_TRUSTED_HEADER = re.compile(r"^\[replication\.trusted_keys\][^\n]*\n", re.MULTILINE)
_NEXT_HEADER = re.compile(r"^\[", re.MULTILINE)
_KEY_LINE = re.compile(r"^[ \t]*[A-Za-z0-9_\"-]+[ \t]*=.*\n?", re.MULTILINE)


def with_trusted_keys(text: str, trusted_keys: Mapping[str, str]) -> str:
    """``text`` (a committed config/docker/siteX.toml) with the entries of its
    ``[replication.trusted_keys]`` table replaced by ``trusted_keys``; every other
    line, comments and blank lines included, kept (pure).  ValueError when the file
    has no such table."""
    header = _TRUSTED_HEADER.search(text)
    if header is None:
        raise ValueError("no [replication.trusted_keys] table")
    nxt = _NEXT_HEADER.search(text, header.end())
    end = nxt.start() if nxt else len(text)
    others = _KEY_LINE.sub("", text[header.end():end])
    entries = toml_text.dumps({name: trusted_keys[name] for name in sorted(trusted_keys)})
    return text[:header.end()] + entries + others + text[end:]


def regenerate_keys(config_dir: Path = CONFIG_DIR, say: Callable[[str], None] = print) -> dict[str, str]:
    """New throwaway keys for the Docker lab: ``keys/siteX.pem`` replaced (mode 0644:
    the containers' user must read the bind-mounted file; the keys are lab-only and
    committed) and each ``siteX.toml``'s ``[replication.trusted_keys]`` rewritten.
    Every file is read and checked before any is written."""
    new_keys = {s.name: generate_private_key() for s in SITES}
    keys = {name: public_key_text(k) for name, k in new_keys.items()}
    tomls = {s.name: config_dir / f"{config_name(s)}.toml" for s in SITES}
    texts = {}
    for name, toml in tomls.items():
        try:
            texts[name] = with_trusted_keys(toml.read_text(encoding="utf-8"), keys)
            config_from_mapping(tomllib.loads(texts[name]), toml)  # never write a file the site would refuse
        except (OSError, ValueError, ConfigError) as exc:
            raise ValueError(f"{toml}: {exc}") from None
    for s in SITES:
        path = key_file(s, config_dir)
        fresh = path.with_name(path.name + ".new")
        fresh.unlink(missing_ok=True)
        write_private_key(fresh, new_keys[s.name])
        os.chmod(fresh, 0o644)  # lab-only key, readable by the container's imsrelay user
        os.replace(fresh, path)
        say(f"{path}: new key for {s.name}, {keys[s.name]}")
    for name, toml in tomls.items():
        tmp = toml.with_name(toml.name + ".new")
        tmp.write_text(texts[name], encoding="utf-8")
        os.replace(tmp, toml)
        say(f"{toml}: [replication.trusted_keys] updated")
    if (config_dir / SERVERS_DIR).is_dir():  # the two-server topology's files carry the same keys
        written = write_server_configs(config_dir, keys, say=lambda line: None)
        say(f"{config_dir / SERVERS_DIR}: {len(written)} server files written again with the new keys")
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imsrelay.lab.docker_configs",
                                     description="The Docker lab's site configurations and throwaway keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    regen = sub.add_parser("regenerate-keys", help="new lab-only replication keys in config/docker/keys/ "
                                                   "and their public keys in config/docker/siteX.toml")
    regen.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="default: %(default)s")
    servers = sub.add_parser("servers", help="write config/docker/servers/: SiteA as two servers "
                                             "(docker/servers.override.yml)")
    servers.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.command == "servers":
        try:
            write_server_configs(args.config_dir)
        except (OSError, ValueError, ConfigError) as exc:
            print(f"servers: {exc}", file=sys.stderr)
            return 1
    if args.command == "regenerate-keys":
        try:
            regenerate_keys(args.config_dir)
        except (OSError, ValueError) as exc:
            print(f"regenerate-keys: {exc}; nothing written" if isinstance(exc, ValueError) else
                  f"regenerate-keys: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``imsrelay check-config`` — validate a site's TOML file; every error is reported."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from imsrelay.config.loader import load_config
from imsrelay.directory.keys import ReplicationKeyError, trust_from
from imsrelay.model.errors import ConfigError, ConfigErrors, UserError
from imsrelay.model.settings import OutboundAuth, SiteConfig, hosts_text

# KB Q196927's network (10.10.10.x) is the embedded lab's 127.10.10.x: the same last
# number on loopback (imsrelay.lab.embedded; not imported here: check-config stays light)
SEED_NETWORK, LAB_NETWORK = "10.10.10.", "127.10.10."
_OUTSIDE = re.compile(r"^(\S+) is outside this sealed lab")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("check-config", help="validate a site's TOML file and print a summary",
                       description="Validate a site configuration file; exit 0 if it is usable.")
    c.add_argument("config", type=Path, help="the site's TOML file")
    c.set_defaults(func=cmd_check_config)


def check_replication_keys(config: SiteConfig) -> None:
    """A site whose replication key cannot be read, or whose own entry in
    ``[replication.trusted_keys]`` is not its key's public half, cannot replicate:
    one line saying why (``UserError``), not a traceback at start-up."""
    if not config.replication.enabled:
        return
    try:
        trust_from(config.site, config.replication)
    except ReplicationKeyError as exc:
        raise UserError(f"{config.path}: {exc}") from None


def with_lab_hint(error: ConfigError) -> ConfigError:
    """A sealed lab file that names one of the article's 10.10.10.x addresses: the
    error also names the embedded lab's address of that host."""
    match = _OUTSIDE.match(error.message)
    if match is None or not match.group(1).startswith(SEED_NETWORK):
        return error
    seed = match.group(1)
    address = LAB_NETWORK + seed[len(SEED_NETWORK):]
    return ConfigError(error.path, error.key, f"{error.message}; use {address} (the embedded lab puts the "
                                               f"article's {seed} at {address}, on loopback)")


def auth_text(auth: OutboundAuth | None) -> str:
    """`` (AUTH as user, password from …)``: never the password itself."""
    if auth is None:
        return ""
    clear = ", also without TLS" if auth.allow_plaintext else ""
    missing = (", which does not exist here: the mail will wait (4.7.0)"
               if auth.password_file is not None and not auth.password_file.exists() else "")
    return f" (AUTH as {auth.username}, password from {auth.password_source}{missing}{clear})"


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        c = load_config(args.config)
    except ConfigErrors as exc:
        raise ConfigErrors([with_lab_hint(e) for e in exc.errors]) from None
    rep = c.replication
    if rep.signing_key is None or rep.signing_key.exists():  # (a container's key may live elsewhere)
        check_replication_keys(c)  # its key readable and the one the others are told to trust
    print(f"{c.path}: ok")
    print(f"  organisation {c.organisation}, site {c.site}, server {c.server} ({c.hostname})")
    print(f"  site address @{c.site_domain}, company domain {c.company_domain}")
    print(f"  SMTP {c.smtp.listen}:{c.smtp.port}, data {c.data_dir}")
    sub = c.submission
    listen = sub.listen or c.smtp.listen
    if sub.port is not None or sub.tls_port is not None:
        ports = [f"{listen}:{p} ({what})" for p, what in ((sub.port, "STARTTLS + AUTH"), (sub.tls_port, "TLS + AUTH"))
                 if p is not None]
        print(f"  submission {', '.join(ports)}")
    print(f"  mailboxes: {', '.join(m.alias for m in c.mailboxes) or '(none)'}")
    for cs in c.connected_sites:
        via = f" via {hosts_text(cs.hosts)}" if cs.hosts else ""
        print(f"  connected site {cs.name}: SMTP {cs.routing_address}, cost {cs.cost}{via}")
    if c.routing.least_cost_only:
        print("  least-cost routes only (no failover to a dearer Connected Sites route)")
    for r in c.email_domains:
        print(f"  e-mail domain {r.domain} -> {hosts_text(r.hosts)}{auth_text(r.auth)}")
    if c.delivery.smart_host:
        print(f"  smart host {hosts_text(c.delivery.smart_hosts)}{auth_text(c.delivery.smart_host_auth)}")
    if rep.signing_key is not None:
        here = "" if rep.signing_key.exists() else " (not on this machine: not checked)"
        print(f"  replication keys: per-site ed25519, own key {rep.signing_key}{here}; trusted: "
              + ", ".join(site for site, _ in rep.trusted_keys))
    elif rep.enabled:
        print("  replication keys: shared organisation key")
    for rc in c.replication.connectors:
        print(f"  replication connector to {rc.site}")
    return 0

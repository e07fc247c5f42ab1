"""The CLI side of a site's admin endpoint: a small blocking JSON client.

Kept apart from ``imsrelay.admin.server`` (the aiohttp server) so that command-line tools
start without loading the HTTP server framework.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from imsrelay.model.errors import UserError
from imsrelay.model.settings import SiteConfig, SiteServer


class AdminUnavailable(Exception):
    """The endpoint cannot be reached (site stopped, admin disabled, no token)."""


class WrongSite(AdminUnavailable):
    """The endpoint answered, but for another site or another data directory (another
    lab or instance listens at the file's admin address): this file's site is not there."""


class AdminRequestError(Exception):
    """The site answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status





class AdminClient:
    """Blocking JSON client for a site's admin endpoint (loopback; proxies ignored)."""

    def __init__(self, base: str, token: str, *, site: str = "", timeout: float = 120.0,
                 expect: tuple[str, Path, Path] | None = None) -> None:
        """``expect``: (site name, data directory, config file) the endpoint must serve;
        checked once, before the first request (``WrongSite`` when it does not)."""
        self.base = base.rstrip("/")
        self.site = site or self.base
        self._token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._expect = expect

    @classmethod
    def for_config(cls, config: SiteConfig, *, timeout: float = 120.0) -> AdminClient:
        """The client for a site's own config file (address, port, token)."""
        admin = config.admin
        if admin.port == 0:
            raise AdminUnavailable(f"the admin endpoint of {config.site} is disabled ({config.path}: admin.port = 0)")
        host = admin.listen
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        base = f"http://[{host}]:{admin.port}" if ":" in host else f"http://{host}:{admin.port}"
        token = admin.resolved_token()
        if not token:
            raise AdminUnavailable(f"no admin token for {config.site}: set admin.token in {config.path} or "
                                   f"the environment variable {admin.token_env}")
        return cls(base, token, site=config.site, timeout=timeout,
                   expect=(config.site, config.data_dir, config.path))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if self._expect is not None:
            self._check_identity(self._expect)
            self._expect = None
        return self._request(method, path, body)

    def _check_identity(self, expect: tuple[str, Path, Path]) -> None:
        site, data_dir, path = expect
        status = self._request("GET", "/status")
        served_site = status.get("site") if isinstance(status, dict) else None
        served_data = status.get("data_dir") if isinstance(status, dict) else None
        mine = data_dir.resolve()
        if served_site == site and (served_data is None or Path(served_data) == mine):
            return
        raise WrongSite(f"{path}: the admin endpoint {self.base} serves site {served_site} with data in "
                        f"{served_data}, not this file's site {site} with data in {mine} (another lab or "
                        "instance listens there; start this one, or give its --config/--data)")

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
            "Accept": "application/json"})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error") or exc.reason
            except (ValueError, AttributeError):
                message = str(exc.reason)
            raise AdminRequestError(exc.code, str(message)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminUnavailable(f"site {self.site} is not running (no admin endpoint at {self.base}: "
                                   f"{reason})") from None

    def is_running(self) -> bool:
        try:
            self.call("GET", "/status")
        except AdminUnavailable:
            return False
        except AdminRequestError:
            return True
        return True


# ------------------------------------------------------------------ CLI glue


def cli_client(config: SiteConfig) -> AdminClient:
    """An AdminClient, or a one-line ``UserError`` saying why there cannot be one."""

    try:
        return AdminClient.for_config(config)
    except AdminUnavailable as exc:
        raise UserError(str(exc)) from None


def cli_call(config: SiteConfig, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the running site's admin endpoint; errors become one-line ``UserError``s."""

    client = cli_client(config)
    try:
        return client.call(method, path, body)
    except AdminUnavailable as exc:
        raise UserError(str(exc), status=3) from None
    except AdminRequestError as exc:
        raise UserError(f"{config.site}: {exc}", status=request_error_status(exc.status)) from None


def server_calls(config: SiteConfig, method: str, path: str,
                 body: dict[str, Any] | None = None) -> list[tuple[SiteServer, Any]]:
    """The same call at every server of the site (``[[servers]]`` with an admin endpoint;
    the site's admin token): what a site-wide operation is made of."""
    servers = [s for s in config.servers if s.admin]
    if not servers:
        raise UserError(f"{config.path}: no [[servers]] with an admin endpoint: this is a site of one server "
                        "(leave out --all-servers)")
    token = config.admin.resolved_token() or ""
    out = []
    for server in servers:
        try:
            out.append((server, AdminClient(server.admin or "", token, site=f"{config.site}/{server.name}")
                        .call(method, path, body)))
        except AdminUnavailable as exc:
            raise UserError(str(exc), status=3) from None
        except AdminRequestError as exc:
            raise UserError(f"{config.site}/{server.name}: {exc}", status=request_error_status(exc.status)) from None
    return out


def request_error_status(http_status: int) -> int:
    """The CLI exit status for an error the site answered (see ``imsrelay --help``):
    1 when the thing asked for does not exist, 2 when the request was refused."""
    return 1 if http_status == 404 else 2


def ensure_offline(config: SiteConfig) -> None:
    """``--offline`` edits the database directly: refuse while the site answers."""

    if config.admin.port == 0 or not config.admin.resolved_token():
        return
    if AdminClient.for_config(config, timeout=5.0).is_running():
        raise UserError(f"site {config.site} is running: drop --offline so the change goes through it")

"""Admin endpoints the console needs beyond the CLI's: the site's static set-up
(the organisation tree's property pages) and deleting one queued message.

=======  ==========================  ==========================================
GET      /config                     IMS, Connected Sites, E-Mail Domain table,
                                     smart host, replication connectors, IMAP4/POP3
DELETE   /queue/QUEUE_ID             remove a queued message (no NDR, like
                                     ``imsrelay queue delete``)
=======  ==========================  ==========================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from imsrelay.admin.federation import Scope, SiteServers
from imsrelay.model.envelope import check_queue_id
from imsrelay.model.settings import SiteConfig, hosts_text, schedule_text
from imsrelay.observe import tracking
from imsrelay.policy.internet_mail import effective_entries
from imsrelay.queue.manager import QueueManager


def config_dict(cfg: SiteConfig) -> dict[str, Any]:
    """The static set-up of a site, for display (no secrets: no keys, no tokens)."""
    d = cfg.delivery
    return {
        "organisation": cfg.organisation, "site": cfg.site, "server": cfg.server, "hostname": cfg.hostname,
        "site_domain": cfg.site_domain, "company_domain": cfg.company_domain,
        "ims": {"listen": cfg.smtp.listen, "port": cfg.smtp.port, "max_message_size": cfg.smtp.max_message_size,
                "relay_networks": [str(n) for n in cfg.smtp.relay_networks],
                "accepted_domains": list(cfg.smtp.accepted_domains),
                "retry_intervals": list(d.retry_intervals), "lifetime": d.lifetime,
                "max_outbound_message_size": d.max_message_size},
        # the Internet Mail tab by E-Mail Domain (Q262126), each entry as it applies; "*" first
        "internet_mail": [dataclasses.asdict(e) for e in effective_entries(cfg.internet_mail)],
        "journaling": {"recipient": cfg.journaling.recipient, "reports": cfg.journaling.reports},
        "connected_sites": [{"name": c.name, "routing_address": c.routing_address, "cost": c.cost,
                             "hosts": hosts_text(c.hosts) or None} for c in cfg.connected_sites],
        "least_cost_only": cfg.routing.least_cost_only,
        # the Security tab's credentials show as the user name alone (never the password or where it is kept)
        "email_domains": [{"domain": r.domain, "host": r.host, "port": r.port, "hosts": hosts_text(r.hosts),
                           "auth_user": r.auth.username if r.auth else None} for r in cfg.email_domains],
        "smart_host": hosts_text(d.smart_hosts) if d.smart_host else None,
        "smart_host_auth_user": d.smart_host_auth.username if d.smart_host_auth else None,
        "replication_connectors": [{"site": c.site, "schedule": c.schedule, "schedule_text": schedule_text(c.schedule)}
                                   for c in cfg.replication.connectors],
        # the server's Protocols: IMAP4 and POP3 (null: the site's defaults)
        "access": {"enabled": cfg.access.enabled, "listen": cfg.access.listen or cfg.smtp.listen,
                   "imap_port": cfg.access.imap_port, "imaps_port": cfg.access.imaps_port,
                   "pop3_port": cfg.access.pop3_port, "pop3s_port": cfg.access.pop3s_port,
                   "imap4": cfg.access.imap4, "pop3": cfg.access.pop3},
    }


class ConsoleSite(Protocol):
    """What these endpoints use of a site (``imsrelay.site.Site``)."""

    config: SiteConfig
    qmgr: QueueManager
    tracking: tracking.TrackingLog
    log: Any


def add_console_routes(app: web.Application, site: ConsoleSite,
                       scope_of: Callable[[Mapping[str, str]], Scope] | None = None,
                       servers: SiteServers | None = None) -> None:
    """Register the console's admin endpoints (behind the admin token middleware);
    ``servers``: a queued message another server of the site holds is deleted there."""

    async def get_config(request: web.Request) -> web.Response:
        """The site's static set-up (IMS, Connected Sites, E-Mail Domain table, smart host, connectors); no secrets."""
        return web.json_response(config_dict(site.config))

    async def delete_queued(request: web.Request) -> web.Response:
        """Remove a queued message without an NDR (as `imsrelay queue delete`)."""
        queue_id = request.match_info["queue_id"]
        try:
            check_queue_id(queue_id)
        except ValueError:
            return web.json_response({"error": f"{queue_id!r} is not a queue id"}, status=400)
        qmgr = site.qmgr
        scope = scope_of(request.query) if scope_of is not None else Scope(True, (), False)
        if not scope.local or queue_id not in qmgr.envelopes:
            if servers is not None and scope.peers:
                answers = await servers.ask("DELETE", request.path, scope.peers)
                for a in answers.values():
                    if a.ok and isinstance(a.body, dict):
                        return web.json_response({**a.body, "server": a.server})
                return web.json_response({"error": f"no message {queue_id} in the queue of any server that answered",
                                          "servers": servers.report(scope, answers)}, status=404)
            return web.json_response({"error": f"no message {queue_id} in the queue"}, status=404)
        qmgr.forget(queue_id)  # an attempt under way is not recorded
        await qmgr.spool.remove(queue_id)
        site.tracking.record(tracking.DELETED, queue_id)
        site.log.info("queue.deleted", queue_id=queue_id, by="admin")
        return web.json_response({"deleted": queue_id, "site": site.config.site})

    app.router.add_get("/config", get_config)
    app.router.add_delete("/queue/{queue_id}", delete_queued)

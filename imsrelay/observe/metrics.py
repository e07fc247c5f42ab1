"""PerfMon counters (KB Q156063 §3.2.10) as Prometheus metrics, one registry per site.

``GET /metrics`` on the site's admin endpoint serves them (text format 0.0.4).  Each
site has its own ``CollectorRegistry``, so the embedded lab's sites, which share a
process, never mix their numbers.  Labels are few and bounded (an outcome, a queue, a
peer site, a reason) — never a message, an address or a queue id.

==================================================  =======  ==================================
name                                                type     what
==================================================  =======  ==================================
``imsrelay_queue_messages{queue}``                  gauge    queued messages; ``inbound`` (to
                                                             local mailboxes / the directory),
                                                             ``outbound`` (to SMTP next hops)
``imsrelay_queue_incoming_messages``                gauge    accepted, first delivery attempt not
                                                             finished (``queue.backpressure_at``)
``imsrelay_backpressure_state{state}``              gauge    1 for the current state: ``open``,
                                                             ``slowing``, ``refusing``
``imsrelay_backpressure_total{action}``             counter  transactions ``delayed`` at MAIL FROM,
                                                             ``refused`` (452 4.3.1, ``queue.refuse_at``)
``imsrelay_backpressure_delay_seconds_total``       counter  seconds MAIL FROM replies were delayed
``imsrelay_messages_in_total``                      counter  messages accepted over SMTP
``imsrelay_bytes_in_total``                         counter  their bytes
``imsrelay_messages_out_total``                     counter  messages delivered by SMTP
``imsrelay_bytes_out_total``                        counter  their bytes
``imsrelay_connections_inbound_total``              counter  SMTP sessions accepted
``imsrelay_connections_inbound_current``            gauge    SMTP sessions open now
``imsrelay_connections_rejected_total{reason}``     counter  sessions refused at connect
                                                             (``transfer_mode``, ``fault``, ...)
``imsrelay_connections_outbound_total``             counter  outbound connections opened
``imsrelay_connections_outbound_failed_total``      counter  outbound connections that failed
``imsrelay_connections_outbound_current``           gauge    outbound connections open now
``imsrelay_ndrs_total``                             counter  NDRs queued
``imsrelay_deliveries_total{outcome}``              counter  recipient outcomes: ``delivered``,
                                                             ``deferred``, ``failed``, ``expired``,
                                                             ``held``
``imsrelay_replication_backlog_messages{peer}``     gauge    replication messages queued for a peer
``imsrelay_replication_last_reply_age_seconds{peer}`` gauge  seconds since the peer's last reply
                                                             (absent before the first one)
``imsrelay_spool_flush_seconds``                    histo.   one group commit (write + fdatasync)
``imsrelay_faults_fired_total{kind}``               counter  faults on demand that fired
``imsrelay_transfer_mode{mode}``                    gauge    1 for the current Transfer mode
``imsrelay_link_monitor_state{monitor,target,state}`` gauge  1 for a Link Monitor target's state
                                                             (``unknown``, ``up``, ``warning``, ``alert``)
``imsrelay_link_monitor_round_trip_seconds``        gauge    the last answered ping's round trip
``{monitor,target}``
``imsrelay_link_monitor_pings_total{monitor,target}`` counter Link Monitor pings sent
``imsrelay_link_monitor_answers_total``             counter  their answers (replies or NDRs)
``{monitor,target}``
==================================================  =======  ==================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from imsrelay.model.envelope import Envelope
from imsrelay.policy.link_monitor import STATES as LINK_STATES
from imsrelay.policy.transfer_mode import TransferMode

FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OUTBOUND_PREFIXES = ("relay:", "mx:")

__all__ = ["SiteMetrics", "CONTENT_TYPE", "queue_lengths"]


def queue_lengths(envelopes: Iterable[Any]) -> tuple[int, int]:
    """(inbound, outbound) queued messages: a message with a pending recipient whose last
    route was an SMTP next hop is outbound; one with other pending recipients inbound (pure)."""
    inbound = outbound = 0
    for env in envelopes:
        pending = env.pending
        if not pending:
            continue
        if any((r.route or "").startswith(OUTBOUND_PREFIXES) for r in pending):
            outbound += 1
        if any(not (r.route or "").startswith(OUTBOUND_PREFIXES) for r in pending):
            inbound += 1
    return inbound, outbound


class SiteMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue = Gauge("imsrelay_queue_messages", "Queued messages by queue", ["queue"], registry=r)
        self.messages_in = Counter("imsrelay_messages_in", "Messages accepted over SMTP", registry=r)
        self.bytes_in = Counter("imsrelay_bytes_in", "Bytes of messages accepted over SMTP", registry=r)
        self.messages_out = Counter("imsrelay_messages_out", "Messages delivered by SMTP", registry=r)
        self.bytes_out = Counter("imsrelay_bytes_out", "Bytes of messages delivered by SMTP", registry=r)
        self.conn_in = Counter("imsrelay_connections_inbound", "SMTP sessions accepted", registry=r)
        self.conn_in_now = Gauge("imsrelay_connections_inbound_current", "SMTP sessions open", registry=r)
        self.conn_rejected = Counter("imsrelay_connections_rejected", "SMTP sessions refused at connect",
                                     ["reason"], registry=r)
        self.conn_out = Counter("imsrelay_connections_outbound", "Outbound SMTP connections opened", registry=r)
        self.conn_out_failed = Counter("imsrelay_connections_outbound_failed",
                                       "Outbound SMTP connections that failed", registry=r)
        self.conn_out_now = Gauge("imsrelay_connections_outbound_current", "Outbound SMTP connections open",
                                  registry=r)
        self.ndrs = Counter("imsrelay_ndrs", "Non-delivery reports queued", registry=r)
        self.deliveries = Counter("imsrelay_deliveries", "Recipient delivery outcomes", ["outcome"], registry=r)
        self.replication_backlog = Gauge("imsrelay_replication_backlog_messages",
                                         "Replication messages queued for a peer site", ["peer"], registry=r)
        self.replication_age = Gauge("imsrelay_replication_last_reply_age_seconds",
                                     "Seconds since the last replication reply from a peer site", ["peer"],
                                     registry=r)
        self.flush = Histogram("imsrelay_spool_flush_seconds", "Queue journal group commit (write and flush)",
                               buckets=FLUSH_BUCKETS, registry=r)
        self.faults = Counter("imsrelay_faults_fired", "Faults on demand that fired", ["kind"], registry=r)
        self.incoming = Gauge("imsrelay_queue_incoming_messages",
                              "Accepted messages whose first delivery attempt has not finished", registry=r)
        self.backpressure_state = Gauge("imsrelay_backpressure_state", "1 for the current backpressure state",
                                        ["state"], registry=r)
        self.backpressure = Counter("imsrelay_backpressure", "Transactions delayed or refused by backpressure",
                                    ["action"], registry=r)
        self.backpressure_delay = Counter("imsrelay_backpressure_delay_seconds",
                                          "Seconds MAIL FROM replies waited for delivery", registry=r)
        for action in ("delayed", "refused"):
            self.backpressure.labels(action)
        self.mode = Gauge("imsrelay_transfer_mode", "The current Transfer mode (1)", ["mode"], registry=r)
        self.tracking_bytes = Gauge("imsrelay_tracking_bytes", "Size of the message tracking database", registry=r)
        self.tracking_paused = Gauge("imsrelay_tracking_paused",
                                     "1 while message tracking writes nothing (the disk is nearly full)", registry=r)
        self.tracking_dropped = Gauge("imsrelay_tracking_dropped_events",
                                      "Tracking events not written while paused (since start)", registry=r)
        # Link Monitor (KB Q246674): monitors and targets are the administrator's, few and fixed
        self.link_state = Gauge("imsrelay_link_monitor_state", "1 for a Link Monitor target's state",
                                ["monitor", "target", "state"], registry=r)
        self.link_rtt = Gauge("imsrelay_link_monitor_round_trip_seconds",
                              "Round trip of the last answered Link Monitor ping", ["monitor", "target"], registry=r)
        self.link_pings = Counter("imsrelay_link_monitor_pings", "Link Monitor pings sent", ["monitor", "target"],
                                  registry=r)
        self.link_answers = Counter("imsrelay_link_monitor_answers", "Link Monitor pings answered (reply or NDR)",
                                    ["monitor", "target"], registry=r)
        # the children of the outcomes, looked up once (``labels()`` per recipient costs more than the count)
        self.outcomes = {outcome: self.deliveries.labels(outcome)
                         for outcome in ("delivered", "deferred", "failed", "expired", "held")}
        for q in ("inbound", "outbound"):
            self.queue.labels(q)

    def delivery_outcome(self, outcome: str) -> Any:
        """The ``imsrelay_deliveries_total{outcome}`` counter of one outcome."""
        child = self.outcomes.get(outcome)
        return child if child is not None else self.deliveries.labels(outcome)

    def set_link_state(self, monitor: str, target: str, state: str) -> None:
        for s in LINK_STATES:
            self.link_state.labels(monitor, target, s).set(1 if s == state else 0)

    def set_mode(self, mode: TransferMode) -> None:
        for m in TransferMode:
            self.mode.labels(m.value).set(1 if m is mode else 0)

    def render(self, *, queued: list[Envelope], incoming: int, flow_state: str, open_connections: int,
               replication: dict[str, Any] | None, now: float, tracking: dict[str, Any] | None = None) -> bytes:
        """Refresh the gauges read from the site's state (what is queued, messages waiting
        for their first attempt, the backpressure state, open outbound connections, the
        replicator's status), then the text exposition."""
        inbound, outbound = queue_lengths(queued)
        self.queue.labels("inbound").set(inbound)
        self.queue.labels("outbound").set(outbound)
        self.incoming.set(incoming)
        for name in ("open", "slowing", "refusing"):
            self.backpressure_state.labels(name).set(1 if name == flow_state else 0)
        self.conn_out_now.set(open_connections)
        if tracking is not None:
            self.tracking_bytes.set(tracking["bytes"])
            self.tracking_paused.set(1 if tracking["paused"] else 0)
            self.tracking_dropped.set(tracking["dropped"])
        if replication is not None:
            self.replication_backlog.clear()
            self.replication_age.clear()
            for peer in replication["peers"]:
                self.replication_backlog.labels(peer["site"]).set(peer["backlog"])
                if peer["last_reply"]:
                    self.replication_age.labels(peer["site"]).set(max(0.0, now - float(peer["last_reply"])))
        return generate_latest(self.registry)

"""Issue 27 item 9: the tracking database is bounded by size as well as age, gives
the space of deleted events back, and never takes the queue's disk."""

from __future__ import annotations

import sqlite3

import pytest
import structlog
from structlog.testing import capture_logs

from imsrelay.observe import tracking
from imsrelay.observe.tracking import TrackingLog
from imsrelay.policy.inbound import check_storage, tracking_reserve


def db_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def fill(log: TrackingLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.record(tracking.RECEIVED, f"Q{i:08d}", message_id=f"<m{i}@example.test>", sender="a@example.test",
                   detail_text="x" * 400)
    log.flush_sync(30)


@pytest.fixture(autouse=True)
def bounds_at_once(monkeypatch):
    monkeypatch.setattr(tracking, "BOUNDS_EVERY", 0.0)


async def test_the_database_stays_within_max_bytes(tmp_path):
    path = tmp_path / "tracking.sqlite3"
    log = TrackingLog(path, "SiteA", max_bytes=300_000)
    await log.start()
    for round_ in range(24):
        fill(log, 100, round_ * 100)
    fill(log, 1, 2400)  # one more batch: the writer looks at its size before writing
    await log.stop()
    assert db_bytes(path) <= 300_000 * 1.2, db_bytes(path)
    db = sqlite3.connect(path)
    first, last = db.execute("SELECT min(queue_id), max(queue_id) FROM events").fetchone()
    db.close()
    assert first > "Q00000000" and last == "Q00002400"  # the oldest went, the newest stayed


async def test_retention_deletes_shrink_the_file(tmp_path):
    path = tmp_path / "tracking.sqlite3"
    now = [1_000_000.0]
    log = TrackingLog(path, "SiteA", days=7, clock=lambda: now[0])
    await log.start()
    fill(log, 3000)
    await log.stop()
    full = db_bytes(path)
    assert full > 1_000_000
    now[0] += 8 * 86400  # every event is past retention
    again = TrackingLog(path, "SiteA", days=7, clock=lambda: now[0])
    await again.start()  # (retention runs at start, then hourly)
    await again.stop()
    assert db_bytes(path) < full / 5, (full, db_bytes(path))


async def test_tracking_stops_before_the_queue_would_refuse_mail(tmp_path):
    reserve = tracking_reserve(max_message_size=10 * 1024 * 1024, minfree=0)
    assert check_storage(reserve - 1, declared=None, max_message_size=10 * 1024 * 1024, minfree=0) is None
    free = [10 * reserve]
    path = tmp_path / "tracking.sqlite3"
    with capture_logs() as logs:
        log = TrackingLog(path, "SiteA", free_space=lambda: free[0], min_free=reserve, log=structlog.get_logger())
        await log.start()
        fill(log, 200)
        free[0] = reserve - 1  # the queue could still take mail; tracking stops
        fill(log, 1)
        fill(log, 300, 1000)
        assert log.status()["paused"] == "disk" and log.status()["dropped"] >= 300
        free[0] = 10 * reserve
        fill(log, 1)
        fill(log, 5, 5000)
        await log.stop()
    assert any(e["event"] == "tracking.paused" for e in logs)
    assert log.status()["paused"] is None  # (tracking.resumed is logged at info)
    db = sqlite3.connect(path)
    ids = {r[0] for r in db.execute("SELECT queue_id FROM events")}
    db.close()
    assert "Q00001100" not in ids and "Q00005004" in ids  # nothing written while paused; again after

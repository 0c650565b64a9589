"""A sample delivered again after the maximum sample age: a duplicate when it was stored.

The first delivery runs with a maximum age the sample is within. The second runs with one it
has passed, as when JetStream redelivers the message, or the agent's spool replays it, after
the age has run out.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from acsp import subjects
from services.metering.ratecard import default_rate_card
from services.metering.samples import Origin, decode_report
from services.runtime.db import Database
from tests.metering.helpers import count, report, running_ingest, sample, wait_until

SUBJECT = subjects.usage_subject("prov-a", "r1", "node-1")
HOUR_S = 3600.0


async def _publish_and_wait(nats_url: str, db: Database, payload: bytes, max_age_s: float) -> None:
    async with running_ingest(nats_url, db, max_sample_age_s=max_age_s) as (js, ingest):
        await js.publish(SUBJECT, payload)

        async def stored() -> bool:
            return ingest.counters.messages >= 1

        await wait_until(stored)


async def test_late_replay_is_duplicate(nats_url: str, db: Database) -> None:
    payload = report([sample("node-1/s1", "job-1", datetime.now(UTC) - timedelta(hours=2))])
    await _publish_and_wait(nats_url, db, payload, max_age_s=3 * HOUR_S)
    async with running_ingest(nats_url, db, max_sample_age_s=HOUR_S) as (js, ingest):
        await js.publish(SUBJECT, payload)

        async def stored() -> bool:
            return ingest.counters.messages >= 1

        await wait_until(stored)

    assert ingest.counters.duplicates == 1
    assert ingest.counters.dead_lettered == 0
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 0
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 1


async def test_late_sample_reusing_stored_id_dead_lettered(nats_url: str, db: Database) -> None:
    start = datetime.now(UTC) - timedelta(hours=2)
    first = report([sample("node-1/s1", "job-1", start)])
    other = report([sample("node-1/s1", "job-1", start, seconds=30)])
    await _publish_and_wait(nats_url, db, first, max_age_s=3 * HOUR_S)
    await _publish_and_wait(nats_url, db, other, max_age_s=HOUR_S)
    async with db.acquire() as conn:
        dead = await conn.fetch("SELECT sample_id, reason FROM metering.dead_letters")
    assert [row["sample_id"] for row in dead] == ["node-1/s1"]
    assert "ACSP_METERING_MAX_SAMPLE_AGE_S" in dead[0]["reason"]


def test_age_rejection_carries_sample() -> None:
    now = datetime.now(UTC)
    items = [
        sample("node-1/old", "job-1", now - timedelta(hours=2)),
        sample("node-1/bad", "job-1", now - timedelta(hours=2), model="no-such-model"),
    ]
    accepted, rejected = decode_report(
        report(items),
        Origin(SUBJECT, "prov-a", "r1", "node-1", 7),
        known_models=default_rate_card().rates,
        node_owner=lambda node: "prov-a",
        now=now,
        max_age_s=HOUR_S,
    )
    old, bad = rejected
    assert accepted == []
    assert old.late_sample is not None
    assert old.late_sample.sample_id == "node-1/old"
    assert old.late_sample.stream_sequence == 7
    assert bad.late_sample is None

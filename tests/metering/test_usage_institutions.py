"""Usage grouped by institution, including attempts stored without one."""

from __future__ import annotations

import functools
from datetime import timedelta

from acsp.subjects import usage_subject
from services.metering.attempts import AttemptFacts, record_attempt
from services.metering.ingest import UsageIngest
from services.metering.queries import UNATTRIBUTED, Grouping, UsageFilter, query_usage
from services.runtime.db import Database
from tests.metering.helpers import T0, report, running_ingest, sample, wait_until


async def _ingested(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def _record(db: Database, job_id: str, institution_id: str) -> None:
    async with db.acquire() as conn:
        await record_attempt(
            conn,
            AttemptFacts(
                job_id=job_id,
                attempt=0,
                hold_id=f"hold-{job_id}",
                grant_id="grant-1",
                project_id="proj-1",
                institution_id=institution_id,
                started_at=T0,
                cause="test",
            ),
        )


async def test_usage_by_institution_keeps_unattributed(nats_url: str, db: Database) -> None:
    # job-old is an attempt stored before job events carried the institution.
    jobs = {"job-a": "uni-a", "job-old": ""}
    async with running_ingest(nats_url, db) as (js, ingest):
        for node, job_id in enumerate(jobs):
            items = [sample(f"{job_id}/{i}", job_id, T0 + timedelta(minutes=i)) for i in range(6)]
            await js.publish(
                usage_subject("prov-a", "r1", f"node-{node}"),
                report(items, node=f"node-{node}"),
            )
        await wait_until(functools.partial(_ingested, ingest, len(jobs)))
    for job_id, institution in jobs.items():
        await _record(db, job_id, institution)
    window = (T0, T0 + timedelta(days=1))

    async with db.acquire() as conn:
        by_institution = await query_usage(
            conn, Grouping.INSTITUTION, *window, UsageFilter(), after="", limit=10
        )
        first_page = await query_usage(
            conn, Grouping.INSTITUTION, *window, UsageFilter(), after="", limit=1
        )
        second_page = await query_usage(
            conn, Grouping.INSTITUTION, *window, UsageFilter(), after=first_page[-1].key, limit=1
        )
        by_project = await query_usage(
            conn, Grouping.PROJECT, *window, UsageFilter(institution_id="uni-a"), after="", limit=10
        )
        unattributed = await query_usage(
            conn,
            Grouping.GRANT,
            *window,
            UsageFilter(institution_id=UNATTRIBUTED),
            after="",
            limit=10,
        )

    hours = {row.key: row.accelerator_hours for row in by_institution}
    assert hours == {"uni-a": hours["uni-a"], UNATTRIBUTED: hours["uni-a"]}
    assert hours["uni-a"] > 0
    assert [row.key for row in first_page + second_page] == sorted(hours)
    assert [(row.key, row.accelerator_hours) for row in by_project] == [("proj-1", hours["uni-a"])]
    assert [(row.key, row.accelerator_hours) for row in unattributed] == [
        ("grant-1", hours[UNATTRIBUTED])
    ]

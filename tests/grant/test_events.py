"""Grant events reach JetStream after commit: awarded, budget low, expiring soon, expired."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import nats
from nats.js.api import DeliverPolicy, KeyValueConfig

from acsp.subjects import RATE_CARD_BUCKET
from acsp.v1 import common_pb2, events_pb2, grant_pb2, metering_pb2
from tests.grant.service_helpers import running_grant
from tests.grant.test_service_rpc import setup_project


def dec(value: str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=value)


async def collect_events(
    nats_url: str, wanted: set[events_pb2.GrantEventKind], timeout_s: float = 20.0
) -> list[events_pb2.GrantEvent]:
    """Read grant events from the stream until every wanted kind has arrived."""
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        subscription = await js.subscribe(
            "acsp.events.grant.>", stream="ACSP_EVENTS", deliver_policy=DeliverPolicy.ALL
        )
        events: list[events_pb2.GrantEvent] = []
        async with asyncio.timeout(timeout_s):
            while not wanted <= {e.kind for e in events}:
                message = await subscription.next_msg(timeout=timeout_s)
                events.append(events_pb2.GrantEvent.FromString(message.data))
        await subscription.unsubscribe()
        return events
    finally:
        await client.close()


async def test_grant_events_published_once(schema: str, tmp_path: Path, nats_url: str) -> None:
    extra = {
        "ACSP_NATS_URL": nats_url,
        "ACSP_GRANT_EXPIRY_INTERVAL_S": "0.2",
        "ACSP_GRANT_OUTBOX_INTERVAL_S": "0.05",
        "ACSP_GRANT_EXPIRING_SOON_DAYS": "1",
    }
    async with running_grant(schema, tmp_path, extra) as svc:
        await setup_project(svc)
        pi = svc.stub("alice", ["pi"], "uni-a")
        now = datetime.now(UTC)
        application = grant_pb2.Application(
            project_id="proj-a",
            tier=grant_pb2.GRANT_TIER_EXPLORATORY,
            requested_pf_days=dec("10"),
            justification="short pilot",
        )
        application.validity.start_time.FromDatetime(now - timedelta(minutes=1))
        # Short enough to expire during the test, long enough for the holds on a busy machine.
        application.validity.end_time.FromDatetime(now + timedelta(seconds=6))
        awarded = await pi.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(request_id=uuid.uuid4().hex, application=application)
        )

        scheduler = svc.stub("scheduler", ["service"])
        for amount in ("5", "4.5", "0.1"):
            await scheduler.PlaceHold(
                grant_pb2.PlaceHoldRequest(
                    request_id=uuid.uuid4().hex,
                    grant_id=awarded.grant_id,
                    job_id="job-1",
                    amount_pf_days=dec(amount),
                )
            )

        wanted = {
            events_pb2.GRANT_EVENT_KIND_AWARDED,
            events_pb2.GRANT_EVENT_KIND_BUDGET_LOW,
            events_pb2.GRANT_EVENT_KIND_EXPIRING_SOON,
            events_pb2.GRANT_EVENT_KIND_EXPIRED,
        }
        events = await collect_events(nats_url, wanted)
        office = svc.stub("office", ["program_office"])
        grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=awarded.grant_id))
        summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())

    kinds = [e.kind for e in events]
    assert all(kinds.count(k) == 1 for k in wanted), kinds
    assert all(e.grant_id == awarded.grant_id for e in events)
    low = next(e for e in events if e.kind == events_pb2.GRANT_EVENT_KIND_BUDGET_LOW)
    assert low.available_pf_days.value == "0.5"
    assert grant.state == grant_pb2.GRANT_STATE_EXPIRED
    # Expiry returned the unspent 0.4 PF-days; the held 9.6 stays held for the running job.
    assert grant.balance.available_pf_days.value == "0"
    assert grant.balance.held_pf_days.value == "9.6"
    assert Decimal(summary.program_pool_pf_days.value) == Decimal("-9.6")


async def test_fixed_rate_award_keeps_card_version(
    schema: str, tmp_path: Path, nats_url: str
) -> None:
    client = await nats.connect(nats_url)
    try:
        bucket = await client.jetstream().create_key_value(KeyValueConfig(bucket=RATE_CARD_BUCKET))
        await bucket.put("current", metering_pb2.RateCard(version=3).SerializeToString())
    finally:
        await client.close()
    async with running_grant(schema, tmp_path, {"ACSP_NATS_URL": nats_url}) as svc:
        await setup_project(svc)
        pi = svc.stub("alice", ["pi"], "uni-a")
        office = svc.stub("office", ["program_office"])
        reviewer = svc.stub("rita", ["reviewer"], "uni-b")
        application = grant_pb2.Application(
            project_id="proj-a",
            tier=grant_pb2.GRANT_TIER_STANDARD,
            requested_pf_days=dec("20"),
            justification="fixed rates",
        )
        application.validity.start_time.FromDatetime(datetime.now(UTC))
        application.validity.end_time.FromDatetime(datetime.now(UTC) + timedelta(days=9))
        app = await pi.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(request_id=uuid.uuid4().hex, application=application)
        )
        await office.AssignReviewer(
            grant_pb2.AssignReviewerRequest(
                request_id=uuid.uuid4().hex,
                application_id=app.application_id,
                reviewer_subject="rita",
                reviewer_institution_id="uni-b",
            )
        )
        await reviewer.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=uuid.uuid4().hex,
                application_id=app.application_id,
                score=5,
                comments="ok",
            )
        )
        decided = await office.DecideApplication(
            grant_pb2.DecideApplicationRequest(
                request_id=uuid.uuid4().hex,
                application_id=app.application_id,
                decision=grant_pb2.Decision(
                    outcome=grant_pb2.DECISION_OUTCOME_AWARD_LESS,
                    awarded_pf_days=dec("15"),
                    reason="scope",
                ),
                rate_policy=grant_pb2.RATE_POLICY_FIXED_AT_AWARD,
            )
        )
        grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=decided.grant_id))
    assert grant.rate_policy == grant_pb2.RATE_POLICY_FIXED_AT_AWARD
    assert grant.rate_card_version == 3
    assert grant.balance.available_pf_days.value == "15"

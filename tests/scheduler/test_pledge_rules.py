"""SetPledge and RecallCapacity against the registered fleet: one pledge at a time per pool,
the years the grant service accepts, ``provider/region`` names, pledges above the registered
hardware, and recalls that would free nothing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, scheduler_pb2
from services.runtime.auth import Role

from .harness import Stack, metadata, scheduler_stub, wait_for

pytestmark = pytest.mark.timeout(120)

A100 = "A100-SXM4-80GB"
H100 = "H100-SXM5-80GB"
DAY = 86_400


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


def pledge_of(
    start: float,
    end: float,
    protected: int = 2,
    recallable: int = 4,
    region: str = "reg",
    model: str = A100,
    pledge_id: str = "",
) -> scheduler_pb2.Pledge:
    window = common_pb2.TimeWindow()
    window.start_time.FromSeconds(int(start))
    window.end_time.FromSeconds(int(end))
    return scheduler_pb2.Pledge(
        pledge_id=pledge_id,
        provider_id="prov",
        region_id=region,
        model=model,
        window=window,
        protected_count=protected,
        recallable_count=recallable,
    )


def recall_of(pledge_id: str, count: int) -> scheduler_pb2.Recall:
    recall = scheduler_pb2.Recall(pledge_id=pledge_id, count=count, reason="commercial peak")
    recall.effective_time.FromSeconds(int(time.time()) + 60)
    return recall


async def test_pledge_rules(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=2, gpus=8)
    operator = metadata(stack.token("op", Role.PROVIDER_OPERATOR, provider="prov"))
    now = time.time()
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def fleet_known() -> bool:
            nodes = await scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=operator, timeout=10
            )
            return len(nodes.nodes) == 2

        await wait_for(fleet_known, 30, "the agent's inventory", 0.1)

        async def set_pledge(pledge: scheduler_pb2.Pledge) -> scheduler_pb2.Pledge:
            request = scheduler_pb2.SetPledgeRequest(pledge=pledge)
            return await scheduler.SetPledge(request, metadata=operator, timeout=10)

        async def rejected(pledge: scheduler_pb2.Pledge) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await set_pledge(pledge)
            return caught.value

        async def recall_rejected(recall: scheduler_pb2.Recall) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await scheduler.RecallCapacity(
                    scheduler_pb2.RecallCapacityRequest(recall=recall),
                    metadata=operator,
                    timeout=10,
                )
            return caught.value

        first = await set_pledge(pledge_of(now - 60, now + DAY, region="prov/reg"))
        overlap = await rejected(pledge_of(now + 3600, now + 2 * DAY, protected=5))
        following = await set_pledge(pledge_of(now + DAY, now + 2 * DAY))
        widened = await rejected(pledge_of(now - 60, now + 2 * DAY, pledge_id=first.pledge_id))
        changed = await set_pledge(
            pledge_of(now - 60, now + DAY, protected=3, pledge_id=first.pledge_id)
        )
        other_prefix = await rejected(pledge_of(now, now + DAY, region="other/reg"))
        far_end = await rejected(pledge_of(now, 253_402_300_799))
        unregistered = await rejected(pledge_of(now, now + DAY, region="nowhere"))
        huge = await set_pledge(
            pledge_of(now - 60, now + DAY, protected=1_000_000, recallable=4, model=H100)
        )
        listed = await scheduler.ListPledges(
            scheduler_pb2.ListPledgesRequest(provider_id="prov"), metadata=operator, timeout=10
        )
        nothing_registered = await recall_rejected(recall_of(huge.pledge_id, 4))
        past_pledge = recall_of(first.pledge_id, 1)
        past_pledge.end_time.FromSeconds(int(now + DAY + 3600))
        outlives = await recall_rejected(past_pledge)
        recall = await scheduler.RecallCapacity(
            scheduler_pb2.RecallCapacityRequest(recall=recall_of(first.pledge_id, 4)),
            metadata=operator,
            timeout=10,
        )
        protected_only = await set_pledge(
            pledge_of(now + 3 * DAY, now + 4 * DAY, protected=20, recallable=4)
        )
        future_recall = recall_of(protected_only.pledge_id, 4)
        future_recall.effective_time.FromSeconds(int(now + 3 * DAY + 60))
        all_protected = await recall_rejected(future_recall)
        outside = await recall_rejected(recall_of(following.pledge_id, 1))

    assert first.region_id == "reg"
    assert first.registered_count == 16
    assert first.healthy_count == 16
    assert overlap.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"overlaps pledge {first.pledge_id}" in (overlap.details() or "")
    assert f"--pledge-id {first.pledge_id}" in (overlap.details() or "")
    assert following.pledge_id != first.pledge_id
    assert widened.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"overlaps pledge {following.pledge_id}" in (widened.details() or "")
    assert changed.protected_count == 3
    assert other_prefix.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without the provider prefix, e.g. region-1" in (other_prefix.details() or "")
    assert far_end.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pledge.window.end_time" in (far_end.details() or "")
    assert "2000..2199" in (far_end.details() or "")
    assert unregistered.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "acsp agent run --provider prov --region nowhere" in (unregistered.details() or "")
    assert "the acsp CLI has no command for" in (unregistered.details() or "")
    assert huge.registered_count == 0
    assert listed.fleet_counted
    registered = {p.pledge_id: p.registered_count for p in listed.pledges}
    assert registered == {first.pledge_id: 16, following.pledge_id: 16, huge.pledge_id: 0}
    assert nothing_registered.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"no registered {H100} accelerators" in (nothing_registered.details() or "")
    assert recall.freed_count == 4
    assert recall.end_time == changed.window.end_time
    assert outlives.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "recall.end_time" in (outlives.details() or "")
    assert f"after pledge {first.pledge_id} ends" in (outlives.details() or "")
    assert "leave end_time unset" in (outlives.details() or "")
    assert all_protected.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "protects 20" in (all_protected.details() or "")
    assert outside.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "outside the window" in (outside.details() or "")


async def test_recall_now_beside_booked_peak(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, gpus=16)
    operator = metadata(stack.token("op", Role.PROVIDER_OPERATOR, provider="prov"))
    now = time.time()
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def fleet_known() -> bool:
            nodes = await scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=operator, timeout=10
            )
            return len(nodes.nodes) == 1

        await wait_for(fleet_known, 30, "the agent's inventory", 0.1)

        async def recall_between(count: int, start: float, end: float) -> scheduler_pb2.Recall:
            requested = recall_of(pledge.pledge_id, count)
            requested.effective_time.FromSeconds(int(start))
            requested.end_time.FromSeconds(int(end))
            request = scheduler_pb2.RecallCapacityRequest(recall=requested)
            return await scheduler.RecallCapacity(request, metadata=operator, timeout=10)

        pledge = await scheduler.SetPledge(
            scheduler_pb2.SetPledgeRequest(
                pledge=pledge_of(now - 60, now + 30 * DAY, protected=8, recallable=8)
            ),
            metadata=operator,
            timeout=10,
        )
        peak = await recall_between(8, now + DAY, now + DAY + 7200)

        async def peak_counted() -> bool:
            summary = await scheduler.GetQueueSummary(
                scheduler_pb2.GetQueueSummaryRequest(), metadata=operator, timeout=10
            )
            return summary.recalled_millis_by_region.get("prov/reg") == 8000

        # The scheduler counts a recall from its announcement, so the booked peak is in force.
        await wait_for(peak_counted, 30, "the booked recall in the scheduler", 0.1)
        urgent = await recall_between(1, now + 60, now + 660)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await recall_between(1, now + DAY + 3600, now + DAY + 10_800)

    assert peak.freed_count == 8
    assert urgent.freed_count == 1
    overlapping = caught.value
    assert overlapping.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "0 recallable accelerators left" in (overlapping.details() or "")
    assert f"{peak.recall_id} (8 from " in (overlapping.details() or "")

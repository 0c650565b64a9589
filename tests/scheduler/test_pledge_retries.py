"""A repeated SetPledge or RecallCapacity request id returns what its first call made, and
a request id reused with other values, or by another provider, is rejected. So is a recall
time outside the Timestamp range."""

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

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


def pledge_of(provider: str, protected: int = 1) -> scheduler_pb2.Pledge:
    window = common_pb2.TimeWindow()
    window.start_time.FromSeconds(int(time.time()))
    window.end_time.FromSeconds(int(time.time()) + 86_400)
    return scheduler_pb2.Pledge(
        provider_id=provider,
        region_id="reg",
        model="A100-SXM4-80GB",
        window=window,
        protected_count=protected,
        recallable_count=4,
    )


def recall_of(pledge_id: str, count: int) -> scheduler_pb2.Recall:
    recall = scheduler_pb2.Recall(pledge_id=pledge_id, count=count, reason="commercial peak")
    recall.effective_time.FromSeconds(int(time.time()) + 60)
    return recall


async def test_pledge_and_recall_request_ids(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    first = metadata(stack.token("op-a", Role.PROVIDER_OPERATOR, provider="pa"))
    second = metadata(stack.token("op-b", Role.PROVIDER_OPERATOR, provider="pb"))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        for provider, md in (("pa", first), ("pb", second)):
            region = scheduler_pb2.Region(region_id="reg", display_name="R", jurisdiction="EU")
            await scheduler.RegisterProvider(
                scheduler_pb2.RegisterProviderRequest(
                    request_id=f"register-{provider}",
                    provider=scheduler_pb2.Provider(
                        provider_id=provider, display_name=provider, regions=[region]
                    ),
                ),
                metadata=md,
                timeout=10,
            )

        async def set_pledge(
            request_id: str, pledge: scheduler_pb2.Pledge, md: Metadata
        ) -> scheduler_pb2.Pledge:
            request = scheduler_pb2.SetPledgeRequest(request_id=request_id, pledge=pledge)
            return await scheduler.SetPledge(request, metadata=md, timeout=10)

        async def recall(
            request_id: str, wanted: scheduler_pb2.Recall, md: Metadata
        ) -> scheduler_pb2.Recall:
            request = scheduler_pb2.RecallCapacityRequest(request_id=request_id, recall=wanted)
            return await scheduler.RecallCapacity(request, metadata=md, timeout=10)

        # A recall needs registered accelerators of the pledged model to take back.
        stack.start_agents(nodes=1, provider="pa")

        async def node_known() -> bool:
            nodes = await scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(provider_id="pa"), metadata=first, timeout=10
            )
            return len(nodes.nodes) == 1

        await wait_for(node_known, 30, "the agent's inventory", 0.1)

        made_from = time.time()
        pledge_a = await set_pledge("pledge-1", pledge_of("pa"), first)
        made_by = time.time()
        retried_pledge = await set_pledge("pledge-1", pledge_of("pa"), first)
        with pytest.raises(grpc.aio.AioRpcError) as pledge_reused:
            await set_pledge("pledge-1", pledge_of("pa", protected=3), first)
        pledge_b = await set_pledge("pledge-1", pledge_of("pb"), second)

        recall_a = await recall("recall-1", recall_of(pledge_a.pledge_id, 1), first)
        retried_recall = await recall("recall-1", recall_of(pledge_a.pledge_id, 1), first)
        with pytest.raises(grpc.aio.AioRpcError) as other_count:
            await recall("recall-1", recall_of(pledge_a.pledge_id, 2), first)
        with pytest.raises(grpc.aio.AioRpcError) as other_provider:
            await recall("recall-1", recall_of(pledge_b.pledge_id, 2), second)
        far_future = recall_of(pledge_a.pledge_id, 1)
        far_future.effective_time.seconds = 2**62
        with pytest.raises(grpc.aio.AioRpcError) as out_of_range:
            await recall("recall-2", far_future, first)
        pledges = await scheduler.ListPledges(
            scheduler_pb2.ListPledgesRequest(provider_id="pa"), metadata=first, timeout=10
        )
        recalls_b = await scheduler.ListRecalls(
            scheduler_pb2.ListRecallsRequest(provider_id="pb"), metadata=second, timeout=10
        )

    assert retried_pledge.pledge_id == pledge_a.pledge_id
    assert [p.pledge_id for p in pledges.pledges] == [pledge_a.pledge_id]
    assert pledges.pledges[0].protected_count == 1
    # The time the first call stored it, which the retry with the same values leaves as it is.
    created = pledges.pledges[0].create_time.ToMicroseconds() / 1e6
    assert made_from - 1 <= created <= made_by + 1
    assert pledge_reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (pledge_reused.value.details() or "").startswith("request_id: was used before")
    assert pledge_b.pledge_id != pledge_a.pledge_id
    assert retried_recall.recall_id == recall_a.recall_id
    assert other_count.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert other_provider.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert recall_a.recall_id not in (other_provider.value.details() or "")
    assert list(recalls_b.recalls) == []
    assert out_of_range.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "recall.effective_time" in (out_of_range.value.details() or "")

"""``acsp fleet pledge``, ``acsp fleet recall``, failed accelerators in ``acsp fleet nodes`` and
the settlement of a new pledge, against a real scheduler, grant service, metering, NATS and
simulated agents."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
import pytest

from acsp import subjects
from acsp.cli import fleet as fleet_cli
from acsp.cli import pledges as pledges_cli
from acsp.cli import usage as usage_cli
from acsp.cli.main import main
from acsp.v1 import (
    agent_pb2,
    common_pb2,
    metering_pb2,
    metering_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.runtime.auth import Role

from .harness import Stack, metadata, scheduler_stub, wait_for

pytestmark = pytest.mark.timeout(240)

MODEL = "A100-SXM4-80GB"
OTHER_MODEL = "H100-SXM5-80GB"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


class _TokenStub:
    """A blocking service stub that sends a bearer token and a deadline with each call."""

    def __init__(self, stub: Any, token: str) -> None:
        self._stub = stub
        self._metadata = metadata(token)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=20)


def use_identity(monkeypatch: pytest.MonkeyPatch, address: str, token: str) -> None:
    @contextmanager
    def open_scheduler(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(address) as channel:
            yield _TokenStub(scheduler_pb2_grpc.SchedulerServiceStub(channel), token)

    monkeypatch.setattr(fleet_cli, "open_scheduler", open_scheduler)
    monkeypatch.setattr(pledges_cli, "open_scheduler", open_scheduler)


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["fleet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_rows(out: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


async def register_provider(address: str, token: str, provider: str, *regions: str) -> None:
    channel, scheduler = scheduler_stub(address)
    async with channel:
        await scheduler.RegisterProvider(
            scheduler_pb2.RegisterProviderRequest(
                provider=scheduler_pb2.Provider(
                    provider_id=provider,
                    regions=[scheduler_pb2.Region(region_id=r) for r in regions],
                )
            ),
            metadata=metadata(token),
            timeout=10,
        )


async def test_pledge_and_recall_commands(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    start = datetime.now(UTC).replace(microsecond=0)
    end = start + timedelta(days=30)
    window = ("--start", iso(start), "--end", iso(end))
    token = stack.token("op-eu", Role.PROVIDER_OPERATOR, provider="eu")
    use_identity(monkeypatch, address, token)
    await register_provider(address, token, "eu", "reg")
    # Recalls need registered accelerators to take back: 16 of MODEL.
    stack.start_agents(nodes=2, gpus=8, provider="eu")

    async def registered() -> bool:
        code, out, _ = await run_cli(capsys, "nodes", "--format", "json")
        return code == 0 and len(json_rows(out)) == 2

    await wait_for(registered, 30, "the agent's inventory", 0.1)

    code, out, err = await run_cli(
        capsys,
        "pledge",
        "set",
        "--provider",
        "eu",
        "--region",
        "reg",
        "--model",
        MODEL,
        "--protected",
        "4",
        "--recallable",
        "6",
        *window,
        "--format",
        "json",
    )
    assert code == 0, err
    (pledge,) = json_rows(out)
    pledge_id = pledge["pledge"]
    assert pledge_id
    assert pledge["protected"] == 4
    assert pledge["recallable"] == 6
    assert pledge["registered"] == 16
    assert pledge["start"] == iso(start)
    assert "warning" not in err

    # Changing the pledge keeps its id and replaces its counts.
    code, out, err = await run_cli(
        capsys,
        "pledge",
        "set",
        "--pledge-id",
        pledge_id,
        "--provider",
        "eu",
        "--region",
        "reg",
        "--model",
        MODEL,
        "--protected",
        "2",
        "--recallable",
        "8",
        *window,
        "--format",
        "json",
    )
    assert code == 0, err
    assert json_rows(out)[0]["recallable"] == 8

    code, out, err = await run_cli(capsys, "pledge", "list", "--format", "json")
    assert code == 0, err
    listed = json_rows(out)
    assert [row["pledge"] for row in listed] == [pledge_id]
    assert listed[0]["protected"] == 2

    code, out, err = await run_cli(capsys, "pledge", "list")
    assert code == 0, err
    assert pledge_id in out
    assert "recallable" in out

    before = datetime.now(UTC)
    code, out, err = await run_cli(
        capsys,
        "recall",
        "create",
        pledge_id,
        "--count",
        "3",
        "--notice",
        "3600",
        "--duration",
        "7200",
        "--reason",
        "commercial peak",
        "--format",
        "json",
    )
    assert code == 0, err
    (recall,) = json_rows(out)
    effective = datetime.fromisoformat(recall["effective"])
    assert before + timedelta(seconds=3590) <= effective <= before + timedelta(seconds=3610)
    assert datetime.fromisoformat(recall["end"]) - effective == timedelta(seconds=7200)
    assert recall["count"] == 3
    assert recall["freed"] == 3
    assert recall["reason"] == "commercial peak"

    code, out, err = await run_cli(capsys, "recall", "list", "--provider", "eu", "--format", "csv")
    assert code == 0, err
    assert recall["recall"] in out
    assert pledge_id in out

    # 8 recallable, 3 recalled: a recall of 6 is more than is left, and the error names --count.
    code, out, err = await run_cli(
        capsys, "recall", "create", pledge_id, "--count", "6", "--notice", "60"
    )
    assert code == 1
    assert "FAILED_PRECONDITION" in err
    assert "5 recallable accelerators left" in err
    assert "--count" in err

    # A pledge above the registered accelerators is accepted with a warning, in its reply and
    # in the listing, and a recall from it that would free nothing is rejected.
    code, out, err = await run_cli(
        capsys,
        "pledge",
        "set",
        "--provider",
        "eu",
        "--region",
        "eu/reg",
        "--model",
        "H100-SXM5-80GB",
        "--protected",
        "10",
        "--recallable",
        "4",
        *window,
        "--format",
        "json",
    )
    assert code == 0, err
    (ahead,) = json_rows(out)
    assert ahead["region"] == "reg"
    assert ahead["registered"] == 0
    assert f"warning: pledge {ahead['pledge']}" in err
    assert "pledged 14, registered 0" in err
    code, out, err = await run_cli(capsys, "pledge", "list")
    assert code == 0, err
    assert "pledged 14, registered 0" in err
    assert pledge_id not in err
    code, out, err = await run_cli(
        capsys, "recall", "create", ahead["pledge"], "--count", "4", "--notice", "60"
    )
    assert code == 1
    assert "FAILED_PRECONDITION" in err
    assert "would free nothing" in err

    # A second pledge over the same window is rejected, naming the pledge to change instead.
    code, out, err = await run_cli(
        capsys,
        "pledge",
        "set",
        "--provider",
        "eu",
        "--region",
        "reg",
        "--model",
        MODEL,
        "--recallable",
        "1",
        *window,
    )
    assert code == 1
    assert f"--pledge-id {pledge_id}" in err

    # A region prefixed with another provider is rejected with the form to use.
    code, out, err = await run_cli(
        capsys,
        "pledge",
        "set",
        "--provider",
        "eu",
        "--region",
        "cn/reg",
        "--model",
        MODEL,
        "--recallable",
        "1",
        *window,
    )
    assert code == 2
    assert "without the provider prefix" in err
    assert "--region" in err

    # A repeated request returns the stored recall, whose freed count was not stored.
    repeat_at = iso(start + timedelta(hours=1))
    repeat = (
        *("recall", "create", pledge_id, "--count", "1", "--effective", repeat_at),
        *("--request-id", "recall-once", "--format", "json"),
    )
    code, out, err = await run_cli(capsys, *repeat)
    assert code == 0, err
    (first,) = json_rows(out)
    assert first["freed"] == 1
    assert "repeat" not in err
    code, out, err = await run_cli(capsys, *repeat)
    assert code == 0, err
    (again,) = json_rows(out)
    assert again["recall"] == first["recall"]
    assert again["freed"] is None
    assert f"repeats the request that created recall {first['recall']}" in err

    # A model outside the catalog is rejected by the scheduler, and the message names --model.
    code, out, err = await run_cli(
        capsys,
        "pledge",
        "set",
        "--provider",
        "eu",
        "--region",
        "reg",
        "--model",
        "no-such-model",
        "--recallable",
        "1",
        *window,
    )
    assert code == 2
    assert "not in the catalog" in err
    assert "--model" in err

    code, out, err = await run_cli(
        capsys, "recall", "create", "pl-missing", "--count", "1", "--notice", "60"
    )
    assert code == 1
    assert "NOT_FOUND" in err

    # An operator of another provider may not pledge for this one.
    use_identity(monkeypatch, address, stack.token("op-cn", Role.PROVIDER_OPERATOR, provider="cn"))
    code, out, err = await run_cli(
        capsys,
        "pledge",
        "set",
        "--provider",
        "eu",
        "--region",
        "reg",
        "--model",
        MODEL,
        "--recallable",
        "1",
        *window,
    )
    assert code == 1
    assert "PERMISSION_DENIED" in err


async def test_pledge_of_unregistered_region(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    start = datetime.now(UTC).replace(microsecond=0)
    window = ("--start", iso(start), "--end", iso(start + timedelta(days=30)))
    token = stack.token("op-eu", Role.PROVIDER_OPERATOR, provider="eu")
    use_identity(monkeypatch, address, token)

    def pledge_set(region: str) -> tuple[str, ...]:
        options = ("--provider", "eu", "--region", region, "--model", MODEL, "--recallable", "1")
        return ("pledge", "set", *options, *window)

    # A provider that is not registered has no regions to pledge.
    code, _, err = await run_cli(capsys, *pledge_set("reg"))
    assert code == 2
    assert "INVALID_ARGUMENT" in err
    assert "provider 'eu' is not registered" in err
    assert "--provider" in err

    await register_provider(address, token, "eu", "reg", "reg-2")
    code, _, err = await run_cli(capsys, *pledge_set("other"))
    assert code == 2
    assert "INVALID_ARGUMENT" in err
    assert "'other' is not a registered region of provider 'eu'" in err
    assert "reg, reg-2" in err
    assert "--region" in err

    # An id that names no pledge is not taken as the id of a new one.
    code, _, err = await run_cli(capsys, *pledge_set("reg"), "--pledge-id", "pl-typo")
    assert code == 1
    assert "NOT_FOUND" in err
    assert "pledge 'pl-typo' not found" in err

    # No rejected pledge was stored.
    code, out, err = await run_cli(capsys, "pledge", "list", "--format", "json")
    assert code == 0, err
    assert json_rows(out) == []

    code, out, err = await run_cli(capsys, *pledge_set("reg-2"), "--format", "json")
    assert code == 0, err
    assert json_rows(out)[0]["region"] == "reg-2"


def pledge_request(
    provider: str, start: datetime, model: str = MODEL
) -> scheduler_pb2.SetPledgeRequest:
    window = common_pb2.TimeWindow()
    window.start_time.FromDatetime(start)
    window.end_time.FromDatetime(start + timedelta(days=30))
    pledge = scheduler_pb2.Pledge(
        provider_id=provider, region_id="reg", model=model, window=window, recallable_count=1
    )
    return scheduler_pb2.SetPledgeRequest(pledge=pledge)


async def test_settlement_of_new_pledge(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    office_token = stack.token("office", Role.PROGRAM_OFFICE)
    office = metadata(office_token)
    start = datetime.now(UTC).replace(microsecond=0)
    channel, scheduler = scheduler_stub(address)
    async with channel:
        for provider in ("eu", "cn"):
            await register_provider(address, office_token, provider, "reg")
        await scheduler.SetPledge(pledge_request("cn", start), metadata=office, timeout=10)

        token_file = stack.work_dir / "metering.token"
        token_file.write_text(stack.token("metering", Role.SERVICE))
        _, metering_address = await stack.start_service(
            "metering",
            "services.metering",
            ACSP_GRANT_ADDRESS=stack.grant_address,
            ACSP_SCHEDULER_ADDRESS=address,
            ACSP_METERING_SERVICE_TOKEN_FILE=str(token_file),
        )

        # Metering copies pledges once at start, then once a minute.
        async def copied_once() -> bool:
            conn = await asyncpg.connect(stack.dsn, timeout=10)
            try:
                return bool(await conn.fetchval("SELECT count(*) FROM metering.pledges"))
            finally:
                await conn.close()

        await wait_for(copied_once, 30, "metering to copy the first pledge", 0.2)
        await scheduler.SetPledge(pledge_request("eu", start), metadata=office, timeout=10)
        # A second pledge of a provider whose first pledge metering has copied, backdated two days.
        second_sent_at = datetime.now(UTC)
        await scheduler.SetPledge(
            pledge_request("cn", start - timedelta(days=2), OTHER_MODEL),
            metadata=office,
            timeout=10,
        )

    period = common_pb2.TimeWindow()
    period.start_time.FromDatetime(start)
    period.end_time.FromDatetime(start + timedelta(days=1))
    days_before = common_pb2.TimeWindow()
    days_before.start_time.FromDatetime(start - timedelta(days=3))
    days_before.end_time.FromDatetime(start + timedelta(days=1))
    async with grpc.aio.insecure_channel(metering_address) as metering_channel:
        metering = metering_pb2_grpc.MeteringServiceStub(metering_channel)
        # cn first: metering's periodic copy (once a minute) has its first pledge but not the
        # second, so only the settlement's own copy of cn's pledges brings that one in.
        known = await metering.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id="cn", period=days_before),
            metadata=office,
            timeout=20,
        )
        # The pledge made after the copy is in the settlement at once.
        settlement = await metering.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id="eu", period=period),
            metadata=office,
            timeout=20,
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await metering.GetSettlement(
                metering_pb2.GetSettlementRequest(provider_id="pl-missing", period=period),
                metadata=office,
                timeout=20,
            )
    built = datetime.now(UTC)

    # acsp settlement show takes the provider as --provider, and the deprecated positional
    # form still works.
    @contextmanager
    def open_metering(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(metering_address) as channel:
            yield _TokenStub(metering_pb2_grpc.MeteringServiceStub(channel), office_token)

    monkeypatch.setattr(usage_cli, "open_metering", open_metering)
    days = ("--from", iso(start), "--to", iso(start + timedelta(days=1)), "--format", "json")
    shown = []
    for naming in (("--provider", "eu"), ("eu",), ("eu", "--provider", "eu")):
        code = await asyncio.to_thread(main, ["settlement", "show", *naming, *days])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        shown.append(json.loads(captured.out))
    assert [document["provider"] for document in shown] == ["eu", "eu", "eu"]
    assert [len(document["rows"]) for document in shown] == [1, 1, 1]

    assert [line.region_id for line in settlement.lines] == ["reg"]
    # A settlement counts pledged hours only up to when it is built, never into the future.
    pledged_hours = Decimal(settlement.lines[0].pledged_accelerator_hours.value)
    assert pledged_hours > 0
    assert pledged_hours <= Decimal((built - start).total_seconds()) / 3600
    # The settlement copies the pledges again, so the second pledge of "cn" is in it. Its
    # hours count from when it was made, not from its window's start two days earlier.
    assert [line.model for line in known.lines] == sorted([MODEL, OTHER_MODEL])
    copied = known.pledges_copy_time.ToDatetime(tzinfo=UTC)
    assert second_sent_at - timedelta(seconds=1) <= copied <= built
    (other,) = [line for line in known.lines if line.model == OTHER_MODEL]
    other_hours = Decimal(other.pledged_accelerator_hours.value)
    assert other_hours > 0
    assert other_hours <= Decimal((built - second_sent_at).total_seconds() + 1) / 3600
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "provider 'pl-missing' not found" in (missing.value.details() or "")


async def test_pledge_options_checked_before_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No scheduler is reachable here: the options are rejected before any call.
    use_identity(monkeypatch, "127.0.0.1:1", "no-token")
    base = ("pledge", "set", "--provider", "eu", "--region", "reg", "--model", MODEL)

    code, _, err = await run_cli(capsys, *base, "--start", "2026-01-02", "--end", "2026-02-01")
    assert code == 2
    assert "--protected and --recallable are both 0" in err

    code, _, err = await run_cli(
        capsys, *base, "--recallable", "1", "--start", "2026-02-01", "--end", "2026-01-02"
    )
    assert code == 2
    assert "--end 2026-01-02 is not after --start 2026-02-01" in err

    code, _, err = await run_cli(
        capsys, *base, "--recallable", "1", "--start", "next week", "--end", "2026-01-02"
    )
    assert code == 2
    assert "--start 'next week' is not an ISO 8601 time" in err

    code, _, err = await run_cli(
        capsys,
        "recall",
        "create",
        "pl-1",
        "--count",
        "1",
        "--effective",
        "2026-01-02T00:00Z",
        "--end",
        "2026-01-01",
    )
    assert code == 2
    assert "--end 2026-01-01 is not after the time the recall takes effect" in err

    code, _, err = await run_cli(
        capsys, "recall", "create", "pl-1", "--count", "1", "--notice", "1e15"
    )
    assert code == 2
    assert "--notice 1e+15 ends after 9999-12-31T23:59:59Z" in err

    code, _, err = await run_cli(
        capsys,
        "recall",
        "create",
        "pl-1",
        "--count",
        "1",
        "--effective",
        "9999-12-31",
        "--duration",
        "86400",
    )
    assert code == 2
    assert "--duration 86400 ends after 9999-12-31T23:59:59Z" in err


def health_event(accelerator: str, event_id: str, *, cleared: bool) -> agent_pb2.HealthEvent:
    return agent_pb2.HealthEvent(
        event_id=event_id,
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="n0"),
        accelerator_id=accelerator,
        condition="xid",
        xid=79,
        message="GPU has fallen off the bus",
        health=scheduler_pb2.HEALTH_STATE_OK if cleared else scheduler_pb2.HEALTH_STATE_FAILED,
        cleared=cleared,
    )


async def test_failed_accelerator_in_node_views(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, gpus=4)
    token = stack.token("op", Role.PROVIDER_OPERATOR, provider="prov")
    md = metadata(token)
    use_identity(monkeypatch, address, token)
    channel, scheduler = scheduler_stub(address)
    get_node = scheduler_pb2.GetNodeRequest(provider_id="prov", region_id="reg", node_id="n0")
    async with channel:

        async def node_seen() -> scheduler_pb2.Node | None:
            try:
                return await scheduler.GetNode(get_node, metadata=md, timeout=5)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise

        node = await wait_for(node_seen, 60, "node n0 to send its inventory", 0.2)
        target = node.accelerators[1].accelerator_id
        assert all(a.health == scheduler_pb2.HEALTH_STATE_OK for a in node.accelerators)

        client = await nats.connect(stack.nats_url)
        try:
            js = client.jetstream()
            subject = subjects.health_subject("prov", "reg", "n0")
            failure = health_event(target, "hev-fail-1", cleared=False)
            await js.publish(subject, failure.SerializeToString())

            async def marked_failed() -> scheduler_pb2.Accelerator | None:
                current = await scheduler.GetNode(get_node, metadata=md, timeout=5)
                for acc in current.accelerators:
                    if acc.accelerator_id == target and acc.health_cause.reference_id:
                        return acc
                return None

            failed = await wait_for(marked_failed, 30, f"{target} to be marked failed", 0.2)
            assert failed.health == scheduler_pb2.HEALTH_STATE_FAILED
            assert failed.health_cause.reference_id == "hev-fail-1"
            assert failed.health_cause.trigger == "event:health"
            assert failed.health_cause.reason == "XID 79: GPU has fallen off the bus"

            listed = await scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(provider_id="prov"), metadata=md, timeout=5
            )
            (listed_node,) = listed.nodes
            for page, field in (
                ({"page_token": "\u00b2"}, "page_token"),
                ({"page_size": 1001}, "page_size"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await scheduler.ListNodes(
                        scheduler_pb2.ListNodesRequest(page=common_pb2.PageRequest(**page)),
                        metadata=md,
                        timeout=5,
                    )
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"page.{field}" in (caught.value.details() or "")
            health = {a.accelerator_id: a.health for a in listed_node.accelerators}
            assert health[target] == scheduler_pb2.HEALTH_STATE_FAILED
            assert list(health.values()).count(scheduler_pb2.HEALTH_STATE_OK) == 3

            code, out, err = await run_cli(capsys, "nodes", "--format", "json")
            assert code == 0, err
            (row,) = json_rows(out)
            assert row["healthy"] == 3
            assert row["failed"] == 1
            assert (
                row["failures"]
                == f"{target}: XID 79: GPU has fallen off the bus (event hev-fail-1)"
            )

            code, out, err = await run_cli(capsys, "node", "prov/reg/n0", "--format", "json")
            assert code == 0, err
            rows = {row["accelerator"]: row for row in json_rows(out)}
            assert len(rows) == 4
            assert rows[target]["health"] == "failed"
            assert rows[target]["event"] == "hev-fail-1"
            assert rows[target]["condition"] == "XID 79: GPU has fallen off the bus"
            healthy = [row for key, row in rows.items() if key != target]
            assert [row["health"] for row in healthy] == ["ok", "ok", "ok"]
            assert [row["event"] for row in healthy] == ["", "", ""]

            code, out, err = await run_cli(capsys, "node", "prov/reg/n0")
            assert code == 0, err
            assert "hev-fail-1" in out
            assert "up" in out

            # The node still sends heartbeats, so it cannot be declared off.
            code, out, err = await run_cli(capsys, "down", "prov/reg/n0", "--reason", "off")
            assert code != 0
            assert "only an unknown node" in err

            # An unknown node is named as the operator wrote it.
            code, out, err = await run_cli(capsys, "node", "prov/reg/n9")
            assert code == 1
            assert "NOT_FOUND" in err
            assert "node 'prov/reg/n9' not found" in err
            code, out, err = await run_cli(capsys, "drain", "prov/reg/n9")
            assert code == 1
            assert "node 'prov/reg/n9' not found" in err
            code, out, err = await run_cli(capsys, "down", "prov/reg/n9", "--reason", "off")
            assert code == 1
            assert "node 'prov/reg/n9' not found" in err

            recovery = health_event(target, "hev-clear-1", cleared=True)
            await js.publish(subject, recovery.SerializeToString())

            async def recovered() -> bool:
                current = await scheduler.GetNode(get_node, metadata=md, timeout=5)
                return all(
                    a.health == scheduler_pb2.HEALTH_STATE_OK and not a.HasField("health_cause")
                    for a in current.accelerators
                )

            await wait_for(recovered, 30, f"{target} to recover", 0.2)
        finally:
            await client.close()

    code, out, err = await run_cli(capsys, "nodes", "--format", "json")
    assert code == 0, err
    assert json_rows(out)[0]["failed"] == 0
    assert json_rows(out)[0]["failures"] == ""


async def test_delete_command(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=2, gpus=2)
    use_identity(monkeypatch, address, stack.token("op", Role.PROVIDER_OPERATOR, provider="prov"))

    async def registered() -> bool:
        code, out, _ = await run_cli(capsys, "nodes", "--format", "json")
        return code == 0 and len(json_rows(out)) == 2

    await wait_for(registered, 30, "the agents' inventories", 0.1)

    code, out, err = await run_cli(capsys, "delete", "prov/reg/n0")
    assert code == 1
    assert "FAILED_PRECONDITION" in err
    assert "node prov/reg/n0 is up and not drained" in err
    assert "Drain it, wait until it shows as drained, then delete it" in err
    code, out, err = await run_cli(capsys, "delete", "prov/reg/n9")
    assert code == 1
    assert "node 'prov/reg/n9' not found" in err
    code, out, err = await run_cli(capsys, "delete", "prov/n0")
    assert code == 2
    assert "node 'prov/n0' is not <provider>/<region>/<node>" in err

    for node in ("n0", "n1"):
        code, out, err = await run_cli(capsys, "drain", f"prov/reg/{node}", "--reason", "retiring")
        assert code == 0, err
    code, out, err = await run_cli(
        capsys, "delete", "prov/reg/n0", "--reason", "retired", "--format", "json"
    )
    assert code == 0, err
    (row,) = json_rows(out)
    assert row["node"] == "prov/reg/n0"
    assert row["state"] == "drained"
    assert row["accelerators"] == 2
    assert "note: the heartbeats of prov/reg/n0 were not overdue yet" in err
    assert "its agent may still run" in err

    code, out, err = await run_cli(capsys, "delete", "prov/reg/n1")
    assert code == 0, err
    assert "deleted" in out
    assert "prov/reg/n1" in out

    code, out, err = await run_cli(capsys, "nodes", "--format", "json")
    assert code == 0, err
    assert json_rows(out) == []


def test_node_row_names_who_drained() -> None:
    by_agent = scheduler_pb2.Node(
        node_id="n0",
        provider_id="prov",
        region_id="reg",
        state=scheduler_pb2.NODE_STATE_DRAINING,
        state_cause=common_pb2.Cause(
            trigger="agent:drain_requested", reason="health: xid XID 74: NVLink error"
        ),
    )
    by_operator = scheduler_pb2.Node(
        node_id="n1",
        provider_id="prov",
        region_id="reg",
        state=scheduler_pb2.NODE_STATE_DRAINING,
        state_cause=common_pb2.Cause(trigger="rpc:DrainNode", reason="maintenance"),
    )

    agent_row = fleet_cli.node_row(by_agent)
    operator_row = fleet_cli.node_row(by_operator)

    assert (agent_row["state"], agent_row["cause"]) == ("draining", "agent:drain_requested")
    assert agent_row["reason"] == "health: xid XID 74: NVLink error"
    assert (operator_row["state"], operator_row["cause"]) == ("draining", "rpc:DrainNode")
    assert operator_row["reason"] == "maintenance"


def test_recall_list_shows_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    windows = {
        "r-scheduled": (now + timedelta(hours=1), now + timedelta(hours=2)),
        "r-active": (now - timedelta(hours=1), now + timedelta(hours=1)),
        "r-ended": (now - timedelta(hours=2), now - timedelta(hours=1)),
    }

    class Scheduler:
        def ListPledges(
            self, request: scheduler_pb2.ListPledgesRequest
        ) -> scheduler_pb2.ListPledgesResponse:
            return scheduler_pb2.ListPledgesResponse()

        def ListRecalls(
            self, request: scheduler_pb2.ListRecallsRequest
        ) -> scheduler_pb2.ListRecallsResponse:
            recalls = []
            for recall_id, (effective, end) in windows.items():
                recall = scheduler_pb2.Recall(recall_id=recall_id, pledge_id="pl-1", count=1)
                recall.effective_time.FromDatetime(effective)
                recall.end_time.FromDatetime(end)
                recalls.append(recall)
            return scheduler_pb2.ListRecallsResponse(recalls=recalls)

    @contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(pledges_cli, "open_scheduler", open_scheduler)
    assert main(["fleet", "recall", "list", "--format", "json"]) == 0
    rows = {row["recall"]: row for row in json_rows(capsys.readouterr().out)}
    assert rows["r-scheduled"]["state"] == "scheduled"
    assert rows["r-active"]["state"] == "active"
    assert rows["r-ended"]["state"] == "ended"
    assert "freed" not in rows["r-active"]


def test_recall_list_ends_with_pledge(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Recalls stored before every recall got an end may have none, and a pledge shortened after
    # a recall may end before it. Either recall ends with its pledge.
    now = datetime.now(UTC)
    pledge = scheduler_pb2.Pledge(pledge_id="pl-old", provider_id="eu")
    pledge.window.start_time.FromDatetime(now - timedelta(days=2))
    pledge.window.end_time.FromDatetime(now - timedelta(hours=1))
    current = scheduler_pb2.Pledge(pledge_id="pl-now", provider_id="eu")
    current.window.start_time.FromDatetime(now - timedelta(days=2))
    current.window.end_time.FromDatetime(now + timedelta(days=2))
    ends = {
        "r-no-end": ("pl-old", None),
        "r-after-pledge": ("pl-old", now + timedelta(hours=1)),
        "r-running-pledge": ("pl-now", None),
        "r-unlisted-pledge": ("pl-gone", None),
    }
    requests: list[str] = []

    class Scheduler:
        def ListPledges(
            self, request: scheduler_pb2.ListPledgesRequest
        ) -> scheduler_pb2.ListPledgesResponse:
            requests.append(request.provider_id)
            return scheduler_pb2.ListPledgesResponse(pledges=[pledge, current])

        def ListRecalls(
            self, request: scheduler_pb2.ListRecallsRequest
        ) -> scheduler_pb2.ListRecallsResponse:
            recalls = []
            for recall_id, (pledge_id, end) in ends.items():
                recall = scheduler_pb2.Recall(recall_id=recall_id, pledge_id=pledge_id, count=1)
                recall.effective_time.FromDatetime(now - timedelta(days=1))
                if end is not None:
                    recall.end_time.FromDatetime(end)
                recalls.append(recall)
            return scheduler_pb2.ListRecallsResponse(recalls=recalls)

    @contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(pledges_cli, "open_scheduler", open_scheduler)
    assert main(["fleet", "recall", "list", "--provider", "eu", "--format", "json"]) == 0
    rows = {row["recall"]: row for row in json_rows(capsys.readouterr().out)}
    assert rows["r-no-end"]["state"] == "ended"
    assert rows["r-after-pledge"]["state"] == "ended"
    assert rows["r-running-pledge"]["state"] == "active"
    # A recall whose pledge is not listed ends at its own end time, which this one lacks.
    assert rows["r-unlisted-pledge"]["state"] == "active"
    assert requests == ["eu"]

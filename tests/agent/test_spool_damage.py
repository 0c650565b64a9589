"""Damaged spool segments: the spool opens with every intact record and moves the rest aside."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from acsp import subjects
from agents.outbox import Outbox
from agents.spool import Spool, SpoolRecord
from agents.spool_format import encode_record
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.test_agent_dead_letters import build_process, read_stats
from tests.agent.test_outage import poll

SEGMENT_BYTES = 200
RECORD = len(encode_record(SpoolRecord("acsp.usage.a.b.n1", "id-10", bytes(10))))
"""Size of each test record: subjects and ids of the same length, payloads of 10 bytes."""


def records(start: int, count: int) -> list[SpoolRecord]:
    return [
        SpoolRecord(f"acsp.usage.a.b.n{i % 3}", f"id-{i}", bytes([i % 256]) * 10)
        for i in range(start, start + count)
    ]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def ids(spool: Spool) -> list[int]:
    return [int(record.msg_id.removeprefix("id-")) for record in spool.peek(10_000)]


def write_spool(directory: Path, committed: int = 0) -> list[Path]:
    """Spool records 10 to 49 (four per segment), commit the first ``committed``, close."""
    spool = Spool(directory, segment_bytes=SEGMENT_BYTES)
    spool.append(records(10, 40))
    spool.commit(committed)
    spool.close()
    return segments(directory)


def ids_in(path: Path) -> list[int]:
    """Ids of the records in an intact segment file, read before damaging it."""
    # The two digits of an id follow the header (8 bytes), the subject with its length (19)
    # and the id's length and its "id-" prefix (5).
    digits = 8 + 19 + 5
    spool_ids = []
    data = path.read_bytes()
    for offset in range(0, len(data), RECORD):
        spool_ids.append(int(data[offset + digits : offset + digits + 2]))
    return spool_ids


def test_records_are_the_same_size(tmp_path: Path) -> None:
    (first, *_) = write_spool(tmp_path)
    assert first.stat().st_size == 4 * RECORD
    assert ids_in(first) == [10, 11, 12, 13]


def test_truncated_older_segment_keeps_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_spool(tmp_path)
    damaged = files[2]
    lost = ids_in(damaged)[-1]
    os.truncate(damaged, damaged.stat().st_size - 5)

    with caplog.at_level(logging.ERROR):
        spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert ids(spool) == [i for i in range(10, 50) if i != lost]
    assert spool.pending_records == 39
    assert spool.damaged_segments == 1
    assert spool.lost_bytes == RECORD
    quarantined = damaged.with_name(damaged.name + ".corrupt")
    assert quarantined.stat().st_size == 4 * RECORD - 5
    (line,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert str(damaged) in line
    assert f"{3 * RECORD}-{4 * RECORD}" in line
    assert f"{RECORD} bytes" in line


def test_flipped_bytes_lose_one_record(tmp_path: Path) -> None:
    files = write_spool(tmp_path)
    damaged = files[3]
    lost = ids_in(damaged)[1]
    data = bytearray(damaged.read_bytes())
    for offset in range(RECORD + 20, RECORD + 24):
        data[offset] ^= 0xFF
    damaged.write_bytes(bytes(data))

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert ids(spool) == [i for i in range(10, 50) if i != lost]
    assert spool.lost_bytes == RECORD
    assert damaged.with_name(damaged.name + ".corrupt").read_bytes() == bytes(data)


def test_empty_older_segment_loses_its_records(tmp_path: Path) -> None:
    files = write_spool(tmp_path)
    damaged = files[1]
    lost = ids_in(damaged)
    os.truncate(damaged, 0)

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert ids(spool) == [i for i in range(10, 50) if i not in lost]
    assert spool.lost_bytes == 4 * RECORD
    assert damaged.with_name(damaged.name + ".corrupt").stat().st_size == 0


def test_random_bytes_segment_loses_its_records(tmp_path: Path) -> None:
    files = write_spool(tmp_path)
    damaged = files[4]
    lost = ids_in(damaged)
    damaged.write_bytes(random.Random(7).randbytes(3000))

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert ids(spool) == [i for i in range(10, 50) if i not in lost]
    # The range between this segment's offset and the next one's, and the bytes past it.
    assert spool.lost_bytes == 3000
    assert damaged.stat().st_size == 4 * RECORD


@pytest.mark.timeout(10)
def test_large_random_segment_is_searched_quickly(tmp_path: Path) -> None:
    files = write_spool(tmp_path)
    damaged = files[0]
    damaged.write_bytes(random.Random(8).randbytes(8 << 20))

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert ids(spool) == list(range(14, 50))


def test_unnamed_segment_file_is_moved_aside(tmp_path: Path) -> None:
    write_spool(tmp_path)
    stray = tmp_path / "copy.seg"
    stray.write_bytes(b"junk")

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert ids(spool) == list(range(10, 50))
    assert not stray.exists()
    assert (tmp_path / "copy.seg.corrupt").read_bytes() == b"junk"
    assert spool.damaged_segments == 1


def test_damage_in_last_segment_keeps_later_records(tmp_path: Path) -> None:
    files = write_spool(tmp_path)
    damaged = files[-1]
    lost = ids_in(damaged)[0]
    data = bytearray(damaged.read_bytes())
    data[30] ^= 0x01
    damaged.write_bytes(bytes(data))

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)
    spool.append(records(50, 2))

    assert ids(spool) == [i for i in range(10, 52) if i != lost]


def test_repair_sends_no_record_again(tmp_path: Path) -> None:
    # The head sits inside the damaged segment, after records that were acknowledged.
    files = write_spool(tmp_path, committed=9)
    damaged = files[0]  # The two before it held acknowledged records only and are deleted.
    assert ids_in(damaged) == [18, 19, 20, 21]
    data = bytearray(damaged.read_bytes())
    data[2 * RECORD + 12] ^= 0xFF  # Record 20.
    damaged.write_bytes(bytes(data))

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)
    assert ids(spool) == [19, *range(21, 50)]
    spool.commit(2)
    assert ids(spool) == list(range(22, 50))
    spool.close()

    reopened = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)
    assert ids(reopened) == list(range(22, 50))
    assert reopened.damaged_segments == 0
    reopened.commit(reopened.pending_records)
    reopened.close()
    assert Spool(tmp_path, segment_bytes=SEGMENT_BYTES).pending_records == 0


def test_repaired_spool_reopens_without_damage(tmp_path: Path) -> None:
    files = write_spool(tmp_path)
    os.truncate(files[1], 7)
    os.truncate(files[3], 0)
    first = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)
    expected = ids(first)
    first.close()

    second = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert second.damaged_segments == 0
    assert ids(second) == expected
    assert len(list(tmp_path.glob("*.corrupt"))) == 2


def test_damage_after_open_is_repaired(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Opened with records pending, the spool reads them from disk, not from memory.
    files = write_spool(tmp_path)
    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)
    assert ids(spool)[:2] == [10, 11]
    spool.commit(2)
    lost = ids_in(files[5])
    os.truncate(files[5], 0)
    last = ids_in(files[-1])[1]
    data = bytearray(files[-1].read_bytes())
    data[RECORD + 12] ^= 0xFF
    files[-1].write_bytes(bytes(data))

    with caplog.at_level(logging.ERROR):
        found = ids(spool)
    spool.append(records(50, 1))

    assert found == [i for i in range(12, 50) if i not in lost and i != last]
    assert spool.pending_records == len(found) + 1
    assert spool.damaged_segments == 2
    assert spool.lost_bytes == 5 * RECORD
    assert ids(spool)[-1] == 50
    assert len([r for r in caplog.records if "is damaged" in r.getMessage()]) == 2
    spool.commit(spool.pending_records)
    spool.close()
    assert Spool(tmp_path, segment_bytes=SEGMENT_BYTES).pending_records == 0


def test_outbox_counts_spool_damage(tmp_path: Path) -> None:
    files = write_spool(tmp_path)
    os.truncate(files[1], 0)

    outbox = Outbox(Spool(tmp_path, segment_bytes=SEGMENT_BYTES))

    assert outbox.counters.spool_damaged_segments == 1
    assert outbox.counters.spool_lost_bytes == 4 * RECORD
    assert outbox.pending == 36


def packed_head(offset: int) -> bytes:
    """Return the bytes of a head file with ``offset`` and a valid checksum."""
    packed = struct.pack(">Q", offset)
    return packed + struct.pack(">I", zlib.crc32(packed))


def flipped(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


DAMAGED_HEADS = {
    "empty": lambda head: b"",
    "truncated": lambda head: head[:5],
    "too long": lambda head: head + b"\0",
    "flipped offset": lambda head: flipped(head, 7),
    "flipped checksum": lambda head: flipped(head, 11),
    "zeros": lambda head: bytes(12),
    "past the end": lambda head: packed_head(10**6),
}


@pytest.mark.parametrize("damage", DAMAGED_HEADS.values(), ids=DAMAGED_HEADS.keys())
def test_damaged_head_reads_from_oldest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[bytes], bytes]
) -> None:
    # Committing ten records deletes the first two segments, records 10 to 17.
    files = write_spool(tmp_path, committed=10)
    assert files[0].name == f"{8 * RECORD:020d}.seg"
    head = tmp_path / "head"
    damaged = damage(head.read_bytes())
    head.write_bytes(damaged)

    with caplog.at_level(logging.ERROR):
        spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    # Records 18 and 19 were acknowledged and are read again, with their message ids.
    assert ids(spool) == list(range(18, 50))
    assert spool.pending_records == 32
    assert spool.damaged_heads == 1
    assert spool.damaged_segments == 0
    assert not head.exists()
    assert (tmp_path / "head.corrupt").read_bytes() == damaged
    (line,) = [r.getMessage() for r in caplog.records if "head file" in r.getMessage()]
    assert str(head) in line
    assert "published again" in line

    spool.commit(5)
    spool.close()
    reopened = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)
    assert ids(reopened) == list(range(23, 50))
    assert reopened.damaged_heads == 0


def test_second_damaged_head_kept_apart(tmp_path: Path) -> None:
    write_spool(tmp_path, committed=10)
    head = tmp_path / "head"
    head.write_bytes(b"first")
    Spool(tmp_path, segment_bytes=SEGMENT_BYTES).close()
    head.write_bytes(b"second")

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)

    assert spool.damaged_heads == 1
    assert (tmp_path / "head.corrupt").read_bytes() == b"first"
    assert (tmp_path / "head.corrupt.1").read_bytes() == b"second"


def test_damaged_head_appends_after_tail(tmp_path: Path) -> None:
    write_spool(tmp_path, committed=40)
    (tmp_path / "head").write_bytes(packed_head(10**6))

    spool = Spool(tmp_path, segment_bytes=SEGMENT_BYTES)
    spool.append(records(50, 2))

    # Only the last segment, records 46 to 49, is left after everything was acknowledged.
    assert ids(spool) == [46, 47, 48, 49, 50, 51]
    spool.close()
    assert ids(Spool(tmp_path, segment_bytes=SEGMENT_BYTES)) == [46, 47, 48, 49, 50, 51]


def test_outbox_counts_damaged_head(tmp_path: Path) -> None:
    write_spool(tmp_path, committed=10)
    (tmp_path / "head").write_bytes(b"")

    outbox = Outbox(Spool(tmp_path, segment_bytes=SEGMENT_BYTES))

    assert outbox.counters.spool_damaged_heads == 1
    assert outbox.pending == 32


@pytest.mark.timeout(120)
async def test_agent_publishes_intact_records_once(tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    spool = Spool(state_dir / "spool", segment_bytes=SEGMENT_BYTES)
    spool.append(
        [SpoolRecord("acsp.usage.acme.eu-1.n1", f"damaged-{i:02d}", b"x") for i in range(40)]
    )
    spool.commit(3)
    spool.close()
    files = segments(state_dir / "spool")
    os.truncate(files[1], 0)
    data = bytearray(files[3].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[3].write_bytes(bytes(data))

    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    process = build_process(state_dir, server.url)
    stop = asyncio.Event()
    agent = asyncio.create_task(process.run(stop))
    try:
        await asyncio.wait_for(process.started.wait(), 30)
        await poll(lambda: process.connected, 10, "the agent to connect")
        # Records are 46 bytes, four to a segment. Segment 1 (records 4 to 7) is empty, and
        # the flipped byte is the first of record 14.
        expected = [f"damaged-{i:02d}" for i in (3, *range(8, 14), *range(15, 40))]
        await poll(
            lambda: read_stats(state_dir).get("outbox", {}).get("published", 0) >= len(expected),
            30,
            "the intact spooled records published",
        )
        message_ids = await _usage_message_ids(server.url)
    finally:
        stop.set()
        await asyncio.wait_for(agent, 30)
        server.stop()

    assert [i for i in message_ids if i.startswith("damaged-")] == expected
    assert read_stats(state_dir)["outbox"]["spool_damaged_segments"] == 2


@pytest.mark.timeout(120)
async def test_agent_runs_on_damaged_head(tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    spool = Spool(state_dir / "spool", segment_bytes=SEGMENT_BYTES)
    spooled = [SpoolRecord("acsp.usage.acme.eu-1.n1", f"head-{i:02d}", b"x") for i in range(8)]
    spool.append(spooled)
    spool.commit(3)
    spool.close()
    (state_dir / "spool" / "head").write_bytes(b"\0" * 12)

    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    # The three committed records reached JetStream before the head was damaged.
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        for record in spooled[:3]:
            await js.publish(record.subject, record.payload, headers={"Nats-Msg-Id": record.msg_id})
    finally:
        await client.close()
    process = build_process(state_dir, server.url)
    stop = asyncio.Event()
    agent = asyncio.create_task(process.run(stop))
    try:
        await asyncio.wait_for(process.started.wait(), 30)
        await poll(
            lambda: read_stats(state_dir).get("outbox", {}).get("published", 0) >= 8,
            30,
            "the spooled records published again",
        )
        message_ids = await _usage_message_ids(server.url)
    finally:
        stop.set()
        await asyncio.wait_for(agent, 30)
        server.stop()

    # JetStream drops the three published again, because they keep their message ids.
    assert [i for i in message_ids if i.startswith("head-")] == [r.msg_id for r in spooled]
    assert read_stats(state_dir)["outbox"]["spool_damaged_heads"] == 1
    assert (state_dir / "spool" / "head.corrupt").exists()


async def _usage_message_ids(url: str) -> list[str]:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        info = await js.stream_info(subjects.USAGE_STREAM)
        found = []
        for sequence in range(1, info.state.last_seq + 1):
            message = await js.get_msg(subjects.USAGE_STREAM, sequence)
            found.append((message.headers or {}).get("Nats-Msg-Id", ""))
        return found
    finally:
        await client.close()

"""The on-disk spool: order, durability across reopen, torn tails, the full policy."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from agents.outbox import Outbox
from agents.spool import REJECTIONS_FILE_NAME, RejectionCount, Spool, SpoolRecord


def records(start: int, count: int, size: int = 10) -> list[SpoolRecord]:
    return [
        SpoolRecord(f"acsp.usage.a.b.n{i % 3}", f"id-{i}", bytes([i % 256]) * size)
        for i in range(start, start + count)
    ]


def test_spool_returns_records_in_append_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.append(records(0, 5)) == 5
    assert spool.append(records(5, 5)) == 5
    assert [r.msg_id for r in spool.peek(100)] == [f"id-{i}" for i in range(10)]
    spool.commit(4)
    assert [r.msg_id for r in spool.peek(3)] == ["id-4", "id-5", "id-6"]
    assert spool.pending_records == 6


def test_spool_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=200)
    spool.append(records(0, 30))
    spool.commit(7)
    spool.close()
    reopened = Spool(tmp_path, segment_bytes=200)
    assert reopened.pending_records == 23
    assert [r.msg_id for r in reopened.peek(100)] == [f"id-{i}" for i in range(7, 30)]
    assert reopened.peek(1)[0].payload == bytes([7]) * 10


def test_spool_deletes_consumed_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=200)
    spool.append(records(0, 40))
    segments_before = len(list(tmp_path.glob("*.seg")))
    spool.commit(35)
    assert segments_before > 3
    assert len(list(tmp_path.glob("*.seg"))) < segments_before


def test_spool_cuts_torn_tail_on_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(records(0, 3))
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    with open(segment, "ab") as file:
        file.write(b"\x00\x00\x00\x40garbage")
    reopened = Spool(tmp_path)
    assert reopened.pending_records == 3
    reopened.append(records(3, 1))
    assert [r.msg_id for r in reopened.peek(10)] == ["id-0", "id-1", "id-2", "id-3"]


def test_full_spool_rejects_newest_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=500)
    accepted = spool.append(records(0, 100))
    assert 0 < accepted < 100
    assert spool.dropped == 100 - accepted
    assert spool.pending_bytes <= 500
    assert [r.msg_id for r in spool.peek(1000)] == [f"id-{i}" for i in range(accepted)]
    spool.commit(accepted)
    assert spool.append(records(100, 1)) == 1


def test_outbox_counts_dropped_messages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(Spool(tmp_path, max_bytes=300))
    for record in records(0, 50):
        outbox.add(record.subject, record.msg_id, record.payload)
    outbox.flush_to_spool()
    assert outbox.counters.dropped > 0
    assert outbox.counters.spooled + outbox.counters.dropped == 50
    assert any("spool is full" in r.getMessage() for r in caplog.records)


def test_commit_more_than_pending_is_an_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(records(0, 2))
    with pytest.raises(ValueError, match="only 2 are pending"):
        spool.commit(3)


def test_spool_order_holds_across_its_memory_limit(tmp_path: Path) -> None:
    # Past 8,192 pending records the spool reads them back from disk. Once empty, it keeps
    # new ones in memory again. Both ways return the same records in the same order.
    spool = Spool(tmp_path)
    spool.append(records(0, 100))
    spool.commit(40)
    assert [r.msg_id for r in spool.peek(2)] == ["id-40", "id-41"]
    spool.append(records(100, 9000))
    spool.commit(60)
    assert [r.msg_id for r in spool.peek(2)] == ["id-100", "id-101"]
    assert spool.peek(1)[0].payload == bytes([100]) * 10
    spool.commit(spool.pending_records - 1)
    assert [r.msg_id for r in spool.peek(5)] == ["id-9099"]
    spool.commit(1)
    spool.append(records(9100, 3))
    assert [r.msg_id for r in spool.peek(5)] == ["id-9100", "id-9101", "id-9102"]
    spool.commit(2)
    spool.close()
    reopened = Spool(tmp_path)
    assert [r.msg_id for r in reopened.peek(5)] == ["id-9102"]


def test_rejection_counts_survive_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(records(0, 3))
    counts = {"id-1": RejectionCount(2, 1_700_000_000.5, "over max_msg_size")}
    spool.save_rejections(counts)
    spool.close()

    reopened = Spool(tmp_path)

    assert reopened.load_rejections() == counts
    assert [r.msg_id for r in reopened.peek(5)] == ["id-0", "id-1", "id-2"]


def test_rejection_counts_replaced_on_save(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.save_rejections({"id-1": RejectionCount(1, 1.0, "first")})
    spool.save_rejections({"id-2": RejectionCount(3, 2.0, "second")})

    assert spool.load_rejections() == {"id-2": RejectionCount(3, 2.0, "second")}


def test_damaged_rejection_counts_start_from_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents.spool")
    spool = Spool(tmp_path)
    (tmp_path / REJECTIONS_FILE_NAME).write_text('{"id-1": {"count": 2}}')

    assert spool.load_rejections() == {}
    assert any("rejections are counted from zero" in r.getMessage() for r in caplog.records)


def test_outbox_loads_counts_of_spooled_messages(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append(records(0, 2))
    spool.save_rejections(
        {
            "id-1": RejectionCount(4, time.time(), "over max_msg_size"),
            "gone": RejectionCount(4, time.time(), "moved to the dead letters"),
        }
    )

    outbox = Outbox(spool)
    # Counts leave the file only on its next save, so a restart finds those of gone messages.
    assert set(outbox._rejections) == {"id-1"}
    assert outbox._rejections["id-1"].count == 4

"""A spool on a full disk: a failed append leaves nothing behind, and the outbox keeps the batch."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from agents.outbox import Outbox
from agents.spool import Spool
from tests.agent.test_runner import wait_for
from tests.agent.test_spool import records


def _no_space(*_args: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


class _HalfWriter(io.BufferedWriter):
    """Writes half of the first frame to the file, then fails as a full disk does."""

    def write(self, data: Any) -> int:
        super().write(bytes(data)[: len(data) // 2])
        super().flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_fsync_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    spool.append(records(0, 3))
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OSError, match="No space"):
        spool.append(records(3, 2))
    monkeypatch.undo()
    assert spool.pending_records == 3
    assert spool.append(records(5, 2)) == 2
    assert [r.msg_id for r in spool.peek(100)] == ["id-0", "id-1", "id-2", "id-5", "id-6"]
    spool.close()
    reopened = Spool(tmp_path)
    assert [r.msg_id for r in reopened.peek(100)] == ["id-0", "id-1", "id-2", "id-5", "id-6"]


def test_torn_write_keeps_later_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=200)
    spool.append(records(0, 3))
    writer = spool._writer
    assert writer is not None
    spool._writer = _HalfWriter(io.FileIO(writer.name, "ab"))
    writer.close()
    with pytest.raises(OSError, match="No space"):
        spool.append(records(3, 2))
    assert spool.append(records(5, 30)) == 30
    expected = [f"id-{i}" for i in (0, 1, 2, *range(5, 35))]
    assert [r.msg_id for r in spool.peek(100)] == expected
    spool.close()
    assert [r.msg_id for r in Spool(tmp_path, segment_bytes=200).peek(100)] == expected


def test_failed_rotation_removes_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, segment_bytes=100)
    spool.append(records(0, 1))
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OSError, match="No space"):
        spool.append(records(1, 10))
    monkeypatch.undo()
    assert len(list(tmp_path.glob("*.seg"))) == 1
    assert spool.append(records(11, 1)) == 1
    spool.close()
    assert [r.msg_id for r in Spool(tmp_path, segment_bytes=100).peek(100)] == ["id-0", "id-11"]


def test_outbox_keeps_batch_on_disk_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = Outbox(Spool(tmp_path))
    spooled: list[int] = []
    for record in records(0, 3):
        outbox.add(record.subject, record.msg_id, record.payload)
    outbox.call_when_spooled(lambda: spooled.append(1))
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OSError, match="No space"):
        outbox.flush_to_spool()
    assert outbox.pending == 3
    assert spooled == []
    monkeypatch.undo()
    outbox.flush_to_spool()
    assert spooled == [1]
    assert [r.msg_id for r in outbox._spool.peek(10)] == ["id-0", "id-1", "id-2"]


async def test_outbox_runs_through_disk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    outbox = Outbox(spool, retry_s=0.01)
    monkeypatch.setattr(os, "fsync", _no_space)
    for record in records(0, 2):
        outbox.add(record.subject, record.msg_id, record.payload)
    with caplog.at_level(logging.INFO, logger="agents.outbox"):
        runner = asyncio.create_task(outbox.run(lambda: None))
        await wait_for(lambda: outbox.counters.spool_errors >= 3, timeout_s=5)
        monkeypatch.undo()
        await wait_for(lambda: spool.pending_records == 2, timeout_s=5)
        outbox.close()
        await asyncio.wait_for(runner, 5)
    errors = [r for r in caplog.records if "writing to the spool" in r.getMessage()]
    assert len(errors) == 2, "one error line, then one line when it works again"
    assert "free disk space" in errors[0].getMessage()
    assert "works again" in errors[1].getMessage()

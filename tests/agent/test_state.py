"""The agent's state file: sequence numbers and tasks across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.state import SEQUENCE_BLOCK, StateStore, TaskRecord

KEY = "acme.eu-1.node-1"


def test_sequence_continues_after_reserved_block_on_restart(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    first = [state.next_sequence(KEY) for _ in range(5)]
    assert first == [1, 2, 3, 4, 5]
    state.flush()
    restarted = StateStore(tmp_path / "state.json")
    assert restarted.next_sequence(KEY) == SEQUENCE_BLOCK + 1


def test_unflushed_reservation_is_not_on_disk(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    state.save()
    state.next_sequence(KEY)
    assert StateStore(tmp_path / "state.json").node(KEY).sequence_reserved == 0


def test_tasks_round_trip(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    record = TaskRecord("j", "j/1/0", ["GPU-1"], 10.0, 60.0, 5.0, pid=1234, process_start_ticks=99)
    state.put_task(KEY, record)
    assert StateStore(tmp_path / "state.json").node(KEY).tasks == {"j/1/0": record}


def test_unknown_format_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 99, "nodes": {}}')
    with pytest.raises(ValueError, match="format version 99"):
        StateStore(path)


def test_save_before_spool_writes_only_after_a_new_block(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    state.next_sequence(KEY)
    state.save_before_spool()
    assert StateStore(tmp_path / "state.json").node(KEY).sequence_reserved == SEQUENCE_BLOCK
    modified = (tmp_path / "state.json").stat().st_mtime_ns
    state.next_sequence(KEY)
    state.save_before_spool()
    assert (tmp_path / "state.json").stat().st_mtime_ns == modified

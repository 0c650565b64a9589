"""The agent's state file: sequence numbers and tasks across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agents.state import SEQUENCE_BLOCK, StateFileError, StateStore, TaskRecord

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


def test_surrogate_paths_round_trip(tmp_path: Path) -> None:
    # A log folder named with bytes that are not UTF-8, decoded with surrogateescape.
    log_path = "/scratch/\udcff/j.log"
    state = StateStore(tmp_path / "state.json")
    record = TaskRecord("j", "j/1/0", ["GPU-1"], 10.0, 60.0, 5.0, pid=12, log_path=log_path)
    state.put_intent(KEY, record)
    state.save_intents()
    state.put_task(KEY, record)
    state.end_task(KEY, "j/1/0", 20.0)
    state.save()

    reloaded = StateStore(tmp_path / "state.json").node(KEY)
    assert reloaded.intents["j/1/0"].log_path == log_path
    assert reloaded.ended["j/1/0"].log_path == log_path


def test_unknown_format_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 99, "nodes": {}}')
    with pytest.raises(ValueError, match="format version 99"):
        StateStore(path)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"version": 1, "nodes": {"a', r"invalid JSON"),
        ("", r"invalid JSON"),
        ("[]", r"not a JSON object"),
        ('{"version": 1, "nodes": []}', r"AttributeError"),
        ('{"version": 1, "nodes": {"n": {"tasks": [{"job_id": "j"}]}}}', r"KeyError: 'task_id'"),
        ('{"version": 1, "nodes": {"n": {"sequence_reserved": "many"}}}', r"ValueError"),
    ],
)
def test_damaged_state_file_rejected(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(StateFileError, match=rf"^state file {path}: damaged \({reason}.*fix: "):
        StateStore(path)
    assert path.read_text() == text


def test_damaged_intents_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    intents = tmp_path / "state.json.intents"
    intents.write_text('{"version": 1, "sequence": 3, "nodes": {"n": [{"task_id": "t"}]}}')
    with pytest.raises(StateFileError, match=r"state\.json\.intents: damaged \(TypeError"):
        StateStore(path)
    assert not path.exists()


def test_unreadable_state_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()
    with pytest.raises(StateFileError, match=r"cannot be read: Is a directory; fix: "):
        StateStore(path)


def test_sample_series_survives_restart(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    sequence = state.next_sequence(KEY)
    first = state.sample_id(KEY, sequence)
    state.save_before_spool()
    assert StateStore(tmp_path / "state.json").sample_id(KEY, sequence) == first
    assert first.startswith(f"{KEY}/")
    assert first.endswith(f"/{sequence}")


def test_fresh_state_has_new_series(tmp_path: Path) -> None:
    first = StateStore(tmp_path / "a" / "state.json")
    second = StateStore(tmp_path / "b" / "state.json")
    assert first.sample_id(KEY, 1) != second.sample_id(KEY, 1)


def test_state_without_series_keeps_old_ids(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(f'{{"version": 1, "nodes": {{"{KEY}": {{"sequence_reserved": 10000}}}}}}')
    state = StateStore(path)
    assert state.sample_id(KEY, state.next_sequence(KEY)) == f"{KEY}/10001"


def test_save_before_spool_writes_only_after_a_new_block(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    state.next_sequence(KEY)
    state.save_before_spool()
    assert StateStore(tmp_path / "state.json").node(KEY).sequence_reserved == SEQUENCE_BLOCK
    modified = (tmp_path / "state.json").stat().st_mtime_ns
    state.next_sequence(KEY)
    state.save_before_spool()
    assert (tmp_path / "state.json").stat().st_mtime_ns == modified


async def test_durable_changes_written_at_turn_end(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateStore(path)
    state.save()
    saved = path.stat().st_ino
    for index in range(3):
        record = TaskRecord("j", f"j/1/{index}", [f"GPU-{index}"], 10.0, 60.0, 5.0, pid=100 + index)
        state.put_task(KEY, record)
    # Still this turn: nothing written yet, and each save replaces the file (a new inode).
    assert path.stat().st_ino == saved
    await asyncio.sleep(0)
    assert path.stat().st_ino != saved
    assert set(StateStore(path).node(KEY).tasks) == {"j/1/0", "j/1/1", "j/1/2"}


async def test_durable_change_is_written_before_spool(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateStore(path)
    state.put_task(KEY, TaskRecord("j", "j/1/0", ["GPU-1"], 10.0, 60.0, 5.0, pid=1234))
    state.save_before_spool()
    assert set(StateStore(path).node(KEY).tasks) == {"j/1/0"}


def _intent(task_id: str) -> TaskRecord:
    return TaskRecord("job", task_id, ["GPU-0"], 1.0, 0.0, 30.0, spawn_id=f"spawn-{task_id}")


def test_intents_newer_than_state_are_loaded(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save()
    store.put_intent("n", _intent("a/1/0"))
    store.save_intents()
    loaded = StateStore(tmp_path / "state.json").node("n")
    assert list(loaded.intents) == ["a/1/0"]
    assert loaded.intents["a/1/0"].spawn_id == "spawn-a/1/0"


def test_intents_covered_by_state_save_are_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.put_intent("n", _intent("a/1/0"))
    store.save_intents()
    store.remove_intent("n", "a/1/0")
    store.save()
    assert (tmp_path / "state.json.intents").exists()
    assert StateStore(tmp_path / "state.json").node("n").intents == {}


def test_unchanged_intents_are_written_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    record = _intent("a/1/0")
    store.put_intent("n", record)
    store.save_intents()
    written = (tmp_path / "state.json.intents").stat().st_mtime_ns
    store.put_intent("n", record)
    store.save_intents()
    assert (tmp_path / "state.json.intents").stat().st_mtime_ns == written


def test_ended_journal_reload_and_prune(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateStore(path)
    record = TaskRecord("j", "j/1/0", ["GPU-0"], 100.0, 60.0, 30.0, pid=4242)
    state.put_task("acme.eu-1.n1", record)
    state.end_task("acme.eu-1.n1", "j/1/0", 130.0)
    # A crash can cut the last line short; the lines before it still load.
    with open(path.with_suffix(".json.ended"), "a", encoding="utf-8") as journal:
        journal.write('{"task_id": "cut')

    reloaded = StateStore(path)
    node = reloaded.node("acme.eu-1.n1")
    assert node.tasks == {}
    assert list(node.ended) == ["j/1/0"]
    assert node.ended["j/1/0"].ended_at == 130.0
    assert node.ended["j/1/0"].accelerators == ["GPU-0"]

    reloaded.put_task("acme.eu-1.n1", TaskRecord("k", "k/1/0", ["GPU-1"], 120.0, 60.0, 30.0, pid=7))
    reloaded.end_task("acme.eu-1.n1", "k/1/0", 140.0)
    reloaded.prune_ended("acme.eu-1.n1", 129.0)
    reloaded.save()
    assert list(StateStore(path).node("acme.eu-1.n1").ended) == ["j/1/0", "k/1/0"]
    reloaded.prune_ended("acme.eu-1.n1", 140.0)
    reloaded.save()
    assert StateStore(path).node("acme.eu-1.n1").ended == {}


def test_journal_line_with_bad_bytes_skipped(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    for task_id in ("j/1/0", "j/2/0"):
        state.put_task(KEY, TaskRecord("j", task_id, ["GPU-1"], 10.0, 60.0, 5.0, pid=1))
        state.end_task(KEY, task_id, 20.0)
    state.save()
    journal = tmp_path / "state.json.ended"
    first, second = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(first[:10] + b"\xff\xfe" + first[12:] + second)
    reloaded = StateStore(tmp_path / "state.json")
    assert sorted(reloaded.node(KEY).ended) == ["j/2/0"]

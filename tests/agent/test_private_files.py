"""The modes of the agent's own files, which other users of the machine must not read."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agents.dead_letters import DEAD_LETTERS_FILE_NAME, DeadLetter, DeadLetters
from agents.private_files import restrict_modes
from agents.spool import RejectionCount, Spool, SpoolRecord
from agents.state import StateFileError, StateStore, TaskRecord
from agents.state_lock import StateFolderLock, write_pid_file

KEY = "acme.eu-1.node-1"


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Clear the umask, so that each file gets exactly the mode that it is created with."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def spool_records(count: int) -> list[SpoolRecord]:
    return [SpoolRecord("acsp.usage.a.b.n1", f"id-{i}", bytes(40)) for i in range(count)]


def write_every_file(folder: Path) -> None:
    """Write each file that an agent keeps in its state folder, outside the task folders."""
    state = StateStore(folder / "state.json")
    record = TaskRecord("j", "j/1/0", ["GPU-0"], 100.0, 60.0, 30.0, pid=4242)
    state.put_intent(KEY, record)
    state.save_intents()
    state.put_task(KEY, record)
    state.end_task(KEY, "j/1/0", 130.0)
    state.save()
    spool = Spool(folder / "spool", segment_bytes=200)
    spool.append(spool_records(10))
    spool.commit(1)
    spool.save_rejections({"id-1": RejectionCount(1, 0.0, "message too large")})
    spool.close()
    letter = DeadLetter("id-0", "acsp.usage.a.b.n1", b"payload", "too large", 5, datetime.now(UTC))
    DeadLetters(folder / DEAD_LETTERS_FILE_NAME).append([letter])
    StateFolderLock.acquire(folder).release()
    write_pid_file(folder)


def test_agent_files_created_private(tmp_path: Path, no_umask: None) -> None:
    write_every_file(tmp_path)

    names = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")}
    for name in (
        "state.json",
        "state.json.intents",
        "state.json.ended",
        "spool/head",
        "spool/rejections.json",
        DEAD_LETTERS_FILE_NAME,
        "agent.lock",
        "agent.pid",
    ):
        assert name in names
    assert len(list((tmp_path / "spool").glob("*.seg"))) > 1
    assert mode_of(tmp_path / "spool") == 0o700
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert mode_of(path) == 0o600, path


def test_repaired_segment_stays_private(tmp_path: Path, no_umask: None) -> None:
    spool = Spool(tmp_path, segment_bytes=200)
    spool.append(spool_records(10))
    spool.close()
    first = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[20:30] = b"\xff" * 10
    first.write_bytes(bytes(data))
    first.chmod(0o600)

    repaired = Spool(tmp_path, segment_bytes=200)
    repaired.close()

    assert repaired.damaged_segments == 1
    assert [path.name for path in tmp_path.glob("*.corrupt")] == [f"{first.name}.corrupt"]
    for path in tmp_path.iterdir():
        assert mode_of(path) == 0o600, path


def test_restrict_modes_narrows_earlier_files(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    state_file.write_text("{}")
    state_file.chmod(0o644)
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o755)
    private = tmp_path / "agent.lock"
    private.write_text("")
    private.chmod(0o600)
    outside = tmp_path / "outside"
    outside.write_text("")
    outside.chmod(0o644)
    link = tmp_path / "dead_letters.jsonl"
    link.symlink_to(outside)

    changed = restrict_modes([state_file, spool, private, link, tmp_path / "missing"])

    assert changed == [state_file, spool]
    assert mode_of(state_file) == 0o600
    assert mode_of(spool) == 0o700
    assert mode_of(private) == 0o600
    assert mode_of(outside) == 0o644


@pytest.fixture
def traversable_folder() -> Iterator[Path]:
    """A folder that every user may pass through, as the state folder of a root mesh's fleet."""
    folder = Path(tempfile.mkdtemp(prefix="acsp-state-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read as another user")
def test_other_user_told_whose_file(traversable_folder: Path) -> None:
    # `acsp agent tasks` run by another user than the agent's cannot read its 0600 files, so
    # the error names the user to run it as, not a change of the agent's access.
    path = traversable_folder / "state.json"
    state = StateStore(path)
    state.put_task(KEY, TaskRecord("j", "j/1/0", ["GPU-0"], 100.0, 60.0, 30.0, pid=4242))
    state.save()
    os.seteuid(65534)
    try:
        with pytest.raises(StateFileError) as raised:
            StateStore(path)
    finally:
        os.seteuid(0)

    assert raised.value.reason == "cannot be read: Permission denied"
    assert raised.value.fix == "run this as the agent's user (uid 0) or as root"

"""The sweep of one user's entries from scratch folders, on temporary folder trees.

The trees give entries to other uids with ``os.chown``, which needs root, so most tests are
skipped otherwise. They call :func:`sweep` in the test's own thread, as root, so that what
they check is the walk's own rules; :func:`sweep_as` adds the user's access on top.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents import scratch_sweep
from agents.scratch_sweep import (
    MAX_DEPTH,
    MAX_REPORTED_FAILURES,
    MOVED_FOLDER_PREFIX,
    read_mount_points,
    sweep,
    sweep_as,
)

pytestmark = pytest.mark.timeout(60)

USER = 64110
OTHER = 64111
GROUP = 65534

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to other uids needs root")


def _make(path: Path, uid: int, text: str = "x") -> Path:
    path.write_text(text)
    os.chown(path, uid, GROUP)
    return path


def _folder(path: Path, uid: int, mode: int = 0o755) -> Path:
    path.mkdir()
    os.chown(path, uid, GROUP)
    path.chmod(mode)
    return path


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder like /tmp, world-writable with the sticky bit, that other users can reach,
    unlike pytest's temporary folders."""
    folder = Path(tempfile.mkdtemp(prefix="acsp-scratch-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


@root_only
def test_sweep_removes_nested_tree(scratch: Path) -> None:
    _make(scratch / "nccl-shm", USER, "12345")
    top = _folder(scratch / "run", USER)
    inner = _folder(top / "inner", USER, 0o700)
    _make(inner / "data", USER, "abc")
    os.mkfifo(inner / "pipe")
    os.chown(inner / "pipe", USER, GROUP)

    report = sweep([str(scratch)], USER, frozenset())

    assert sorted(os.listdir(scratch)) == []
    assert report.files == 3
    assert report.folders == 2
    assert report.bytes == 8
    assert report.failure_count == 0
    # The scratch folder itself stays, with its mode.
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o1777


@root_only
def test_sweep_leaves_other_users_files(scratch: Path) -> None:
    _make(scratch / "theirs", OTHER)
    _make(scratch / "roots", 0)
    shared = _folder(scratch / "shared", OTHER, 0o777)
    _make(shared / "mine", USER)
    _make(shared / "theirs", OTHER)
    # The user's own folder that another user wrote into.
    own = _folder(scratch / "own", USER, 0o777)
    _make(own / "visitor", OTHER)
    _make(own / "mine", USER)

    report = sweep([str(scratch)], USER, frozenset())

    assert sorted(os.listdir(scratch)) == ["own", "roots", "shared", "theirs"]
    assert os.listdir(shared) == ["theirs"]
    assert os.listdir(own) == ["visitor"]
    assert (own / "visitor").stat().st_uid == OTHER
    assert report.files == 2
    # The user's folder stays, so the user stays dirty until the visitor's file is gone.
    assert report.failure_count == 1
    assert report.failures[0][0] == str(own)
    assert "not empty" in report.failures[0][1]


@root_only
def test_sweep_never_follows_links(scratch: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = _make(outside / "precious", USER)
    target_folder = _folder(outside / "folder", USER)
    _make(target_folder / "kept", USER)
    # A link of the user's to a file and to a folder of its own outside the scratch folder,
    # and another user's link to the same folder.
    os.symlink(target, scratch / "file-link")
    os.lchown(scratch / "file-link", USER, GROUP)
    os.symlink(target_folder, scratch / "folder-link")
    os.lchown(scratch / "folder-link", USER, GROUP)
    os.symlink(target_folder, scratch / "their-link")
    os.lchown(scratch / "their-link", OTHER, GROUP)

    report = sweep([str(scratch)], USER, frozenset())

    assert os.listdir(scratch) == ["their-link"]
    assert target.exists()
    assert (target_folder / "kept").exists()
    assert report.files == 2
    assert report.failure_count == 0


@root_only
def test_sweep_skips_mount_points(scratch: Path) -> None:
    mounted = _folder(scratch / "mounted", USER)
    _make(mounted / "inside", USER)

    report = sweep([str(scratch)], USER, frozenset({str(mounted)}))

    assert (mounted / "inside").exists()
    assert report.files == 0
    assert report.folders == 0
    assert report.failure_count == 0


@root_only
def test_sweep_opens_locked_own_folder(scratch: Path) -> None:
    locked = _folder(scratch / "locked", USER, 0o755)
    _make(locked / "inside", USER)
    locked.chmod(0)

    report = sweep([str(scratch)], USER, frozenset())

    assert not locked.exists()
    assert report.files == 1
    assert report.folders == 1


def _chain(top: Path, levels: int, uid: int, mode: int = 0o755) -> list[Path]:
    """Make ``levels`` nested folders of ``uid`` below ``top``, each with a file; return them."""
    folders = []
    folder = top
    for _ in range(levels):
        folder = _folder(folder / "d", uid, mode)
        _make(folder / "f", uid)
        folders.append(folder)
    return folders


@root_only
def test_sweep_removes_too_deep_tree(scratch: Path) -> None:
    # Deep enough that the folder moved up is itself too deep and moves again.
    levels = 2 * MAX_DEPTH + 5
    _chain(scratch, levels, USER)

    report = sweep([str(scratch)], USER, frozenset())

    assert os.listdir(scratch) == []
    assert report.failures == []
    assert report.moved == 2
    assert report.folders == levels
    assert report.files == levels


@root_only
def test_sweep_as_user_removes_too_deep_tree(scratch: Path) -> None:
    # Read-only folders: a folder moved to another parent needs write access for its "..".
    folders = _chain(scratch, MAX_DEPTH + 3, USER)
    for folder in reversed(folders[MAX_DEPTH - 1 :]):
        folder.chmod(0o555)

    report = sweep_as(USER, GROUP, [str(scratch)])

    assert os.listdir(scratch) == []
    assert report.failures == []
    assert report.moved == 1


@root_only
def test_too_deep_tree_with_other_users_file(scratch: Path) -> None:
    folders = _chain(scratch, MAX_DEPTH + 2, USER, 0o777)
    theirs = _make(folders[-1] / "theirs", OTHER)
    _make(scratch / "roots", 0)

    report = sweep([str(scratch)], USER, frozenset())

    # The too-deep folder is in the scratch folder now, kept by the other user's file.
    moved = [name for name in os.listdir(scratch) if name != "roots"]
    assert len(moved) == 1
    assert moved[0].startswith(f"{MOVED_FOLDER_PREFIX}{USER}-")
    moved_child = scratch / moved[0] / "d"
    assert os.listdir(moved_child) == ["theirs"]
    assert (moved_child / "theirs").stat().st_uid == OTHER
    assert not theirs.exists()
    assert report.moved == 1
    assert report.failures == [(str(moved_child), "Directory not empty")]


@root_only
def test_too_deep_folder_above_mount_point_stays(scratch: Path) -> None:
    folders = _chain(scratch, MAX_DEPTH + 2, USER)
    deep = folders[MAX_DEPTH]

    report = sweep([str(scratch)], USER, frozenset({str(deep / "d")}))

    assert deep.exists()
    assert report.moved == 0
    assert report.failures == [
        (str(deep), f"nested deeper than {MAX_DEPTH} folders, above a mount point")
    ]


@root_only
def test_too_deep_folder_swapped_is_moved_back(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = _chain(scratch, MAX_DEPTH + 1, USER, 0o777)
    deep = folders[MAX_DEPTH]
    aside = scratch / "aside"
    real_rename = scratch_sweep._rename_no_replace

    def swap_then_rename(old_parent: int, old: str, new_parent: int, new: str) -> None:
        # Another user swaps its own folder in under the name between the check and the move.
        if not aside.exists():
            deep.rename(aside)
            _folder(deep, OTHER, 0o777)
        real_rename(old_parent, old, new_parent, new)

    monkeypatch.setattr(scratch_sweep, "_rename_no_replace", swap_then_rename)

    report = sweep([str(scratch)], USER, frozenset())

    assert deep.stat().st_uid == OTHER
    assert not [name for name in os.listdir(scratch) if name.startswith(MOVED_FOLDER_PREFIX)]
    assert report.moved == 0
    assert (str(deep), "replaced during the sweep") in report.failures


@root_only
def test_sweep_lists_first_failures_only(scratch: Path) -> None:
    count = MAX_REPORTED_FAILURES + 3
    for index in range(count):
        own = _folder(scratch / f"own{index}", USER, 0o777)
        _make(own / "visitor", OTHER)

    report = sweep([str(scratch)], USER, frozenset())

    assert report.failure_count == count
    assert len(report.failures) == MAX_REPORTED_FAILURES


@root_only
def test_sweep_stops_when_asked(scratch: Path) -> None:
    for index in range(3):
        _make(scratch / f"f{index}", USER)

    report = sweep([str(scratch)], USER, frozenset(), stop_reason=lambda: "timed out")

    assert report.files == 0
    assert report.failures == [(str(scratch), "timed out")]


@root_only
def test_sweep_as_user_keeps_its_access(scratch: Path) -> None:
    # A file of the user's in root's folder, which the user may not write. The kernel keeps a
    # sweep with the user's ids from removing it, as it would keep the user's next job.
    private = _folder(scratch / "roots", 0, 0o755)
    stuck = _make(private / "mine", USER)
    _make(scratch / "free", USER)
    locked = _folder(scratch / "locked", USER)
    _make(locked / "inside", USER)
    locked.chmod(0)

    report = sweep_as(USER, GROUP, [str(scratch)])

    assert stuck.exists()
    assert not (scratch / "free").exists()
    assert not locked.exists()
    assert report.files == 2
    assert report.folders == 1
    assert report.failures == [(str(stuck), "Permission denied")]
    # The thread's file system ids are the process's again.
    (scratch / "after").write_text("x")
    assert (scratch / "after").stat().st_uid == os.geteuid()


def test_sweep_skips_missing_folder(tmp_path: Path) -> None:
    report = sweep([str(tmp_path / "missing")], os.geteuid() or USER, frozenset())

    assert report.failure_count == 0


def test_sweep_rejects_root() -> None:
    with pytest.raises(ValueError, match="uid 0 is root"):
        sweep(["/tmp"], 0, frozenset())


def test_mount_points_unescaped(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "30 22 0:25 / /dev/shm rw shared:2 - tmpfs tmpfs rw\n"
        "31 22 0:26 / /tmp/with\\040space rw - tmpfs tmpfs rw\n"
    )

    assert read_mount_points(str(mountinfo)) == {"/", "/dev/shm", "/tmp/with space"}

"""The data directory of a running mesh: its lock, and the mesh file that the mesh keeps current.

A mesh claims its data directory before it starts anything: it takes the directory's lock and
removes a mesh file that a dead supervisor left. Once every service reports SERVING it writes
the mesh file (:mod:`acsp.mesh.endpoints`), and it writes the file again whenever a child's pid
changes or a child goes down or comes back, so that ``acsp status`` shows why a child is down.
At stop it removes the file, if the file is still its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from acsp.mesh.data_dir_lock import LOCK_FILE_NAME, DataDirLock, DataDirLockedError
from acsp.mesh.endpoints import MESH_FILE_NAME, MeshInfo, MeshNotFoundError, load_mesh
from acsp.mesh.failures import MeshStartError
from acsp.mesh.stop import supervisor_running

EXITS_KEY: Final = "exits"
"""Key of the mesh file that maps each child that is down to the reason, for ``acsp status``."""


def claim_data_dir(data_dir: Path) -> DataDirLock:
    """Take the lock of ``data_dir`` and remove a mesh file that a dead supervisor left there.

    Raises MeshStartError naming the mesh that has the directory, with the lock released.
    """
    lock = _lock_data_dir(data_dir)
    try:
        _remove_stale_mesh_file(data_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _lock_data_dir(data_dir: Path) -> DataDirLock:
    """Take the data directory's lock, or raise MeshStartError naming the mesh that has it."""
    try:
        return DataDirLock.acquire(data_dir)
    except DataDirLockedError as exc:
        raise MeshStartError(
            f"another mesh (supervisor pid {exc.pid}) runs with data directory "
            f"{data_dir}: stop it with acsp down --data-dir {data_dir}, or pass "
            "another --data-dir"
        ) from None
    except OSError as exc:
        raise MeshStartError(
            f"cannot lock data directory {data_dir}: {exc}. Remove "
            f"{data_dir / LOCK_FILE_NAME} if it is not a plain file, or pass another "
            "--data-dir"
        ) from None


def _remove_stale_mesh_file(data_dir: Path) -> None:
    """Remove a mesh file left by a dead supervisor; raise if its supervisor still runs."""
    try:
        previous = load_mesh(data_dir)
    except MeshNotFoundError:
        return
    except ValueError:
        previous = None
    if previous is not None and previous.supervisor_pid != os.getpid():
        # The same check as acsp down's, so that a pid reused by another program after the
        # supervisor died does not keep the data directory claimed.
        if supervisor_running(previous):
            raise MeshStartError(
                f"another mesh (supervisor pid {previous.supervisor_pid}) runs with data "
                f"directory {data_dir}: stop it with acsp down --data-dir "
                f"{data_dir}, or pass another --data-dir"
            )
    (data_dir / MESH_FILE_NAME).unlink(missing_ok=True)


class MeshStatus:
    """The mesh file of a running mesh, with the pids of its children and why any is down."""

    def __init__(self, data_dir: Path, running_pids: Callable[[], dict[str, int]]) -> None:
        self.data_dir = data_dir
        self._running_pids = running_pids
        """Callable that maps the name of each child that runs to its pid."""
        self.info: MeshInfo | None = None
        """Contents of the mesh file, or None until :meth:`publish`."""
        self._exits: dict[str, str] = {}
        """The reason each child that exited on its own is not running yet, by child name."""

    def publish(self, info: MeshInfo) -> None:
        """Write the first mesh file of a mesh whose services all report SERVING."""
        self.info = info
        info.write()

    def record_exit(self, name: str, reason: str) -> None:
        """Note why the child ``name`` is down, and write the mesh file."""
        self._exits[name] = reason
        self.write()

    def clear_exit(self, name: str) -> None:
        """Forget why ``name`` was down, now that it runs again, and write the mesh file."""
        if self._exits.pop(name, None) is not None:
            self.write()

    def write(self) -> None:
        """Write the mesh file again with the current process ids and the reasons of exits."""
        if self.info is None:
            return
        # A child that is down keeps its last pid, so that `acsp status` lists it as stopped.
        written = self.info.extra.get("pids", {})
        pids = {name: pid for name, pid in written.items() if name in self._exits}
        pids.update(self._running_pids())
        extra = {**self.info.extra, "pids": pids, EXITS_KEY: dict(self._exits)}
        if not self._exits:
            del extra[EXITS_KEY]
        self.info = dataclasses.replace(self.info, extra=extra)
        self.info.write()

    def remove(self) -> None:
        """Remove the mesh file, unless another mesh has written its own there since."""
        if self.info is None:
            return
        with contextlib.suppress(FileNotFoundError):
            mesh_file = self.data_dir / MESH_FILE_NAME
            # Remove only our own file: another mesh may have taken the directory since.
            if f'"supervisor_pid": {os.getpid()}' in mesh_file.read_text():
                mesh_file.unlink()

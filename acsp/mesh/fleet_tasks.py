"""The user that the tasks of the mesh's fleet run as, and the folder the fleet keeps its state in.

A node agent runs each task of a job as a process of its own, by default with the agent's uid,
which in the mesh is the uid of ``acsp up``. A task with that uid can open every file of the
data directory: the passwords of PostgreSQL and NATS, the TLS keys and the key that signs
tokens. It can also read the passwords in the services' ``/proc/<pid>/environ``. File modes
cannot keep out a process of the owner's own uid.

So a mesh that runs as root has its fleet run every task as :data:`TASK_USER`, an
unprivileged system user that it creates on first use, unless the environment already sets
``ACSP_AGENT_TASK_USER`` or a pool in ``ACSP_AGENT_TASK_USERS``. That user must reach the
fleet's task folder, so the fleet's state folder is ``data_dir/agents`` with mode 0711 when
other users can search the data directory and every folder above it. Otherwise it is a folder
in the system's temporary directory named after the data directory, as for the embedded
PostgreSQL's cluster.

A mesh run by another user cannot switch users, so its tasks keep its uid, and it logs a
warning that names what they can read.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from acsp.mesh._paths import traversable_by_others
from acsp.mesh.failures import MeshStartError

logger = logging.getLogger(__name__)

TASK_USER: Final = "acsp_mesh_task"
"""System user that a mesh run by root creates and runs its fleet's tasks as."""
TASK_USER_ENV: Final = "ACSP_AGENT_TASK_USER"
TASK_USERS_ENV: Final = "ACSP_AGENT_TASK_USERS"
STATE_DIR_MODE: Final = 0o711
"""Mode of the fleet's state folder when tasks run as another user, so that they pass through
it to their task folder but can neither list it nor write there."""
USERADD_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class FleetTasks:
    """The state folder of the mesh's fleet, and the user that its tasks run as."""

    state_dir: Path
    """The fleet's ``--state-dir``: its state file, spool, task logs and task folder."""
    env: Mapping[str, str]
    """Settings for the fleet's environment: :data:`TASK_USER` as ``ACSP_AGENT_TASK_USER``
    when the mesh chose it, else nothing."""
    separate_user: bool
    """True when the tasks run as a user other than the mesh's, chosen by the mesh or set in
    the environment."""
    other_state_dir: Path | None = None
    """The state folder that the other placement picks, where an earlier mesh of this data
    directory may have left the fleet's state: ``data_dir/agents`` when ``state_dir`` is in the
    temporary folder, and the reverse. A mesh that ran tasks as its own user, such as an
    earlier version run by root, kept it in ``data_dir/agents``. None when the tasks run as the
    mesh's user."""


def plan_fleet_tasks(data_dir: Path, environ: Mapping[str, str]) -> FleetTasks:
    """Return the task user and state folder of the fleet of the mesh in ``data_dir``.

    ``environ`` is the environment that the fleet inherits, before the mesh's own settings.
    Only reads the file system.
    """
    data_dir = data_dir.resolve()
    configured = any(environ.get(name, "").strip() for name in (TASK_USER_ENV, TASK_USERS_ENV))
    env = {TASK_USER_ENV: TASK_USER} if os.geteuid() == 0 and not configured else {}
    separate_user = configured or bool(env)
    in_data_dir = data_dir / "agents"
    if not separate_user:
        return FleetTasks(in_data_dir, env, separate_user)
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    in_temp_dir = Path(tempfile.gettempdir()) / f"acsp-agents-{digest}"
    if traversable_by_others(data_dir):
        return FleetTasks(in_data_dir, env, separate_user, other_state_dir=in_temp_dir)
    return FleetTasks(in_temp_dir, env, separate_user, other_state_dir=in_data_dir)


def prepare_fleet_tasks(plan: FleetTasks) -> None:
    """Create what the fleet's tasks need before the fleet starts, or warn that they need it.

    Creates :data:`TASK_USER` when the plan names it, and the state folder with mode 0711 when
    the tasks run as another user. Raises MeshStartError when either cannot be made safely.
    """
    if not plan.separate_user:
        logger.warning(
            "the fleet runs each task as uid %d, the user of this mesh, so a job's code can "
            "read the mesh's passwords, TLS keys and token signing key, and the services' "
            "environments. Hand out tokens of this mesh only to people whose code you trust, "
            "or run acsp up as root, which runs tasks as the unprivileged user %s",
            os.geteuid(),
            TASK_USER,
        )
        return
    if plan.env.get(TASK_USER_ENV) == TASK_USER:
        _ensure_task_user()
    if plan.other_state_dir is not None:
        _move_other_state(plan.other_state_dir, plan.state_dir)
    _make_state_dir(plan.state_dir)
    user = plan.env.get(TASK_USER_ENV, f"the user that {TASK_USER_ENV} or {TASK_USERS_ENV} sets")
    logger.info("the fleet runs its tasks as %s, in %s", user, plan.state_dir / "tasks")


def _ensure_task_user() -> None:
    """Create :data:`TASK_USER` with a group of its own, unless it exists."""
    try:
        pwd.getpwnam(TASK_USER)
        return
    except KeyError:
        pass
    logger.info("creating system user %s to run the tasks of the fleet", TASK_USER)
    command = [
        "useradd",
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        TASK_USER,
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=USERADD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    else:
        reason = result.stderr.strip() or f"exit status {result.returncode}"
    try:
        # Another mesh may have created the user meanwhile, which makes useradd fail.
        pwd.getpwnam(TASK_USER)
        return
    except KeyError:
        pass
    raise MeshStartError(
        f"cannot create the system user {TASK_USER} that the fleet's tasks run as: {reason}. "
        f"Create it yourself (useradd --system --user-group {TASK_USER}), or set "
        f"{TASK_USER_ENV} to an unprivileged user that exists"
    )


def _move_other_state(other: Path, state_dir: Path) -> None:
    """Move the fleet's state from ``other`` to ``state_dir``, unless ``state_dir`` exists.

    The spool in it may contain usage samples that were never sent, and its state file the
    tasks that the fleet plays and resumes, so it must not be left behind when the state
    folder moves. A folder of another user, or a symbolic link, is left alone, because that
    user could have put usage samples there. Raises MeshStartError when an agent still runs
    in ``other`` or the move fails.
    """
    # Imported here, because only a mesh that switches its state folder needs the agent's lock.
    from agents.state_lock import StateFolderLock
    from services.runtime.errors import StartupError

    try:
        status = other.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
        logger.warning(
            "%s is not a folder of uid %d, so the fleet does not take its state from there",
            other,
            os.geteuid(),
        )
        return
    if os.path.lexists(state_dir):
        logger.warning(
            "the fleet keeps its state in %s, and leaves the state that an earlier mesh kept "
            "in %s, whose usage samples it does not send; move what you need, then remove it",
            state_dir,
            other,
        )
        return
    try:
        lock = StateFolderLock.acquire(
            other, label="acsp up, moving the folder", fix="stop that agent, then start the mesh"
        )
    except StartupError as exc:
        raise MeshStartError(
            f"cannot move the fleet's state from {other} to {state_dir}: {exc}"
        ) from None
    try:
        _move_folder(other, state_dir)
    except OSError as exc:
        raise MeshStartError(
            f"cannot move the fleet's state from {other} to {state_dir}, where its tasks' "
            f"user can reach it: {exc}. Move the folder yourself, and start the mesh again"
        ) from None
    finally:
        lock.release()
    logger.info("moved the fleet's state from %s to %s", other, state_dir)


def _move_folder(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target``, which does not exist, whole or not at all.

    A move to another file system copies into a new folder beside ``target`` first, so that a
    failed copy leaves no ``target`` that holds only part of the state.
    """
    try:
        source.rename(target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copytree(source, partial, symlinks=True, dirs_exist_ok=True)
        # The source is removed next, so the copy must reach the disk first, or a crash
        # could lose the usage samples in the spool and the task records in the state file.
        _sync_tree(partial)
        partial.rename(target)
        _sync_folder(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        shutil.rmtree(source)
    except OSError as exc:
        logger.warning(
            "copied the fleet's state to %s, but cannot remove %s: %s", target, source, exc
        )


def _sync_tree(folder: Path) -> None:
    """Flush every regular file and folder under ``folder``, and ``folder`` itself, to disk."""
    for directory, _folders, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            # Links and special files are skipped, because opening a FIFO would block.
            if stat.S_ISREG(os.lstat(path).st_mode):
                descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        _sync_folder(Path(directory))


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_state_dir(state_dir: Path) -> None:
    """Create the fleet's state folder with mode 0711, or restrict the one that exists.

    Raises MeshStartError for a symbolic link, a file, or a folder of another user, because
    that user could change what the fleet reads and writes there.
    """
    try:
        state_dir.mkdir(mode=STATE_DIR_MODE, exist_ok=True)
        status = state_dir.lstat()
    except OSError as exc:
        raise MeshStartError(
            f"cannot create the fleet's state folder {state_dir}: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
        raise MeshStartError(
            f"the fleet's state folder {state_dir} is not a folder of uid {os.geteuid()} (it "
            f"is owned by uid {status.st_uid}, mode {stat.filemode(status.st_mode)}), so "
            "another user could change the fleet's files: remove it, and start the mesh again"
        )
    if stat.S_IMODE(status.st_mode) != STATE_DIR_MODE:
        state_dir.chmod(STATE_DIR_MODE)

"""A pool of task users (``ACSP_AGENT_TASK_USERS``): one uid for each job running on a node.

With one task user (``ACSP_AGENT_TASK_USER``) every task on a node runs as the same uid, so
two jobs that share a node can signal each other's processes and read each other's files.
With a pool, each job that starts on the node gets a user that no other job running there
has, and all its tasks on the node run as that user. The agent reports the pool's size as the
node's ``max_jobs`` in its inventory, and the scheduler sends a node no more jobs at once. A
start that still finds every user taken (one is still being freed, or the agent runs several
nodes on one pool) is rejected as ``START_REJECTION_NODE_BUSY``. The scheduler then places the
job again, elsewhere if it can, and does not count the rejection as a failed start.

A job keeps its user until its last task on the node has ended. Then every process that still
runs as that user, which can only be the job's, is killed, and the user is free once none is
left. So the pool's users must be dedicated to it: nothing else on the node may run as them.
A user whose processes outlive SIGKILL, or whose job folder cannot be given back, stays out of
the pool while the agent retries with a backoff that grows to 5 minutes, and
:attr:`TaskUserPool.held_users` counts it. So does a user whose task's start got no reply from
a task launcher that may still run, because that launcher may start the task late, as the
user, after the sweep. The user is free again once the launcher has exited, which it does after
its last task ends, and no process runs as the user. A restarted agent reads the uid of each
task that it finds running again. Before it hands out the first user, it kills the processes
of the pool's users that no such task runs as, and takes back the folders of the jobs that
ended while it was down.

NOTE: a restarted agent does not know which launchers of the earlier agent lost a start, so a
task that one of them starts after the restarted agent's first sweep runs as a free user.

Each job has its own folder, ``<task folder>/jobs/<job>``, owned by its user with mode 0700:
its working directory, its ``HOME`` and the place of its checkpoint files. Its ``tmp``
folder is the job's ``TMPDIR``. The task folder and
``jobs`` belong to the agent with mode 0711, so tasks pass through them to their own folder
but can neither list them nor write there, and the logs and exit status files stay the
agent's. Once the user is free again, the job's folder goes back to the agent (mode 0700), so
a later job that gets the same user cannot read what this one left.

``TMPDIR`` keeps the files of programs that honour it in the job's folder, but a task may still
write to ``/tmp``, ``/var/tmp`` or ``/dev/shm`` by name. With a :class:`ScratchSweeper`, a
user is free again only after a sweep of those folders removed what it owns there (see
:mod:`agents.scratch_folders`), and a restarted agent sweeps the users that no task runs as.
Files that a job leaves elsewhere (the user's home from the user database, say) keep its uid.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Final

from agents.backoff import CLEANUP_BACKOFF, Backoff
from agents.scratch_folders import ScratchSweeper
from agents.task_process import recorder_alive, task_file_stem
from agents.task_user import TaskUser, parse_task_user
from agents.user_processes import kill_user_processes

logger = logging.getLogger(__name__)

TASK_USERS_ENV: Final = "ACSP_AGENT_TASK_USERS"

MAX_POOL_USERS: Final = 4096
"""Maximum users in a pool. Each one is looked up and checked when the agent starts."""

JOB_FOLDER_MODE: Final = 0o700
JOB_TEMP_FOLDER: Final = "tmp"
"""Name of the job's temporary folder (its ``TMPDIR``) inside the job's folder."""
POOL_TASK_FOLDER_MODE: Final = 0o711
"""Mode of the task folder and of its ``jobs`` folder with a pool: the agent's, searchable
by the tasks but neither listable nor writable by them."""

FIRST_CLEAN_USER_WAIT_S: Final = 10.0
"""Maximum seconds the first start after the agent started waits for the scratch sweep of one
unused user, so that it finds a user to run as."""


def parse_task_users(text: str) -> tuple[TaskUser, ...]:
    """Parse a comma-separated list of ``USER[:GROUP]`` items and ``FIRST-LAST[:GROUP]`` ranges.

    A user is a name or a uid, as for ``ACSP_AGENT_TASK_USER``, and a range is every uid from
    FIRST to LAST. A uid without an entry in the user database needs its group. Raises
    ValueError naming the bad item.
    """
    users: list[TaskUser] = []
    seen: dict[int, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError("the list has an empty item; separate users with single commas")
        for name in _expand(item):
            try:
                user = parse_task_user(name)
            except ValueError as error:
                raise ValueError(f"{name!r}: {error}") from None
            if user.uid in seen:
                raise ValueError(f"uid {user.uid} is listed twice ({seen[user.uid]!r}, {name!r})")
            seen[user.uid] = name
            users.append(user)
            if len(users) > MAX_POOL_USERS:
                raise ValueError(f"it lists more than {MAX_POOL_USERS} users")
    return tuple(users)


def _expand(item: str) -> list[str]:
    """Expand a ``FIRST-LAST[:GROUP]`` range into its ``UID[:GROUP]`` items; keep other items."""
    users, colon, group = item.partition(":")
    first, dash, last = users.partition("-")
    if not (dash and first.isdigit() and last.isdigit()):
        return [item]
    low, high = int(first), int(last)
    if low > high:
        raise ValueError(f"range {users} is empty: {low} is above {high}")
    if high - low >= MAX_POOL_USERS:
        raise ValueError(f"range {users} has more than {MAX_POOL_USERS} uids")
    return [f"{uid}{colon}{group}" for uid in range(low, high + 1)]


async def _seal_step(seal: Callable[[], None]) -> str:
    """Call ``seal`` and return the problem if it raises OSError, or "" if it succeeds."""
    try:
        seal()
    except OSError as error:
        return f"its job folder was not given back to the agent: {error}"
    return ""


def job_folder(task_dir: Path, job_id: str) -> Path:
    """Return the folder of ``job_id``'s tasks under the task folder ``task_dir``."""
    return task_dir / "jobs" / task_file_stem(job_id)


class TaskUserPool:
    """The pool user of each job running on the node, and the users that are free.

    One pool serves every node of an agent process, because their tasks share one machine.
    ``scratch`` sweeps a user's files from the node's scratch folders before it is free again.
    ``backoff`` spaces the retries of a user that cannot be freed at once.
    """

    def __init__(
        self,
        users: Collection[TaskUser],
        scratch: ScratchSweeper | None = None,
        backoff: Backoff = CLEANUP_BACKOFF,
    ) -> None:
        if not users:
            raise ValueError("a task user pool needs at least one user")
        self._users = {user.uid: user for user in users}
        self._free: dict[int, None] = dict.fromkeys(self._users)
        """Free uids, the one freed longest ago first (dicts keep insertion order)."""
        self._job_uid: dict[str, int] = {}
        """The uid that each job's next task on the node gets."""
        self._task_uid: dict[str, int] = {}
        """The uid of each task that runs as a pool user, by task id."""
        self._tasks_of_uid: dict[int, set[str]] = {}
        """Ids of the tasks that run as each uid in use."""
        self._uid_job: dict[int, str] = {}
        self._sweep_lock = asyncio.Lock()
        self._swept = False
        self._sealed: set[Path] = set()
        """Task folders whose stale job folders were given back to the agent."""
        self._scratch = scratch
        self._backoff = backoff
        self._sweeps: set[asyncio.Task[Any]] = set()
        """Tasks waiting in :meth:`reclaim` or :meth:`sweep_scratch`, which retry for good."""
        self._held: dict[int, float] = {}
        """Users that a failed cleanup step keeps out of the pool: uid -> monotonic time of the
        first failure."""
        self._lost_launchers: dict[int, set[tuple[int, int]]] = {}
        """Launchers (pid, start ticks) that went away without replying to a start as each
        uid, and that may still start that task: uid -> launchers."""

    def __len__(self) -> int:
        return len(self._users)

    @property
    def free_users(self) -> int:
        """Number of users that no job has and that no sweep is freeing."""
        return len(self._free)

    @property
    def held_users(self) -> int:
        """Number of users kept out of the pool by a cleanup step that failed and is retried,
        because of processes that outlive SIGKILL, a job folder not given back or scratch
        files left."""
        return len(self._held)

    @property
    def busy_reason(self) -> str:
        """The reason a start is rejected when every user is in use or still being freed.

        The rejection is sent as ``START_REJECTION_NODE_BUSY``, which the scheduler does not
        count as a failed start.
        """
        return (
            f"all {len(self._users)} task users of {TASK_USERS_ENV} are in use by other jobs "
            "on this node"
        )

    def acquire(self, job_id: str, task_id: str) -> TaskUser | None:
        """Return the user of ``job_id``'s tasks, assigning a free one to a new job.

        Returns None when the job has none and none is free.
        """
        uid = self._job_uid.get(job_id)
        if uid is None:
            if not self._free:
                return None
            uid = next(iter(self._free))
            del self._free[uid]
            self._job_uid[job_id] = uid
            self._uid_job[uid] = job_id
        self._assign(uid, task_id)
        return self._users[uid]

    def claim(self, job_id: str, task_id: str, uid: int) -> bool:
        """Record that a task found running after a restart runs as ``uid``.

        Returns False if ``uid`` is not in the pool (the task started before the pool was
        set up). A user found with tasks of two jobs stays in use until all of them end.
        """
        if uid not in self._users:
            return False
        self._free.pop(uid, None)
        owner = self._uid_job.setdefault(uid, job_id)
        if owner == job_id:
            self._job_uid.setdefault(job_id, uid)
        else:
            # The job's next tasks get a user of their own.
            logger.warning(
                "task %s of job %s runs as uid %d, which a task of job %s also runs as",
                task_id,
                job_id,
                uid,
                owner,
            )
        self._assign(uid, task_id)
        return True

    def _assign(self, uid: int, task_id: str) -> None:
        self._task_uid[task_id] = uid
        self._tasks_of_uid.setdefault(uid, set()).add(task_id)

    def release(
        self, task_id: str, lost_launcher: tuple[int, int] | None = None
    ) -> tuple[int, str] | None:
        """Let ``task_id``'s user go if no other task runs as it; return (uid, job id) if so.

        The caller then sweeps the user's processes (:func:`kill_user_processes`) and its
        files (:meth:`sweep_scratch`), and calls :meth:`freed`. Until then the user is neither
        free nor the job's. ``lost_launcher`` (pid, start ticks) went away without replying to
        the task's start, so :meth:`reclaim` frees the user only once that launcher has exited.
        """
        uid = self._task_uid.pop(task_id, None)
        if uid is None:
            return None
        if lost_launcher is not None:
            self._lost_launchers.setdefault(uid, set()).add(lost_launcher)
        tasks = self._tasks_of_uid[uid]
        tasks.discard(task_id)
        if tasks:
            return None
        del self._tasks_of_uid[uid]
        job_id = self._uid_job.pop(uid)
        if self._job_uid.get(job_id) == uid:
            del self._job_uid[job_id]
        return uid, job_id

    def freed(self, uid: int) -> None:
        """Make a released user free, once no process runs as it."""
        if uid in self._tasks_of_uid:
            return
        self._free[uid] = None
        held_since = self._held.pop(uid, None)
        if held_since is not None:
            logger.info(
                "pool user uid %d is back in the pool after %.0f s out of it; %d users are "
                "still held",
                uid,
                time.monotonic() - held_since,
                len(self._held),
            )

    def _hold(self, uid: int) -> None:
        """Count ``uid`` as kept out of the pool by a failed cleanup step."""
        self._held.setdefault(uid, time.monotonic())

    async def reclaim(self, uid: int, seal: Callable[[], None] | None = None) -> None:
        """Free a released user once its processes are gone, ``seal`` has returned and its
        scratch files are swept, in that order.

        ``seal`` gives the job's folder back to the agent and raises OSError if it cannot. A
        step that fails is retried after each delay of the pool's backoff, for good, and the
        user counts in :attr:`held_users` until it is free. :meth:`cancel_sweeps` cancels the
        calling task while it waits here.
        """
        task = asyncio.current_task()
        assert task is not None
        self._sweeps.add(task)
        try:
            await self._retry(uid, lambda: self._kill_step(uid))
            if seal is not None:
                await self._retry(uid, lambda: _seal_step(seal))
            await self.sweep_scratch(uid)
        finally:
            self._sweeps.discard(task)
        self.freed(uid)

    async def _kill_step(self, uid: int) -> str:
        # Checked before the sweep, because a launcher gone by then starts nothing after it.
        launchers = self._lost_launchers.get(uid, set())
        running = sorted(pid for pid, ticks in launchers if recorder_alive((pid, ticks)))
        if await asyncio.to_thread(kill_user_processes, (uid,)):
            return "its processes survive SIGKILL (stuck in the kernel)"
        if running:
            return (
                f"task launcher {', '.join(map(str, running))} went away without replying to a "
                "start as this user, and may still start that task until it exits"
            )
        self._lost_launchers.pop(uid, None)
        return ""

    async def _retry(self, uid: int, attempt: Callable[[], Awaitable[str]]) -> None:
        """Await ``attempt`` until it returns no problem, after each delay of the backoff.

        Logs the first problem at ERROR and the later ones at DEBUG.
        """
        delays = self._backoff.delays()
        attempts = 0
        while problem := await attempt():
            attempts += 1
            self._hold(uid)
            delay = next(delays)
            log = logger.error if attempts == 1 else logger.debug
            log(
                "pool user uid %d stays out of the pool: %s; retrying in %g s (attempt %d)",
                uid,
                problem,
                delay,
                attempts,
            )
            await asyncio.sleep(delay)

    def has_user(self, job_id: str) -> bool:
        """Return whether ``job_id`` has a user on this node."""
        return job_id in self._job_uid

    async def sweep_scratch(self, uid: int) -> None:
        """Remove ``uid``'s files from the scratch folders, retrying until none is left.

        :meth:`cancel_sweeps` cancels the calling task while it waits here.
        """
        if self._scratch is None:
            return
        task = asyncio.current_task()
        assert task is not None
        self._sweeps.add(task)
        try:
            await self._scratch.sweep_until_clean(
                self._users[uid], on_retry=lambda: self._hold(uid)
            )
        finally:
            self._sweeps.discard(task)

    def cancel_sweeps(self) -> list[asyncio.Task[Any]]:
        """Cancel the tasks that wait in :meth:`reclaim` or :meth:`sweep_scratch`, as the
        agent stops.

        Their users stay out of the pool, and a restarted agent sweeps them before its first
        start. Returns the cancelled tasks for the caller to await.
        """
        tasks = list(self._sweeps)
        for task in tasks:
            task.cancel()
        return tasks

    async def sweep_once(self, task_dir: Path, group: asyncio.TaskGroup | None = None) -> None:
        """Clean up after jobs that ended while the agent was down, before the first start.

        Kills the processes of the users that no task runs as, once, and gives back to the
        agent the job folders under ``task_dir`` that no running job owns, once per task
        folder. Such processes and folders were left by jobs that ended while the agent was
        down, or by a job whose user an earlier agent was still freeing. With a scratch
        sweeper, those users are free again once their files are swept by tasks of ``group``,
        and the first call waits up to :data:`FIRST_CLEAN_USER_WAIT_S` for one of them. A user
        whose processes outlive SIGKILL is retried by a task of ``group`` (:meth:`reclaim`).
        """
        if self._swept and task_dir in self._sealed:
            return
        async with self._sweep_lock:
            unswept: list[int] = []
            if not self._swept:
                unused = frozenset(uid for uid in self._users if uid not in self._tasks_of_uid)
                left = await asyncio.to_thread(kill_user_processes, unused)
                self._reclaim_later(sorted(left), group)
                self._swept = True
                unswept = sorted(unused - left)
            if task_dir not in self._sealed:
                owners = {task_file_stem(job): uid for job, uid in self._job_uid.items()}
                await asyncio.to_thread(seal_stale_job_folders, task_dir, owners)
                self._sealed.add(task_dir)
            # After the stale job folders are the agent's again, so that no sweep finds them
            # among the users' files.
            await self._sweep_unused_scratch(unswept, group)

    def _reclaim_later(self, uids: list[int], group: asyncio.TaskGroup | None) -> None:
        """Take ``uids``, whose processes outlived SIGKILL, out of the free users until tasks of
        ``group`` have reclaimed them."""
        if not uids:
            return
        if group is None:
            raise RuntimeError("a pool whose users keep processes needs a task group to retry in")
        for uid in uids:
            self._free.pop(uid, None)
            self._hold(uid)
            # Its first attempt kills again and logs what it finds. Tracked from here, so
            # that cancel_sweeps reaches it even before it first runs.
            task = group.create_task(self.reclaim(uid), name=f"reclaim-uid-{uid}")
            self._sweeps.add(task)
            task.add_done_callback(self._sweeps.discard)

    async def _sweep_unused_scratch(self, uids: list[int], group: asyncio.TaskGroup | None) -> None:
        """Take ``uids`` out of the free users until their files are swept in ``group``."""
        if self._scratch is None or not uids:
            return
        if group is None:
            raise RuntimeError("a pool with a scratch sweeper needs a task group to sweep in")
        for uid in uids:
            self._free.pop(uid, None)
        sweeps = [
            group.create_task(self._sweep_then_free(uid), name=f"sweep-scratch-uid-{uid}")
            for uid in uids
        ]
        await asyncio.wait(
            sweeps, timeout=FIRST_CLEAN_USER_WAIT_S, return_when=asyncio.FIRST_COMPLETED
        )

    async def _sweep_then_free(self, uid: int) -> None:
        await self.sweep_scratch(uid)
        self.freed(uid)


def make_jobs_folder(task_dir: Path) -> None:
    """Make the task folder and its ``jobs`` folder, both the agent's with mode 0711.

    Raises OSError when ``jobs`` is not the agent's own folder (left by tasks that ran as a
    single task user, who could write in the task folder).
    """
    jobs = task_dir / "jobs"
    task_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(task_dir, POOL_TASK_FOLDER_MODE)
    jobs.mkdir(exist_ok=True)
    status = os.lstat(jobs)
    if status.st_uid != os.geteuid() or not stat.S_ISDIR(status.st_mode):
        raise OSError(
            f"{jobs} is not a folder of the agent's user (owner uid {status.st_uid}); "
            "remove it, so that the agent makes it again"
        )
    os.chmod(jobs, POOL_TASK_FOLDER_MODE)


def job_temp_folder(job_folder_path: Path) -> Path:
    """Return the temporary folder (``TMPDIR``) of the job whose folder is ``job_folder_path``."""
    return job_folder_path / JOB_TEMP_FOLDER


def make_job_folder(task_dir: Path, job_id: str, user: TaskUser) -> Path:
    """Make ``job_id``'s folder and its temporary folder, or take back the ones it had, and
    give both to ``user``.

    The caller made the ``jobs`` folder first (:func:`make_jobs_folder`).
    """
    folder = job_folder(task_dir, job_id)
    try:
        folder.mkdir(mode=JOB_FOLDER_MODE)
    except FileExistsError:
        pass
    # Only the agent writes in jobs, so the folder is the one it made. O_NOFOLLOW still
    # keeps the chown from reaching another file through a link.
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        # An agent that is not root may change the mode only of its own files (it has
        # CAP_CHOWN but not CAP_FOWNER), so the mode is set while the folder is its own.
        if os.fstat(descriptor).st_uid != os.geteuid():
            os.fchown(descriptor, os.geteuid(), os.getegid())
        os.fchmod(descriptor, JOB_FOLDER_MODE)
        _give_temp_folder(descriptor, user)
        os.fchown(descriptor, user.uid, user.gid)
    finally:
        os.close(descriptor)
    return folder


def _give_temp_folder(job_descriptor: int, user: TaskUser) -> None:
    """Make the temporary folder inside the open job folder, unless it has one, and give it to
    ``user``.

    The job folder is the agent's while this runs, so no task can change its entries meanwhile.
    An entry of that name that is not a folder (a link that an earlier attempt of the job left,
    say) is replaced.
    """
    try:
        os.mkdir(JOB_TEMP_FOLDER, JOB_FOLDER_MODE, dir_fd=job_descriptor)
    except FileExistsError:
        pass
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        descriptor = os.open(JOB_TEMP_FOLDER, flags, dir_fd=job_descriptor)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(JOB_TEMP_FOLDER, dir_fd=job_descriptor)
        os.mkdir(JOB_TEMP_FOLDER, JOB_FOLDER_MODE, dir_fd=job_descriptor)
        descriptor = os.open(JOB_TEMP_FOLDER, flags, dir_fd=job_descriptor)
    try:
        status = os.fstat(descriptor)
        if (status.st_uid, status.st_gid) == (user.uid, user.gid):
            # The job's folder from an earlier task of the job, which may still be using it.
            return
        if status.st_uid != os.geteuid():
            os.fchown(descriptor, os.geteuid(), os.getegid())
        os.fchmod(descriptor, JOB_FOLDER_MODE)
        os.fchown(descriptor, user.uid, user.gid)
    finally:
        os.close(descriptor)


def seal_job_folder(task_dir: Path, job_id: str) -> None:
    """Give a job's folder back to the agent, so the user's next job cannot enter it."""
    folder = job_folder(task_dir, job_id)
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        os.fchown(descriptor, os.geteuid(), os.getegid())
        os.fchmod(descriptor, JOB_FOLDER_MODE)
    finally:
        os.close(descriptor)


def seal_stale_job_folders(task_dir: Path, owners: Mapping[str, int]) -> int:
    """Give back to the agent each job folder under ``task_dir`` that a running job does not own.

    ``owners`` maps the folder name of each job with a user to that user's uid. Returns the
    number of folders given back.
    """
    try:
        entries = list(os.scandir(task_dir / "jobs"))
    except FileNotFoundError:
        return 0
    sealed = 0
    for entry in entries:
        try:
            owner = entry.stat(follow_symlinks=False).st_uid
            if owner == os.geteuid() or owners.get(entry.name) == owner:
                continue
            seal_job_folder(task_dir, entry.name)
        except OSError as error:
            logger.warning("job folder %s was not given back to the agent: %s", entry.path, error)
            continue
        sealed += 1
    return sealed

"""Running a node's tasks: start, supervise, stop, and find them again after a restart.

A task with a command runs as its own process group (``start_new_session``) with only its
accelerators visible (the backend's variable, e.g. ``CUDA_VISIBLE_DEVICES`` with UUIDs) and its
output in a log file under the agent's work directory. The runner enforces the wall time,
stops a task with SIGTERM to the group and SIGKILL after the grace period, and reports every
state change as a :class:`TaskEvent` with the exit code and the tail of the output. Processes
that left the group but kept the task's environment get the same signals, and are killed when
the task ends (:mod:`agents.stray_processes`).

Before a task is reported running, its pid and the kernel's start time of the process are in
the state file. A restarted agent adopts each recorded process that still runs (same pid and
same start time) and reports every other one with the exit status its launcher recorded (see
:mod:`agents.task_process`), or as lost when none was, so no task runs unaccounted for.

A task without a command, or with a positive ``simulated_run_time_s``, is "played" (simulated
backend only): it occupies its accelerators for ``simulated_run_time_s`` of the node's clock and
then succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from agents.backoff import CLEANUP_BACKOFF, Backoff
from agents.model import (
    TASK_INDEX_ENV,
    WHOLE_MILLI,
    TaskEvent,
    TaskSpec,
    TaskState,
    task_index_of,
)
from agents.programs import CommandNotRunnableError, resolve_command
from agents.state import StateStore, TaskRecord
from agents.stray_processes import find_task_processes, kill_task_processes, signal_strays
from agents.task_cgroups import (
    LauncherIdentity,
    TaskCgroups,
    is_populated,
    kill_and_remove,
    kill_and_remove_now,
    kill_members,
    member_pids,
    remove,
    remove_until_gone,
    signal_members,
)
from agents.task_logs import TASK_LOG_MAX_BYTES, read_tail, trim_log
from agents.task_process import (
    SPAWN_ID_ENV,
    LauncherLostError,
    TaskLauncher,
    TaskProcess,
    find_task_leaders,
    process_start_ticks,
    read_exit_status,
    recorder_alive,
    spawn,
    task_file_stem,
    wait_for_exit_status,
)
from agents.task_user import TaskUser, share_task_folder
from agents.task_users import (
    TaskUserPool,
    job_temp_folder,
    make_job_folder,
    make_jobs_folder,
    seal_job_folder,
)
from agents.user_processes import process_uid

logger = logging.getLogger(__name__)

OUTPUT_TAIL_BYTES = 4096
_POLL_S = 0.1
"""Seconds between exit checks of a process that no pidfd watches."""
_MAX_SLEEP_S = 5.0
"""Maximum seconds a supervisor sleeps, so that a step of the clock delays a deadline by no more."""
_REST_POLL_S = (0.01, 0.2)
"""First and maximum seconds between checks for a stopping task's processes that outlive its
leader. The interval doubles after each check."""
_REMEMBERED_FINISHED = 4096
_MAX_LOG_TRIMS = 2
"""Maximum log trims of one runner running at once, so that they leave the default thread
pool free for the stops that wait for processes in it."""
TIMED_OUT = "wall time exceeded"
AGENT_EXIT = "the agent stopped"
"""Stop reason of the tasks an agent stops because it is shutting down."""


@dataclass(slots=True)
class _Task:
    record: TaskRecord
    process: TaskProcess | None = None
    """The task's process, a child or one adopted after a restart; ``None`` for a played task."""
    ended_at: float | None = None
    killed: bool = False
    cgroup: Path | None = None
    """The task's own cgroup v2 (see :mod:`agents.task_cgroups`); None without one."""
    supervisor: asyncio.Task[None] | None = field(default=None, repr=False)
    changed: asyncio.Future[None] | None = field(default=None, repr=False)
    """Done when a stop is requested, so that the supervisor recomputes its next deadline."""

    def wake_supervisor(self) -> None:
        """Wake the supervisor, so that it recomputes its next deadline now."""
        if self.changed is not None and not self.changed.done():
            self.changed.set_result(None)


@dataclass(frozen=True, slots=True)
class TaskInterval:
    """The time a task held its accelerators within one usage interval."""

    job_id: str
    task_id: str
    accelerators: tuple[str, ...]
    start: float
    end: float
    millis: tuple[int, ...] = ()
    """Milli-shares of each of ``accelerators``; empty means whole ones."""

    def share_of(self, uuid: str) -> int:
        if not self.millis:
            return WHOLE_MILLI
        return self.millis[self.accelerators.index(uuid)]


class TaskRunner:
    """The tasks of one node."""

    def __init__(
        self,
        node_key: str,
        state: StateStore,
        work_dir: Path,
        emit: Callable[[TaskEvent], None],
        clock: Callable[[], float],
        accelerators: Sequence[str],
        visible_devices_env: Callable[[Sequence[str]], Mapping[str, str]],
        allow_played_tasks: bool = False,
        play_speed: float = 1.0,
        launcher: TaskLauncher | None = None,
        after_spooled: Callable[[Callable[[], None]], None] | None = None,
        task_user: TaskUser | None = None,
        task_log_max_bytes: int = TASK_LOG_MAX_BYTES,
        task_users: TaskUserPool | None = None,
        task_cgroups: TaskCgroups | None = None,
        cleanup_backoff: Backoff = CLEANUP_BACKOFF,
    ) -> None:
        """``launcher`` starts the tasks and records their exit status.

        Without one, the runner starts them itself, so a task that ends after an agent restart
        is reported lost.

        ``after_spooled(callback)`` runs ``callback`` once every event emitted so far is in the
        agent's spool (:meth:`agents.outbox.Outbox.call_when_spooled`). An ended task stays in
        the state file until then, so an agent killed before its end event was spooled reports
        the end again after a restart instead of never. Without it, the task is removed at once.

        ``task_user`` is the user that tasks run as (the launcher's own, with a launcher), or
        None for the agent's user.

        ``task_log_max_bytes`` is the size at which :meth:`trim_logs` trims a task's log (see
        :mod:`agents.task_logs`).

        ``task_users`` is a pool of task users that gives each job its own user and folder
        (see :mod:`agents.task_users`), in place of ``task_user``. The launcher must then take
        a user with each request.

        ``task_cgroups`` gives each task its own cgroup, which a stop and the task's end kill
        whole. The launcher must then have been made with its ``launcher_home``.

        ``cleanup_backoff`` spaces the retries of a task cgroup that stays populated after
        SIGKILL (see :func:`agents.task_cgroups.remove_until_gone`).
        """
        self._node_key = node_key
        self._state = state
        self._work_dir = work_dir
        self._emit = emit
        self._clock = clock
        self._accelerators = set(accelerators)
        self._visible_devices_env = visible_devices_env
        self._allow_played = allow_played_tasks
        if play_speed <= 0:
            raise ValueError(f"play_speed must be positive, got {play_speed}")
        self._play_speed = play_speed
        self._launcher = launcher
        self._after_spooled = after_spooled
        self._tasks: dict[str, _Task] = {}
        self._launching: dict[str, tuple[TaskRecord, asyncio.Future[TaskProcess]]] = {}
        """Tasks whose launch has no reply from the launcher yet, by task id."""
        self._stops_after_launch: dict[str, str] = {}
        """Stop reasons of launching tasks, applied once their launch gets its reply."""
        self._finished: OrderedDict[str, TaskState] = OrderedDict()
        self._ended_since_usage: dict[str, _Task] = {}
        """Tasks that ended since the last usage intervals, by task id."""
        self._unusable: dict[str, str] = {}
        """Failed accelerator UUID -> the health event that failed it."""
        self._group: asyncio.TaskGroup | None = None
        self._task_dir = work_dir / "tasks"
        # The agent's own variables (credentials among them) never reach a task.
        self._base_env = {k: v for k, v in os.environ.items() if not k.startswith("ACSP_")}
        self._task_user = task_user
        self._task_log_max_bytes = task_log_max_bytes
        self._log_trim_failed: set[str] = set()
        """Ids of running tasks whose log could not be trimmed, logged once each."""
        self._log_trims: dict[str, asyncio.Future[int | OSError]] = {}
        """Trims running in a worker thread, by task id: at most one per task."""
        self._task_folder_shared = False
        self._pool = task_users
        self._cleanups: set[asyncio.Task[None]] = set()
        """Tasks that free a released pool user (:meth:`_free_user`) or remove a task cgroup
        left populated (:meth:`_remove_later`), which may retry for good."""
        self._detached = False
        self._cgroups = task_cgroups
        self._cleanup_backoff = cleanup_backoff
        self._emptying_cgroups: set[str] = set()
        """Ids of the tasks whose cgroup is being killed and removed, by a task of the group or
        a retry. A start of such a task id would run in the cgroup that the removal kills."""
        if task_user is not None and task_user.home:
            # As a login sets them, so that a task does not take the agent's home for its own.
            self._base_env.update(HOME=task_user.home, USER=task_user.name, LOGNAME=task_user.name)

    def attach(self, group: asyncio.TaskGroup) -> None:
        """Give the runner the task group that owns its supervisors."""
        self._group = group

    def set_unusable(self, failures: Mapping[str, str]) -> None:
        """Reject starts on these accelerators (UUID -> health event id, which may be empty)."""
        self._unusable = dict(failures)

    @property
    def has_unreported_ends(self) -> bool:
        """True if a task ended whose usage up to its end is not reported yet."""
        return bool(self._ended_since_usage)

    @property
    def running(self) -> list[TaskRecord]:
        return [task.record for task in self._tasks.values()]

    def busy_accelerators(self) -> set[str]:
        return {uuid for record in self._records() for uuid in record.accelerators}

    def _records(self) -> list[TaskRecord]:
        """Return the records of the running tasks and of those being launched."""
        launching = [record for record, _launch in self._launching.values()]
        return [task.record for task in self._tasks.values()] + launching

    async def launches_settled(self) -> None:
        """Wait until every launch under way has its reply."""
        launches = [launch for _record, launch in self._launching.values()]
        if launches:
            await asyncio.wait(launches)

    # Commands --------------------------------------------------------------------------------

    def prepare_start(self, spec: TaskSpec) -> None:
        """Record the intent to spawn ``spec``'s process, in memory, unless it needs none.

        The caller saves every intent of a batch with one :meth:`StateStore.save_intents`
        before it calls :meth:`start` for each, so the spawns wait for one fsync in all.
        """
        if self._known(spec.task_id) or self.plays(spec):
            return
        self._state.put_intent(self._node_key, self._new_record(spec))

    async def start(self, spec: TaskSpec) -> None:
        """Start ``spec`` unless it is a redelivered command for a known task."""
        if self._pool is not None:
            # Before the checks, so that no await falls between them and the launch.
            await self._pool.sweep_once(self._task_dir, self._group)
        intent = self._state.node(self._node_key).intents.get(spec.task_id)
        if self._known(spec.task_id):
            logger.info("start of task %s ignored: already known on this node", spec.task_id)
            self._state.remove_intent(self._node_key, spec.task_id)
            return
        problem = self._check(spec)
        if problem:
            self._state.remove_intent(self._node_key, spec.task_id)
            self._reject(spec, problem)
            return
        if spec.task_id in self._emptying_cgroups or self._stale_cgroup_left(spec.task_id):
            self._state.remove_intent(self._node_key, spec.task_id)
            reason = "the cgroup of an earlier start of the task still has processes"
            self._reject(spec, reason, node_busy=True)
            return
        record = intent if intent is not None else self._new_record(spec)
        if self.plays(spec):
            self._tasks[spec.task_id] = _Task(record)
            self._state.put_task(self._node_key, record, durable=False)
            self._emit_state(record, TaskState.RUNNING, "played without a process")
            return
        user = self._task_user
        if self._pool is not None:
            user = self._pool.acquire(spec.job_id, spec.task_id)
            if user is None:
                self._state.remove_intent(self._node_key, spec.task_id)
                self._reject(spec, self._pool.busy_reason, node_busy=True)
                return
        await self._spawn(spec, record, user)

    def knows(self, task_id: str) -> bool:
        """Return whether ``task_id`` runs or ran here, so that :meth:`start` would ignore it."""
        return self._known(task_id)

    def _known(self, task_id: str) -> bool:
        if task_id in self._tasks or task_id in self._launching or task_id in self._finished:
            return True
        # A start is acknowledged after its batch settles, so it may come again after a crash
        # although its task already ran here. Its log outlives the agent, and the scheduler
        # never reuses a task id, so a log means the task ran. recover() or the spool reports
        # how it ended.
        if self._task_user is None and self._pool is None:
            return os.path.exists(self._log_path(task_id))
        return self._agent_log_exists(task_id)

    def _agent_log_exists(self, task_id: str) -> bool:
        """Return whether the agent made ``task_id``'s log, removing one that a task put there.

        Tasks that run as the task user may write in the task folder. A log they made for a
        task id that has not started yet would make the agent ignore that task's start.
        """
        path = self._log_path(task_id)
        try:
            owner = os.lstat(path).st_uid
        except FileNotFoundError:
            return False
        if owner == os.geteuid():
            return True
        logger.warning(
            "log of task %s is owned by uid %d, not the agent; removing it", task_id, owner
        )
        try:
            path.unlink()
        except OSError as error:
            # The start then fails when it opens the log, as a fault of the node.
            logger.error("cannot remove the log of task %s: %s", task_id, error)
        return False

    def plays(self, spec: TaskSpec) -> bool:
        """Return whether ``spec`` is played without a process (simulated backend only)."""
        # A simulated backend plays a task that gives a run time even when it names a command
        # too, because the scheduler requires a command for every job.
        return not spec.command or (self._allow_played and spec.simulated_run_time_s > 0)

    def _new_record(self, spec: TaskSpec) -> TaskRecord:
        return TaskRecord(
            job_id=spec.job_id,
            task_id=spec.task_id,
            accelerators=list(spec.accelerators),
            started_at=self._clock(),
            wall_time_s=spec.wall_time_s,
            grace_period_s=spec.grace_period_s,
            simulated_run_time_s=spec.simulated_run_time_s,
            accelerator_millis=list(spec.accelerator_millis),
            spawn_id=secrets.token_hex(16),
        )

    def log_path(self, task_id: str) -> Path:
        """Return the path of ``task_id``'s log, which stays after the task ends."""
        return self._log_path(task_id)

    def _log_path(self, task_id: str) -> Path:
        return self._task_dir / f"{task_file_stem(task_id)}.log"

    def _exit_path(self, task_id: str) -> Path:
        return self._task_dir / f"{task_file_stem(task_id)}.exit"

    def _check(self, spec: TaskSpec) -> str:
        if not spec.command and not self._allow_played:
            return "the task has no command and this backend cannot play one"
        if not spec.accelerators:
            return "the task names no accelerators"
        for uuid in spec.accelerators:
            if uuid not in self._accelerators:
                return f"accelerator {uuid} is not on this node"
            if uuid in self._unusable:
                return f"accelerator {uuid} is marked unusable"
        # Tasks may share an accelerator while their milli-shares add up to at most a whole one.
        used = self.used_millis()
        shares = spec.accelerator_millis or (WHOLE_MILLI,) * len(spec.accelerators)
        busy = [
            uuid
            for uuid, share in zip(spec.accelerators, shares, strict=True)
            if used.get(uuid, 0) + share > WHOLE_MILLI
        ]
        if busy:
            return f"accelerators {sorted(busy)} are in use by another task"
        return ""

    def used_millis(self) -> dict[str, int]:
        """Return the milli-shares in use per accelerator, summed over running tasks."""
        used: dict[str, int] = {}
        for record in self._records():
            for uuid in record.accelerators:
                used[uuid] = used.get(uuid, 0) + record.share_of(uuid)
        return used

    def _reject(self, spec: TaskSpec, reason: str, *, node_busy: bool = False) -> None:
        logger.warning("task %s of job %s rejected: %s", spec.task_id, spec.job_id, reason)
        self._remember(spec.task_id, TaskState.START_FAILED)
        self._emit(
            TaskEvent(
                job_id=spec.job_id,
                task_id=spec.task_id,
                state=TaskState.START_FAILED,
                time=self._clock(),
                reason=reason,
                accelerators=spec.accelerators,
                node_busy=node_busy,
            )
        )

    def _fail_unrunnable(self, spec: TaskSpec, error: CommandNotRunnableError) -> None:
        """Report a task whose program cannot run as failed, with a shell's exit status.

        The program is the job's own choice, so a rejection, which the scheduler requeues,
        would start the job again and fail again on node after node.
        """
        reason = str(error)
        logger.warning("task %s of job %s failed: %s", spec.task_id, spec.job_id, reason)
        self._remember(spec.task_id, TaskState.FAILED)
        self._emit(
            TaskEvent(
                job_id=spec.job_id,
                task_id=spec.task_id,
                state=TaskState.FAILED,
                time=self._clock(),
                reason=reason,
                exit_code=error.exit_code,
                output_tail=reason + "\n",
                accelerators=spec.accelerators,
            )
        )

    async def _spawn(self, spec: TaskSpec, record: TaskRecord, user: TaskUser | None) -> None:
        """Start ``spec``'s process as ``user`` (None for the agent's own user)."""
        cwd = self._task_dir
        try:
            self._make_task_folder()
            if self._pool is not None and user is not None:
                cwd = make_job_folder(self._task_dir, spec.job_id, user)
        except OSError as error:
            self._start_failed(spec, error)
            return
        # The intent is on disk before the process exists. A crash from here until the task
        # record is saved leaves the intent, which a restarted agent resolves in recover().
        self._state.put_intent(self._node_key, record)
        self._state.save_intents()
        cgroup = None
        if self._cgroups is not None:
            # After the intent is saved, so that every task cgroup belongs to a saved task.
            try:
                cgroup = self._cgroups.create(spec.task_id)
            except OSError as error:
                self._start_failed(spec, error)
                return
        env = dict(self._base_env)
        if self._pool is not None and user is not None:
            # The job's folders, because a pool user's home and the node's /tmp outlive the
            # job, and a later job that gets the same user could read what is left there.
            env.update(
                HOME=str(cwd),
                TMPDIR=str(job_temp_folder(cwd)),
                USER=user.name,
                LOGNAME=user.name,
            )
        env.update(spec.env)
        env.update(self._visible_devices_env(spec.accelerators))
        env.update({"ACSP_JOB_ID": spec.job_id, "ACSP_TASK_ID": spec.task_id})
        task_index = task_index_of(spec.task_id)
        if task_index is not None:
            env[TASK_INDEX_ENV] = task_index
        env[SPAWN_ID_ENV] = record.spawn_id
        record.log_path = str(self._log_path(spec.task_id))
        try:
            if self._launcher is None:
                process = spawn(spec.command, env, cwd, Path(record.log_path), user, cgroup)
                self._started(spec, record, process)
                return
            executable = resolve_command(spec.command, env, cwd, user)
            launch = self._launcher.launch(
                executable,
                spec.command,
                env,
                cwd,
                Path(record.log_path),
                self._exit_path(spec.task_id),
                record.spawn_id,
                user,
                cgroup,
            )
        except (CommandNotRunnableError, OSError) as error:
            self._start_failed(spec, error)
            return
        record.launcher_pid, record.launcher_start_ticks = self._launcher.identity
        self._launching[spec.task_id] = (record, launch)
        # The launch is settled by the callback, even when this coroutine is cancelled.
        launch.add_done_callback(lambda done: self._launched(spec, record, done))
        await asyncio.wait((launch,))

    def _make_task_folder(self) -> None:
        """Make the task folder, and with a task user, let that user's group write in it.

        Made for every start, so that starts go on after someone removed the folder. With a
        pool of task users, tasks get no write access to it (see :mod:`agents.task_users`).
        """
        if self._pool is not None:
            if not (self._task_folder_shared and self._task_dir.is_dir()):
                make_jobs_folder(self._task_dir)
                self._task_folder_shared = True
            return
        if self._task_user is None:
            self._task_dir.mkdir(parents=True, exist_ok=True)
            return
        if self._task_folder_shared and self._task_dir.is_dir():
            return
        self._task_dir.mkdir(parents=True, exist_ok=True)
        share_task_folder(self._task_dir, self._task_user)
        self._task_folder_shared = True

    def _launched(
        self, spec: TaskSpec, record: TaskRecord, launch: asyncio.Future[TaskProcess]
    ) -> None:
        self._launching.pop(spec.task_id, None)
        stop_reason = self._stops_after_launch.pop(spec.task_id, None)
        if launch.cancelled():
            # The agent is stopping. The intent stays, for a restarted agent to resolve.
            logger.warning(
                "start of task %s not confirmed by the launcher before the agent stopped",
                spec.task_id,
            )
            return
        error = launch.exception()
        if error is not None:
            self._start_failed(spec, error, (record.launcher_pid, record.launcher_start_ticks))
            return
        self._started(spec, record, launch.result())
        if stop_reason is not None:
            self._begin_stop(self._tasks[spec.task_id], stop_reason)

    def _start_failed(
        self, spec: TaskSpec, error: BaseException, launcher: LauncherIdentity = (0, 0)
    ) -> None:
        """Fail the task if its program cannot run on any node, else reject the start.

        The scheduler places a rejected task's job again. :data:`agents.programs.JOB_ERRNOS`
        lists the errors that are the job's own. ``launcher`` is the identity of the launcher
        that was asked to start the task, if one was.
        """
        self._state.remove_intent(self._node_key, spec.task_id)
        lost = isinstance(error, LauncherLostError) and launcher[0] != 0
        self._release_user(spec.task_id, launcher if lost else None)
        self._remove_empty_cgroup(spec.task_id, launcher)
        if isinstance(error, CommandNotRunnableError):
            self._fail_unrunnable(spec, error)
        else:
            self._reject(spec, f"command could not be started: {error}")

    def _remove_empty_cgroup(self, task_id: str, launcher: LauncherIdentity = (0, 0)) -> None:
        """Remove the cgroup of a task whose start failed, killing what runs in it.

        A lost launcher fails a start when no process carries the task's spawn id, yet the
        task may run: it cleared its environment at once, or the launcher was slow and spawned
        it after the agent gave up. Nothing else stops that process once the start is rejected.
        The launcher ``launcher``, and the runner's own, may still be inside the cgroup in the
        middle of that start. They are spared, and the cgroup is removed once they have left.
        """
        if self._cgroups is None:
            return
        cgroup = self._cgroups.path(task_id)
        try:
            if remove(cgroup):
                return
        except OSError as error:
            logger.warning("cannot remove the cgroup of task %s: %s", task_id, error)
            return
        logger.warning(
            "task %s, whose start failed, runs processes %s in cgroup %s; killing them",
            task_id,
            member_pids(cgroup),
            cgroup,
        )
        spared = self._spared_launchers(launcher)
        if self._group is not None:
            # Marked now, because a start of the same task id may come before the task runs.
            self._emptying_cgroups.add(task_id)
            killing = self._kill_and_remove(cgroup, task_id, spared)
            try:
                self._group.create_task(killing)
                return
            except RuntimeError:
                # The task group is shutting down and takes no more tasks.
                killing.close()
                self._emptying_cgroups.discard(task_id)
        kill_and_remove_now(cgroup, task_id, spared)

    def _cgroup_task_ids(self) -> set[str]:
        """Return the ids of the tasks whose cgroup this runner uses: running, being launched or
        being emptied."""
        return {*self._tasks, *self._launching, *self._emptying_cgroups}

    def _recorders(self) -> set[LauncherIdentity]:
        """Return the launchers that record the exit status of this runner's tasks, among them
        the tasks that ended while the agent was down and whose status is still awaited."""
        records = [*self._records(), *self._state.node(self._node_key).tasks.values()]
        recorders = {_recorder(record) for record in records}
        return {recorder for recorder in recorders if recorder is not None}

    def _stale_cgroup_left(self, task_id: str) -> bool:
        """Check whether ``task_id``'s cgroup is one that :func:`remove_stale_cgroups` found
        with no task and has not removed yet.

        A name whose cgroup is gone is forgotten, because its removal has ended.
        """
        if self._cgroups is None or not self._cgroups.stale_names:
            return False
        cgroup = self._cgroups.path(task_id)
        if cgroup.name not in self._cgroups.stale_names:
            return False
        if cgroup.is_dir():
            return True
        self._cgroups.stale_names.discard(cgroup.name)
        return False

    def _remove_stale_cgroup(self, cgroup: Path, spared: tuple[LauncherIdentity, ...]) -> None:
        """Kill and remove a task cgroup that belongs to no task of the agent, in the background."""
        if self._group is None:
            raise RuntimeError("TaskRunner.attach must be called before tasks start")
        logger.warning(
            "cgroup %s belongs to no task of this agent; killing its processes %s and removing it",
            cgroup,
            member_pids(cgroup),
        )
        # A task id cannot be read back from its cgroup's name, so the name is used in its place.
        self._group.create_task(
            self._kill_and_remove(cgroup, cgroup.name, spared), name=f"remove-{cgroup.name}"
        )

    def _spared_launchers(self, launcher: LauncherIdentity) -> tuple[LauncherIdentity, ...]:
        """Return ``launcher`` and the runner's current launcher, which no cgroup kill may end."""
        current = (0, 0) if self._launcher is None else self._launcher.identity
        return tuple(identity for identity in {launcher, current} if identity[0])

    async def _kill_and_remove(
        self, cgroup: Path, task_id: str, spared: tuple[LauncherIdentity, ...] = ()
    ) -> int:
        """Kill and remove a task's cgroup, and retry later if it stays populated.

        Returns how many processes were killed at first.
        """
        self._emptying_cgroups.add(task_id)
        try:
            count = await kill_and_remove(cgroup, task_id, spared)
        finally:
            self._emptying_cgroups.discard(task_id)
        if os.path.isdir(cgroup):  # noqa: ASYNC240 - cgroupfs, which never waits on a disk
            self._remove_later(cgroup, task_id, spared)
        return count

    def _remove_later(
        self, cgroup: Path, task_id: str, spared: tuple[LauncherIdentity, ...] = ()
    ) -> None:
        """Retry the kill and removal of a task cgroup after each delay of the backoff."""
        if self._group is None:
            raise RuntimeError("TaskRunner.attach must be called before tasks start")
        retry = remove_until_gone(cgroup, task_id, self._cleanup_backoff.delays(), spared)
        try:
            if self._detached:
                raise RuntimeError("the runner is detached")
            task = self._group.create_task(retry, name=f"remove-cgroup-{cgroup.name}")
        except RuntimeError:
            # The agent is stopping.
            retry.close()
            logger.info("agent stopping: cgroup %s of task %s stays in place", cgroup, task_id)
            return
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        self._emptying_cgroups.add(task_id)
        task.add_done_callback(lambda _done: self._emptying_cgroups.discard(task_id))

    def _started(self, spec: TaskSpec, record: TaskRecord, process: TaskProcess) -> None:
        record.pid = process.pid
        record.process_start_ticks = process_start_ticks(process.pid) or 0
        cgroup = None if self._cgroups is None else self._cgroups.path(spec.task_id)
        task = _Task(record, process, cgroup=cgroup)
        self._tasks[spec.task_id] = task
        self._state.remove_intent(self._node_key, spec.task_id)
        self._state.put_task(self._node_key, record)
        # DEBUG: a fleet process starts hundreds of tasks per second, and the task event
        # carries the same facts.
        logger.debug("task %s of job %s started as pid %d", spec.task_id, spec.job_id, process.pid)
        self._emit_state(record, TaskState.RUNNING, f"pid {process.pid}")
        self._supervise(task)

    async def stop(self, task_id: str, reason: str) -> None:
        """Ask a task to stop: SIGTERM now, SIGKILL after its grace period.

        A task whose process has exited already gets no stop and reports its own end.
        """
        task = self._tasks.get(task_id)
        if task is None and task_id in self._launching:
            self._stops_after_launch.setdefault(task_id, reason or "stop requested")
            return
        if task is None:
            logger.info("stop of task %s ignored: not running on this node", task_id)
            return
        self._begin_stop(task, reason or "stop requested")

    def stop_processes(self, reason: str, grace_s: float) -> list[asyncio.Task[None]]:
        """Stop every task that has a process, with at most ``grace_s`` before SIGKILL.

        Returns the supervisors, which end once their task's end is reported. Played tasks
        are left alone, because they stay in the state file and resume when the agent restarts.
        """
        supervisors = []
        for task_id in self._launching:
            self._stops_after_launch.setdefault(task_id, reason)
        for task in list(self._tasks.values()):
            if task.record.pid and task.supervisor is not None:
                self._begin_stop(task, reason, grace_s)
                supervisors.append(task.supervisor)
        return supervisors

    def detach(self) -> list[asyncio.Task[Any]]:
        """Cancel the supervisors of the running tasks, which keep running for adoption, the
        tasks that free pool users and those that retry the removal of task cgroups.

        A user that is being freed stays out of the pool, and a restarted agent sweeps it before
        its first start. Users released after this call are not freed. A task cgroup still
        populated stays in place, and a restarted agent removes it
        (:func:`remove_stale_cgroups`). Returns the cancelled tasks for the caller to await.
        """
        self._detached = True
        cancelled: dict[asyncio.Task[Any], None] = {}
        for task in self._tasks.values():
            if task.supervisor is not None:
                task.supervisor.cancel()
                cancelled[task.supervisor] = None
        # Processes that outlive SIGKILL, or files that a sweep cannot remove, keep these tasks
        # retrying for good, and the task group waits for its tasks.
        for cleanup in self._cleanups:
            cleanup.cancel()
            cancelled[cleanup] = None
        if self._pool is not None:
            cancelled.update(dict.fromkeys(self._pool.cancel_sweeps()))
        return list(cancelled)

    def _begin_stop(self, task: _Task, reason: str, grace_s: float | None = None) -> None:
        record = task.record
        if record.stop_reason:
            if grace_s is not None and not task.killed:
                # A stop already under way gets no more than the shorter grace period.
                record.stop_deadline = min(record.stop_deadline, self._clock() + grace_s)
                task.wake_supervisor()
            return
        if record.pid and self._leader_exited(task):
            # The process ended on its own, so the end its supervisor is about to report is
            # the task's real one. A stop reason would turn an exit with code 0 into a stopped
            # or lost task, and the scheduler would run a finished job again.
            logger.debug("stop of task %s not sent: its process already exited", record.task_id)
            return
        record.stop_reason = reason
        grace = record.grace_period_s if grace_s is None else min(grace_s, record.grace_period_s)
        record.stop_deadline = self._clock() + grace
        self._state.put_task(self._node_key, record, durable=record.pid != 0)
        task.wake_supervisor()
        self._emit_state(record, TaskState.STOPPING, reason)
        if record.pid:
            _signal_group(record.pid, signal.SIGTERM)
            if task.cgroup is not None:
                signal_members(task.cgroup, signal.SIGTERM, outside_group=record.pid)
            else:
                signal_strays(record.spawn_id, record.pid, signal.SIGTERM)
        else:
            # A played task has nothing to signal: it stops at once.
            self._finish(task, None, "")

    @staticmethod
    def _leader_exited(task: _Task) -> bool:
        """Return whether the task's leader process has exited, seen or not by its supervisor.

        A leader that exited is a zombie until its parent (the launcher) reaps it, and has no
        start time then. A pid that a new process took over shows another start time. A
        leader that exits between this check and the stop's signal counts as stopped.
        """
        if task.process is not None and task.process.exited.done():
            return True
        return process_start_ticks(task.record.pid) != task.record.process_start_ticks

    # Supervision -----------------------------------------------------------------------------

    def _supervise(self, task: _Task) -> None:
        if self._group is None:
            raise RuntimeError("TaskRunner.attach must be called before tasks start")
        task.supervisor = self._group.create_task(
            self._supervise_process(task), name=f"task-{task.record.task_id}"
        )

    async def _supervise_process(self, task: _Task) -> None:
        record = task.record
        process = task.process
        assert process is not None
        loop = asyncio.get_running_loop()
        while not self._has_exited(task):
            now = self._clock()
            if (
                not record.stop_reason
                and record.wall_time_s > 0
                and now - record.started_at >= record.wall_time_s
            ):
                self._begin_stop(task, TIMED_OUT)
            if record.stop_reason and not task.killed and now >= record.stop_deadline:
                logger.warning(
                    "task %s still running after its %g s grace period; sending SIGKILL",
                    record.task_id,
                    record.grace_period_s,
                )
                _signal_group(record.pid, signal.SIGKILL)
                if task.cgroup is not None:
                    kill_members(task.cgroup)
                else:
                    signal_strays(record.spawn_id, record.pid, signal.SIGKILL)
                task.killed = True
            # Sleep until the process exits, a stop is requested or the next deadline.
            task.changed = loop.create_future()
            await asyncio.wait(
                (process.exited, task.changed),
                timeout=self._next_check_s(task),
                return_when=asyncio.FIRST_COMPLETED,
            )
        if task.cgroup is not None:
            if record.stop_reason and not task.killed:
                await self._await_rest_of_task(task)
            # Whatever its environment and session, a process the task started is in here.
            left = await self._kill_and_remove(task.cgroup, record.task_id)
            if left:
                logger.warning(
                    "task %s left %d processes in its cgroup; killed them", record.task_id, left
                )
        elif not (record.stop_reason and not task.killed and await self._await_rest_of_task(task)):
            strays = await self._kill_rest_of_task(task)
            if strays:
                logger.warning(
                    "task %s left %d processes outside its group; killed them",
                    record.task_id,
                    strays,
                )
        exit_code = None if task.process is None else task.process.returncode
        await self._trim_ended_log(record)
        self._finish(task, exit_code, _tail(record.log_path))

    async def _kill_rest_of_task(self, task: _Task) -> int:
        """Send SIGKILL to what is left of an ended task; return how many strays were killed."""
        record = task.record
        # The leader exited; anything left in its process group belongs to the task too.
        group_left = _signal_group(record.pid, 0)
        if group_left:
            logger.warning("task %s left processes behind; killing its group", record.task_id)
            _signal_group(record.pid, signal.SIGKILL)
        # So do processes that left the group (daemons) but carry the task's spawn id.
        launcher = self._launcher
        # A stop signals strays apart from the leader. Some may still be children of other
        # strays, which the launcher's list from the leader's exit leaves out, so /proc is read.
        if (
            not group_left
            and not record.stop_reason
            and launcher is not None
            and record.launcher_pid
            and launcher.adopts_orphans
            and launcher.identity == (record.launcher_pid, record.launcher_start_ticks)
        ):
            # They are the launcher's children now: a few reads at most, done at once. A task
            # that left processes behind waits for them to exit, so a thread does that.
            adopted = None if task.process is None else task.process.adopted
            leaders = launcher.leader_pids()
            if adopted:
                return await asyncio.to_thread(
                    kill_task_processes, record.spawn_id, record.launcher_pid, leaders, adopted
                )
            return kill_task_processes(record.spawn_id, record.launcher_pid, leaders, adopted)
        # The group's members, killed just now, may leave children that are nobody's yet.
        return await asyncio.to_thread(kill_task_processes, record.spawn_id)

    async def _await_rest_of_task(self, task: _Task) -> bool:
        """Wait until a stopping task's other processes exit; return False if its grace period
        ends first.

        SIGTERM may end the leader at once while the rest of its group and its strays still
        clean up, and the grace period covers them too. The caller then sends SIGKILL to
        whatever outlives it.
        """
        record = task.record
        interval_s, max_interval_s = _REST_POLL_S
        loop = asyncio.get_running_loop()
        while self._clock() < record.stop_deadline:
            if task.cgroup is not None:
                if not is_populated(task.cgroup):
                    return True
            # The group test is one system call, so /proc is scanned only once it is empty.
            elif not _signal_group(record.pid, 0) and not await asyncio.to_thread(
                find_task_processes, record.spawn_id
            ):
                return True
            # A shorter grace period (the agent stopping) wakes this wait too.
            task.changed = loop.create_future()
            remaining_s = max(0.0, record.stop_deadline - self._clock())
            await asyncio.wait((task.changed,), timeout=min(interval_s, remaining_s))
            interval_s = min(interval_s * 2, max_interval_s)
        return False

    def _has_exited(self, task: _Task) -> bool:
        process = task.process
        assert process is not None
        if process.check():
            return True
        # An adopted process without a pidfd has ended once its pid shows another start time.
        if not process.is_child and process.polled:
            if process_start_ticks(task.record.pid) != task.record.process_start_ticks:
                process.set_exited()
                return True
        return False

    def _next_check_s(self, task: _Task) -> float:
        """Return the seconds until the task's wall time or grace period ends, capped."""
        record = task.record
        deadline = None
        if record.stop_reason:
            if not task.killed:
                deadline = record.stop_deadline
        elif record.wall_time_s > 0:
            # A wall time that passed without a stop means the leader had exited already, so
            # its exit report comes soon. The short wait keeps the loop from spinning until then.
            deadline = max(record.started_at + record.wall_time_s, self._clock() + _POLL_S)
        delay = _MAX_SLEEP_S if deadline is None else max(0.0, deadline - self._clock())
        assert task.process is not None
        return min(delay, _POLL_S if task.process.polled else _MAX_SLEEP_S)

    def tick(self) -> None:
        """Advance played tasks: finish those whose run or wall time has passed.

        Played times pass ``play_speed`` times faster than the clock.
        """
        now = self._clock()
        for task in list(self._tasks.values()):
            record = task.record
            if record.pid:
                continue
            wall_end = record.started_at + record.wall_time_s / self._play_speed
            run_end = record.started_at + record.simulated_run_time_s / self._play_speed
            if record.wall_time_s > 0 and wall_end < run_end and now >= wall_end:
                record.stop_reason = TIMED_OUT
                self._finish(task, None, "", ended_at=wall_end)
            elif now >= run_end:
                self._finish(task, 0, "", ended_at=run_end)

    def trim_logs(self) -> None:
        """Start a trim in a worker thread for each running task's log that is over the limit.

        The check is one ``stat`` per task on the event loop. The trim collapses the log's
        middle in place, or copies its latest quarter of the limit on file systems that cannot
        collapse (see :mod:`agents.task_logs`). Either may wait on the disk, so it runs in a
        thread, and a task whose trim is still running gets no second one. Logs over the limit
        past :data:`_MAX_LOG_TRIMS` trims running wait for a later check.
        """
        loop = asyncio.get_running_loop()
        for task in self._tasks.values():
            record = task.record
            if not record.pid or not record.log_path or record.task_id in self._log_trims:
                continue
            try:
                size = os.lstat(record.log_path).st_size
            except FileNotFoundError:
                continue  # The task removed its log.
            except OSError as error:
                self._report_trim(record, error)
                continue
            if size <= self._task_log_max_bytes:
                continue
            if len(self._log_trims) >= _MAX_LOG_TRIMS:
                break
            trim = loop.run_in_executor(
                None, _trim_or_error, record.log_path, self._task_log_max_bytes
            )
            self._log_trims[record.task_id] = trim
            trim.add_done_callback(partial(self._log_trimmed, record))

    def _log_trimmed(self, record: TaskRecord, trim: asyncio.Future[int | OSError]) -> None:
        self._log_trims.pop(record.task_id, None)
        # Nothing cancels the future itself: waiters use asyncio.wait, which never does.
        if record.task_id in self._tasks and not trim.cancelled():
            self._report_trim(record, trim.result())

    async def _trim_ended_log(self, record: TaskRecord) -> None:
        """Trim the log of an ended task over its limit in a worker thread, after any running trim.

        The caller reads the output tail for the end event after this returns, so no trim
        changes the log after that read.
        """
        running = self._log_trims.get(record.task_id)
        if running is not None:
            await asyncio.wait((running,))
        if _within_limit(record.log_path, self._task_log_max_bytes):
            # Most logs are short: one stat here spares them the hop to a worker thread.
            self._log_trim_failed.discard(record.task_id)
            return
        outcome = await asyncio.to_thread(_trim_or_error, record.log_path, self._task_log_max_bytes)
        self._report_trim(record, outcome)
        self._log_trim_failed.discard(record.task_id)

    def _trim_log(self, record: TaskRecord) -> None:
        """Trim a task's log on the event loop if it is over the limit."""
        if not _within_limit(record.log_path, self._task_log_max_bytes):
            self._report_trim(record, _trim_or_error(record.log_path, self._task_log_max_bytes))

    def _report_trim(self, record: TaskRecord, outcome: int | OSError) -> None:
        """Log a trim's bytes dropped, or its error once per task."""
        if isinstance(outcome, OSError):
            if record.task_id not in self._log_trim_failed:
                self._log_trim_failed.add(record.task_id)
                logger.warning(
                    "task %s: failed to trim its log %s to %d bytes, so it may grow without "
                    "bound: %s",
                    record.task_id,
                    record.log_path,
                    self._task_log_max_bytes,
                    outcome,
                )
        elif outcome:
            logger.debug("task %s: dropped %d bytes from its log", record.task_id, outcome)

    def report_running(self) -> None:
        """Report every running task again (a reconcile command)."""
        for task in self._tasks.values():
            self._emit_state(task.record, TaskState.RUNNING, "still running (reconcile)")

    def _finish(
        self, task: _Task, exit_code: int | None, output: str, ended_at: float | None = None
    ) -> None:
        record = task.record
        failure = self._failure_under(record)
        state = _ended_state(record, exit_code, failure)
        task.ended_at = self._clock() if ended_at is None else ended_at
        # The exit status file stays, like the log beside it. Deleted here, it could be gone
        # while the state file, saved at the end of this loop turn, still lists the task.
        self._tasks.pop(record.task_id, None)
        self._ended_since_usage[record.task_id] = task
        self._remember(record.task_id, state)
        if record.stop_reason:
            reason = record.stop_reason
        elif exit_code is not None:
            reason = "exited"
        else:
            reason = "ended without a recorded exit status (the agent or its launcher restarted)"
        # Only the tasks that did not succeed are worth a line at INFO.
        log = logger.debug if state is TaskState.SUCCEEDED else logger.info
        log("task %s %s (exit code %s)", record.task_id, state.value, exit_code)
        health_event_id = ""
        if state is TaskState.FAILED_HARDWARE and failure:
            health_event_id = failure
        self._emit_state(record, state, reason, exit_code, output, task.ended_at, health_event_id)
        self._forget_once_spooled(task)
        self._release_user(record.task_id)

    def _release_user(self, task_id: str, lost_launcher: LauncherIdentity | None = None) -> None:
        """Free the pool user of an ended task once no other task of its job runs as it.

        The task's processes are gone by now, but the job may have left others under its
        user, and files in the node's scratch folders, so the user is free only after a sweep
        of both. ``lost_launcher`` is the launcher that went away without replying to the
        task's start, which may still start the task as the user.
        """
        if self._pool is None:
            return
        released = self._pool.release(task_id, lost_launcher)
        if released is None:
            return
        if self._group is None:
            raise RuntimeError("TaskRunner.attach must be called before tasks start")
        uid, job_id = released
        if self._detached:
            # A restarted agent sweeps the user before its first start.
            logger.info("agent stopping: pool user uid %d of job %s is not freed", uid, job_id)
            return
        freeing = self._free_user(uid, job_id)
        try:
            task = self._group.create_task(freeing, name=f"free-uid-{uid}")
        except RuntimeError:
            # The task group is shutting down. A restarted agent sweeps the user before its
            # first start.
            freeing.close()
            logger.info("agent stopping: pool user uid %d of job %s is not freed", uid, job_id)
            return
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _free_user(self, uid: int, job_id: str) -> None:
        pool = self._pool
        assert pool is not None

        def seal() -> None:
            # Until it is the agent's again, a later job with the user could read its files.
            # A job that has a user again (a task of it started meanwhile) keeps its folder.
            if not pool.has_user(job_id):
                seal_job_folder(self._task_dir, job_id)

        await pool.reclaim(uid, seal)

    def _forget_once_spooled(self, task: _Task) -> None:
        """Let an ended task go from the state file's tasks once its end event is in the spool.

        If no usage report has covered its end by then, it goes to the ended-task journal, so
        a restarted agent still reports its usage up to its end. A played task has no process
        to find again, so it leaves the file at once.
        """
        record = task.record
        if not record.pid or self._after_spooled is None:
            self._state.remove_task(self._node_key, record.task_id, durable=record.pid != 0)
            return

        def spooled() -> None:
            if task.ended_at is not None and self._ended_since_usage.get(record.task_id) is task:
                self._state.end_task(self._node_key, record.task_id, task.ended_at)
            else:
                self._state.remove_task(self._node_key, record.task_id)

        self._after_spooled(spooled)

    def _failure_under(self, record: TaskRecord) -> str | None:
        """Return the health event id of a failed accelerator of the task, or None."""
        for uuid in record.accelerators:
            if uuid in self._unusable:
                return self._unusable[uuid]
        return None

    # Restart ---------------------------------------------------------------------------------

    def recover(self) -> None:
        """Adopt the tasks in the state file that still run; report the others as lost."""
        self._resolve_intents()
        # Tasks whose end was reported but not yet the usage up to it.
        for record in self._state.node(self._node_key).ended.values():
            self._ended_since_usage[record.task_id] = _Task(record, ended_at=record.ended_at)
        for record in list(self._state.node(self._node_key).tasks.values()):
            task = _Task(record)
            if not record.pid:
                self._tasks[record.task_id] = task
                self._emit_state(record, TaskState.RUNNING, "played task resumed after restart")
                continue
            # The pidfd is opened before the start time is compared, so it cannot refer to a
            # process that took the pid over after the comparison.
            process = TaskProcess(
                record.pid, exit_path=self._exit_path(record.task_id), recorder=_recorder(record)
            )
            if process_start_ticks(record.pid) == record.process_start_ticks:
                task.process = process
                task.cgroup = self._find_cgroup(record)
                self._tasks[record.task_id] = task
                self._claim_user(record)
                logger.info("task %s found again as pid %d", record.task_id, record.pid)
                self._emit_state(record, TaskState.RUNNING, "found again after agent restart")
                self._supervise(task)
                continue
            process.set_exited()
            logger.warning(
                "task %s (pid %d) ended while the agent was down", record.task_id, record.pid
            )
            self._report_ended_while_down(record)

    def _find_cgroup(self, record: TaskRecord) -> Path | None:
        """Return the cgroup of an adopted task, found by its name, or None if it has none."""
        if self._cgroups is None:
            return None
        cgroup = self._cgroups.find(record.task_id)
        if cgroup is None:
            # Started by an agent without ACSP_AGENT_TASK_CGROUP: the spawn id finds its strays.
            logger.warning(
                "task %s found again has no cgroup in %s; its stop finds the processes it left "
                "by their spawn id",
                record.task_id,
                self._cgroups.root,
            )
        return cgroup

    def _claim_user(self, record: TaskRecord) -> None:
        """Give a task found running again the pool user that its process runs as."""
        if self._pool is None:
            return
        uid = process_uid(record.pid)
        if uid is None or not self._pool.claim(record.job_id, record.task_id, uid):
            logger.warning(
                "task %s found again runs as uid %s, which is not in the task user pool",
                record.task_id,
                uid,
            )

    def _report_ended_while_down(self, record: TaskRecord) -> None:
        """Report a task whose process ended while the agent was not running.

        The task's launcher recorded its exit status, or records it soon if the task has just
        ended. When the launcher itself was killed, or an agent without a launcher started the
        task, the task is lost and the scheduler requeues it.
        """
        cgroup = None if self._cgroups is None else self._cgroups.find(record.task_id)
        if cgroup is not None:
            spared = self._spared_launchers((record.launcher_pid, record.launcher_start_ticks))
            strays = kill_and_remove_now(cgroup, record.task_id, spared)
            if os.path.isdir(cgroup):
                self._remove_later(cgroup, record.task_id, spared)
        else:
            strays = kill_task_processes(record.spawn_id)
        if strays:
            logger.warning(
                "task %s left %d processes behind while the agent was down; killed them",
                record.task_id,
                strays,
            )
        exit_path = self._exit_path(record.task_id)
        exit_code = read_exit_status(exit_path)
        if exit_code is None and recorder_alive(_recorder(record)):
            assert self._group is not None
            self._group.create_task(self._report_once_recorded(record, exit_path))
            return
        self._report_ended(record, exit_code)

    async def _report_once_recorded(self, record: TaskRecord, exit_path: Path) -> None:
        self._report_ended(record, await wait_for_exit_status(exit_path, _recorder(record)))

    def _report_ended(self, record: TaskRecord, exit_code: int | None) -> None:
        state = _ended_state(record, exit_code, self._failure_under(record))
        ended_at = None
        if exit_code is None:
            reason = "the process ended while the agent was down; its exit status is unknown"
        else:
            reason = record.stop_reason or "exited while the agent was down"
            # The launcher wrote the status file when it reaped the task.
            ended_at = _modified_at(self._exit_path(record.task_id))
        task = _Task(record)
        # NOTE: a trim here copies on the event loop. It runs once for each task that ended
        # while the agent was down, and only for a log over its limit.
        self._trim_log(record)
        self._log_trim_failed.discard(record.task_id)
        if ended_at is not None:
            # Its usage since the last report is reported with the next one.
            task.ended_at = max(ended_at, record.started_at)
            self._ended_since_usage[record.task_id] = task
        self._remember(record.task_id, state)
        self._emit_state(record, state, reason, exit_code, _tail(record.log_path), task.ended_at)
        self._forget_once_spooled(task)

    def _resolve_intents(self) -> None:
        """Turn each start intent left by a crash into a task record, or drop it.

        A process that carries the intent's spawn id is adopted. An intent whose log file
        exists but whose process does not ran and ended while the agent was down, and is
        reported lost. An intent without a log file never reached the spawn: it is dropped
        unreported, so the redelivered start command starts the task once.

        NOTE: a crash after :func:`spawn` created the log file and before the process existed
        (microseconds, with no await between) gets the task reported lost though it never ran.
        """
        node = self._state.node(self._node_key)
        intents = list(node.intents.values())
        if not intents:
            return
        unrecorded = [record for record in intents if record.task_id not in node.tasks]
        spawn_ids = {record.spawn_id for record in unrecorded}
        leaders = find_task_leaders(SPAWN_ID_ENV, spawn_ids) if unrecorded else {}
        for record in intents:
            self._state.remove_intent(self._node_key, record.task_id)
        for record in unrecorded:
            record.log_path = str(self._log_path(record.task_id))
            pid = leaders.get(record.spawn_id)
            if pid is not None:
                record.pid = pid
                record.process_start_ticks = process_start_ticks(pid) or 0
                logger.warning(
                    "task %s was spawned as pid %d but not recorded before the agent stopped; "
                    "adopting it",
                    record.task_id,
                    pid,
                )
                self._state.put_task(self._node_key, record)
            elif os.path.exists(record.log_path):
                logger.warning(
                    "task %s was spawned but not recorded, and ended while the agent was down",
                    record.task_id,
                )
                self._report_ended_while_down(record)
            else:
                logger.info(
                    "task %s was not spawned before the agent stopped; its start command "
                    "is redelivered",
                    record.task_id,
                )
                # Made before the spawn. The redelivered start makes it again.
                launcher = (record.launcher_pid, record.launcher_start_ticks)
                self._remove_empty_cgroup(record.task_id, launcher)

    # Usage -----------------------------------------------------------------------------------

    def intervals(self, start: float, end: float) -> list[TaskInterval]:
        """Return each task's share of ``[start, end)``, then forget tasks that ended."""
        result = []
        for task in [*self._tasks.values(), *self._ended_since_usage.values()]:
            record = task.record
            begin = max(start, record.started_at)
            finish = min(end, task.ended_at if task.ended_at is not None else end)
            if finish > begin:
                result.append(
                    TaskInterval(
                        record.job_id,
                        record.task_id,
                        tuple(record.accelerators),
                        begin,
                        finish,
                        tuple(record.accelerator_millis),
                    )
                )
        self._ended_since_usage.clear()
        return result

    # Helpers ---------------------------------------------------------------------------------

    def _remember(self, task_id: str, state: TaskState) -> None:
        self._finished[task_id] = state
        while len(self._finished) > _REMEMBERED_FINISHED:
            self._finished.popitem(last=False)

    def _emit_state(
        self,
        record: TaskRecord,
        state: TaskState,
        reason: str,
        exit_code: int | None = None,
        output: str = "",
        time: float | None = None,
        health_event_id: str = "",
    ) -> None:
        self._emit(
            TaskEvent(
                job_id=record.job_id,
                task_id=record.task_id,
                state=state,
                time=self._clock() if time is None else time,
                reason=reason,
                exit_code=exit_code,
                output_tail=output,
                accelerators=tuple(record.accelerators),
                health_event_id=health_event_id,
            )
        )


def remove_stale_cgroups(runners: Sequence[TaskRunner]) -> int:
    """Kill and remove the task cgroups that belong to no task of ``runners``, and return how
    many were found.

    An agent that stops while a cgroup stays populated after SIGKILL leaves it in place (see
    :meth:`TaskRunner.detach`), and its task may be gone from the state file by then. Call this
    once every runner of the agent process has recovered, because they share the cgroup
    folder. The first runner of each folder removes such cgroups, and retries the ones that
    stay populated with its backoff. Launchers that record the exit status of a task of
    ``runners``, and the runners' own, are spared.
    """
    by_root: dict[Path, list[TaskRunner]] = {}
    for runner in runners:
        if runner._cgroups is not None:
            by_root.setdefault(runner._cgroups.root, []).append(runner)
    found = 0
    for owners in by_root.values():
        tracked: set[str] = set()
        launchers: set[LauncherIdentity] = set()
        for runner in owners:
            tracked |= runner._cgroup_task_ids()
            launchers |= runner._recorders() | set(runner._spared_launchers((0, 0)))
        owner = owners[0]
        assert owner._cgroups is not None
        stale = owner._cgroups.stale(tracked)
        spared = tuple(launchers)
        # So that the runner of every node rejects a start of a task whose cgroup is one of these.
        for runner in owners:
            assert runner._cgroups is not None
            runner._cgroups.stale_names.update(cgroup.name for cgroup in stale)
        for cgroup in stale:
            owner._remove_stale_cgroup(cgroup, spared)
        found += len(stale)
    return found


def _ended_state(record: TaskRecord, exit_code: int | None, failure: str | None) -> TaskState:
    """Return the final state of a task whose process ended with ``exit_code``."""
    if record.stop_reason == TIMED_OUT:
        return TaskState.TIMED_OUT
    if failure is not None and (record.stop_reason or exit_code != 0):
        # The scheduler stops the tasks of a failed accelerator, and a task that fails on its
        # own while the device is failed is put down to the device.
        return TaskState.FAILED_HARDWARE
    if record.stop_reason == AGENT_EXIT:
        # No one asked for the stop, and the job did nothing wrong: the scheduler requeues a
        # lost task's job instead of failing it.
        return TaskState.LOST
    if record.stop_reason:
        return TaskState.STOPPED
    if exit_code is None:
        # No exit status was recorded (the shell that waits for the task was killed too).
        # Reporting it as an exit would send exit code 0 and pass a failed task as succeeded.
        return TaskState.LOST
    if exit_code == 0:
        return TaskState.SUCCEEDED
    return TaskState.FAILED


def _modified_at(path: Path) -> float | None:
    """Return the modification time of ``path``, or None if it cannot be read."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _recorder(record: TaskRecord) -> tuple[int, int] | None:
    """Return the launcher that records ``record``'s exit status (pid, start ticks), if any."""
    if not record.launcher_pid:
        return None
    return record.launcher_pid, record.launcher_start_ticks


def _signal_group(pid: int, signum: int) -> bool:
    """Send ``signum`` to the process group led by ``pid``; return False if it is gone."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError as error:
        logger.error("cannot signal process group %d: %s", pid, error)
        return False
    return True


def _within_limit(path: str, max_bytes: int) -> bool:
    """Return True if the log at ``path`` is missing or at most ``max_bytes`` long.

    An error other than a missing file returns False, so that the trim reports it.
    """
    if not path:
        return True
    try:
        return os.lstat(path).st_size <= max_bytes
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _trim_or_error(path: str, max_bytes: int) -> int | OSError:
    """Trim the log at ``path`` (see :func:`trim_log`); return the bytes dropped or the error.

    A missing path or log counts as nothing dropped.
    """
    if not path:
        return 0
    try:
        return trim_log(path, max_bytes)
    except FileNotFoundError:
        return 0  # The task removed its log.
    except OSError as error:
        return error


def _tail(path: str, size: int = OUTPUT_TAIL_BYTES) -> str:
    """Return the end of a task's log for its end event, or "" when it cannot be read.

    The open never follows a symbolic link and never waits on a FIFO that a task left in place
    of its log (see :func:`agents.task_logs.read_tail`), so it is safe on the event loop.
    """
    if not path:
        return ""
    try:
        return read_tail(path, size).data.decode("utf-8", errors="replace")
    except OSError:
        return ""

"""``python -m agents``: run the node agent (NVML) or a simulated fleet.

Examples::

    python -m agents --backend nvml --provider acme --region eu-1
    python -m agents --backend simulated --nodes 5000 --speed 60

Settings come from ``ACSP_*`` variables (:mod:`agents.settings`); options given here
override them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from acsp.cli._common import whole_number
from agents import wire
from agents.backends.base import Backend, BackendError
from agents.dead_letters import DEAD_LETTERS_FILE_NAME, DeadLetters
from agents.health import HealthSettings
from agents.launcher import drop_inheritable_capabilities
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.private_files import restrict_modes
from agents.process import AgentProcess, ConnectionOptions, Intervals
from agents.scratch_folders import ScratchSweeper, check_scratch_dirs
from agents.settings import AgentSettings
from agents.simulated_inputs import SimulatedInputError, SimulatedInputs, load_simulated_inputs
from agents.spool import Spool
from agents.state import StateStore
from agents.state_lock import LOCK_FILE_NAME, StateFolderLock
from agents.task_cgroups import (
    TASK_CGROUP_ENV,
    TaskCgroupError,
    TaskCgroups,
    check_task_cgroup,
)
from agents.task_process import TaskLauncher
from agents.task_user import (
    POOL_LAUNCHER_CAPABILITIES,
    TASK_USER_ENV,
    check_agent_can_switch,
    check_task_folder_reachable,
    warn_readable_files,
)
from agents.task_users import TASK_USERS_ENV, TaskUserPool
from services.runtime.errors import StartupError
from services.runtime.heap import settle_heap
from services.runtime.settings import SettingsError
from services.runtime.tls import load_nats_ssl_context

logger = logging.getLogger(__name__)


RETIRING_HINT = (
    "A node whose agent stops stays in the scheduler's fleet as unknown, and nothing is placed "
    "on it. To retire it: acsp fleet drain, stop the agent once the node shows as drained, then "
    "acsp fleet delete (docs/deploy.md, Retiring a node)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the agent's options and :data:`RETIRING_HINT` to ``parser`` (shared with
    ``acsp agent run``)."""
    parser.epilog = RETIRING_HINT
    parser.add_argument("--backend", choices=("nvml", "simulated"), help="accelerator backend")
    parser.add_argument("--nats-url", help="NATS URL(s), comma-separated (ACSP_NATS_URL)")
    parser.add_argument(
        "--provider", help="nvml: provider id (ACSP_AGENT_PROVIDER); simulated: see --fleet"
    )
    parser.add_argument(
        "--region", help="nvml: region id (ACSP_AGENT_REGION); simulated: see --fleet"
    )
    parser.add_argument("--node", help="node id for the NVML backend (ACSP_AGENT_NODE)")
    parser.add_argument("--state-dir", type=Path, help="state, spool and logs folder")
    parser.add_argument(
        "--nodes", type=whole_number(1), help="simulated: number of nodes (default: all)"
    )
    parser.add_argument(
        "--fleet",
        action="append",
        metavar="FILE:PROVIDER:REGION",
        help=(
            "simulated: fleet file (CSV) and the provider and region ids its nodes register "
            "under, e.g. acme.csv:acme:eu-1; both ids are required, and provider and region "
            "columns of a node,model,accelerators file override them per row. Rows with 0 "
            "accelerators are skipped. Repeat for several files (default: the two Alibaba "
            "node lists, as providers openb and spot)"
        ),
    )
    parser.add_argument("--faults", help="simulated: fault trace JSON, or 'none'")
    parser.add_argument("--utilization", help="simulated: utilization trace, or 'none'")
    parser.add_argument("--speed", type=float, help="simulated: time compression factor")
    parser.add_argument("--heartbeat-s", type=float, help="seconds between heartbeats")
    parser.add_argument("--usage-s", type=float, help="seconds between usage reports")
    parser.add_argument("--read-s", type=float, help="seconds between readings")


_OPTION_FIELDS = {
    "backend": "--backend",
    "nats_url": "--nats-url",
    "provider": "--provider",
    "region": "--region",
    "node": "--node",
    "state_dir": "--state-dir",
    "speed": "--speed",
    "heartbeat_s": "--heartbeat-s",
    "usage_s": "--usage-s",
    "read_s": "--read-s",
}
"""Settings fields that a command-line option overrides, and the option of each."""


def settings_from(args: argparse.Namespace) -> AgentSettings:
    """Read the environment, then apply the options given on the command line.

    An option is parsed and checked like the environment variable it overrides (URL form,
    minimum), and a :class:`SettingsError` about it names the option.
    """
    environ = dict(os.environ)
    options: dict[str, str] = {}
    variables = {spec.name: spec.metadata["env"] for spec in dataclasses.fields(AgentSettings)}
    for name, option in _OPTION_FIELDS.items():
        value = getattr(args, name)
        if value is None:
            continue
        environ[variables[name]] = str(value)
        options[variables[name]] = option
    try:
        return AgentSettings.from_env(environ)
    except SettingsError as error:
        given = options.get(error.variable)
        if given is None:
            raise
        raise SettingsError(f"{given} ({error.variable})", error.reason, error.fix) from None


def build_process(
    settings: AgentSettings, args: argparse.Namespace, boot_id: str | None = None
) -> AgentProcess:
    """Build the nodes, the spool, the outbox and the process from settings and options."""
    state_dir = settings.agent_state_dir
    if state_dir.exists() and not state_dir.is_dir():
        raise SettingsError(
            "ACSP_AGENT_STATE_DIR",
            f"{state_dir} is not a folder",
            "point it to a folder, or to a path where the agent can create one",
        )
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SettingsError(
            "ACSP_AGENT_STATE_DIR",
            f"folder {state_dir} cannot be created: {error.strerror or error}",
            "point it to a folder the agent can write, or to a place where it can create one",
        ) from None
    try:
        # A file made and removed there checks the access the agent has, with its capabilities.
        tempfile.TemporaryFile(dir=state_dir).close()
    except OSError as error:
        raise SettingsError(
            "ACSP_AGENT_STATE_DIR",
            f"no file can be created in folder {state_dir}: {error.strerror or error}",
            "give the agent's user write and search access to it, and free space there",
        ) from None
    # Taken before anything in the folder is read or written, and held until the agent stops.
    state_lock = StateFolderLock.acquire(state_dir)
    inputs = None
    if settings.backend == "simulated":
        # Read before the state and the spool are opened, so that a bad input file leaves
        # neither of them behind.
        try:
            inputs = load_simulated_inputs(args)
        except SimulatedInputError:
            state_lock.release()
            raise
    check_isolation(settings)
    task_cgroups = _task_cgroups(settings)
    state = StateStore(state_dir / "state.json")
    spool_dir = state_dir / "spool"
    dead_letters_path = state_dir / DEAD_LETTERS_FILE_NAME
    # Created private now, but an earlier version may have left them readable by others.
    restrict_modes([*state.files, spool_dir, dead_letters_path, state_dir / LOCK_FILE_NAME])
    outbox = Outbox(
        Spool(spool_dir, max_bytes=settings.spool_max_bytes),
        before_append=state.save_before_spool,
        dead_letters=DeadLetters(dead_letters_path),
        max_rejections=settings.max_message_rejections,
    )
    boot = boot_id or uuid.uuid4().hex[:12]
    health_settings = HealthSettings(settings.clear_after_s, settings.double_bit_threshold)
    version = _agent_version()
    launcher = None
    if settings.record_exit_status:
        launcher = TaskLauncher(
            task_user=settings.task_user,
            user_per_request=bool(settings.task_users),
            cgroup_home=None if task_cgroups is None else task_cgroups.launcher_home,
        )
    common = {
        "state": state,
        "work_dir": state_dir,
        "outbox": outbox,
        "boot_id": boot,
        "clock": time.time,
        "health_settings": health_settings,
        "agent_version": version,
        "launcher": launcher,
        "task_user": settings.task_user,
        "task_users": _task_user_pool(settings),
        "task_cgroups": task_cgroups,
        "task_log_max_bytes": settings.task_log_max_bytes,
        "host": settings.host,
        "rendezvous_ports": settings.rendezvous_ports,
    }
    nodes: list[NodeAgent] = []
    if inputs is None:
        from agents.backends.nvml import NvmlBackend

        ref = wire.NodeRef(settings.provider, settings.region, settings.node)
        nodes.append(
            NodeAgent(ref, NvmlBackend(), "nvml", blocking_backend=True, **common)  # type: ignore[arg-type]
        )
    else:
        nodes = _simulated_nodes(settings, inputs, common)
    connection = ConnectionOptions(
        servers=[s.strip() for s in (settings.nats_url or "nats://127.0.0.1:4222").split(",")],
        user=settings.nats_user,
        password=settings.nats_password,
        creds_file=str(settings.nats_creds) if settings.nats_creds else None,
        name=f"acsp-agent-{settings.backend}",
        tls=load_nats_ssl_context(settings),
        inbox_prefix=inbox_prefix({node.ref.provider for node in nodes}),
    )
    intervals = Intervals(settings.heartbeat_s, settings.read_s, settings.usage_s)
    return AgentProcess(
        nodes,
        outbox,
        state,
        connection,
        intervals,
        per_provider_consumers=settings.backend == "simulated",
        stop_tasks_on_exit=settings.stop_tasks_on_exit,
        stop_grace_s=settings.shutdown_grace_s,
        launcher=launcher,
        state_lock=state_lock,
    )


def _task_cgroups(settings: AgentSettings) -> TaskCgroups | None:
    """Check and lock the folder of ``ACSP_AGENT_TASK_CGROUP``, and make the launcher's cgroup
    in it.

    Raises :class:`SettingsError` naming the reason and the fix.
    """
    root = settings.task_cgroup
    if root is None:
        return None
    cgroups = TaskCgroups(root)
    try:
        check_task_cgroup(root)
        cgroups.lock()
        cgroups.make_launcher_home()
    except TaskCgroupError as error:
        raise SettingsError(TASK_CGROUP_ENV, error.reason, error.fix) from None
    except OSError as error:
        raise SettingsError(
            TASK_CGROUP_ENV,
            f"cgroup {cgroups.launcher_home} cannot be created: {error.strerror or error}",
            "delegate the folder to the agent's user (systemd: Delegate=yes)",
        ) from None
    logger.info("each task runs in its own cgroup under %s", root)
    return cgroups


def _task_user_pool(settings: AgentSettings) -> TaskUserPool | None:
    if not settings.task_users:
        return None
    scratch = ScratchSweeper(settings.scratch_dirs) if settings.scratch_dirs else None
    return TaskUserPool(settings.task_users, scratch)


def check_isolation(settings: AgentSettings) -> None:
    """Check that tasks can run as the task user, and warn of credentials others may read.

    An agent that runs as root without a task user or pool logs a warning, because its tasks
    run as root too.

    Raises :class:`SettingsError` when the agent cannot switch to the task user, or the task
    user cannot reach the task folder.
    """
    user = settings.task_user
    credentials = [
        ("ACSP_NATS_CREDS", settings.nats_creds),
        ("ACSP_NATS_TLS_KEY", settings.nats_tls_key),
        ("ACSP_TLS_KEY", settings.tls_key),
    ]
    files = [(name, path) for name, path in credentials if path is not None]
    if settings.task_users:
        check_pool_isolation(settings, files)
        return
    warn_readable_files(user, files)
    if user is None:
        if os.geteuid() == 0:
            logger.warning(
                "the agent runs as root and neither %s nor %s is set, so every job's tasks run "
                "as root. A job's code can then read and change any file on this machine, such "
                "as the agent's NATS credentials and state, or a local mesh's passwords and "
                "token signing key. Set %s to an unprivileged user for the tasks "
                "(docs/deploy.md, Tasks as a separate user)",
                TASK_USER_ENV,
                TASK_USERS_ENV,
                TASK_USER_ENV,
            )
        return
    check_agent_can_switch(user, uses_launcher=settings.record_exit_status)
    check_task_folder_reachable(user, settings.agent_state_dir)
    warn_readable_files(user, [("ACSP_AGENT_STATE_DIR", settings.agent_state_dir)])
    if not settings.record_exit_status:
        # The agent starts the tasks itself, so they must not inherit its capabilities.
        drop_inheritable_capabilities()
    logger.info("tasks run as %s", user)


def check_pool_isolation(settings: AgentSettings, files: list[tuple[str, Path]]) -> None:
    """Check each user of ``ACSP_AGENT_TASK_USERS`` as :func:`check_isolation` checks one.

    A file that several users may read gets one warning.
    """
    files = [*files, ("ACSP_AGENT_STATE_DIR", settings.agent_state_dir)]
    for user in settings.task_users:
        check_agent_can_switch(
            user,
            uses_launcher=settings.record_exit_status,
            variable=TASK_USERS_ENV,
            launcher_capabilities=POOL_LAUNCHER_CAPABILITIES,
        )
        check_task_folder_reachable(user, settings.agent_state_dir)
        flagged = warn_readable_files(user, files)
        files = [(name, path) for name, path in files if name not in flagged]
    check_scratch_dirs(settings.scratch_dirs)
    if not settings.record_exit_status:
        drop_inheritable_capabilities()
    logger.info(
        "tasks run as one of %d pool users per job: %s … %s; their files in %s are removed "
        "before another job gets the user",
        len(settings.task_users),
        settings.task_users[0],
        settings.task_users[-1],
        ", ".join(map(str, settings.scratch_dirs)) or "no folder",
    )


def inbox_prefix(providers: set[str]) -> str | None:
    """Return ``_INBOX.<provider>`` for a process serving one provider, else None.

    A provider's NATS user may subscribe only to its own inboxes. A simulated fleet of
    several providers shares one connection, which only a user without that limit (a
    local server) accepts, so it keeps the default ``_INBOX``.
    """
    if len(providers) == 1:
        return f"_INBOX.{next(iter(providers))}"
    logger.warning(
        "serving %d providers on one connection: replies use the shared _INBOX, which a "
        "provider's NATS user may not read",
        len(providers),
    )
    return None


def _simulated_nodes(
    settings: AgentSettings, inputs: SimulatedInputs, common: dict[str, object]
) -> list[NodeAgent]:
    from agents.backends.simulated import SimulatedBackend

    fault_speed = settings.fault_speed or settings.speed
    nodes = []
    for index, spec in enumerate(inputs.fleet):
        backend: Backend = SimulatedBackend(
            spec,
            speed=fault_speed,
            faults=inputs.faults.get(index, ()),
            utilization=inputs.utilization,
        )
        ref = wire.NodeRef(spec.provider, spec.region, spec.node)
        node = NodeAgent(ref, backend, "simulated", play_speed=settings.speed, **common)  # type: ignore[arg-type]
        backend.set_busy(node.busy)  # type: ignore[attr-defined]
        nodes.append(node)
    logger.info(
        "simulating %d nodes with %d accelerators",
        len(nodes),
        sum(s.accelerators for s in inputs.fleet),
    )
    return nodes


def _agent_version() -> str:
    try:
        return metadata.version("acsp")
    except metadata.PackageNotFoundError:
        return "unknown"


async def run(process: AgentProcess) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await process.run(stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except SettingsError as error:
        print(f"agent: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        process = build_process(settings, args)
    except (StartupError, SimulatedInputError) as error:
        for line in str(error).splitlines():
            print(f"agent: {line}", file=sys.stderr)
        return 2
    failures: list[BaseException] = []
    settle_heap()
    try:
        asyncio.run(run(process))
    except* BackendError as group:
        failures.extend(group.exceptions)
    for failure in failures:
        print(f"agent: {failure}; check the driver, or use --backend simulated", file=sys.stderr)
    return 1 if failures else 0

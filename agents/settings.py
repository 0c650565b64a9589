"""The node agent's settings, read once from ``ACSP_*`` environment variables.

The shared fields (``ACSP_NATS_URL``, ``ACSP_NATS_USER``/``ACSP_NATS_PASSWORD`` or
``ACSP_NATS_CREDS``, ``ACSP_DATA_DIR``, ``ACSP_LOG_LEVEL`` …) come from
:class:`services.runtime.settings.Settings`; the agent adds its own below. Command-line
options of ``python -m agents`` override them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from acsp.rendezvous import (
    DEFAULT_PORT_RANGE,
    MAX_HOST_CHARACTERS,
    is_valid_host,
    parse_port_range,
)
from acsp.subjects import TOKEN_PATTERN
from agents.scratch_folders import (
    DEFAULT_SCRATCH_DIRS,
    NO_SCRATCH_DIRS,
    SCRATCH_DIRS_ENV,
    parse_scratch_dirs,
)
from agents.task_cgroups import TASK_CGROUP_ENV, parse_task_cgroup
from agents.task_logs import MIN_TASK_LOG_MAX_BYTES, TASK_LOG_MAX_BYTES
from agents.task_user import TASK_USER_ENV, TaskUser, parse_task_user
from agents.task_users import MAX_POOL_USERS, TASK_USERS_ENV, parse_task_users
from services.runtime.settings import Settings, SettingsError, setting

Backend = Literal["nvml", "simulated"]


def _default_node() -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name[:64] or "node"


def parse_host(text: str) -> str:
    """Check an address or hostname; raise ValueError naming the allowed characters."""
    if not is_valid_host(text):
        raise ValueError(
            f"{text!r} is not an address or hostname of 1 to {MAX_HOST_CHARACTERS} of "
            "A-Z a-z 0-9 . - _ :"
        )
    return text


@dataclass(frozen=True)
class AgentSettings(Settings):
    backend: Backend = setting("ACSP_AGENT_BACKEND", "nvml", "accelerator backend: nvml, simulated")
    provider: str = setting("ACSP_AGENT_PROVIDER", "local", "provider id in subjects")
    region: str = setting("ACSP_AGENT_REGION", "region-1", "region id in subjects")
    node: str = setting("ACSP_AGENT_NODE", _default_node(), "node id in subjects (NVML backend)")
    state_dir: Path | None = setting(
        "ACSP_AGENT_STATE_DIR", None, "folder for the state file, spool and task logs"
    )
    heartbeat_s: float = setting(
        "ACSP_AGENT_HEARTBEAT_S", 5.0, "seconds between heartbeats", minimum=0.1
    )
    read_s: float = setting(
        "ACSP_AGENT_READ_S", 5.0, "seconds between accelerator readings", minimum=0.1
    )
    usage_s: float = setting(
        "ACSP_AGENT_USAGE_S", 10.0, "seconds between usage reports", minimum=0.1
    )
    spool_max_bytes: int = setting(
        "ACSP_AGENT_SPOOL_MAX_BYTES", 256 << 20, "bytes of unsent messages kept on disk", minimum=1
    )
    task_log_max_bytes: int = setting(
        "ACSP_AGENT_TASK_LOG_MAX_BYTES",
        TASK_LOG_MAX_BYTES,
        "size in bytes at which a task's log is trimmed to the first and the latest quarter of "
        "this size, with a line that counts the bytes dropped between them; at least "
        f"{MIN_TASK_LOG_MAX_BYTES}",
        minimum=MIN_TASK_LOG_MAX_BYTES,
    )
    max_message_rejections: int = setting(
        "ACSP_AGENT_MAX_MESSAGE_REJECTIONS",
        5,
        "times JetStream may reject a spooled message for good (over the stream's max_msg_size"
        " or the server's max_payload, no stream for its subject), counted at most once every"
        " 5 s, before the message moves from the spool to dead_letters.jsonl in the state"
        " directory",
        minimum=1,
    )
    clear_after_s: float = setting(
        "ACSP_AGENT_HEALTH_CLEAR_AFTER_S",
        300.0,
        "seconds without recurrence before an event-type health condition clears",
        minimum=0,
    )
    double_bit_threshold: int = setting(
        "ACSP_AGENT_DBE_THRESHOLD",
        10,
        "lifetime uncorrected ECC errors that mark a GPU unusable",
        minimum=1,
    )
    speed: float = setting(
        "ACSP_AGENT_SPEED",
        1.0,
        "simulated backend: how many times faster played run times and traces pass",
        minimum=0.001,
    )
    fault_speed: float | None = setting(
        "ACSP_AGENT_FAULT_SPEED",
        None,
        "simulated backend: speed of the fault trace, default ACSP_AGENT_SPEED",
        minimum=0.001,
    )

    stop_tasks_on_exit: bool = setting(
        "ACSP_AGENT_STOP_TASKS_ON_EXIT",
        False,
        "choice to stop the tasks' processes when the agent stops (true for a local mesh "
        "shutting down); false by default, so tasks keep running for a restarted agent to adopt",
    )

    record_exit_status: bool = setting(
        "ACSP_AGENT_RECORD_EXIT_STATUS",
        True,
        "choice to start tasks through a task launcher process, which records each task's exit "
        "status for a restarted agent; with false, the agent starts tasks itself, and a task "
        "that ends after the agent restarted is reported lost and its job runs again",
    )

    task_user: TaskUser | None = setting(
        TASK_USER_ENV,
        None,
        "unprivileged user that tasks run as: a name or uid, optionally with :group (a name or "
        "gid); empty runs them as the agent's own user",
        parse=parse_task_user,
    )

    task_users: tuple[TaskUser, ...] = setting(
        TASK_USERS_ENV,
        (),
        "pool of unprivileged users that tasks run as, one per job running on the node: a "
        "comma-separated list of names or uids, each optionally with :group, and uid ranges "
        f"FIRST-LAST[:group] (a uid without a user database entry needs its group), at most "
        f"{MAX_POOL_USERS} users; the agent kills every process of a user when it frees it, "
        f"so nothing else may run as them; empty uses {TASK_USER_ENV}",
        parse=parse_task_users,
    )

    scratch_dirs: tuple[Path, ...] = setting(
        SCRATCH_DIRS_ENV,
        DEFAULT_SCRATCH_DIRS,
        f"comma-separated absolute folders that the tasks of {TASK_USERS_ENV} share, from "
        "which the agent removes a pool user's files before another job gets the user; "
        f"{','.join(map(str, DEFAULT_SCRATCH_DIRS))} by default, {NO_SCRATCH_DIRS} for no "
        "folder",
        parse=parse_scratch_dirs,
    )

    task_cgroup: Path | None = setting(
        TASK_CGROUP_ENV,
        None,
        "absolute path of a cgroup v2 folder delegated to the agent (for example "
        "/sys/fs/cgroup/system.slice/acsp-agent.service/tasks), in which each task gets its own "
        "cgroup, so that a stop kills every process the task started; the kernel must be Linux "
        "5.14 or later (cgroup.kill); empty finds a task's processes by its process group and "
        "the spawn id in their environment only",
        parse=parse_task_cgroup,
    )

    host: str = setting(
        "ACSP_AGENT_HOST",
        socket.gethostname(),
        "address or hostname at which the tasks of other nodes reach this node's tasks, given "
        "to tasks as their rendezvous host and in their hosts file: 1 to "
        f"{MAX_HOST_CHARACTERS} of A-Z a-z 0-9 . - _ :; the machine's hostname by default",
        parse=parse_host,
    )

    rendezvous_ports: tuple[int, int] = setting(
        "ACSP_AGENT_RENDEZVOUS_PORTS",
        DEFAULT_PORT_RANGE,
        "range LOW-HIGH of ports from which the scheduler picks, by a hash of the job id, the "
        "port that a job's task 0 listens on when it runs on this node; a range of N ports "
        "gives two jobs whose task 0 share the node the same port with a chance of about 1/N",
        parse=parse_port_range,
    )

    def validate(self) -> None:
        super().validate()
        for variable, value in (
            ("ACSP_AGENT_PROVIDER", self.provider),
            ("ACSP_AGENT_REGION", self.region),
            ("ACSP_AGENT_NODE", self.node),
        ):
            if not TOKEN_PATTERN.match(value):
                raise SettingsError(
                    variable, f"{value!r} is not a subject token", "use 1-64 of A-Z a-z 0-9 _ -"
                )
        if self.task_user is not None and self.task_users:
            raise SettingsError(
                TASK_USERS_ENV,
                f"set together with {TASK_USER_ENV}={self.task_user.name}",
                f"unset {TASK_USER_ENV}, or add that user to the pool, or unset {TASK_USERS_ENV}"
                " to run every task as the one task user",
            )

    @property
    def agent_state_dir(self) -> Path:
        return self.state_dir or self.data_dir / "agent"

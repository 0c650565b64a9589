"""``acsp agent``: run the node agent and look at what it keeps on the node.

- ``acsp agent run``: the same as ``python -m agents`` (same options);
- ``acsp agent discover``: list the accelerators a backend finds, without NATS;
- ``acsp agent health``: the persistent health conditions in the state file;
- ``acsp agent tasks``: the tasks the agent started and still accounts for;
- ``acsp agent spool``: how many messages wait to be published;
- ``acsp agent clear-health UUID``: clear an accelerator's persistent conditions after a
  repair (the agent must be stopped, since it rewrites the state file).

``spool`` and ``clear-health`` write to the state folder (opening the spool repairs it), so
they take the lock that a running agent holds on the folder, and fail while an agent runs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

from acsp.cli._common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CommandError,
    output_options,
    print_records,
    whole_number,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("agent", help="run the node agent and inspect its state")
    commands = parser.add_subparsers(title="agent commands", metavar="COMMAND", required=True)

    from agents.main import add_arguments

    run = commands.add_parser("run", help="run the node agent (same as python -m agents)")
    add_arguments(run)
    run.set_defaults(func=_run)

    discover = commands.add_parser(
        "discover",
        parents=[output_options(amounts=False)],
        help="list the accelerators a backend finds",
    )
    discover.add_argument(
        "--backend",
        choices=("nvml", "simulated"),
        default="nvml",
        help="nvml reads the NVIDIA GPUs of this machine; simulated makes up nodes (default: nvml)",
    )
    discover.add_argument(
        "--nodes", type=whole_number(1), default=1, help="simulated: nodes to list (default: 1)"
    )
    discover.set_defaults(func=_discover)

    for name, function, help_text in (
        ("health", _health, "show persistent health conditions from the state file"),
        ("tasks", _tasks, "show the tasks the agent accounts for"),
        ("spool", _spool, "show how many messages wait in the spool"),
    ):
        sub = commands.add_parser(name, parents=[output_options(amounts=False)], help=help_text)
        _add_state_dir(sub)
        sub.set_defaults(func=function)

    clear = commands.add_parser(
        "clear-health", help="clear an accelerator's persistent health conditions"
    )
    _add_state_dir(clear)
    clear.add_argument("uuid", help="accelerator UUID")
    clear.add_argument("--cause", help="clear only this cause, e.g. xid:79")
    clear.add_argument("--node-key", help="<provider>.<region>.<node>; default: the only node")
    clear.set_defaults(func=_clear_health)


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="agent state folder (default: $ACSP_AGENT_STATE_DIR or $ACSP_DATA_DIR/agent)",
    )


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir)
    from agents.settings import AgentSettings

    return AgentSettings.from_env().agent_state_dir


def _run(args: argparse.Namespace) -> Any:
    from agents.main import SimulatedInputError, build_process, run, settings_from
    from services.runtime.errors import StartupError

    try:
        process = build_process(settings_from(args), args)
    except (StartupError, SimulatedInputError) as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    return _run_process(run(process))


async def _run_process(running: Coroutine[Any, Any, None]) -> None:
    """Await the agent, turning a failed accelerator library into one line."""
    from agents.backends.base import BackendError

    failures: list[BaseException] = []
    try:
        await running
    except* BackendError as group:
        failures.extend(group.exceptions)
    if failures:
        raise CommandError(
            f"{failures[0]}; check the driver, or use --backend simulated", EXIT_FAILURE
        )


def _discover(args: argparse.Namespace) -> int:
    records = []
    if args.backend == "nvml":
        from agents.backends.base import BackendError
        from agents.backends.nvml import NvmlBackend

        try:
            backend = NvmlBackend()
            try:
                inventories = [("local", backend.discover())]
            finally:
                backend.close()
        except BackendError as error:
            raise CommandError(
                f"{error}; on a machine without NVIDIA GPUs, use --backend simulated",
                EXIT_FAILURE,
            ) from None
    else:
        from agents.backends.fleet import DEFAULT_FLEETS, load_fleet
        from agents.backends.simulated import SimulatedBackend

        path, provider, region = DEFAULT_FLEETS[0]
        fleet = load_fleet(path, provider, region)[: args.nodes]
        inventories = [(spec.node, SimulatedBackend(spec).discover()) for spec in fleet]
    for node, inventory in inventories:
        for info in inventory.accelerators:
            records.append(
                {
                    "node": node,
                    "uuid": info.uuid,
                    "pci_bus_id": info.pci_bus_id,
                    "model": info.model,
                    "memory_gib": f"{info.memory_bytes / (1 << 30):.1f}",
                    "share_milli": info.share_milli,
                    "driver": info.driver_version,
                    "cuda": info.software_version,
                }
            )
    print_records(records, list(records[0]) if records else ["uuid"], output_format=args.format)
    return 0


def _state_file(args: argparse.Namespace) -> Path:
    path = _state_dir(args) / "state.json"
    if not path.exists():
        raise CommandError(f"no agent state file at {path}; pass --state-dir", EXIT_USAGE)
    return path


def _load_state(args: argparse.Namespace) -> Any:
    from agents.state import StateFileError, StateStore

    path = _state_file(args)
    try:
        return StateStore(path)
    except StateFileError as error:
        raise CommandError(str(error), EXIT_FAILURE) from None


def _health(args: argparse.Namespace) -> int:
    state = _load_state(args)
    records = [
        {"node": key, "uuid": uuid, "cause": cause}
        for key, node in sorted(state.nodes.items())
        for uuid, causes in sorted(node.health.items())
        for cause in causes
    ]
    print_records(records, ["node", "uuid", "cause"], output_format=args.format)
    return 0


def _tasks(args: argparse.Namespace) -> int:
    state = _load_state(args)
    records = [
        {
            "node": key,
            "task_id": task.task_id,
            "job_id": task.job_id,
            "pid": task.pid or "(played)",
            "accelerators": ",".join(task.accelerators),
            "stop_reason": task.stop_reason,
        }
        for key, node in sorted(state.nodes.items())
        for task in node.tasks.values()
    ]
    columns = ["node", "task_id", "job_id", "pid", "accelerators", "stop_reason"]
    print_records(records, columns, output_format=args.format)
    return 0


def _spool(args: argparse.Namespace) -> int:
    from agents.spool import Spool

    directory = _state_dir(args)
    path = directory / "spool"
    if not path.exists():
        raise CommandError(f"no spool at {path}; pass --state-dir", EXIT_USAGE)
    fix = (
        f"read the messages waiting in outbox_pending of {directory / 'stats.json'}, which the "
        "running agent rewrites every second, or stop the agent first, because opening its "
        "spool here could cut off a record it is writing"
    )
    with _locked_state_folder(directory, "acsp agent spool", fix):
        spool = Spool(path)
        pending = spool.pending_records
        pending_bytes = spool.pending_bytes
        spool.close()
    records = [{"pending_messages": pending, "pending_bytes": pending_bytes}]
    print_records(records, ["pending_messages", "pending_bytes"], output_format=args.format)
    return 0


def _clear_health(args: argparse.Namespace) -> int:
    directory = _state_file(args).parent
    fix = "stop the agent first, because it rewrites the state file, then run this again"
    with _locked_state_folder(directory, "acsp agent clear-health", fix):
        return _clear_locked(args)


def _clear_locked(args: argparse.Namespace) -> int:
    state = _load_state(args)
    keys = [args.node_key] if args.node_key else sorted(state.nodes)
    if len(keys) != 1:
        raise CommandError(f"the state file has {len(keys)} nodes; pass --node-key", EXIT_USAGE)
    node = state.node(keys[0])
    causes = node.health.get(args.uuid, [])
    remaining = [c for c in causes if args.cause is not None and c != args.cause]
    if len(remaining) == len(causes):
        condition = "persistent condition" if args.cause is None else f"condition {args.cause}"
        raise CommandError(
            f"accelerator {args.uuid} has no {condition}; list the conditions with "
            f"acsp agent health --state-dir {_state_dir(args)}",
            EXIT_USAGE,
        )
    health = dict(node.health)
    if remaining:
        health[args.uuid] = remaining
    else:
        health.pop(args.uuid)
    state.set_health(keys[0], health)
    print(f"cleared {len(causes) - len(remaining)} condition(s) of {args.uuid}")
    return 0


@contextlib.contextmanager
def _locked_state_folder(directory: Path, label: str, fix: str) -> Iterator[None]:
    """Hold the lock of the agent's state folder, or fail naming the agent that holds it."""
    from agents.state_lock import StateFolderLock
    from services.runtime.errors import StartupError

    try:
        lock = StateFolderLock.acquire(directory, label, fix)
    except StartupError as error:
        raise CommandError(str(error), EXIT_FAILURE) from None
    try:
        yield
    finally:
        lock.release()

"""``acsp up``, ``down``, ``status`` and ``token``: run, stop and inspect the local mesh."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Final

from acsp._channel import Credentials
from acsp.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NO_MESH,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    connection_options,
    output_options,
    positive_seconds,
    print_records,
    whole_number,
)
from acsp.mesh.credentials import mint_token
from acsp.mesh.data_dir_lock import LOCK_FILE_NAME
from acsp.mesh.endpoints import (
    MESH_FILE_NAME,
    MeshFileError,
    MeshInfo,
    MeshNotFoundError,
    default_data_dir,
    load_mesh,
)
from acsp.mesh.health import HealthReport, check_health
from acsp.mesh.postgres import cluster_dir_for
from acsp.mesh.stop import (
    MeshStopTimeoutError,
    lock_holding_supervisor,
    mesh_process_running,
    stop_supervisor,
    supervisor_running,
)
from acsp.mesh.supervisor import EXITS_KEY, LocalMesh, MeshConfig, MeshStartError

logger = logging.getLogger(__name__)

TOKEN_KEY_PATH = Path("token") / "signing.key"
"""Path of the key that :func:`services.runtime.auth.ensure_signing_key` writes, in the data dir."""
MAX_TOKEN_TTL_S: Final = 366 * 86_400
"""Maximum lifetime of a token that ``acsp token`` mints, in seconds: 366 days.

The services keep no list of revoked tokens, so a leaked token is valid until it expires.
"""


def token_lifetime(text: str) -> float:
    """Parse ``--ttl`` for argparse: seconds above zero and at most :data:`MAX_TOKEN_TTL_S`."""
    seconds = positive_seconds(text)
    if seconds > MAX_TOKEN_TTL_S:
        raise argparse.ArgumentTypeError(
            f"{text} s is above the maximum of {MAX_TOKEN_TTL_S} s (366 days); "
            "ask for a shorter lifetime"
        )
    return seconds


DOWN_TIMEOUT_S: Final = 60.0
"""Default wait of ``acsp down``, in seconds. The supervisor gives the fleet, the services, the
tasks left behind and the servers 10 s each (``MeshConfig.stop_grace_s``) before SIGKILL."""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    up = subparsers.add_parser(
        "up",
        help="run the local mesh: PostgreSQL, NATS, the services and a simulated fleet",
        description=(
            "Start the local mesh and keep it running until Ctrl-C or SIGTERM. Uses the "
            "PostgreSQL and NATS named by ACSP_DATABASE_URL and ACSP_NATS_URL when they are "
            "set, and starts embedded ones otherwise. A service, the fleet or the embedded "
            "NATS that exits is started again on the same port, up to 5 times within 60 s, "
            "and its next exit stops the mesh. NATS keeps its JetStream store."
        ),
    )
    up.add_argument(
        "--agents",
        type=whole_number(0),
        default=4,
        help="simulated nodes in the fleet; 0 for none (default: 4)",
    )
    up.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder for the mesh's state, keys and logs (default: $ACSP_DATA_DIR or ~/.acsp)",
    )
    up.add_argument(
        "--start-timeout",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds for every service to report SERVING (default: 60)",
    )
    up.set_defaults(func=run_up)

    down = subparsers.add_parser(
        "down",
        help="stop the local mesh that acsp up runs",
        description=(
            "Stop the mesh of the data directory: send SIGTERM to the acsp up process that "
            "holds the directory's lock (mesh.lock), or else the one its mesh file names, and "
            "wait for it to exit. That process stops every service, server and task it "
            "started. Exits 0 once it stopped, 3 if no mesh runs there, 1 if it still runs "
            "when --timeout ends or if another user's process may not be signalled."
        ),
    )
    down.add_argument(
        "--force",
        action="store_true",
        help=(
            "also remove the mesh file if it is damaged, once no mesh runs; has no effect on a "
            "mesh file that can be read"
        ),
    )
    down.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory of the mesh to stop (default: $ACSP_DATA_DIR or ~/.acsp)",
    )
    down.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DOWN_TIMEOUT_S,
        metavar="SECONDS",
        help=f"seconds to wait for the mesh to stop (default: {DOWN_TIMEOUT_S:g})",
    )
    down.set_defaults(func=run_down)

    status = subparsers.add_parser(
        "status",
        parents=[connection_options(), output_options(amounts=False)],
        help="print the health of each service and process; exit 0 only if all are up",
        description=(
            "Print one row per service and process of the running mesh, with its endpoint and "
            "status (SERVING or RUNNING when up). Exit 0 if all are up, 3 if no mesh runs or "
            "none of its services and processes can be reached, and 1 otherwise."
        ),
    )
    status.set_defaults(func=run_status)

    token = subparsers.add_parser(
        "token",
        help="mint a bearer token with the local mesh's signing key",
        description=(
            "Print a signed token for use as ACSP_TOKEN, e.g. "
            "export ACSP_TOKEN=$(acsp token --role pi --subject alice --institution uni-a)"
        ),
    )
    token.add_argument(
        "--role",
        action="append",
        required=True,
        help="researcher, pi, reviewer, program_office, provider_operator or service; repeatable",
    )
    token.add_argument("--subject", required=True, help="the user id the token speaks for")
    token.add_argument("--institution", default=None, help="the user's institution id")
    token.add_argument("--provider", default=None, help="the provider a provider_operator acts for")
    token.add_argument(
        "--ttl",
        type=token_lifetime,
        default=12 * 3600.0,
        metavar="SECONDS",
        help=(
            f"lifetime of the token in seconds, at most {MAX_TOKEN_TTL_S} "
            "(default: 43200, 12 hours)"
        ),
    )
    token.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory of the mesh whose key signs (default: $ACSP_DATA_DIR or ~/.acsp)",
    )
    token.set_defaults(func=run_token)


# --- acsp up ------------------------------------------------------------------------------


def run_up(args: argparse.Namespace) -> int:
    # The supervisor reports its progress at INFO unless -v asked for more.
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    data_dir = args.data_dir.expanduser() if args.data_dir is not None else default_data_dir()
    # Name the source of the folder in errors: the option, or the default it came from.
    source = (
        "--data-dir" if args.data_dir is not None else "the data dir ($ACSP_DATA_DIR or ~/.acsp)"
    )
    _make_data_dir(data_dir, source)
    config = dataclasses.replace(
        MeshConfig.from_env(data_dir, agents=args.agents),
        start_timeout_s=args.start_timeout,
        stop_orphans=True,
    )
    return asyncio.run(_serve(config))


def _make_data_dir(data_dir: Path, source: str) -> None:
    """Create the data directory, or raise CommandError if it cannot be created or written."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError):
            reason = "a file that is not a folder has this name"
        raise CommandError(
            f"{source} {data_dir}: cannot create the folder ({reason}); "
            "name a folder you can write",
            EXIT_USAGE,
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise CommandError(
            f"{source} {data_dir}: the folder is not writable by this user; "
            "name a folder you can write",
            EXIT_USAGE,
        )


async def _serve(config: MeshConfig) -> int:
    """Run the mesh until a stop signal (exit 0) or a child's death (exit 1)."""
    loop = asyncio.get_running_loop()
    mesh = LocalMesh(config)
    stop_requested = asyncio.Event()
    start = loop.create_task(mesh.start(), name="start mesh")

    def on_signal(signum: int) -> None:
        logger.info("received %s; stopping the mesh", signal.Signals(signum).name)
        stop_requested.set()
        if not start.done():
            start.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await start
        except asyncio.CancelledError:
            # start() stopped whatever it had started before re-raising.
            return EXIT_INTERRUPTED
        except MeshStartError as exc:
            print(f"error: the mesh failed to start: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        _print_banner(mesh.info)
        failure_task = loop.create_task(mesh.wait_failure(), name="wait for a child to die")
        stop_task = loop.create_task(stop_requested.wait(), name="wait for a stop signal")
        done, _ = await asyncio.wait({failure_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in (failure_task, stop_task):
            task.cancel()
        if failure_task in done and not failure_task.cancelled():
            print(f"error: {failure_task.result()}", file=sys.stderr)
            print("stopping the rest of the mesh", file=sys.stderr)
            await mesh.stop()
            return EXIT_FAILURE
        await mesh.stop()
        print("mesh stopped", file=sys.stderr)
        return EXIT_OK
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _print_banner(info: MeshInfo) -> None:
    # Other commands find a mesh in the default data dir without the flag.
    is_default = info.data_dir == default_data_dir().resolve()
    flag = "" if is_default else f" --data-dir {info.data_dir}"
    lines = [f"acsp mesh is up (data dir {info.data_dir})"]
    for name, endpoint in info.endpoints.items():
        lines.append(f"  {name:<10} {endpoint}   SERVING")
    lines.append(f"  {'postgres':<10} {info.database_url}")
    if info.database_password_file is not None:
        lines.append(f"  {'':<10} its password: {info.database_password_file}")
    cluster = cluster_dir_for(info.data_dir)
    if cluster.exists() and info.data_dir not in cluster.parents:
        # As root the server's own user may not reach the data dir, so its files live elsewhere.
        lines.append(f"  {'':<10} its files: {cluster} (outside the data dir)")
    lines.append(f"  {'nats':<10} {info.nats_url}")
    if info.nats_password_file is not None:
        lines.append(f"  {'':<10} user {info.nats_user}, password: {info.nats_password_file}")
    lines += [
        f"  {'CA':<10} {info.ca_cert}",
        f"  {'mesh file':<10} {info.data_dir / 'mesh.json'}",
        f"  {'logs':<10} {info.data_dir / 'logs'}",
        "",
        "Get a token (roles: researcher, pi, reviewer, program_office, provider_operator):",
        f"  export ACSP_TOKEN=$(acsp token{flag} --role program_office --subject admin)",
        f"Check health:  acsp status{flag}",
        f"Press Ctrl-C to stop, or run acsp down{flag} from another terminal.",
    ]
    print("\n".join(lines), flush=True)


# --- acsp down ----------------------------------------------------------------------------


def run_down(args: argparse.Namespace) -> int:
    data_dir = args.data_dir.expanduser() if args.data_dir is not None else default_data_dir()
    flag = "" if args.data_dir is None else f" --data-dir {args.data_dir}"
    info: MeshInfo | None = None
    damaged: MeshFileError | None = None
    try:
        info = load_mesh(data_dir)
    except MeshNotFoundError:
        pass
    except MeshFileError as exc:
        damaged = exc
    # The lock names the supervisor whatever the mesh file contains, and also before the
    # supervisor writes that file, once every service serves.
    pid = _lock_holding_supervisor(data_dir)
    if pid is None and info is not None and supervisor_running(info):
        # A mesh of an acsp version that took no lock.
        pid = info.supervisor_pid
    if pid is None:
        return _report_no_supervisor(args, data_dir, flag, info, damaged)
    print(f"stopping the mesh in {data_dir} (pid {pid})", file=sys.stderr)
    try:
        stop_supervisor(pid, args.timeout)
    except MeshStopTimeoutError as exc:
        raise CommandError(
            f"{exc}; its log is the output of acsp up and the services' logs are in "
            f"{data_dir / 'logs'}. Wait longer with acsp down{flag} --timeout SECONDS, or end "
            f"it with kill -KILL {pid}",
            EXIT_FAILURE,
        ) from None
    except PermissionError:
        raise CommandError(
            f"sending SIGTERM to the mesh's supervisor (pid {pid}) is not permitted, because "
            "another user runs it. Run acsp down as the user that ran acsp up, or as root",
            EXIT_FAILURE,
        ) from None
    if damaged is not None and args.force:
        # The supervisor removes only a mesh file that names it.
        damaged.path.unlink(missing_ok=True)
        print(f"removed the damaged mesh file {damaged.path}", file=sys.stderr)
    print("mesh stopped", file=sys.stderr)
    return EXIT_OK


def _lock_holding_supervisor(data_dir: Path) -> int | None:
    try:
        return lock_holding_supervisor(data_dir)
    except OSError as exc:
        lock_file = data_dir / LOCK_FILE_NAME
        raise CommandError(
            f"cannot read the lock file {lock_file}: {exc.strerror or exc}. Remove it if it is "
            "not a plain file, then run acsp down again",
            EXIT_FAILURE,
        ) from None


def _report_no_supervisor(
    args: argparse.Namespace,
    data_dir: Path,
    flag: str,
    info: MeshInfo | None,
    damaged: MeshFileError | None,
) -> int:
    """Remove a damaged mesh file with --force, or raise the error that no mesh runs."""
    if damaged is not None:
        if not args.force:
            raise CommandError(str(damaged), EXIT_NO_MESH)
        damaged.path.unlink(missing_ok=True)
        print(
            f"removed the damaged mesh file {damaged.path}; no mesh runs in {data_dir}",
            file=sys.stderr,
        )
        return EXIT_OK
    if info is None:
        raise CommandError(
            f"no mesh runs in {data_dir}: it has no mesh file ({MESH_FILE_NAME}) and no acsp "
            "up holds its lock, so there is nothing to stop. Pass the --data-dir that acsp up "
            "used, or set ACSP_DATA_DIR",
            EXIT_NO_MESH,
        )
    raise CommandError(
        f"no mesh runs in {info.data_dir}: the acsp up process (pid {info.supervisor_pid}) "
        f"that wrote its mesh file is not running. acsp status{flag} shows which of its "
        f"processes are left, and acsp up{flag} stops them before it starts",
        EXIT_NO_MESH,
    )


# --- acsp status --------------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    info = load_mesh(args.data_dir)
    reports = _with_exit_reasons(info, asyncio.run(_check_all(info, args.timeout)))
    reports += process_reports(info)
    records = [
        {
            "service": report.service,
            "endpoint": report.target,
            "status": report.status,
            "detail": report.detail,
        }
        for report in reports
    ]
    print_records(records, ["service", "endpoint", "status", "detail"], output_format=args.format)
    if not supervisor_running(info):
        print(
            f"warning: the supervisor (pid {info.supervisor_pid}) that wrote "
            f"{info.data_dir / 'mesh.json'} is not running",
            file=sys.stderr,
        )
    if all(report.status in ("SERVING", "RUNNING") for report in reports):
        return EXIT_OK
    if all(report.status in ("UNREACHABLE", "STOPPED") for report in reports):
        return EXIT_NO_MESH
    return EXIT_FAILURE


async def _check_all(info: MeshInfo, timeout_s: float) -> list[HealthReport]:
    credentials = Credentials.from_files(
        ca_cert=info.ca_cert, client_cert=info.client_cert, client_key=info.client_key
    )
    checks = [
        check_health(name, endpoint, credentials, timeout_s=timeout_s)
        for name, endpoint in info.endpoints.items()
    ]
    return list(await asyncio.gather(*checks))


def process_reports(info: MeshInfo) -> list[HealthReport]:
    """Report the mesh's processes without a health endpoint (servers, fleet) by process id.

    A process that is not running gets the reason that the supervisor wrote for its exit.
    """
    pids = info.extra.get("pids", {})
    exits = info.extra.get(EXITS_KEY, {})
    reports = []
    for name, pid in sorted(pids.items()):
        if name in info.endpoints:
            continue
        running = mesh_process_running(info, int(pid))
        detail = "" if running else str(exits.get(name, ""))
        reports.append(
            HealthReport(name, f"pid {pid}", "RUNNING" if running else "STOPPED", detail)
        )
    return reports


def _with_exit_reasons(info: MeshInfo, reports: list[HealthReport]) -> list[HealthReport]:
    """Add the supervisor's reason for its exit to each service that does not report SERVING."""
    exits = info.extra.get(EXITS_KEY, {})
    result = []
    for report in reports:
        reason = exits.get(report.service)
        if reason and not report.serving:
            detail = f"{reason}; {report.detail}" if report.detail else str(reason)
            report = dataclasses.replace(report, detail=detail)
        result.append(report)
    return result


# --- acsp token ---------------------------------------------------------------------------


def run_token(args: argparse.Namespace) -> int:
    if not args.subject.strip():
        raise CommandError(
            "--subject is empty; give the user id the token speaks for, e.g. --subject alice",
            EXIT_USAGE,
        )
    roles = {role.strip().lower().replace("-", "_") for role in args.role}
    if "provider_operator" in roles and not args.provider:
        raise CommandError(
            "--provider is missing: a provider_operator token acts for one provider; "
            "add e.g. --provider acme",
            EXIT_USAGE,
        )
    data_dir = args.data_dir.expanduser() if args.data_dir is not None else default_data_dir()
    key_path = data_dir / TOKEN_KEY_PATH
    if not key_path.is_file():
        raise CommandError(
            f"no signing key at {key_path}: run `acsp up --data-dir {data_dir}` once to create "
            "it, or pass the --data-dir of your mesh",
            EXIT_NO_MESH,
        )
    try:
        token = mint_token(
            key_path,
            role=args.role,
            subject=args.subject,
            institution=args.institution,
            provider=args.provider,
            ttl_s=args.ttl,
        )
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    print(token)
    return EXIT_OK

"""Measure the task launcher's own CPU time per task, for one or more launcher scripts.

    python tools/measure_launcher_cpu.py [--tasks 2000] [--rounds 6] [--user UID:GID:GROUPS]
        [--cgroup PARENT] LAUNCHER.py [LAUNCHER.py ...]

Each round starts every given launcher (``python -I -S LAUNCHER.py FD``, as the agent does),
has it start ``--tasks`` runs of ``/bin/true`` in batches of 50, waits for all their exits,
and reads the launcher's user and system time from ``/proc/<pid>/stat`` before it exits. The
tasks' own CPU time is not counted. With ``--user`` (which needs root), the launchers get
``--user`` too and start every task as that user. With ``--cgroup`` (which needs a cgroup v2
folder PARENT that this user may create cgroups in), each round measures every launcher twice:
as without it, and with ``--cgroup HOME`` and one cgroup per task, as the agent runs it with
``ACSP_AGENT_TASK_CGROUP``. The cgroups are made, and removed after the tasks exit, under a
folder of the tool's own in PARENT, and their creation and removal are not counted. Compare
an older launcher with ``git show REVISION:agents/launcher.py > /tmp/old_launcher.py``.

The numbers swing with other load on the machine, so run several rounds and compare medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

_BATCH = 50
"""Requests sent at a time, as the agent sends the starts of one command batch."""


def measure(
    script: str, tasks: int, user: str | None, cgroup: str | None = None
) -> tuple[float, float]:
    """Return the launcher's CPU time and the wall time per task, in microseconds.

    With ``cgroup``, a folder for the launcher's and the tasks' cgroups.
    """
    ours, theirs = socket.socketpair()
    command = [sys.executable, "-I", "-S", script, str(theirs.fileno())]
    if user is not None:
        command += ["--user", user]
    if cgroup is not None:
        os.makedirs(f"{cgroup}/launcher", exist_ok=True)
        command += ["--cgroup", f"{cgroup}/launcher"]
    launcher = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    theirs.close()
    folder = tempfile.mkdtemp(prefix="launcher-cpu-")
    # The task user writes nothing, but its working directory must be searchable.
    os.chmod(folder, 0o1777)
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "GPU-0"}

    buffer = b""
    started = ended = 0
    request_ids: dict[int, int] = {}
    """Request id of each running task, by pid."""
    begin = time.monotonic()
    while ended < tasks:
        if started - ended < _BATCH and started < tasks:
            lines = []
            for _ in range(min(_BATCH, tasks - started)):
                started += 1
                request = {
                    "id": started,
                    "path": "/bin/true",
                    "argv": ["true"],
                    "env": env,
                    "cwd": folder,
                    "log": f"{folder}/{started}.log",
                    "exit": f"{folder}/{started}.exit",
                }
                if cgroup is not None:
                    os.mkdir(f"{cgroup}/task-{started}")
                    request["cgroup"] = f"{cgroup}/task-{started}"
                lines.append(json.dumps(request) + "\n")
            ours.sendall("".join(lines).encode())
        data = ours.recv(1 << 20)
        if not data:
            raise SystemExit(f"{script} exited early")
        *messages, buffer = (buffer + data).split(b"\n")
        for message in messages:
            if b'"errno"' in message:
                raise SystemExit(f"{script} failed a start: {message.decode()}")
            if cgroup is None:
                if b'"status"' in message:
                    ended += 1
                continue
            reply = json.loads(message)
            if "id" in reply:
                request_ids[reply["pid"]] = reply["id"]
            elif "status" in reply:
                ended += 1
                # Empty once the task has exited, which it does in this cgroup.
                os.rmdir(f"{cgroup}/task-{request_ids.pop(reply['pid'])}")
    wall_s = time.monotonic() - begin

    with open(f"/proc/{launcher.pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of the file (utime, stime), counted after the command name.
    ticks = int(fields[11]) + int(fields[12])
    ours.close()
    launcher.wait(timeout=30)
    shutil.rmtree(folder)
    if cgroup is not None:
        os.rmdir(f"{cgroup}/launcher")
    cpu_s = ticks / os.sysconf("SC_CLK_TCK")
    return cpu_s / tasks * 1e6, wall_s / tasks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launchers", nargs="+", help="launcher scripts to compare")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per launcher and round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, alternating launchers")
    parser.add_argument("--user", help="UID:GID:GROUPS that tasks run as (needs root)")
    parser.add_argument(
        "--cgroup", help="cgroup v2 folder to also measure each launcher with a cgroup per task"
    )
    args = parser.parse_args()
    folder = None
    if args.cgroup is not None:
        folder = os.path.join(args.cgroup, f"acsp-launcher-cpu-{os.getpid()}")
        os.mkdir(folder)
    modes = [None] if folder is None else [None, folder]
    results: dict[str, list[float]] = {}
    try:
        for round_number in range(args.rounds):
            for script in args.launchers:
                for mode in modes:
                    label = script if mode is None else f"{script} with cgroups"
                    cpu_us, wall_us = measure(script, args.tasks, args.user, mode)
                    results.setdefault(label, []).append(cpu_us)
                    print(
                        f"round {round_number} {label}: {cpu_us:.0f} us CPU, {wall_us:.0f} us wall"
                    )
    finally:
        if folder is not None:
            for name in os.listdir(folder):
                if os.path.isdir(f"{folder}/{name}"):
                    os.rmdir(f"{folder}/{name}")
            os.rmdir(folder)
    for label, values in results.items():
        print(
            f"{label}: median {statistics.median(values):.0f} us CPU per task "
            f"(range {min(values):.0f}-{max(values):.0f})"
        )


if __name__ == "__main__":
    main()

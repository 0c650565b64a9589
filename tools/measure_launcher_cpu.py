"""Measure the task launcher's own CPU time per task, for one or more launcher scripts.

    python tools/measure_launcher_cpu.py [--tasks 2000] [--rounds 6] [--user UID:GID:GROUPS]
        LAUNCHER.py [LAUNCHER.py ...]

Each round starts every given launcher (``python -I -S LAUNCHER.py FD``, as the agent does),
has it start ``--tasks`` runs of ``/bin/true`` in batches of 50, waits for all their exits,
and reads the launcher's user and system time from ``/proc/<pid>/stat`` before it exits. The
tasks' own CPU time is not counted. With ``--user`` (which needs root), the launchers get
``--user`` too and start every task as that user. Compare an older launcher with
``git show REVISION:agents/launcher.py > /tmp/old_launcher.py``.

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


def measure(script: str, tasks: int, user: str | None) -> tuple[float, float]:
    """Return the launcher's CPU time and the wall time per task, in microseconds."""
    ours, theirs = socket.socketpair()
    command = [sys.executable, "-I", "-S", script, str(theirs.fileno())]
    if user is not None:
        command += ["--user", user]
    launcher = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    theirs.close()
    folder = tempfile.mkdtemp(prefix="launcher-cpu-")
    # The task user writes nothing, but its working directory must be searchable.
    os.chmod(folder, 0o1777)
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "GPU-0"}

    buffer = b""
    started = ended = 0
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
                lines.append(json.dumps(request) + "\n")
            ours.sendall("".join(lines).encode())
        data = ours.recv(1 << 20)
        if not data:
            raise SystemExit(f"{script} exited early")
        *messages, buffer = (buffer + data).split(b"\n")
        for message in messages:
            if b'"errno"' in message:
                raise SystemExit(f"{script} failed a start: {message.decode()}")
            if b'"status"' in message:
                ended += 1
    wall_s = time.monotonic() - begin

    with open(f"/proc/{launcher.pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of the file (utime, stime), counted after the command name.
    ticks = int(fields[11]) + int(fields[12])
    ours.close()
    launcher.wait(timeout=30)
    shutil.rmtree(folder)
    cpu_s = ticks / os.sysconf("SC_CLK_TCK")
    return cpu_s / tasks * 1e6, wall_s / tasks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launchers", nargs="+", help="launcher scripts to compare")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per launcher and round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, alternating launchers")
    parser.add_argument("--user", help="UID:GID:GROUPS that tasks run as (needs root)")
    args = parser.parse_args()
    results: dict[str, list[float]] = {script: [] for script in args.launchers}
    for round_number in range(args.rounds):
        for script in args.launchers:
            cpu_us, wall_us = measure(script, args.tasks, args.user)
            results[script].append(cpu_us)
            print(f"round {round_number} {script}: {cpu_us:.0f} us CPU, {wall_us:.0f} us wall")
    for script, values in results.items():
        print(
            f"{script}: median {statistics.median(values):.0f} us CPU per task "
            f"(range {min(values):.0f}-{max(values):.0f})"
        )


if __name__ == "__main__":
    main()

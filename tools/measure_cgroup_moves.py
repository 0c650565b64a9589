"""Measure the CPU time that a cgroup per task (ACSP_AGENT_TASK_CGROUP) adds to each start.

    python tools/measure_cgroup_moves.py PARENT [--tasks 2000] [--rounds 3]

PARENT is a cgroup v2 folder that this user may create cgroups in and move processes between
(root, or a delegated folder that this process runs in). The tool makes a folder of its own
there, and a child process measures its own CPU time for three steps per task:

- ``spawn``: ``posix_spawn`` of ``/bin/true``, as the task launcher starts a task;
- ``moves``: the same, between the launcher's two writes to ``cgroup.procs`` (into the task's
  cgroup, and back into its own), minus ``spawn``;
- ``agent``: the agent's part, which makes the task's cgroup, reads its ``cgroup.events`` once
  the task has exited, and removes it.

``tools/measure_launcher_cpu.py --cgroup`` measures a whole launcher, whose CPU time per task
swings by more than these steps cost on a shared machine. Run several rounds and compare
medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

_ROOT_PROCS = "cgroup.procs"


def _spawn(devnull: int) -> int:
    return os.posix_spawn(
        "/bin/true", ["true"], {}, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0)], setsid=True
    )


def measure_round(folder: str, tasks: int, devnull: int, home: int) -> dict[str, float]:
    """Return the CPU time of each step, in microseconds per task."""
    pids = []
    begin = time.process_time()
    for _ in range(tasks):
        pids.append(_spawn(devnull))
    spawn_s = time.process_time() - begin
    for pid in pids:
        os.waitpid(pid, 0)

    paths = [f"{folder}/task-{number}" for number in range(tasks)]
    begin = time.process_time()
    for path in paths:
        os.mkdir(path)
    made_s = time.process_time() - begin

    pids = []
    begin = time.process_time()
    for path in paths:
        descriptor = os.open(f"{path}/{_ROOT_PROCS}", os.O_WRONLY)
        os.write(descriptor, b"0")
        os.close(descriptor)
        pids.append(_spawn(devnull))
        os.write(home, b"0")
    contained_s = time.process_time() - begin
    for pid in pids:
        os.waitpid(pid, 0)

    begin = time.process_time()
    for path in paths:
        with open(f"{path}/cgroup.events", "rb") as file:
            file.read()
        os.rmdir(path)
    removed_s = time.process_time() - begin
    return {
        "spawn": spawn_s / tasks * 1e6,
        "moves": (contained_s - spawn_s) / tasks * 1e6,
        "agent": (made_s + removed_s) / tasks * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parent", help="cgroup v2 folder to make the tool's cgroups in")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds")
    args = parser.parse_args()
    folder = os.path.join(args.parent, f"acsp-cgroup-moves-{os.getpid()}")
    os.mkdir(folder)
    os.mkdir(f"{folder}/launcher")
    try:
        # A child moves between the cgroups, so that this process stays where it was.
        pid = os.fork()
        if pid == 0:
            try:
                _measure(folder, args.tasks, args.rounds)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    finally:
        os.rmdir(f"{folder}/launcher")
        os.rmdir(folder)


def _measure(folder: str, tasks: int, rounds: int) -> None:
    home = os.open(f"{folder}/launcher/{_ROOT_PROCS}", os.O_WRONLY)
    os.write(home, b"0")
    devnull = os.open(os.devnull, os.O_RDONLY)
    results: dict[str, list[float]] = {}
    for round_number in range(rounds):
        steps = measure_round(folder, tasks, devnull, home)
        for step, value in steps.items():
            results.setdefault(step, []).append(value)
        line = ", ".join(f"{step} {value:.1f} us" for step, value in steps.items())
        print(f"round {round_number}: {line} CPU per task", flush=True)
    for step, values in results.items():
        print(
            f"{step}: median {statistics.median(values):.1f} us CPU per task "
            f"(range {min(values):.1f}-{max(values):.1f})",
            flush=True,
        )


if __name__ == "__main__":
    main()

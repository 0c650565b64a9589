"""Trace and fleet loaders: Alibaba openb pod and node lists, and the Standard Workload Format.

Every loader returns :class:`TraceJob` records sorted by arrival, which the replayer turns
into engine jobs. Accounts are assigned by :mod:`scheduler.sim.accounts`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from acsp.node_lists import parse_accelerator_count
from scheduler.engine import MILLIS_PER_ACCELERATOR, NodeSpec, PriorityClass
from scheduler.engine.spec import MAX_TASKS
from scheduler.sim.accounts import Account, assign_account

logger = logging.getLogger(__name__)

DATA_DIR: Final = Path(__file__).resolve().parents[2] / "data" / "openb"
OPENB_PODS: Final = DATA_DIR / "openb_pod_list_gpuspec33.csv"
OPENB_NODES: Final = DATA_DIR / "openb_node_list_gpu_node.csv"

QOS_PRIORITY: Final[dict[str, PriorityClass]] = {
    "LS": PriorityClass.INTERACTIVE,
    "Guaranteed": PriorityClass.STANDARD,
    "Burstable": PriorityClass.STANDARD,
    "BE": PriorityClass.PREEMPTIBLE,
}
"""openb QoS class -> priority class: latency-sensitive pods are interactive, best-effort pods
preemptible, and the Kubernetes Guaranteed and Burstable classes standard."""

DELETED_BEFORE_START: Final = "deleted_before_start"
"""Reason of skipped openb rows whose ``deletion_time`` is before the pod's start."""
SWF_ACCELERATORS_PER_NODE: Final = 8
"""SWF jobs wider than this become gangs of tasks of this many accelerators."""
TOO_MANY_TASKS: Final = "too_many_tasks"
"""Reason of skipped SWF rows whose gang would have more tasks than the scheduler accepts at
submission (:data:`scheduler.engine.spec.MAX_TASKS`)."""
EXAMPLES_PER_REASON: Final = 3
"""Skipped rows a trace keeps, per reason, to show where and why rows were left out."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of a trace, before it becomes a :class:`~scheduler.engine.JobSpec`."""

    name: str
    arrival: float
    runtime: float
    """Seconds the job runs once started."""
    task_count: int
    millis_per_task: int
    models: frozenset[str]
    priority: PriorityClass
    account: Account
    wall_time_s: float
    """Wall-time limit given to the engine."""


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """One trace row the loader left out, and why."""

    line: int
    """Line number in the trace file, from 1."""
    reason: str
    """The key under which :attr:`LoadedTrace.skipped` counts the row."""
    detail: str
    """The fault in the row, e.g. ``12 fields, not 18``."""


@dataclass(frozen=True, slots=True)
class LoadedTrace:
    jobs: tuple[TraceJob, ...]
    skipped: dict[str, int]
    """Rows left out, by reason."""
    source: str
    skipped_examples: tuple[SkippedRow, ...] = ()
    """The first :data:`EXAMPLES_PER_REASON` rows left out for each reason, in file order."""


class _Skips:
    """Counts of skipped rows by reason, and the first few rows of each reason."""

    def __init__(self, *reasons: str) -> None:
        self.counts = dict.fromkeys(reasons, 0)
        self.examples: list[SkippedRow] = []

    def add(self, line: int, reason: str, detail: str) -> None:
        count = self.counts.get(reason, 0)
        self.counts[reason] = count + 1
        if count < EXAMPLES_PER_REASON:
            self.examples.append(SkippedRow(line, reason, detail))


def load_openb_pods(
    path: Path = OPENB_PODS, limit: int | None = None, seed: int = 0
) -> LoadedTrace:
    """Load an openb pod list; pods that ask no GPU are skipped (the engine places accelerators).

    Run time is ``deletion_time - scheduled_time`` for pods that ran, else
    ``deletion_time - creation_time``; pods still running at the trace end are cut there.
    The trace has no wall-time limits, so the run time is used as the limit. A pod deleted
    before it was created or scheduled has no run time, so it is skipped and counted under
    ``deleted_before_start``.
    """
    jobs: list[TraceJob] = []
    skipped = {"no_gpu": 0, "no_deletion_time": 0, DELETED_BEFORE_START: 0}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            num_gpu = int(row["num_gpu"])
            if num_gpu == 0:
                skipped["no_gpu"] += 1
                continue
            if not row["deletion_time"]:
                skipped["no_deletion_time"] += 1
                continue
            created = float(row["creation_time"])
            scheduled = float(row["scheduled_time"] or 0)
            started = scheduled if scheduled >= created and row["scheduled_time"] else created
            deleted = float(row["deletion_time"])
            if deleted < started:
                skipped[DELETED_BEFORE_START] += 1
                continue
            runtime = max(1.0, deleted - started)
            gpu_milli = int(row["gpu_milli"])
            millis = gpu_milli if gpu_milli < MILLIS_PER_ACCELERATOR else num_gpu * 1000
            spec = row["gpu_spec"].strip()
            jobs.append(
                TraceJob(
                    name=row["name"],
                    arrival=created,
                    runtime=runtime,
                    task_count=1,
                    millis_per_task=millis,
                    models=frozenset(m for m in spec.split("|") if m),
                    priority=QOS_PRIORITY.get(row["qos"], PriorityClass.STANDARD),
                    account=assign_account(row["name"], seed),
                    wall_time_s=runtime,
                )
            )
    jobs.sort(key=lambda j: (j.arrival, j.name))
    if limit is not None:
        jobs = jobs[:limit]
    return LoadedTrace(tuple(jobs), skipped, str(path))


def load_openb_nodes(path: Path = OPENB_NODES) -> list[NodeSpec]:
    """Load a node list: ``sn``, ``gpu``, ``model`` and optional ``provider``, ``region``,
    ``domain`` columns (openb has none of them: provider ``alibaba``, region ``openb``).

    A row with ``gpu`` 0 is a node without accelerators and is skipped, as the agent's fleet
    files skip it (:mod:`acsp.node_lists`). Raises ValueError naming the line of a row whose
    ``gpu`` is negative or not a whole number, or whose ``sn`` repeats an earlier row's,
    because the engine keys nodes by that name.
    """
    nodes: list[NodeSpec] = []
    first_lines: dict[str, int] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            # csv.DictReader gives None for the columns missing from a short row.
            text = row["gpu"]
            if text is None:
                raise ValueError(f"line {reader.line_num}: the row has no value for gpu")
            try:
                count = parse_accelerator_count("gpu", text)
            except ValueError as error:
                raise ValueError(f"line {reader.line_num}: {error}") from None
            if count == 0:
                continue
            name = row["sn"]
            first_line = first_lines.setdefault(name, reader.line_num)
            if first_line != reader.line_num:
                raise ValueError(
                    f"line {reader.line_num}: node {name} is already on line {first_line}; give "
                    "each node its own sn, or list the node once with all its accelerators"
                )
            nodes.append(
                NodeSpec(
                    node_id=name,
                    provider=row.get("provider") or "alibaba",
                    region=row.get("region") or "openb",
                    model=row["model"],
                    accelerator_ids=tuple(f"{name}/gpu{i}" for i in range(count)),
                    interconnect_domain=row.get("domain") or "",
                )
            )
    return nodes


SWF_FIELDS: Final = 18
"""Fields of an SWF row; shorter rows are skipped and counted as ``malformed``."""


def _swf_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield the line number and fields of each row of an SWF file, past comments."""
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            text = line.strip()
            if not text or text.startswith(";"):
                continue
            yield number, text.split()


def _swf_field(
    path: Path, line: int, fields: list[str], index: int, name: str, kind: type[int] | type[float]
) -> float:
    """Parse field ``index`` (from 0) of an SWF row, or raise ValueError naming its place."""
    text = fields[index]
    try:
        return kind(text)
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise ValueError(
            f"{path}:{line}: field {index + 1} ({name}) is {text!r}, not {expected}; fix or "
            "remove that line"
        ) from None


def load_swf(path: Path, limit: int | None = None, seed: int = 0) -> LoadedTrace:
    """Load a Standard Workload Format trace (Parallel Workloads Archive).

    Processors become accelerators: a job of ``n`` requests one task of ``n`` when ``n`` fits a
    node of :data:`SWF_ACCELERATORS_PER_NODE`, else a gang of ``ceil(n / 8)`` tasks of 8.
    User and group ids become project and institution; the requested time is the wall-time
    limit (the run time where none was requested). Jobs with no run time or no processors
    are skipped, and so are rows of fewer than :data:`SWF_FIELDS` fields and gangs of more
    tasks than the scheduler accepts (:data:`TOO_MANY_TASKS`). A field that is not a number
    raises ValueError naming the file, line and field.
    """
    jobs: list[TraceJob] = []
    skips = _Skips("no_runtime", "no_processors", "malformed", TOO_MANY_TASKS)
    for line, fields in _swf_rows(path):
        if len(fields) < SWF_FIELDS:
            skips.add(line, "malformed", f"{len(fields)} fields, not {SWF_FIELDS}")
            continue
        number = fields[0]
        submit = _swf_field(path, line, fields, 1, "submit time", float)
        run = _swf_field(path, line, fields, 3, "run time", float)
        allocated = int(_swf_field(path, line, fields, 4, "allocated processors", int))
        requested = int(_swf_field(path, line, fields, 7, "requested processors", int))
        processors = requested if requested > 0 else allocated
        if run <= 0:
            skips.add(line, "no_runtime", f"run time {fields[3]} is not above 0")
            continue
        if processors <= 0:
            skips.add(
                line,
                "no_processors",
                f"requested processors {requested} and allocated processors {allocated} "
                "are not above 0",
            )
            continue
        if processors <= SWF_ACCELERATORS_PER_NODE:
            tasks, per_task = 1, processors
        else:
            tasks = math.ceil(processors / SWF_ACCELERATORS_PER_NODE)
            per_task = SWF_ACCELERATORS_PER_NODE
        if tasks > MAX_TASKS:
            skips.add(
                line,
                TOO_MANY_TASKS,
                f"{processors} processors make {tasks} tasks of {per_task} accelerators, and "
                f"the scheduler rejects a job of more than {MAX_TASKS} tasks at submission",
            )
            continue
        requested_time = _swf_field(path, line, fields, 8, "requested time", float)
        user, group = fields[11], fields[12]
        name = f"swf-{number}"
        jobs.append(
            TraceJob(
                name=name,
                arrival=submit,
                runtime=run,
                task_count=tasks,
                millis_per_task=per_task * MILLIS_PER_ACCELERATOR,
                models=frozenset(),
                priority=PriorityClass.STANDARD,
                account=Account(f"user-{user}", f"group-{group}", "swf"),
                wall_time_s=max(requested_time, run) if requested_time > 0 else run,
            )
        )
    jobs.sort(key=lambda j: (j.arrival, j.name))
    if limit is not None:
        jobs = jobs[:limit]
    if seed:
        logger.debug("seed %s unused for SWF: accounts come from user and group ids", seed)
    return LoadedTrace(tuple(jobs), skips.counts, str(path), tuple(skips.examples))

"""Loading the inputs of the simulated backend: fleet files, a fault trace, a utilization trace.

Fleet files are CSV files in one of three formats, recognised by their header:

- the Alibaba openb node list: ``sn,cpu_milli,memory_mib,gpu,model``;
- the Alibaba 2026 spot node list: ``gpu_model,gpu_capacity_num,cpu_num,node_name``;
- our own: ``node,model,accelerators`` (optionally ``provider,region`` too).

A row with 0 accelerators is a node without accelerators, like the CPU-only nodes of the
openb full node list, and is skipped (:mod:`acsp.node_lists`). Node names become NATS subject
tokens, so characters outside ``[A-Za-z0-9_-]`` are replaced by ``-``.

The fault trace is the InfiniteHBD JSON (``node_id``, ``event_time`` in days,
``event_type`` ``fault_start``/``fault_end``, ``fault_type`` with ``Level``, ``Class``,
``Desc``). Its servers are mapped onto fleet nodes by a hash of the server id, so the same
trace always hits the same nodes. :data:`FAULT_CAUSES` names the health rule of each fault.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from acsp.catalog import MODELS
from acsp.node_lists import parse_accelerator_count

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_FLEETS = (
    (DATA_DIR / "fleets" / "openb_node_list_gpu_node.csv", "openb", "region-1"),
    (DATA_DIR / "fleets" / "alibaba_spot_node_info_df.csv", "spot", "region-1"),
)
DEFAULT_FAULT_TRACE = DATA_DIR / "faults" / "infinitehbd_fault_trace.json"
DEFAULT_UTILIZATION_TRACE = DATA_DIR / "utilization" / "pod_gpu_duty_cycle_anon.tar.gz"

MEMORY_GIB: Final[dict[str, int]] = {model.name: model.memory_gib for model in MODELS}
"""Device memory per accelerator model, from :data:`acsp.catalog.MODELS`."""

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
MAX_REPORTED_ROWS: Final = 20
"""Maximum number of invalid rows that the error about one fleet file lists. It counts the
rest."""


@dataclass(frozen=True, slots=True)
class FleetNode:
    provider: str
    region: str
    node: str
    model: str
    accelerators: int

    def __post_init__(self) -> None:
        # The simulated devices report the catalog's memory. The scheduler places and prices
        # only catalog models, so a node of another model fails here, when the fleet loads.
        if self.model not in MEMORY_GIB:
            raise ValueError(
                f"node {self.node}: accelerator model {self.model!r} is not in the catalog; "
                f"use one of {', '.join(sorted(MEMORY_GIB))} or add it to acsp.catalog.MODELS"
            )

    @property
    def memory_bytes(self) -> int:
        return MEMORY_GIB[self.model] << 30


def _token(value: str) -> str:
    return _TOKEN_UNSAFE.sub("-", value.strip())[:64] or "unnamed"


def load_fleet(path: Path, provider: str, region: str) -> list[FleetNode]:
    """Read a fleet file, skipping nodes without accelerators (a count of 0).

    Raises ``ValueError`` naming the file when it cannot be read or its header is unknown.
    Rows that lack a column, have a count that is negative or not a whole number, have no
    node name or a model outside the catalog, or repeat the node of an earlier row raise one
    ``ValueError`` with a line for each of them, up to :data:`MAX_REPORTED_ROWS`, that names
    the file, the line, the column, the reason and the fix.
    """
    try:
        with open(path, newline="", encoding="utf-8") as file:
            nodes, skipped = _read_fleet(csv.DictReader(file), path, provider, region)
    except OSError as error:
        raise ValueError(f"fleet file {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"fleet file {path} is not UTF-8 text: {error.reason}") from None
    logger.info(
        "loaded %d nodes from fleet file %s; skipped %d %s without accelerators",
        len(nodes),
        path,
        skipped,
        "row" if skipped == 1 else "rows",
    )
    return nodes


def _read_fleet(
    reader: csv.DictReader[str], path: Path, provider: str, region: str
) -> tuple[list[FleetNode], int]:
    """Return the file's nodes and the number of rows without accelerators."""
    columns = set(reader.fieldnames or ())
    if not any(required <= columns for required in _FLEET_COLUMNS):
        raise ValueError(
            f"fleet file {path} has columns {sorted(columns)}; expected the openb node "
            "list, the spot node list, or node,model,accelerators"
        )
    nodes = []
    skipped = 0
    problems: list[str] = []
    # The line of each node's row, by provider, region and node name.
    first_lines: dict[tuple[str, str, str], int] = {}
    for row in reader:
        try:
            node = _parse_row(row, columns, provider, region)
        except ValueError as error:
            problems.append(f"fleet file {path}, line {reader.line_num}: {error}")
            continue
        if node is None:
            skipped += 1
            continue
        key = (node.provider, node.region, node.node)
        first_line = first_lines.setdefault(key, reader.line_num)
        # A second row of a node would replace the first one's accelerators in the fleet.
        if first_line != reader.line_num:
            problems.append(
                f"fleet file {path}, line {reader.line_num}: node {node.node} of "
                f"{node.provider}/{node.region} is already on line {first_line}; give each node "
                "its own name, or list the node once with all its accelerators"
            )
            continue
        nodes.append(node)
    if problems:
        raise ValueError(_join_problems(path, problems))
    return nodes, skipped


def _join_problems(path: Path, problems: list[str]) -> str:
    listed = problems[:MAX_REPORTED_ROWS]
    unlisted = len(problems) - len(listed)
    if unlisted:
        listed.append(
            f"fleet file {path}: {unlisted} more invalid rows are not listed; fix the rows "
            "above and run again to see them"
        )
    return "\n".join(listed)


def check_unique_nodes(sources: list[tuple[Path, list[FleetNode]]]) -> None:
    """Raise ValueError naming both files when two fleet files list the same node.

    ``sources`` pairs each fleet file with the nodes :func:`load_fleet` read from it.
    """
    # The position in ``sources`` of the file that lists each node, so that one file given
    # twice counts as two files.
    positions: dict[tuple[str, str, str], int] = {}
    for position, (path, nodes) in enumerate(sources):
        for node in nodes:
            first = positions.setdefault((node.provider, node.region, node.node), position)
            if first != position:
                raise ValueError(
                    f"fleet files {sources[first][0]} and {path} both list node {node.node} of "
                    f"{node.provider}/{node.region}; give the files different providers or "
                    "regions (--fleet FILE:PROVIDER:REGION), or rename the node in one of them"
                )


_OPENB_COLUMNS: Final = frozenset({"sn", "gpu", "model"})
_SPOT_COLUMNS: Final = frozenset({"gpu_model", "gpu_capacity_num", "node_name"})
_OWN_COLUMNS: Final = frozenset({"node", "model", "accelerators"})
_FLEET_COLUMNS: Final = (_OPENB_COLUMNS, _SPOT_COLUMNS, _OWN_COLUMNS)


def _parse_row(
    row: dict[str, str], columns: set[str], provider: str, region: str
) -> FleetNode | None:
    """Return the row's node, or None when it has no accelerators.

    Raises ValueError naming the column, the reason and the fix.
    """
    # csv.DictReader fills the columns missing from a short row with None.
    missing = sorted(name for name in columns if row.get(name) is None)
    if missing:
        raise ValueError(
            f"the row has no value for {', '.join(missing)}; give each row a value in every column"
        )
    if _OPENB_COLUMNS <= columns:
        name_column, model_column, count_column = "sn", "model", "gpu"
    elif _SPOT_COLUMNS <= columns:
        name_column, model_column, count_column = "node_name", "gpu_model", "gpu_capacity_num"
    else:
        name_column, model_column, count_column = "node", "model", "accelerators"
        provider = _token(row.get("provider") or provider)
        region = _token(row.get("region") or region)
    count = parse_accelerator_count(count_column, row[count_column])
    if count == 0:
        return None
    name = row[name_column].strip()
    if not name:
        raise ValueError(f"{name_column} is empty; give each node a name")
    model = row[model_column].strip()
    if model not in MEMORY_GIB:
        raise ValueError(
            f"{model_column} {model!r} is not in the catalog; use one of "
            f"{', '.join(sorted(MEMORY_GIB))} or add it to acsp.catalog.MODELS"
        )
    node = _token(f"spot-{name}") if name_column == "node_name" else _token(name)
    return FleetNode(provider, region, node, model, count)


# Fault trace -----------------------------------------------------------------------------------

FAULT_CAUSES = {
    "GPU DBE(Double Bit ECC) > Threshold": "fault_gpu_dbe_over_threshold",
    "GPU xid Error": "fault_gpu_xid",
    "GPU device unknow error": "fault_gpu_unknown_error",
    "GPU PCI link width low": "fault_gpu_pci_link",
    "nvidia-smi Timeout": "fault_gpu_smi_timeout",
    "GPU Lost": "fault_gpu_lost",
    "GPU Temperature High": "fault_gpu_temperature",
    "GPU SBE(Single Bit ECC) > Threshold": "fault_gpu_sbe_over_threshold",
    "GPU P2P Bandwidth Low": "fault_gpu_p2p_bandwidth",
    "Silent Data Corruption": "fault_gpu_sdc",
    "GPU device not found": "fault_gpu_not_found",
}
"""Trace descriptions of GPU faults (``Class`` ``GPU``) and the health rule each maps to.

Faults of other classes concern the whole node: ``Hardware Failure`` maps to
``fault_node_hardware``, ``Software Failure`` to ``fault_node_software``, anything else to
``fault_node_other``.
"""


@dataclass(frozen=True, slots=True)
class FaultInterval:
    server: str
    """Server id in the trace."""
    cause: str
    """Health rule cause, e.g. ``fault_gpu_lost``."""
    description: str
    start_s: float
    """Seconds from the trace start."""
    end_s: float
    """Seconds from the trace start; ``inf`` when the trace has no end for it."""
    accelerator_slot: int | None
    """Position of the accelerator a GPU fault hits, modulo the node's accelerator count."""


def _fault_cause(fault_type: dict[str, str]) -> tuple[str, bool]:
    description = fault_type.get("Desc", "")
    if fault_type.get("Class") == "GPU":
        return FAULT_CAUSES.get(description, "fault_gpu_unknown_error"), True
    level = fault_type.get("Level", "")
    if level == "Hardware Failure":
        return "fault_node_hardware", False
    if level == "Software Failure":
        return "fault_node_software", False
    return "fault_node_other", False


def load_fault_trace(path: Path) -> list[FaultInterval]:
    """Pair each ``fault_start`` with the next ``fault_end`` of the same server and fault.

    Raises ``ValueError`` naming the file when it cannot be read or is not a JSON list, and
    the position of the first event that lacks a field or has a field of the wrong type.
    """
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except OSError as error:
        raise ValueError(f"fault trace {path} cannot be read: {error.strerror or error}") from None
    except ValueError as error:
        raise ValueError(f"fault trace {path} is not valid JSON: {error}") from None
    if not isinstance(document, list):
        raise ValueError(f"fault trace {path} is not a JSON list of events")
    events = [_fault_event(path, position, event) for position, event in enumerate(document)]
    events.sort(key=lambda e: (e[0], e[1] != "fault_end"))
    open_faults: dict[tuple[str, str], list[tuple[float, dict[str, str]]]] = {}
    intervals = []
    for event_time, event_type, server, fault_type in events:
        key = (server, json.dumps(fault_type, sort_keys=True))
        time_s = event_time * 86_400
        if event_type == "fault_start":
            open_faults.setdefault(key, []).append((time_s, fault_type))
        elif open_faults.get(key):
            start_s, start_type = open_faults[key].pop(0)
            intervals.append(_interval(server, start_type, start_s, time_s))
    for key, starts in open_faults.items():
        for start_s, fault_type in starts:
            intervals.append(_interval(key[0], fault_type, start_s, float("inf")))
    intervals.sort(key=lambda interval: interval.start_s)
    logger.info("loaded %d fault intervals from %s", len(intervals), path)
    return intervals


def _fault_event(
    path: Path, position: int, event: object
) -> tuple[float, str, str, dict[str, str]]:
    """Return an event's time in days, type, server id and fault type, checking each."""
    where = f"fault trace {path}, event {position}"
    if not isinstance(event, dict):
        raise ValueError(f"{where} is not a JSON object")
    missing = [name for name in _FAULT_EVENT_FIELDS if name not in event]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}")
    try:
        event_time = float(event["event_time"])
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: event_time {event['event_time']!r} is not a number of days"
        ) from None
    if not math.isfinite(event_time):
        raise ValueError(f"{where}: event_time {event['event_time']!r} is not finite")
    fault_type = event["fault_type"]
    if not isinstance(fault_type, dict):
        raise ValueError(f"{where}: fault_type is not an object with Level, Class and Desc")
    return event_time, str(event["event_type"]), str(event["node_id"]), fault_type


_FAULT_EVENT_FIELDS: Final = ("node_id", "event_time", "event_type", "fault_type")


def _interval(
    server: str, fault_type: dict[str, str], start_s: float, end_s: float
) -> FaultInterval:
    cause, on_accelerator = _fault_cause(fault_type)
    slot = _stable_hash(f"{server}/{start_s}") if on_accelerator else None
    return FaultInterval(server, cause, fault_type.get("Desc", ""), start_s, end_s, slot)


def assign_faults(
    intervals: list[FaultInterval], node_count: int
) -> dict[int, list[FaultInterval]]:
    """Map each interval to a fleet node index by a stable hash of its server id."""
    result: dict[int, list[FaultInterval]] = {}
    if node_count <= 0:
        return result
    for interval in intervals:
        result.setdefault(_stable_hash(interval.server) % node_count, []).append(interval)
    return result


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


# Utilization trace -----------------------------------------------------------------------------


_MAX_PICKED = 100_000
"""Task ids whose series is cached; the cache starts over when full."""


_UTILIZATION_COLUMNS: Final = frozenset({"container_ip", "timestamp_anon", "value"})


class UtilizationTrace:
    """Per-container duty-cycle series, looked up by a task id and the time since it started."""

    def __init__(self, series: list[list[float]], step_s: float) -> None:
        if not series:
            raise ValueError("a utilization trace needs at least one series")
        self._series = series
        self._step_s = step_s
        self._picked: dict[str, list[float]] = {}

    @property
    def series_count(self) -> int:
        return len(self._series)

    def utilization(self, task_id: str, elapsed_s: float) -> float:
        """Return the duty cycle in percent (0-100) of the series picked for ``task_id``."""
        series = self._picked.get(task_id)
        if series is None:
            if len(self._picked) >= _MAX_PICKED:
                self._picked.clear()
            series = self._series[_stable_hash(task_id) % len(self._series)]
            self._picked[task_id] = series
        index = int(max(0.0, elapsed_s) // self._step_s) % len(series)
        return min(100.0, max(0.0, series[index]))


def load_utilization_trace(path: Path) -> UtilizationTrace:
    """Read the GenAI duty-cycle trace from its ``.tar.gz`` (or a plain CSV).

    Raises ``ValueError`` naming the file when it cannot be read, contains no CSV member, lacks a
    column, or has a value that is not a number.
    """
    try:
        text = _utilization_text(path)
    except OSError as error:
        raise ValueError(
            f"utilization trace {path} cannot be read: {error.strerror or error}"
        ) from None
    except tarfile.TarError as error:
        raise ValueError(f"utilization trace {path} is not a readable archive: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"utilization trace {path} is not UTF-8 text: {error.reason}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = sorted(_UTILIZATION_COLUMNS - set(reader.fieldnames or ()))
    if missing:
        raise ValueError(
            f"utilization trace {path} has no column {', '.join(missing)}; expected "
            "container_ip,timestamp_anon,value"
        )
    rows: dict[str, list[tuple[float, float]]] = {}
    for row in reader:
        try:
            point = (float(row["timestamp_anon"]), float(row["value"]))
        except (TypeError, ValueError):
            raise ValueError(
                f"utilization trace {path}, line {reader.line_num}: timestamp_anon "
                f"{row['timestamp_anon']!r} or value {row['value']!r} is not a number"
            ) from None
        if not all(math.isfinite(number) for number in point):
            raise ValueError(
                f"utilization trace {path}, line {reader.line_num}: timestamp_anon or value "
                "is not finite"
            )
        rows.setdefault(row["container_ip"], []).append(point)
    if not rows:
        raise ValueError(f"utilization trace {path} has no rows")
    series = []
    steps = []
    for points in rows.values():
        points.sort()
        series.append([value for _, value in points])
        # Points of one container at a single time give no step, and a zero step would divide
        # by zero when a task's utilization is looked up.
        if len(points) > 1 and points[-1][0] > points[0][0]:
            steps.append((points[-1][0] - points[0][0]) / (len(points) - 1))
    steps.sort()
    step_s = steps[len(steps) // 2] if steps else 60.0
    logger.info("loaded %d utilization series (step %.0f s) from %s", len(series), step_s, path)
    return UtilizationTrace(series, step_s)


def _utilization_text(path: Path) -> str:
    if path.suffix != ".gz":
        return path.read_text(encoding="utf-8")
    with tarfile.open(path, "r:gz") as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith(".csv")), None)
        if member is None:
            raise ValueError(f"utilization trace {path} has no .csv member")
        extracted = archive.extractfile(member)
        if extracted is None:
            raise ValueError(f"utilization trace {path}: member {member.name} is not a file")
        return extracted.read().decode("utf-8")

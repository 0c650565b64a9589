"""Accelerators per region, split by whether new jobs may use them, for GetQueueSummary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

OUT_OF_SERVICE_STATES: Final = frozenset({"draining", "drained", "down"})
"""Node states in which a node takes no new job. Nodes in state ``unknown`` are counted apart."""


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """One node's accelerators and state, as the summary counts them."""

    region: str
    """``<provider>/<region>``."""
    status: str
    millis: int
    """Its accelerators, in milli-accelerators."""


@dataclass(slots=True)
class RegionCapacity:
    """Milli-accelerators per ``<provider>/<region>``.

    ``total`` is split into ``usable``, ``recalled``, ``above_cap``, ``unknown`` and
    ``out_of_service``, which add up to it in each region. ``used`` is what placements hold,
    part of any of them.
    """

    used: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    usable: dict[str, int] = field(default_factory=dict)
    recalled: dict[str, int] = field(default_factory=dict)
    above_cap: dict[str, int] = field(default_factory=dict)
    """Millis on up nodes above what the pools' pledges and pool limits let new jobs use,
    besides what recalls take."""
    unknown: dict[str, int] = field(default_factory=dict)
    out_of_service: dict[str, int] = field(default_factory=dict)


def split_capacity(
    nodes: Iterable[NodeCapacity],
    recalled: Mapping[str, int],
    used: Mapping[str, int],
    above_cap: Mapping[str, int] | None = None,
) -> RegionCapacity:
    """Split each region's accelerators by node state and by the millis recalls take.

    A recall takes from the accelerators of nodes that are up, so a region's recalled count
    is at most what its up nodes have. ``above_cap`` is, per region, the millis of up nodes
    that pledges or pool limits keep from new jobs besides recalls. They are not usable, and
    they are at most what the up nodes have left after recalls.
    """
    above_cap = above_cap or {}
    summary = RegionCapacity()
    up: dict[str, int] = {}
    for node in nodes:
        region = node.region
        summary.total[region] = summary.total.get(region, 0) + node.millis
        for name in ("unknown", "out_of_service"):
            getattr(summary, name).setdefault(region, 0)
        up.setdefault(region, 0)
        if node.status == "unknown":
            summary.unknown[region] += node.millis
        elif node.status in OUT_OF_SERVICE_STATES:
            summary.out_of_service[region] += node.millis
        else:
            up[region] += node.millis
    for region, millis in up.items():
        taken = min(recalled.get(region, 0), millis)
        above = min(above_cap.get(region, 0), millis - taken)
        summary.recalled[region] = taken
        summary.above_cap[region] = above
        summary.usable[region] = millis - taken - above
        summary.used[region] = used.get(region, 0)
    # Placements on a region without registered nodes (e.g. loaded before the fleet).
    for region, millis in used.items():
        summary.used.setdefault(region, millis)
    return summary

"""The split of each region's accelerators that GetQueueSummary reports."""

from __future__ import annotations

from scheduler.service.capacity_summary import NodeCapacity, RegionCapacity, split_capacity


def assert_parts_add_up(summary: RegionCapacity) -> None:
    """Assert that each region's parts add up to its total."""
    parts = (
        summary.usable,
        summary.recalled,
        summary.above_cap,
        summary.unknown,
        summary.out_of_service,
    )
    for region, total in summary.total.items():
        assert sum(part[region] for part in parts) == total, region


def test_split_by_node_state_and_recall() -> None:
    nodes = [
        NodeCapacity("p/r", "up", 4000),
        NodeCapacity("p/r", "up", 4000),
        NodeCapacity("p/r", "unknown", 4000),
        NodeCapacity("p/r", "draining", 2000),
        NodeCapacity("p/r", "down", 1000),
        NodeCapacity("p/s", "up", 8000),
    ]
    summary = split_capacity(nodes, recalled={"p/r": 3000}, used={"p/r": 500})

    assert summary.total == {"p/r": 15000, "p/s": 8000}
    assert summary.usable == {"p/r": 5000, "p/s": 8000}
    assert summary.recalled == {"p/r": 3000, "p/s": 0}
    assert summary.unknown == {"p/r": 4000, "p/s": 0}
    assert summary.out_of_service == {"p/r": 3000, "p/s": 0}
    assert summary.used == {"p/r": 500, "p/s": 0}
    assert summary.above_cap == {"p/r": 0, "p/s": 0}
    assert_parts_add_up(summary)


def test_recall_takes_only_up_nodes() -> None:
    nodes = [NodeCapacity("p/r", "up", 2000), NodeCapacity("p/r", "unknown", 6000)]
    summary = split_capacity(nodes, recalled={"p/r": 4000}, used={})

    assert summary.recalled == {"p/r": 2000}
    assert summary.usable == {"p/r": 0}
    assert summary.unknown == {"p/r": 6000}


def test_used_without_nodes_is_kept() -> None:
    summary = split_capacity([], recalled={}, used={"p/r": 1000})

    assert summary.used == {"p/r": 1000}
    assert summary.total == {}


def test_usable_stops_at_cap() -> None:
    nodes = [NodeCapacity("openb/region-1", "up", 4000), NodeCapacity("openb/region-1", "up", 4000)]
    summary = split_capacity(nodes, recalled={}, used={}, above_cap={"openb/region-1": 2000})

    assert summary.total == {"openb/region-1": 8000}
    assert summary.usable == {"openb/region-1": 6000}
    assert summary.recalled == {"openb/region-1": 0}
    assert summary.above_cap == {"openb/region-1": 2000}
    assert_parts_add_up(summary)


def test_above_cap_beside_recall() -> None:
    nodes = [
        NodeCapacity("p/r", "up", 8000),
        NodeCapacity("p/r", "unknown", 4000),
        NodeCapacity("p/s", "up", 2000),
    ]
    summary = split_capacity(
        nodes, recalled={"p/r": 1000}, used={}, above_cap={"p/r": 6000, "p/s": 2000}
    )

    assert summary.usable == {"p/r": 1000, "p/s": 0}
    assert summary.recalled == {"p/r": 1000, "p/s": 0}
    assert summary.above_cap == {"p/r": 6000, "p/s": 2000}
    assert summary.unknown == {"p/r": 4000, "p/s": 0}
    assert_parts_add_up(summary)


def test_above_cap_stops_at_up_nodes() -> None:
    # Recalls and caps count per pool, so in a region their sum may exceed its up nodes.
    nodes = [NodeCapacity("p/r", "up", 4000), NodeCapacity("p/r", "down", 4000)]
    summary = split_capacity(nodes, recalled={"p/r": 3000}, used={}, above_cap={"p/r": 3000})

    assert summary.recalled == {"p/r": 3000}
    assert summary.above_cap == {"p/r": 1000}
    assert summary.usable == {"p/r": 0}
    assert summary.out_of_service == {"p/r": 4000}
    assert_parts_add_up(summary)

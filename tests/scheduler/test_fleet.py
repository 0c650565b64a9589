"""The fleet view: heartbeat expiry makes nodes unknown, never free."""

from __future__ import annotations

from scheduler.service.fleet import AcceleratorView, FleetView, NodeView


def make_fleet() -> FleetView:
    fleet = FleetView(heartbeat_timeout_s=10)
    node = NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),))
    fleet.apply_inventory(node, 100.0)
    return fleet


def test_node_without_heartbeats_becomes_unknown() -> None:
    fleet = make_fleet()
    assert fleet.expire(105.0) == []
    changes = fleet.expire(111.0)
    assert [c.node.status for c in changes] == ["unknown"]
    assert changes[0].previous == "up"


def test_touch_keeps_node_up() -> None:
    fleet = make_fleet()
    assert fleet.touch("p.r.n1", 108.0)
    assert fleet.expire(115.0) == []
    node = fleet.get("p.r.n1")
    assert node is not None
    assert node.last_heartbeat == 108.0


def test_unknown_node_needs_full_heartbeat() -> None:
    fleet = make_fleet()
    fleet.expire(111.0)
    assert not fleet.touch("p.r.n1", 112.0)
    change = fleet.apply_heartbeat("p.r.n1", "boot", frozenset(), 112.0)
    assert change is not None
    assert change.node.status == "up"
    assert change.previous == "unknown"


def test_drained_node_stays_draining_after_inventory() -> None:
    fleet = make_fleet()
    fleet.set_draining("p.r.n1", True, "maintenance")
    node = NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),))
    change = fleet.apply_inventory(node, 120.0)
    assert change.node.status == "draining"


def test_restored_down_node_stays_down() -> None:
    fleet = make_fleet()
    node = fleet.restore_down("p.r.n1", "powered off")
    assert (node.status, node.status_reason) == ("down", "powered off")
    assert fleet.expire(200.0) == []
    assert not fleet.touch("p.r.n1", 201.0)

    back = fleet.apply_heartbeat("p.r.n1", "boot-2", frozenset(), 202.0)
    assert back is not None
    assert (back.previous, back.node.status) == ("down", "up")
    assert back.node.status_reason == "heartbeats resumed"

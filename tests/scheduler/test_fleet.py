"""The fleet view: heartbeat expiry makes nodes unknown, never free, and who may end a drain."""

from __future__ import annotations

from scheduler.service.fleet import (
    AGENT_WITHDREW,
    AcceleratorView,
    Drain,
    DrainChange,
    FleetView,
    NodeView,
)
from scheduler.service.fleet_api import shown_status


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


def test_late_heartbeat_counts_from_receipt() -> None:
    fleet = make_fleet()

    change, alive = fleet.receive_heartbeat("p.r.n1", "boot", frozenset(), 105.0, 108.0)

    assert change is None
    assert alive
    # Counted from when it was received, the node is overdue at 115.5, not at 118.5.
    assert [c.node.status for c in fleet.expire(115.5)] == ["unknown"]


def test_overdue_live_heartbeat_keeps_node_unknown() -> None:
    fleet = make_fleet()
    fleet.expire(111.0)

    change, alive = fleet.receive_heartbeat("p.r.n1", "boot", frozenset({"j1/1/0"}), 100.5, 112.0)

    assert change is None
    assert not alive
    node = fleet.get("p.r.n1")
    assert node is not None
    assert node.status == "unknown"
    assert node.running_task_ids == frozenset()


def test_older_heartbeat_keeps_later_time() -> None:
    fleet = make_fleet()
    assert fleet.touch("p.r.n1", 109.0)

    fleet.receive_heartbeat("p.r.n1", "boot", frozenset(), 104.0, 109.5)

    assert fleet.expire(118.0) == []
    node = fleet.get("p.r.n1")
    assert node is not None
    assert node.last_heartbeat == 109.0


def test_drained_node_stays_draining_after_inventory() -> None:
    fleet = make_fleet()
    fleet.operator_drain("p.r.n1", True, "maintenance", 110.0)
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


def load_fleet(now: float) -> FleetView:
    """Return a fleet whose node ``p.r.n1`` a new leader loaded from storage at ``now``."""
    fleet = FleetView(heartbeat_timeout_s=10)
    node = NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),))
    fleet.load(node, now)
    return fleet


def test_overdue_replay_expires_loaded_node() -> None:
    fleet = load_fleet(200.0)

    assert fleet.replay_heartbeat("p.r.n1", "boot", frozenset({"t"}), 150.0, 200.5) is None
    changes = fleet.expire(200.5)

    assert [c.node.status for c in changes] == ["unknown"]
    assert changes[0].reason == "no heartbeat for 50.5 s"
    assert changes[0].node.running_task_ids == frozenset()


def test_overdue_replay_keeps_unknown_node_unknown() -> None:
    fleet = load_fleet(200.0)
    fleet.expire(211.0)

    assert fleet.replay_heartbeat("p.r.n1", "boot", frozenset(), 150.0, 211.5) is None

    node = fleet.get("p.r.n1")
    assert node is not None
    assert node.status == "unknown"
    assert fleet.expire(212.0) == []


def test_fresh_replay_counts_from_send_time() -> None:
    fleet = load_fleet(200.0)

    assert fleet.replay_heartbeat("p.r.n1", "boot", frozenset({"t"}), 198.0, 200.5) is None

    node = fleet.get("p.r.n1")
    assert node is not None
    assert node.status == "up"
    assert node.last_heartbeat == 198.0
    assert node.running_task_ids == frozenset({"t"})
    assert fleet.expire(207.0) == []
    assert [c.node.status for c in fleet.expire(208.5)] == ["unknown"]


def test_fresh_replay_brings_unknown_node_back() -> None:
    fleet = load_fleet(200.0)
    fleet.expire(211.0)

    change = fleet.replay_heartbeat("p.r.n1", "boot", frozenset(), 209.0, 211.5)

    assert change is not None
    assert (change.previous, change.node.status) == ("unknown", "up")
    assert change.node.last_heartbeat == 209.0


def test_replay_after_live_heartbeat_changes_nothing() -> None:
    fleet = load_fleet(200.0)
    fleet.apply_heartbeat("p.r.n1", "boot-2", frozenset(), 200.2)

    assert fleet.replay_heartbeat("p.r.n1", "boot", frozenset(), 150.0, 200.5) is None

    assert fleet.expire(205.0) == []
    node = fleet.get("p.r.n1")
    assert node is not None
    assert (node.status, node.last_heartbeat, node.boot_id) == ("up", 200.2, "boot-2")


def test_replay_without_time_keeps_load_time() -> None:
    fleet = load_fleet(200.0)

    assert fleet.replay_heartbeat("p.r.n1", "boot", frozenset(), 0.0, 200.5) is None

    assert fleet.expire(209.0) == []
    assert [c.node.status for c in fleet.expire(210.5)] == ["unknown"]


def test_replay_leaves_down_node_down() -> None:
    fleet = load_fleet(200.0)
    fleet.restore_down("p.r.n1", "powered off")

    assert fleet.replay_heartbeat("p.r.n1", "boot", frozenset(), 199.0, 200.5) is None

    node = fleet.get("p.r.n1")
    assert node is not None
    assert node.status == "down"


def drain_of(fleet: FleetView) -> Drain | None:
    node = fleet.get("p.r.n1")
    assert node is not None
    return node.drain


def test_agent_drain_ends_on_later_ready_heartbeat() -> None:
    fleet = make_fleet()

    started = fleet.agent_drain("p.r.n1", "health: xid 79", 105.0)

    assert started == DrainChange("p.r.n1", True, Drain("agent", "health: xid 79", 105.0))
    node = fleet.get("p.r.n1")
    assert node is not None
    assert (node.status, node.status_reason) == ("draining", "health: xid 79")
    ended = fleet.agent_withdraw("p.r.n1", 106.0)
    assert ended == DrainChange("p.r.n1", False, Drain("agent", AGENT_WITHDREW, 106.0))
    node = fleet.get("p.r.n1")
    assert node is not None
    assert (node.status, node.drain) == ("up", None)


def test_older_ready_heartbeat_keeps_agent_drain() -> None:
    fleet = make_fleet()
    fleet.agent_drain("p.r.n1", "health: xid 79", 105.0)

    # A heartbeat sent before the request, or one without a time, reached the loop after it.
    assert fleet.agent_withdraw("p.r.n1", 104.0) is None
    assert fleet.agent_withdraw("p.r.n1", 105.0) is None
    assert fleet.agent_withdraw("p.r.n1", 0.0) is None

    assert drain_of(fleet) == Drain("agent", "health: xid 79", 105.0)


def test_agent_drain_without_time_ends_on_ready_heartbeat() -> None:
    fleet = make_fleet()
    fleet.agent_drain("p.r.n1", "health: xid 79", 0.0)

    assert fleet.agent_withdraw("p.r.n1", 0.0) is not None
    assert drain_of(fleet) is None


def test_repeated_agent_request_keeps_first_time() -> None:
    fleet = make_fleet()
    fleet.agent_drain("p.r.n1", "health: xid 79", 105.0)

    assert fleet.agent_drain("p.r.n1", "agent requested a drain in its heartbeat", 107.0) is None

    assert drain_of(fleet) == Drain("agent", "health: xid 79", 105.0)


def test_agent_cannot_end_operator_drain() -> None:
    fleet = make_fleet()
    fleet.operator_drain("p.r.n1", True, "maintenance", 105.0)

    assert fleet.agent_drain("p.r.n1", "health: xid 79", 106.0) is None
    assert fleet.agent_withdraw("p.r.n1", 107.0) is None

    assert drain_of(fleet) == Drain("operator", "maintenance", 105.0)


def test_operator_drain_takes_over_agent_drain() -> None:
    fleet = make_fleet()
    fleet.agent_drain("p.r.n1", "health: xid 79", 105.0)

    taken = fleet.operator_drain("p.r.n1", True, "replace the GPU", 106.0)

    assert taken == DrainChange("p.r.n1", True, Drain("operator", "replace the GPU", 106.0))
    assert fleet.agent_withdraw("p.r.n1", 107.0) is None
    assert drain_of(fleet) == Drain("operator", "replace the GPU", 106.0)


def test_operator_undrain_ends_agent_drain() -> None:
    fleet = make_fleet()
    fleet.agent_drain("p.r.n1", "health: xid 79", 105.0)

    ended = fleet.operator_drain("p.r.n1", False, "false alarm", 106.0)

    assert ended == DrainChange("p.r.n1", False, Drain("operator", "false alarm", 106.0))
    node = fleet.get("p.r.n1")
    assert node is not None
    assert (node.status, node.status_reason, node.drain) == ("up", "false alarm", None)
    # A request the agent sends again drains the node again.
    assert fleet.agent_drain("p.r.n1", "agent requested a drain in its heartbeat", 107.0)


def test_drain_that_changes_nothing_returns_none() -> None:
    fleet = make_fleet()

    assert fleet.operator_drain("p.r.n1", False, "undrained", 105.0) is None
    assert fleet.agent_withdraw("p.r.n1", 105.0) is None
    assert fleet.operator_drain("p.r.n1", True, "maintenance", 105.0) is not None
    assert fleet.operator_drain("p.r.n1", True, "maintenance", 106.0) is None
    assert fleet.operator_drain("p.r.n1", True, "new reason", 107.0) is not None


def test_loaded_agent_drain_ends_on_later_ready_heartbeat() -> None:
    fleet = FleetView(heartbeat_timeout_s=10)
    drain = Drain("agent", "health: xid 79", 150.0)
    node = NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),), drain=drain)
    loaded = fleet.load(node, 200.0)
    assert loaded.node.status == "draining"

    assert fleet.agent_withdraw("p.r.n1", 149.0) is None
    assert fleet.agent_withdraw("p.r.n1", 151.0) is not None
    assert drain_of(fleet) is None


def test_touch_passes_drain_changes_on() -> None:
    fleet = make_fleet()
    assert not fleet.touch("p.r.n1", 101.0, drain_requested=True)
    assert fleet.touch("p.r.n1", 101.0, drain_requested=False)
    assert fleet.touch("p.r.n1", 101.0, drain_requested=None)

    fleet.agent_drain("p.r.n1", "health: xid 79", 101.0)
    assert fleet.touch("p.r.n1", 102.0, drain_requested=True)
    assert not fleet.touch("p.r.n1", 102.0, drain_requested=False)
    assert fleet.touch("p.r.n1", 102.0, drain_requested=None)

    fleet.operator_drain("p.r.n1", True, "maintenance", 103.0)
    assert fleet.touch("p.r.n1", 104.0, drain_requested=False)


def test_idle_draining_node_shows_drained() -> None:
    node = NodeView("prov", "reg", "n0", status="draining", drain=Drain("operator", "repair", 1.0))
    busy = {node.key: ["j1"]}

    assert shown_status(node, busy) == "draining"
    assert shown_status(node, {}) == "drained"
    assert shown_status(NodeView("prov", "reg", "n1"), {}) == "up"
    assert shown_status(NodeView("prov", "reg", "n2", status="unknown"), {}) == "unknown"


def test_removed_node_ignores_heartbeats() -> None:
    fleet = make_fleet()
    fleet.restore_down("p.r.n1", "powered off")

    fleet.remove("p.r.n1")

    assert fleet.get("p.r.n1") is None
    assert "p.r.n1" not in fleet
    assert not fleet.touch("p.r.n1", 200.0)
    assert fleet.apply_heartbeat("p.r.n1", "boot-2", frozenset(), 201.0) is None
    assert fleet.expire(300.0) == []
    assert fleet.get("p.r.n1") is None


def test_removed_node_returns_as_new() -> None:
    fleet = make_fleet()
    fleet.operator_drain("p.r.n1", True, "retiring", 101.0)
    fleet.remove("p.r.n1")

    change = fleet.apply_inventory(NodeView("p", "r", "n1"), 300.0)

    assert change.previous is None
    assert change.node.status == "up"
    assert change.node.drain is None
    assert change.node.last_heartbeat == 300.0

"""The demo's three providers, built from the fleet files shipped in ``data/`` (no I/O but reads).

- ``alibaba``: the openb node list, split into regions ``hz-a`` and ``hz-b`` by node position
  (even positions in ``hz-a``);
- ``spot``: the 2026 spot-GPU node list, region ``cn-east``, with newer NVIDIA models;
- ``cloudx``: a simulated fleet of AMD MI300X nodes (a model of the rate card), region
  ``eu-west``. No public trace of a non-NVIDIA fleet exists, so this one is made up, and the
  report marks it as simulated.

Each real fleet is sampled by stride (every k-th node) down to ``max_nodes`` nodes so that the
one agent process stays light on a small machine; the stride keeps the mix of models.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agents.backends.fleet import DATA_DIR, FleetNode, load_fleet
from scheduler.engine import NodeSpec

OPENB_FLEET: Final = DATA_DIR / "fleets" / "openb_node_list_gpu_node.csv"
SPOT_FLEET: Final = DATA_DIR / "fleets" / "alibaba_spot_node_info_df.csv"
SIMULATED_MODEL: Final = "MI300X"
SIMULATED_ACCELERATORS_PER_NODE: Final = 8


@dataclass(frozen=True, slots=True)
class RegionPlan:
    """One region of a provider and the nodes its agents serve."""

    provider: str
    region: str
    display_name: str
    jurisdiction: str
    nodes: tuple[FleetNode, ...]
    simulated_fleet: bool
    """True when the nodes are made up, not taken from a production trace."""

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.region}"

    def accelerators_by_model(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.model] = counts.get(node.model, 0) + node.accelerators
        return counts


@dataclass(frozen=True, slots=True)
class FleetPlan:
    """Every region of the demo; providers are the distinct ``provider`` values."""

    regions: tuple[RegionPlan, ...]

    @property
    def providers(self) -> list[str]:
        return sorted({region.provider for region in self.regions})

    def nodes(self) -> list[FleetNode]:
        return [node for region in self.regions for node in region.nodes]

    def node_index(self) -> dict[tuple[str, str, str], FleetNode]:
        return {(n.provider, n.region, n.node): n for n in self.nodes()}

    def capacity(self) -> dict[str, int]:
        """Accelerators per ``provider/region/model``."""
        result: dict[str, int] = {}
        for region in self.regions:
            for model, count in region.accelerators_by_model().items():
                result[f"{region.key}/{model}"] = count
        return result

    def engine_nodes(self) -> list[NodeSpec]:
        """Return the same nodes as engine specs, for the simulator run beside the live one."""
        return [
            NodeSpec(
                node_id=node.node,
                provider=node.provider,
                region=node.region,
                model=node.model,
                accelerator_ids=tuple(f"{node.node}/gpu{i}" for i in range(node.accelerators)),
            )
            for node in self.nodes()
        ]

    def write_fleet_files(self, folder: Path) -> list[Path]:
        """Write one ``provider,region,node,model,accelerators`` CSV per region."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for region in self.regions:
            path = folder / f"{region.provider}-{region.region}.csv"
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["provider", "region", "node", "model", "accelerators"])
                for node in region.nodes:
                    writer.writerow(
                        [node.provider, node.region, node.node, node.model, node.accelerators]
                    )
            paths.append(path)
        return paths


def sample_by_stride(nodes: Sequence[FleetNode], max_nodes: int) -> list[FleetNode]:
    """Return every k-th node, with k the smallest stride that keeps at most ``max_nodes``."""
    if max_nodes <= 0:
        raise ValueError(f"max_nodes must be positive, got {max_nodes}")
    stride = max(1, -(-len(nodes) // max_nodes))
    return list(nodes[::stride])[:max_nodes]


def _relabel(nodes: Sequence[FleetNode], provider: str, region: str) -> tuple[FleetNode, ...]:
    return tuple(FleetNode(provider, region, n.node, n.model, n.accelerators) for n in nodes)


def build_fleet_plan(max_nodes: int, simulated_nodes: int) -> FleetPlan:
    """Build the three providers; ``max_nodes`` caps each real fleet, before the openb split."""
    openb = sample_by_stride(load_fleet(OPENB_FLEET, "alibaba", "openb"), max_nodes)
    spot = sample_by_stride(load_fleet(SPOT_FLEET, "spot", "cn-east"), max_nodes)
    simulated = tuple(
        FleetNode("cloudx", "eu-west", f"mi300x-{i:03d}", SIMULATED_MODEL, 8)
        for i in range(simulated_nodes)
    )
    regions = [
        RegionPlan(
            "alibaba",
            "hz-a",
            "Hangzhou A (openb)",
            "CN",
            _relabel(openb[0::2], "alibaba", "hz-a"),
            simulated_fleet=False,
        ),
        RegionPlan(
            "alibaba",
            "hz-b",
            "Hangzhou B (openb)",
            "CN",
            _relabel(openb[1::2], "alibaba", "hz-b"),
            simulated_fleet=False,
        ),
        RegionPlan(
            "spot",
            "cn-east",
            "Spot GPU 2026",
            "CN",
            _relabel(spot, "spot", "cn-east"),
            simulated_fleet=False,
        ),
    ]
    if simulated:
        regions.append(
            RegionPlan(
                "cloudx",
                "eu-west",
                "CloudX Frankfurt (simulated)",
                "EU",
                simulated,
                simulated_fleet=True,
            )
        )
    return FleetPlan(tuple(regions))

"""The inputs that the simulated backend of ``python -m agents`` reads: the fleet files of
``--fleet FILE:PROVIDER:REGION``, limited by ``--nodes``, a fault trace and a utilization
trace.

Every problem raises :class:`SimulatedInputError`, which the agent prints before it opens its
state or spool, and then exits with status 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from acsp.subjects import TOKEN_PATTERN
from agents.backends.fleet import (
    DEFAULT_FAULT_TRACE,
    DEFAULT_FLEETS,
    DEFAULT_UTILIZATION_TRACE,
    FaultInterval,
    FleetNode,
    UtilizationTrace,
    assign_faults,
    check_unique_nodes,
    load_fault_trace,
    load_fleet,
    load_utilization_trace,
)


class SimulatedInputError(Exception):
    """An invalid input of the simulated backend: a fleet file, a trace, ``--fleet`` or
    ``--nodes``.

    ``str()`` has one line for each problem, and each line names its fix. The agent prints
    them and exits with status 2, as it does for a :class:`StartupError`.
    """


def _parse_fleet_option(text: str) -> tuple[Path, str, str]:
    path, _, rest = text.partition(":")
    provider, _, region = rest.partition(":")
    # Nodes registered under a default provider or region would stay in the scheduler's fleet
    # for good, outside the provider's pledges, so both ids are required.
    if not provider:
        raise SimulatedInputError(
            f"--fleet {text} names no provider and region; write --fleet {path}:PROVIDER:REGION "
            f"with the ids the provider registered, e.g. --fleet {path}:acme:eu-1"
        )
    if not region:
        raise SimulatedInputError(
            f"--fleet {text} names no region; write --fleet {path}:{provider}:REGION with the "
            "id of one of the provider's regions, e.g. eu-1"
        )
    # Both become NATS subject tokens, which the node rows of some formats do not override.
    for name, value in (("provider", provider), ("region", region)):
        if not TOKEN_PATTERN.match(value):
            raise SimulatedInputError(
                f"--fleet {text}: {name} {value!r} is not a subject token; "
                "use 1-64 of A-Z a-z 0-9 _ -"
            )
    return Path(path), provider, region


def fleet_nodes(args: argparse.Namespace) -> list[FleetNode]:
    """Read the fleet files of ``--fleet``, or the default ones, and keep ``--nodes`` nodes.

    Raises :class:`SimulatedInputError` naming each problem and its fix.
    """
    sources = [_parse_fleet_option(text) for text in args.fleet or ()] or list(DEFAULT_FLEETS)
    loaded: list[tuple[Path, list[FleetNode]]] = []
    try:
        for path, provider, region in sources:
            loaded.append((path, load_fleet(path, provider, region)))
        check_unique_nodes(loaded)
    except ValueError as error:
        raise SimulatedInputError(str(error)) from None
    for path, file_nodes in loaded:
        if not file_nodes:
            raise SimulatedInputError(
                f"fleet file {path} lists no node with accelerators; give at least one row a "
                "count above 0, or leave the file out"
            )
    nodes = [node for _, file_nodes in loaded for node in file_nodes]
    if args.nodes is not None:
        if args.nodes > len(nodes):
            raise SimulatedInputError(
                f"--nodes {args.nodes} is more than the {len(nodes)} nodes of the fleet files; "
                f"pass at most {len(nodes)}, or leave it out to serve them all"
            )
        nodes = nodes[: args.nodes]
    return nodes


@dataclass(frozen=True, slots=True)
class SimulatedInputs:
    """The fleet and the traces that the simulated backend replays."""

    fleet: list[FleetNode]
    faults: dict[int, list[FaultInterval]]
    """Fault intervals by the index of their node in :attr:`fleet`."""
    utilization: UtilizationTrace | None


def load_simulated_inputs(args: argparse.Namespace) -> SimulatedInputs:
    """Read the fleet files and the traces that the options name.

    Raises :class:`SimulatedInputError` naming each problem and its fix.
    """
    fleet = fleet_nodes(args)
    faults_path = args.faults or str(DEFAULT_FAULT_TRACE)
    utilization_path = args.utilization or str(DEFAULT_UTILIZATION_TRACE)
    try:
        faults = (
            {}
            if faults_path == "none"
            else assign_faults(load_fault_trace(Path(faults_path)), len(fleet))
        )
    except ValueError as error:
        raise SimulatedInputError(f"{error}; fix the file, or pass --faults none") from None
    try:
        utilization = (
            None if utilization_path == "none" else load_utilization_trace(Path(utilization_path))
        )
    except ValueError as error:
        raise SimulatedInputError(f"{error}; fix the file, or pass --utilization none") from None
    return SimulatedInputs(fleet, faults, utilization)

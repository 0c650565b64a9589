"""``acsp fleet``: nodes, drains, deletions, providers, the accelerator catalog and queue
summary.

Pledges and recalls are in :mod:`acsp.cli.pledges`.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any, Final

from acsp.cli import pledges
from acsp.cli._common import (
    EXIT_OK,
    connection_options,
    decimal_value,
    format_time,
    output_options,
    print_records,
)
from acsp.cli.jobs import open_scheduler
from acsp.v1 import common_pb2, scheduler_pb2

NODE_STATES = {
    name.removeprefix("NODE_STATE_").lower(): number
    for name, number in scheduler_pb2.NodeState.items()
    if number
}
NODE_COLUMNS = (
    "node",
    "state",
    "model",
    "accelerators",
    "healthy",
    "failed",
    "jobs",
    "last heartbeat",
    "reason",
    "cause",
    "failures",
)
ACCELERATOR_COLUMNS = (
    "accelerator",
    "pci bus id",
    "model",
    "interconnect",
    "health",
    "event",
    "condition",
)
CAPACITY_COLUMNS: Final = (
    "used",
    "usable",
    "recalled",
    "above cap",
    "unknown",
    "out of service",
    "total",
)
"""Accelerator counts of ``fleet queue`` per region, in accelerators. All but ``used`` and
``total`` split the total, so they add up to it."""
QUEUE_COLUMNS = ("table", "state", "reason", "region", "jobs", *CAPACITY_COLUMNS)
"""Columns of ``fleet queue`` in CSV and JSON, where the rows of its three tables share one."""
PROVIDER_COLUMNS = ("provider", "name", "region", "region name", "jurisdiction", "cross-provider")


def register(subparsers: Any) -> None:
    fleet = subparsers.add_parser(
        "fleet", help="nodes, drains, pledges, recalls, catalog and queue summary"
    )
    commands = fleet.add_subparsers(title="fleet commands", metavar="COMMAND", required=True)
    connection = connection_options()
    output = output_options(amounts=False)
    # The catalog's peak TFLOP/s are amounts, and pledges and recalls have windows.
    amounts_output = output_options()

    nodes = commands.add_parser("nodes", parents=[connection, output], help="list nodes")
    nodes.add_argument("--provider", default="", help="only this provider's nodes")
    nodes.add_argument("--region", default="", help="only the nodes of this region")
    nodes.add_argument(
        "--state", choices=sorted(NODE_STATES), default=None, help="only nodes in this state"
    )
    nodes.set_defaults(func=list_nodes)

    node = commands.add_parser(
        "node",
        parents=[connection, output],
        help="show one node's accelerators, with the event behind each failure",
    )
    node.add_argument("node", help="<provider>/<region>/<node>")
    node.set_defaults(func=show_node)

    for name, undrain in (("drain", False), ("undrain", True)):
        drain = commands.add_parser(
            name,
            parents=[connection, output],
            help="stop placing work on a node" if not undrain else "place work on a node again",
        )
        drain.add_argument("node", help="<provider>/<region>/<node>")
        drain.add_argument("--reason", default="", help="why, recorded with the node")
        drain.set_defaults(func=drain_node, undrain=undrain)

    down = commands.add_parser(
        "down",
        parents=[connection, output],
        help="declare an unknown node off, which frees the accelerators its lost tasks kept",
    )
    down.add_argument("node", help="<provider>/<region>/<node>")
    down.add_argument(
        "--reason",
        required=True,
        help="how you know that nothing runs on it any more, e.g. 'powered off'",
    )
    down.set_defaults(func=mark_node_down)

    delete = commands.add_parser(
        "delete",
        parents=[connection, output],
        help="delete a drained or down node that no job may still run a task on",
        description=(
            "Delete a node from the scheduler's fleet, e.g. a retired machine, and print it as "
            "it was. Only a drained or down node on which no job may still run a task can be "
            "deleted. To retire a machine: drain its node, wait until it shows as drained, "
            "stop its agent, then delete the node. An agent that still runs adds its node "
            "again, as a new node that is up, with its next inventory, which it sends when it "
            "restarts or reconnects to NATS. The local mesh of acsp up runs every node in one "
            "process, so there, restart the mesh with a smaller --agents instead of stopping "
            'one node\'s agent (docs/deploy.md, "Retiring a node").'
        ),
    )
    delete.add_argument("node", help="<provider>/<region>/<node>")
    delete.add_argument(
        "--reason",
        default="",
        help="why the node is deleted, e.g. 'retired', recorded with the deletion",
    )
    delete.set_defaults(func=delete_node)

    providers = commands.add_parser(
        "providers", parents=[connection, output], help="list providers and their regions"
    )
    providers.set_defaults(func=list_providers)

    catalog = commands.add_parser(
        "models", parents=[connection, amounts_output], help="list the accelerator catalog"
    )
    catalog.set_defaults(func=list_models)

    queue = commands.add_parser(
        "queue",
        parents=[connection, output],
        help="jobs by state and pending reason, and accelerators in use by region",
        description=(
            "Show three tables: jobs by state, pending jobs by reason, and accelerators by "
            "region. The accelerators table splits each region's total into usable (on nodes "
            "that are up, less what recalls take and what is above cap, in use or free), "
            "recalled (taken by the provider's recalls, from their announcement), above cap "
            "(on up nodes, above what the pledges and pool limits let jobs use), unknown (on "
            "nodes that missed their heartbeats) and out of service (on draining, drained or "
            "down nodes). These five add up to the total. Used counts those that jobs hold. A "
            "scheduler that predates a column leaves it empty. CSV and JSON put the rows of all "
            "three in one table, with a 'table' column (states, pending or accelerators) that "
            "names the table of each row and empty CSV cells or JSON nulls in the columns of "
            "the other tables."
        ),
    )
    queue.set_defaults(func=queue_summary)

    pledges.register(commands, connection, amounts_output)


def node_row(node: scheduler_pb2.Node) -> dict[str, Any]:
    models = sorted({a.model for a in node.accelerators})
    failed = [a for a in node.accelerators if a.health == scheduler_pb2.HEALTH_STATE_FAILED]
    return {
        "node": f"{node.provider_id}/{node.region_id}/{node.node_id}",
        "state": scheduler_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower(),
        "model": ", ".join(models),
        "accelerators": len(node.accelerators),
        "healthy": len(node.accelerators) - len(failed),
        "failed": len(failed),
        "jobs": len(node.job_ids),
        "last heartbeat": format_time(node.last_heartbeat_time),
        "reason": node.state_cause.reason,
        # The trigger distinguishes a drain the node's agent requested from an operator's.
        "cause": node.state_cause.trigger,
        "failures": "; ".join(failed_accelerator_text(a) for a in failed),
    }


def failed_accelerator_text(accelerator: scheduler_pb2.Accelerator) -> str:
    """Return ``<accelerator>: <condition> (event <id>)``, or the id alone without a cause."""
    cause = accelerator.health_cause
    if not cause.reference_id:
        return accelerator.accelerator_id
    condition = cause.reason or "failed"
    return f"{accelerator.accelerator_id}: {condition} (event {cause.reference_id})"


def list_nodes(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    token = ""
    with open_scheduler(args) as scheduler:
        while True:
            response = scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(
                    provider_id=args.provider,
                    region_id=args.region,
                    state=NODE_STATES[args.state] if args.state else 0,  # type: ignore[arg-type]
                    page=common_pb2.PageRequest(page_size=1000, page_token=token),
                )
            )
            rows.extend(node_row(node) for node in response.nodes)
            token = response.page.next_page_token
            if not token:
                break
    print_records(rows, NODE_COLUMNS, output_format=args.format, title="nodes")
    return EXIT_OK


def accelerator_row(accelerator: scheduler_pb2.Accelerator) -> dict[str, Any]:
    health = scheduler_pb2.HealthState.Name(accelerator.health)
    return {
        "accelerator": accelerator.accelerator_id,
        "pci bus id": accelerator.pci_bus_id,
        "model": accelerator.model,
        "interconnect": accelerator.interconnect_domain,
        "health": health.removeprefix("HEALTH_STATE_").lower(),
        "event": accelerator.health_cause.reference_id,
        "condition": accelerator.health_cause.reason,
    }


def show_node(args: argparse.Namespace) -> int:
    provider, region, node_id = _node_path(args.node)
    with open_scheduler(args) as scheduler:
        node = scheduler.GetNode(
            scheduler_pb2.GetNodeRequest(provider_id=provider, region_id=region, node_id=node_id)
        )
    # CSV and JSON lines carry one kind of row, so scripts get only the accelerators.
    if args.format == "table":
        print_records([node_row(node)], NODE_COLUMNS, title="node")
        if node.job_ids:
            print_records([{"job": job_id} for job_id in node.job_ids], ("job",), title="jobs")
    print_records(
        [accelerator_row(a) for a in node.accelerators],
        ACCELERATOR_COLUMNS,
        output_format=args.format,
        title="accelerators",
    )
    return EXIT_OK


def drain_node(args: argparse.Namespace) -> int:
    provider, region, node = _node_path(args.node)
    with open_scheduler(args) as scheduler:
        result = scheduler.DrainNode(
            scheduler_pb2.DrainNodeRequest(
                request_id=uuid.uuid4().hex,
                provider_id=provider,
                region_id=region,
                node_id=node,
                reason=args.reason,
                undrain=args.undrain,
            )
        )
    print_records([node_row(result)], NODE_COLUMNS, output_format=args.format)
    return EXIT_OK


def mark_node_down(args: argparse.Namespace) -> int:
    provider, region, node = _node_path(args.node)
    with open_scheduler(args) as scheduler:
        result = scheduler.MarkNodeDown(
            scheduler_pb2.MarkNodeDownRequest(
                request_id=uuid.uuid4().hex,
                provider_id=provider,
                region_id=region,
                node_id=node,
                reason=args.reason,
            )
        )
    print_records([node_row(result)], NODE_COLUMNS, output_format=args.format)
    return EXIT_OK


def delete_node(args: argparse.Namespace) -> int:
    provider, region, node = _node_path(args.node)
    with open_scheduler(args) as scheduler:
        result = scheduler.DeleteNode(
            scheduler_pb2.DeleteNodeRequest(
                request_id=uuid.uuid4().hex,
                provider_id=provider,
                region_id=region,
                node_id=node,
                reason=args.reason,
            )
        )
    print_records([node_row(result)], NODE_COLUMNS, output_format=args.format, title="deleted")
    if result.state == scheduler_pb2.NODE_STATE_DRAINED:
        # A drained node shows as unknown once its heartbeats are overdue. Until then its agent
        # may run, or may have stopped only within the heartbeat timeout.
        sys.stderr.write(
            f"note: the heartbeats of {args.node} were not overdue yet, so its agent may still "
            "run. If it does, stop it, or the node comes back as a new node that is up when "
            "the agent restarts or reconnects to NATS\n"
        )
    return EXIT_OK


def provider_rows(provider: scheduler_pb2.Provider) -> list[dict[str, Any]]:
    """Return one row per region of ``provider``, or one row if it has no region."""
    regions = list(provider.regions) or [scheduler_pb2.Region()]
    return [
        {
            "provider": provider.provider_id,
            "name": provider.display_name,
            "region": region.region_id,
            "region name": region.display_name,
            "jurisdiction": region.jurisdiction,
            "cross-provider": provider.allow_cross_provider_gangs,
        }
        for region in regions
    ]


def list_providers(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    token = ""
    with open_scheduler(args) as scheduler:
        while True:
            response = scheduler.ListProviders(
                scheduler_pb2.ListProvidersRequest(
                    page=common_pb2.PageRequest(page_size=1000, page_token=token)
                )
            )
            for provider in response.providers:
                rows.extend(provider_rows(provider))
            token = response.page.next_page_token
            if not token:
                break
    print_records(rows, PROVIDER_COLUMNS, output_format=args.format, title="providers")
    return EXIT_OK


def list_models(args: argparse.Namespace) -> int:
    with open_scheduler(args) as scheduler:
        response = scheduler.ListAcceleratorModels(scheduler_pb2.ListAcceleratorModelsRequest())
    rows = [
        {
            "model": m.name,
            "vendor": common_pb2.Vendor.Name(m.vendor).removeprefix("VENDOR_").lower(),
            "memory (GiB)": m.memory_gib,
            "peak TFLOP/s": decimal_value(m.peak_dense_tflops),
            "stacks": ", ".join(m.software_stacks),
            "source": m.source,
        }
        for m in response.models
    ]
    columns = ("model", "vendor", "memory (GiB)", "peak TFLOP/s", "stacks", "source")
    print_records(rows, columns, output_format=args.format, title="accelerator catalog")
    return EXIT_OK


def queue_summary(args: argparse.Namespace) -> int:
    with open_scheduler(args) as scheduler:
        summary = scheduler.GetQueueSummary(scheduler_pb2.GetQueueSummaryRequest())
    states = [
        {"table": "states", "state": k, "jobs": v} for k, v in sorted(summary.jobs_by_state.items())
    ]
    reasons = [
        {"table": "pending", "reason": k, "jobs": v}
        for k, v in sorted(summary.pending_by_reason.items())
    ]
    regions = [_capacity_row(summary, region) for region in sorted(summary.total_millis_by_region)]
    if args.format != "table":
        # One CSV header or one JSON key set for all rows, so a script can filter by table.
        print_records(states + reasons + regions, QUEUE_COLUMNS, output_format=args.format)
        return EXIT_OK
    print_records(states, ("state", "jobs"), title="jobs by state")
    print_records(reasons, ("reason", "jobs"), title="pending jobs")
    print_records(regions, ("region", *CAPACITY_COLUMNS), title="accelerators")
    return EXIT_OK


def _capacity_row(summary: scheduler_pb2.GetQueueSummaryResponse, region: str) -> dict[str, Any]:
    """Return the accelerators row of ``region``, in accelerators.

    A scheduler older than the split sends only used and total, so the split stays empty. One
    older than the above-cap count leaves only that column empty.
    """
    split = {
        "usable": summary.usable_millis_by_region,
        "recalled": summary.recalled_millis_by_region,
        "unknown": summary.unknown_millis_by_region,
        "out of service": summary.out_of_service_millis_by_region,
    }
    has_split = region in summary.usable_millis_by_region
    row: dict[str, Any] = {
        "table": "accelerators",
        "region": region,
        "used": accelerator_count(summary.used_millis_by_region.get(region, 0)),
        "total": accelerator_count(summary.total_millis_by_region[region]),
    }
    for column, millis in split.items():
        row[column] = accelerator_count(millis.get(region, 0)) if has_split else None
    # The scheduler sends an above-cap count for every region it splits, 0 included.
    above_cap = summary.above_cap_millis_by_region
    row["above cap"] = accelerator_count(above_cap[region]) if region in above_cap else None
    return row


def accelerator_count(millis: int) -> int | float:
    """Convert milli-accelerators to accelerators: an int when whole, else a float (0.25)."""
    if millis % 1000 == 0:
        return millis // 1000
    return millis / 1000


def _node_path(text: str) -> tuple[str, str, str]:
    from acsp.cli._common import EXIT_USAGE, CommandError

    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise CommandError(f"node {text!r} is not <provider>/<region>/<node>", EXIT_USAGE)
    return parts[0], parts[1], parts[2]

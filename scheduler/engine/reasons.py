"""Reason codes and messages for jobs that did not start."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

from scheduler.engine.decisions import ReasonCode
from scheduler.engine.events import BudgetChanged
from scheduler.engine.fleet import Pool
from scheduler.engine.spec import MILLIS_PER_ACCELERATOR, JobSpec, PriorityClass, Topology

UNIX_TIME_FROM: Final = 1e9
"""Times from this on (September 2001) are Unix times and read as dates. Earlier ones are the
seconds of a simulation that starts at 0."""


def at(t: float) -> str:
    """Return time ``t`` as a message writes it: a UTC date and time, or ``t=<seconds> s``."""
    if t >= UNIX_TIME_FROM:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"t={t:.0f} s"


def budget_message(block: BudgetChanged | None, job_id: str) -> str:
    """Explain why a job waits behind a budget block, and when it is tried again.

    The block comes from the hold the grant service last rejected on the grant or
    sub-allocation that pays the job, or for the project's jobs that name no grant. A job at
    least as large as that one is not sent for a hold, because it would be rejected too.
    """
    if block is None or not block.message:
        refused = (
            "the grant service rejected a hold no larger than this job's on the grant or "
            "sub-allocation that pays it"
        )
    elif block.job_id == job_id:
        refused = block.message
    elif block.payer:
        refused = (
            f"the grant service rejected the hold of job {block.job_id}, which draws on the "
            f"same grant or sub-allocation and is no larger than this one: {block.message}"
        )
    else:
        refused = (
            f"the grant service rejected the hold of job {block.job_id}, which names no grant "
            f"either and is no larger than this one: {block.message}"
        )
    if block is None or block.retry_at is None:
        return f"{refused}; the scheduler asks for the hold again at its next budget check"
    return f"{refused}; the scheduler asks for the hold again after {at(block.retry_at)}"


def free_millis(pool: Pool) -> int:
    """Millis of wholly free accelerators on the pool's up nodes, ignoring its cap."""
    whole = sum(count * len(bucket) for count, bucket in enumerate(pool.buckets))
    return whole * MILLIS_PER_ACCELERATOR


def usable_free_millis(pool: Pool) -> int:
    """Millis of wholly free accelerators on the pool's up nodes that its cap lets jobs use."""
    return min(free_millis(pool), pool.available_millis())


def capped_total_millis(pool: Pool) -> int:
    """Millis of every node of the pool, free or not, no more than its cap."""
    if pool.cap_millis is None:
        return pool.total_millis
    return min(pool.total_millis, pool.cap_millis)


def cap_source(pool: Pool) -> str:
    """Name what sets the pool's cap: a recall, its pledges or its pool limit."""
    if pool.recall_id:
        return f"recall {pool.recall_id}"
    if pool.pledge_millis is not None and pool.cap_millis == pool.pledge_millis:
        return "the pledge"
    return "the pool limit"


def describe_caps(pools: Sequence[Pool]) -> str:
    """Name each pool of ``pools`` whose cap is below its registered accelerators, or ''."""
    parts = [
        f"{cap_source(pool)} caps {pool.name} at "
        f"{pool.cap_millis / MILLIS_PER_ACCELERATOR:g} accelerators"
        for pool in pools
        if pool.cap_millis is not None and pool.cap_millis < pool.total_millis
    ]
    return "; ".join(parts)


def up_nodes(pool: Pool) -> int:
    # Every up node sits in exactly one bucket.
    return sum(len(bucket) for bucket in pool.buckets)


def describe_demand(job: JobSpec) -> str:
    if job.fractional:
        each = f"{job.millis_per_task / MILLIS_PER_ACCELERATOR:g} of an accelerator"
    else:
        each = f"{job.accelerators_per_task} accelerator(s)"
    if job.task_count == 1:
        return each
    if job.topology is Topology.SAME_PROVIDER and job.allow_cross_provider:
        return f"{job.task_count} tasks x {each} (across providers)"
    return f"{job.task_count} tasks x {each} ({job.topology})"


def cross_provider_denial(job: JobSpec) -> str:
    """Explain why a gang that asked to span providers must stay within one, or return ''."""
    denying = sorted(job.cross_provider_denied_by)
    if not denying or job.task_count == 1 or job.topology is not Topology.SAME_PROVIDER:
        return ""
    names = ",".join(denying)
    return (
        f"the job allows cross-provider placement, but provider(s) {names} do not allow "
        "cross-provider gangs, so all its tasks must run on one provider"
    )


def describe_pools(pools: Sequence[Pool]) -> str:
    models = sorted({pool.model for pool in pools})
    regions = sorted({pool.region_key for pool in pools})
    return f"models {','.join(models)} in {','.join(regions)}"


def largest_node(pool: Pool) -> int:
    """Return the accelerator count of the pool's largest node, whatever its state."""
    # The free-count buckets grow to the size of every node added and never shrink.
    return len(pool.buckets) - 1


def size_reason(job: JobSpec, pools: Sequence[Pool]) -> tuple[ReasonCode, str] | None:
    """Return why no node of ``pools`` can ever hold the job's tasks, or None if one can.

    A task larger than every node of an accepted model can run on no node at all, so it gets
    TASK_TOO_LARGE. Tasks that fit one by one but not together on one node, as ``same_node``
    requires, get TOPOLOGY. ``pools`` must each have a node, as candidate pools do.
    """
    if job.fractional:
        return None
    largest = max((largest_node(pool) for pool in pools), default=0)
    per_task = job.accelerators_per_task
    if per_task > largest:
        return (
            ReasonCode.TASK_TOO_LARGE,
            f"no node has {per_task} accelerators of an accepted model for one task; the "
            f"largest node of {describe_pools(pools)} has {largest}; it waits until a larger "
            "node joins",
        )
    need = per_task * job.task_count if job.topology is Topology.SAME_NODE else per_task
    if largest >= need:
        return None
    return (
        ReasonCode.TOPOLOGY,
        f"no node of {describe_pools(pools)} has {need} accelerators for "
        f"{describe_demand(job)}; the largest has {largest}; it waits until a larger node joins",
    )


def largest_group_millis(
    job: JobSpec, pools: Sequence[Pool], capped: bool = False
) -> tuple[str, int]:
    """Return the largest group of ``pools`` that one placement of the job may span.

    All tasks of a gang use one accelerator model, so a group is the pools of one model in one
    region, in one provider or in the whole fleet, as the job's topology allows. The group is
    named for the message (``any one region``, say) and measured in millis of every node it
    has, free or not, each pool no more than its cap when ``capped`` is set.
    """
    if job.topology is Topology.SAME_REGION:
        return "any one region", _largest_millis(pools, lambda pool: pool.key, capped)
    if job.topology is Topology.SAME_PROVIDER and not job.allow_cross_provider:
        by_provider = _largest_millis(pools, lambda pool: (pool.provider, pool.model), capped)
        return "any one provider", by_provider
    return "the whole fleet", _largest_millis(pools, lambda pool: (pool.model,), capped)


def _largest_millis(
    pools: Sequence[Pool], key: Callable[[Pool], tuple[str, ...]], capped: bool
) -> int:
    """Return the millis of the largest group of ``pools`` that have the same ``key``."""
    totals: dict[tuple[str, ...], int] = {}
    for pool in pools:
        size = capped_total_millis(pool) if capped else pool.total_millis
        totals[key(pool)] = totals.get(key(pool), 0) + size
    return max(totals.values(), default=0)


def no_pool_message(job: JobSpec, fleet_pools: Iterable[Pool]) -> str:
    """Explain why no pool of the fleet is a candidate for the job."""
    if not job.regions:
        return "no node in the fleet has an accepted accelerator model"
    allowed = ",".join(sorted(job.regions))
    # A pool outlives its last node, so a region counts only while a pool there has one.
    if not any(pool.nodes and pool.region_key in job.regions for pool in fleet_pools):
        return f"no node in the allowed regions ({allowed})"
    return f"no node in the allowed regions ({allowed}) has an accepted accelerator model"


def capacity_reason(
    job: JobSpec,
    pools: Sequence[Pool],
    placed_classes: dict[int, PriorityClass],
) -> tuple[ReasonCode, str]:
    """Explain why a job found no room among ``pools`` (limits and budget already passed)."""
    too_small = size_reason(job, pools)
    if too_small is not None:
        return too_small
    need = job.total_millis
    demand = describe_demand(job)
    where = describe_pools(pools)
    scope, largest = largest_group_millis(job, pools)
    denial = cross_provider_denial(job)
    if need > largest:
        message = (
            f"{demand} needs {need / MILLIS_PER_ACCELERATOR:g} accelerators of one model, but "
            f"{scope} has at most {largest / MILLIS_PER_ACCELERATOR:g} of one of {where}"
        )
        if not denial:
            return ReasonCode.NO_CAPACITY, f"{message}; it waits until the fleet grows"
        fleet = _largest_millis(pools, lambda pool: (pool.model,), capped=False)
        if need <= fleet:
            return (
                ReasonCode.NO_CAPACITY,
                f"{message}; {denial}; it waits until the fleet grows or those providers "
                "allow cross-provider gangs",
            )
        return (
            ReasonCode.NO_CAPACITY,
            f"{message}; {denial}, and the whole fleet has at most "
            f"{fleet / MILLIS_PER_ACCELERATOR:g} of one model; it waits until the fleet grows",
        )
    _, largest_capped = largest_group_millis(job, pools, capped=True)
    if need > largest_capped:
        return cap_reason(job, pools)
    if sum(up_nodes(pool) for pool in pools) == 0:
        return ReasonCode.NO_CAPACITY, f"no node of {where} is up"
    free_total = sum(usable_free_millis(pool) for pool in pools)
    recalled = [pool for pool in pools if pool.recall_id and free_millis(pool) >= need]
    if recalled and all(pool.available_millis() < need for pool in recalled):
        names = ",".join(pool.name for pool in recalled)
        return (
            ReasonCode.PROVIDER_RECALL,
            f"{demand} would fit on {names} but the provider recalled that capacity",
        )
    ahead = [placed_classes[pool.ordinal] for pool in pools if pool.ordinal in placed_classes]
    if ahead and max(ahead) > job.priority:
        return (
            ReasonCode.PRIORITY,
            f"jobs of a higher priority class took the last free {where}",
        )
    if ahead:
        return (
            ReasonCode.FAIR_SHARE,
            f"jobs ahead in fair-share order took the last free {where}",
        )
    if job.task_count > 1 and free_total >= need:
        message = (
            f"{free_total / MILLIS_PER_ACCELERATOR:g} accelerators of {where} are free but "
            f"not as {demand}"
        )
        return ReasonCode.TOPOLOGY, f"{message}; {denial}" if denial else message
    message = (
        f"no room for {demand} on {where}: {free_total / MILLIS_PER_ACCELERATOR:g} "
        "accelerators free"
    )
    if free_total < sum(free_millis(pool) for pool in pools):
        # Idle accelerators above a cap are not free for jobs, so the message names the cap.
        message = f"{message}; {describe_caps(pools)}"
    if denial:
        message = f"{message}; {denial}"
    return ReasonCode.NO_CAPACITY, message


def cap_reason(job: JobSpec, pools: Sequence[Pool]) -> tuple[ReasonCode, str]:
    """Explain a job that the fleet could hold but the caps of ``pools`` keep from starting."""
    requested = (
        f"{job.total_millis / MILLIS_PER_ACCELERATOR:g} requested for {describe_demand(job)}"
    )
    caps = describe_caps(pools)
    if any(pool.recall_id for pool in pools):
        return ReasonCode.PROVIDER_RECALL, f"{caps}; {requested}; it waits until the recall ends"
    if any(pool.pledge_millis is not None for pool in pools):
        growth = "it can start only if the provider pledges more"
    else:
        growth = "it can start only if the operator raises the pool limit"
    return ReasonCode.NO_CAPACITY, f"{caps}; {requested}; {growth}"

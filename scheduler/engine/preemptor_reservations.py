"""Preemptor reservations: the room a job that preempted others keeps until it starts.

A preemptor's victims stop one by one, and each is queued again once it has stopped. Without a
reservation, the jobs served in the passes between those stops would take the room each stop
frees, the requeued victims among them. The preemptor would then still not fit after its last
victim stopped, and it would preempt other jobs, until it had preempted every job it may.

So every full pass reserves the nodes where each waiting preemptor fits once its victims have
stopped, from the grace deadline by which they must have, before it serves the preemptor's
class. The jobs of that class and lower ones avoid those nodes like any reservation's, unless
they end before it starts, and the preemptor may use its own. Jobs of a
higher class are served first and may take the room. Victims whose preemptor no longer waits
for them, because it started on other room or left the queue, are unclaimed. The next
preemptor that needs room claims them before it preempts anyone. A preemptor whose victims have
all stopped and whose room is gone is no preemptor any more, and waits in its place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from scheduler.engine.decisions import Claim, ReasonCode
from scheduler.engine.fleet import Pool
from scheduler.engine.reasons import at
from scheduler.engine.records import JobRecord, job_of
from scheduler.engine.reservations import Reservation, earliest_start

if TYPE_CHECKING:
    from scheduler.engine.cycle import PassState
    from scheduler.engine.engine import Engine


def forget_stopped_victims(state: PassState) -> None:
    """Drop the victims that have stopped from every preemptor and from the unclaimed ones."""
    engine = state.engine
    jobs = engine.jobs
    engine.unclaimed_victims = {v for v in engine.unclaimed_victims if _still_running(jobs.get(v))}
    for record in [jobs[job_id] for job_id in engine.preemptors]:
        record.awaiting_victims = frozenset(
            v for v in record.awaiting_victims if _still_running(jobs.get(v))
        )


def reserve_for_preemptors(state: PassState, priority: int) -> None:
    """Reserve room for every pending preemptor of class ``priority``, before the pass serves
    that class.

    The jobs of higher classes were served before, so they may take the room first. Inside a
    class, the preemptors with fewer victims left to stop go first, because the room that is
    free now is most likely what their own victims freed.
    """
    engine = state.engine
    jobs = engine.jobs
    preemptors = (jobs[job_id] for job_id in engine.preemptors)
    order = sorted((r for r in preemptors if r.spec.priority == priority), key=_preemptor_order)
    for record in order:
        if _held_back(state, record):
            # It cannot start in this pass whatever room it has, so others may use the room.
            if not record.awaiting_victims:
                engine.preemptors.discard(record.job_id)
            continue
        shape = record.shape
        assert shape is not None
        reserve_for_victims(state, record, engine.shapes.pools_of(shape, record.spec))


def _preemptor_order(record: JobRecord) -> tuple[int, float, int]:
    spec = record.spec
    return (len(record.awaiting_victims), spec.submit_time, record.sequence)


def outranks_preemptors(
    engine: Engine, job_ids: Sequence[str], preemptor_ids: Iterable[str]
) -> bool:
    """Return whether a job of ``job_ids`` is of a higher class than a preemptor of
    ``preemptor_ids``, so it must not avoid that preemptor's reservation."""
    jobs = engine.jobs
    lowest = min((jobs[j].spec.priority for j in preemptor_ids if j in jobs), default=None)
    if lowest is None:
        return False
    return any(j in jobs and jobs[j].spec.priority > lowest for j in job_ids)


def _held_back(state: PassState, record: JobRecord) -> bool:
    """Return whether a budget block or a limit keeps ``record`` waiting, as in try_job()."""
    engine = state.engine
    spec = record.spec
    if engine.no_budget:
        ceiling = engine.no_budget.get((spec.project, spec.payer))
        if ceiling is not None and spec.budget_size >= ceiling:
            return True
    return bool(engine.limits and state.limit_blocking(spec))


def _still_running(record: JobRecord | None) -> bool:
    return record is not None and record.running


def reserve_for_victims(state: PassState, record: JobRecord, pools: Sequence[Pool]) -> None:
    """Reserve the nodes where ``record`` fits once its victims have stopped.

    A preemptor whose victims have all stopped gets the room it fits on by the start that the
    last pass reserved for it, counting the ends of jobs that backfilled that room. Nothing is
    reserved when it would not fit even then, e.g. because a job of a higher class took the
    room.
    """
    if record.job_id in state.preemptor_reservations or not pools:
        return
    jobs = state.engine.jobs
    victims = [jobs[v] for v in record.awaiting_victims]
    reservation = _earliest(state, record, pools, victims)
    if reservation is not None:
        _add_preemptor_reservation(state, record, reservation)
    elif not record.awaiting_victims:
        # The room its victims freed is gone, so it waits in its place like other jobs.
        state.engine.preemptors.discard(record.job_id)


def claim_victims(state: PassState, record: JobRecord, pools: Sequence[Pool]) -> bool:
    """Let ``record`` wait for unclaimed victims instead of preempting others.

    Returns whether it claimed some. It claims the unclaimed victims on the nodes where it fits
    once they, and the victims it already awaits, have stopped, and reserves those nodes. Each
    claimed victim gets a :class:`Claim` decision.
    """
    engine = state.engine
    if not engine.unclaimed_victims or record.job_id in state.preemptor_reservations or not pools:
        return False
    pool_set = set(pools)
    jobs = engine.jobs
    unclaimed = [
        jobs[v]
        for v in sorted(engine.unclaimed_victims)
        if _still_running(jobs.get(v)) and _runs_in(jobs[v], pool_set)
    ]
    if not unclaimed:
        return False
    own = [jobs[v] for v in record.awaiting_victims]
    reservation = _earliest(state, record, pools, [*own, *unclaimed])
    if reservation is None:
        return False
    claimed = {
        victim.job_id
        for victim in unclaimed
        if any(a.node.ordinal in reservation.nodes for a in (victim.tasks or {}).values())
    }
    if not claimed:
        return False
    engine.unclaimed_victims -= claimed
    record.awaiting_victims = record.awaiting_victims | claimed
    state.decisions.extend(Claim(job_id, record.job_id) for job_id in sorted(claimed))
    engine.preemptors.add(record.job_id)
    _add_preemptor_reservation(state, record, reservation)
    return True


def _runs_in(record: JobRecord, pools: set[Pool]) -> bool:
    return any(a.node.pool in pools for a in (record.tasks or {}).values())


def _earliest(
    state: PassState, record: JobRecord, pools: Sequence[Pool], victims: Sequence[JobRecord]
) -> Reservation | None:
    """Return where ``record`` fits once ``victims`` have stopped, off every reserved node.

    Each victim counts as stopped at its grace deadline, so the reservation starts when the
    victims it needs may have stopped at the latest. Until then the reserved room backfills
    jobs whose wall-time limit ends before that start, as any reservation's does. A victim
    that stops earlier lets ``record`` start at once, on room such jobs do not hold.
    """
    now = state.now
    releases = [(_release_time(victim, now), victim.sequence, victim) for victim in victims]
    previous = state.previous_preemptor_reservations.get(record.job_id)
    if previous is not None:
        releases.extend(_backfilled(state, previous, victims))
    releases.sort(key=lambda release: release[:2])
    return earliest_start(
        state.engine.fleet,
        record.spec,
        pools,
        ((end, job) for end, _, job in releases),
        now,
        state.excluded_prefix[-1],
    )


def _backfilled(
    state: PassState, reservation: Reservation, victims: Sequence[JobRecord]
) -> list[tuple[float, int, JobRecord]]:
    """Return the jobs other than ``victims`` on ``reservation``'s nodes that end by its start.

    Those jobs may have backfilled the room while the victims stopped, and it counts as free
    again when they end. Each comes with its expected end and sequence.
    """
    engine = state.engine
    skipped = {victim.job_id for victim in victims}
    found: dict[str, tuple[float, int, JobRecord]] = {}
    for ordinal in reservation.nodes:
        for owner in engine.fleet.nodes[ordinal].jobs:
            job = engine.jobs.get(job_of(owner))
            if job is None or job.owner != owner or job.job_id in skipped or job.job_id in found:
                continue
            end = job.end_estimate
            if job.running and end is not None and end <= reservation.start:
                found[job.job_id] = (end, job.sequence, job)
    return list(found.values())


def _release_time(victim: JobRecord, now: float) -> float:
    """Return when ``victim`` has stopped at the latest.

    That is now when its deadline is unknown, e.g. for a stop that a restart restored from a
    row stored before deadlines were kept. Its room is then kept from now and backfills
    nothing.
    """
    deadline = victim.stop_deadline
    return now if deadline is None or deadline < now else deadline


def _add_preemptor_reservation(
    state: PassState, record: JobRecord, reservation: Reservation
) -> None:
    state.preemptor_reservations[record.job_id] = reservation
    state.add_reservation(reservation, announce=False)


def place_on_reservation(
    state: PassState, record: JobRecord, pools: tuple[Pool, ...], reservation: Reservation
) -> bool | None:
    """Place a preemptor on the room reserved for it, or keep it waiting for its victims.

    Returns whether it was placed. Returns None, with the reservation dropped, when it does not fit
    and awaits no victim, because then its room is gone and it is served like other jobs.
    """
    spec = record.spec
    excluded = state.excluded_prefix[state.reservations_to_avoid(spec)] - reservation.nodes
    plans = state.plan(spec, pools, excluded, avoid=True)
    if plans is None and spec.avoid_nodes:
        plans = state.plan(spec, pools, excluded)
    if plans is None and record.awaiting_victims:
        return state.wait_for_victims(record)
    if plans is None and reservation.start > state.now:
        # Its victims have stopped, and jobs that end before the room is due backfilled it.
        message = (
            f"waiting for the room its preempted jobs freed, reserved from {at(reservation.start)}"
        )
        return state.wait(record, ReasonCode.PRIORITY, message)
    del state.preemptor_reservations[spec.job_id]
    state.remove_reservation(reservation)
    if plans is None:
        state.engine.preemptors.discard(spec.job_id)
        return None
    state.place(record, plans)
    return True

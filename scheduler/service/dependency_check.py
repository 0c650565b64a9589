"""The submission check of the jobs a new job waits for (``JobSpec.after_job_ids``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

from services.runtime.errors import FailedPrecondition, InvalidArgument, require_id

MAX_AFTER_IDS: Final = 100
"""Job or array ids that one job may wait for."""
MAX_AWAITED_JOBS: Final = 10_000
"""Jobs that one job may wait for once arrays are counted by their elements."""
MAX_WAITS_PER_CALL: Final = 100_000
"""Waits that one call may create: each pair of a submitted job and a job it waits for. The
leader keeps every pair in memory and walks them in its loop when the jobs arrive, so an array
that waits for an array costs the product of their sizes."""

AwaitedRow = tuple[str, str, str, str]
"""Job id, array id, project id and state of a stored job."""


async def resolve_after_ids(
    after: Sequence[str],
    project_id: str,
    field: str,
    read: Callable[[list[str]], Awaitable[list[AwaitedRow]]],
    reject_ended: bool = True,
) -> tuple[str, ...]:
    """Return the ids of the jobs that ``after`` names, with each array replaced by its
    elements, in the order given and without repeats.

    ``read`` returns the stored jobs whose job id or array id is one of the ids. Raises
    InvalidArgument for an id that names no job of ``project_id``, and, with ``reject_ended``,
    FailedPrecondition for a job that ended without completing, because the new job could
    never start.
    """
    if not after:
        return ()
    if len(after) > MAX_AFTER_IDS:
        raise InvalidArgument(
            field,
            f"names {len(after)} jobs, over the {MAX_AFTER_IDS} a job may wait for",
            "wait for a job array, which counts as one, or submit a job that waits for the "
            "others and have this one wait for it",
        )
    for index, job_id in enumerate(after):
        require_id(f"{field}[{index}]", job_id, "pass a job id or job array id")
    rows = await read(list(dict.fromkeys(after)))
    by_job = {row[0]: row for row in rows}
    by_array: dict[str, list[AwaitedRow]] = {}
    for row in rows:
        if row[1]:
            by_array.setdefault(row[1], []).append(row)
    resolved: dict[str, None] = {}
    for index, named in enumerate(after):
        found = [by_job[named]] if named in by_job else by_array.get(named, [])
        if not found or found[0][2] != project_id:
            raise InvalidArgument(
                f"{field}[{index}]",
                f"job {named} is not found in project {project_id}",
                "pass the id of a job or job array of the same project that this scheduler "
                "shard runs, as SubmitJob returned it",
            )
        for job_id, _, _, state in sorted(found):
            if reject_ended and state in ("failed", "cancelled", "timed_out"):
                raise FailedPrecondition(
                    f"job {job_id} ended {state}, so a job that waits for it could never start; "
                    "submit without it, or wait for a job that completed",
                    f"{field}[{index}]",
                )
            resolved[job_id] = None
    if len(resolved) > MAX_AWAITED_JOBS:
        raise InvalidArgument(
            field,
            f"names {len(resolved)} jobs once arrays count their elements, over the "
            f"{MAX_AWAITED_JOBS} a job may wait for",
            "wait for fewer or smaller job arrays",
        )
    return tuple(resolved)


def check_wait_count(submissions: Iterable[tuple[int, int]], field: str) -> None:
    """Raise InvalidArgument when one call's submissions create over MAX_WAITS_PER_CALL waits.

    ``submissions`` gives, per submission, its jobs (array elements counted) and the jobs each
    of them waits for.
    """
    waits = sum(jobs * awaited for jobs, awaited in submissions)
    if waits <= MAX_WAITS_PER_CALL:
        return
    raise InvalidArgument(
        field,
        f"would create {waits} waits, one per submitted job and job it waits for (array "
        f"elements counted), over the {MAX_WAITS_PER_CALL} that one call may create",
        "submit one job that waits for those jobs and have the others wait for it alone, or "
        "submit smaller arrays",
    )

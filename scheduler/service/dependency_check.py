"""The submission check of the jobs a new job waits for (``JobSpec.after_job_ids``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from services.runtime.errors import FailedPrecondition, InvalidArgument, require_id

MAX_AFTER_IDS: Final = 100
"""Job or array ids that one job may wait for."""
MAX_AWAITED_JOBS: Final = 10_000
"""Jobs that one job may wait for once arrays are counted by their elements."""

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
                "pass the id of a job or job array of the same project, as SubmitJob returned it",
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

"""Idempotency keys of submissions: a request id repeated returns its first jobs, and a
request id reused for different jobs is rejected before anything is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

from acsp.v1 import scheduler_pb2
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.evolve import evolve

from .model import Job, JobSpec


def check_repeated_in_batch(requests: Sequence[scheduler_pb2.SubmitJobRequest]) -> None:
    """Raise INVALID_ARGUMENT when one SubmitJobs call repeats a request id with another spec.

    The store keeps the first job of a repeated request id, so the second spec would be
    dropped silently.
    """
    first: dict[str, int] = {}
    for index, item in enumerate(requests):
        if not item.request_id:
            continue
        earlier = first.setdefault(item.request_id, index)
        if earlier != index and requests[earlier].spec != item.spec:
            raise InvalidArgument(
                f"jobs[{index}].request_id",
                f"repeats the request_id {item.request_id!r} of jobs[{earlier}] with another spec",
                "give each distinct job its own request_id",
            )


def lookup_keys(key: str, array_size: int) -> list[str]:
    """Return the stored keys that show whether ``key`` was used before, and for what.

    A single job is stored under ``key`` and element ``i`` of a job array under ``key/i``.
    Both forms are looked up, and for an array also the element after its last, so a retry
    with another array size is found as well.
    """
    if array_size == 0:
        return [key, f"{key}/0"]
    return [key, *(f"{key}/{i}" for i in range(array_size + 1))]


Submission = tuple[list[Job], str | None, str]
"""One submission's jobs, its key from :func:`request_key` (None without a request id) and the
request_id field to name in an error."""


def stored_keys(submissions: Sequence[Submission]) -> list[str]:
    """Return the keys to look up before ``submissions`` are stored (see :func:`lookup_keys`)."""
    return [
        stored_key
        for jobs, key, _ in submissions
        if key is not None
        for stored_key in lookup_keys(key, _array_size(jobs))
    ]


def check_stored(submissions: Sequence[Submission], found: dict[str, Job]) -> None:
    """Raise FAILED_PRECONDITION when a submission's request id was used for other jobs.

    ``found`` maps each key of :func:`stored_keys` that is stored to its job. The submission
    batcher checks a call before it stores any of the call's jobs, so a rejected SubmitJobs
    call creates none of its other jobs.

    NOTE: a concurrent call can store under the same key between the lookup and the insert.
    :func:`check_reused_ids` still rejects its spec afterwards, but the call's other jobs stay.
    """
    if not found:
        return
    for jobs, key, field in submissions:
        if key is not None:
            _check_one(jobs, key, found, field)


def _array_size(jobs: list[Job]) -> int:
    return len(jobs) if jobs[0].array_id else 0


def _check_one(jobs: list[Job], key: str, found: dict[str, Job], field: str) -> None:
    size = _array_size(jobs)
    again = "repeat that request unchanged to get its jobs, or use a new request_id for new jobs"
    if size == 0:
        element = found.get(f"{key}/0")
        # A single job submitted under the request id "<id>/0" has the same key as element 0
        # of an array under "<id>", and it is no earlier use of this request id.
        if element is not None and element.array_id:
            raise FailedPrecondition(
                f"was used before for job array {element.array_id}; {again}", field
            )
        single = found.get(key)
        if single is not None:
            check_reused_ids(jobs, [single], field)
        return
    single = found.get(key)
    if single is not None:
        raise FailedPrecondition(
            f"was used before for job {single.job_id}, which is not a job array; {again}", field
        )
    elements = [found.get(f"{key}/{i}") for i in range(size)]
    stored = [job for job in elements if job is not None]
    beyond = found.get(f"{key}/{size}")
    if beyond is not None or 0 < len(stored) < size:
        array_id = (beyond or stored[0]).array_id
        raise FailedPrecondition(
            f"was used before for job array {array_id} with another array_size; {again}", field
        )
    if stored:
        check_reused_ids(jobs, stored, field)


def check_reused_ids(submitted: list[Job], stored: list[Job], field: str) -> None:
    """Raise FAILED_PRECONDITION when a request id returned a job of another spec.

    A retry returns the job its first request stored. A request id used again for a different
    job is a caller's mistake that would otherwise go unnoticed, and the grant service rejects
    such a reuse too. Only what the caller sent is compared, not the grant's constraints that
    the scheduler copies into a spec or the grant or sub-allocation that pays a job which
    named none.
    """
    for new, old in zip(submitted, stored, strict=True):
        if new.job_id == old.job_id or _same_submission(old.spec, new.spec):
            continue
        raise FailedPrecondition(
            f"was used before for job {old.job_id} with another spec; repeat that request "
            "unchanged to get its job, or use a new request_id for a new job",
            field,
        )


def _same_submission(stored: JobSpec, submitted: JobSpec) -> bool:
    named_grant = bool(submitted.grant_id) and not submitted.sub_allocation_picked

    def sent(spec: JobSpec) -> JobSpec:
        if spec.sub_allocation_picked:
            spec = evolve(spec, grant_id="", sub_allocation_id="", sub_allocation_picked=False)
        # A job that named no grant keeps none here, whichever grant came to pay for it.
        grant = spec.grant_id if named_grant else ""
        return evolve(spec, grant_id=grant, grant_providers=(), grant_regions=(), grant_models=())

    return sent(stored) == sent(submitted)


def request_key(owner: str, request_id: str) -> str | None:
    """Return the stored idempotency key of a submission, or None without a request id.

    The key is scoped to the submitter, so a request id that another caller used creates a
    job instead of returning theirs. The owner's length makes the key unambiguous.
    """
    if not request_id:
        return None
    return f"{len(owner)}:{owner}/{request_id}"

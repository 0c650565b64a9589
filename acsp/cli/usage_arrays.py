"""Job arrays in ``acsp usage`` listings, where an array id stands for its elements' ids.

Metering records each element as a job of its own and stores no arrays, so the scheduler is
asked for the elements.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

import grpc

from acsp.cli.jobs import open_scheduler
from acsp.v1 import common_pb2, scheduler_pb2

_Record = TypeVar("_Record")

MAX_ELEMENT_PAGES = 100
"""Upper bound on ListJobs pages read for one array; 100 pages of 1000 exceed any array."""


def array_element_ids(args: argparse.Namespace, job_id: str) -> list[str] | None:
    """Return the ids of the elements of job array ``job_id`` that ever started, by index.

    Returns None when ``job_id`` is not the id of a job array that the caller may read. An
    element that never started has no usage, so it is left out.
    """
    with open_scheduler(args) as scheduler:
        try:
            parent = scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        if parent.array_job_id != parent.job_id:
            return None
        elements: list[scheduler_pb2.Job] = []
        token = ""
        for _ in range(MAX_ELEMENT_PAGES):
            response = scheduler.ListJobs(
                scheduler_pb2.ListJobsRequest(
                    array_job_id=job_id,
                    page=common_pb2.PageRequest(page_size=1000, page_token=token),
                )
            )
            elements.extend(response.jobs)
            token = response.page.next_page_token
            if not token:
                break
    # A later attempt means an earlier one started, although the current one may not have.
    started = [job for job in elements if job.HasField("start_time") or job.attempt > 1]
    return [job.job_id for job in sorted(started, key=lambda job: job.array_index)]


def job_records(
    args: argparse.Namespace, noun: str, list_job: Callable[[str], list[_Record]]
) -> list[_Record]:
    """List the records of ``--job``, or of every element that started when it is an array.

    ``list_job`` lists the ``noun`` (e.g. ``refunds``) of one job, and raises NOT_FOUND for a
    job that metering does not know or the caller may not read. An array id is such a job, so
    the scheduler is asked whether it names an array only when metering lists nothing for it.
    """
    job_id = args.job
    missing: grpc.RpcError | None = None
    try:
        records = list_job(job_id)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        records, missing = [], error
    if records:
        return records
    try:
        elements = array_element_ids(args, job_id)
    except grpc.RpcError as error:
        if missing is not None:
            raise
        # Metering reported no missing job, so its empty listing is shown unchecked.
        sys.stderr.write(
            f"note: could not check whether {job_id} is a job array "
            f"({error.code().name}: {error.details()}); listing the job's own {noun}\n"
        )
        return records
    if elements is None:
        if missing is not None:
            raise missing
        return records
    sys.stderr.write(
        f"note: {job_id} is a job array; listing the {noun} of its {len(elements)} elements "
        f"that started (acsp jobs list --array {job_id} lists every element)\n"
    )
    return _element_records(list_job, elements)


def _element_records(
    list_job: Callable[[str], list[_Record]], element_ids: list[str]
) -> list[_Record]:
    """Return the records of each array element in turn, skipping elements metering lacks."""
    # NOTE: this costs one metering call per started element, because the requests take one
    # job id.
    records: list[_Record] = []
    for element_id in element_ids:
        try:
            records += list_job(element_id)
        except grpc.RpcError as error:
            # An element that started moments ago may have no attempt in metering yet.
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
    return records

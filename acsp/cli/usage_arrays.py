"""Job arrays in ``acsp usage`` listings, where an array id stands for its elements' ids.

Metering records each element as a job of its own and stores no arrays, so the scheduler is
asked for the elements.
"""

from __future__ import annotations

import argparse

import grpc

from acsp.cli.jobs import open_scheduler
from acsp.v1 import common_pb2, scheduler_pb2

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

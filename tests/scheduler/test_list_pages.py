"""ListJobs pages stay below the message size that gRPC clients receive by default."""

from __future__ import annotations

from scheduler.service.api import MAX_PAGE_BYTES, _jobs_page
from scheduler.service.model import Job, JobSpec
from scheduler.service.store import decode_page_token


def large_job(index: int) -> Job:
    # About 180 kB encoded, near the largest command and environment that validation accepts.
    spec = JobSpec(
        name="large",
        project_id="p1",
        command=("true", "x" * 60_000),
        env=tuple((f"K{i}", "v" * 30_000) for i in range(4)),
    )
    return Job(job_id=f"j{index:020d}", spec=spec, owner="alice")


def test_page_of_large_jobs_cut_by_size() -> None:
    jobs = [large_job(i) for i in range(100, 0, -1)]
    page = _jobs_page(jobs, "")
    continued_after = decode_page_token(page.page.next_page_token)

    assert 0 < len(page.jobs) < len(jobs)
    assert page.ByteSize() <= MAX_PAGE_BYTES
    assert continued_after == page.jobs[-1].job_id


def test_small_page_keeps_store_token() -> None:
    jobs = [large_job(2), large_job(1)]
    page = _jobs_page(jobs, "next")

    assert [job.job_id for job in page.jobs] == [job.job_id for job in jobs]
    assert page.page.next_page_token == "next"

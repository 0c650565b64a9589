"""State messages of a job array's parent, built without a scheduler."""

from __future__ import annotations

from scheduler.service.api import _array_parent, _submit_response
from scheduler.service.model import Job, JobSpec


def element(index: int) -> Job:
    spec = JobSpec(name="sweep", project_id="p1", command=("true",))
    return Job(job_id=f"arr-{index}", spec=spec, owner="alice", array_id="arr", array_index=index)


def test_array_of_one_job_is_singular() -> None:
    submitted = _submit_response([element(0)], "arr", 1)
    parent = _array_parent([element(0)])

    assert submitted.job.state_message == "array of 1 job"
    assert parent.state_message == "array of 1 job: 1 pending"


def test_array_of_two_jobs_is_plural() -> None:
    submitted = _submit_response([element(0), element(1)], "arr", 2)

    assert submitted.job.state_message == "array of 2 jobs"

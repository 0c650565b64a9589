"""The search for NUL characters in the string fields of a request."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message

from acsp.v1 import scheduler_pb2
from services.runtime.nul_check import find_nul_field


def submit(**spec: Any) -> scheduler_pb2.SubmitJobRequest:
    return scheduler_pb2.SubmitJobRequest(request_id="r-1", spec=scheduler_pb2.JobSpec(**spec))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("request_message", "path"),
    [
        (submit(name="train\x00"), "spec.name"),
        (submit(command=["python", "a\x00b"]), "spec.command[1]"),
        (submit(environment={"SEED": "1\x00"}), "spec.environment['SEED']"),
        (submit(environment={"SE\x00ED": "1"}), "spec.environment key 'SE\\x00ED'"),
        (
            submit(accelerators=scheduler_pb2.AcceleratorConstraint(software_stack="cu\x00")),
            "spec.accelerators.software_stack",
        ),
        (scheduler_pb2.GetJobRequest(job_id="j\x00"), "job_id"),
    ],
)
def test_nul_field_is_named(request_message: Message, path: str) -> None:
    assert find_nul_field(request_message) == path


@pytest.mark.timeout(10)
def test_clean_request_has_no_nul_field() -> None:
    request = submit(
        name="train", command=["python", "train.py"], environment={"SEED": "1"}, task_count=2
    )
    assert find_nul_field(request) is None


@pytest.mark.timeout(10)
def test_nul_in_batch_item_is_named() -> None:
    batch = scheduler_pb2.SubmitJobsRequest(jobs=[submit(name="ok"), submit(name="\x00")])
    assert find_nul_field(batch) == "jobs[1].spec.name"

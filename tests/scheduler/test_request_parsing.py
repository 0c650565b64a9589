"""Parsing of request fields that a client may forge: page tokens, enum numbers, counts,
timestamps and request ids."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from acsp.v1 import common_pb2, scheduler_pb2
from scheduler.service.fleet_api import _node_state_name
from scheduler.service.model import Job, JobSpec
from scheduler.service.pledges import MAX_PLEDGE_ACCELERATORS, pledge_from_proto
from scheduler.service.provider_store import (
    decode_provider_page_token,
    encode_provider_page_token,
)
from scheduler.service.request_ids import _check_one as check_one
from scheduler.service.store import decode_page_token, encode_page_token
from services.runtime.errors import FailedPrecondition, InvalidArgument


def forged_token(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).decode().rstrip("=")


def test_page_token_round_trips_job_ids() -> None:
    for job_id in ("j0661e660b955fcde0fbd", "j0661e660b955fcde0fbd-12"):
        assert decode_page_token(encode_page_token(job_id)) == job_id


def test_forged_page_token_rejected() -> None:
    for value in (b"j\x00", b"j", b"j' OR 1=1", b"x123", "j\u00e9".encode(), b"j" + b"a" * 200):
        with pytest.raises(ValueError, match="malformed"):
            decode_page_token(forged_token(value))


def test_provider_page_token_round_trips() -> None:
    assert decode_provider_page_token(encode_provider_page_token("prov-1")) == "prov-1"


def test_forged_provider_page_token_rejected() -> None:
    for value in (b"provider:\x00", b"provider:", b"provider:a/b", b"provider:" + b"p" * 100):
        with pytest.raises(ValueError, match="malformed"):
            decode_provider_page_token(forged_token(value))


def test_unknown_node_state_rejected() -> None:
    with pytest.raises(InvalidArgument) as error:
        _node_state_name(77)
    assert error.value.field == "state"
    assert "77 is not a node state" in str(error.value)


def pledge_request(**changes: object) -> scheduler_pb2.Pledge:
    window = common_pb2.TimeWindow()
    window.start_time.FromSeconds(1_800_000_000)
    window.end_time.FromSeconds(1_800_086_400)
    pledge = scheduler_pb2.Pledge(
        provider_id="prov", region_id="reg", model="A100-SXM4-80GB", window=window
    )
    pledge.protected_count = 1
    for name, value in changes.items():
        setattr(pledge, name, value)
    return pledge


def test_pledge_counts_bounded() -> None:
    largest = pledge_request(protected_count=MAX_PLEDGE_ACCELERATORS)
    assert pledge_from_proto(largest)[1] == []
    too_many = pledge_request(
        protected_count=MAX_PLEDGE_ACCELERATORS + 1, recallable_count=4_000_000_000
    )
    fields = [v.field for v in pledge_from_proto(too_many)[1]]
    assert fields == ["pledge.protected_count", "pledge.recallable_count"]


def test_pledge_window_outside_timestamp_range() -> None:
    pledge = pledge_request()
    pledge.window.start_time.seconds = 2**62
    pledge.window.end_time.seconds = 2**62 + 86_400
    violations = pledge_from_proto(pledge)[1]
    fields = {v.field for v in violations}
    assert "pledge.window.start_time" in fields
    assert "pledge.window.end_time" in fields
    assert "years 2000..2199" in violations[0].reason


def test_single_job_key_not_taken_for_array() -> None:
    spec = JobSpec(name="n", project_id="p1", command=("true",))
    earlier = Job(job_id="j1", spec=spec, owner="alice")
    new = Job(job_id="j2", spec=spec, owner="alice")
    # "x/0" was the request id of a single job, so "x" has not been used before.
    check_one([new], "5:alice/x", {"5:alice/x/0": earlier}, "request_id")

    element = Job(job_id="a1-0", spec=spec, owner="alice", array_id="a1", array_index=0)
    with pytest.raises(FailedPrecondition, match="job array a1"):
        check_one([new], "5:alice/x", {"5:alice/x/0": element}, "request_id")


def test_retry_ignores_picked_sub_allocation() -> None:
    """A retry of a job that named no grant matches its stored job whatever the scheduler
    picked for either, and a retry that names a grant does not."""
    sent = JobSpec(name="n", project_id="q1", command=("true",))
    picked = replace(sent, grant_id="g1", sub_allocation_id="s1", sub_allocation_picked=True)
    stored = Job(job_id="j1", spec=picked, owner="dana")
    key = {"4:dana/x": stored}
    for retry in (sent, picked, replace(picked, sub_allocation_id="s2")):
        check_one([Job(job_id="j2", spec=retry, owner="dana")], "4:dana/x", key, "request_id")

    named = replace(picked, sub_allocation_picked=False)
    with pytest.raises(FailedPrecondition, match="another spec"):
        check_one([Job(job_id="j2", spec=named, owner="dana")], "4:dana/x", key, "request_id")

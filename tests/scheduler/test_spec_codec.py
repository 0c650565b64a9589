"""The JSON form of job specs in the jobs table, without servers."""

from __future__ import annotations

import json
from dataclasses import replace

from scheduler.service.codec import spec_from_json, spec_to_json
from tests.scheduler.test_jobbook import make_job


def test_spec_round_trip_keeps_awaited_jobs():
    spec = replace(make_job().spec, after_job_ids=("array-1",), awaited_job_ids=("e0", "e1"))

    decoded = spec_from_json(spec_to_json(spec))

    assert decoded.after_job_ids == ("array-1",)
    assert decoded.awaited_job_ids == ("e0", "e1")


def test_spec_without_awaited_jobs_waits_for_after_ids():
    # Specs stored before awaited_job_ids existed hold the awaited jobs, arrays already
    # replaced by their elements, in after_job_ids.
    spec = replace(make_job().spec, after_job_ids=("e0", "e1"))
    document = json.loads(spec_to_json(spec))
    del document["awaited_job_ids"]

    decoded = spec_from_json(json.dumps(document))

    assert decoded.after_job_ids == ("e0", "e1")
    assert decoded.awaited_job_ids == ("e0", "e1")

"""The cost of recording job ends in the scheduler's dependency book."""

from __future__ import annotations

import time

from scheduler.service.dependencies import RECENT_ENDS, Dependencies


def test_recent_ends_evict_in_constant_time() -> None:
    # Every job end passes here in the scheduler loop. Once RECENT_ENDS ends are kept, each
    # new end evicts the oldest, which must cost about as much as an end before the bound.
    dependencies = Dependencies()
    job_ids = [f"j{index:020x}" for index in range(2 * RECENT_ENDS)]

    started = time.process_time()
    for job_id in job_ids[:RECENT_ENDS]:
        dependencies.ended(job_id, "completed")
    filling_s = time.process_time() - started
    started = time.process_time()
    for job_id in job_ids[RECENT_ENDS:]:
        dependencies.ended(job_id, "completed")
    evicting_s = time.process_time() - started

    # Measured: about 1.5 times the filling time with constant-time eviction, and about 70
    # times with a scan over the evicted keys.
    assert evicting_s < 10 * filling_s
    assert dependencies.register("waiting", [job_ids[0]], lambda _: False) is None
    assert dependencies.take_unresolved() == [job_ids[0]]
    assert dependencies.register("waiting-2", [job_ids[-1]], lambda _: False) is None
    assert not dependencies.waits("waiting-2")

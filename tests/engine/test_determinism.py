"""Same inputs, same decisions."""

from __future__ import annotations

import random

from scheduler.engine import JobEnded, JobOutcome, PriorityClass, ScheduleResult, Topology
from tests.engine.helpers import job, make_engine, node

MODELS = ("A100-SXM4-80GB", "H100-SXM5-80GB", "T4")


def run_scenario(seed: int) -> list[ScheduleResult]:
    rng = random.Random(seed)
    engine = make_engine()
    for i in range(40):
        engine.add_node(
            node(f"n{i:02d}", 8, model=MODELS[i % 3], region=f"r{i % 4}", domain=f"d{i // 4}")
        )
    results = []
    now = 0.0
    for step in range(20):
        for k in range(15):
            size = rng.choice([0.25, 0.5, 1, 2, 4, 8])
            tasks = rng.choice([1, 1, 1, 2, 4]) if size >= 1 else 1
            engine.submit(
                job(
                    f"s{step}-{k}",
                    accelerators=size,
                    tasks=tasks,
                    project=f"p{rng.randrange(6)}",
                    institution=f"i{rng.randrange(3)}",
                    priority=rng.choice(list(PriorityClass)),
                    topology=rng.choice([Topology.SAME_REGION, Topology.SAME_PROVIDER]),
                    wall_time_s=rng.choice([None, 600.0, 3600.0]),
                    submit=now,
                )
            )
        result = engine.schedule(now)
        results.append(result)
        waiting = sorted(w.job_id for w in result.waiting)
        assert waiting == engine.pending(), f"pass at {now}: waiting list differs from queue"
        # After every third pass no job ends, so the next pass sees arrivals only.
        if step % 3 != 2:
            for job_id in engine.running():
                if rng.random() < 0.3:
                    engine.apply(JobEnded(job_id, JobOutcome.COMPLETED))
        now += 300.0
    return results


def test_same_inputs_give_same_decisions() -> None:
    first = run_scenario(7)
    second = run_scenario(7)

    assert first == second
    assert sum(len(r.decisions) for r in first) > 50

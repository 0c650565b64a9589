"""Builders shared by the engine tests."""

from __future__ import annotations

from scheduler.engine import (
    Engine,
    EngineConfig,
    JobSpec,
    NodeSpec,
    Place,
    PriorityClass,
    ScheduleResult,
    Topology,
)

HOUR = 3600.0


def make_engine(**config: float) -> Engine:
    settings: dict[str, float] = {"half_life_s": HOUR}
    settings.update(config)
    return Engine(EngineConfig(**settings))  # type: ignore[arg-type]


def node(
    node_id: str,
    count: int = 8,
    model: str = "A100-SXM4-80GB",
    provider: str = "p1",
    region: str = "r1",
    domain: str = "",
) -> NodeSpec:
    ids = tuple(f"{node_id}-gpu{i}" for i in range(count))
    return NodeSpec(node_id, provider, region, model, ids, domain)


def job(
    job_id: str,
    accelerators: float = 1,
    tasks: int = 1,
    project: str = "proj",
    institution: str = "inst",
    priority: PriorityClass = PriorityClass.STANDARD,
    topology: Topology = Topology.SAME_PROVIDER,
    submit: float = 0.0,
    **extra: object,
) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        project=project,
        institution=institution,
        submit_time=submit,
        priority=priority,
        task_count=tasks,
        millis_per_task=round(accelerators * 1000),
        topology=topology,
        **extra,  # type: ignore[arg-type]
    )


def placed(result: ScheduleResult) -> dict[str, Place]:
    return {d.job_id: d for d in result.decisions if isinstance(d, Place)}


def reasons(result: ScheduleResult) -> dict[str, str]:
    return {w.job_id: str(w.reason) for w in result.waiting}


def nodes_of(place: Place) -> set[str]:
    return {task.node_id for task in place.tasks}


def accelerator_count(place: Place) -> int:
    return sum(len(task.accelerator_ids) for task in place.tasks)

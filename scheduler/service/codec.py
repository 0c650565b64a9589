"""Conversions between the service's dataclasses and their JSON columns in PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson

from .model import JobSpec, TaskPlacement


def spec_to_json(spec: JobSpec) -> str:
    # orjson writes a dataclass as an object of its fields, tuples as arrays.
    return orjson.dumps(spec).decode()


def spec_from_json(text: str) -> JobSpec:
    doc: dict[str, Any] = json.loads(text)
    if "awaited_job_ids" not in doc:
        # Specs stored before the field existed hold the awaited jobs, arrays already replaced
        # by their elements, in after_job_ids, and a job read with none would not wait.
        doc["awaited_job_ids"] = doc.get("after_job_ids", ())
    for name in _TUPLE_FIELDS:
        doc[name] = tuple(doc.get(name, ()))
    doc["env"] = tuple((str(k), str(v)) for k, v in doc["env"])
    return JobSpec(**doc)


_TUPLE_FIELDS = (
    "command",
    "models",
    "allowed_regions",
    "grant_providers",
    "grant_regions",
    "grant_models",
    "after_job_ids",
    "awaited_job_ids",
)


def placement_to_json(placement: tuple[TaskPlacement, ...]) -> str:
    return orjson.dumps(
        [
            {
                "task_index": task.task_index,
                "provider": task.provider,
                "region": task.region,
                "node": task.node,
                "accelerators": list(task.accelerators),
                "millis": task.millis,
                "state": task.state,
                "exit_code": task.exit_code,
            }
            for task in placement
        ]
    ).decode()


def placement_from_json(text: str) -> tuple[TaskPlacement, ...]:
    return tuple(
        TaskPlacement(
            task_index=int(item["task_index"]),
            provider=item["provider"],
            region=item["region"],
            node=item["node"],
            accelerators=tuple(item["accelerators"]),
            millis=int(item["millis"]),
            state=item["state"],
            exit_code=item["exit_code"],
        )
        for item in json.loads(text)
    )


def to_datetime(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def from_datetime(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()

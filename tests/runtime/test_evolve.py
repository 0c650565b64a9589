"""evolve copies frozen, slotted records as dataclasses.replace does."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from scheduler.service.model import Job
from services.runtime.evolve import evolve


@dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Checked:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("value must be 0 or more")


@dataclass(frozen=True)
class Unslotted:
    value: int


def test_changes_named_fields_only() -> None:
    point = Point(1, 2, ("a",))
    moved = evolve(point, y=5)
    assert moved == Point(1, 5, ("a",))
    assert moved is not point
    assert point == Point(1, 2, ("a",))


def test_job_copy_matches_replace() -> None:
    job = Job(job_id="j-1", spec=None, owner="alice")  # type: ignore[arg-type]
    changes = {"state": "running", "reason": "every task started", "started_at": 12.5}
    assert evolve(job, **changes) == dataclasses.replace(job, **changes)  # type: ignore[arg-type]


def test_copy_stays_frozen() -> None:
    moved = evolve(Point(1), x=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        moved.x = 4  # type: ignore[misc]


def test_unknown_field_raises_type_error() -> None:
    with pytest.raises(TypeError, match="z"):
        evolve(Point(1), z=3)


def test_post_init_check_still_runs() -> None:
    with pytest.raises(ValueError, match="value must be 0 or more"):
        evolve(Checked(1), value=-1)


def test_unslotted_class_copied() -> None:
    assert evolve(Unslotted(1), value=2) == Unslotted(2)

"""A grant's limits on where it may be spent, and the check of a hold's placement against them.

A grant may name the providers, the regions (``<provider>/<region>``) and the accelerator
models it pays for; an empty list allows any. The scheduler narrows placement to what the grant
allows before it requests a hold. This check is the second line of defense. It catches a
scheduler whose copy of the grant is stale, and a project-level hold that would fall to a grant
with other limits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from services.grant.errors import FailedPrecondition

OUTSIDE_CONSTRAINTS: Final = "OUTSIDE_GRANT_CONSTRAINTS"
"""``PlaceHoldResult.reason`` and precondition type of a placement the grant does not allow."""


@dataclass(frozen=True, slots=True)
class Placement:
    """The regions and accelerator model of a held job, as the scheduler placed it."""

    regions: tuple[str, ...] = ()
    """``<provider>/<region>`` of every task; empty when the caller did not send them."""
    accelerator_model: str = ""
    """Catalog name of the model; empty when the caller did not send it."""


UNKNOWN_PLACEMENT: Final = Placement()
"""The placement of a hold whose caller sent none, so no constraint is checked."""


@dataclass(frozen=True, slots=True)
class GrantConstraints:
    """The providers, regions and accelerator models a grant pays for; empty allows any."""

    providers: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    accelerator_models: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GrantConstraints:
        """Read the ``providers``, ``regions`` and ``accelerator_models`` columns of a grant."""
        return cls(
            tuple(row.get("providers") or ()),
            tuple(row.get("regions") or ()),
            tuple(row.get("accelerator_models") or ()),
        )


class OutsideConstraints(FailedPrecondition):
    """A hold's placement is outside its grant's constraints."""

    def details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.PreconditionFailure.Violation(
            type=OUTSIDE_CONSTRAINTS, subject=self.field or "", description=self.reason
        )
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.PreconditionFailure(violations=[violation]))
        return [packed]


def check_placement(grant_id: str, limits: GrantConstraints, placement: Placement) -> None:
    """Raise :class:`OutsideConstraints` naming the field and the allowed values, or return."""
    problem = placement_problem(grant_id, limits, placement)
    if problem is not None:
        field, reason = problem
        raise OutsideConstraints(reason, field=field)


def placement_problem(
    grant_id: str, limits: GrantConstraints, placement: Placement
) -> tuple[str, str] | None:
    """Return the field and the reason the grant does not allow ``placement``, or None."""
    model = placement.accelerator_model
    if model and limits.accelerator_models and model not in limits.accelerator_models:
        return (
            "accelerator_model",
            f"grant {grant_id} does not pay for accelerator model {model!r}; it allows "
            f"{_listed(limits.accelerator_models)}",
        )
    for key in placement.regions:
        provider = key.partition("/")[0]
        if limits.providers and provider not in limits.providers:
            return (
                "placement_regions",
                f"grant {grant_id} does not pay for provider {provider!r} (region {key!r}); it "
                f"allows providers {_listed(limits.providers)}",
            )
        if limits.regions and key not in limits.regions:
            return (
                "placement_regions",
                f"grant {grant_id} does not pay for region {key!r}; it allows regions "
                f"{_listed(limits.regions)}",
            )
    return None


def _listed(values: Sequence[str]) -> str:
    return ", ".join(sorted(values))

"""The sub-allocations a project holds as a sub-project, and which one pays a job naming none.

A job that names no grant is paid by a grant of its own project, which the grant service picks
when it places the hold. A sub-project may have no grant of its own and instead hold
sub-allocations of grants of another project led by the same PI. Its job then draws on the one
such sub-allocation that can still pay, and a job of a sub-project holding several must name
one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import grpc

from acsp import decimals
from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc
from services.runtime.errors import InvalidArgument
from services.runtime.grant_directory import grant_service_unavailable

from .budget_text import display_pf_days

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HeldSubAllocation:
    """One sub-allocation that a project holds."""

    grant_id: str
    sub_allocation_id: str
    available: Decimal | None
    """PF-days available in it when it was listed, or None when the grant service sent none."""


@dataclass(frozen=True, slots=True)
class HeldSubAllocations:
    """The sub-allocations one project holds, as one listing returned them."""

    fetched_at: float
    """``time.monotonic()`` of the fetch."""
    allocations: tuple[HeldSubAllocation, ...]


async def fetch_held(
    stub: grant_pb2_grpc.GrantServiceStub, holder: str, timeout_s: float
) -> list[HeldSubAllocation]:
    """List every sub-allocation that ``holder`` holds, of any grant, page by page.

    A grant service older than the ``holder`` filter rejects the request for its missing grant
    id, and then none is listed, so that a job naming no grant waits for a grant as it did
    before. Raises Unavailable when the grant service call fails otherwise.
    """
    held: list[HeldSubAllocation] = []
    token = ""
    while True:
        request = grant_pb2.ListSubAllocationsRequest(
            holder=holder, page=common_pb2.PageRequest(page_size=1000, page_token=token)
        )
        try:
            page = await stub.ListSubAllocations(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or token:
                raise grant_service_unavailable("sub-allocations held by", holder, exc) from exc
            logger.warning(
                "listing the sub-allocations held by %s failed with INVALID_ARGUMENT (%s), as "
                "from a grant service older than the holder filter: picking none",
                holder,
                exc.details(),
            )
            return []
        for allocation in page.sub_allocations:
            held.append(
                HeldSubAllocation(
                    allocation.grant_id,
                    allocation.sub_allocation_id,
                    _available(allocation.balance),
                )
            )
        token = page.page.next_page_token
        if not token:
            return held


def _available(balance: grant_pb2.Balance) -> Decimal | None:
    if not balance.HasField("available_pf_days"):
        return None
    try:
        return decimals.from_proto(balance.available_pf_days)
    except ValueError:
        return None


def choose_held(
    project_id: str, usable: Sequence[HeldSubAllocation], field: str
) -> HeldSubAllocation | None:
    """Return the one sub-allocation that pays a job of ``project_id`` naming no grant.

    ``usable`` are the sub-allocations the project holds of grants that can still pay.
    Returns None when there is none, so that the job waits for a grant of its own project.
    Raises InvalidArgument naming ``field`` and listing them when there are several.
    """
    if not usable:
        return None
    if len(usable) == 1:
        return usable[0]
    choices = ", ".join(_choice(held) for held in sorted(usable, key=_order))
    raise InvalidArgument(
        field,
        f"is empty, but project {project_id!r} has no grant of its own that can pay and holds "
        f"{len(usable)} sub-allocations, so the job must name the one to draw on",
        f"set grant_id and sub_allocation_id to one of them: {choices}",
    )


def _order(held: HeldSubAllocation) -> tuple[str, str]:
    return held.grant_id, held.sub_allocation_id


def _choice(held: HeldSubAllocation) -> str:
    text = f"--grant {held.grant_id} --sub-allocation {held.sub_allocation_id}"
    if held.available is not None:
        text += f" ({display_pf_days(held.available)} PF-days available)"
    return text

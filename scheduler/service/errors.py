"""Errors the scheduler's RPCs raise beyond those of ``services.runtime.errors``."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from services.runtime.errors import CallerError, NotFound

from .validation import FieldViolation


class InvalidFields(CallerError):
    """Every invalid field of a request, with ``google.rpc.BadRequest`` details."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        text = "; ".join(f"{v.field} {v.reason}" for v in violations)
        super().__init__(f"invalid request: {text}")
        self.violations = violations

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [packed]


class Unimplemented(CallerError):
    """An RPC of the contract that this scheduler version does not serve yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


class SubAllocationNotFound(NotFound):
    """A job names a sub-allocation that its grant does not have."""

    def __init__(self, field: str, allocation_id: str, grant_id: str) -> None:
        super().__init__("sub-allocation", allocation_id)
        self.message = (
            f"{field}: sub-allocation {allocation_id!r} not found in grant {grant_id!r}; "
            "pass one that ListSubAllocations returns for the grant"
        )
        self.args = (self.message,)


class GrantConstraintViolations(CallerError):
    """A job cannot run within its grant's constraints; one violation per field."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.reason}" for v in violations))
        self.violations = violations

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="GRANT_CONSTRAINTS", subject=v.field, description=v.reason
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed]

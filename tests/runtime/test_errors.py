"""The one mapping from service errors to gRPC statuses."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.runtime.errors import (
    STATUS_DETAILS_KEY,
    AlreadyExists,
    CallerError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    TransientError,
    Unauthenticated,
    Unavailable,
    status_for,
)
from services.runtime.interceptors import LogLimiter


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("amount", "negative", "pass 0 or more"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("grant", "g-1"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("project", "p-1"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition("grant closed"), grpc.StatusCode.FAILED_PRECONDITION),
        (PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED),
        (Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED),
        (Internal("ledger out of balance"), grpc.StatusCode.INTERNAL),
        (Unavailable("database down"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_each_error_maps_to_its_code(error: ServiceError, code: grpc.StatusCode) -> None:
    assert status_for(error).code == code


def test_errors_are_grouped_by_fault() -> None:
    assert isinstance(NotFound("grant", "g"), CallerError)
    assert isinstance(Unavailable("x"), TransientError)
    assert not isinstance(Internal("x"), CallerError | TransientError)


def test_invalid_argument_attaches_field_violation() -> None:
    status = status_for(InvalidArgument("window.end", "before start", "set end after start"))
    assert status.message == "invalid window.end: before start; set end after start"
    ((key, value),) = status.trailing_metadata
    rich = status_pb2.Status.FromString(value)
    bad_request = error_details_pb2.BadRequest()
    assert key == STATUS_DETAILS_KEY
    assert rich.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rich.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "window.end"


def test_failed_precondition_names_field() -> None:
    error = FailedPrecondition("the grant expired on 2026-11-30", field="grant_id")
    assert str(error) == "grant_id: the grant expired on 2026-11-30"
    assert status_for(FailedPrecondition("closed")).message == "closed"


def test_plain_errors_have_no_details() -> None:
    assert status_for(Unavailable("database down")).trailing_metadata == ()


def test_log_limiter_counts_suppressed_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.2]
    monkeypatch.setattr("services.runtime.interceptors.time.monotonic", lambda: now[0])
    limiter = LogLimiter(per_second=2)
    key = ("/acsp.v1.GrantService/GetGrant", "UNAUTHENTICATED")
    first_second = [limiter.allow(key) for _ in range(5)]
    other_key = limiter.allow(("/acsp.v1.GrantService/GetGrant", "NOT_FOUND"))
    now[0] = 101.1
    next_second = limiter.allow(key)
    assert first_second == [(True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert other_key == (True, 0)
    assert next_second == (True, 3)

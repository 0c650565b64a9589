"""The one mapping from service errors to gRPC statuses."""

from __future__ import annotations

import base64

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.runtime.errors import (
    MAX_ID_LENGTH,
    MAX_QUOTED_CHARS,
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
    quoted,
    require_id,
    shorten,
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


def test_quoted_cuts_long_values() -> None:
    assert quoted("job-1") == "'job-1'"
    long = quoted("a" * 20_000)
    assert long == f"{'a' * MAX_QUOTED_CHARS!r}... (20000 characters)"


def test_shorten_cuts_only_long_literals() -> None:
    text = f"{'a' * 200!r} and {'b' * 100!r} are invalid, 'ok' is not"
    short = shorten(text)
    assert short.startswith(f"{'a' * MAX_QUOTED_CHARS!r}... (200 characters) and ")
    assert f"{'b' * MAX_QUOTED_CHARS!r}... (100 characters)" in short
    assert short.endswith("'ok' is not")


def test_shorten_keeps_closing_quote_after_escape() -> None:
    # In repr each unit is 'a' and an escaped backslash, so the cut falls inside an escape.
    short = shorten(repr("a\\" * 60))
    literal, _, rest = short[1:].partition("'...")
    assert rest == " (180 characters)"
    backslashes = len(literal) - len(literal.rstrip("\\"))
    assert backslashes % 2 == 0


def test_shorten_keeps_prose_between_short_literals() -> None:
    text = (
        "spec.allowed_regions[0]: 'jurisdiction:DE' names a jurisdiction no registered region "
        "declares (registered: none); name a registered one or list '<provider>/<region>'"
    )
    assert shorten(text) == text


def test_shorten_cuts_long_literal_among_short_ones() -> None:
    long = "x" * 100
    text = f"'a' and 'b' are fine, but {long!r} is not; see 'c' and {'y' * 90!r}"
    short = shorten(text)
    expected = (
        f"'a' and 'b' are fine, but {'x' * MAX_QUOTED_CHARS!r}... (100 characters) is not; "
        f"see 'c' and {'y' * MAX_QUOTED_CHARS!r}... (90 characters)"
    )
    assert short == expected


def test_shorten_ignores_apostrophes_in_prose() -> None:
    prose = (
        "the project's grant allows no region that matches the requested placement, and no "
        "region of the fleet declares that jurisdiction either, so the providers' nodes stay idle; "
    )
    text = f"{prose}{'z' * 100!r}, it's too long; use 'ok'"
    short = shorten(text)
    expected = f"{prose}{'z' * MAX_QUOTED_CHARS!r}... (100 characters), it's too long; use 'ok'"
    assert short == expected
    assert shorten(prose + "'ok'") == prose + "'ok'"


def test_shorten_handles_double_quoted_literals() -> None:
    value = "it's " * 30
    text = f"name {value!r} and 'ok' here"
    short = shorten(text)
    assert short.startswith(f'name "{value[:MAX_QUOTED_CHARS]}"... ({len(value)} characters)')
    assert short.endswith(" and 'ok' here")


def test_shorten_leaves_unpaired_quote() -> None:
    text = "a lone ' quote then " + "w" * 120 + " and 'tail'"
    assert shorten(text) == text


def test_status_of_huge_errors_fits_metadata_limit() -> None:
    huge = "x" * 50_000
    errors: list[ServiceError] = [
        NotFound("job", huge),
        AlreadyExists("project", huge),
        InvalidArgument(huge, f"{huge!r} is invalid", huge),
        FailedPrecondition(huge, huge),
    ]
    for error in errors:
        status = status_for(error)
        size = len(status.message) + sum(
            len(key) + len(base64.b64encode(value)) for key, value in status.trailing_metadata
        )
        assert size < 8 * 1024, type(error).__name__
        assert huge not in status.message


def test_require_id_bounds_length() -> None:
    assert require_id("job_id", "j1", "pass an id") == "j1"
    assert require_id("job_id", "j" * MAX_ID_LENGTH, "pass an id") == "j" * MAX_ID_LENGTH
    with pytest.raises(InvalidArgument) as empty:
        require_id("job_id", "", "pass an id")
    assert empty.value.field == "job_id"
    with pytest.raises(InvalidArgument) as long:
        require_id("job_id", "j" * (MAX_ID_LENGTH + 1), "pass an id")
    assert f"is {MAX_ID_LENGTH + 1} characters long" in long.value.reason

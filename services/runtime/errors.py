"""Exceptions every acsp service raises, split by who is at fault, and their gRPC mapping.

Handlers raise these and never call ``context.abort`` themselves::

    from services.runtime.errors import InvalidArgument, NotFound

    if amount <= 0:
        raise InvalidArgument("amount", f"{amount} is not positive", "pass an amount above 0")
    raise NotFound("grant", grant_id)

The server's error interceptor turns each :class:`ServiceError` into its status code with
:func:`status_for`. Caller errors carry the field and the fix in the message, and
:class:`InvalidArgument` and :class:`FailedPrecondition` also attach ``google.rpc.BadRequest``
or ``google.rpc.PreconditionFailure`` details in the ``grpc-status-details-bin`` trailer, which
clients read back with :func:`details_from_error`. NotFound and AlreadyExists attach
``google.rpc.ResourceInfo``.

Exceptions that are not ServiceErrors are mapped in :mod:`services.runtime.interceptors`:
timeouts, unreachable PostgreSQL or NATS, unretried serialization failures and transient
downstream gRPC codes become UNAVAILABLE or DEADLINE_EXCEEDED. Everything else becomes INTERNAL
with an error id that is logged next to the traceback and returned to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing metadata key that carries a serialized ``google.rpc.Status``."""


class ServiceError(Exception):
    """Base of every error that maps to one gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        """Return the ``google.rpc`` detail messages to attach, packed in ``Any``."""
        return []


# Caller errors: the request is wrong and retrying it unchanged fails again.


class CallerError(ServiceError):
    """The caller sent something wrong; the message states what and how to fix it."""


class InvalidArgument(CallerError):
    """A request field is invalid regardless of the system's state."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str, fix: str) -> None:
        super().__init__(f"invalid {field}: {reason}; {fix}")
        self.field = field
        self.reason = reason
        self.fix = fix

    def details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=self.field, description=f"{self.reason}; {self.fix}"
        )
        return [_pack(error_details_pb2.BadRequest(field_violations=[violation]))]


class NotFound(CallerError):
    """The named object does not exist, or the caller may not know that it exists."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, kind: str, id: str) -> None:
        super().__init__(f"{kind} {id!r} not found")
        self.kind = kind
        self.id = id

    def details(self) -> list[any_pb2.Any]:
        return [
            _pack(error_details_pb2.ResourceInfo(resource_type=self.kind, resource_name=self.id))
        ]


class AlreadyExists(CallerError):
    """An object with the same identity exists and the request would create another."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, kind: str, id: str) -> None:
        super().__init__(f"{kind} {id!r} already exists")
        self.kind = kind
        self.id = id

    def details(self) -> list[any_pb2.Any]:
        return [
            _pack(error_details_pb2.ResourceInfo(resource_type=self.kind, resource_name=self.id))
        ]


class FailedPrecondition(CallerError):
    """The request is valid but the system's state does not allow it now."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field

    def details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="STATE", subject=self.field or "", description=self.reason
        )
        return [_pack(error_details_pb2.PreconditionFailure(violations=[violation]))]


class PermissionDenied(CallerError):
    """The caller is known but lacks the role or ownership the request needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CallerError):
    """The caller presented no credential, or one that is invalid or expired."""

    code = grpc.StatusCode.UNAUTHENTICATED


# Our errors: a bug or broken invariant on the server side.


class Internal(ServiceError):
    """The service failed through its own fault; logged with the ids involved."""

    code = grpc.StatusCode.INTERNAL


# Transient errors: the same request may succeed later.


class TransientError(ServiceError):
    """A dependency is busy or unreachable; the caller may retry with backoff."""


class Unavailable(TransientError):
    """A dependency (database, NATS, another service) is unreachable or overloaded."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TransientError):
    """The request's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StartupError(Exception):
    """A service cannot start; ``str()`` is one line naming what, why and the fix.

    :func:`services.runtime.server.run_service` prints that line and exits with status 2.
    """

    def __init__(self, subject: str, reason: str, fix: str) -> None:
        super().__init__(f"{subject}: {reason}; fix: {fix}")
        self.subject = subject
        self.reason = reason
        self.fix = fix


@dataclass(frozen=True)
class Status:
    """A gRPC status ready to send: code, message and trailing metadata with rich details."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, bytes], ...]


def status_for(error: ServiceError) -> Status:
    """Map a service error to the status the server sends, with rich details if it has any."""
    details = error.details()
    if not details:
        return Status(error.code, error.message, ())
    rich = status_pb2.Status(code=_code_number(error.code), message=error.message, details=details)
    return Status(error.code, error.message, ((STATUS_DETAILS_KEY, rich.SerializeToString()),))


def details_from_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status | None:
    """Return the ``google.rpc.Status`` a server attached to a failed call, or None."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def field_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> dict[str, str]:
    """Return ``{field: description}`` from the ``BadRequest`` details of a failed call."""
    status = details_from_error(error)
    violations: dict[str, str] = {}
    if status is None:
        return violations
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            for violation in bad_request.field_violations:
                violations[violation.field] = violation.description
    return violations


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _code_number(code: grpc.StatusCode) -> int:
    # grpc.StatusCode values are (number, name) pairs numbered like google.rpc.Code.
    number: int = code.value[0]
    return number

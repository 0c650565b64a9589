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

:func:`status_for` cuts every quoted value longer than :data:`MAX_QUOTED_CHARS` in the message
and the details, adds an ellipsis and the full length, and caps each text. An error about a
huge value so still fits the trailing metadata, where the message travels as ``grpc-message``.

Exceptions that are not ServiceErrors are mapped in :mod:`services.runtime.interceptors`:
timeouts, unreachable PostgreSQL or NATS, unretried serialization failures and transient
downstream gRPC codes become UNAVAILABLE or DEADLINE_EXCEEDED. Everything else becomes INTERNAL
with an error id that is logged next to the traceback and returned to the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing metadata key that carries a serialized ``google.rpc.Status``."""
MAX_ID_LENGTH: Final = 128
"""Maximum id length, in characters, that :func:`require_id` accepts; acsp makes shorter ids."""
MAX_QUOTED_CHARS: Final = 80
"""Characters of a quoted value kept in an error; the rest is replaced by an ellipsis."""
MAX_TEXT_CHARS: Final = 1024
"""Maximum length of a status message sent, in characters."""
MAX_DETAIL_CHARS: Final = 240
"""Maximum length of a field, subject or description in a status's details, in characters."""
MAX_VIOLATIONS: Final = 10
"""Violations kept in one status's details; later ones are dropped.

Ten violations of two texts of MAX_DETAIL_CHARS each, base64-encoded, and a message of
MAX_TEXT_CHARS stay under 8 KiB of metadata. A 20,000-character message made grpcio 1.85
fail the call with RESOURCE_EXHAUSTED "metadata size exceeds hard limit"."""

_QUOTED: Final = re.compile(r"""(?<!\w)(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")(?!\w)""")
"""A Python-quoted string literal of any length.

Every literal is matched, short ones too, so that the closing quote of one value never opens a
match that runs through the prose to the next value. A quote between two letters or digits
(``project's``) or after one (``providers'``) is an apostrophe, not the start of a value.
"""


def quoted(value: str) -> str:
    """Quote ``value`` for an error message, cut to :data:`MAX_QUOTED_CHARS` characters.

    ``quoted("a" * 20000)`` gives ``'aaa…a'... (20000 characters)`` with 80 ``a``.
    """
    if len(value) <= MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:MAX_QUOTED_CHARS]!r}... ({len(value)} characters)"


def shorten(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Cut every long quoted value in ``text`` as :func:`quoted` does, then cap the text at
    ``limit`` characters."""
    text = _QUOTED.sub(_shorten_literal, text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _shorten_literal(match: re.Match[str]) -> str:
    literal = match.group()
    quote = literal[0]
    inner = literal[1:-1]
    if len(inner) <= MAX_QUOTED_CHARS:
        return literal
    prefix = inner[:MAX_QUOTED_CHARS]
    if (len(prefix) - len(prefix.rstrip("\\"))) % 2:
        prefix = prefix[:-1]  # half an escape sequence would escape the closing quote
    return f"{quote}{prefix}{quote}... ({len(inner)} characters)"


def require_id(field: str, value: str, fix: str) -> str:
    """Return ``value`` if it is a non-empty id of at most :data:`MAX_ID_LENGTH` characters.

    Raises InvalidArgument naming ``field``, with ``fix`` as the remedy, otherwise.
    """
    if not value:
        raise InvalidArgument(field, "is empty", fix)
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            field, f"is {len(value)} characters long, over the {MAX_ID_LENGTH} an id may have", fix
        )
    return value


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

    def __init__(self, kind: str, id: str, fix: str = "") -> None:
        message = f"{kind} {quoted(id)} not found"
        super().__init__(f"{message}; {fix}" if fix else message)
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
        super().__init__(f"{kind} {quoted(id)} already exists")
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
    """Map a service error to the status the server sends, with rich details if it has any.

    Long quoted values and texts are cut with :func:`shorten`, and details keep at most
    :data:`MAX_VIOLATIONS` violations.
    """
    message = shorten(error.message)
    details = [_shorten_detail(detail) for detail in error.details()]
    if not details:
        return Status(error.code, message, ())
    rich = status_pb2.Status(code=_code_number(error.code), message=message, details=details)
    return Status(error.code, message, ((STATUS_DETAILS_KEY, rich.SerializeToString()),))


def _shorten_detail(detail: any_pb2.Any) -> any_pb2.Any:
    """Shorten the texts of a BadRequest, PreconditionFailure or ResourceInfo detail."""
    bad_request = error_details_pb2.BadRequest()
    if detail.Unpack(bad_request):
        del bad_request.field_violations[MAX_VIOLATIONS:]
        for violation in bad_request.field_violations:
            violation.field = shorten(violation.field, MAX_DETAIL_CHARS)
            violation.description = shorten(violation.description, MAX_DETAIL_CHARS)
        return _pack(bad_request)
    failure = error_details_pb2.PreconditionFailure()
    if detail.Unpack(failure):
        del failure.violations[MAX_VIOLATIONS:]
        for item in failure.violations:
            item.subject = shorten(item.subject, MAX_DETAIL_CHARS)
            item.description = shorten(item.description, MAX_DETAIL_CHARS)
        return _pack(failure)
    resource = error_details_pb2.ResourceInfo()
    if detail.Unpack(resource):
        resource.resource_name = _cut(resource.resource_name)
        resource.description = shorten(resource.description, MAX_DETAIL_CHARS)
        return _pack(resource)
    return detail


def _cut(value: str) -> str:
    if len(value) <= MAX_QUOTED_CHARS:
        return value
    return f"{value[:MAX_QUOTED_CHARS]}... ({len(value)} characters)"


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

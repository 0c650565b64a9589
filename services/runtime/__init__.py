"""The runtime every acsp service shares: settings, errors, auth, server, database, NATS.

A service builds on it like this (see :mod:`services.runtime.server` for the whole example)::

    from services.runtime import Service, Settings, run_service

    run_service("grant", lambda: Service(
        "grant", Settings.from_env(), register,
        schema="grant", migrations="services.grant.migrations",
    ))

How callers are identified: people and tools send a signed bearer token (Ed25519 JWT with
subject, institution, roles and, for operators, provider). Services present a mutual-TLS
certificate from the local CA whose URI SAN is ``spiffe://acsp/service/<name>``, and the auth
interceptor turns it into a ``service`` principal. With TLS on, every caller needs a CA-signed
certificate, because grpcio cannot make client certificates optional. See :mod:`.auth` and
:mod:`.tls`.

Modules, one idea each:

* :mod:`.settings`: the typed, frozen ``ACSP_*`` settings object and :func:`setting` fields.
* :mod:`.errors`: exceptions by who is at fault, and their gRPC status mapping.
* :mod:`.auth`: bearer tokens, principals, roles and ``require_roles``.
* :mod:`.tls`: the local CA, service and client certificates, gRPC credentials.
* :mod:`.context`: request id and deadline of the call being handled.
* :mod:`.logs`: ``configure_logging`` with trace and request ids on every line.
* :mod:`.telemetry`: OpenTelemetry providers and trace context propagation.
* :mod:`.interceptors`: the server interceptors.
* :mod:`.server`: ``Service``, ``Runtime`` and ``run_service``.
* :mod:`.health_port`: the plaintext port with health Check alone (``ACSP_HEALTH_LISTEN``).
* :mod:`.channel`: client channels for service-to-service calls.
* :mod:`.db`, :mod:`.migrations`: the asyncpg pool and the migration runner.
* :mod:`.nats`: NATS connection (TLS, inbox prefix) and stream and bucket declarations.
* :mod:`.jetstream`: the publisher with many acks in flight and the pull consumer.
"""

from services.runtime.auth import (
    Principal,
    Role,
    TokenVerifier,
    current_principal,
    ensure_signing_key,
    generate_signing_key,
    load_signing_key,
    mint_token,
    require_roles,
    roles_required,
)
from services.runtime.channel import open_channel, service_channel
from services.runtime.context import remaining_s, request_id
from services.runtime.db import Database, quote_ident
from services.runtime.errors import (
    AlreadyExists,
    CallerError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    StartupError,
    TransientError,
    Unauthenticated,
    Unavailable,
    details_from_error,
    field_violations,
)
from services.runtime.jetstream import Publisher, PullConsumer, Reject
from services.runtime.logs import configure_logging
from services.runtime.migrations import apply_migrations
from services.runtime.nats import close_nats, connect_nats, ensure_key_value, ensure_stream
from services.runtime.server import Runtime, Service, run_service
from services.runtime.settings import ListenAddress, Settings, SettingsError, setting
from services.runtime.telemetry import Telemetry, setup_telemetry
from services.runtime.tls import (
    CertPaths,
    ensure_local_pki,
    issue_client_cert,
    issue_service_cert,
    load_nats_ssl_context,
)

__all__ = [
    "AlreadyExists",
    "CallerError",
    "CertPaths",
    "Database",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "ListenAddress",
    "NotFound",
    "PermissionDenied",
    "Principal",
    "Publisher",
    "PullConsumer",
    "Reject",
    "Role",
    "Runtime",
    "Service",
    "ServiceError",
    "Settings",
    "SettingsError",
    "StartupError",
    "Telemetry",
    "TokenVerifier",
    "TransientError",
    "Unauthenticated",
    "Unavailable",
    "apply_migrations",
    "close_nats",
    "configure_logging",
    "connect_nats",
    "current_principal",
    "details_from_error",
    "ensure_key_value",
    "ensure_local_pki",
    "ensure_signing_key",
    "ensure_stream",
    "field_violations",
    "generate_signing_key",
    "issue_client_cert",
    "issue_service_cert",
    "load_nats_ssl_context",
    "load_signing_key",
    "mint_token",
    "open_channel",
    "quote_ident",
    "remaining_s",
    "request_id",
    "require_roles",
    "roles_required",
    "run_service",
    "service_channel",
    "setting",
    "setup_telemetry",
]

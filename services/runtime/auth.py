"""Caller identity: signed bearer tokens for people and tools, TLS identities for services.

People and tools send ``authorization: Bearer <JWT>`` metadata. The token is signed with
Ed25519 (JWS ``EdDSA``) by the key that :func:`generate_signing_key` writes, and carries::

    {"iss": "acsp", "aud": "acsp", "sub": "alice", "inst": "uni-oslo",
     "roles": ["researcher", "pi"], "provider": null, "iat": ..., "exp": ..., "jti": ...}

``provider`` is required for ``provider_operator`` tokens and names the provider they act for.

Services are identified by their mutual-TLS client certificate (see :mod:`services.runtime.tls`):
a peer whose certificate carries ``spiffe://acsp/service/<name>`` becomes
``Principal(kind="service", subject=<name>, roles={service})`` without a token. When a caller
sends a token, the token decides the principal, so a service may also present a ``service``
token where TLS is off (local development and tests).

The server's auth interceptor stores the caller in a context variable; handlers read it::

    from services.runtime.auth import Role, current_principal, require_roles

    principal = require_roles(Role.PI, Role.PROGRAM_OFFICE)  # raises PermissionDenied
    ...
    token = mint_token(load_signing_key(path), "alice", [Role.PI], institution="uni-oslo")
"""

from __future__ import annotations

import datetime
import enum
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Final, Literal, ParamSpec, TypeVar

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.runtime.errors import PermissionDenied, Unauthenticated
from services.runtime.tls import service_name_from_uri

log = logging.getLogger(__name__)

ISSUER: Final = "acsp"
AUDIENCE: Final = "acsp"
ALGORITHM: Final = "EdDSA"
CLOCK_LEEWAY_S: Final = 30
DEFAULT_TOKEN_TTL: Final = datetime.timedelta(hours=12)

PRINCIPAL_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
"""Rule for a principal's name (a token's ``sub``): 1 to 128 ASCII letters, digits and
``. _ @ + -``, starting with a letter or digit. It admits user ids such as ``alice`` and
``alice@uni.example`` but no spaces, slashes or non-ASCII letters, so two spellings of one name
cannot look alike."""
PRINCIPAL_NAME_RULE: Final = (
    "use 1 to 128 ASCII letters, digits, '.', '_', '@', '+' or '-', starting with a letter "
    "or digit, e.g. alice or alice@uni.example"
)


def is_principal_name(name: str) -> bool:
    """Return whether ``name`` follows :data:`PRINCIPAL_NAME_PATTERN`."""
    return PRINCIPAL_NAME_PATTERN.fullmatch(name) is not None


class Role(enum.StrEnum):
    """A role a token grants; a person may hold several."""

    RESEARCHER = "researcher"
    PI = "pi"
    REVIEWER = "reviewer"
    PROGRAM_OFFICE = "program_office"
    PROVIDER_OPERATOR = "provider_operator"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of the current request."""

    kind: Literal["user", "service"]
    """``service`` for another acsp service, ``user`` for people and their tools."""
    subject: str
    """User id, or the service name for services."""
    roles: frozenset[Role]
    institution: str | None = None
    """The user's institution; None for services and provider operators."""
    provider: str | None = None
    """The provider a ``provider_operator`` acts for."""
    token_id: str | None = None
    """The token's ``jti``, for audit logs; None for certificate identities."""

    def has_any(self, roles: Iterable[Role]) -> bool:
        """Return whether the principal has at least one of ``roles``."""
        return not self.roles.isdisjoint(roles)


_principal: ContextVar[Principal | None] = ContextVar("acsp_principal", default=None)


def current_principal() -> Principal:
    """Return the caller of the current request; raise Unauthenticated outside one."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("no authenticated caller for this call")
    return principal


def set_principal(principal: Principal | None) -> object:
    """Set the current principal; return a token for :func:`reset_principal`."""
    return _principal.set(principal)


def reset_principal(token: object) -> None:
    _principal.reset(token)  # type: ignore[arg-type]


def require_roles(*roles: Role) -> Principal:
    """Return the current principal if it has one of ``roles``, else raise PermissionDenied."""
    principal = current_principal()
    if not principal.has_any(roles):
        required = ", ".join(sorted(roles))
        granted = ", ".join(sorted(principal.roles)) or "no role"
        who = f"{principal.kind} {principal.subject!r}"
        raise PermissionDenied(f"{who} has {granted}; this call needs one of {required}")
    return principal


P = ParamSpec("P")
R = TypeVar("R")


def roles_required(*roles: Role) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a servicer method so it runs only for callers holding one of ``roles``.

    The check runs when the method is called, so for async methods it runs before the
    coroutine is created.
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @wraps(function)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            require_roles(*roles)
            return function(*args, **kwargs)

        return checked

    return decorate


# Keys and tokens.


def generate_signing_key(data_dir: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 token key pair to ``data_dir/token/``; return (private, public).

    The private key file is created owner-only (mode 0600).
    """
    folder = data_dir / "token"
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_path = folder / "signing.key"
    public_path = folder / "signing.pub"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def ensure_signing_key(data_dir: Path) -> tuple[Path, Path]:
    """Return the token key pair under ``data_dir/token/``, generating it if missing."""
    private_path = data_dir / "token" / "signing.key"
    public_path = data_dir / "token" / "signing.pub"
    if private_path.is_file() and public_path.is_file():
        return private_path, public_path
    return generate_signing_key(data_dir)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file; raise ValueError if it is another kind."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not contain an Ed25519 private key")
    return key


def service_bearer_token(
    service: str, token_file: Path | None, tls_enabled: bool, data_dir: Path, unauthenticated: str
) -> str | None:
    """Return the bearer token ``service`` sends to the services it calls, or None.

    A configured token file wins. Otherwise a service with TLS presents its certificate, which
    identifies it for as long as it runs, while a minted token expires after DEFAULT_TOKEN_TTL
    and is never renewed. Without either, a token is minted from the mesh's signing key under
    ``data_dir``, and without that key a warning says what ``unauthenticated`` calls will fail.
    """
    if token_file is not None:
        return token_file.read_text().strip()
    if tls_enabled:
        return None
    variable = f"ACSP_{service.upper()}_SERVICE_TOKEN_FILE"
    key_path = data_dir / "token" / "signing.key"
    if key_path.is_file():
        # NOTE: this token expires after DEFAULT_TOKEN_TTL (12 h) and is not renewed, so a
        # service without TLS that runs longer must be given its token file.
        return mint_token(load_signing_key(key_path), service, [Role.SERVICE])
    log.warning(
        "no %s, signing key or TLS identity: %s as unauthenticated", variable, unauthenticated
    )
    return None


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file; raise ValueError if it is another kind."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} does not contain an Ed25519 public key")
    return key


def mint_token(
    key: Ed25519PrivateKey,
    subject: str,
    roles: Sequence[Role | str],
    *,
    institution: str | None = None,
    provider: str | None = None,
    ttl: datetime.timedelta = DEFAULT_TOKEN_TTL,
    now: datetime.datetime | None = None,
) -> str:
    """Sign a bearer token for ``subject``; raise ValueError on an unknown role or bad claims."""
    checked = [Role(role) for role in roles]
    if not is_principal_name(subject):
        raise ValueError(
            f"subject {subject!r} is not a valid principal name: {PRINCIPAL_NAME_RULE}"
        )
    if not checked:
        raise ValueError("a token needs at least one role")
    if Role.PROVIDER_OPERATOR in checked and not provider:
        raise ValueError("a provider_operator token needs the provider it acts for")
    issued = now or datetime.datetime.now(datetime.UTC)
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "roles": [str(role) for role in checked],
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
    }
    if institution:
        claims["inst"] = institution
    if provider:
        claims["provider"] = provider
    return jwt.encode(claims, key, algorithm=ALGORITHM)


class TokenVerifier:
    """Verify bearer tokens against one Ed25519 public key, caching tokens already verified.

    A tool sends the same token on every call, and the signature check dominates the cost of
    authentication, so verified tokens are kept (keyed by the whole token, signature included)
    until they expire or ``cache_size`` newer ones push them out.
    """

    def __init__(self, public_key: Ed25519PublicKey, cache_size: int = 4096) -> None:
        self._public_key = public_key
        self._cache_size = cache_size
        self._verified: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    @classmethod
    def from_file(cls, path: Path) -> TokenVerifier:
        return cls(load_public_key(path))

    def verify(self, token: str) -> Principal:
        """Return the token's principal; raise Unauthenticated saying what is wrong."""
        cached = self._verified.get(token)
        if cached is not None:
            expires_at, principal = cached
            if time.time() < expires_at + CLOCK_LEEWAY_S:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
        claims = self._decode(token)
        principal = _principal_from_claims(claims)
        self._verified[token] = (float(claims["exp"]), principal)
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=CLOCK_LEEWAY_S,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("bearer token expired; get a new one with `acsp token`") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(
                f"bearer token is invalid ({error}); get a new one with `acsp token`"
            ) from None
        return claims


def _principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    raw_roles = claims.get("roles")
    if not isinstance(raw_roles, list) or not raw_roles:
        raise Unauthenticated("bearer token has no roles claim")
    try:
        roles = frozenset(Role(role) for role in raw_roles)
    except ValueError:
        raise Unauthenticated(f"bearer token has an unknown role in {raw_roles}") from None
    provider = claims.get("provider")
    if Role.PROVIDER_OPERATOR in roles and not provider:
        raise Unauthenticated("provider_operator token names no provider")
    # The rule for principal names is not checked here: tokens minted before it existed must
    # keep working until they expire. Minting and the grant RPCs that store names check it.
    subject = str(claims["sub"])
    kind: Literal["user", "service"] = "service" if Role.SERVICE in roles else "user"
    return Principal(
        kind=kind,
        subject=subject,
        roles=roles,
        institution=claims.get("inst"),
        provider=provider,
        token_id=claims.get("jti"),
    )


PUBLIC_METHOD_PREFIXES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_public_method(method: str) -> bool:
    """Return whether ``method`` (``/package.Service/Method``) is served without credentials."""
    return method.startswith(PUBLIC_METHOD_PREFIXES)


class Authenticator:
    """Turn a call's metadata and TLS peer into a principal, or raise Unauthenticated."""

    def __init__(self, verifier: TokenVerifier | None) -> None:
        self._verifier = verifier

    def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]], auth_context: Mapping[str, Any]
    ) -> Principal:
        token = _bearer_token(metadata)
        if token is not None:
            if self._verifier is None:
                raise Unauthenticated(
                    "this service cannot verify bearer tokens because ACSP_TOKEN_PUBLIC_KEY "
                    "is unset; ask its operator to set it"
                )
            return self._verifier.verify(token)
        service = _service_from_peer(auth_context)
        if service is not None:
            return Principal(kind="service", subject=service, roles=frozenset({Role.SERVICE}))
        raise Unauthenticated(
            "missing credentials; send 'authorization: Bearer <token>' metadata "
            "(get a token with `acsp token`)"
        )


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key != "authorization":
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must read 'Bearer <token>'")
        return token.strip()
    return None


def _service_from_peer(auth_context: Mapping[str, Any]) -> str | None:
    # grpcio fills these keys only from a client certificate that the TLS handshake verified
    # against ACSP_TLS_CA; ``peer_spiffe_id`` is set when the certificate has one spiffe URI.
    candidates = [
        *auth_context.get("peer_spiffe_id", ()),
        *auth_context.get("x509_subject_alternative_name", ()),
    ]
    for raw in candidates:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        name = service_name_from_uri(text)
        if name is not None:
            return name
    return None

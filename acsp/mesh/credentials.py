"""The mesh's TLS files and token key, made with the runtime's helpers and kept in the data dir.

``data_dir/tls/`` contains the local CA, one certificate per service and the ``client``
certificate that people's tools present (every gRPC port requires mutual TLS), and
``data_dir/token/`` contains the Ed25519 key pair that signs and verifies bearer tokens. Existing
files are kept, so tokens minted for a mesh stay valid across restarts of ``acsp up``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.runtime import auth, tls

CLIENT_IDENTITY: Final = "client"


@dataclass(frozen=True, slots=True)
class MeshCredentials:
    """Paths of the mesh's TLS files and token keys."""

    identities: Mapping[str, tls.CertPaths]
    """Certificate, key and CA of each service, by service name."""
    client_identity: tls.CertPaths
    """The certificate people's tools present; grants nothing without a token."""
    token_private_key: Path
    """Ed25519 key that signs tokens (keep it private: it makes any role)."""
    token_public_key: Path
    """Ed25519 public key that the services verify tokens with."""

    @property
    def ca_cert(self) -> Path:
        return self.client_identity.ca

    @property
    def client_cert(self) -> Path:
        return self.client_identity.cert

    @property
    def client_key(self) -> Path:
        return self.client_identity.key

    def mint_token(
        self,
        *,
        role: str | Sequence[str],
        subject: str,
        institution: str | None = None,
        provider: str | None = None,
        ttl_s: float = 3600.0,
    ) -> str:
        return mint_token(
            self.token_private_key,
            role=role,
            subject=subject,
            institution=institution,
            provider=provider,
            ttl_s=ttl_s,
        )


def prepare(data_dir: Path, *, services: Iterable[str]) -> MeshCredentials:
    """Create whatever TLS file or token key is missing under ``data_dir``; return the paths."""
    names = list(services)
    paths = tls.ensure_local_pki(data_dir, services=names, clients=(CLIENT_IDENTITY,))
    private_key, public_key = auth.ensure_signing_key(data_dir)
    return MeshCredentials(
        identities={name: paths[name] for name in names},
        client_identity=paths[CLIENT_IDENTITY],
        token_private_key=private_key,
        token_public_key=public_key,
    )


def mint_token(
    key_path: Path,
    *,
    role: str | Sequence[str],
    subject: str,
    institution: str | None = None,
    provider: str | None = None,
    ttl_s: float = 3600.0,
) -> str:
    """Sign a token with the key at ``key_path``; raise ValueError on a bad role or claim."""
    roles = [role] if isinstance(role, str) else list(role)
    normalized = [name.strip().lower().replace("-", "_") for name in roles]
    known = {str(item) for item in auth.Role}
    unknown = [name for name in normalized if name not in known]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r}: use one of {', '.join(sorted(known))}")
    if ttl_s <= 0:
        raise ValueError(f"token lifetime must be positive, got {ttl_s} s")
    return auth.mint_token(
        auth.load_signing_key(key_path),
        subject,
        normalized,
        institution=institution,
        provider=provider,
        ttl=datetime.timedelta(seconds=ttl_s),
    )

"""Passwords of the embedded PostgreSQL and NATS, kept in ``data_dir/secrets/`` with mode 0600.

Without them any local user who finds the loopback ports could connect as PostgreSQL's
superuser or publish on NATS, and so bypass the tokens and mutual TLS of the gRPC ports.

- ``postgres.password``: the password of the superuser ``postgres``, which PostgreSQL checks
  with SCRAM-SHA-256 on its TCP port;
- ``nats.password``: the password of the NATS user ``acsp`` (:data:`NATS_USER`), which the
  services and agents present as ``ACSP_NATS_USER`` and ``ACSP_NATS_PASSWORD``.

Existing files are kept, so a mesh keeps its passwords across restarts of ``acsp up``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

SECRETS_DIR: Final = "secrets"
POSTGRES_PASSWORD_FILE: Final = "postgres.password"
NATS_PASSWORD_FILE: Final = "nats.password"
NATS_USER: Final = "acsp"
PASSWORD_BYTES: Final = 32
"""Random bytes per password. ``secrets.token_urlsafe`` writes them as 43 URL-safe characters,
which need no quoting in a URL, a NATS configuration file or SQL."""


_PASSWORD_CHARACTERS: Final = re.compile(r"[A-Za-z0-9_-]*")
"""The characters of ``secrets.token_urlsafe``. An empty file means no password yet."""


@dataclass(frozen=True, slots=True)
class Password:
    """One generated password and the file that keeps it."""

    value: str
    path: Path
    created: bool
    """True if the file was written by this call, so a server that exists already does not
    know the password yet."""


def postgres_password(data_dir: Path) -> Password:
    """Return the PostgreSQL password of the mesh in ``data_dir``, creating it if missing."""
    return _read_or_create(data_dir / SECRETS_DIR / POSTGRES_PASSWORD_FILE)


def nats_password(data_dir: Path) -> Password:
    """Return the NATS password of the mesh in ``data_dir``, creating it if missing."""
    return _read_or_create(data_dir / SECRETS_DIR / NATS_PASSWORD_FILE)


def _read_or_create(path: Path) -> Password:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    try:
        value = _read_private(path)
    except FileNotFoundError:
        value = ""
    if value:
        return Password(value, path, created=False)
    value = secrets.token_urlsafe(PASSWORD_BYTES)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(value + "\n")
    os.replace(temporary, path)
    logger.info("generated a new password in %s", path)
    return Password(value, path, created=True)


def _read_private(path: Path) -> str:
    """Read the password in ``path``, first making the file readable by its owner only.

    Raises ValueError, without the password, if it has characters that a generated one has
    not, because the URL, the NATS configuration and the SQL take it unquoted.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s had mode %o, so other users could read it. Setting mode 600", path, mode)
        path.chmod(0o600)
    value = path.read_text().strip()
    if not _PASSWORD_CHARACTERS.fullmatch(value):
        raise ValueError(
            f"the password in {path} contains characters other than letters, digits, - and _, "
            "which a database URL and the NATS configuration cannot take unquoted: remove the "
            "file, and acsp up generates a new password"
        )
    return value

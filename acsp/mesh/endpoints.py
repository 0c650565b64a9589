"""The mesh file: where a running local mesh listens and where its credentials are.

``acsp up`` writes ``mesh.json`` into its data directory; ``acsp status``, the other commands
and :meth:`acsp.client.Client.from_mesh` read it, so they find the mesh without flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

MESH_FILE_NAME: Final = "mesh.json"
FORMAT_VERSION: Final = 1
DATA_DIR_ENV: Final = "ACSP_DATA_DIR"
DEFAULT_DATA_DIR: Final = Path("~/.acsp")
"""The same default as the services' ``ACSP_DATA_DIR`` setting."""

SERVICE_NAMES: Final = ("grant", "scheduler", "metering")


def default_data_dir() -> Path:
    """Return ``$ACSP_DATA_DIR`` if set, else ``~/.acsp``."""
    configured = os.environ.get(DATA_DIR_ENV, "").strip()
    return (Path(configured) if configured else DEFAULT_DATA_DIR).expanduser()


@dataclass(frozen=True, slots=True)
class MeshInfo:
    """Endpoints and credential paths of a running local mesh."""

    data_dir: Path
    """The mesh's data directory; every relative path below is inside it."""
    endpoints: Mapping[str, str]
    """gRPC ``host:port`` of each service, keyed by service name (grant, scheduler, metering)."""
    ca_cert: Path
    """PEM certificate of the mesh's local certificate authority, which signed every server."""
    token_key: Path
    """Private key that signs tokens for this mesh (see ``acsp token``)."""
    database_url: str
    """PostgreSQL URL that the services use."""
    nats_url: str
    """NATS URL that the services and agents use."""
    supervisor_pid: int
    """Process id of the ``acsp up`` (or in-process) supervisor that owns the mesh."""
    client_cert: Path | None = None
    """PEM client certificate for callers that present one, if the mesh made one."""
    client_key: Path | None = None
    """Private key of ``client_cert``."""
    nats_user: str | None = None
    """NATS user of the embedded server; None when the mesh uses the NATS of ACSP_NATS_URL."""
    nats_password_file: Path | None = None
    """File (mode 0600) that contains the password of ``nats_user``."""
    database_password_file: Path | None = None
    """File (mode 0600) that contains the password of the embedded PostgreSQL's superuser;
    ``database_url`` leaves it out."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Other fields, kept so that a newer writer's additions survive a round trip."""

    def endpoint(self, service: str) -> str:
        try:
            return self.endpoints[service]
        except KeyError:
            raise KeyError(
                f"the mesh in {self.data_dir} has no {service!r} endpoint; "
                f"it has {', '.join(sorted(self.endpoints)) or 'none'}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = dict(self.extra)
        document.update(
            {
                "format_version": FORMAT_VERSION,
                "endpoints": dict(self.endpoints),
                "ca_cert": str(self.ca_cert),
                "token_key": str(self.token_key),
                "database_url": self.database_url,
                "nats_url": self.nats_url,
                "supervisor_pid": self.supervisor_pid,
                "client_cert": str(self.client_cert) if self.client_cert else None,
                "client_key": str(self.client_key) if self.client_key else None,
                "nats_user": self.nats_user,
                "nats_password_file": _optional_str(self.nats_password_file),
                "database_password_file": _optional_str(self.database_password_file),
            }
        )
        return document

    def write(self) -> Path:
        """Write the mesh file atomically and return its path."""
        path = self.data_dir / MESH_FILE_NAME
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(temporary, path)
        return path


class MeshNotFoundError(FileNotFoundError):
    """No mesh file in the data directory: no ``acsp up`` has run there, or it has stopped."""


class MeshFileError(ValueError):
    """The mesh file exists but cannot be read as a mesh file of this version of acsp."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path} is damaged: {reason}. It names no mesh that acsp can reach. Stop the "
            f"mesh that may still run there and remove the file with acsp down --force "
            f"--data-dir {path.parent}, then start a new mesh with acsp up --data-dir "
            f"{path.parent}"
        )
        self.path = path
        self.reason = reason


def load_mesh(data_dir: Path | None = None) -> MeshInfo:
    """Read the mesh file of ``data_dir`` (default: :func:`default_data_dir`).

    Raises :class:`MeshNotFoundError` if there is none and :class:`MeshFileError` if it is
    damaged or written by another format version.
    """
    directory = (data_dir.expanduser() if data_dir is not None else default_data_dir()).resolve()
    path = directory / MESH_FILE_NAME
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise MeshNotFoundError(
            f"no running mesh found: {path} does not exist. Start one with `acsp up`, or "
            f"point to a running one with --data-dir or {DATA_DIR_ENV}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MeshFileError(path, f"it is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise MeshFileError(
            path, f"it holds a JSON {type(document).__name__}, not an object with fields"
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise MeshFileError(
            path,
            f"it has format_version {version!r}, expected {FORMAT_VERSION}, so another "
            "version of acsp may have written it",
        )
    try:
        return _mesh_info(directory, document)
    except KeyError as exc:
        raise MeshFileError(path, f"it lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise MeshFileError(path, f"a field has the wrong type ({exc})") from None


def _mesh_info(directory: Path, document: dict[str, Any]) -> MeshInfo:
    known = {
        "format_version",
        "endpoints",
        "ca_cert",
        "token_key",
        "database_url",
        "nats_url",
        "supervisor_pid",
        "client_cert",
        "client_key",
        "nats_user",
        "nats_password_file",
        "database_password_file",
    }
    nats_user = document.get("nats_user")
    return MeshInfo(
        data_dir=directory,
        endpoints=dict(document["endpoints"]),
        ca_cert=Path(document["ca_cert"]),
        token_key=Path(document["token_key"]),
        database_url=str(document["database_url"]),
        nats_url=str(document["nats_url"]),
        supervisor_pid=int(document["supervisor_pid"]),
        client_cert=Path(document["client_cert"]) if document.get("client_cert") else None,
        client_key=_optional_path(document.get("client_key")),
        nats_user=str(nats_user) if nats_user is not None else None,
        nats_password_file=_optional_path(document.get("nats_password_file")),
        database_password_file=_optional_path(document.get("database_password_file")),
        extra={key: value for key, value in document.items() if key not in known},
    )


def _optional_path(value: Any) -> Path | None:
    return Path(value) if value else None


def _optional_str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def pid_running(pid: int) -> bool:
    """Return True if process ``pid`` exists on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

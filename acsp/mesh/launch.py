"""The start of a mesh's children: the environment each one gets, and the wait until they serve.

Every child gets the URLs of PostgreSQL and NATS with the embedded servers' passwords, the
address of each service, the mesh's TLS files and the key that verifies tokens. A service also
gets its own listen address and a file to report it in. The mesh then waits until each service
reports SERVING via grpc.health.v1 and fails the start with the log tail of the first child that
exits or does not report SERVING in time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from acsp._channel import Credentials
from acsp.mesh._process import ChildProcess
from acsp.mesh.config import MeshConfig, ProcessSpec
from acsp.mesh.credentials import MeshCredentials
from acsp.mesh.failures import MeshStartError
from acsp.mesh.health import wait_serving
from acsp.mesh.servers import EmbeddedServers

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MeshEnvironment:
    """Settings that every child of one mesh gets: the servers, the services and the TLS files."""

    config: MeshConfig
    data_dir: Path
    pki: MeshCredentials
    servers: EmbeddedServers
    database_url: str
    """PostgreSQL URL without the embedded server's password, which ``servers`` adds."""
    nats_url: str
    endpoints: Mapping[str, str]
    """``host:port`` of each service, by service name."""

    def for_process(self, spec: ProcessSpec) -> dict[str, str]:
        """Return the whole environment of the child that ``spec`` describes."""
        env = dict(os.environ)
        # Let in-flight calls finish well before the supervisor's SIGKILL deadline.
        env.setdefault("ACSP_SHUTDOWN_GRACE_S", f"{self.config.stop_grace_s / 2:g}")
        env.update(self.config.env)

        env.update(
            {
                "ACSP_DATABASE_URL": self.database_url,
                "ACSP_NATS_URL": self.nats_url,
                "ACSP_DATA_DIR": str(self.data_dir),
                "ACSP_TOKEN_PUBLIC_KEY": str(self.pki.token_public_key),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.servers.child_env(env)

        # ACSP_GRANT_ADDRESS and so on: the host:port at which each service calls the others.
        for name, endpoint in self.endpoints.items():
            env[f"ACSP_{name.upper()}_ADDRESS"] = endpoint
        # Processes that call services (the scheduler calls the grant service, say) use the
        # client certificate unless they are services with a certificate of their own.
        identity = self.pki.identities.get(spec.name, self.pki.client_identity)
        env.update(
            {
                "ACSP_TLS_CA": str(identity.ca),
                "ACSP_TLS_CERT": str(identity.cert),
                "ACSP_TLS_KEY": str(identity.key),
            }
        )

        if spec.serves_grpc:
            env["ACSP_GRPC_LISTEN"] = self.endpoints[spec.name]
            ready_file = self.data_dir / "run" / f"{spec.name}.addr"
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            ready_file.unlink(missing_ok=True)
            env["ACSP_READY_FILE"] = str(ready_file)
        env.update(spec.env)
        if not spec.uses_database:
            env.pop("ACSP_DATABASE_URL", None)
        return env


async def wait_services(
    children: Sequence[ChildProcess],
    endpoints: Mapping[str, str],
    credentials: Credentials,
    deadline: float,
) -> None:
    """Wait until the service at each of ``endpoints`` reports SERVING, by the loop's ``deadline``.

    Raises MeshStartError with the log tail of the first one that exits or is not SERVING in
    time, and stops waiting for the others.
    """
    loop = asyncio.get_running_loop()
    by_name = {child.name: child for child in children}

    async def wait_one(name: str) -> None:
        child = by_name[name]
        try:
            await wait_serving(
                name,
                endpoints[name],
                credentials,
                timeout_s=max(deadline - loop.time(), 0.1),
                still_running=lambda: child.returncode is None,
            )
        except RuntimeError:
            raise MeshStartError(
                f"{child.describe_exit()}\n--- last lines of its log ---\n{child.tail()}"
            ) from None
        except TimeoutError as exc:
            raise MeshStartError(
                f"{exc}\nlog: {child.log_path}\n--- last lines of its log ---\n{child.tail()}"
            ) from None
        logger.info("%s is SERVING at %s", name, endpoints[name])

    waits = [loop.create_task(wait_one(name), name=f"wait for {name}") for name in endpoints]
    if not waits:
        return
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            # Raise the first failure as itself, not wrapped in an ExceptionGroup, so the
            # caller sees which process failed.
            task.result()
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def check_running(children: Sequence[ChildProcess]) -> None:
    """Fail the start if a process without a health endpoint already died."""
    for child in children:
        if child.returncode is not None:
            raise MeshStartError(
                f"{child.describe_exit()}\n--- last lines of its log ---\n{child.tail()}"
            )

"""Which credential a service presents when it calls another: a certificate of its own wins
over a minted bearer token, which expires after DEFAULT_TOKEN_TTL and is never renewed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scheduler.service import app as scheduler_app
from scheduler.service.settings import SchedulerSettings
from services.grant import service as grant_service
from services.grant.settings import GrantSettings
from services.metering import service as metering_service
from services.metering.settings import MeteringSettings
from services.runtime import tls
from services.runtime.auth import generate_signing_key

SERVICES: list[tuple[str, type[Any], Callable[[Any], str | None]]] = [
    ("grant", GrantSettings, grant_service._service_token),
    ("metering", MeteringSettings, metering_service._service_token),
    ("scheduler", SchedulerSettings, scheduler_app._service_token),
]


def environment(data_dir: Path, name: str, with_tls: bool) -> dict[str, str]:
    environ = {
        "ACSP_DATA_DIR": str(data_dir),
        "ACSP_GRANT_ADDRESS": "127.0.0.1:50051",
        "ACSP_SCHEDULER_ADDRESS": "127.0.0.1:50052",
    }
    if with_tls:
        paths = tls.ensure_local_pki(data_dir, services=[name])[name]
        environ |= {
            "ACSP_TLS_CA": str(paths.ca),
            "ACSP_TLS_CERT": str(paths.cert),
            "ACSP_TLS_KEY": str(paths.key),
        }
    return environ


@pytest.mark.parametrize(("name", "settings_type", "service_token"), SERVICES)
def test_certificate_preferred_to_token(
    name: str, settings_type: type[Any], service_token: Callable[[Any], str | None], tmp_path: Path
) -> None:
    # A local mesh gives each service a certificate and keeps the token signing key in the
    # same data directory, so both credentials are at hand.
    generate_signing_key(tmp_path)
    settings = settings_type.from_env(environment(tmp_path, name, with_tls=True))
    assert settings.tls_enabled
    assert service_token(settings) is None


@pytest.mark.parametrize(("name", "settings_type", "service_token"), SERVICES)
def test_token_minted_without_certificate(
    name: str, settings_type: type[Any], service_token: Callable[[Any], str | None], tmp_path: Path
) -> None:
    generate_signing_key(tmp_path)
    settings = settings_type.from_env(environment(tmp_path, name, with_tls=False))
    assert not settings.tls_enabled
    assert service_token(settings)

"""Run the metering service: ``python -m services.metering`` (settings from ``ACSP_*``)."""

from __future__ import annotations

from services.metering.service import build_service
from services.metering.settings import MeteringSettings
from services.runtime.server import run_service


def main() -> None:
    run_service("metering", lambda: build_service(MeteringSettings.from_env()))


if __name__ == "__main__":
    main()

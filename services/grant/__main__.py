"""Run the grant service: ``python -m services.grant`` (settings from ``ACSP_*`` variables)."""

from __future__ import annotations

from services.grant.service import build_service
from services.grant.settings import GrantSettings
from services.runtime.server import run_service


def main() -> None:
    run_service("grant", lambda: build_service(GrantSettings.from_env()))


if __name__ == "__main__":
    main()

"""``python -m scheduler.service``: run one scheduler replica (leader or standby)."""

from __future__ import annotations

from services.runtime.server import run_service

from .app import build_service
from .settings import SchedulerSettings


def main() -> None:
    run_service("scheduler", lambda: build_service(SchedulerSettings.from_env()))


if __name__ == "__main__":
    main()

"""The scheduler's own settings, read from the environment without any server."""

from __future__ import annotations

import pytest

from scheduler.service.settings import SchedulerSettings
from services.runtime.settings import SettingsError

BASE = {"ACSP_GRANT_ADDRESS": "127.0.0.1:50051"}


def test_outbox_retention_defaults_to_one_day() -> None:
    assert SchedulerSettings.from_env(BASE).outbox_retention_s == 86_400.0


def test_outbox_retention_accepts_zero() -> None:
    environ = BASE | {"ACSP_SCHEDULER_OUTBOX_RETENTION_S": "0"}
    assert SchedulerSettings.from_env(environ).outbox_retention_s == 0.0


def test_negative_outbox_retention_is_rejected() -> None:
    environ = BASE | {"ACSP_SCHEDULER_OUTBOX_RETENTION_S": "-1"}
    with pytest.raises(SettingsError) as caught:
        SchedulerSettings.from_env(environ)
    assert caught.value.variable == "ACSP_SCHEDULER_OUTBOX_RETENTION_S"
    message = str(caught.value)
    assert "-1 is below the minimum 0.0" in message
    assert "set it to 0.0 or more" in message


def test_max_event_rejections_defaults_to_five() -> None:
    assert SchedulerSettings.from_env(BASE).max_event_rejections == 5


def test_zero_max_event_rejections_is_rejected() -> None:
    environ = BASE | {"ACSP_SCHEDULER_MAX_EVENT_REJECTIONS": "0"}
    with pytest.raises(SettingsError) as caught:
        SchedulerSettings.from_env(environ)
    assert caught.value.variable == "ACSP_SCHEDULER_MAX_EVENT_REJECTIONS"
    assert "0 is below the minimum 1" in str(caught.value)

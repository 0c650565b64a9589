"""Metering's own settings, read from the environment without any server."""

from __future__ import annotations

import pytest

from services.metering.settings import MeteringSettings
from services.runtime.settings import SettingsError


def test_max_event_rejections_defaults_to_five() -> None:
    assert MeteringSettings.from_env({}).max_event_rejections == 5


def test_zero_max_event_rejections_is_rejected() -> None:
    with pytest.raises(SettingsError) as caught:
        MeteringSettings.from_env({"ACSP_METERING_MAX_EVENT_REJECTIONS": "0"})
    assert caught.value.variable == "ACSP_METERING_MAX_EVENT_REJECTIONS"
    assert "0 is below the minimum 1" in str(caught.value)

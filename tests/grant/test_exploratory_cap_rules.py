"""Caps on exploratory awards without review, and their settings, without any server."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.grant.review_rules import AutoAwardTotals, ExploratoryCaps, exploratory_review_reason
from services.grant.settings import GrantSettings
from services.runtime.settings import SettingsError

CAPS = ExploratoryCaps(pi_limit=Decimal(20), institution_limit=Decimal(50), period_days=365)


def totals(pi: str, institution: str) -> AutoAwardTotals:
    return AutoAwardTotals(pi=Decimal(pi), institution=Decimal(institution))


def test_request_within_caps_awarded() -> None:
    reason = exploratory_review_reason("alice", "uni-a", Decimal(10), totals("10", "40"), CAPS)
    assert reason is None


def test_pi_cap_exceeded_by_smallest_quantum() -> None:
    requested = Decimal("10.000000000000000000000001")
    reason = exploratory_review_reason("alice", "uni-a", requested, totals("10", "10"), CAPS)
    assert reason is not None
    assert "PI 'alice'" in reason
    assert "limit of 20 PF-days" in reason
    assert "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS" in reason
    assert "365 days" in reason
    assert "peer review" in reason


def test_institution_cap_exceeded() -> None:
    reason = exploratory_review_reason("alice", "uni-a", Decimal(5), totals("0", "46"), CAPS)
    assert reason is not None
    assert "institution 'uni-a'" in reason
    assert "limit of 50 PF-days" in reason
    assert "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS" in reason


def test_zero_cap_sends_all_to_review() -> None:
    caps = ExploratoryCaps(pi_limit=Decimal(0), institution_limit=Decimal(0), period_days=30)
    reason = exploratory_review_reason("alice", "uni-a", Decimal("0.1"), totals("0", "0"), caps)
    assert reason is not None


def test_cap_settings_defaults() -> None:
    settings = GrantSettings.from_env({})
    caps = settings.exploratory_caps()
    assert caps.pi_limit == Decimal(20)
    assert caps.institution_limit == Decimal(200)
    assert caps.period_days == 365


def test_cap_settings_read_from_environment() -> None:
    settings = GrantSettings.from_env(
        {
            "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS": "15.5",
            "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS": "40",
            "ACSP_GRANT_EXPLORATORY_PERIOD_DAYS": "90",
        }
    )
    assert settings.exploratory_caps() == ExploratoryCaps(Decimal("15.5"), Decimal(40), 90)


@pytest.mark.parametrize(
    ("environ", "variable", "reason"),
    [
        (
            {"ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS": "-1"},
            "PI_LIMIT_PF_DAYS",
            "below the minimum 0",
        ),
        (
            {"ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS": "-1"},
            "INSTITUTION_LIMIT_PF_DAYS",
            "below the minimum 0",
        ),
        ({"ACSP_GRANT_EXPLORATORY_PERIOD_DAYS": "0"}, "PERIOD_DAYS", "below the minimum 1"),
        ({"ACSP_GRANT_EXPLORATORY_PERIOD_DAYS": "3661"}, "PERIOD_DAYS", "above the maximum"),
        (
            {
                "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS": "60",
                "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS": "50",
            },
            "PI_LIMIT_PF_DAYS",
            "above the per-institution limit",
        ),
    ],
)
def test_bad_cap_settings_rejected(environ: dict[str, str], variable: str, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        GrantSettings.from_env(environ)
    assert caught.value.variable == f"ACSP_GRANT_EXPLORATORY_{variable}"
    assert reason in str(caught.value)

"""ISO 3166-1 alpha-2 country codes of institutions, without any server."""

from __future__ import annotations

import pytest

from services.grant.countries import ASSIGNED_CODES, country_code_in
from services.grant.errors import InvalidArgument

FIELD = "institution.country_code"


def test_assigned_code_list_complete() -> None:
    assert len(ASSIGNED_CODES) == 249
    assert all(len(code) == 2 and code.isascii() and code.isupper() for code in ASSIGNED_CODES)


@pytest.mark.parametrize(("text", "code"), [("DE", "DE"), ("no", "NO"), (" gb ", "GB")])
def test_assigned_codes_upper_cased(text: str, code: str) -> None:
    assert country_code_in(FIELD, text) == code


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is missing"),
        ("XX", "'XX' is not an assigned ISO 3166-1 alpha-2 country code"),
        ("EU", "not an assigned"),
        ("ß", "not an assigned"),
        ("DEU", "not an assigned"),
        ("UK", "use GB"),
        ("el", "use GR"),
    ],
)
def test_unassigned_codes_rejected(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        country_code_in(FIELD, text)
    assert FIELD in str(caught.value)
    assert reason in str(caught.value)

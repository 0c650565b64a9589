"""ISO 3166-1 alpha-2 country codes, for an institution's country."""

from __future__ import annotations

from typing import Final

from services.grant.errors import InvalidArgument

ASSIGNED_CODES: Final = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ
    BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ
    CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ
    DE DJ DK DM DO DZ
    EC EE EG EH ER ES ET
    FI FJ FK FM FO FR
    GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY
    HK HM HN HR HT HU
    ID IE IL IM IN IO IQ IR IS IT
    JE JM JO JP
    KE KG KH KI KM KN KP KR KW KY KZ
    LA LB LC LI LK LR LS LT LU LV LY
    MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ
    NA NC NE NF NG NI NL NO NP NR NU NZ
    OM
    PA PE PF PG PH PK PL PM PN PR PS PT PW PY
    QA
    RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ
    TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ
    UA UG UM US UY UZ
    VA VC VE VG VI VN VU
    WF WS
    YE YT
    ZA ZM ZW
    """.split()
)
"""The 249 officially assigned codes of ISO 3166-1. Reserved and user-assigned codes, such as
``UK``, ``EU`` or ``XX``, are not among them."""
# The list was checked against the alpha-2 codes of pycountry 26.2.16 (its ISO 3166-1 data
# comes from Debian's iso-codes), which contains the same 249 codes.
# NOTE: the list is written out here, so a code that ISO assigns later is rejected until it is
# added.

_RESERVED_HINTS: Final = {"UK": "GB", "EL": "GR"}
"""Exceptionally reserved codes that people use for a country whose assigned code differs."""


def country_code_in(field: str, text: str) -> str:
    """Return an assigned ISO 3166-1 alpha-2 code in upper case; raise InvalidArgument otherwise."""
    code = text.strip()
    if not code:
        raise InvalidArgument(field, "is missing", "give the two-letter ISO 3166-1 code, e.g. DE")
    # Checked before upper(), which turns 'ß' into the two letters 'SS'.
    upper = code.upper() if code.isascii() else code
    if upper not in ASSIGNED_CODES:
        hint = _RESERVED_HINTS.get(upper)
        fix = f"use {hint}" if hint else "give a two-letter code such as DE, NO or US"
        raise InvalidArgument(
            field, f"{code!r} is not an assigned ISO 3166-1 alpha-2 country code", fix
        )
    return upper

"""Parsing of request fields that a client may forge: page tokens and enum numbers."""

from __future__ import annotations

import base64

import pytest

from scheduler.service.fleet_api import _node_state_name
from scheduler.service.provider_store import (
    decode_provider_page_token,
    encode_provider_page_token,
)
from scheduler.service.store import decode_page_token, encode_page_token
from services.runtime.errors import InvalidArgument


def forged_token(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).decode().rstrip("=")


def test_page_token_round_trips_job_ids() -> None:
    for job_id in ("j0661e660b955fcde0fbd", "j0661e660b955fcde0fbd-12"):
        assert decode_page_token(encode_page_token(job_id)) == job_id


def test_forged_page_token_rejected() -> None:
    for value in (b"j\x00", b"j", b"j' OR 1=1", b"x123", "j\u00e9".encode(), b"j" + b"a" * 200):
        with pytest.raises(ValueError, match="malformed"):
            decode_page_token(forged_token(value))


def test_provider_page_token_round_trips() -> None:
    assert decode_provider_page_token(encode_provider_page_token("prov-1")) == "prov-1"


def test_forged_provider_page_token_rejected() -> None:
    for value in (b"provider:\x00", b"provider:", b"provider:a/b", b"provider:" + b"p" * 100):
        with pytest.raises(ValueError, match="malformed"):
            decode_provider_page_token(forged_token(value))


def test_unknown_node_state_rejected() -> None:
    with pytest.raises(InvalidArgument) as error:
        _node_state_name(77)
    assert error.value.field == "state"
    assert "77 is not a node state" in str(error.value)

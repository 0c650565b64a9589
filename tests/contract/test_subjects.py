"""Subject tokens: what the NATS permissions rely on."""

from __future__ import annotations

import pytest

from acsp import subjects


@pytest.mark.parametrize("value", ["alpha", "region-1", "node_07", "x" * 64])
def test_valid_tokens_pass(value: str) -> None:
    assert subjects.check_token("node", value) == value


@pytest.mark.parametrize("value", ["", "a.b", "a b", "a*", "a>", "abc\n", "x" * 65, "ü"])
def test_invalid_tokens_name_the_field(value: str) -> None:
    with pytest.raises(ValueError, match="node"):
        subjects.check_token("node", value)


def test_usage_subject_carries_provider_region_node() -> None:
    assert subjects.usage_subject("p", "r", "n") == "acsp.usage.p.r.n"
    assert subjects.command_deliver_subject("p", "r", "n") == "acsp.deliver.p.r.n"

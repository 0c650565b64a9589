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


def test_output_subjects_carry_node() -> None:
    assert subjects.output_subject("p", "r", "n") == "acsp.output.p.r.n"
    assert subjects.output_reply_subject("p", "r", "n", "abc") == "acsp.output_reply.p.r.n.abc"
    assert subjects.output_reply_subject("p", "r", "n", "abc").startswith(
        subjects.output_reply_prefix("p", "r", "n")
    )


def test_output_reply_token_is_checked() -> None:
    with pytest.raises(ValueError, match="token"):
        subjects.output_reply_subject("p", "r", "n", "a.b")

"""The dead-letter file: what it keeps, its size limit, and recovery from a torn write."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agents.dead_letters import DeadLetter, DeadLetters

DEAD_AT = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


def letter(msg_id: str, payload: bytes = b"\x00\xffpayload") -> DeadLetter:
    return DeadLetter(msg_id, "acsp.usage.acme.eu-1.n1", payload, "too large", 5, DEAD_AT)


def test_letters_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "dead_letters.jsonl"
    letters = DeadLetters(path)
    assert letters.append([letter("m1"), letter("m2", b"")]) == 2

    reopened = DeadLetters(path)
    assert reopened.read() == [letter("m1"), letter("m2", b"")]
    assert "m1" in reopened
    assert "m2" in reopened
    assert "m3" not in reopened
    assert len(reopened) == 2


def test_file_is_readable_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "dead_letters.jsonl"
    DeadLetters(path).append([letter("m1")])
    record = json.loads(path.read_text().splitlines()[0])
    assert record["message_id"] == "m1"
    assert record["subject"] == "acsp.usage.acme.eu-1.n1"
    assert record["reason"] == "too large"
    assert record["rejections"] == 5
    assert record["dead_at"] == "2025-01-31T12:00:00+00:00"
    assert record["payload_base64"] == "AP9wYXlsb2Fk"


def test_nothing_written_until_first_letter(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dead_letters.jsonl"
    letters = DeadLetters(path)
    assert letters.read() == []
    assert not path.exists()
    assert letters.append([]) == 0
    assert not path.exists()


def test_full_file_takes_a_prefix(tmp_path: Path) -> None:
    path = tmp_path / "dead_letters.jsonl"
    letters = DeadLetters(path, max_bytes=400)
    written = letters.append([letter(f"m{i}", b"x" * 50) for i in range(10)])
    assert 0 < written < 10
    assert path.stat().st_size <= 400
    assert [d.message_id for d in letters.read()] == [f"m{i}" for i in range(written)]
    assert f"m{written}" not in letters
    assert letters.append([letter("late")]) == 0


def test_moved_file_makes_room(tmp_path: Path) -> None:
    path = tmp_path / "dead_letters.jsonl"
    letters = DeadLetters(path, max_bytes=400)
    while letters.append([letter(f"m{len(letters)}", b"x" * 50)]):
        pass
    path.rename(tmp_path / "handled.jsonl")
    assert letters.append([letter("late")]) == 1
    assert [d.message_id for d in letters.read()] == ["late"]


def test_torn_last_line_cut_on_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "dead_letters.jsonl"
    DeadLetters(path).append([letter("m1")])
    whole = path.read_bytes()
    with open(path, "ab") as file:
        file.write(whole[: len(whole) // 2])

    reopened = DeadLetters(path)
    assert path.read_bytes() == whole
    assert "torn line" in caplog.text
    reopened.append([letter("m2")])
    assert [d.message_id for d in reopened.read()] == ["m1", "m2"]


def test_last_line_without_newline_kept(tmp_path: Path) -> None:
    path = tmp_path / "dead_letters.jsonl"
    DeadLetters(path).append([letter("m1")])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))

    reopened = DeadLetters(path)
    assert "m1" in reopened
    reopened.append([letter("m2")])
    assert [d.message_id for d in reopened.read()] == ["m1", "m2"]


def test_bad_line_skipped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "dead_letters.jsonl"
    DeadLetters(path).append([letter("m1")])
    with open(path, "ab") as file:
        file.write(b"an operator's note\n")
    DeadLetters(path).append([letter("m2")])

    assert [d.message_id for d in DeadLetters(path).read()] == ["m1", "m2"]
    assert "line 2 is not a dead letter" in caplog.text


def test_invalid_max_bytes_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        DeadLetters(tmp_path / "dead_letters.jsonl", max_bytes=0)

"""Replaying recorded NVML responses through the current NVML backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.backends import nvml_record
from agents.backends.nvml import NvmlBackend

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*.json"))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_replayed_recording_reads_the_same(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    replay = nvml_record.Replay(document)
    for name, function in replay.functions().items():
        monkeypatch.setattr(nvml_record.pynvml, name, function)
    backend = NvmlBackend()
    inventory = backend.discover()
    batches = []
    for _ in document["summary"]["readings"]:
        backend.poll_events()
        batches.append(backend.read())
    summary = nvml_record.summarize(inventory, batches)
    assert replay.misses == []
    assert summary["inventory"] == document["summary"]["inventory"]
    assert summary["readings"] == document["summary"]["readings"]
    uuids = [a["uuid"] for a in summary["inventory"]["accelerators"]]
    assert len(uuids) == len(set(uuids))


def test_fixture_directory_has_a_recording() -> None:
    assert FIXTURES


def test_replay_rejects_other_documents() -> None:
    with pytest.raises(ValueError, match="not an NVML recording"):
        nvml_record.Replay({"format": "something-else", "calls": []})

"""The committed generated code in acsp/v1 matches what tools/gen_protos.py makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh = {p.name: p.read_text() for p in (tmp_path / "acsp" / "v1").glob("*_pb2*.py*")}
    committed = {p.name: p.read_text() for p in (ROOT / "acsp" / "v1").glob("*_pb2*.py*")}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run tools/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"stale generated files {stale}: run python tools/gen_protos.py"


def test_every_message_and_field_has_a_comment() -> None:
    missing = []
    for proto in sorted((ROOT / "protos" / "acsp" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_declaration = stripped.startswith(("message ", "enum ", "service ", "rpc "))
            is_field = (
                "=" in stripped
                and stripped.endswith(";")
                and not stripped.startswith(("option", "//", "syntax", "package", "import"))
            )
            if not (is_declaration or is_field):
                continue
            previous = lines[number - 1].strip() if number else ""
            if not previous.startswith("//"):
                missing.append(f"{proto.name}:{number + 1}: {stripped}")
    assert missing == [], "declarations without a comment:\n" + "\n".join(missing)

"""Record the garbage collector's pauses of every Python process started with this on its path.

Run a benchmark with ``PYTHONPATH=bench/gc_pauses`` and ``ACSP_GC_PAUSES_DIR`` set to a
folder. Each process that exits normally writes ``<pid>.json`` there: its command and, per
generation, the number of collections and the longest and total pause in milliseconds.
``python bench/gc_pauses/summary.py DIR`` prints them as a table.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time

_OUT = os.environ.get("ACSP_GC_PAUSES_DIR", "")
_started: list[float] = [0.0]
_pauses: dict[int, list[float]] = {}


def _on_collect(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    _pauses.setdefault(info["generation"], []).append(time.perf_counter() - _started[0])


def _write() -> None:
    report = {
        "command": sys.argv[:3],
        "generations": {
            str(generation): {
                "collections": len(pauses),
                "longest_ms": round(max(pauses) * 1000, 2),
                "total_ms": round(sum(pauses) * 1000, 2),
            }
            for generation, pauses in sorted(_pauses.items())
        },
    }
    with open(os.path.join(_OUT, f"{os.getpid()}.json"), "w", encoding="utf-8") as file:
        json.dump(report, file)


if _OUT:
    gc.callbacks.append(_on_collect)
    atexit.register(_write)

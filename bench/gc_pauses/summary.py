"""Print the collector pauses that ``bench/gc_pauses/sitecustomize.py`` recorded in a folder.

Usage: python bench/gc_pauses/summary.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    print("| process | generation | collections | longest ms | total ms |")
    print("|---|---|---|---|---|")
    for path in sorted(Path(folder).glob("*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        command = " ".join(report["command"])
        for generation, row in report["generations"].items():
            print(
                f"| {command} | {generation} | {row['collections']} | "
                f"{row['longest_ms']} | {row['total_ms']} |"
            )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

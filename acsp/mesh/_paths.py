"""Path checks that the mesh shares between the servers and the fleet it runs as root."""

from __future__ import annotations

import stat
from pathlib import Path


def traversable_by_others(path: Path) -> bool:
    """Return True if a user other than the owner can reach ``path`` through its parents."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True

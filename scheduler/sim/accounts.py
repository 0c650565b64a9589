"""Deterministic projects and institutions for traces that have no users.

A pod named ``n`` belongs to project ``sha256(f"{seed}:{n}") mod 48``; project ``p`` belongs
to institution ``p mod 12`` and every institution to the one program ``openb``. Project
weights are 1. The same name and seed always give the same account.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

PROJECTS: Final = 48
INSTITUTIONS: Final = 12
PROGRAM: Final = "openb"


@dataclass(frozen=True, slots=True)
class Account:
    project: str
    institution: str
    program: str


def assign_account(name: str, seed: int = 0) -> Account:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    project = int.from_bytes(digest[:8], "big") % PROJECTS
    institution = project % INSTITUTIONS
    return Account(f"proj-{project:02d}", f"inst-{institution:02d}", PROGRAM)

"""Failures of a local mesh: a start that failed, and a child that exited while the mesh ran."""

from __future__ import annotations

from dataclasses import dataclass


class MeshStartError(RuntimeError):
    """The mesh failed to start; the message names the process and shows its last log lines."""


@dataclass(frozen=True, slots=True)
class ChildExit:
    """A child of the mesh that exited while the mesh was running."""

    name: str
    returncode: int
    description: str
    """Exit status and log path, as one sentence."""
    log_tail: str
    """Its last log lines."""

    def __str__(self) -> str:
        return f"{self.description}\n--- last lines of its log ---\n{self.log_tail}"

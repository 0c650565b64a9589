"""Start commands that would break the node's accounting are rejected when they are parsed."""

from __future__ import annotations

import pytest

from acsp.v1 import agent_pb2, scheduler_pb2
from agents.wire import InvalidCommand, parse_command
from tests.agent.helpers import NODE


def _start(*shares: tuple[str, int], run_s: float = 0.0) -> bytes:
    return agent_pb2.AgentCommand(
        command_id="start-1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id="job/1/0",
        job_id="job",
        accelerators=[
            scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=millis)
            for uuid, millis in shares
        ],
        simulated_run_seconds=run_s,
    ).SerializeToString()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_start(("GPU-1", 1000), ("GPU-1", 1000)), r"lists GPU-1 more than once"),
        (_start(("GPU-1", 400), ("GPU-2", 0), ("GPU-1", 400)), r"lists GPU-1 more than once"),
        (_start(("", 1000)), r"entry without accelerator_id"),
        (_start(("GPU-1", 1000), run_s=float("nan")), r"simulated_run_seconds nan is not"),
        (_start(("GPU-1", 1000), run_s=float("inf")), r"simulated_run_seconds inf is not"),
        (_start(("GPU-1", 1000), run_s=-1.0), r"simulated_run_seconds -1.0 is not"),
    ],
)
def test_start_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCommand, match=message):
        parse_command(data)


def test_distinct_shares_accepted() -> None:
    command = parse_command(_start(("GPU-1", 500), ("GPU-2", 0), run_s=3.5))
    assert command.spec is not None
    assert command.spec.accelerators == ("GPU-1", "GPU-2")
    assert command.spec.accelerator_millis == (500, 1000)
    assert command.spec.simulated_run_time_s == 3.5

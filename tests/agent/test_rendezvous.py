"""The rendezvous variables and hosts files that the agent gives tasks, without servers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from acsp.rendezvous import parse_port_range
from acsp.v1 import agent_pb2, scheduler_pb2
from agents.rendezvous import HostFiles, Placement, task_environment
from agents.settings import parse_host
from agents.wire import InvalidCommand, parse_command
from tests.agent.helpers import NODE

HOSTS_FILE = Path("/state/hosts/x.hosts")
# Tasks 0 and 2 run on node 0, tasks 1 and 3 on node 1, task 4 alone on node 2.
GANG = Placement(("h0", "h1", "h2"), (0, 1, 0, 1, 2))


def env_of(index: int, placement: Placement = GANG, port: int = 29512) -> dict[str, str]:
    return dict(task_environment(index, placement, "own", port, HOSTS_FILE))


@pytest.mark.parametrize(
    ("index", "local_index", "local_count"),
    [(0, 0, 2), (1, 0, 2), (2, 1, 2), (3, 1, 2), (4, 0, 1)],
)
def test_gang_local_indexes(index: int, local_index: int, local_count: int) -> None:
    env = env_of(index)
    assert env["ACSP_LOCAL_TASK_INDEX"] == str(local_index)
    assert env["ACSP_LOCAL_TASK_COUNT"] == str(local_count)


def test_gang_shares_rendezvous() -> None:
    envs = [env_of(index) for index in range(5)]
    for env in envs:
        assert env["ACSP_TASK_COUNT"] == "5"
        assert env["ACSP_RENDEZVOUS_HOST"] == "h0"
        assert env["ACSP_RENDEZVOUS_PORT"] == "29512"
        assert env["ACSP_TASK_HOSTS_FILE"] == str(HOSTS_FILE)


def test_rendezvous_host_is_task_zero_node() -> None:
    placement = Placement(("h1", "h0"), (1, 0, 1))
    assert env_of(2, placement)["ACSP_RENDEZVOUS_HOST"] == "h0"


def test_one_task_job_uses_own_host() -> None:
    env = env_of(0, Placement((), ()))
    assert env["ACSP_TASK_COUNT"] == "1"
    assert env["ACSP_LOCAL_TASK_INDEX"] == "0"
    assert env["ACSP_LOCAL_TASK_COUNT"] == "1"
    assert env["ACSP_RENDEZVOUS_HOST"] == "own"


def test_port_zero_left_unset() -> None:
    assert "ACSP_RENDEZVOUS_PORT" not in env_of(0, port=0)


def test_task_hosts_in_task_order() -> None:
    assert GANG.task_hosts("own") == ["h0", "h1", "h0", "h1", "h2"]
    assert Placement((), ()).task_hosts("own") == ["own"]


def test_hosts_file_written_readable(tmp_path: Path) -> None:
    files = HostFiles(tmp_path)
    path = files.write("job/1/2", ["h0", "h1"])
    assert path == files.path("job/1/2")
    assert path.read_text() == "h0\nh1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o711
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_hosts_file_replaced_then_deleted(tmp_path: Path) -> None:
    files = HostFiles(tmp_path)
    files.write("job/1/0", ["old"])
    path = files.write("job/1/0", ["new"])
    assert path.read_text() == "new\n"
    files.forget("job/1/0")
    assert not path.exists()
    files.forget("job/1/0")


SECOND_NS = 1_000_000_000


def test_update_orders_by_version_then_time(tmp_path: Path) -> None:
    files = HostFiles(tmp_path)
    path = files.write("job/1/0", ["a", "b"], 100 * SECOND_NS)

    # A later placement wins even when its clock was behind the one that wrote the file.
    assert files.update("job/1/0", ["a", "c"], 50 * SECOND_NS, version=1)
    assert not files.update("job/1/0", ["a", "b"], 200 * SECOND_NS)
    assert not files.update("job/1/0", ["a", "d"], 40 * SECOND_NS, version=1)
    assert files.update("job/1/0", ["a", "e"], 60 * SECOND_NS, version=1)
    # Versions order hosts sent within one second, which one-second file times cannot.
    assert files.update("job/1/0", ["a", "f"], 60 * SECOND_NS + 1, version=2)
    assert not files.update("job/1/0", ["a", "e"], 60 * SECOND_NS + 2, version=1)

    assert path.read_text() == "a\nf\n"


def test_start_file_keeps_its_version(tmp_path: Path) -> None:
    files = HostFiles(tmp_path)
    files.write("job/1/1", ["a", "c"], 100 * SECOND_NS, version=3)

    assert not files.update("job/1/1", ["a", "b"], 200 * SECOND_NS, version=2)
    assert files.path("job/1/1").read_text() == "a\nc\n"
    files.forget("job/1/1")
    assert list(files.path("job/1/1").parent.iterdir()) == []


def test_update_syncs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = HostFiles(tmp_path)
    files.write("job/1/0", ["a", "b"], 100 * SECOND_NS)
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    assert files.update("job/1/0", ["a", "c"], 200 * SECOND_NS)

    # The file before its rename, then the folder that records the rename.
    assert synced == [False, True]


def _start(
    hosts: list[str], indexes: list[int], task_id: str = "job/1/1", port: int = 29500
) -> bytes:
    return agent_pb2.AgentCommand(
        command_id="start-1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id=task_id,
        job_id="job",
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id="GPU-1")],
        command=["true"],
        node_hosts=hosts,
        task_node_indexes=indexes,
        rendezvous_port=port,
    ).SerializeToString()


def test_command_fields_parsed() -> None:
    command = parse_command(_start(["h0", "h1"], [0, 1, 1]))
    assert command.spec is not None
    assert command.spec.node_hosts == ("h0", "h1")
    assert command.spec.task_node_indexes == (0, 1, 1)
    assert command.spec.rendezvous_port == 29500


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_start(["h0"], [0], task_id="job/1/1"), r"task index 1 is beyond the 1 tasks"),
        (_start(["h0"], [0, 1]), r"refers to node 1, but node_hosts has 1 hosts"),
        (_start(["h0"], []), r"node_hosts without task_node_indexes"),
        (_start(["h0"], [0, 0], task_id="job"), r"task_id 'job' is not <job_id>"),
        (_start([], [], port=70000), r"rendezvous_port 70000 is above 65535"),
    ],
)
def test_bad_fields_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCommand, match=message):
        parse_command(data)


@pytest.mark.parametrize(
    ("text", "expected"), [("29500-29999", (29500, 29999)), ("40000", (40000, 40000))]
)
def test_port_range_parsed(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "29500-", "abc", "30000-29999", "80-90", "60000-70000"])
def test_port_range_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="port"):
        parse_port_range(text)


@pytest.mark.parametrize("text", ["gpu-7.example.org", "10.1.2.3", "fe80::1"])
def test_host_accepted(text: str) -> None:
    assert parse_host(text) == text


@pytest.mark.parametrize("text", ["", "a,b", "a b", "x" * 101])
def test_host_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="is not an address or hostname"):
        parse_host(text)

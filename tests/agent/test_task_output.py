"""The agent's replies to output requests: the end of a task's log, read from disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from acsp.v1 import agent_pb2
from agents.task_logs import UnreadableLogError, marker_line, read_tail, trim_log
from agents.task_output import REPLY_RESERVE_BYTES, output_reply

NODE_KEY = "acme.eu-1.node-1"
MAX_PAYLOAD = 1 << 20


def request(task_id: str = "j1/1/0", max_bytes: int = 1024) -> bytes:
    return agent_pb2.TaskOutputRequest(task_id=task_id, max_bytes=max_bytes).SerializeToString()


def logs_in(folder: Path) -> Callable[[str], Path]:
    return lambda task_id: folder / f"{task_id.replace('/', '_')}.log"


def test_read_tail_returns_whole_short_log(tmp_path: Path) -> None:
    log = tmp_path / "task.log"
    log.write_bytes(b"hello\nworld\n")
    tail = read_tail(str(log), 100)
    assert tail.data == b"hello\nworld\n"
    assert not tail.truncated


def test_read_tail_cuts_long_log_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "task.log"
    log.write_bytes(b"a" * 1000 + b"the end\n")
    tail = read_tail(str(log), 8)
    assert tail.data == b"the end\n"
    assert tail.truncated


def test_read_tail_flags_trimmed_log(tmp_path: Path) -> None:
    log = tmp_path / "task.log"
    limit = 64 << 10
    log.write_bytes(b"x" * (limit * 2))
    assert trim_log(str(log), limit) > 0
    tail = read_tail(str(log), limit * 2)
    assert tail.data == log.read_bytes()
    assert marker_line(0, limit).split(b":")[0] in tail.data
    assert tail.truncated


def test_read_tail_keeps_bytes_unchanged(tmp_path: Path) -> None:
    log = tmp_path / "task.log"
    data = bytes(range(256)) + "é\u4e2d".encode()
    log.write_bytes(data)
    assert read_tail(str(log), 1000).data == data


def test_read_tail_rejects_symbolic_link(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not for tasks")
    link = tmp_path / "task.log"
    link.symlink_to(secret)
    with pytest.raises(UnreadableLogError, match="symbolic link"):
        read_tail(str(link), 100)


def test_read_tail_rejects_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "task.log"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableLogError, match="not a regular file"):
        read_tail(str(fifo), 100)


def test_read_tail_raises_for_missing_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_tail(str(tmp_path / "missing.log"), 100)


async def test_reply_contains_log_end(tmp_path: Path) -> None:
    (tmp_path / "j1_1_0.log").write_bytes(b"first\nsecond\n")
    reply = await output_reply(logs_in(tmp_path), NODE_KEY, request(max_bytes=7), MAX_PAYLOAD)
    assert reply.status == agent_pb2.TASK_OUTPUT_STATUS_OK
    assert reply.output == b"second\n"
    assert reply.truncated


async def test_reply_fits_max_payload(tmp_path: Path) -> None:
    (tmp_path / "j1_1_0.log").write_bytes(b"y" * 20_000)
    max_payload = REPLY_RESERVE_BYTES + 5000
    reply = await output_reply(logs_in(tmp_path), NODE_KEY, request(max_bytes=20_000), max_payload)
    assert reply.status == agent_pb2.TASK_OUTPUT_STATUS_OK
    assert len(reply.output) == 5000
    assert reply.truncated
    assert reply.ByteSize() < max_payload


async def test_reply_for_missing_log_is_not_found(tmp_path: Path) -> None:
    reply = await output_reply(logs_in(tmp_path), NODE_KEY, request(), MAX_PAYLOAD)
    assert reply.status == agent_pb2.TASK_OUTPUT_STATUS_NOT_FOUND
    assert "j1/1/0" in reply.message
    assert "acme/eu-1/node-1" in reply.message
    assert NODE_KEY not in reply.message


async def test_reply_without_runner_is_not_found() -> None:
    reply = await output_reply(None, NODE_KEY, request(), MAX_PAYLOAD)
    assert reply.status == agent_pb2.TASK_OUTPUT_STATUS_NOT_FOUND


async def test_reply_for_link_fails(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not for tasks")
    (tmp_path / "j1_1_0.log").symlink_to(secret)
    reply = await output_reply(logs_in(tmp_path), NODE_KEY, request(), MAX_PAYLOAD)
    assert reply.status == agent_pb2.TASK_OUTPUT_STATUS_FAILED
    assert b"not for tasks" not in reply.output
    assert "symbolic link" in reply.message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff", "not a TaskOutputRequest"),
        (request(task_id=""), "invalid task_id"),
        (request(task_id="j" * 300), "invalid task_id"),
        (request(max_bytes=0), "invalid max_bytes"),
    ],
)
async def test_reply_rejects_bad_request(tmp_path: Path, data: bytes, reason: str) -> None:
    reply = await output_reply(logs_in(tmp_path), NODE_KEY, data, MAX_PAYLOAD)
    assert reply.status == agent_pb2.TASK_OUTPUT_STATUS_FAILED
    assert reason in reply.message

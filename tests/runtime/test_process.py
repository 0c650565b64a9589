"""The sample service as a real process: startup failures and graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import wrappers_pb2

from services.runtime import Role
from tests.runtime.conftest import Keys
from tests.runtime.sample_service import SERVICE_NAME

REPOSITORY = Path(__file__).resolve().parents[2]
PROCESS_TIMEOUT_S = 30.0
NOT_SERVED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sample_environment(**variables: str) -> dict[str, str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("ACSP_")}
    environ.pop("SAMPLE_SCHEMA", None)
    environ["PYTHONPATH"] = str(REPOSITORY)
    environ.update(variables)
    return environ


async def run_to_exit(**variables: str) -> tuple[int, list[str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.runtime.sample_service",
        env=sample_environment(**variables),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=PROCESS_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, stderr.decode().splitlines()


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {"ACSP_GRPC_LISTEN": "127.0.0.1:port"},
            "acsp-sample: cannot start: ACSP_GRPC_LISTEN: '127.0.0.1:port' is invalid",
        ),
        (
            {"ACSP_TOKEN_PUBLIC_KEY": "/nonexistent/signing.pub"},
            "acsp-sample: cannot start: ACSP_TOKEN_PUBLIC_KEY: file /nonexistent/signing.pub "
            "does not exist",
        ),
        (
            {
                "SAMPLE_SCHEMA": "unused",
                "ACSP_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/test",
            },
            "acsp-sample: cannot start: ACSP_DATABASE_URL: cannot connect to postgresql://",
        ),
        (
            {"SAMPLE_SCHEMA": "unused"},
            "acsp-sample: cannot start: ACSP_DATABASE_URL: missing; "
            "fix: set it to the PostgreSQL URL",
        ),
    ],
)
async def test_bad_settings_print_one_line_and_exit_2(
    variables: dict[str, str], expected: str
) -> None:
    code, lines = await run_to_exit(**variables)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected)
    assert "; fix: " in lines[0]


async def test_port_in_use_prints_one_line(keys: Keys) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, lines = await run_to_exit(
            ACSP_GRPC_LISTEN=f"127.0.0.1:{port}", ACSP_TOKEN_PUBLIC_KEY=str(keys.public_path)
        )
    assert code == 2
    failures = [line for line in lines if "cannot start" in line]
    assert len(failures) == 1, lines
    assert failures[0].startswith(
        f"acsp-sample: cannot start: ACSP_GRPC_LISTEN: cannot bind 127.0.0.1:{port}"
    )
    assert not any("Traceback" in line for line in lines)


@pytest.fixture
async def sample_process(
    keys: Keys, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    ready_file = tmp_path / "sample.addr"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.runtime.sample_service",
        env=sample_environment(
            ACSP_TOKEN_PUBLIC_KEY=str(keys.public_path),
            ACSP_READY_FILE=str(ready_file),
            ACSP_SHUTDOWN_GRACE_S="10",
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT_S):
            while not ready_file.exists():
                assert process.returncode is None, "sample service exited during start"
                await asyncio.sleep(0.05)
        yield process, ready_file.read_text().strip()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_until(stream: asyncio.StreamReader, phrase: str, seen: list[str]) -> None:
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError(f"stderr ended before {phrase!r}: {seen}")
        seen.append(line.rstrip())
        if phrase in line:
            return


async def test_sigterm_finishes_in_flight_call(
    sample_process: tuple[asyncio.subprocess.Process, str], keys: Keys, tmp_path: Path
) -> None:
    process, address = sample_process
    assert process.stderr is not None
    metadata = [("authorization", f"Bearer {keys.token(Role.PI)}")]
    seen: list[str] = []

    async with grpc.aio.insecure_channel(address) as channel:
        sleep = channel.unary_unary(
            f"/{SERVICE_NAME}/Sleep",
            request_serializer=wrappers_pb2.DoubleValue.SerializeToString,
            response_deserializer=wrappers_pb2.DoubleValue.FromString,
        )
        call = asyncio.ensure_future(
            sleep(wrappers_pb2.DoubleValue(value=1.0), metadata=metadata, timeout=20)
        )
        await asyncio.wait_for(read_until(process.stderr, "sleep started", seen), PROCESS_TIMEOUT_S)

        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(
            read_until(process.stderr, "finishing in-flight calls", seen), PROCESS_TIMEOUT_S
        )

        # New calls are not served while the first one keeps running. Depending on when the
        # call reaches the draining server, grpc cancels it, refuses it or lets it time out.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sleep(wrappers_pb2.DoubleValue(value=0.0), metadata=metadata, timeout=3)
        reply = await asyncio.wait_for(call, timeout=PROCESS_TIMEOUT_S)

    rest = await asyncio.wait_for(process.stderr.read(), timeout=PROCESS_TIMEOUT_S)
    code = await asyncio.wait_for(process.wait(), timeout=PROCESS_TIMEOUT_S)

    assert reply.value == 1.0
    assert refused.value.code() in NOT_SERVED
    assert code == 0
    assert "stopped" in rest.decode()
    assert not (tmp_path / "sample.addr").exists()

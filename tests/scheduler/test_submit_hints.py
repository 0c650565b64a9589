"""Hints that name the ``acsp jobs submit`` option behind each field a real scheduler rejects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from acsp.cli import jobs as jobs_cli
from acsp.cli.main import main
from acsp.v1 import scheduler_pb2_grpc
from services.runtime.auth import Role

from .harness import Stack, metadata

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


def use_identity(monkeypatch: pytest.MonkeyPatch, address: str, token: str) -> None:
    @contextmanager
    def open_scheduler(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

            class _TokenStub:
                def __getattr__(self, name: str) -> Any:
                    method = getattr(stub, name)
                    return lambda request: method(request, metadata=metadata(token), timeout=20)

            yield _TokenStub()

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)


async def test_submit_error_names_each_option_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    use_identity(monkeypatch, address, stack.token("ada", Role.RESEARCHER))
    argv = ["jobs", "submit", "--project", "p1", "--model", "no such model", "--", "true"]
    code = await asyncio.to_thread(main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "is not a catalog model name" in err
    assert err.count("is set by --model") == 1, err

"""Record the NVML calls of the agent's backend on a real GPU node, and replay them in tests.

Record (on a machine with NVIDIA GPUs and the driver)::

    python -m agents.backends.nvml_record nvml-recording.json --readings 3 --interval 1

The recorder wraps every pynvml function the backend calls, runs discovery and a few readings
through :class:`~agents.backends.nvml.NvmlBackend`, and writes one JSON document:

- ``format``: ``acsp-nvml-recording/1``;
- ``calls``: each call in order, ``{"function", "args", "result"}`` or ``{..., "error": code}``
  with NVML's return code. Handles are written as ``{"handle": label}`` and ctypes structures
  as ``{"struct": {field: value}}``;
- ``summary``: what the backend made of the calls (inventory and readings), so that a replay
  can check that the backend still reads the same values from the same answers.

:class:`Replay` installs functions that answer from a recording; calls with the same
arguments get the recorded answers in order, the last one repeating.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import platform
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

from agents.backends.nvml import NvmlBackend
from agents.model import AcceleratorReading, NodeInventory

FORMAT = "acsp-nvml-recording/1"
RECORDED_FUNCTIONS = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetName",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetAttributes",
    "nvmlEventSetCreate",
    "nvmlEventSetFree",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetWait_v2",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetTemperatureThreshold",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRetiredPages",
    "nvmlDeviceGetRetiredPagesPendingStatus",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetNvLinkState",
    "nvmlDeviceGetNvLinkErrorCounter",
)
_HANDLE_FUNCTIONS = frozenset(
    {"nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlEventSetCreate"}
)
_PRIMITIVES = (str, int, float, bool, type(None))


def _handle_key(value: Any) -> Any:
    try:
        return ("pointer", ctypes.cast(value, ctypes.c_void_p).value)
    except (TypeError, ctypes.ArgumentError):
        return ("object", id(value))


class Recorder:
    """Wraps pynvml's functions and records every call and its outcome."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._labels: dict[Any, str] = {}
        self._originals: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        for name in RECORDED_FUNCTIONS:
            original = getattr(pynvml, name)
            self._originals[name] = original
            setattr(pynvml, name, self._wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(pynvml, name, original)
        self._originals.clear()

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any) -> Any:
            encoded_args = [self._encode(arg) for arg in args]
            try:
                result = function(*args)
            except pynvml.NVMLError as error:
                self.calls.append({"function": name, "args": encoded_args, "error": error.value})
                raise
            if name in _HANDLE_FUNCTIONS:
                label = f"{name}{json.dumps(encoded_args)}"
                self._labels[_handle_key(result)] = label
            self.calls.append(
                {"function": name, "args": encoded_args, "result": self._encode(result)}
            )
            return result

        return recorded

    def _encode(self, value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, _PRIMITIVES):
            return value
        label = self._labels.get(_handle_key(value))
        if label is not None:
            return {"handle": label}
        if isinstance(value, list | tuple):
            return [self._encode(item) for item in value]
        if hasattr(value, "_fields_"):
            fields = {name: self._encode(getattr(value, name)) for name, *_ in value._fields_}
            return {"struct": fields}
        if isinstance(value, SimpleNamespace):
            return {"struct": {k: self._encode(v) for k, v in vars(value).items()}}
        return repr(value)


@dataclasses.dataclass(frozen=True)
class _ReplayHandle:
    label: str


class Replay:
    """Replay pynvml calls from a recording. Calls not in it are listed in ``misses``."""

    def __init__(self, document: dict[str, Any]) -> None:
        if document.get("format") != FORMAT:
            raise ValueError(f"not an NVML recording: format {document.get('format')!r}")
        self._answers: dict[tuple[str, str], deque[dict[str, Any]]] = {}
        for call in document["calls"]:
            key = (call["function"], json.dumps(call["args"]))
            self._answers.setdefault(key, deque()).append(call)
        self.misses: list[str] = []

    def functions(self) -> dict[str, Callable[..., Any]]:
        """Return replacement functions by pynvml name, for ``monkeypatch.setattr``."""
        return {name: self._function(name) for name in RECORDED_FUNCTIONS}

    def _function(self, name: str) -> Callable[..., Any]:
        def replayed(*args: Any) -> Any:
            key = (name, json.dumps([_encode_argument(arg) for arg in args]))
            answers = self._answers.get(key)
            if not answers:
                self.misses.append(f"{name}{key[1]}")
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            call = answers.popleft() if len(answers) > 1 else answers[0]
            if "error" in call:
                raise pynvml.NVMLError(call["error"])
            return _decode(call["result"])

        return replayed


def _encode_argument(value: Any) -> Any:
    if isinstance(value, _ReplayHandle):
        return {"handle": value.label}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, dict) and "handle" in value:
        return _ReplayHandle(value["handle"])
    if isinstance(value, dict) and "struct" in value:
        return SimpleNamespace(**{k: _decode(v) for k, v in value["struct"].items()})
    return value


def summarize(inventory: NodeInventory, readings: Sequence[Sequence[AcceleratorReading]]) -> Any:
    """Return the backend's view of a recording as plain JSON values."""

    def plain(value: Any) -> Any:
        if isinstance(value, frozenset):
            return sorted(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {
        "inventory": plain(dataclasses.asdict(inventory)),
        "readings": [[plain(dataclasses.asdict(r)) for r in batch] for batch in readings],
    }


def record(readings: int, interval_s: float) -> dict[str, Any]:
    """Run discovery and ``readings`` readings under the recorder; return the document."""
    recorder = Recorder()
    recorder.install()
    try:
        backend = NvmlBackend()
        inventory = backend.discover()
        batches = []
        for index in range(readings):
            backend.poll_events()
            batches.append(backend.read())
            if index + 1 < readings:
                time.sleep(interval_s)
        backend.close()
    finally:
        recorder.uninstall()
    return {
        "format": FORMAT,
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "host": platform.node(),
        "calls": recorder.calls,
        "summary": summarize(inventory, batches),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record the agent's NVML calls on this node.")
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--readings", type=int, default=3, help="readings to take (default 3)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    args = parser.parse_args(argv)
    document = record(args.readings, args.interval)
    args.output.write_text(json.dumps(document, indent=1), encoding="utf-8")
    gpus = len(document["summary"]["inventory"]["accelerators"])
    print(f"recorded {len(document['calls'])} NVML calls on {gpus} accelerators to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

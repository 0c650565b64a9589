"""Dead letters: spooled messages that JetStream rejected for good, kept for an operator.

The outbox moves a message out of the spool into this file once JetStream has rejected it for
good (see :mod:`services.runtime.publish_errors`) a bounded number of times, so that the
messages after it go on. The file is JSON Lines, one object per message::

    {"message_id": "usage:acme.eu-1.n1/42", "subject": "acsp.usage.acme.eu-1.n1",
     "reason": "...", "rejections": 5, "dead_at": "2025-01-31T12:00:00+00:00",
     "payload_base64": "..."}

``payload_base64`` is the message's protobuf payload in base64. To publish a dead letter by
hand after fixing the cause, send the decoded payload to its subject with its ``message_id``
as the ``Nats-Msg-Id`` header, then delete its line.

Crash safety: a dead letter is appended and fsynced before the spool commits past its message.
An agent that crashes in between finds the message at the head of its spool again, and its id
in this file, so it neither publishes it nor writes it twice.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from agents.private_files import private_opener

logger = logging.getLogger(__name__)

DEAD_LETTERS_FILE_NAME: Final = "dead_letters.jsonl"
"""Name of the dead-letter file in the agent's state directory."""
DEFAULT_MAX_BYTES: Final = 64 << 20
"""Size at which the dead-letter file takes no more messages, so they stay in the spool."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message moved out of the spool because JetStream rejected it for good."""

    message_id: str
    """The ``Nats-Msg-Id`` the message was published with."""
    subject: str
    payload: bytes
    reason: str
    """Reason of the last rejection, from JetStream or the NATS client."""
    rejections: int
    """Rejections counted before the message moved."""
    dead_at: datetime


class DeadLetters:
    """The append-only dead-letter file, and the ids of the messages in it."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"dead-letter max_bytes must be positive, not {max_bytes}")
        self.path = path
        self._max_bytes = max_bytes
        self._ids: set[str] = set()
        self._recover()

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def append(self, letters: Sequence[DeadLetter]) -> int:
        """Append ``letters`` with one fsync; return how many were written (a prefix).

        Stops at the first letter that would take the file over its ``max_bytes``.
        """
        lines: list[bytes] = []
        # The size on disk, so that an operator who moves the file away makes room at once.
        size = self.path.stat().st_size if self.path.exists() else 0
        for letter in letters:
            line = _encode(letter)
            if size + len(line) > self._max_bytes:
                break
            lines.append(line)
            size += len(line)
        if not lines:
            return 0
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened for each append, so that an operator who replaces the file (an editor saving
        # it after deleting a line) gets the next letters in the new file.
        with open(self.path, "ab", opener=private_opener) as file:
            file.write(b"".join(lines))
            file.flush()
            os.fsync(file.fileno())
        if created:
            _fsync_directory(self.path.parent)
        self._ids.update(letter.message_id for letter in letters[: len(lines)])
        return len(lines)

    def read(self) -> list[DeadLetter]:
        """Return the dead letters in the file, in the order they were written."""
        if not self.path.exists():
            return []
        return list(_parse(self.path.read_bytes(), self.path))

    def _recover(self) -> None:
        """Load the ids in the file, and cut a line that a crash left half written."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        tail = data[complete:]
        if tail and _decode(tail) is None:
            logger.warning(
                "dead-letter file %s ends in a torn line; cutting %d bytes", self.path, len(tail)
            )
            with open(self.path, "r+b") as file:
                file.truncate(complete)
                os.fsync(file.fileno())
            data = data[:complete]
        elif tail:
            # A whole letter whose newline an operator's editor removed: keep it.
            with open(self.path, "ab", opener=private_opener) as file:
                file.write(b"\n")
                os.fsync(file.fileno())
            data += b"\n"
        self._ids = {letter.message_id for letter in _parse(data, self.path)}


def _encode(letter: DeadLetter) -> bytes:
    record = {
        "message_id": letter.message_id,
        "subject": letter.subject,
        "reason": letter.reason,
        "rejections": letter.rejections,
        "dead_at": letter.dead_at.isoformat(),
        "payload_base64": base64.b64encode(letter.payload).decode("ascii"),
    }
    return json.dumps(record).encode("ascii") + b"\n"


def _decode(line: bytes) -> DeadLetter | None:
    try:
        record: Any = json.loads(line)
        return DeadLetter(
            message_id=str(record["message_id"]),
            subject=str(record["subject"]),
            payload=base64.b64decode(record["payload_base64"], validate=True),
            reason=str(record["reason"]),
            rejections=int(record["rejections"]),
            dead_at=datetime.fromisoformat(record["dead_at"]),
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None


def _parse(data: bytes, path: Path) -> Iterator[DeadLetter]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        letter = _decode(line)
        if letter is None:
            logger.warning(
                "dead-letter file %s: line %d is not a dead letter; skipped", path, number
            )
            continue
        yield letter


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

"""The spool's record format, and the search for the next intact record after damage.

A record is ``length:u32 crc32:u32 body`` with ``body = subject_len:u16 subject
msg_id_len:u16 msg_id payload``, all integers big-endian. A record with an empty subject is
padding: it fills, at the same offsets, the bytes of damaged records that a repair moved aside,
and readers skip it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

HEADER: Final = struct.Struct(">II")
_LENGTH: Final = struct.Struct(">H")
MIN_RECORD_BYTES: Final = HEADER.size + 2 * _LENGTH.size
"""Size of the shortest record: a header and a body with an empty subject, id and payload."""
MAX_FOUND_RECORD_BYTES: Final = 1 << 24
"""Size of the longest record that :func:`find_record` finds after damaged bytes, which treats
longer records there as damaged too."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    subject: str
    msg_id: str
    """JetStream ``Nats-Msg-Id``, so that a replayed message is stored once."""
    payload: bytes

    @property
    def is_padding(self) -> bool:
        return not self.subject


def encode_record(record: SpoolRecord) -> bytes:
    subject = record.subject.encode()
    msg_id = record.msg_id.encode()
    body = b"".join(
        (_LENGTH.pack(len(subject)), subject, _LENGTH.pack(len(msg_id)), msg_id, record.payload)
    )
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def padding_record(size: int) -> bytes:
    """Encode a padding record of exactly ``size`` bytes (at least :data:`MIN_RECORD_BYTES`)."""
    if size < MIN_RECORD_BYTES:
        raise ValueError(f"padding of {size} bytes is shorter than a record")
    return encode_record(SpoolRecord("", "", bytes(size - MIN_RECORD_BYTES)))


def decode_record(data: bytes | memoryview, offset: int) -> tuple[SpoolRecord, int] | None:
    """Decode the record at ``offset`` and return it with its size, or None if it is not intact.

    None means a record cut short by the end of ``data``, a failed checksum, or lengths that do
    not fit in the body.
    """
    if offset + HEADER.size > len(data):
        return None
    length, crc = HEADER.unpack_from(data, offset)
    start = offset + HEADER.size
    if length < MIN_RECORD_BYTES - HEADER.size or start + length > len(data):
        return None
    (subject_length,) = _LENGTH.unpack_from(data, start)
    id_start = start + _LENGTH.size + subject_length
    if id_start + _LENGTH.size > start + length:
        return None
    (msg_id_length,) = _LENGTH.unpack_from(data, id_start)
    payload_start = id_start + _LENGTH.size + msg_id_length
    if payload_start > start + length:
        return None
    body = data[start : start + length]
    if zlib.crc32(body) != crc:
        return None
    try:
        subject = bytes(data[start + _LENGTH.size : id_start]).decode()
        msg_id = bytes(data[id_start + _LENGTH.size : payload_start]).decode()
    except UnicodeDecodeError:
        return None
    payload = bytes(data[payload_start : start + length])
    return SpoolRecord(subject, msg_id, payload), HEADER.size + length


def find_record(data: bytes, start: int) -> int | None:
    """Return the offset of the first intact record at or after ``start``, or None.

    Only offsets whose first byte is zero are tried, because that is the high byte of the
    length of any record shorter than :data:`MAX_FOUND_RECORD_BYTES`. ``bytes.find`` skips the
    others, so that a segment of random bytes is searched in well under a second.
    """
    view = memoryview(data)
    position = data.find(b"\x00", start)
    while position != -1:
        if decode_record(view, position) is not None:
            return position
        position = data.find(b"\x00", position + 1)
    return None

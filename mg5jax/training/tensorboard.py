"""TensorBoard scalars without TensorFlow or torch: `Event` protos written by hand into a TFRecord file.

A file holds records `length (uint64) · masked CRC-32C of length · Event bytes · masked CRC-32C of the
bytes`, all little-endian. The Events used here are the file-version header, scalar summaries
(`Summary.Value{tag, simple_value}`) and `SessionLog.START`, which makes TensorBoard hide the events
an earlier run wrote at or after its step (a resumed run). tensorboardX would do the same, but it
imports torch whenever torch is installed (+200 MiB in every training process).
"""

from __future__ import annotations

import pathlib
import socket
import struct
import time
from collections.abc import Mapping


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields: negatives as their two's complement
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string or message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, body: bytes) -> bytes:
    """`Event{wall_time = 1, step = 2, <body>}`."""
    return b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + body


class EventWriter:
    """Appends scalar events to a new `events.out.tfevents.*` file in `directory`. With `purge_step`,
    TensorBoard hides the events of earlier files at or after that step."""

    def __init__(self, directory: str | pathlib.Path, *, purge_step: int | None = None, suffix: str = ""):
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}{suffix}"
        self._file = open(self.path, "ab")
        self._write(_event(purge_step or 0, _field(3, b"brain.Event:2")))  # file_version
        if purge_step is not None:
            self._write(_event(purge_step, _field(7, b"\x08\x01")))  # session_log {status: START}

    def _write(self, event: bytes) -> None:
        length = struct.pack("<Q", len(event))
        self._file.write(length + _masked_crc(length) + event + _masked_crc(event))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event holding each `tag: value` as a float32 scalar at `step`."""
        summary = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                           for tag, value in values.items())
        self._write(_event(step, _field(5, summary)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

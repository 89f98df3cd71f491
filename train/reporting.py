"""Where a run's metrics rows go: ``metrics.jsonl`` always, and the ``[train] report_to``
writers: ``"csv"`` (``metrics.csv`` beside it) and ``"tensorboard"`` (event files under
``OUT/tensorboard/``, written offline by the small TFRecord / protobuf writer below, so that
no TensorBoard package is needed to train).

A TensorBoard event file is a sequence of TFRecords::

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

each ``data`` an ``Event`` protobuf: ``wall_time`` (field 1, double), ``step`` (2, int64),
``file_version`` (3, string, the first record) or ``summary`` (5) holding ``Summary.value``
(1) entries of ``tag`` (1, string) and ``simple_value`` (2, float).
"""
from __future__ import annotations

import csv
import json
import os
import socket
import struct
import time
from pathlib import Path

REPORTERS = ("csv", "tensorboard")


# -- CRC32C (Castagnoli), as TFRecord frames use it ------------------------------------------
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


# -- the protobuf fields an Event with scalars needs ------------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(step: int, values: dict, wall_time: float) -> bytes:
    """An Event holding one Summary with a simple_value per tag."""
    summary = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                       for tag, v in values.items())
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _bytes_field(5, summary)


def version_event(wall_time: float) -> bytes:
    return b"\x09" + struct.pack("<d", wall_time) + _bytes_field(3, b"brain.Event:2")


class TensorBoardWriter:
    """One event file under ``folder`` (a new one per run or resume, as TensorBoard's own)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.leantune"
        self.f = open(self.path, "ab")
        self.f.write(tfrecord(version_event(now)))
        self.f.flush()

    def record(self, rec: dict):
        values = {k: float(v) for k, v in rec.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.f.write(tfrecord(scalar_event(int(rec["step"]), values, time.time())))
        self.f.flush()

    def close(self):
        self.f.close()


class CsvWriter:
    """``metrics.csv``: a header of the union of the rows' keys, one row per logged step. A row
    with a key the header lacks (``eval_loss`` on its first eval) rewrites the file from
    ``metrics.jsonl``, which also rebuilds it on resume."""

    def __init__(self, path: Path, jsonl: Path):
        self.path, self.jsonl, self.header = path, jsonl, []
        self._rewrite()

    def _rewrite(self):
        rows = []
        if self.jsonl.is_file():
            rows = [json.loads(line) for line in self.jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.header = list(dict.fromkeys(k for row in rows for k in row))
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            if self.header:
                w = csv.DictWriter(f, self.header)
                w.writeheader()
                w.writerows(rows)

    def record(self, rec: dict):
        if not self.header or set(rec) - set(self.header):
            return self._rewrite()
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.header).writerow(rec)

    def close(self):
        pass


class MetricsSink:
    """``metrics.jsonl`` (appended) and the ``report_to`` writers; on ranks other than 0
    (``enabled`` False) it writes nothing."""

    def __init__(self, run_dir: Path, report_to=(), enabled: bool = True):
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8") if enabled else None
        self.writers = []
        if enabled and "csv" in report_to:
            self.writers.append(CsvWriter(run_dir / "metrics.csv", self.jsonl_path))
        if enabled and "tensorboard" in report_to:
            self.writers.append(TensorBoardWriter(run_dir / "tensorboard"))

    def record(self, rec: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for w in self.writers:
            w.record(rec)

    def close(self):
        for w in self.writers:
            w.close()
        if self.jsonl:
            self.jsonl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- reading event files back (the tests; a quick look without TensorBoard) -------------------
def read_tfrecords(path) -> list[bytes]:
    """The records of a TFRecord file, each frame's CRCs checked (ValueError when one fails)."""
    data, out, i = Path(path).read_bytes(), [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[i + 8:i + 12])[0] != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        body = data[i + 12:i + 12 + n]
        if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != masked_crc32c(body):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        out.append(body)
        i += 16 + n
    return out

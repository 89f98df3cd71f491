"""The base layer: user-facing errors with the contract's exit statuses, and small helpers.

Every other module may import this one; it imports nothing of leantune's.

Every mistake a user can make (a bad path, a malformed record, a wrong key) is raised as a
``LeantuneError`` subclass; the CLI prints ``leantune: error: WHERE: WHAT`` and exits with
the class's status, without a traceback (``--debug`` shows it).
"""
from __future__ import annotations

import hashlib

VERSION = "0.1.0"


# An error line ``leantune: error: WHERE: WHAT`` stays under 400 characters whatever a
# crafted file put in it: WHERE keeps MAX_WHERE characters, WHAT what is left of MAX_LINE.
MAX_WHERE = 160
MAX_LINE = 380


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class LeantuneError(Exception):
    """Base class: ``where`` is a file, file:line or config key; ``what`` one sentence.
    Both are cut (``...`` marks the cut) so that the line stays under 400 characters."""

    exit_code = 1

    def __init__(self, where: str, what: str):
        self.where = _cap(str(where), MAX_WHERE)
        self.what = _cap(str(what), max(MAX_LINE - len(self.where), 200))
        super().__init__(f"{self.where}: {self.what}" if self.where else self.what)


class UsageError(LeantuneError):
    """Bad command line or config (exit 2)."""

    exit_code = 2


class DataError(LeantuneError):
    """Bad training / eval data (exit 3)."""

    exit_code = 3


class ModelError(LeantuneError):
    """Bad model, checkpoint or adapter (exit 4)."""

    exit_code = 4


class GateError(LeantuneError):
    """An eval gate was not met (exit 5)."""

    exit_code = 5


def sha256_update(h, f) -> None:
    """Feed an open binary file into the hash ``h``, a MiB at a time."""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)


def file_sha256(path) -> str:
    """The hex sha256 of a file's bytes (the one hashing helper of provenance and caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        sha256_update(h, f)
    return h.hexdigest()

"""Errors in what the user gave (config, override, data path, input file, checkpoint).

The ``cmgen`` command prints such an error as one line, ``cmgen: error: <message>``, and exits 2; with
``cmgen --debug ...`` it shows the traceback instead. Library code raises the subclass that fits, so
callers can still catch the builtin it derives from (``ValueError``, ``FileNotFoundError``).
"""
from __future__ import annotations

__all__ = ["UserError", "DataError", "DataNotFoundError", "CheckpointError", "CollectiveError"]


class UserError(Exception):
    """Base of the errors the CLI reports as one line: the message names the file, key or value and
    what was expected."""


class DataError(UserError, ValueError):
    """A dataset root or annotation file that does not hold what the config asks for."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A file the data layout needs is missing (the message names it)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed or loaded: another method, an incompatible config, a file that
    is not a cmgen checkpoint, or a write that failed."""


class CollectiveError(RuntimeError):
    """A collective operation of a multi-process run failed on this rank: another rank hung past
    ``train.collective_timeout_s`` or died. Not the user's input, but reported the same way, as one line
    (on every rank that hit it: each says what it saw); the gloo/NCCL error is its ``__cause__``."""

"""What a rank says when a collective of a multi-process run fails, and agreeing on an outcome.

Every collective is bounded by ``train.collective_timeout_s`` (the process-group timeout). When a peer
hangs past it or dies, gloo raises a plain ``RuntimeError`` deep inside DDP or an all-reduce; the engine
turns it into :class:`cmgen.errors.CollectiveError`, one line naming this rank, the step, the backend's
words, the setting, and the ranks that had not started this rank's step (from :class:`StepBeacon`).
``--debug`` shows the original traceback (the error's ``__cause__``). Tested with gloo; under NCCL a hung
peer may instead be caught by NCCL's watchdog, which aborts the process itself (its own message).

:func:`agree` lets ranks decide together after work that may fail on some of them (a checkpoint write):
each contributes ``None`` or its reason, every rank gets the full list, so no rank is left waiting in
the next collective for one that gave up.
"""
from __future__ import annotations

import re
from typing import Any

import torch.distributed as dist

__all__ = ["is_collective_failure", "is_timeout", "collective_message", "StepBeacon", "agree"]

# How gloo and NCCL word a collective that a peer never completed, or a connection that a peer dropped.
_COLLECTIVE_FAILURE = re.compile(r"(?i)timed out|timeout|connection (closed|reset|refused)|broken pipe|"
                                 r"pair closure|closed by peer|ncclRemoteError")


def is_collective_failure(err: BaseException) -> bool:
    """``err`` (raised on one rank of a multi-process run) is a failed collective, not a bug of this rank:
    torch's distributed error types, or a RuntimeError in gloo/NCCL's words (gloo raises plain ones)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(err)))


def is_timeout(err: BaseException) -> bool:
    """A peer did not answer in time (it may be alive), as opposed to a dropped connection (it died)."""
    return re.search(r"(?i)timed out|timeout", str(err)) is not None


def collective_message(err: BaseException, timeout_s: float, rank: int, world: int, step: int | None,
                       behind: list[int] | None = None) -> str:
    """One line: this rank, the steps done, what happened, the backend's words, the setting to change.

    ``behind``: ranks that had not started the step this rank was in (:meth:`StepBeacon.behind`).
    """
    detail = " ".join(str(err).split())
    detail = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", detail)   # gloo's "[/__w/.../pair.cc:534] "
    detail = re.split(r"(?<=\.)\s", detail, maxsplit=1)[0]              # its first sentence ("... GLHF!" goes)
    detail = detail if detail.endswith((".", "!", "?")) else detail + "."
    if is_timeout(err):
        what = (f"another process did not take part in a collective operation within "
                f"train.collective_timeout_s={timeout_s:g} s (it hung, or is still busy)")
        advice = ("if a step, evaluation or checkpoint legitimately takes longer on one rank, raise "
                  "train.collective_timeout_s")
    else:
        what = (f"a collective operation failed: another process dropped its connection (it exited or was killed; "
                f"train.collective_timeout_s={timeout_s:g} s bounds the wait)")
        advice = "resume=latest continues from the last checkpoint"
    if behind:
        what += f"; rank(s) {', '.join(map(str, behind))} had not started this step"
    where = f"after {step} completed step(s)" if step is not None else "during setup"
    return (f"[rank {rank} of {world}] {where}: {what}; {type(err).__name__}: {detail} The other ranks' output "
            f"says what happened to them; {advice}")


class StepBeacon:
    """Each rank records the step it starts in the process group's key-value store (one small write per
    step, no collective), so a rank whose collective failed can name the ranks that fell behind.

    Best effort: without a store (one process, a launcher without one) or with the store gone, it says
    nothing. Asked only after a timeout: when a peer died, the store may have died with it (rank 0 hosts
    it under srun-style launches) and torch logs a C++ stack trace for every failed store request.
    """

    PREFIX = "cmgen/step/"

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.store, self.step = rank, world, None, None
        if world > 1 and dist.is_available() and dist.is_initialized():
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, AttributeError, ValueError):
                self.store = None

    def started(self, step: int) -> None:
        """This rank starts ``step`` (0-based)."""
        self.step = step
        if self.store is not None:
            try:
                self.store.set(f"{self.PREFIX}{self.rank}", str(step))
            except RuntimeError:   # the store is gone: the next collective reports it
                self.store = None

    def behind(self) -> list[int]:
        """Ranks whose last started step is before this rank's (or that never started one)."""
        if self.store is None or self.step is None:
            return []
        late = []
        try:
            for r in range(self.world):
                key = f"{self.PREFIX}{r}"
                if r == self.rank:
                    continue
                if not self.store.check([key]) or int(self.store.get(key)) < self.step:
                    late.append(r)
        except (RuntimeError, ValueError):
            return []
        return late


def agree(reason: str | None, world: int) -> list[str | None]:
    """Every rank's ``reason`` (None = success), in rank order, on every rank; ``[reason]`` in one process.

    An all-gather of small objects, so it is also the barrier after the work it judges.
    """
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [reason]
    reasons: list[Any] = [None] * world
    dist.all_gather_object(reasons, reason)
    return reasons

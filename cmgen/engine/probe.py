"""Per-step state dumps and fault injection, for multi-process tests; inert unless its variables are set.

The engine builds one :class:`StepProbe` per process (``StepProbe.from_env``); with neither variable
set it is ``None`` and costs nothing. The variables are read when ``train()`` starts, so a test sets
them in the environment of ``torchrun`` (inherited by every rank) or with ``monkeypatch.setenv``.

``CMGEN_TEST_DUMP_DIR=D``
    After every optimizer step, each process writes ``D/rank{r}/step_{s:06d}.pt`` (``torch.save``)::

        {"step": s, "rank": r, "world_size": W, "pid": os.getpid(), "backend": "gloo" | "nccl" | None,
         "losses": {term: float},                  # this rank's last micro-batch of the step
         "models": {name: state_dict},             # parameters AND buffers (MoCo queues, BN stats), CPU
         "extra": {name: state_dict}}              # method.extra_state() objects

    Meant for tiny test configs (every tensor of every model is written every step).

``CMGEN_TEST_FAULT=kind:rank:step``
    After optimizer step ``step`` (1-based count of finished steps, after its checkpoint if one is
    due) on global rank ``rank``, the probe writes the time to ``D/rank{r}/fault`` (or
    ``./fault-rank{r}`` without a dump directory), then ``kill`` sends SIGKILL to this process
    (``kill -9``) and ``hang`` sleeps, so this rank stops answering collectives while its process
    stays alive (the other ranks must then run into ``train.collective_timeout_s``). ``ckpt`` makes
    the checkpoint written after step ``step`` fail on rank ``rank`` as a full disk would: once the
    rank's files are in the temporary directory, an ``OSError`` (ENOSPC) is raised (marker written
    first, as above); every rank must then stop with the checkpoint error, none waits for the timeout.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["DUMP_ENV", "FAULT_ENV", "StepProbe"]

DUMP_ENV = "CMGEN_TEST_DUMP_DIR"
FAULT_ENV = "CMGEN_TEST_FAULT"
_KINDS = ("kill", "hang", "ckpt")


def _cpu(state: Any) -> Any:
    if torch.is_tensor(state):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu(v) for v in state)
    return state


class StepProbe:
    def __init__(self, rank: int, world_size: int, dump_dir: str | None, fault: str | None):
        self.rank, self.world_size = rank, world_size
        self.dump_dir = Path(dump_dir) / f"rank{rank}" if dump_dir else None
        self.fault = None
        if fault:
            parts = fault.split(":")
            if len(parts) != 3 or parts[0] not in _KINDS or not parts[1].isdigit() or not parts[2].isdigit():
                raise ValueError(f"{FAULT_ENV}={fault!r}: expected kind:rank:step with kind in {_KINDS}")
            self.fault = (parts[0], int(parts[1]), int(parts[2]))
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)

    def _due(self, kind: str, step: int) -> bool:
        return self.fault is not None and self.fault == (kind, self.rank, step)

    def _mark(self) -> None:
        marker = (self.dump_dir / "fault") if self.dump_dir is not None else Path(f"fault-rank{self.rank}")
        marker.write_text(f"{time.time()}\n")

    def checkpoint_fault(self, step: int) -> Callable[[Path], None] | None:
        """The ``fault`` hook of :func:`cmgen.engine.checkpoint.save_checkpoint` for the checkpoint of
        ``step`` on this rank (None when no ``ckpt`` fault is due)."""
        if not self._due("ckpt", step):
            return None

        def disk_full(tmp: Path) -> None:
            self._mark()
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: {FAULT_ENV})",
                          str(tmp / f"random_states_{self.rank}.pkl"))

        return disk_full

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> "StepProbe | None":
        dump, fault = os.environ.get(DUMP_ENV) or None, os.environ.get(FAULT_ENV) or None
        return cls(rank, world_size, dump, fault) if dump or fault else None

    def after_step(self, step: int, losses: dict[str, torch.Tensor], models: dict[str, torch.nn.Module],
                   extra: dict[str, Any]) -> None:
        """``models`` are the bare (unwrapped) modules; ``extra`` the method's ``extra_state()``."""
        if self.dump_dir is not None:
            backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
            record = {"step": step, "rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                      "backend": backend,
                      "losses": {k: float(v.detach().float().mean()) for k, v in losses.items()},
                      "models": {n: _cpu(m.state_dict()) for n, m in models.items()},
                      "extra": {n: _cpu(o.state_dict()) for n, o in extra.items()}}
            tmp = self.dump_dir / f".step_{step:06d}.pt"
            torch.save(record, tmp)
            os.replace(tmp, self.dump_dir / f"step_{step:06d}.pt")
        if self._due("kill", step) or self._due("hang", step):
            self._mark()
            if self.fault[0] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:
                time.sleep(3600)

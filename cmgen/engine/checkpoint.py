"""Atomic, complete checkpoints: ``checkpoints/step_NNNNNN/`` holds everything a resume needs.

Layout of one checkpoint (accelerate's ``save_state`` files plus ours)::

    pytorch_model.bin, pytorch_model_1.bin, ...   models, in the order of engine_state["models"]
    optimizer.bin, optimizer_1.bin, ...            optimizers, in the order of engine_state["optimizers"]
    custom_checkpoint_0.pkl, ...                   schedulers, EMAs, method state (engine_state["custom"])
    scaler.pt                                      fp16 grad scaler, when used
    random_states_<rank>.pkl                       python/numpy/torch(/cuda) RNG of EVERY process
    engine_state.json                              step, data position, names above, world size
    config.yaml                                    the resolved config of the run

It is written to ``checkpoints/.tmp-stepN`` and renamed into place once every process has finished,
so a crash mid-write leaves only a temporary directory that :func:`list_checkpoints` ignores and
:func:`clean_temporary` removes (``.tmp-*``; ``.old-*``, a checkpoint being replaced, goes back into
place). ``engine_state.json`` is written last: its presence marks a checkpoint complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from cmgen.errors import CheckpointError

__all__ = [
    "STATE_FILE",
    "checkpoint_dir_name",
    "list_checkpoints",
    "latest_checkpoint",
    "clean_temporary",
    "prune_checkpoints",
    "read_engine_state",
    "load_model_state",
    "load_ema_state",
    "save_checkpoint",
]

STATE_FILE = "engine_state.json"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def clean_temporary(root: str | Path) -> list[Path]:
    """Remove half-written ``.tmp-*`` directories left by a killed run; returns what was removed. A
    ``.old-stepN`` (a checkpoint being replaced by a rerun of its step) goes back to ``step_N`` if that
    is missing, else it is removed too."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.glob(".old-step*")):
        final = root / checkpoint_dir_name(int(p.name[len(".old-step"):])) if p.name[9:].isdigit() else None
        if final is not None and not final.exists() and (p / STATE_FILE).is_file():
            os.replace(p, final)
        else:
            removed.append(p)
    removed += [p for p in root.glob(".tmp-*") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def prune_checkpoints(root: str | Path, keep_last: int | None) -> None:
    if keep_last is None:
        return
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    from cmgen.engine.best import best_checkpoint_name

    best = best_checkpoint_name(root)  # checkpoints/best (eval-metric tracking) is kept on top of keep_last
    for _, p in [c for c in list_checkpoints(root) if c[1].name != best][:-keep_last]:
        shutil.rmtree(p)


def read_engine_state(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def _custom_index(state: dict, name: str, ckpt: Path) -> int:
    if name not in state["custom"]:
        raise ValueError(f"{ckpt} has no state named {name!r}; it has {state['custom']}")
    return state["custom"].index(name)


def load_model_state(ckpt: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of model ``name`` from a checkpoint, without Accelerate (for eval scripts)."""
    ckpt = Path(ckpt)
    state = read_engine_state(ckpt)
    if name not in state["models"]:
        raise ValueError(f"{ckpt} has no model named {name!r}; it has {state['models']}")
    i = state["models"].index(name)
    return torch.load(ckpt / ("pytorch_model.bin" if i == 0 else f"pytorch_model_{i}.bin"),
                      map_location="cpu", weights_only=True)


def load_ema_state(ckpt: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The averaged weights of model ``name`` (``ema.models`` in the config) from a checkpoint."""
    ckpt = Path(ckpt)
    i = _custom_index(read_engine_state(ckpt), f"ema/{name}", ckpt)
    return torch.load(ckpt / f"custom_checkpoint_{i}.pkl", map_location="cpu", weights_only=False)["module"]


def save_checkpoint(accelerator, root: str | Path, step: int, engine_state: dict, config_yaml: str,
                    keep_last: int | None, fault: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint of ``accelerator``'s registered state atomically; call on EVERY process.

    A failed write (disk full, read-only directory) on any process removes the temporary copy, leaves
    every complete checkpoint as it was (pruning runs only after success) and raises
    :class:`CheckpointError` on EVERY process, naming the directory, each failing rank's reason and the
    checkpoint a resume would use. The processes agree after each phase (one small all-gather,
    :func:`cmgen.engine.collective.agree`), so a rank whose write failed never leaves the others waiting
    in the next collective until ``train.collective_timeout_s``.

    ``fault``: tests only (``CMGEN_TEST_FAULT=ckpt:rank:step``, :mod:`cmgen.engine.probe`): called with
    the temporary directory on every process after its files are written; it raises to simulate a full disk.
    """
    from cmgen.engine.collective import agree

    root = Path(root)
    tmp, final = root / f".tmp-step{step}", root / checkpoint_dir_name(step)
    previous = latest_checkpoint(root)
    world, main = accelerator.num_processes, accelerator.is_main_process

    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"

    def phase(work: Callable[[], None], what: str, where: Path = tmp, kept: str = kept) -> None:
        reason, cause = None, None
        try:
            work()
        except (OSError, RuntimeError) as e:
            # Disk full, read-only or vanished directory (torch.save reports ENOSPC as a RuntimeError).
            reason, cause = " ".join(str(e).split()) or type(e).__name__, e
        failed = [(r, why) for r, why in enumerate(agree(reason, world)) if why is not None]
        if not failed:
            return
        if main:      # the half-written copy goes, every finished checkpoint stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
        why = "; ".join(f"rank {r}: {w}" if world > 1 else w for r, w in failed)
        raise CheckpointError(f"could not {what} the step-{step} checkpoint to {where}: {why}; {kept}") from cause

    def make_tmp() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_state() -> None:
        # Every process writes its own random_states_<rank>.pkl; the main process writes the rest.
        accelerator.save_state(str(tmp), safe_serialization=False)
        if fault is not None:
            fault(tmp)

    def finish() -> None:
        if not main:
            return
        (tmp / "config.yaml").write_text(config_yaml)
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(engine_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = root / f".old-step{step}"        # a checkpoint of this step already there (a rerun)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old.exists():
                os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)

    phase(make_tmp, "create")
    phase(write_state, "write")
    phase(finish, "write")
    phase(lambda: prune_checkpoints(root, keep_last) if main else None,
          "prune older checkpoints (train.keep_last) after writing", final, f"{final} is complete")
    return final

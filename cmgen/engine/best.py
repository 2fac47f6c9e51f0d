"""``checkpoints/best``: the checkpoint with the best value of one evaluation metric.

A method names the metric with a ``best_metric`` attribute, ``(key, "min" | "max")`` where ``key`` is
one of the names its ``evaluate`` returns (GAN methods: ``("fid", "min")`` or ``("shapes_fd", "min")``
when ``eval.fid_every > 0``), or None. When an evaluation improves on the best value so far, the engine
writes a checkpoint of that step (if it was not writing one anyway) and points

    checkpoints/best       -> step_NNNNNN   (a relative symlink, where the file system allows one)
    checkpoints/best.json     {"checkpoint": "step_NNNNNN", "step", "metric", "mode", "value"}

at it; :func:`cmgen.engine.checkpoint.prune_checkpoints` never removes that checkpoint. A resumed run
continues from the value in ``best.json``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["BEST_FILE", "BEST_LINK", "BestTracker", "best_checkpoint_name"]

BEST_FILE = "best.json"
BEST_LINK = "best"


def best_checkpoint_name(root: str | Path) -> str | None:
    """The directory name (``step_NNNNNN``) ``best.json`` under ``root`` points to, or None."""
    path = Path(root) / BEST_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["checkpoint"])
    except (ValueError, KeyError):
        return None


class BestTracker:
    """Decides whether an evaluation is a new best and records it (rank 0 writes)."""

    def __init__(self, root: Path, spec: tuple[str, str] | None):
        self.root = Path(root)
        self.key, self.mode, self.value = None, "min", None
        if spec is not None:
            key, mode = spec
            if mode not in ("min", "max"):
                raise ValueError(f"best_metric mode must be 'min' or 'max', got {mode!r}")
            self.key, self.mode = f"eval/{key}", mode
            path = self.root / BEST_FILE
            if path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("metric") == self.key:
                    self.value = float(saved["value"])

    def improved(self, metrics: dict[str, float]) -> bool:
        if self.key is None or self.key not in metrics:
            return False
        v = float(metrics[self.key])
        if not math.isfinite(v):
            return False
        return self.value is None or (v < self.value if self.mode == "min" else v > self.value)

    def mark(self, step: int, checkpoint: Path, metrics: dict[str, float], is_main_process: bool) -> None:
        self.value = float(metrics[self.key])
        if not is_main_process:
            return
        record = {"checkpoint": checkpoint.name, "step": step, "metric": self.key, "mode": self.mode,
                  "value": self.value}
        tmp = self.root / f".{BEST_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, self.root / BEST_FILE)
        link = self.root / BEST_LINK
        try:
            tmp_link = self.root / f".{BEST_LINK}.tmp"
            if tmp_link.is_symlink() or tmp_link.exists():
                tmp_link.unlink()
            tmp_link.symlink_to(checkpoint.name, target_is_directory=True)
            os.replace(tmp_link, link)
        except OSError:  # no symlinks here (some Windows / network file systems): best.json alone says it
            pass

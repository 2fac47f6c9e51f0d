"""Optimizers and learning-rate schedules built from :mod:`cmgen.config` sections."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from cmgen.config import OptimConfig, ScheduleConfig

__all__ = ["LRMultiplier", "build_optimizer", "build_scheduler"]


class LRMultiplier:
    """LR multiplier at optimizer step ``t`` (0-based): linear warm-up, then constant/cosine/step.

    - warm-up (Goyal et al. 2017): ``(t + 1) / warmup_steps`` for ``t < warmup_steps``;
    - cosine (SGDR, Loshchilov & Hutter 2017, Eq. 5 without restarts):
      ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``p = (t - warmup) / (max_steps - warmup)`` clipped
      to 1 and ``r = min_lr_ratio``;
    - step: ``gamma ** (number of milestones <= t)``.

    A plain class rather than a closure so that ``LambdaLR.state_dict()`` saves its fields.
    """

    def __init__(self, kind: str, max_steps: int, warmup_steps: int = 0, milestones: Iterable[int] = (),
                 gamma: float = 0.1, min_lr_ratio: float = 0.0):
        if kind not in ("constant", "cosine", "step"):
            raise ValueError(f"schedule kind must be constant, cosine or step, got {kind!r}")
        if warmup_steps < 0 or max_steps <= 0:
            raise ValueError(f"need warmup_steps >= 0 and max_steps > 0, got {warmup_steps}, {max_steps}")
        self.kind, self.max_steps, self.warmup_steps = kind, int(max_steps), int(warmup_steps)
        self.milestones, self.gamma, self.min_lr_ratio = sorted(int(m) for m in milestones), float(gamma), float(min_lr_ratio)

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            p = min(1.0, (t - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "step":
            return self.gamma ** sum(t >= m for m in self.milestones)
        raise ValueError(f"unknown schedule kind {self.kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int) -> LambdaLR:
    """A ``LambdaLR`` that the engine steps once per training step (not per optimizer update)."""
    return LambdaLR(optimizer, LRMultiplier(cfg.kind, max_steps, cfg.warmup_steps, cfg.milestones,
                                            cfg.gamma, cfg.min_lr_ratio))


def build_optimizer(cfg: OptimConfig, params, lr: float | None = None) -> torch.optim.Optimizer:
    """``adam`` / ``adamw`` / ``sgd`` over ``params`` with the section's hyperparameters."""
    lr = cfg.lr if lr is None else lr
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer name must be adam, adamw or sgd, got {cfg.name!r}")

"""What a resume may change: the config given now against the one saved in the checkpoint.

``resume=latest`` (or a checkpoint path) with other overrides than the interrupted run is common
(``train.max_steps=200`` to train longer, ``optim.lr=...``). Each changed key is one of:

- **ignored**: it holds no state (logging, checkpoint and evaluation intervals, workers, devices,
  ``run.output_dir``, ``data.root`` for data that moved): it simply takes effect;
- **applied**: optimizer hyperparameters (every ``OptimConfig`` field but ``name``), the whole
  ``schedule`` section, ``train.max_steps`` and ``ema.decay``/``ema.start_step``. The checkpoint stores
  the old values inside the optimizer and scheduler state, so after loading it the engine puts back the
  values the new config builds: from step N on the run is the run the new config describes (a cosine
  over the new ``max_steps``, evaluated at step N, not the old schedule that ends at the old
  ``max_steps`` and leaves the rest at lr 0);
- **refused**: everything else (``method``, ``model.*``, ``data.*``, ``run.seed``, the batch size,
  accumulation, precision, data order, ``optim.name``, ``ema.models``): the checkpoint's state was built
  with the old value and cannot continue under the new one; the error lists each key with both values.

The run's ``config.yaml`` is then the config in effect, with a comment saying from which step.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from cmgen.config import EMAConfig, OptimConfig, ScheduleConfig

__all__ = ["Change", "classify_changes", "describe", "HyperSnapshot"]

_IGNORED = {
    "run.output_dir", "run.name", "train.progress_bar", "train.trackers", "train.log_every",
    "train.checkpoint_every", "train.keep_last", "train.sample_every", "train.eval_every", "train.num_workers",
    "train.collective_timeout_s", "train.pin_memory", "train.cpu", "train.find_unused_parameters",
    "train.compile", "train.compile_backend", "train.compile_mode", "train.tf32", "train.channels_last",
    "train.grad_clip", "data.root", "data.generate",
}
_APPLIED = {"train.max_steps", "ema.decay", "ema.start_step"}


@dataclass
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _sections(cfg: Any, prefix: str = "") -> dict[str, type]:
    """Dotted section name -> dataclass type, for every nested section of ``cfg``."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[prefix + f.name] = type(value)
            out.update(_sections(value, f"{prefix}{f.name}."))
    return out


def classify_changes(saved: dict, cfg: Any) -> tuple[list[Change], list[Change], list[Change], list[str]]:
    """``(ignored, applied, refused, unknown)`` changes from the checkpoint's config dict ``saved`` to the
    dataclass ``cfg``; ``unknown`` lists keys of ``saved`` this config no longer has (an older config)."""
    from cmgen.config import to_dict

    old, new = _flat(saved), _flat(to_dict(cfg))
    sections = _sections(cfg)
    ignored, applied, refused = [], [], []
    for key in sorted(set(old) & set(new) - {"run.resume"}):
        if old[key] == new[key] or (isinstance(new[key], float) and isinstance(old[key], (int, float))
                                    and float(old[key]) == new[key]):
            continue
        change = Change(key, old[key], new[key])
        section = sections.get(key.rpartition(".")[0])
        if key in _IGNORED:
            ignored.append(change)
        elif key in _APPLIED or (section is not None and issubclass(section, ScheduleConfig)) or (
                section is not None and issubclass(section, OptimConfig) and not key.endswith(".name")):
            applied.append(change)
        else:
            refused.append(change)
    # keys on one side only: a section that was null on the other (optim_g: null -> {...}) is a refused
    # change; a key the current config no longer has is reported as unknown (a config of an older cmgen)
    unknown, seen = [], set()
    for key in sorted(set(old) ^ set(new)):
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        here, there = (old, new) if key in old else (new, old)
        holder = next((q for q in prefixes if q in there), None)
        if holder is not None:
            if holder not in seen:
                seen.add(holder)
                refused.append(Change(holder, old.get(holder, "{...}"), new.get(holder, "{...}")))
        elif key in old and not any(q in new for q in prefixes + [key]):
            unknown.append(key)
    return ignored, applied, refused, unknown


def describe(changes: list[Change]) -> str:
    return ", ".join(str(c) for c in changes)


class HyperSnapshot:
    """Optimizer hyperparameters, schedule multipliers and EMA settings as the new config built them,
    taken before the checkpoint is loaded and put back after it (the **applied** changes above)."""

    def __init__(self, optimizers: dict, schedulers: dict, emas: dict):
        self.groups = {n: [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in o.param_groups]
                       for n, o in optimizers.items()}
        self.schedules = {n: ([dict(vars(f)) for f in s.lr_lambdas], list(s.base_lrs)) for n, s in schedulers.items()}
        self.emas = {n: (e.decay, e.start_step) for n, e in emas.items()}

    def restore(self, optimizers: dict, schedulers: dict, emas: dict) -> None:
        for n, opt in optimizers.items():
            for group, fresh in zip(opt.param_groups, self.groups[n]):
                group.update(fresh)
        for n, s in schedulers.items():
            lambdas, base_lrs = self.schedules[n]
            for f, state in zip(s.lr_lambdas, lambdas):
                vars(f).update(state)
            s.base_lrs = base_lrs
            # the lr of step `last_epoch` under the new schedule (what LambdaLR.get_lr computes)
            for group, base, f in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["lr"] = base * f(s.last_epoch)
            s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
        for n, e in emas.items():
            e.decay, e.start_step = self.emas[n]

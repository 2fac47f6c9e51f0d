"""Engine overhead: time per training step of ``cmgen.engine.train`` vs a bare PyTorch loop.

Same model (an MLP classifier), same in-memory data, same batch, Adam, one process, one intra-op
thread. Both loops are timed between the starts of consecutive forward passes, over windows of
``--window`` steps (the first window is warm-up), so everything the engine adds per step counts: data
seeding, device transfer, accumulation context, NaN guard, log reduction, LR schedule, trackers.
Start-up and the final checkpoint do not. Runs alternate between the loops so that machine load
affects both alike. The primary number is process CPU time per step, which a busy shared machine
disturbs far less than wall-clock time; wall-clock is reported too. Target: ratio <= 1.05.

    python bench/engine.py [--steps 200] [--window 20] [--repeats 3] [--hidden 512] [--batch 256]

Writes bench/results/engine.md and bench/results/engine.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cmgen.config import ExperimentConfig, apply_overrides
from cmgen.engine import Method, train


@dataclass
class BenchModelConfig:
    in_dim: int = 512
    hidden: int = 1024
    classes: int = 10
    num_samples: int = 8192


@dataclass
class BenchConfig(ExperimentConfig):
    method: str = "bench"
    model: BenchModelConfig = field(default_factory=BenchModelConfig)


class Blobs(Dataset):
    """Gaussian class blobs, fixed by a seed; ``(x (in_dim,), label)``."""

    def __init__(self, n: int, dim: int, classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(classes, (n,), generator=g)
        self.x = torch.randn(classes, dim, generator=g)[self.y] + torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def make_model(m: BenchModelConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(m.in_dim, m.hidden), nn.ReLU(), nn.Linear(m.hidden, m.hidden), nn.ReLU(),
                         nn.Linear(m.hidden, m.classes))


STAMPS: list[tuple[float, float]] = []  # (process time, wall time) at the start of every step


def stamp() -> None:
    STAMPS.append((time.process_time(), time.perf_counter()))


def windows(stamps: list[tuple[float, float]], window: int) -> tuple[list[float], list[float]]:
    """Per-step (cpu, wall) seconds in each full window after the first."""
    cpu, wall = [], []
    for i in range(window, len(stamps) - window, window):
        cpu.append((stamps[i + window][0] - stamps[i][0]) / window)
        wall.append((stamps[i + window][1] - stamps[i][1]) / window)
    return cpu, wall


class BenchMethod(Method):
    config_class = BenchConfig

    def build_models(self, cfg):
        return {"net": make_model(cfg.model)}

    def build_dataset(self, cfg):
        m = cfg.model
        return Blobs(m.num_samples, m.in_dim, m.classes)

    def train_step(self, batch, step, ctx):
        stamp()
        x, y = batch
        loss = F.cross_entropy(ctx.models["net"](x), y)
        ctx.backward(loss)
        ctx.step("net")
        return {"loss": loss}


def engine_windows(cfg: BenchConfig) -> tuple[list[float], list[float]]:
    STAMPS.clear()
    train(cfg, BenchMethod)
    return windows(list(STAMPS), cfg.train.log_every)


def bare_windows(cfg: BenchConfig) -> tuple[list[float], list[float]]:
    """The loop a researcher would write by hand, with a loss read-out at the same logging interval."""
    STAMPS.clear()
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    model = make_model(m)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    data = Blobs(m.num_samples, m.in_dim, m.classes)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    step = 0
    while step < cfg.train.max_steps:
        for x, y in loader:
            stamp()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.train.log_every == 0:
                loss.item()
            if step >= cfg.train.max_steps:
                break
    stamp()
    return windows(list(STAMPS), cfg.train.log_every)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    eng, bare, eng_wall, bare_wall = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = apply_overrides(BenchConfig(), [
                f"run.output_dir={tmp}", f"run.name=bench{r}", f"train.max_steps={args.steps}",
                f"train.log_every={args.window}", "train.checkpoint_every=0", "train.keep_last=1",
                f"train.batch_size={args.batch}", f"model.hidden={args.hidden}", "train.progress_bar=false"])
            cpu, wall = bare_windows(cfg)
            bare, bare_wall = bare + cpu, bare_wall + wall
            cpu, wall = engine_windows(cfg)
            eng, eng_wall = eng + cpu, eng_wall + wall
    t_eng, t_bare = statistics.median(eng), statistics.median(bare)
    w_eng, w_bare = statistics.median(eng_wall), statistics.median(bare_wall)
    ratio = t_eng / t_bare
    machine = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
               "processor": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    res = {"cpu_ms_per_step_engine": 1e3 * t_eng, "cpu_ms_per_step_bare": 1e3 * t_bare, "cpu_ratio": ratio,
           "wall_ms_per_step_engine": 1e3 * w_eng, "wall_ms_per_step_bare": 1e3 * w_bare,
           "wall_ratio": w_eng / w_bare, "windows": {"engine": len(eng), "bare": len(bare)},
           "config": vars(args) | {"out": str(args.out)}, "machine": machine}
    table = "\n".join([
        "# Engine overhead (1 process, 1 thread, trackers: tensorboard, NaN guard on)",
        "",
        f"MLP {args.hidden} hidden, batch {args.batch}, Adam; {len(eng)} windows of {args.window} steps each; "
        f"{machine['processor']}, {os.cpu_count()} cores, {machine['cpu_threads']} torch thread, torch {machine['torch']}, "
        f"{machine['cuda'] or 'CPU'}.",
        "",
        "| loop | CPU ms/step (median) | wall ms/step (median) |",
        "|---|---:|---:|",
        f"| bare PyTorch | {1e3 * t_bare:.2f} | {1e3 * w_bare:.2f} |",
        f"| cmgen engine | {1e3 * t_eng:.2f} | {1e3 * w_eng:.2f} |",
        f"| ratio engine / bare (target <= 1.05) | {ratio:.3f} | {w_eng / w_bare:.3f} |",
        "",
    ])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.md").write_text(table)
    (args.out / "engine.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Engine overhead: time per training step of ``cmgen.engine.train`` vs a bare PyTorch loop.

Same model (an MLP classifier), same in-memory data, same batch, Adam, one process. The engine's step
time is read from its own ``metrics.jsonl`` (``steps_per_sec`` per logging window, checkpoint and
start-up excluded); the bare loop is timed over windows of the same length. Windows alternate between
the two so that machine load affects both alike; the table reports medians. Target: ratio <= 1.05.

    python bench/engine.py [--steps 300] [--window 50] [--repeats 3] [--hidden 1024] [--batch 256]

Writes bench/results/engine.md and bench/results/engine.json.
"""
from __future__ import annotations

import argparse
import json
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


class BenchMethod(Method):
    config_class = BenchConfig

    def build_models(self, cfg):
        return {"net": make_model(cfg.model)}

    def build_dataset(self, cfg):
        m = cfg.model
        return Blobs(m.num_samples, m.in_dim, m.classes)

    def train_step(self, batch, step, ctx):
        x, y = batch
        loss = F.cross_entropy(ctx.models["net"](x), y)
        ctx.backward(loss)
        ctx.step("net")
        return {"loss": loss}


def engine_windows(cfg: BenchConfig) -> list[float]:
    """Seconds per step in each logging window after the first (warm-up)."""
    result = train(cfg, BenchMethod)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [1.0 / r["steps_per_sec"] for r in records if "steps_per_sec" in r][1:]


def bare_windows(cfg: BenchConfig) -> list[float]:
    """The loop a researcher would write by hand, timed per window of ``log_every`` steps."""
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    model = make_model(m)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    data = Blobs(m.num_samples, m.in_dim, m.classes)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    windows, step, t0 = [], 0, time.perf_counter()
    while step < cfg.train.max_steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.train.log_every == 0:
                loss.item()  # the engine syncs for its logs too
                now = time.perf_counter()
                windows.append((now - t0) / cfg.train.log_every)
                t0 = now
            if step >= cfg.train.max_steps:
                break
    return windows[1:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    eng, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = apply_overrides(BenchConfig(), [
                f"run.output_dir={tmp}", f"run.name=bench{r}", f"train.max_steps={args.steps}",
                f"train.log_every={args.window}", "train.checkpoint_every=0", "train.keep_last=1",
                f"train.batch_size={args.batch}", f"model.hidden={args.hidden}", "train.progress_bar=false"])
            bare += bare_windows(cfg)
            eng += engine_windows(cfg)
    t_eng, t_bare = statistics.median(eng), statistics.median(bare)
    ratio = t_eng / t_bare
    machine = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
               "processor": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    res = {"ms_per_step_engine": 1e3 * t_eng, "ms_per_step_bare": 1e3 * t_bare, "ratio": ratio,
           "ms_per_step_engine_min": 1e3 * min(eng), "ms_per_step_bare_min": 1e3 * min(bare),
           "ratio_of_minima": min(eng) / min(bare), "windows": {"engine": len(eng), "bare": len(bare)},
           "config": vars(args) | {"out": str(args.out)}, "machine": machine}
    table = "\n".join([
        "# Engine overhead (1 process, trackers: tensorboard, NaN guard on)",
        "",
        f"MLP {args.hidden} hidden, batch {args.batch}, Adam; {len(eng)} windows of {args.window} steps each; "
        f"{machine['processor']}, {machine['cpu_threads']} threads, torch {machine['torch']}, "
        f"{machine['cuda'] or 'CPU'}.",
        "",
        "| loop | median ms/step | min ms/step |",
        "|---|---:|---:|",
        f"| bare PyTorch | {1e3 * t_bare:.2f} | {1e3 * min(bare):.2f} |",
        f"| cmgen engine | {1e3 * t_eng:.2f} | {1e3 * min(eng):.2f} |",
        f"| ratio (target <= 1.05) | {ratio:.3f} | {min(eng) / min(bare):.3f} |",
        "",
    ])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.md").write_text(table)
    (args.out / "engine.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

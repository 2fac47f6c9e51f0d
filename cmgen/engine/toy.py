"""A tiny, deterministic method that exercises every engine feature (tests, benchmarks, examples).

Regression ``y = tanh(x W1) W2`` on a synthetic dataset. Two models and two optimizer updates per
micro-batch, in the order a GAN uses them:

1. ``head`` update on detached features (like D on ``G(z).detach()``),
2. ``enc`` update through the frozen head (like G through a frozen D).

``head`` carries a MoCo-style queue buffer (``queue``, ``ages``, ``ptr``) of recent global-batch
predictions that enters ``loss_head``, so a resume is only exact if buffers are restored; ``stats`` is
method state outside any module (``extra_state``). ``data.aug_noise`` draws per-sample noise in
``__getitem__`` (seeded per sample by the engine) and ``model.input_noise`` draws per-process noise in
``train_step`` from the global RNG (restored from the checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cmgen.config import ExperimentConfig
from cmgen.distributed import gather_no_grad
from cmgen.engine.method import Method, StepContext

__all__ = ["ToyModelConfig", "ToyDataConfig", "ToyConfig", "SyntheticRegression", "ToyMethod"]


@dataclass
class ToyModelConfig:
    in_dim: int = 8
    hidden: int = 32
    out_dim: int = 4
    queue_size: int = 16
    queue_weight: float = 0.01
    input_noise: float = 0.0


@dataclass
class ToyDataConfig:
    num_samples: int = 256
    aug_noise: float = 0.05
    seed: int = 1234


@dataclass
class ToyConfig(ExperimentConfig):
    method: str = "toy"
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)


class SyntheticRegression(Dataset):
    """``num_samples`` pairs ``x ~ N(0, I)``, ``y = tanh(x W1) W2``; the function (W1, W2) is fixed by
    ``seed``, and ``held_out=True`` draws other inputs x of the same function (for evaluation).

    Returns ``{"x": (in_dim,), "y": (out_dim,)}``; ``aug_noise`` adds Gaussian noise to ``x`` from the
    global torch RNG, like a random augmentation.
    """

    def __init__(self, num_samples: int, in_dim: int, out_dim: int, aug_noise: float = 0.0, seed: int = 0,
                 held_out: bool = False):
        g = torch.Generator().manual_seed(seed)
        w1, w2 = torch.randn(in_dim, 16, generator=g), torch.randn(16, out_dim, generator=g) / 4
        gx = torch.Generator().manual_seed(seed + 1) if held_out else g
        self.x = torch.randn(num_samples, in_dim, generator=gx)
        self.y = torch.tanh(self.x @ w1) @ w2
        self.aug_noise = aug_noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        if self.aug_noise:
            x = x + self.aug_noise * torch.randn(x.shape)
        return {"x": x, "y": self.y[i]}


class Encoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, hidden)
        return self.net(x)


class Head(nn.Module):
    def __init__(self, hidden: int, out_dim: int, queue_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden, out_dim)
        self.register_buffer("queue", torch.zeros(queue_size, out_dim))
        self.register_buffer("ages", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, hidden) -> (B, out_dim)
        return self.fc(h)

    @torch.no_grad()
    def enqueue(self, v: torch.Tensor) -> None:
        """Store one vector (out_dim,); every stored entry ages by one step."""
        self.ages += 1
        i = int(self.ptr)
        self.queue[i] = v
        self.ages[i] = 0
        self.ptr.fill_((i + 1) % self.queue.shape[0])


class _Stats:
    """Method state outside any module: micro-batches and (global) samples seen."""

    def __init__(self):
        self.micro_batches, self.samples = 0, 0

    def state_dict(self) -> dict:
        return {"micro_batches": self.micro_batches, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches, self.samples = int(state["micro_batches"]), int(state["samples"])


class ToyMethod(Method):
    config_class = ToyConfig

    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        self.stats = _Stats()

    def build_models(self, cfg: ToyConfig) -> dict[str, nn.Module]:
        m = cfg.model
        return {"enc": Encoder(m.in_dim, m.hidden), "head": Head(m.hidden, m.out_dim, m.queue_size)}

    def build_dataset(self, cfg: ToyConfig) -> Dataset:
        return SyntheticRegression(cfg.data.num_samples, cfg.model.in_dim, cfg.model.out_dim,
                                   cfg.data.aug_noise, cfg.data.seed)

    def extra_state(self) -> dict:
        return {"stats": self.stats}

    def train_step(self, batch, step: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        m = self.cfg.model
        x, y = batch["x"], batch["y"]                                   # (B, in_dim), (B, out_dim)
        if m.input_noise:
            x = x + m.input_noise * torch.randn_like(x)
        enc, head = ctx.models["enc"], ctx.models["head"]
        raw_head = ctx.unwrap("head")
        h = enc(x)                                                       # (B, hidden)

        # 1) head on detached features; the queue term is per sample, so its mean over the global
        #    batch (what DDP's gradient average gives) equals the single-process loss.
        pred = head(h.detach())
        centre = raw_head.queue.mean(0)
        loss_head = F.mse_loss(pred, y) + m.queue_weight * (pred - centre).pow(2).sum(1).mean()
        ctx.backward(loss_head)
        ctx.step("head")

        # 2) encoder through the frozen head.
        with ctx.frozen("head"):
            loss_enc = F.mse_loss(raw_head(h), y)
        ctx.backward(loss_enc)
        ctx.step("enc")

        raw_head.enqueue(gather_no_grad(pred.detach()).mean(0))
        self.stats.micro_batches += 1
        self.stats.samples += x.shape[0] * ctx.world_size
        return {"loss_head": loss_head, "loss_enc": loss_enc}

    @torch.no_grad()
    def sample(self, ctx: StepContext) -> torch.Tensor:
        """Feature maps of 16 fixed inputs as (16, 1, 4, hidden // 4) images."""
        enc = ctx.ema.get("enc", ctx.unwrap("enc"))
        x = torch.linspace(-2, 2, 16 * self.cfg.model.in_dim, device=ctx.device).view(16, -1)
        h = torch.sigmoid(enc(x))
        return h.view(16, 1, 4, -1)

    @torch.no_grad()
    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        m = self.cfg.model
        data = SyntheticRegression(64, m.in_dim, m.out_dim, 0.0, self.cfg.data.seed, held_out=True)
        x, y = data.x.to(ctx.device), data.y.to(ctx.device)
        pred = ctx.unwrap("head")(ctx.unwrap("enc")(x))
        return {"val_mse": float(F.mse_loss(pred, y))}

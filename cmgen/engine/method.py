"""What a method gives the engine, and what the engine gives a method's step.

A method is a small class; the engine owns everything else (devices, DDP, mixed precision,
accumulation, clipping, schedules, EMA, checkpoints, logging). Models never see Accelerate.

A GAN-style step (``n_dis`` D updates, then one G update) reads::

    def train_step(self, batch, step, ctx):
        g, d = ctx.models["g"], ctx.models["d"]
        for _ in range(self.cfg.model.n_dis):
            fake = g(z).detach()                      # no graph into G
            d_loss = hinge_d(d(batch), d(fake))
            ctx.backward(d_loss)
            ctx.step("d")                             # clip, step, zero_grad
        with ctx.frozen("d"):                         # G's loss must not leave gradients in D
            g_loss = -ctx.unwrap("d")(g(z)).mean()
        ctx.backward(g_loss)
        ctx.step("g")
        return {"d_loss": d_loss, "g_loss": g_loss}

Under DDP a wrapped model whose forward builds a graph must see a backward through it before its
next forward; calling a frozen model through ``ctx.unwrap`` keeps its DDP wrapper out of the G step.

With ``train.grad_accum = k > 1`` the engine calls ``train_step`` on k micro-batches per step and
``ctx.step`` updates only on the last one, so every update of a step sees the models as they were
before the step's earlier updates on micro-batches 1..k-1. That is exact for one optimizer; for
sequential D-then-G updates it is an approximation (GAN recipes usually keep ``grad_accum = 1``).
"""
from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cmgen.config import ExperimentConfig
from cmgen.engine.schedules import build_optimizer

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["Method", "StepContext"]


class Method(abc.ABC):
    """Base class of a trainable method. ``config_class`` is its typed config dataclass."""

    config_class: type[ExperimentConfig] = ExperimentConfig

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def build_models(self, cfg) -> dict[str, nn.Module]:
        """The models by name (``{"g": ..., "d": ...}``), on CPU; the engine places them."""

    def build_optimizers(self, cfg, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """Default: one optimizer per model that has trainable parameters, all from ``cfg.optim``."""
        return {name: build_optimizer(cfg.optim, [p for p in m.parameters() if p.requires_grad])
                for name, m in models.items() if any(p.requires_grad for p in m.parameters())}

    @abc.abstractmethod
    def build_dataset(self, cfg) -> torch.utils.data.Dataset:
        """The map-style training dataset; the engine makes the seeded, resumable loader."""

    def collate_fn(self):
        """A custom collate function for the DataLoader, or None for PyTorch's default."""
        return None

    @abc.abstractmethod
    def train_step(self, batch: Any, step: int, ctx: "StepContext") -> dict[str, torch.Tensor]:
        """One micro-batch of training step ``step`` (0-based). Returns the loss terms to log and guard."""

    def extra_state(self) -> dict[str, Any]:
        """Objects with ``state_dict``/``load_state_dict`` saved in every checkpoint (not nn.Module
        buffers, which travel with their model). Names must be stable across runs."""
        return {}

    def sample(self, ctx: "StepContext") -> torch.Tensor | None:
        """Images ``(N, C, H, W)`` in [0, 1] for a grid, or None. Runs on every process, under no_grad,
        with the training RNG saved and restored around it."""
        return None

    def evaluate(self, ctx: "StepContext") -> dict[str, float]:
        """Scalar metrics; runs on every process (gather inside if needed), RNG preserved."""
        return {}


class StepContext:
    """The engine-facing handle a method's ``train_step`` receives.

    - ``models`` / ``optimizers``: the prepared (device-placed, maybe DDP-wrapped) objects by name;
    - ``ema``: name -> averaged ``nn.Module`` for the models listed in ``cfg.ema.models``;
    - ``backward(loss)``: mixed-precision scaling and division by ``grad_accum``;
    - ``step(name)``: on the last micro-batch of a step, unscale + clip + optimizer step + zero_grad
      (a no-op on earlier micro-batches, where gradients keep accumulating); with fp16, an update the
      grad scaler skips (inf/NaN gradients) is counted in ``amp_skipped[name]`` (logged, checkpointed);
    - ``frozen(*names)``, ``unwrap(name)``, ``autocast()``.
    """

    def __init__(self, accelerator: "Accelerator", cfg, models: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], ema: dict[str, nn.Module]):
        self.accelerator, self.cfg = accelerator, cfg
        self.models, self.optimizers, self.ema = models, optimizers, ema
        self.step_index = 0
        self.grad_norms: dict[str, torch.Tensor] = {}
        # fp16: optimizer updates the grad scaler skipped (inf/NaN gradients), per optimizer, over the run
        self.amp_skipped: dict[str, int] = {}
        self._params = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizers.items()}
        from accelerate.utils import DistributedType
        self._plain_ddp = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                           DistributedType.MULTI_GPU)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def grad_accum(self) -> int:
        return self.accelerator.gradient_accumulation_steps

    @property
    def sync_gradients(self) -> bool:
        """True on the last micro-batch of a step, when ``step(name)`` really updates."""
        return self.accelerator.sync_gradients

    def unwrap(self, name: str) -> nn.Module:
        """The bare model (no DDP/compile wrapper), sharing parameters with ``models[name]``."""
        return self.accelerator.unwrap_model(self.models[name])

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        self.accelerator.backward(loss, **kwargs)

    def step(self, name: str) -> None:
        if name not in self.optimizers:
            raise KeyError(f"no optimizer named {name!r}; have {list(self.optimizers)}")
        if not self.accelerator.sync_gradients:
            return
        opt, clip = self.optimizers[name], self.cfg.train.grad_clip
        if clip is not None:
            # Unscale only this optimizer: the others may hold accumulated, still-scaled gradients.
            self.accelerator.unscale_gradients(optimizer=opt)
            self.grad_norms[name] = torch.nn.utils.clip_grad_norm_(self._params[name], clip).detach()
        if self._plain_ddp:
            # AcceleratedOptimizer.step probes the file system for optional packages on every call
            # (~0.4 ms); for plain DDP/single-process it only forwards to the optimizer or the scaler.
            raw, scaler = opt.optimizer, self.accelerator.scaler
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(raw)   # skips raw.step() when the unscaled gradients hold inf/NaN
                scaler.update()    # ... and then lowers the scale: that is how a skip shows
                if scaler.get_scale() < scale:
                    self.amp_skipped[name] = self.amp_skipped.get(name, 0) + 1
            else:
                raw.step()
            raw.zero_grad(set_to_none=True)
        else:
            opt.step()
            if getattr(opt, "step_was_skipped", False):
                self.amp_skipped[name] = self.amp_skipped.get(name, 0) + 1
            opt.zero_grad(set_to_none=True)

    def zero_grad(self, name: str) -> None:
        """Drop the gradients of optimizer ``name`` now (also mid-accumulation)."""
        for p in self._params[name]:
            p.grad = None

    @contextlib.contextmanager
    def frozen(self, *names: str):
        """Turn off ``requires_grad`` of the named models' parameters inside the block (GAN G step)."""
        saved = []
        for name in names:
            for p in self.unwrap(name).parameters():
                saved.append((p, p.requires_grad))
                p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    def autocast(self):
        """Mixed-precision autocast for code outside the prepared models' forward."""
        return self.accelerator.autocast()

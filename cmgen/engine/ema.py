"""Exponential moving average of a model's weights (Polyak averaging; GAN generators, momentum nets)."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow copy ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after each training step.

    Until ``start_step`` completed steps the shadow copies the weights exactly (BigGAN/StudioGAN's
    ``ema_start``), so early, poor weights do not linger.

    Buffers (BN running statistics, spectral-norm vectors, queues): ``buffers="average"`` (default)
    averages every floating-point buffer with the same decay and copies ``num_batches_tracked`` and
    other integer buffers, as StudioGAN's ``Ema.update`` (``src/utils/ema.py`` at commit
    947b35e9835b67860fdce44d337f6d7fee7c8db3: ``b.lerp(b_ema, decay)`` for every buffer whose name
    does not contain ``num_batches_tracked``); ``buffers="copy"`` copies every buffer (StudioGAN's
    ``EmaStylegan2``, same file). In a config: ``ema.buffers: average | copy``
    (:class:`cmgen.config.EMAConfig`; default ``average``, StudioGAN's for its GANs; a resume refuses a
    changed value). ``module`` is the averaged model, in eval mode and without gradients;
    ``state_dict()`` holds it, so it survives a resume.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start_step: int = 0, buffers: str = "average"):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        if buffers not in ("average", "copy"):
            raise ValueError(f"EMA buffers must be 'average' or 'copy', got {buffers!r}")
        self.decay, self.start_step, self.buffers = float(decay), int(start_step), buffers
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in ``model`` after ``step`` completed training steps."""
        ema_p = list(self.module.parameters())
        cur_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(cur_p):
            raise ValueError(f"EMA holds {len(ema_p)} parameters, the model has {len(cur_p)}")
        copy = step <= self.start_step
        if copy:
            torch._foreach_copy_(ema_p, cur_p)
        else:
            # lerp(ema, cur, 1 - decay) = decay * ema + (1 - decay) * cur
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - self.decay)
        ema_b, cur_b = list(self.module.named_buffers()), list(model.named_buffers())
        if len(ema_b) != len(cur_b):
            raise ValueError(f"EMA holds {len(ema_b)} buffers, the model has {len(cur_b)}")
        for (name, b_ema), (_, b) in zip(ema_b, cur_b):
            if (copy or self.buffers == "copy" or not b_ema.is_floating_point()
                    or "num_batches_tracked" in name):
                b_ema.copy_(b)
            else:
                b_ema.lerp_(b.detach(), 1.0 - self.decay)

    def to(self, device) -> "EMA":
        self.module.to(device)
        return self

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "start_step": self.start_step,
                "buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.decay, self.start_step = float(state["decay"]), int(state["start_step"])
        self.buffers = state.get("buffers", self.buffers)

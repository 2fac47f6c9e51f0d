"""The shared skeleton of the GAN methods (ContraGAN, ContraD, XMC-GAN): config pieces, hinge losses,
the ``n_dis`` D-steps-then-one-G-step loop, and sample grids from the EMA generator.

A variant subclasses :class:`GANMethod` and changes only what differs: its models
(``build_models``), its data (``build_dataset`` / ``real_batch``), how D and G are called
(``discriminate`` / ``generate``) and which terms join the adversarial hinge losses (``d_loss`` /
``g_loss``, each returning named terms that are summed). ContraGAN, for example, only adds ``lambda * 2C``
to each side.

Hinge loss (Lim & Ye 2017; Miyato et al. 2018, Eq. 16-17 of SAGAN):

    L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]        L_G = -E[D(G(z))]
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cmgen.config import ExperimentConfig, OptimConfig
from cmgen.engine.method import Method, StepContext
from cmgen.engine.schedules import build_optimizer

__all__ = ["hinge_d_loss", "hinge_g_loss", "GANSettings", "GANConfig", "GANMethod"]


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean relu(1 - D(x)) + mean relu(1 + D(G(z)))``; logits ``(N,)`` and ``(M,)`` -> scalar."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``-mean D(G(z))``; logits ``(M,)`` -> scalar."""
    return -fake_logits.mean()


@dataclass
class GANSettings:
    """The adversarial schedule shared by every GAN variant.

    ``n_dis``: D updates per G update (StudioGAN ``d_updates_per_step``).
    ``d_batches``: where each D update's real images come from. ``"split"`` (default) cuts the loaded
    per-process batch into ``n_dis`` disjoint slices, one per D update, as StudioGAN draws a fresh real
    batch for each D update, so ``train.batch_size`` is ``n_dis`` times the per-update batch;
    ``"repeat"`` shows the whole batch to every D update. G and every D update see as many fakes as a
    D update sees reals.
    ``d_optim``: D's optimizer section; None uses ``optim`` for both G and D.
    ``samples_per_class`` x classes (or ``num_samples`` for unconditional/text variants) images in the
    grid, from fixed noise drawn with ``sample_seed``.
    """

    n_dis: int = 5
    d_batches: Literal["split", "repeat"] = "split"
    d_optim: Optional[OptimConfig] = None
    samples_per_class: int = 8
    sample_seed: int = 0


@dataclass
class GANConfig(ExperimentConfig):
    gan: GANSettings = field(default_factory=GANSettings)


class GANMethod(Method):
    """Base of the GAN methods: models ``"g"`` (generator) and ``"d"`` (discriminator).

    Subclasses implement ``build_models``, ``build_dataset`` and :meth:`sample_latents`; they may
    override :meth:`real_batch`, :meth:`generate`, :meth:`discriminate`, :meth:`d_loss`,
    :meth:`g_loss` and :meth:`sample_inputs`.
    """

    config_class = GANConfig

    def __init__(self, cfg: GANConfig):
        super().__init__(cfg)
        s = cfg.gan
        if s.n_dis < 1:
            raise ValueError(f"gan.n_dis must be >= 1, got {s.n_dis}")
        if s.samples_per_class < 1:
            raise ValueError(f"gan.samples_per_class must be >= 1, got {s.samples_per_class}")
        if cfg.train.grad_accum != 1:
            raise ValueError(f"GAN methods need train.grad_accum = 1 (sequential D and G updates), "
                             f"got {cfg.train.grad_accum}")
        self._fixed: Any = None

    # --- what a variant defines -----------------------------------------------------------------
    def build_optimizers(self, cfg: GANConfig, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        d_cfg = cfg.gan.d_optim if cfg.gan.d_optim is not None else cfg.optim
        return {"g": build_optimizer(cfg.optim, models["g"].parameters()),
                "d": build_optimizer(d_cfg, models["d"].parameters())}

    def real_batch(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """``(images (B, 3, H, W), condition)`` from a loader batch; default: an ``(images, labels)`` pair."""
        images, cond = batch
        return images, cond

    @abc.abstractmethod
    def sample_latents(self, n: int, device: torch.device, generator: torch.Generator | None = None):
        """``(z, condition)`` for ``n`` fakes: noise and the labels / captions they are conditioned on."""

    def generate(self, g: nn.Module, z: torch.Tensor, cond: Any) -> torch.Tensor:
        return g(z, cond)

    def discriminate(self, d: nn.Module, images: torch.Tensor, cond: Any) -> Any:
        """D's output for ``images``; must carry ``.logits`` (B,)."""
        return d(images, cond)

    def d_loss(self, out_real: Any, out_fake: Any, cond_real: Any, cond_fake: Any) -> dict[str, torch.Tensor]:
        """Named D loss terms, summed into ``d_loss``."""
        return {"d_adv": hinge_d_loss(out_real.logits, out_fake.logits)}

    def g_loss(self, out_fake: Any, cond_fake: Any) -> dict[str, torch.Tensor]:
        """Named G loss terms, summed into ``g_loss``."""
        return {"g_adv": hinge_g_loss(out_fake.logits)}

    # --- the shared loop ------------------------------------------------------------------------
    def _concat(self, a: Any, b: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return torch.cat([a, b])
        raise TypeError(f"cannot concatenate conditions of type {type(a).__name__}; override _concat")

    def _split(self, out: Any, n: int) -> tuple[Any, Any]:
        """Split a D output over ``cat([real, fake])`` back into the real and the fake part."""
        return type(out)(*(t[:n] for t in out)), type(out)(*(t[n:] for t in out))

    def train_step(self, batch: Any, step: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.cfg.gan
        if ctx.grad_accum != 1:
            raise ValueError(f"GAN methods need grad_accum = 1, got {ctx.grad_accum}")
        images, cond = self.real_batch(batch)
        b = images.shape[0]
        if s.d_batches == "split":
            if b % s.n_dis:
                raise ValueError(f"gan.d_batches='split' needs the per-process batch ({b}) divisible by "
                                 f"gan.n_dis ({s.n_dis})")
            per = b // s.n_dis
            chunks = [(images[i * per:(i + 1) * per], cond[i * per:(i + 1) * per]) for i in range(s.n_dis)]
        elif s.d_batches == "repeat":
            per, chunks = b, [(images, cond)] * s.n_dis
        else:
            raise ValueError(f"gan.d_batches must be 'split' or 'repeat', got {s.d_batches!r}")
        g, d, raw_g = ctx.models["g"], ctx.models["d"], ctx.unwrap("g")

        for real, cond_real in chunks:
            with torch.no_grad():
                z, cond_fake = self.sample_latents(per, ctx.device)
                fake = self.generate(raw_g, z, cond_fake)
            # D has no batch statistics, so one forward over [real; fake] equals two forwards (and under DDP
            # keeps one forward per backward).
            out = self.discriminate(d, torch.cat([real, fake]), self._concat(cond_real, cond_fake))
            out_real, out_fake = self._split(out, real.shape[0])
            d_terms = self.d_loss(out_real, out_fake, cond_real, cond_fake)
            d_total = torch.stack(list(d_terms.values())).sum()
            ctx.backward(d_total)
            ctx.step("d")

        z, cond_fake = self.sample_latents(per, ctx.device)
        fake = self.generate(g, z, cond_fake)
        with ctx.frozen("d"):
            g_terms = self.g_loss(self.discriminate(ctx.unwrap("d"), fake, cond_fake), cond_fake)
            g_total = torch.stack(list(g_terms.values())).sum()
        ctx.backward(g_total)
        ctx.step("g")
        return {"d_loss": d_total.detach(), "g_loss": g_total.detach(),
                **{k: v.detach() for k, v in {**d_terms, **g_terms}.items()}}

    # --- samples --------------------------------------------------------------------------------
    def sample_inputs(self, device: torch.device):
        """Fixed ``(z, condition)`` of the sample grid, drawn once from ``gan.sample_seed``."""
        if self._fixed is None:
            gen = torch.Generator().manual_seed(self.cfg.gan.sample_seed)
            self._fixed = self.sample_latents(self.num_grid_samples(), torch.device("cpu"), gen)
        z, cond = self._fixed
        return z.to(device), cond.to(device) if isinstance(cond, torch.Tensor) else cond

    def num_grid_samples(self) -> int:
        return self.cfg.gan.samples_per_class

    @torch.no_grad()
    def sample(self, ctx: StepContext) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] from the EMA generator (the live G if no EMA is configured)."""
        g = ctx.ema.get("g", ctx.unwrap("g"))
        z, cond = self.sample_inputs(ctx.device)
        was_training = g.training
        g.eval()
        images = self.generate(g, z, cond)
        g.train(was_training)
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

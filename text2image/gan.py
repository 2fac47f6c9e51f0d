"""The shared skeleton of the GAN methods (ContraGAN, ContraD, XMC-GAN): config pieces, hinge losses,
the D-updates-then-G-update loop, and sample grids from the EMA generator.

One training step (``GANMethod.train_step``) is the generic algorithm box::

    split the loaded reals into n_dis chunks (gan.d_batches)
    for each chunk except, with gan.g_step = "joint", the last:          # D-only updates
        s = GANStep(real, cond_real);  s.z, s.cond_fake = sample_latents(n, cond_real=cond_real)
        s.fake = generate(G, s.z, s.cond_fake)    without a graph, G's BN statistics frozen
        s.out_real, s.out_fake = d_forward(D, s)  one D forward (default: D(cat[real, fake]))
        D <- D - grad(sum d_loss(s))
    G update on the last chunk's reals:
        s.fake = generate(G, ...) with a graph
        "separate": s.out_real, s.out_fake = g_forward(D frozen, s)          (default: out_real None)
                    G <- G - grad(sum g_loss(s))
        "joint"   : s.out_real, s.out_fake = d_forward(D, s)  (ONE forward, fakes attached to G)
                    D <- D - grad_D(sum d_loss(s));  G <- G - grad_G(sum g_loss(s))
                    (two backward passes restricted to each model's parameters: G terms never reach D,
                    D terms never reach G; XMC-GAN ``train_g_d``)

Hooks a variant overrides (everything else is the base's):

- ``build_models`` / ``build_dataset`` (from :class:`cmgen.engine.Method`);
- ``real_batch(batch) -> (images, cond_real)``;
- ``sample_latents(n, device, generator=None, cond_real=None) -> (z, cond_fake)``: noise and the
  conditions of ``n`` fakes. Class-conditional variants draw labels and ignore ``cond_real``;
  text-conditional ones return the real batch's captions (``cond_real``) so fakes and reals share them;
  ``cond_real`` is None when the sample grid draws its fixed inputs;
- ``generate(g, z, cond) -> images`` and ``discriminate(d, images, cond) -> D output``;
- ``d_forward(d, s) -> (out_real, out_fake)``: D's outputs for one D (or joint) update, from one forward
  (ContraD: ``D(aug(cat[x, x, fake]))``, ``out_real`` holding both views);
- ``g_forward(d, s) -> (out_real or None, out_fake)``: D's outputs in a separate G update, D frozen
  (XMC-GAN: also D(real), for the image-image term);
- ``d_loss(s)`` / ``g_loss(s) -> {name: scalar}``: named terms, summed and logged. ``s`` is a
  :class:`GANStep` carrying ``step, phase ("d" | "g" | "joint"), real, cond_real, z, cond_fake, fake,
  out_real, out_fake, ctx`` and a free ``extras`` dict for what a variant's forward hook wants its
  losses to see;
- ``concat_conditions(a, b)`` / ``split_output(out, n)`` for conditions / D outputs that are not a
  tensor / a NamedTuple of batch-first tensors;
- ``to_unit(images)``: map G's output range to [0, 1] for grids (``output_range`` class attribute).

ContraGAN, for example, only adds ``lambda * 2C`` to each side's losses.

Hinge loss (Lim & Ye 2017; Miyato et al. 2018, Eq. 16-17 of SAGAN):

    L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]        L_G = -E[D(G(z))]
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cmgen.config import ExperimentConfig, OptimConfig
from cmgen.engine.method import Method, StepContext
from cmgen.engine.schedules import build_optimizer

__all__ = ["hinge_d_loss", "hinge_g_loss", "bn_statistics_frozen", "GANSettings", "GANConfig", "GANStep",
           "GANMethod"]


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean relu(1 - D(x)) + mean relu(1 + D(G(z)))``; logits ``(N,)`` and ``(M,)`` -> scalar."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``-mean D(G(z))``; logits ``(M,)`` -> scalar."""
    return -fake_logits.mean()


@contextlib.contextmanager
def bn_statistics_frozen(module: nn.Module):
    """BatchNorm layers of ``module`` normalise with batch statistics but leave their running statistics
    (and ``num_batches_tracked``) alone inside the block: StudioGAN ``utils/misc.py``
    ``untrack_bn_statistics`` / ``track_bn_statistics`` around G's forward in ``train_discriminator``."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


@dataclass
class GANSettings:
    """The adversarial schedule shared by every GAN variant.

    ``n_dis``: D updates per G update (StudioGAN ``d_updates_per_step``, XMC-GAN ``d_step_per_g_step``).
    ``d_batches``: where each D update's real images come from. ``"split"`` (default) cuts the loaded
    per-process batch into ``n_dis`` disjoint slices, one per D update, as StudioGAN draws a fresh real
    batch for each D update, so ``train.batch_size`` is ``n_dis`` times the per-update batch;
    ``"repeat"`` shows the whole batch to every D update. G and every D update see as many fakes as a
    D update sees reals; the G update sees the last slice's reals and conditions.
    ``g_step``: ``"separate"`` (StudioGAN, ContraD: G's update after the D updates, with D frozen) or
    ``"joint"`` (XMC-GAN ``train_g_d``: the last of the ``n_dis`` D updates and the G update come from
    one forward of G and D).
    ``track_g_bn_in_d_steps``: let G's BatchNorm running statistics move while the D updates generate
    fakes; False = StudioGAN's ``untrack_bn_statistics`` (only G's own update moves them).
    ``d_optim``: D's optimizer section; None uses ``optim`` for both G and D.
    ``samples_per_class`` x classes (or ``num_samples`` for unconditional/text variants) images in the
    grid, from fixed noise drawn with ``sample_seed``.
    """

    n_dis: int = 5
    d_batches: Literal["split", "repeat"] = "split"
    g_step: Literal["separate", "joint"] = "separate"
    track_g_bn_in_d_steps: bool = False
    d_optim: Optional[OptimConfig] = None
    samples_per_class: int = 8
    sample_seed: int = 0


# --- FID during training (evaluation.training_fid; H-eval) ---------------------------------------
@dataclass
class GANEvalSettings:
    """FID of the G-EMA during training, run by :meth:`GANMethod.evaluate`.

    ``fid_every``: steps between FIDs (0 = off); FID runs at the engine's evaluation steps, so
    ``train.eval_every`` must divide it. ``fid_samples`` generated images in batches of ``batch_size``,
    from the fixed ``seed``. ``extractor``: ``"shapes"`` (offline shapes classifier against the run's
    shapes data, logged as ``eval/shapes_fd``, NOT comparable with published FID) or ``"inception"`` (the
    FID Inception-v3 from ``inception_weights`` or ``$CMGEN_INCEPTION_WEIGHTS`` against ``real``, an image
    folder or statistics .npz; ``eval/fid``). ``real`` for shapes: a shapes data root (default: the run's).
    The lowest value is tracked as ``checkpoints/best`` (:mod:`cmgen.engine.best`).
    """

    fid_every: int = 0
    fid_samples: int = 1000
    batch_size: int = 100
    extractor: Literal["shapes", "inception"] = "shapes"
    inception_weights: Optional[str] = None
    real: Optional[str] = None
    seed: int = 0


@dataclass
class GANConfig(ExperimentConfig):
    gan: GANSettings = field(default_factory=GANSettings)
    eval: GANEvalSettings = field(default_factory=GANEvalSettings)

    # `gan.d_optim.lr=...` on a config without a d_optim section starts D's optimizer as a copy of `optim`
    # (what D uses while d_optim is None), so a TTUR override changes only what it names.
    OPTIONAL_SECTION_SEEDS: ClassVar[dict[str, str]] = {"gan.d_optim": "optim"}


@dataclass
class GANStep:
    """What one D / G / joint update sees, filled in as it runs (see the module docstring).

    ``phase``: ``"d"`` (D-only update), ``"g"`` (separate G update) or ``"joint"``. ``real`` (B, 3, H, W)
    and ``cond_real`` are this update's reals; ``z``, ``cond_fake`` and ``fake`` its fakes (``fake`` carries
    a graph into G in the ``"g"`` and ``"joint"`` phases); ``out_real`` / ``out_fake`` D's outputs;
    ``ctx`` the engine's :class:`cmgen.engine.StepContext` (world size, device); ``extras`` free room for
    a variant's hooks.
    """

    step: int
    phase: Literal["d", "g", "joint"]
    real: torch.Tensor
    cond_real: Any
    z: Any = None
    cond_fake: Any = None
    fake: Optional[torch.Tensor] = None
    out_real: Any = None
    out_fake: Any = None
    ctx: Optional[StepContext] = None
    extras: dict = field(default_factory=dict)


def _total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(terms.values())).sum()


class GANMethod(Method):
    """Base of the GAN methods: models ``"g"`` (generator) and ``"d"`` (discriminator); hooks in the
    module docstring."""

    config_class = GANConfig
    output_range: tuple[float, float] = (-1.0, 1.0)   # G's image range, mapped to [0, 1] for grids

    def __init__(self, cfg: GANConfig):
        super().__init__(cfg)
        s = cfg.gan
        if s.n_dis < 1:
            raise ValueError(f"gan.n_dis must be >= 1, got {s.n_dis}")
        if s.samples_per_class < 1:
            raise ValueError(f"gan.samples_per_class must be >= 1, got {s.samples_per_class}")
        if s.d_batches not in ("split", "repeat"):
            raise ValueError(f"gan.d_batches must be 'split' or 'repeat', got {s.d_batches!r}")
        if s.g_step not in ("separate", "joint"):
            raise ValueError(f"gan.g_step must be 'separate' or 'joint', got {s.g_step!r}")
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
    def sample_latents(self, n: int, device: torch.device, generator: torch.Generator | None = None,
                       cond_real: Any = None):
        """``(z, cond_fake)`` for ``n`` fakes: noise and the labels / captions they are conditioned on.
        ``cond_real`` (the real batch's conditions, None for the sample grid) is there for variants whose
        fakes take the reals' conditions."""

    def generate(self, g: nn.Module, z: torch.Tensor, cond: Any) -> torch.Tensor:
        return g(z, cond)

    def discriminate(self, d: nn.Module, images: torch.Tensor, cond: Any) -> Any:
        """D's output for ``images``; the default losses read ``.logits`` (B,)."""
        return d(images, cond)

    def d_forward(self, d: nn.Module, s: GANStep) -> tuple[Any, Any]:
        """D's outputs on reals and fakes of a D / joint update. Default: one forward over
        ``cat[real, fake]`` (D has no batch statistics, so this equals two forwards, and under DDP keeps
        one forward per backward)."""
        out = self.discriminate(d, torch.cat([s.real, s.fake]), self.concat_conditions(s.cond_real, s.cond_fake))
        return self.split_output(out, s.real.shape[0])

    def g_forward(self, d: nn.Module, s: GANStep) -> tuple[Any, Any]:
        """D's outputs in a separate G update (D frozen); default ``(None, D(fake))``."""
        return None, self.discriminate(d, s.fake, s.cond_fake)

    def d_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """Named D loss terms, summed into ``d_loss``."""
        return {"d_adv": hinge_d_loss(s.out_real.logits, s.out_fake.logits)}

    def g_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """Named G loss terms, summed into ``g_loss``."""
        return {"g_adv": hinge_g_loss(s.out_fake.logits)}

    def concat_conditions(self, a: Any, b: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return torch.cat([a, b])
        raise TypeError(f"cannot concatenate conditions of type {type(a).__name__}; override concat_conditions")

    def split_output(self, out: Any, n: int) -> tuple[Any, Any]:
        """Split a D output over ``cat([real, fake])`` back into the real and the fake part."""
        return type(out)(*(t[:n] for t in out)), type(out)(*(t[n:] for t in out))

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """G's output mapped from ``output_range`` to [0, 1], clamped."""
        lo, hi = self.output_range
        return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)

    # --- the shared loop ------------------------------------------------------------------------
    def d_chunks(self, images: torch.Tensor, cond: Any) -> list[tuple[torch.Tensor, Any]]:
        """The reals of each of the ``n_dis`` D updates (``gan.d_batches``)."""
        s, b = self.cfg.gan, images.shape[0]
        if s.d_batches == "repeat":
            return [(images, cond)] * s.n_dis
        if b % s.n_dis:
            raise ValueError(f"gan.d_batches='split' needs the per-process batch ({b}) divisible by "
                             f"gan.n_dis ({s.n_dis})")
        per = b // s.n_dis
        return [(images[i * per:(i + 1) * per], None if cond is None else cond[i * per:(i + 1) * per])
                for i in range(s.n_dis)]

    def new_step(self, step: int, phase: str, real: torch.Tensor, cond_real: Any, ctx: StepContext) -> GANStep:
        """A :class:`GANStep` with this update's reals and freshly drawn ``z``, ``cond_fake``."""
        s = GANStep(step=step, phase=phase, real=real, cond_real=cond_real, ctx=ctx)
        s.z, s.cond_fake = self.sample_latents(real.shape[0], ctx.device, cond_real=cond_real)
        return s

    def train_step(self, batch: Any, step: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg.gan
        if ctx.grad_accum != 1:
            raise ValueError(f"GAN methods need grad_accum = 1, got {ctx.grad_accum}")
        chunks = self.d_chunks(*self.real_batch(batch))
        joint = cfg.g_step == "joint"
        g, d, raw_g = ctx.models["g"], ctx.models["d"], ctx.unwrap("g")
        d_terms: dict[str, torch.Tensor] = {}

        for real, cond_real in chunks[:-1] if joint else chunks:            # D-only updates
            s = self.new_step(step, "d", real, cond_real, ctx)
            bn = contextlib.nullcontext() if cfg.track_g_bn_in_d_steps else bn_statistics_frozen(raw_g)
            with torch.no_grad(), bn:
                s.fake = self.generate(raw_g, s.z, s.cond_fake)
            s.out_real, s.out_fake = self.d_forward(d, s)
            d_terms = self.d_loss(s)
            ctx.backward(_total(d_terms))
            ctx.step("d")

        s = self.new_step(step, "joint" if joint else "g", *chunks[-1], ctx)
        s.fake = self.generate(g, s.z, s.cond_fake)
        if joint:
            s.out_real, s.out_fake = self.d_forward(d, s)
            d_terms, g_terms = self.d_loss(s), self.g_loss(s)
            d_params = [p for p in ctx.unwrap("d").parameters() if p.requires_grad]
            g_params = [p for p in raw_g.parameters() if p.requires_grad]
            ctx.backward(_total(d_terms), inputs=d_params, retain_graph=True)
            ctx.backward(_total(g_terms), inputs=g_params)
            ctx.step("d")
        else:
            with ctx.frozen("d"):
                s.out_real, s.out_fake = self.g_forward(ctx.unwrap("d"), s)
                g_terms = self.g_loss(s)
            ctx.backward(_total(g_terms))
        ctx.step("g")
        return {"d_loss": _total(d_terms).detach(), "g_loss": _total(g_terms).detach(),
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

    # --- FID during training (evaluation.training_fid; H-eval) -----------------------------------
    @property
    def best_metric(self) -> tuple[str, str] | None:
        """``(metric, "min")`` the engine tracks as ``checkpoints/best`` when ``eval.fid_every > 0``."""
        from evaluation.training_fid import check_settings, metric_name

        check_settings(self.cfg)
        return (metric_name(self.cfg), "min") if self.cfg.eval.fid_every else None

    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        """FID (or the shapes Fréchet distance) of the G-EMA every ``eval.fid_every`` steps."""
        every = self.cfg.eval.fid_every
        if not every or (ctx.step_index + 1) % every:
            return {}
        from evaluation.training_fid import fid_during_training

        return fid_during_training(self, ctx)

    @torch.no_grad()
    def sample(self, ctx: StepContext) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] from the EMA generator (the live G if no EMA is configured)."""
        g = ctx.ema.get("g", ctx.unwrap("g"))
        z, cond = self.sample_inputs(ctx.device)
        was_training = g.training
        g.eval()
        images = self.generate(g, z, cond)
        g.train(was_training)
        return self.to_unit(images)

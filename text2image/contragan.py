"""ContraGAN (Kang & Park, NeurIPS 2020): a BigGAN whose discriminator is conditioned by the 2C loss.

Transcribed from PyTorch-StudioGAN at commit 947b35e9835b67860fdce44d337f6d7fee7c8db3 (HEAD):
``src/models/big_resnet.py`` (layouts, blocks, D heads), ``src/worker.py`` (``train_discriminator`` /
``train_generator``), ``src/utils/losses.py`` (``ConditionalContrastiveLoss``, ``GatherLayer``),
``src/utils/ops.py`` (``init_weights``), ``src/utils/misc.py`` (``untrack_bn_statistics``),
``src/utils/ema.py`` and ``src/config.py`` (defaults), ``src/configs/*/ContraGAN*.yaml``.

D maps an image to pooled features h = sum_{H,W} ReLU(last map), an adversarial logit ``linear1(h)``
and an embedding ``e = linear2(h)``; the class-embedding table gives each label's proxy ``p_y``
(``d_cond_mtd == "2C"``). Both are normalised inside :class:`cmgen.losses.TwoC`
(``normalize_d_embed``).

Objective (paper Algorithm 1 / Eq. 8, as ``worker.py`` applies it):

    L_D = hinge(D(x), D(G(z, y'))) + lambda * 2C(e(x), p_y, y)              (real images, real labels)
    L_G = -mean D(G(z, y'))        + lambda * 2C(e(G(z, y')), p_y', y')     (fakes, their sampled labels)

The proxies get gradients only from D's loss: they are D parameters, frozen in the G step.

ADC (``model.aux_cls_type = "ADC"``; StudioGAN ``ContraGAN-ADC.yaml``, after Hou et al.'s ADC-GAN): the
proxy table has 2K rows, a real image of class y uses row 2y and a fake one row 2y + 1, and

    L_D += lambda * 2C(e(G(z, y')), p_{2y'+1}, y')        L_G += -lambda * 2C(e(G(z, y')), p_{2y'+1}, y')

(G's own 2C term uses the real-class rows 2y'), so D learns to tell "fake y" from "real y" and G is pushed
away from what D calls fake of its class (``worker.py`` ``adc_fake_cond_loss``).

Backbones (``model.backbone``, StudioGAN ``MODEL.backbone``): ``"big_resnet"`` (this module; every
StudioGAN ContraGAN config) or ``"deep_conv"`` (StudioGAN's DCGAN, :mod:`text2image.deep_conv`, 32 px:
one-hot cBN G, conv D; ``model.sn_d=false`` gives its BatchNorm D). Both share the heads of
:class:`ConditionalDiscriminator` and the sampling of :class:`ClassConditionalGenerator`.

Baselines of the same network (``model.d_cond_mtd``, StudioGAN's name): ``"PD"`` is BigGAN's projection
discriminator, ``logit = linear1(h) + <embedding(y), h>`` with an SN class embedding of D's width
(big_resnet.py ``d_cond_mtd == "PD"``; StudioGAN's BigGAN configs), and no 2C term; ``"W/O"`` is an
unconditional D (logit = ``linear1(h)``, no 2C term), which leaves G's class input untrained.

Faithfulness details, each behind an option where the paper and the code differ:

- Layouts: :data:`G_LAYOUT` / :data:`D_LAYOUT` give each block's in/out channel multipliers (and D's
  downsampling) exactly as ``g_in_dims_collection`` / ``g_out_dims_collection`` /
  ``d_in_dims_collection`` / ``d_out_dims_collection`` / ``d_down`` of big_resnet.py, for 32/64/128 px.
- Hierarchical z: ``z`` is split into ``num_blocks + 1`` chunks; the first feeds ``linear0``, chunk
  ``i + 1`` joins the shared class embedding as block ``i``'s cBN condition.
- Init: orthogonal for every conv / linear / embedding (``g_init = d_init = "ortho"``), ``model.init``.
- G's BatchNorm statistics do not move while D's updates draw fakes (``untrack_bn_statistics``;
  :class:`text2image.gan.GANSettings` ``track_g_bn_in_d_steps``).
- EMA of G: parameters and buffers averaged, ``num_batches_tracked`` copied (``utils/ema.py``;
  :class:`cmgen.engine.EMA` ``buffers="average"``), ``g_ema_start`` as ``ema.start_step``.
- Sampling with spectral norm: StudioGAN samples with G in eval mode but every conv / linear /
  embedding in train mode (``utils/misc.py`` ``prepare_generator`` -> ``set_deterministic_op_trainable``),
  so each sampling forward runs one power iteration on the (EMA) weights. Here ``Generator.eval()``
  runs :data:`EVAL_POWER_ITERATIONS` power iterations once (:func:`refresh_spectral_norm`) and eval
  forwards then leave ``u``, ``v`` alone: the converged sigma StudioGAN's evaluations reach, without
  samples that depend on how many batches came before. Without either, the averaged ``u``, ``v``
  underestimate sigma (0.59-0.89 of it after 500 shapes steps) and the EMA samples saturate.
- Multi-process 2C: StudioGAN gathers embeddings with ``GatherLayer``, whose backward returns only
  this rank's slice, and DDP then averages the parameter gradients over the W processes, so its 2C
  gradient is 1/W of the exact global-batch gradient. ``model.two_c_grad = "exact"`` (default) is
  the exact global loss (``TwoC(gather_distributed=True)``); ``"studiogan"`` keeps that value and
  scales the 2C gradient by 1/W, reproducing StudioGAN's effective lambda / W.
- DiffAugment (``model.diffaug``; StudioGAN ``AUG.apply_diffaug: True`` with ``diffaug_type: "diffaug"``,
  ``src/configs/CIFAR10/ContraGAN-DiffAug.yaml``): ``worker.py`` ``train_discriminator`` runs
  ``series_augment`` (``utils/diffaug.py`` ``apply_diffaug``, policy "color,translation,cutout", on
  images in [-1, 1], no clamp) once on the reals and once on the fakes before D, and
  ``train_generator`` once on the fakes before D; so every D input of both updates is augmented, with
  its own random draws, and the 2C terms see the augmented images' embeddings. Here
  :class:`text2image.augment.DiffAugment` in G's output range (``model.diffaug_policy``).
- Temperature: constant ``t`` (every StudioGAN config: 1.0), or the paper-era tempering
  (``model.temperature_schedule = "discrete" | "continuous"`` with ``end_temperature`` and
  ``tempering_step``; StudioGAN ``trainer.py`` at 239c1708cf6f80ed5a15b4f997fec93243168f79): discrete
  ``t = t0 + (step // (T // (k + 1))) * (t1 - t0) / k``, continuous ``t = t0 + step * (t1 - t0) / T``
  with T = ``train.max_steps``, k = ``tempering_step``; t0 = 2, t1 = 1, k = 1, T = 100k gives
  t = 2.0 until step 50k, then 1.0.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from cmgen.losses import TwoC
from text2image.gan import GANConfig, GANMethod, GANStep
from text2image.layers import DBlock, GBlock, SelfAttention, init_weights, sn_embedding, snconv2d, snlinear

__all__ = ["G_LAYOUT", "D_LAYOUT", "ContraGANModelConfig", "ClassImageDataConfig", "ShapesClassDataConfig",
           "ContraGANConfig", "DOutput", "ClassConditionalGenerator", "Generator", "ConditionalDiscriminator",
           "Discriminator", "ContraGANMethod", "draw_latents",
           "build_class_image_dataset", "shapes_variant_suffix", "shapes_dir_name", "temperature_at",
           "refresh_spectral_norm"]

# StudioGAN src/models/big_resnet.py (947b35e): per block, multipliers of g_conv_dim / d_conv_dim.
# D's first block reads RGB ("in" None = 3 channels).
G_LAYOUT = {
    32: {"in": (4, 4, 4), "out": (4, 4, 4)},
    64: {"in": (16, 8, 4, 2), "out": (8, 4, 2, 1)},
    128: {"in": (16, 16, 8, 4, 2), "out": (16, 8, 4, 2, 1)},
}
D_LAYOUT = {
    32: {"in": (None, 2, 2, 2), "out": (2, 2, 2, 2), "down": (True, True, False, False)},
    64: {"in": (None, 1, 2, 4, 8), "out": (1, 2, 4, 8, 16), "down": (True, True, True, True, False)},
    128: {"in": (None, 1, 2, 4, 8, 16), "out": (1, 2, 4, 8, 16, 16), "down": (True, True, True, True, True, False)},
}
_G_BOTTOM = 4  # bottom_collection: 4x4 at every size
EVAL_POWER_ITERATIONS = 50


def _sn_state(weight: torch.Tensor, sn: nn.Module, n_power_iterations: int) -> tuple:
    """What a spectral-norm refresh depends on: the weight, ``u`` and ``v`` by identity and version counter
    (a deep copy, such as an EMA, carries the record of its source but has new tensors)."""
    return (id(weight), weight._version, id(sn._u), sn._u._version, id(sn._v), sn._v._version, n_power_iterations)


@torch.no_grad()
def refresh_spectral_norm(module: nn.Module, n_power_iterations: int = EVAL_POWER_ITERATIONS) -> nn.Module:
    """Run ``n_power_iterations`` steps of the power method of every spectral-norm layer below ``module``
    on its current weight, from its stored ``u``, ``v``, so that ``sigma = u^T W v`` in eval mode is the
    largest singular value of THIS weight.

    Why: an EMA copy averages the weights and (StudioGAN ``utils/ema.py``) the ``u``, ``v`` buffers; the
    average of unit vectors is shorter than one and no singular vector of the averaged weight, so in eval
    mode (no power iteration) sigma is underestimated and every layer is amplified. In a 500-step shapes
    run the EMA generator's stored sigmas were 0.59-0.89 of the true ones and its samples saturated.
    StudioGAN avoids this by sampling with every conv / linear / embedding in train mode
    (``utils/misc.py`` ``GeneratorController.prepare_generator`` -> ``set_deterministic_op_trainable``): one
    power iteration per sampling forward, which over an evaluation converges to what this gives once.
    Idempotent: a layer whose weight, ``u`` and ``v`` are the same tensors, unchanged since its last refresh
    (identity and version counters), is skipped, so ``eval()`` twice (diffusers' ``from_pretrained`` calls it, then the sampler)
    gives the sigma of ``eval()`` once; without it a slowly converging layer (the DCGAN's deconvolutions)
    moved by 1e-4 between the two paths. Returns ``module``.
    """
    for m in module.modules():
        if not parametrize.is_parametrized(m, "weight"):
            continue
        weight = m.parametrizations["weight"].original
        for p in m.parametrizations["weight"]:
            if isinstance(p, _SpectralNorm) and weight.ndim > 1:
                if getattr(p, "_cmgen_refreshed", None) == _sn_state(weight, p, n_power_iterations):
                    continue
                p._power_method(p._reshape_weight_to_matrix(weight), n_power_iterations)
                p._cmgen_refreshed = _sn_state(weight, p, n_power_iterations)
    return module


def draw_latents(n: int, z_dim: int, latent: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, z_dim)`` noise: ``"normal"`` N(0, I) or ``"uniform"`` U(-1, 1) (StudioGAN ``z_prior``,
    ContraD ``sample_latent``)."""
    if latent == "normal":
        return torch.randn(n, z_dim, generator=generator)
    if latent == "uniform":
        return torch.rand(n, z_dim, generator=generator) * 2.0 - 1.0
    raise ValueError(f"latent must be 'normal' or 'uniform', got {latent!r}")


def _check_output_range(output_range: Sequence[float]) -> tuple[float, float]:
    if len(output_range) != 2 or not float(output_range[0]) < float(output_range[1]):
        raise ValueError(f"output_range must be (low, high) with low < high, got {output_range!r}")
    return float(output_range[0]), float(output_range[1])


class DOutput(NamedTuple):
    """Discriminator output. logits (B,); embeddings (B, E); proxies (B, E) = class embedding of each label;
    features (B, C) = ReLU + sum-pooled last feature map. With ``cond_mtd="PD"`` / ``"W/O"`` there is no 2C
    head: embeddings = features and proxies = the projection embedding of y (PD) or features (W/O)."""

    logits: torch.Tensor
    embeddings: torch.Tensor
    proxies: torch.Tensor
    features: torch.Tensor


class ClassConditionalGenerator(ModelMixin, ConfigMixin):
    """What every ContraGAN-family generator shares (BigGAN :class:`Generator`, DCGAN
    :class:`text2image.deep_conv.DCGANGenerator`): a diffusers model whose config holds ``z_dim``,
    ``latent``, ``num_classes`` and ``output_range``; ``eval()`` refreshes spectral-norm vectors; tanh is
    mapped to ``output_range``."""

    def train(self, mode: bool = True) -> "ClassConditionalGenerator":
        """``eval()`` (``train(False)``) also refreshes the spectral-norm vectors on the current weights
        (:func:`refresh_spectral_norm`): an EMA copy or loaded checkpoint then samples with the exact sigma
        of its own weights, as StudioGAN's sampling does; within one eval session every forward uses the
        same sigma, so samples do not depend on the batch size."""
        super().train(mode)
        if not mode:
            refresh_spectral_norm(self)
        return self

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, z_dim)`` noise from the configured prior, on CPU."""
        return draw_latents(n, self.config.z_dim, self.config.latent, generator)

    def _check_inputs(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        if y is None:
            raise ValueError(f"{type(self).__name__} needs class labels y (B,)")
        if z.dim() != 2 or z.shape[1] != self.config.z_dim or y.shape != (z.shape[0],):
            raise ValueError(f"need z (B, {self.config.z_dim}) and y (B,), got {tuple(z.shape)} and {tuple(y.shape)}")

    def _to_range(self, pre_tanh: torch.Tensor) -> torch.Tensor:
        lo, hi = self.range
        return lo + (hi - lo) * 0.5 * (torch.tanh(pre_tanh) + 1.0)


def _check_generator_args(num_classes: int, latent: str) -> None:
    if num_classes < 1:
        raise ValueError(f"ContraGAN's generator is class-conditional: num_classes >= 1, got {num_classes}")
    if latent not in ("normal", "uniform"):
        raise ValueError(f"latent must be 'normal' or 'uniform', got {latent!r}")


class Generator(ClassConditionalGenerator):
    """BigGAN generator with a shared class embedding and hierarchical z (Brock et al. 2019, Sec. 3).

    A diffusers model: ``save_pretrained`` / ``from_pretrained`` (safetensors) with everything sampling
    needs in its config (``z_dim``, ``latent``, ``num_classes``, ``output_range``).

    Args:
        z_dim: divisible by ``len(G_LAYOUT[image_size]["in"]) + 1`` (4 at 32 px, 5 at 64, 6 at 128).
        shared_dim: size of the shared class embedding (``g_shared_dim``).
        num_classes, channels (``g_conv_dim``), image_size (32, 64 or 128).
        attention_at: resolution after whose block self-attention runs (16 at 32 px = ``attn_g_loc
            [2]``; 32 at 64 px = [3]; 64 at 128 px = [4]), None for none.
        sn: spectral norm on every layer (``apply_g_sn``); init: see :func:`text2image.layers.init_weights`.
        latent: ``"normal"`` or ``"uniform"`` (``z_prior``), used by :meth:`sample_latents`.
        output_range: tanh mapped to this range; StudioGAN's is (-1, 1).

    Shapes: z (B, z_dim), y (B,) int64 -> images (B, 3, image_size, image_size) in ``output_range``.
    """

    @register_to_config
    def __init__(self, z_dim: int = 80, shared_dim: int = 128, num_classes: int = 10, channels: int = 96,
                 image_size: int = 32, attention_at: Optional[int] = 16, sn: bool = True, init: str = "ortho",
                 latent: str = "normal", output_range: Sequence[float] = (-1.0, 1.0)):
        super().__init__()
        if image_size not in G_LAYOUT:
            raise ValueError(f"image_size must be one of {sorted(G_LAYOUT)}, got {image_size}")
        _check_generator_args(num_classes, latent)
        self.range = _check_output_range(output_range)
        layout = G_LAYOUT[image_size]
        chunks = len(layout["in"]) + 1
        if z_dim % chunks:
            raise ValueError(f"z_dim={z_dim} must be divisible by {chunks} (hierarchical z at {image_size} px)")
        self.z_dim, self.num_classes, self.chunk = z_dim, num_classes, z_dim // chunks
        self.bottom_channels = channels * layout["in"][0]
        self.shared = nn.Embedding(num_classes, shared_dim)
        self.linear0 = snlinear(self.chunk, self.bottom_channels * _G_BOTTOM * _G_BOTTOM, sn=sn)
        cond_dim = shared_dim + self.chunk
        valid_attention = [_G_BOTTOM * 2 ** (i + 1) for i in range(len(layout["in"]))]
        if attention_at is not None and attention_at not in valid_attention:
            raise ValueError(f"attention_at must be one of {valid_attention} or None, got {attention_at}")
        blocks, res = [], _G_BOTTOM
        self.attention_index, self.attention = None, None
        for i, (m_in, m_out) in enumerate(zip(layout["in"], layout["out"])):
            blocks.append(GBlock(channels * m_in, channels * m_out, cond_dim, sn))
            res *= 2
            if res == attention_at:
                self.attention_index, self.attention = i, SelfAttention(channels * m_out, sn)
        self.blocks = nn.ModuleList(blocks)
        out_ch = channels * layout["out"][-1]
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-4)
        self.conv_out = snconv2d(out_ch, 3, 3, 1, 1, sn=sn)
        init_weights(self, init)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        self._check_inputs(z, y)
        zs = z.split(self.chunk, dim=1)
        shared = self.shared(y)                                          # (B, shared_dim)
        h = self.linear0(zs[0]).view(z.shape[0], self.bottom_channels, _G_BOTTOM, _G_BOTTOM)
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([shared, zs[i + 1]], dim=1))          # block i <- z chunk i + 1
            if i == self.attention_index:
                h = self.attention(h)
        return self._to_range(self.conv_out(F.relu(self.bn(h))))


class ConditionalDiscriminator(nn.Module):
    """The conditional heads every ContraGAN-family D puts on its pooled features h (B, C), as StudioGAN's
    big_resnet.py and deep_conv.py both do: ``logits = linear1(h)``; ``"2C"``: ``embeddings = linear2(h)``
    (B, E) and ``proxies = embedding(y)`` (B, E); ``"PD"``: ``logits += <embedding(y), h>``; ``"W/O"``: none.
    A subclass builds its backbone, calls :meth:`_build_heads` and implements :meth:`features`."""

    def _build_heads(self, num_classes: int, width: int, embed_dim: int, cond_mtd: str, sn: bool,
                     adc: bool = False) -> None:
        if cond_mtd not in ("2C", "PD", "W/O"):
            raise ValueError(f"cond_mtd (model.d_cond_mtd) must be '2C', 'PD' or 'W/O', got {cond_mtd!r}")
        if adc and cond_mtd != "2C":
            raise ValueError(f"aux_cls_type 'ADC' is implemented for d_cond_mtd '2C' (ContraGAN-ADC), got {cond_mtd!r}")
        self.cond_mtd, self.num_classes, self.adc = cond_mtd, num_classes, adc
        self.linear1 = snlinear(width, 1, sn=sn)
        if cond_mtd == "2C":
            self.linear2 = snlinear(width, embed_dim, sn=sn)
            # ADC (aux_cls_type "ADC"): 2K proxies, row 2y = real class y, row 2y + 1 = fake class y
            self.embedding = sn_embedding(2 * num_classes if adc else num_classes, embed_dim, sn=sn)
        elif cond_mtd == "PD":
            self.embedding = sn_embedding(num_classes, width, sn=sn)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features h (B, C) of images (B, 3, S, S); each backbone defines it (:class:`Discriminator`,
        :class:`text2image.deep_conv.DCGANDiscriminator`)."""
        raise NotImplementedError(f"{type(self).__name__} must define features(images): the backbone's pooled "
                                  f"features; ConditionalDiscriminator only holds the heads")

    def _run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        """``self.blocks`` in turn, with ``self.attention`` after block ``self.attention_index`` (or none)."""
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attention_index:
                h = self.attention(h)
        return h

    def forward(self, images: torch.Tensor, y: torch.Tensor) -> DOutput:
        if images.dim() != 4 or images.shape[1] != 3 or y.shape != (images.shape[0],):
            raise ValueError(f"need images (B, 3, H, W) and y (B,), got {tuple(images.shape)} and {tuple(y.shape)}")
        h = self.features(images)
        logits = self.linear1(h).squeeze(1)
        if self.cond_mtd == "2C":
            return DOutput(logits, self.linear2(h), self.embedding(y), h)
        if self.cond_mtd == "PD":
            proj = self.embedding(y)                                     # (B, C)
            return DOutput(logits + (proj * h).sum(1), h, proj, h)
        return DOutput(logits, h, h, h)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """D's own reading of the class of each image (B,): the label its conditional head prefers.

        2C: the nearest proxy by cosine similarity of ``embeddings`` to every class's ``embedding(c)`` (what
        the 2C loss pulls a real image's embedding towards; with ADC, among the real-class proxies); PD: the class whose projection ``<embedding(c),
        h>`` is largest (the only class-dependent term of the logit). A diagnostic: a D whose head reads real
        images near chance gives G no class signal, and its accuracy on G(z, y) against y says whether G
        satisfies D's class head. Uses the module's current mode (call ``eval()`` for stored SN vectors).
        """
        if self.cond_mtd == "W/O":
            raise ValueError("an unconditional D (cond_mtd 'W/O') has no class head")
        out = self(images, torch.zeros(images.shape[0], dtype=torch.long, device=images.device))
        rows = torch.arange(self.num_classes, device=images.device)
        table = self.embedding(2 * rows if self.adc else rows)     # (K, E) or (K, C)
        if self.cond_mtd == "2C":
            return (F.normalize(out.embeddings, dim=1) @ F.normalize(table, dim=1).T).argmax(1)
        return (out.features @ table.T).argmax(1)


class Discriminator(ConditionalDiscriminator):
    """SN-ResNet discriminator with ContraGAN's embedding head and proxy table.

    blocks -> ReLU -> sum over H, W = h (B, C); heads of :class:`ConditionalDiscriminator`. All layers
    spectral-normed (StudioGAN ``apply_d_sn``).

    Args:
        num_classes, channels (``d_conv_dim``), embed_dim (``d_embed_dim``), image_size (32, 64, 128),
        attention_at: resolution of the feature map after whose block self-attention runs (16 at 32 px =
            ``attn_d_loc [1]``), None for none.
        init: see :func:`text2image.layers.init_weights`.
        cond_mtd: ``"2C"`` (ContraGAN: embedding head + proxies), ``"PD"`` (projection: the label enters the
            logit) or ``"W/O"`` (unconditional); StudioGAN ``d_cond_mtd``.
        adc: ``aux_cls_type == "ADC"``: 2 * num_classes proxies; callers pass ``2y`` for a real image of
            class y and ``2y + 1`` for a fake one (big_resnet.py ``adc_fake``).

    Shapes: images (B, 3, S, S), y (B,) int64 -> :class:`DOutput`.
    """

    def __init__(self, num_classes: int = 10, channels: int = 96, embed_dim: int = 512, image_size: int = 32,
                 attention_at: Optional[int] = 16, sn: bool = True, init: str = "ortho", cond_mtd: str = "2C",
                 adc: bool = False):
        super().__init__()
        if image_size not in D_LAYOUT:
            raise ValueError(f"image_size must be one of {sorted(D_LAYOUT)}, got {image_size}")
        self.image_size = image_size
        layout = D_LAYOUT[image_size]
        blocks, res = [], image_size
        self.attention_index, self.attention = None, None
        for i, (m_in, m_out, down) in enumerate(zip(layout["in"], layout["out"], layout["down"])):
            in_ch = 3 if m_in is None else channels * m_in
            blocks.append(DBlock(in_ch, channels * m_out, downsample=down, optimized=i == 0, sn=sn))
            res = res // 2 if down else res
            if res == attention_at and self.attention is None:
                self.attention_index, self.attention = i, SelfAttention(channels * m_out, sn)
        if attention_at is not None and self.attention is None:
            raise ValueError(f"attention_at={attention_at} is not a feature-map size of the {image_size} px D")
        self.blocks = nn.ModuleList(blocks)
        self._build_heads(num_classes, channels * layout["out"][-1], embed_dim, cond_mtd, sn, adc)
        init_weights(self, init)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self._run_blocks(images)).sum(dim=(2, 3))          # (B, C)


def temperature_at(step: int, start: float, end: float, schedule: str, tempering_step: int, total: int) -> float:
    """The 2C temperature at ``step`` (paper-era StudioGAN ``trainer.py``, see the module docstring)."""
    if schedule == "constant":
        return start
    if schedule == "continuous":
        return start + step * (end - start) / total
    if schedule == "discrete":
        if tempering_step < 1:
            raise ValueError(f"model.tempering_step must be >= 1, got {tempering_step}")
        interval = total // (tempering_step + 1)
        return start + (step // interval) * (end - start) / tempering_step
    raise ValueError(f"model.temperature_schedule must be constant, continuous or discrete, got {schedule!r}")


@dataclass
class ContraGANModelConfig:
    """Model and 2C-loss hyperparameters (StudioGAN names in brackets)."""

    image_size: int = 32
    backbone: Literal["big_resnet", "deep_conv"] = "big_resnet"   # deep_conv: text2image.deep_conv (32 px)
    z_dim: int = 80
    shared_dim: int = 128                 # g_shared_dim (big_resnet; deep_conv conditions on one-hot y)
    g_channels: int = 96                  # g_conv_dim
    d_channels: int = 96                  # d_conv_dim
    embed_dim: int = 512                  # d_embed_dim
    attention_at: Optional[int] = 16      # apply_attn with attn_g_loc / attn_d_loc, as a resolution
    sn_g: bool = True                     # apply_g_sn
    sn_d: bool = True                     # apply_d_sn; False (deep_conv only): BatchNorm after D's convs
    init: str = "ortho"                   # g_init = d_init (text2image.layers.init_weights)
    latent: Literal["normal", "uniform"] = "normal"   # z_prior
    d_cond_mtd: Literal["2C", "PD", "W/O"] = "2C"   # PD / W/O: same-size baselines without the 2C term
    cond_lambda: float = 1.0              # lambda of the 2C terms
    temperature: float = 1.0              # t (start_temperature under a schedule)
    temperature_schedule: Literal["constant", "continuous", "discrete"] = "constant"
    end_temperature: float = 1.0
    tempering_step: int = 1
    pos_collected_numerator: bool = True
    aux_cls_type: Literal["N/A", "ADC"] = "N/A"   # ADC: D also tells fake class y from real class y (2C only)
    gather_distributed: bool = True       # 2C over the global batch under DDP (no-op on one process)
    two_c_grad: Literal["exact", "studiogan"] = "exact"   # multi-process 2C gradient (module docstring)
    diffaug: bool = False                 # AUG.apply_diffaug (diffaug_type "diffaug"): D sees DiffAugment(x)
    diffaug_policy: str = "color,translation,cutout"   # utils/diffaug.py apply_diffaug's default policy


@dataclass
class ClassImageDataConfig:
    """Class-conditional training images.

    ``kind``: ``"shapes"`` (the embedded data, class = primary shape; written with
    ``cmgen.data.write_shapes(root, num_images, image_size, seed)`` if ``root/dataset_info.json`` is missing,
    under a lock, so two runs starting at once share one copy; ``root`` None =
    ``<run.output_dir>/data/`` + :func:`shapes_dir_name`, a folder per data setting), ``"cifar10"`` / ``"cifar100"`` (the python pickle
    folder under ``root``, :class:`text2image.cifar.CIFAR`) or ``"imagefolder"`` (``root`` = a class-per-
    folder tree such as Tiny ImageNet's or ImageNet's train split, resized to the model's image size).
    ``hflip``: random horizontal flip (StudioGAN ``apply_rflip``). ``max_shapes`` (shapes only): each
    image has 1..max_shapes objects (``write_shapes``; 2 = the default data, 1 = the class object alone,
    small or large at random); ``primary_size`` (shapes only): ``"mixed"`` (the default data),
    ``"large"`` (``write_shapes(primary_size="large")``: the class object is always large) or ``"huge"``
    (the class object alone, centred, about 3/4 of the image side; configs/contragan/shapes.yaml). The default
    root is :func:`shapes_dir_name` (``shapes_<image_size>px`` for 512 images of data seed 0, else with
    ``_n<num_images>_s<seed>`` and :func:`shapes_variant_suffix`: ``_m1``, ``_large``, ...).
    """

    kind: Literal["shapes", "cifar10", "cifar100", "imagefolder"] = "shapes"
    root: Optional[str] = None
    num_images: int = 512
    seed: int = 0
    hflip: bool = True
    max_shapes: int = 2
    primary_size: Literal["mixed", "large", "huge"] = "mixed"


ShapesClassDataConfig = ClassImageDataConfig  # earlier name


@dataclass
class ContraGANConfig(GANConfig):
    method: str = "contragan"
    model: ContraGANModelConfig = field(default_factory=ContraGANModelConfig)
    data: ClassImageDataConfig = field(default_factory=ClassImageDataConfig)


def _random_hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def shapes_variant_suffix(d: ClassImageDataConfig) -> str:
    """The folder-name tag of a shapes data variant: ``""`` for the default data (1..2 objects per image,
    primary size mixed), else ``"_m<max_shapes>"`` when max_shapes is not 2 followed by ``"_<primary_size>"``
    when it is not mixed (``_large``, ``_huge``), so that two variants never share a default root."""
    return (("" if d.max_shapes == 2 else f"_m{d.max_shapes}")
            + ("" if d.primary_size == "mixed" else f"_{d.primary_size}"))


def shapes_dir_name(d: ClassImageDataConfig, image_size: int) -> str:
    """The default folder name of the shapes data ``d`` asks for: ``shapes_<S>px`` for the default data
    (512 images, data seed 0, default variant), else ``shapes_<S>px_n<num_images>_s<seed>`` plus
    :func:`shapes_variant_suffix`; so two configs with other data settings never share a folder."""
    if (d.num_images, d.seed, shapes_variant_suffix(d)) == (512, 0, ""):
        return f"shapes_{image_size}px"
    return f"shapes_{image_size}px_n{d.num_images}_s{d.seed}{shapes_variant_suffix(d)}"


def _shapes_root(cfg, image_size: int) -> Path:
    d = cfg.data
    if d.root:
        return Path(d.root)
    return Path(cfg.run.output_dir) / "data" / shapes_dir_name(d, image_size)


def _check_shapes_settings(root: Path, settings: dict, default_root: bool) -> None:
    """The data at ``root`` against the writer settings the config asks for: at the default root another
    setting raises (that folder is named for these settings: data of an older cmgen that named it by
    size only); at a user-given ``data.root`` the data are used as they are, with a note naming the keys."""
    from cmgen.data import writer_config
    from cmgen.data.common import config_differences, read_info
    from cmgen.errors import DataError

    info = read_info(root)
    want = writer_config("shapes", settings)
    if info is None or info["config"] == want:
        return
    listing = f"data.* {config_differences(info['config'], want)}"
    if default_root:
        raise DataError(f"{root} holds shapes data written with other settings ({listing}); remove that folder "
                        f"(it is rewritten in seconds) or set data.root")
    print(f"cmgen: note: data.root={root} was written with other settings than the config's ({listing}); "
          f"using it as it is", file=sys.stderr)


def build_class_image_dataset(cfg, image_size: int, value_range: Sequence[float]):
    """``(dataset of (image, label), class names)`` for a :class:`ClassImageDataConfig` ``cfg.data``."""
    d = cfg.data
    flip = _random_hflip if d.hflip else None
    if d.kind == "shapes":
        from cmgen.data import ensure_dataset, write_shapes
        from text2image.data import ShapesAttributes, class_conditional_imagefolder
        root = _shapes_root(cfg, image_size)
        settings = dict(num_images=d.num_images, image_size=image_size, seed=d.seed, max_shapes=d.max_shapes,
                        primary_size=d.primary_size)
        ensure_dataset(root, "dataset_info.json", lambda: write_shapes(root, **settings, progress=False))
        _check_shapes_settings(root, settings, default_root=not d.root)
        classes = ShapesAttributes(root, "train").classes
        return class_conditional_imagefolder(root / "imagefolder" / "train", image_size, flip, value_range,
                                             classes), classes
    if d.kind in ("cifar10", "cifar100"):
        from text2image.cifar import CIFAR
        if not d.root:
            raise ValueError(f"data.root must name the folder holding the {d.kind} python pickles")
        if image_size != 32:
            raise ValueError(f"data.kind={d.kind} has 32 px images; model.image_size is {image_size}")
        ds = CIFAR(d.root, d.kind, "train", value_range, transform=flip)
        return ds, ds.classes
    if d.kind == "imagefolder":
        from text2image.data import class_conditional_imagefolder
        if not d.root:
            raise ValueError("data.root must name a class-per-folder image tree for data.kind=imagefolder")
        ds = class_conditional_imagefolder(d.root, image_size, flip, value_range)
        return ds, list(ds.classes)
    raise ValueError(f"data.kind must be shapes, cifar10, cifar100 or imagefolder, got {d.kind!r}")


class ContraGANMethod(GANMethod):
    """ContraGAN on the shared GAN skeleton: the base's hinge terms plus ``lambda * 2C`` on each side."""

    config_class = ContraGANConfig

    def __init__(self, cfg: ContraGANConfig):
        super().__init__(cfg)
        m = cfg.model
        if m.two_c_grad not in ("exact", "studiogan"):
            raise ValueError(f"model.two_c_grad must be 'exact' or 'studiogan', got {m.two_c_grad!r}")
        if m.d_cond_mtd not in ("2C", "PD", "W/O"):
            raise ValueError(f"model.d_cond_mtd must be '2C', 'PD' or 'W/O', got {m.d_cond_mtd!r}")
        if m.backbone not in ("big_resnet", "deep_conv"):
            raise ValueError(f"model.backbone must be 'big_resnet' or 'deep_conv', got {m.backbone!r}")
        if m.aux_cls_type not in ("N/A", "ADC"):
            raise ValueError(f"model.aux_cls_type must be 'N/A' or 'ADC', got {m.aux_cls_type!r}")
        if m.aux_cls_type == "ADC" and m.d_cond_mtd != "2C":
            raise ValueError(f"model.aux_cls_type=ADC is implemented with model.d_cond_mtd=2C, got {m.d_cond_mtd!r}")
        self.adc = m.aux_cls_type == "ADC"
        temperature_at(0, m.temperature, m.end_temperature, m.temperature_schedule, m.tempering_step,
                       max(1, cfg.train.max_steps))  # validates the schedule settings
        self.two_c = TwoC(temperature=m.temperature, pos_collected_numerator=m.pos_collected_numerator,
                          gather_distributed=m.gather_distributed)
        self.num_classes: Optional[int] = None
        self._dataset = None
        self.aug = None
        if m.diffaug:
            from text2image.augment import DiffAugment
            self.aug = DiffAugment(policy=m.diffaug_policy, input_range=self.output_range)

    def _data(self):
        if self._dataset is None:
            self._dataset = build_class_image_dataset(self.cfg, self.cfg.model.image_size, self.output_range)
        return self._dataset

    def build_models(self, cfg: ContraGANConfig) -> dict[str, nn.Module]:
        """G and D of ``model.backbone``: ``big_resnet`` (:class:`Generator`, :class:`Discriminator`) or
        ``deep_conv`` (:mod:`text2image.deep_conv`); ``g_channels`` / ``d_channels`` are StudioGAN's
        ``g_conv_dim`` / ``d_conv_dim`` for big_resnet and the base width c (StudioGAN fixes 64) for deep_conv."""
        m = cfg.model
        self.num_classes = len(self._data()[1])
        if m.backbone == "deep_conv":
            from text2image.deep_conv import DCGANDiscriminator, DCGANGenerator
            return {"g": DCGANGenerator(m.z_dim, self.num_classes, m.g_channels, m.image_size, m.attention_at,
                                        m.sn_g, m.init, m.latent, self.output_range),
                    "d": DCGANDiscriminator(self.num_classes, m.d_channels, m.embed_dim, m.image_size,
                                            m.attention_at, m.sn_d, m.init, m.d_cond_mtd, self.adc)}
        if not m.sn_d:
            raise ValueError("model.sn_d=false (StudioGAN apply_d_sn: False, a BatchNorm D) is implemented for "
                             "model.backbone=deep_conv only; big_resnet's D is spectral-normed")
        return {"g": Generator(m.z_dim, m.shared_dim, self.num_classes, m.g_channels, m.image_size,
                               m.attention_at, m.sn_g, m.init, m.latent, self.output_range),
                "d": Discriminator(self.num_classes, m.d_channels, m.embed_dim, m.image_size, m.attention_at,
                                   init=m.init, cond_mtd=m.d_cond_mtd, adc=self.adc)}

    def build_dataset(self, cfg: ContraGANConfig):
        return self._data()[0]

    def sample_latents(self, n: int, device: torch.device, generator: torch.Generator | None = None,
                       cond_real=None):
        """z from ``model.latent`` (B, z_dim) and labels uniform over all classes (StudioGAN
        ``y_sampler="totally_random"``); the reals' labels are not used."""
        if self.num_classes is None:
            raise ValueError("build_models must run before sampling (the class count comes from the data)")
        z = draw_latents(n, self.cfg.model.z_dim, self.cfg.model.latent, generator)
        y = torch.randint(self.num_classes, (n,), generator=generator)
        return z.to(device), y.to(device)

    def sample_inputs(self, device: torch.device):
        """``samples_per_class`` fixed z per class, class-major: labels ``arange(C).repeat_interleave(k)``,
        so the grid has one row per class when ``samples_per_class`` equals the number of classes."""
        if self._fixed is None:
            gen = torch.Generator().manual_seed(self.cfg.gan.sample_seed)
            k = self.cfg.gan.samples_per_class
            z = draw_latents(self.num_classes * k, self.cfg.model.z_dim, self.cfg.model.latent, gen)
            self._fixed = (z, torch.arange(self.num_classes).repeat_interleave(k))
        z, y = self._fixed
        return z.to(device), y.to(device)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` through DiffAugment (``model.diffaug``), or unchanged."""
        return images if self.aug is None else self.aug(images)

    def d_forward(self, d: nn.Module, s: GANStep):
        """One D forward over ``cat[aug(real), aug(fake)]`` (StudioGAN ``train_discriminator``: reals and
        fakes augmented by separate ``series_augment`` calls; augmentation only with ``model.diffaug``).
        With ADC the reals look up proxy ``2y`` and the fakes ``2y + 1`` (``adc_fake=True``)."""
        images = torch.cat([self.augment(s.real), self.augment(s.fake)])
        cond_real, cond_fake = (2 * s.cond_real, 2 * s.cond_fake + 1) if self.adc else (s.cond_real, s.cond_fake)
        out = self.discriminate(d, images, self.concat_conditions(cond_real, cond_fake))
        return self.split_output(out, s.real.shape[0])

    def g_forward(self, d: nn.Module, s: GANStep):
        """``D(aug(G(z)))`` in G's update (StudioGAN ``train_generator``); ``D(G(z))`` without diffaug.
        With ADC the output's proxies are the real-class rows ``2y`` and ``s.extras["adc_proxies"]`` the
        fake-class rows ``2y + 1``: StudioGAN runs D a second time with ``adc_fake=True``, whose embeddings
        are the same (they do not depend on the label), so only the proxy lookup is repeated."""
        out = self.discriminate(d, self.augment(s.fake), 2 * s.cond_fake if self.adc else s.cond_fake)
        if self.adc:
            raw = s.ctx.unwrap("d") if s.ctx is not None else d
            s.extras["adc_proxies"] = raw.embedding(2 * s.cond_fake + 1)
        return None, out

    def _two_c(self, s: GANStep, out: DOutput, labels: torch.Tensor) -> torch.Tensor:
        m = self.cfg.model
        self.two_c.temperature = temperature_at(s.step, m.temperature, m.end_temperature, m.temperature_schedule,
                                                m.tempering_step, max(1, self.cfg.train.max_steps))
        loss = self.two_c(out.embeddings, out.proxies, labels)
        w = s.ctx.world_size if s.ctx is not None else 1
        if m.two_c_grad == "studiogan" and w > 1:
            loss = loss / w + (loss - loss / w).detach()   # same value, gradient / W (GatherLayer + DDP mean)
        return m.cond_lambda * loss

    def d_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """Hinge + ``lambda * 2C(e(x), p_y, y)`` on the reals with their real labels (hinge only for the
        PD / W/O baselines). ADC (``worker.py`` ``aux_cls_type == "ADC"``): also ``d_adc = lambda *
        2C(e(G(z, y')), p_{2y'+1}, y')``, the fakes pulled to their fake-class proxies."""
        if self.cfg.model.d_cond_mtd != "2C":
            return super().d_loss(s)
        terms = {**super().d_loss(s), "d_2c": self._two_c(s, s.out_real, s.cond_real)}
        if self.adc:
            terms["d_adc"] = self._two_c(s, s.out_fake, s.cond_fake)
        return terms

    def g_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """Hinge + ``lambda * 2C(e(G(z, y')), p_y', y')`` on the fakes with their sampled labels. ADC: the
        proxies are the real-class rows, and ``g_adc = -lambda * 2C(e(G(z, y')), p_{2y'+1}, y')`` pushes the
        fakes away from their fake-class proxies (``worker.py`` ``adc_fake_cond_loss``)."""
        if self.cfg.model.d_cond_mtd != "2C":
            return super().g_loss(s)
        terms = {**super().g_loss(s), "g_2c": self._two_c(s, s.out_fake, s.cond_fake)}
        if self.adc:
            fake_class = s.out_fake._replace(proxies=s.extras["adc_proxies"])
            terms["g_adc"] = -self._two_c(s, fake_class, s.cond_fake)
        return terms

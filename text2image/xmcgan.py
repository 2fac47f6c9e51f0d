"""XMC-GAN (Zhang et al., CVPR 2021): cross-modal contrastive text-to-image GAN, in PyTorch.

Official code: google-research/xmcgan_image_generation at commit
22a7ef2914787904949fe1fc3f5e560f1e75db29 (JAX/Flax). Every "official" below names the file and
function it was transcribed from: ``xmcgan/nets/xmc_net.py`` (``Generator``, ``Discriminator``),
``xmcgan/nets/common.py`` (blocks), ``xmcgan/libml/layers.py`` (conditional BN, spectral norm),
``xmcgan/libml/attention_lib.py`` (attention, ``word_loss``, ``contrastive_loss``), ``xmcgan/xmc_gan.py``
(``train_d``, ``train_g_d``), ``xmcgan/train_utils.py`` (``train_step``), ``xmcgan/configs/coco_xmc.py``.

Generator (``xmc_net.py::Generator``), text = frozen BERT word features e (B, T, 768), word mask m and
sentence feature s (B, 768)::

    c      = [Dense_{z_dim}(s), z],  z ~ N(0, I)                      global condition (B, 2 z_dim)
    h      = reshape(Dense(z), 4 x 4 x 16 gf)
    h      = GenBlock(h, c) x 2                                      4 -> 16 px, BN(h)(1 + g(c)) + b(c)
    r      = Conv1x1_{768}(h)                                        regions (B, 256, 768)
    ctx_j  = sum_t softmax_t(gamma <r_j, e_t>/(|r_j||e_t|) | m) e_t/|e_t|   gamma = 15 (attention_for_g)
    S      = [ctx, tile(c)]                                          spatial condition (B, 768 + 2 z, 16, 16)
    h      = GenSpatialBlock(h, S, up(S)); S = up(S)                 16 -> image_size, BN(h)(1 + g(S)) + b(S)
    x      = (tanh(Conv3(ReLU(BN(h)(1 + g(S)) + b(S)))) + 1) / 2     in [0, 1]

Discriminator (``xmc_net.py::Discriminator``): an SN-ResNet (``DiscOptimizedBlock`` at df, then
``DiscBlock`` x [2, 4, 8, 16, 16] df, downsampling T, T, T, T, F at 128 px); ``x_pool = sum_hw ReLU(h)``;
``logit = Dense_1(x_pool) + <x_pool, SNDense(s)>`` (projection); the 16 x 16 block output goes through
an SN 1x1 conv to 768 for the region features of the word loss.

Losses (all weights 1; ``xmc_gan.py::calculate_contrastive_loss``, ``train_g_d``), written with
:mod:`cmgen.losses` (``WordRegion`` = ``attention_lib.word_loss``; the official ``contrastive_loss``, a
SUM of both directions, = ``2 x InfoNCE(0.1, symmetric=True)``, checked in
``tests/test_losses_faithfulness.py``)::

    L_D = hinge_D + word(regions_real, e) + sent(x_pool_real, SNDense(s))
    L_G = -mean D(fake) + word(regions_fake, e) + sent(x_pool_fake, SNDense(s))
          + img(x_pool_fake, x_pool_real) + img(enc(real), enc(fake))

where ``enc`` is a frozen ImageNet network (official: ResNet-50 logits at 224 px bilinear,
``xmc_gan.py::calculate_contrastive_loss_on_pretrained``; the paper text says VGG). The real and the
fake of a pair share the caption. ``train_g_d`` computes both losses from ONE forward and takes D's
gradient of L_D and G's gradient of L_G (``func_vjp((1, 0))`` / ``func_vjp((0, 1))``): fake-side and
image terms never update D, and the real-side terms never update G.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from cmgen.losses import InfoNCE, WordRegion
from text2image.gan import GANConfig, GANMethod, GANStep, hinge_d_loss, hinge_g_loss
from text2image.layers import DBlock
from text2image.text_encoder import TextEncoder, TextFeatureCache

__all__ = ["glorot_normal_", "word_attention", "ConditionalBatchNorm", "SpatialBatchNorm", "GenBlock",
           "XMCGenerator", "XMCDiscriminator", "XMCDOutput", "G_ARCH", "D_ARCH", "PretrainedImageEncoder",
           "TextCondition", "XMCImageEncoderConfig", "XMCGANModelConfig", "XMCTextConfig", "XMCDataConfig",
           "XMCGANConfig", "XMCGANMethod"]

# Official layouts (xmc_net.py): G channel multipliers of gf per up block from 4x4; D (multiplier of df,
# downsample) per DiscBlock after the optimized block. 32 and 64 px are this project's small sizes (not
# in the official code): the same rules, with the 16x16 attention/region map kept.
G_ARCH: dict[int, tuple[int, ...]] = {
    32: (4, 2, 1),
    64: (8, 4, 2, 1),
    128: (16, 8, 4, 2, 1),
    256: (16, 8, 8, 4, 2, 1),
}
D_ARCH: dict[int, tuple[tuple[int, bool], ...]] = {
    32: ((2, False), (4, True), (8, True)),
    64: ((2, True), (4, True), (8, True), (8, False)),
    128: ((2, True), (4, True), (8, True), (16, True), (16, False)),
    256: ((2, True), (4, True), (8, True), (8, True), (16, True), (16, False)),
}
SN_EPS = 1e-10                 # layers.py SpectralConv / SpectralDense ``eps``
BN_MOMENTUM = 0.1              # Flax nn.BatchNorm(momentum=0.9): ra <- 0.9 ra + 0.1 batch
BN_EPS = 1e-5                  # xmc_net.py::Generator norm_fn epsilon
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to (-2, 2) (jax variance_scaling)


def glorot_normal_(weight: torch.Tensor) -> torch.Tensor:
    """JAX ``glorot_normal()`` in place: ``variance_scaling(1, "fan_avg", "truncated_normal")``.

    Var = 2 / (fan_in + fan_out) with receptive-field fans (PyTorch's conv fans are the same), drawn from
    a normal truncated to +-2 std and rescaled by 1 / 0.8796 so the variance is exact.
    """
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    std = math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNC_STD
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def _glorot_init(module: nn.Module) -> None:
    """Glorot-normal weights, zero biases for every conv / linear (Flax ``kernel_init`` / ``bias_init``)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            glorot_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _apply_sn(module: nn.Module, eps: float = SN_EPS) -> nn.Module:
    """Spectral norm (one power iteration per training forward) on every conv / linear of ``module``."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            spectral_norm(m, eps=eps)
    return module


def word_attention(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                   gamma: float) -> torch.Tensor:
    """Word context of every region (``attention_lib.attention_for_g``).

    ``alpha_jt = softmax over words t of gamma cos(r_j, e_t)`` (padded words masked);
    ``ctx_j = sum_t alpha_jt e_t / |e_t|`` (the official function re-binds ``word_feat`` to its normalised
    copy before the weighted sum). A padded word has exactly zero weight, so its features change nothing.

    Shapes: regions (B, R, D), words (B, T, D), word_mask (B, T) bool -> (B, R, D).
    """
    if word_mask.dtype != torch.bool or word_mask.shape != words.shape[:2]:
        raise ValueError(f"word_mask must be bool {tuple(words.shape[:2])}, got {word_mask.dtype} "
                         f"{tuple(word_mask.shape)}")
    if not bool(word_mask.any(dim=1).all()):
        raise ValueError("every caption needs at least one valid word in word_mask")
    # l2_normalize: x * rsqrt(max(sum x^2, 1e-12)) == x / max(|x|, 1e-6)
    r = F.normalize(regions, dim=-1, eps=1e-6)
    w = F.normalize(words, dim=-1, eps=1e-6)
    logits = gamma * torch.bmm(r, w.transpose(1, 2))                       # (B, R, T)
    logits = logits.masked_fill(~word_mask[:, None, :], float("-inf"))
    return torch.bmm(torch.softmax(logits, dim=-1), w)                     # (B, R, D)


class ConditionalBatchNorm(nn.Module):
    """``BN(x) (1 + gamma(c)) + beta(c)``, gamma/beta Dense maps of a global condition (``layers.py``).

    BN has no affine part (``norm_fn(use_bias=False, use_scale=False)``); gamma and beta are plain Dense
    layers with bias (no spectral norm in G).

    Shapes: x (B, C, H, W), c (B, cond_dim) -> (B, C, H, W).
    """

    def __init__(self, num_features: int, cond_dim: int, momentum: float = BN_MOMENTUM, eps: float = BN_EPS):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Linear(cond_dim, num_features)
        self.beta = nn.Linear(cond_dim, num_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * (1.0 + self.gamma(c)[:, :, None, None]) + self.beta(c)[:, :, None, None]


class SpatialBatchNorm(nn.Module):
    """``BN(x) (1 + gamma(S)) + beta(S)`` with 1x1-conv maps of a spatial condition
    (``layers.py::LocalConditionalBatchNorm``).

    The official generator upsamples S (nearest) to every block's resolution and then applies the 1x1
    convs. A 1x1 conv acts on each pixel alone, so it commutes with nearest upsampling: S may be given at
    a lower resolution (an integer factor below x's), and gamma/beta are computed there and then
    upsampled, with identical values. That avoids the (B, 768 + 2 z, 128, 128) map of the 128 px model.

    Shapes: x (B, C, H, W), S (B, cond_channels, H / k, W / k) for an integer k >= 1 -> (B, C, H, W).
    """

    def __init__(self, num_features: int, cond_channels: int, momentum: float = BN_MOMENTUM, eps: float = BN_EPS):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Conv2d(cond_channels, num_features, 1)
        self.beta = nn.Conv2d(cond_channels, num_features, 1)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma(s), self.beta(s)
        if gamma.shape[-2:] != x.shape[-2:]:
            k = x.shape[-1] // s.shape[-1]
            if k * s.shape[-1] != x.shape[-1] or k * s.shape[-2] != x.shape[-2]:
                raise ValueError(f"condition map {tuple(s.shape[-2:])} must divide the feature map {tuple(x.shape[-2:])}")
            gamma = F.interpolate(gamma, scale_factor=k, mode="nearest")
            beta = F.interpolate(beta, scale_factor=k, mode="nearest")
        return self.bn(x) * (1.0 + gamma) + beta


class GenBlock(nn.Module):
    """``common.py::GenBlock`` (``spatial=False``) / ``GenSpatialBlock`` (``spatial=True``).

    norm1(x, c1)-ReLU-up-conv3-norm2(., c2)-ReLU-conv3, plus shortcut up-conv1 (always a conv). The global
    block uses c1 = c2 = c (B, cond_dim); the spatial block the condition map S for its input (c1) and its
    2x upsampled output (c2), which :class:`SpatialBatchNorm` upsamples itself, so c1 = c2 = S at the
    attention resolution is the official ``(spatial_cond, upsample(spatial_cond))``. Upsampling is nearest
    (``common.upsample``); convs have bias.

    Shapes: x (B, in, H, W) -> (B, out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, spatial: bool = False,
                 momentum: float = BN_MOMENTUM, eps: float = BN_EPS):
        super().__init__()
        norm = SpatialBatchNorm if spatial else ConditionalBatchNorm
        self.spatial = spatial
        self.norm1 = norm(in_channels, cond_dim, momentum, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = norm(out_channels, cond_dim, momentum, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.conv_sc = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, c1: torch.Tensor, c2: Optional[torch.Tensor] = None) -> torch.Tensor:
        c2 = c1 if c2 is None else c2
        h = F.interpolate(F.relu(self.norm1(x, c1)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), c2)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2, mode="nearest"))


def _check_text(words: torch.Tensor, word_mask: torch.Tensor, sentence: torch.Tensor, b: int,
                word_dim: int, sentence_dim: int) -> None:
    if words.dim() != 3 or words.shape[0] != b or words.shape[2] != word_dim:
        raise ValueError(f"words must be ({b}, T, {word_dim}), got {tuple(words.shape)}")
    if word_mask.shape != words.shape[:2] or word_mask.dtype != torch.bool:
        raise ValueError(f"word_mask must be bool {tuple(words.shape[:2])}, got {word_mask.dtype} "
                         f"{tuple(word_mask.shape)}")
    if sentence.shape != (b, sentence_dim):
        raise ValueError(f"sentence must be ({b}, {sentence_dim}), got {tuple(sentence.shape)}")


class XMCGenerator(ModelMixin, ConfigMixin):
    """XMC-GAN's attentional self-modulation generator (``xmc_net.py::Generator``).

    Args (saved in ``config.json`` by ``save_pretrained``):
        image_size: output side; 128 and 256 have the official layouts, 32 / 64 small ones (``G_ARCH``).
        gf_dim: base width gf (96 official).
        z_dim: noise size (128 official); the global condition is ``[Dense_{z_dim}(s), z]``.
        word_dim, sentence_dim: widths of the text features (768 for BERT-base, 384 for MiniLM).
        channel_multipliers: widths of the up blocks in units of gf; None = ``G_ARCH[image_size]``.
            The first block starts from 16 gf at 4 x 4 (``Dense(gf * 16 * 4 * 4)``), as officially.
        cond_size: side of the map where word attention happens (16 official); the blocks before it are
            global-conditioned, those after spatially conditioned.
        gamma: attention sharpness (``gamma_for_g`` = 15).
        bn_momentum, bn_eps: PyTorch BatchNorm settings (Flax momentum 0.9 = PyTorch 0.1; eps 1e-5).
        latent, output_range, conditioning: what a sampler needs to know: z ~ N(0, I) (``"normal"``),
            images in [0, 1], text-conditioned. Fixed values, validated.

    Shapes: z (B, z_dim), words (B, T, word_dim), word_mask (B, T) bool, sentence (B, sentence_dim)
    -> images (B, 3, image_size, image_size) in [0, 1].
    """

    @register_to_config
    def __init__(self, image_size: int = 128, gf_dim: int = 96, z_dim: int = 128, word_dim: int = 768,
                 sentence_dim: int = 768, channel_multipliers: Optional[Sequence[int]] = None,
                 cond_size: int = 16, gamma: float = 15.0, bn_momentum: float = BN_MOMENTUM,
                 bn_eps: float = BN_EPS, latent: str = "normal", output_range: Sequence[float] = (0.0, 1.0),
                 conditioning: str = "text"):
        super().__init__()
        if latent != "normal" or tuple(output_range) != (0.0, 1.0) or conditioning != "text":
            raise ValueError(f"XMCGenerator samples z ~ N(0, I), outputs [0, 1] and is text-conditioned; got "
                             f"latent={latent!r}, output_range={tuple(output_range)}, conditioning={conditioning!r}")
        mults = tuple(channel_multipliers) if channel_multipliers is not None else G_ARCH.get(image_size)
        if mults is None:
            raise ValueError(f"image_size={image_size} has no default layout (have {sorted(G_ARCH)}); "
                             "pass channel_multipliers")
        n_up = math.log2(image_size / 4)
        if n_up != int(n_up) or len(mults) != int(n_up):
            raise ValueError(f"image_size={image_size} needs log2(image_size / 4) up blocks, got "
                             f"channel_multipliers={mults}")
        n_global = math.log2(cond_size / 4)
        if n_global != int(n_global) or not 1 <= n_global <= len(mults):
            raise ValueError(f"cond_size={cond_size} must be 4 * 2^k with 1 <= k <= {len(mults)}")
        if min(gf_dim, z_dim, word_dim, sentence_dim) < 1 or min(mults) < 1:
            raise ValueError("gf_dim, z_dim, word_dim, sentence_dim and channel_multipliers must be positive")
        self.n_global = int(n_global)
        self.bottom_channels = gf_dim * 16
        cond_dim = 2 * z_dim
        spatial_dim = word_dim + cond_dim
        self.sentence_fc = nn.Linear(sentence_dim, z_dim)            # global_cond = dense_fn(z_dim)(cond)
        self.fc = nn.Linear(z_dim, self.bottom_channels * 4 * 4)      # x = dense_fn(gf * 16 * 4 * 4)(z)
        blocks, in_ch = [], self.bottom_channels
        for i, m in enumerate(mults):
            spatial = i >= self.n_global
            blocks.append(GenBlock(in_ch, gf_dim * m, spatial_dim if spatial else cond_dim, spatial,
                                   bn_momentum, bn_eps))
            in_ch = gf_dim * m
            if i == self.n_global - 1:
                self.region_channels = in_ch
        self.blocks = nn.ModuleList(blocks)
        self.region_conv = nn.Conv2d(self.region_channels, word_dim, 1)   # conv_fn(embedding_dim, (1, 1))
        self.norm_out = SpatialBatchNorm(in_ch, spatial_dim, bn_momentum, bn_eps)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, 1, 1)
        _glorot_init(self)

    def forward(self, z: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                sentence: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = z.shape[0]
        if z.shape != (b, cfg.z_dim):
            raise ValueError(f"z must be (B, {cfg.z_dim}), got {tuple(z.shape)}")
        _check_text(words, word_mask, sentence, b, cfg.word_dim, cfg.sentence_dim)
        c = torch.cat([self.sentence_fc(sentence), z], dim=1)                        # (B, 2 z_dim)
        # Flax reshapes the dense output to NHWC (B, 4, 4, C); same unit order here.
        h = self.fc(z).view(b, 4, 4, self.bottom_channels).permute(0, 3, 1, 2)
        for block in self.blocks[:self.n_global]:
            h = block(h, c)
        side = h.shape[-1]
        regions = self.region_conv(h).flatten(2).transpose(1, 2)                     # (B, R, word_dim)
        context = word_attention(regions, words, word_mask, cfg.gamma)               # (B, R, word_dim)
        context = context.transpose(1, 2).reshape(b, cfg.word_dim, side, side)
        s = torch.cat([context, c[:, :, None, None].expand(-1, -1, side, side)], dim=1)
        # The official loop upsamples s before every block; SpatialBatchNorm upsamples its 1x1-conv outputs
        # instead (same values, see there), so s stays at cond_size.
        for block in self.blocks[self.n_global:]:
            h = block(h, s, s)
        h = self.conv_out(F.relu(self.norm_out(h, s)))
        return (torch.tanh(h) + 1.0) / 2.0


class XMCDOutput(NamedTuple):
    """Discriminator output over N images (N = k * B for B captions: the real and fake halves).

    logits (N,); features (N, C) = ``x_pool``; sentence (N, C) = ``SNDense(s)`` tiled to the images;
    regions (N, R, word_dim) from the ``cond_size`` map (R = cond_size^2).
    """

    logits: torch.Tensor
    features: torch.Tensor
    sentence: torch.Tensor
    regions: torch.Tensor


class XMCDiscriminator(nn.Module):
    """XMC-GAN's contrastive discriminator (``xmc_net.py::Discriminator``), spectral-normed throughout.

    ``DiscOptimizedBlock(df)`` then ``DiscBlock(df * m, downsample)`` per ``layout`` (``D_ARCH``); the output
    of the last block at ``cond_size`` x ``cond_size`` (pre-activation, as ``x_cond``) feeds the region
    conv; then ReLU, sum over H, W.

    Args:
        image_size, df_dim (96 official), word_dim, sentence_dim,
        layout: ((multiplier, downsample), ...) after the optimized block; None = ``D_ARCH[image_size]``.
        cond_size: region map side (16 official).
        sn: spectral norm (``d_spectral_norm=True``).

    Shapes: images (N, 3, S, S) with N a multiple of B, sentence (B, sentence_dim) (tiled to N like the
    official ``jnp.tile``) -> :class:`XMCDOutput`.
    """

    def __init__(self, image_size: int = 128, df_dim: int = 96, word_dim: int = 768, sentence_dim: int = 768,
                 layout: Optional[Sequence[Sequence]] = None, cond_size: int = 16, sn: bool = True):
        super().__init__()
        layout = tuple((int(m), bool(d)) for m, d in layout) if layout is not None else D_ARCH.get(image_size)
        if layout is None:
            raise ValueError(f"image_size={image_size} has no default D layout (have {sorted(D_ARCH)}); pass layout")
        self.image_size, self.cond_size, self.sentence_dim = image_size, cond_size, sentence_dim
        blocks = [DBlock(3, df_dim, downsample=True, optimized=True, sn=False)]
        in_ch, res = df_dim, image_size // 2
        self.region_index = None
        for i, (m, down) in enumerate(layout):
            blocks.append(DBlock(in_ch, df_dim * m, downsample=down, sn=False))
            in_ch, res = df_dim * m, res // 2 if down else res
            if res == cond_size:
                # ``if x.shape[1] == self.cond_size: x_cond = x`` keeps the LAST DiscBlock at that size.
                self.region_index, self.region_channels = i + 1, in_ch
        if self.region_index is None:
            raise ValueError(f"no DiscBlock of layout {layout} outputs a {cond_size} x {cond_size} map at "
                             f"image_size={image_size}")
        self.blocks = nn.ModuleList(blocks)
        self.linear = nn.Linear(in_ch, 1)                          # dense_fn(1)(x_pool)
        self.sentence_proj = nn.Linear(sentence_dim, in_ch)       # dense_fn(df * channel_dims[-1], use_bias=True)
        self.region_conv = nn.Conv2d(self.region_channels, word_dim, 1)
        _glorot_init(self)
        if sn:
            _apply_sn(self)

    def forward(self, images: torch.Tensor, sentence: torch.Tensor) -> XMCDOutput:
        n, b = images.shape[0], sentence.shape[0]
        if images.dim() != 4 or images.shape[1] != 3 or sentence.dim() != 2 or sentence.shape[1] != self.sentence_dim:
            raise ValueError(f"need images (N, 3, H, W) and sentence (B, {self.sentence_dim}), got "
                             f"{tuple(images.shape)} and {tuple(sentence.shape)}")
        if b == 0 or n % b:
            raise ValueError(f"the number of images ({n}) must be a multiple of the number of sentences ({b})")
        h, x_cond = images, None
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.region_index:
                x_cond = h
        pooled = F.relu(h).sum(dim=(2, 3))                                          # x_pool (N, C)
        proj = self.sentence_proj(sentence).repeat(n // b, 1)                       # jnp.tile (N, C)
        logits = self.linear(pooled).squeeze(1) + (pooled * proj).sum(dim=1)
        regions = self.region_conv(x_cond).flatten(2).transpose(1, 2)               # (N, R, word_dim)
        return XMCDOutput(logits, pooled, proj, regions)


# ----------------------------------------------------------------------------------------------------
# Pretrained image encoder of the image-image term
# ----------------------------------------------------------------------------------------------------
_ENCODER_ARCHS = ("resnet50", "vgg16", "vgg19")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PretrainedImageEncoder(nn.Module):
    """A frozen ImageNet classifier whose logits the image-image term contrasts (always in eval mode).

    Official (``xmc_gan.py::calculate_contrastive_loss_on_pretrained``,
    ``utils/pretrained_model_utils.py::get_pretrained_embs``): images in [0, 1] resized to 224 x 224 with
    ``jax.image.resize(..., "bilinear")`` (antialiased when shrinking, as here) into the authors' own Flax
    ResNet-50, whose 1000-d ``out`` (logits) is used; their network takes [0, 1] input without ImageNet
    normalisation. torchvision weights expect ImageNet-normalised input: ``normalize="imagenet"``
    (default here), ``"none"`` for a network trained on [0, 1] input. The paper text names a VGG network
    instead (``arch="vgg16"`` / ``"vgg19"``).

    Args:
        arch: a torchvision architecture in ``("resnet50", "vgg16", "vgg19")``.
        weights: a local torchvision ``state_dict`` file (``.pth``; a ``{"state_dict": ...}`` wrapper is
            accepted). Nothing is downloaded.
        random_init: allow ``weights=None`` (random network: tests and smoke runs only).

    Shapes: images (B, 3, H, W) in [0, 1] -> logits (B, 1000).
    """

    def __init__(self, arch: str = "resnet50", weights: Optional[str] = None, random_init: bool = False,
                 input_size: int = 224, normalize: str = "imagenet"):
        super().__init__()
        import torchvision

        if arch not in _ENCODER_ARCHS:
            raise ValueError(f"image encoder arch must be one of {_ENCODER_ARCHS}, got {arch!r}")
        if normalize not in ("imagenet", "none"):
            raise ValueError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
        if weights is None and not random_init:
            raise ValueError("the image-image term needs pretrained weights: set model.image_encoder.weights to a "
                             "local torchvision state_dict file, or model.image_encoder.random_init=true (tests), "
                             "or model.pretrained_image_contrastive=false")
        if input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {input_size}")
        self.net = getattr(torchvision.models, arch)(weights=None)
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"image encoder weights not found: {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            try:
                self.net.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"{path} is not a torchvision {arch} state_dict: {e}") from e
        self.net.requires_grad_(False).eval()
        self.input_size, self.normalize = input_size, normalize
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "PretrainedImageEncoder":
        super().train(mode)
        self.net.eval()  # frozen BatchNorm statistics (official ``train=False``)
        return self

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        x = images01
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.normalize == "imagenet":
            x = (x - self.mean) / self.std
        return self.net(x)


# ----------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------
@dataclass
class TextCondition:
    """Text features of B captions: words (B, T, D), word_mask (B, T) bool, sentence (B, D).

    Slicing slices all three (the GAN base cuts a batch into its D-update chunks)."""

    words: torch.Tensor
    word_mask: torch.Tensor
    sentence: torch.Tensor

    def __getitem__(self, index) -> "TextCondition":
        return TextCondition(self.words[index], self.word_mask[index], self.sentence[index])

    def __len__(self) -> int:
        return self.words.shape[0]

    def to(self, device) -> "TextCondition":
        return TextCondition(self.words.to(device), self.word_mask.to(device), self.sentence.to(device))


@dataclass
class XMCImageEncoderConfig:
    """The pretrained network of the image-image term (:class:`PretrainedImageEncoder`)."""

    arch: Literal["resnet50", "vgg16", "vgg19"] = "resnet50"   # official ResNet-50; paper text: VGG
    weights: Optional[str] = None                               # local torchvision state_dict
    random_init: bool = False                                   # tests / smoke runs only
    input_size: int = 224                                       # RESNET_IMG_SIZE
    normalize: Literal["imagenet", "none"] = "imagenet"


@dataclass
class XMCGANModelConfig:
    """Model and loss settings; names follow ``configs/coco_xmc.py`` where it has them."""

    image_size: int = 128
    gf_dim: int = 96
    df_dim: int = 96
    z_dim: int = 128
    g_channel_multipliers: Optional[list[int]] = None     # None = G_ARCH[image_size]
    d_channel_multipliers: Optional[list[int]] = None     # None = D_ARCH[image_size]
    d_downsample: Optional[list[bool]] = None
    cond_size: int = 16
    gamma_for_g: float = 15.0
    d_spectral_norm: bool = True
    word_contrastive: bool = True
    sentence_contrastive: bool = True
    image_contrastive: bool = True
    pretrained_image_contrastive: bool = True
    word_weight: float = 1.0          # the official code adds every term with weight 1
    sentence_weight: float = 1.0
    image_weight: float = 1.0
    pretrained_image_weight: float = 1.0
    temperature: float = 0.1          # attention_lib.contrastive_loss
    gamma1: float = 5.0               # attention_lib.word_loss
    gamma2: float = 5.0
    gamma3: float = 50.0
    gather_distributed: bool = False  # official: per-device losses (sync_match=False)
    image_encoder: XMCImageEncoderConfig = field(default_factory=XMCImageEncoderConfig)


@dataclass
class XMCTextConfig:
    """The frozen text encoder. ``encoder``: a local Hugging Face directory (BERT-base for the paper
    configs); None = the packaged MiniLM. ``random_init``: a tiny random BERT (smoke runs). ``cache``: a
    :class:`~text2image.text_encoder.TextFeatureCache` file for this encoder, built from the training
    captions if missing; ``"auto"`` = ``<data root>/text_features/<encoder>_<max_tokens>_<pooling>.safetensors``;
    None = run the encoder every step."""

    encoder: Optional[str] = None
    random_init: bool = False
    max_tokens: int = 17              # COCO_MAX_TEXT_LENGTH; 64 for LN datasets
    pooling: Literal["official_sum", "mean", "cls"] = "official_sum"
    cache: Optional[str] = None


@dataclass
class XMCDataConfig:
    """``kind`` in ``caption_data.DATASET_KINDS``. ``root``: the dataset root; for ``shapes`` None means
    ``<run.output_dir>/data/shapes_<image_size>px``, written if missing with ``num_images`` / ``seed``."""

    kind: Literal["shapes", "coco", "cub", "lncoco"] = "shapes"
    root: Optional[str] = None
    version: Literal["2014", "2017"] = "2014"   # COCO captions release
    hflip: bool = True
    missing: Literal["error", "skip"] = "error"
    num_images: int = 512
    seed: int = 0


@dataclass
class XMCGANConfig(GANConfig):
    method: str = "xmcgan"
    model: XMCGANModelConfig = field(default_factory=XMCGANModelConfig)
    text: XMCTextConfig = field(default_factory=XMCTextConfig)
    data: XMCDataConfig = field(default_factory=XMCDataConfig)


class XMCGANMethod(GANMethod):
    """XMC-GAN on the shared GAN skeleton: ``gan.g_step="joint"`` with ``gan.n_dis=2`` is the official
    ``train_utils.py::train_step`` (``train_d`` on the first half of the loaded batch, ``train_g_d`` on the
    second); the hooks below add the contrastive terms to each side."""

    config_class = XMCGANConfig
    output_range = (0.0, 1.0)

    def __init__(self, cfg: XMCGANConfig):
        super().__init__(cfg)
        m = cfg.model
        for name in ("word_weight", "sentence_weight", "image_weight", "pretrained_image_weight"):
            if getattr(m, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(m, name)}")
        # eps 1e-6 on the norm = attention_lib.l2_normalize's rsqrt(max(sum x^2, 1e-12)); it matters for
        # all-zero regions (black shapes backgrounds through a zero-bias D at init).
        self.word_loss = WordRegion(m.gamma1, m.gamma2, m.gamma3, eps=1e-6, gather_distributed=m.gather_distributed)
        self.info_nce = InfoNCE(m.temperature, symmetric=True, gather_distributed=m.gather_distributed)
        self.text: Optional[TextEncoder] = None
        self.cache: Optional[TextFeatureCache] = None
        self.image_encoder: Optional[PretrainedImageEncoder] = None
        self.dataset = None

    def contrastive(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``attention_lib.contrastive_loss``: the SUM of both directions = 2 x symmetric InfoNCE."""
        return 2.0 * self.info_nce(a, b)

    # --- models and data ------------------------------------------------------------------------
    def _text_encoder(self) -> TextEncoder:
        if self.text is None:
            t = self.cfg.text
            if t.random_init:
                if t.encoder is not None:
                    raise ValueError(f"text.random_init=true builds a random encoder; text.encoder={t.encoder!r} "
                                     "would be ignored")
                self.text = TextEncoder.from_config(max_tokens=t.max_tokens, pooling=t.pooling)
            else:
                self.text = TextEncoder(t.encoder, max_tokens=t.max_tokens, pooling=t.pooling)
        return self.text

    def _data_root(self) -> Path:
        d = self.cfg.data
        if d.root:
            return Path(d.root)
        if d.kind != "shapes":
            raise ValueError(f"data.root must name the {d.kind} dataset directory")
        return Path(self.cfg.run.output_dir) / "data" / f"shapes_{self.cfg.model.image_size}px"

    def data_root(self) -> Path:
        """The dataset root, with the embedded shapes data written there first if it is missing."""
        root, d = self._data_root(), self.cfg.data
        if d.kind == "shapes":
            from cmgen.data import ensure_dataset, write_shapes
            ensure_dataset(root, "dataset_info.json", lambda: write_shapes(
                root, num_images=d.num_images, image_size=self.cfg.model.image_size, seed=d.seed, progress=False))
        return root

    def build_models(self, cfg: XMCGANConfig) -> dict[str, nn.Module]:
        m = cfg.model
        dim = self._text_encoder().dim
        layout = None
        if m.d_channel_multipliers is not None or m.d_downsample is not None:
            if m.d_channel_multipliers is None or m.d_downsample is None or \
                    len(m.d_channel_multipliers) != len(m.d_downsample):
                raise ValueError("model.d_channel_multipliers and model.d_downsample must be given together, "
                                 f"with equal lengths; got {m.d_channel_multipliers} and {m.d_downsample}")
            layout = list(zip(m.d_channel_multipliers, m.d_downsample))
        g = XMCGenerator(image_size=m.image_size, gf_dim=m.gf_dim, z_dim=m.z_dim, word_dim=dim, sentence_dim=dim,
                         channel_multipliers=m.g_channel_multipliers, cond_size=m.cond_size, gamma=m.gamma_for_g)
        d = XMCDiscriminator(image_size=m.image_size, df_dim=m.df_dim, word_dim=dim, sentence_dim=dim,
                             layout=layout, cond_size=m.cond_size, sn=m.d_spectral_norm)
        if m.pretrained_image_contrastive:
            e = m.image_encoder
            self.image_encoder = PretrainedImageEncoder(e.arch, e.weights, e.random_init, e.input_size, e.normalize)
        return {"g": g, "d": d}

    def build_dataset(self, cfg: XMCGANConfig):
        from text2image.caption_data import caption_dataset

        text = self._text_encoder()
        use_cache = cfg.text.cache is not None
        self.dataset = caption_dataset(cfg.data.kind, self.data_root(), "train", cfg.model.image_size,
                                       tokenizer=None if use_cache else text.tokenizer, max_tokens=cfg.text.max_tokens,
                                       hflip=cfg.data.hflip, version=cfg.data.version, missing=cfg.data.missing)
        if use_cache:
            path = self._cache_path()
            if not path.is_file():
                from cmgen.data import ensure_dataset
                captions = [c for caps in self.dataset.captions for c in caps]
                ensure_dataset(path.parent, path.name, lambda: TextFeatureCache.build(path, captions, text))
            self.cache = TextFeatureCache(path)
            self.cache.check_settings(cfg.text.max_tokens, cfg.text.pooling)
        return self.dataset

    # --- text -----------------------------------------------------------------------------------
    def _cache_path(self) -> Path:
        t = self.cfg.text
        if t.cache != "auto":
            return Path(t.cache)
        tag = "random" if t.random_init else "minilm" if t.encoder is None else Path(t.encoder).name
        return self.data_root() / "text_features" / f"{tag}_{t.max_tokens}_{t.pooling}.safetensors"

    def encode_captions(self, captions: Sequence[str], device: torch.device) -> TextCondition:
        """Text features of raw captions (from the cache when it holds all of them)."""
        if self.cache is not None and all(c in self.cache for c in captions):
            words, mask, sentence = self.cache.lookup(list(captions))
        else:
            words, mask, sentence = self._text_encoder().to(device).encode(list(captions))
        return TextCondition(words, mask, sentence).to(device)

    def real_batch(self, batch: dict) -> tuple[torch.Tensor, TextCondition]:
        images = batch["image"]
        if self.cache is not None or "input_ids" not in batch:
            return images, self.encode_captions(batch["caption"], images.device)
        words, mask, sentence = self._text_encoder().to(images.device).encode_tokens(batch["input_ids"],
                                                                                    batch["attention_mask"])
        return images, TextCondition(words, mask, sentence).to(images.device)

    # --- the GAN hooks --------------------------------------------------------------------------
    def sample_latents(self, n: int, device: torch.device, generator: torch.Generator | None = None,
                       cond_real: Optional[TextCondition] = None):
        """z ~ N(0, I) and the real batch's captions: a fake and the real at the same index share a caption
        (``train_g_d`` feeds ``batch`` to both G and D)."""
        if cond_real is None:
            raise ValueError("XMC-GAN fakes take the captions of the real batch (cond_real); the sample grid "
                             "uses sample_inputs")
        if len(cond_real) != n:
            raise ValueError(f"need {n} captions for {n} fakes, got {len(cond_real)}")
        return torch.randn(n, self.cfg.model.z_dim, generator=generator).to(device), cond_real

    def generate(self, g: nn.Module, z: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return g(z, cond.words, cond.word_mask, cond.sentence)

    def discriminate(self, d: nn.Module, images: torch.Tensor, cond: TextCondition) -> XMCDOutput:
        return d(images, cond.sentence)

    def concat_conditions(self, a: TextCondition, b: TextCondition) -> TextCondition:
        return TextCondition(torch.cat([a.words, b.words]), torch.cat([a.word_mask, b.word_mask]),
                             torch.cat([a.sentence, b.sentence]))

    def d_forward(self, d: nn.Module, s: GANStep) -> tuple[XMCDOutput, XMCDOutput]:
        """One D forward over ``cat[real, fake]`` with the B shared sentences tiled inside D
        (``xmc_net.py::Discriminator``: ``jnp.tile(embedding, (tile_num, 1))``)."""
        cond = s.cond_real if s.cond_fake is s.cond_real else self.concat_conditions(s.cond_real, s.cond_fake)
        out = self.discriminate(d, torch.cat([s.real, s.fake]), cond)
        return self.split_output(out, s.real.shape[0])

    def g_forward(self, d: nn.Module, s: GANStep) -> tuple[XMCDOutput, XMCDOutput]:
        """With ``gan.g_step="separate"`` G's loss still needs D(real) (image-image term)."""
        return self.d_forward(d, s)

    def d_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """``hinge + word(real) + sentence(real)`` (``calculate_contrastive_loss``: ``c_loss_d = real_loss``)."""
        m, r = self.cfg.model, s.out_real
        terms = {"d_adv": hinge_d_loss(r.logits, s.out_fake.logits)}
        if m.word_contrastive:
            terms["d_word"] = m.word_weight * self.word_loss(r.regions, s.cond_real.words, s.cond_real.word_mask)
        if m.sentence_contrastive:
            terms["d_sentence"] = m.sentence_weight * self.contrastive(r.features, r.sentence)
        return terms

    def g_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """``-D(fake) + word(fake) + sentence(fake) + image(D) + image(pretrained)`` (``train_g_d``)."""
        m, f = self.cfg.model, s.out_fake
        terms = {"g_adv": hinge_g_loss(f.logits)}
        if m.word_contrastive:
            terms["g_word"] = m.word_weight * self.word_loss(f.regions, s.cond_fake.words, s.cond_fake.word_mask)
        if m.sentence_contrastive:
            terms["g_sentence"] = m.sentence_weight * self.contrastive(f.features, f.sentence)
        if m.image_contrastive:
            terms["g_image"] = m.image_weight * self.contrastive(f.features, s.out_real.features)
        if m.pretrained_image_contrastive:
            enc = self.image_encoder.to(s.fake.device)
            with torch.no_grad():
                real_logits = enc(s.real)
            terms["g_image_pretrained"] = m.pretrained_image_weight * self.contrastive(real_logits, enc(s.fake))
        return terms

    # --- samples --------------------------------------------------------------------------------
    def grid_captions(self) -> list[str]:
        """The first caption of the first ``gan.samples_per_class`` training images (fixed grid)."""
        if self.dataset is None:
            raise ValueError("build_dataset must run before the sample grid (its captions come from the data)")
        n = min(self.cfg.gan.samples_per_class, len(self.dataset))
        return [self.dataset.captions[i][0] for i in range(n)]

    def sample_inputs(self, device: torch.device):
        if self._fixed is None:
            captions = self.grid_captions()
            gen = torch.Generator().manual_seed(self.cfg.gan.sample_seed)
            self._fixed = (torch.randn(len(captions), self.cfg.model.z_dim, generator=gen), captions)
        z, captions = self._fixed
        return z.to(device), self.encode_captions(captions, device)

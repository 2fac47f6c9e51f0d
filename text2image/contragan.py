"""ContraGAN (Kang & Park, NeurIPS 2020): a BigGAN whose discriminator is conditioned by the 2C loss.

D maps an image to pooled features h, an adversarial logit ``linear1(h)`` and an embedding
``e = linear2(h)``; the class-embedding table gives each label's proxy ``p_y`` (StudioGAN
``src/models/big_resnet.py``, ``d_cond_mtd == "2C"``). Both are normalised inside
:class:`cmgen.losses.TwoC` (StudioGAN ``normalize_d_embed``).

Objective, as StudioGAN ``src/worker.py`` (``train_discriminator`` / ``train_generator``) applies it:

    L_D = hinge(D(x), D(G(z, y'))) + lambda * 2C(e(x), p_y, y)              (real images, real labels)
    L_G = -mean D(G(z, y'))        + lambda * 2C(e(G(z, y')), p_y', y')     (fakes, their sampled labels)

(Paper Algorithm 1 / Eq. 8: the 2C term of D uses real samples, that of G fake samples; with
``aux_cls_type = "ADC"`` StudioGAN would also add fake terms to D, which the ContraGAN configs do not.)
The proxies get gradients only from D's loss: they are D parameters, frozen in the G step.

Config (``src/configs/CIFAR10/ContraGAN.yaml`` on StudioGAN's defaults): BigGAN-32, g/d_conv_dim 96,
z 80, shared 128, 512-d embedding, hinge, lambda = 1, t = 1.0, Adam 2e-4 (0.5, 0.999), 5 D steps,
G-EMA; the tiny shapes config in ``configs/contragan/shapes.yaml`` shrinks the widths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cmgen.losses import TwoC
from text2image.gan import GANConfig, GANMethod, GANStep
from text2image.layers import DBlock, GBlock, SelfAttention, init_weights, sn_embedding, snconv2d, snlinear

__all__ = ["ContraGANModelConfig", "ShapesClassDataConfig", "ContraGANConfig", "DOutput", "Generator",
           "Discriminator", "ContraGANMethod"]

# BigGAN layouts by resolution (StudioGAN big_resnet): G channel multipliers per up block from 4x4,
# D (multiplier, downsample) per block.
_G_ARCH = {32: (4, 4, 4), 64: (16, 8, 4, 2)}
_D_ARCH = {32: ((2, True), (2, True), (2, False), (2, False)),
           64: ((1, True), (2, True), (4, True), (8, True), (16, False))}


class DOutput(NamedTuple):
    """Discriminator output. logits (B,); embeddings (B, E); proxies (B, E) = class embedding of each label;
    features (B, C) = ReLU + sum-pooled last feature map."""

    logits: torch.Tensor
    embeddings: torch.Tensor
    proxies: torch.Tensor
    features: torch.Tensor


class Generator(nn.Module):
    """BigGAN generator with a shared class embedding and hierarchical z (Brock et al. 2019, Sec. 3).

    z (B, z_dim) is split into ``len(blocks) + 1`` chunks: the first feeds the linear map to the 4x4
    map, each other one joins the shared embedding of y as the condition of one block's cBN.

    Args:
        z_dim: must be divisible by the number of chunks (4 at 32 px, 5 at 64 px).
        shared_dim: size of the shared class embedding.
        num_classes, channels (``g_conv_dim``), image_size (32 or 64).
        attention_at: resolution after which a self-attention block runs (16 in StudioGAN's 32 px
            config), None for none.

    Shapes: z (B, z_dim), y (B,) int64 -> images (B, 3, image_size, image_size) in [-1, 1] (tanh).
    """

    def __init__(self, z_dim: int = 80, shared_dim: int = 128, num_classes: int = 10, channels: int = 96,
                 image_size: int = 32, attention_at: Optional[int] = 16, sn: bool = True, init: str = "ortho"):
        super().__init__()
        if image_size not in _G_ARCH:
            raise ValueError(f"image_size must be one of {sorted(_G_ARCH)}, got {image_size}")
        mults = _G_ARCH[image_size]
        chunks = len(mults) + 1
        if z_dim % chunks:
            raise ValueError(f"z_dim={z_dim} must be divisible by {chunks} (hierarchical z at {image_size} px)")
        self.z_dim, self.num_classes, self.chunk = z_dim, num_classes, z_dim // chunks
        self.bottom_channels = channels * mults[0]
        self.shared = nn.Embedding(num_classes, shared_dim)
        self.linear0 = snlinear(self.chunk, self.bottom_channels * 4 * 4, sn=sn)
        cond_dim = shared_dim + self.chunk
        blocks, in_ch, res = [], self.bottom_channels, 4
        valid_attention = [4 * 2 ** (i + 1) for i in range(len(mults))]
        if attention_at is not None and attention_at not in valid_attention:
            raise ValueError(f"attention_at must be one of {valid_attention} or None, got {attention_at}")
        self.attention_index, self.attention = None, None
        for i, m in enumerate(mults):
            blocks.append(GBlock(in_ch, channels * m, cond_dim, sn))
            in_ch, res = channels * m, res * 2
            if res == attention_at:
                self.attention_index, self.attention = i, SelfAttention(in_ch, sn)
        self.blocks = nn.ModuleList(blocks)
        self.bn = nn.BatchNorm2d(in_ch, eps=1e-4)
        self.conv_out = snconv2d(in_ch, 3, 3, 1, 1, sn=sn)
        init_weights(self, init)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim or y.shape != (z.shape[0],):
            raise ValueError(f"need z (B, {self.z_dim}) and y (B,), got {tuple(z.shape)} and {tuple(y.shape)}")
        zs = z.split(self.chunk, dim=1)
        shared = self.shared(y)                                          # (B, shared_dim)
        h = self.linear0(zs[0]).view(z.shape[0], self.bottom_channels, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([shared, zs[i + 1]], dim=1))
            if i == self.attention_index:
                h = self.attention(h)
        return torch.tanh(self.conv_out(F.relu(self.bn(h))))


class Discriminator(nn.Module):
    """SN-ResNet discriminator with ContraGAN's embedding head and proxy table.

    blocks -> ReLU -> sum over H, W = h (B, C); logits = linear1(h) (B,); embeddings = linear2(h) (B, E);
    proxies = embedding(y) (B, E). All layers spectral-normed (StudioGAN ``apply_d_sn``).

    Args:
        num_classes, channels (``d_conv_dim``), embed_dim (``d_embed_dim``), image_size (32 or 64),
        attention_at: resolution after which self-attention runs (16 at 32 px), None for none.

    Shapes: images (B, 3, S, S), y (B,) int64 -> :class:`DOutput`.
    """

    def __init__(self, num_classes: int = 10, channels: int = 96, embed_dim: int = 512, image_size: int = 32,
                 attention_at: Optional[int] = 16, sn: bool = True, init: str = "ortho"):
        super().__init__()
        if image_size not in _D_ARCH:
            raise ValueError(f"image_size must be one of {sorted(_D_ARCH)}, got {image_size}")
        self.num_classes, self.image_size = num_classes, image_size
        blocks, in_ch, res = [], 3, image_size
        self.attention_index, self.attention = None, None
        for i, (m, down) in enumerate(_D_ARCH[image_size]):
            blocks.append(DBlock(in_ch, channels * m, downsample=down, optimized=i == 0, sn=sn))
            in_ch, res = channels * m, res // 2 if down else res
            if res == attention_at and self.attention is None:
                self.attention_index, self.attention = i, SelfAttention(in_ch, sn)
        if attention_at is not None and self.attention is None:
            raise ValueError(f"attention_at={attention_at} is not a feature-map size of the {image_size} px D")
        self.blocks = nn.ModuleList(blocks)
        self.linear1 = snlinear(in_ch, 1, sn=sn)
        self.linear2 = snlinear(in_ch, embed_dim, sn=sn)
        self.embedding = sn_embedding(num_classes, embed_dim, sn=sn)
        init_weights(self, init)

    def forward(self, images: torch.Tensor, y: torch.Tensor) -> DOutput:
        if images.dim() != 4 or images.shape[1] != 3 or y.shape != (images.shape[0],):
            raise ValueError(f"need images (B, 3, H, W) and y (B,), got {tuple(images.shape)} and {tuple(y.shape)}")
        h = images
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attention_index:
                h = self.attention(h)
        h = F.relu(h).sum(dim=(2, 3))                                    # (B, C)
        return DOutput(self.linear1(h).squeeze(1), self.linear2(h), self.embedding(y), h)


@dataclass
class ContraGANModelConfig:
    """Model and 2C-loss hyperparameters (StudioGAN names in brackets)."""

    image_size: int = 32
    z_dim: int = 80
    shared_dim: int = 128                 # g_shared_dim
    g_channels: int = 96                  # g_conv_dim
    d_channels: int = 96                  # d_conv_dim
    embed_dim: int = 512                  # d_embed_dim
    attention_at: Optional[int] = 16      # apply_attn with attn_g_loc / attn_d_loc at 16x16
    sn_g: bool = True                     # apply_g_sn
    init: str = "ortho"                   # g_init = d_init (text2image.layers.init_weights)
    cond_lambda: float = 1.0              # lambda of the 2C terms
    temperature: float = 1.0              # t
    pos_collected_numerator: bool = True
    gather_distributed: bool = True       # 2C over the global batch under DDP (no-op on one process)


@dataclass
class ShapesClassDataConfig:
    """The class-conditional ImageFolder of the embedded ``shapes`` data (class = primary shape).

    ``root``: a shapes dataset root (``imagefolder/train``, ``annotations/attributes_train.json``); None
    means cmgen's embedded shapes at its one location, ``data/shapes-<digest>`` (or under ``$CMGEN_DATA``),
    written with ``cmgen.data.write_shapes(num_images, model.image_size, seed)`` on first use.
    ``generate``: ``auto`` (write only at that default location), ``always`` or ``never``; a root given
    here is never replaced by generated data (:func:`cmgen.data.prepare_embedded_data`).
    """

    root: Optional[str] = None
    generate: Literal["auto", "always", "never"] = "auto"
    num_images: int = 512
    seed: int = 0
    hflip: bool = True


@dataclass
class ContraGANConfig(GANConfig):
    method: str = "contragan"
    model: ContraGANModelConfig = field(default_factory=ContraGANModelConfig)
    data: ShapesClassDataConfig = field(default_factory=ShapesClassDataConfig)


def _random_hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) if torch.rand(()) < 0.5 else x


class ContraGANMethod(GANMethod):
    """ContraGAN on the shared GAN skeleton: the base's hinge terms plus ``lambda * 2C`` on each side."""

    config_class = ContraGANConfig

    def __init__(self, cfg: ContraGANConfig):
        super().__init__(cfg)
        m = cfg.model
        self.two_c = TwoC(temperature=m.temperature, pos_collected_numerator=m.pos_collected_numerator,
                          gather_distributed=m.gather_distributed)
        self.num_classes: Optional[int] = None

    def _ensure_data(self) -> Path:
        """The data root, the embedded shapes written on first use (resolved once: it waits on every rank)."""
        if getattr(self, "_root_cache", None) is None:
            from cmgen.data import prepare_embedded_data

            d = self.cfg.data
            self._root_cache = prepare_embedded_data(
                d.root, "shapes", dict(num_images=d.num_images, image_size=self.cfg.model.image_size, seed=d.seed),
                d.generate, required=("imagefolder/train", "annotations/attributes_train.json"))
        return self._root_cache

    def _classes(self) -> list[str]:
        from text2image.data import ShapesAttributes
        return ShapesAttributes(self._ensure_data(), "train").classes

    def build_models(self, cfg: ContraGANConfig) -> dict[str, nn.Module]:
        m = cfg.model
        self.num_classes = len(self._classes())
        return {"g": Generator(m.z_dim, m.shared_dim, self.num_classes, m.g_channels, m.image_size,
                               m.attention_at, m.sn_g, m.init),
                "d": Discriminator(self.num_classes, m.d_channels, m.embed_dim, m.image_size, m.attention_at,
                                   init=m.init)}

    def build_dataset(self, cfg: ContraGANConfig):
        from text2image.data import class_conditional_imagefolder
        classes = self._classes()
        root = self._ensure_data() / "imagefolder" / "train"
        return class_conditional_imagefolder(root, cfg.model.image_size, _random_hflip if cfg.data.hflip else None,
                                             (-1.0, 1.0), classes)

    def sample_latents(self, n: int, device: torch.device, generator: torch.Generator | None = None,
                       cond_real=None):
        """z ~ N(0, I) (B, z_dim) and labels uniform over classes (StudioGAN ``y_sampler="totally_random"``)."""
        if self.num_classes is None:
            raise ValueError("build_models must run before sampling (the class count comes from the data)")
        z = torch.randn(n, self.cfg.model.z_dim, generator=generator)
        y = torch.randint(self.num_classes, (n,), generator=generator)
        return z.to(device), y.to(device)

    def sample_inputs(self, device: torch.device):
        """``samples_per_class`` fixed z per class, class-major (one grid row per class when square)."""
        if self._fixed is None:
            gen = torch.Generator().manual_seed(self.cfg.gan.sample_seed)
            k = self.cfg.gan.samples_per_class
            z = torch.randn(self.num_classes * k, self.cfg.model.z_dim, generator=gen)
            self._fixed = (z, torch.arange(self.num_classes).repeat_interleave(k))
        z, y = self._fixed
        return z.to(device), y.to(device)

    def d_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """Hinge + ``lambda * 2C(e(x), p_y, y)`` on the reals with their real labels."""
        lam = self.cfg.model.cond_lambda
        return {**super().d_loss(s),
                "d_2c": lam * self.two_c(s.out_real.embeddings, s.out_real.proxies, s.cond_real)}

    def g_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        """Hinge + ``lambda * 2C(e(G(z, y')), p_y', y')`` on the fakes with their sampled labels."""
        lam = self.cfg.model.cond_lambda
        return {**super().g_loss(s),
                "g_2c": lam * self.two_c(s.out_fake.embeddings, s.out_fake.proxies, s.cond_fake)}

"""ContraD (Jeong & Shin, "Training GANs with Stronger Augmentations via Contrastive Discriminator", ICLR 2021).

Transcribed from github.com/jh-jeong/ContraD at commit 4ac8ce538cfc5d068da52b960afe5227862162ff:
``training/gan/contrad.py`` (``loss_D_fn``, ``loss_G_fn``, ``supcon_fake``), ``training/criterion.py``
(``nt_xent``), ``models/gan/base.py`` (``BaseDiscriminator``, ``TinyDiscriminator``),
``models/gan/sndcgan.py`` (``G_SNDCGAN``, ``D_SNDCGAN``), ``models/gan/snresnet.py`` (``SNResNet``),
``models/gan/__init__.py`` (``get_architecture``: ``mlp_linear=True``, ``d_hidden`` 512 / 1024),
``train_gan.py`` (loop, ``_update_warmup``), ``configs/gan/**`` and ``EXPERIMENTS.md`` (``--aug simclr
--use_warmup`` on CIFAR, ``simclr_hq`` on CelebA-HQ), ``configs/defaults/gan.gin`` (warm-up 3000).

Discriminator = backbone f (features h, dimension d) + three heads on h:

    proj1 = Linear(d, h) - LeakyReLU(0.1) - Linear(h, 128)      (SimCLR head)
    proj2 = Linear(d, h) - LeakyReLU(0.1) - Linear(h, 128)      (supcon-fake head)
    disc  = Linear(d, h) - LeakyReLU(0.1) - Linear(h, 1)        (TinyDiscriminator, on stop-grad(h) in D's loss)

with h = 512 (SNDCGAN, the tiny CPU backbone) or 1024 (SNResNet-18), spectral norm on every conv and
linear layer, heads included (``D_SNDCGAN`` / ``SNResNet`` apply ``spectral_norm`` to all modules after
the heads exist). D maps its [0, 1] input to [-1, 1] itself (``penultimate``: ``x * 2 - 1``).

One D update (paper Algorithm 1, ``loss_D_fn``), with x the reals, a = the stochastic augmentation and
one forward of D over ``a(cat[x, x, G(z).detach()])``:

    v1, v2, v_f  = the three thirds of that batch
    L_con = NT-Xent(norm proj1(v1), norm proj1(v2); tau)                         (Eq. 4)
    L_dis = supcon-fake(norm proj2(v1), norm proj2(v2), norm proj2(v_f); tau)    (Eq. 5)
    L_D   = L_con + lambda_a * L_dis + softplus(disc(sg h(v_f))) + softplus(-disc(sg h(v1)))   (Eq. 6)

supcon-fake is :class:`cmgen.losses.SupCon` over the 3N rows with the fakes as the only anchors (other
fakes positive, every other row in the denominator) and ``base_temperature = temperature`` (the official
loss has no T / base_T factor). The G update (``loss_G_fn``): ``L_G = softplus(-D(a(G(z))))`` through the
whole D (no stop-gradient there). ``model.loss = "hinge"``: ``relu(1 + d_f) + relu(1 - d_r)`` for D and
``-d_f`` for G (the official ``hinge`` branch; CelebA-HQ).

Noise z ~ U(-1, 1)^128 (``G_SNDCGAN.sample_latent``); G ends in ``0.5 * tanh + 0.5`` so images are in
[0, 1]; no EMA in the official loop; G's BatchNorm statistics move in the D steps too (G is in train mode
there), so ``gan.track_g_bn_in_d_steps`` defaults to true here. Linear LR warm-up: the official
``_update_warmup`` uses ``min(1, (step + 1) / 3000)`` with steps counted from 1; the engine's schedule
(``schedule.warmup_steps: 3000``) counts from 0, one step behind.

``model.augment`` names a :func:`text2image.augment.build_augment` mode: ``simclr``, ``simclr_hq`` and
``simclr_hq_cutout`` take ``aug_scale`` (crop) and ``aug_jitter``; the official ``hfrt``
(``HorizontalFlipRandomCrop``: flip + integer translation) and ``simclr_hfrt`` (hfrt in place of simclr's
crop and flip, then simclr's colour ops with ``aug_jitter``) take ``aug_max_pixels`` and ``aug_padding``.

Linear evaluation of the frozen D backbone (the official ``test_lineval.py``; the paper's second claim):
``cmgen eval probe --gan-checkpoint RUN [--random-init]`` (:mod:`evaluation.probe_cli`), on the backbone
output ``ContraDOutput.features`` of shapes images, class = shape. The embedded shapes run is judged by
:func:`unconditional_shapes_scores` (ContraD is unconditional: no class to compare samples with).

Under several processes the official NT-Xent and supcon-fake gather with ``GatherLayer`` (backward =
this rank's slice, then DDP's mean over W processes: the contrastive gradients are 1/W of the global
loss's). Here ``model.gather_distributed = True`` gives the exact global-batch losses; the official
``_nuisance`` term (0 * projection means, for DDP's unused-parameter check) is not needed because the G
step calls the unwrapped, frozen D.

StyleGAN2 variant (``model.arch: stylegan2``; :mod:`text2image.stylegan2`): the official
``train_stylegan2.py configs/gan/stylegan2/c10_style64.gin stylegan2 --mode=contrad --aug=simclr
--lbd_r1=0.1 --no_lazy --halflife_k=1000 --use_warmup`` (CIFAR) and ``train_stylegan2_contraD.py
afhq_*_style64.gin stylegan2_512 ... --lbd_r1=0.5 --halflife_k=20`` (AFHQ, lazy R1 every 16 steps) of
EXPERIMENTS.md. G = StyleGAN2 (z ~ N(0, I)^512, 8 mapping layers, style mixing 0.9 while training); D =
the residual StyleGAN2 backbone (``ResidualDiscriminatorP``, minibatch stddev) with the same three heads
(plain nn.Linear, no spectral norm, PyTorch init: ``BaseDiscriminator``). The D loss adds R1 on reals
augmented as D's input (``r1_loss`` / ``G_D.forward(return_r1_loss=True)``: a fresh ``aug(x)``, the
gradient of the full D's logits, no stop-gradient): ``d_r1 = r1_gamma / 2 * mean ||grad||^2 * r1_every``
on engine steps with ``(step + 1) % r1_every == 0``, nothing on the others. ``model.d_passes``:
``"joint"`` = one D forward over ``aug(cat[x, x, fake])`` (``training/gan/contrad.py``, which
``train_stylegan2.py`` uses on CIFAR), ``"separate"`` = ``D(aug(fake))`` and ``D(aug(cat[x, x]))``
(``train_stylegan2_contraD.py`` lines 142-150); they differ only through the minibatch-stddev groups.
The G step is the SNDCGAN one (``softplus(-D(aug(G(z))))`` through the whole D, as both scripts), with
G in training mode (style mixing). Not reproduced: the official loops update G before D in each step
(``train_stylegan2.py`` even feeds D the fakes drawn before G's update); the engine updates D first.
No path-length regularisation (neither official script has one). G's EMA: ``ema.decay = 0.5 **
(batch / (halflife_k * 1000))``, copied until ``batch * steps > halflife_k * 1000`` (``ema.start_step``).
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

from cmgen import distributed as cdist
from cmgen.losses import NTXent, SupCon
from text2image.contragan import ClassImageDataConfig, build_class_image_dataset, draw_latents
from text2image.gan import GANConfig, GANMethod, GANSettings, GANStep
from text2image.layers import SN_EPS
from text2image.stylegan2 import StyleGAN2Backbone, StyleGAN2Generator, lazy_r1, r1_due, r1_penalty

__all__ = ["SNDCGANGenerator", "SNDCGANBackbone", "SNResNet18Backbone", "TinyBackbone", "ContraDiscriminator",
           "ContraDOutput", "ContraDModelConfig", "ContraDConfig", "ContraDMethod", "supcon_fake",
           "unconditional_shapes_scores", "CONFIDENT_THRESHOLD", "SHAPES_CRITERION", "meets_shapes_criterion"]


def _sn(module: nn.Module, enabled: bool = True) -> nn.Module:
    return torch.nn.utils.parametrizations.spectral_norm(module, eps=SN_EPS) if enabled else module


def _normal_init(module: nn.Module) -> None:
    """``reset_parameters`` of G_SNDCGAN / D_SNDCGAN: N(0, 0.02) weights, zero biases, BN (1, 0)."""
    from text2image.layers import _raw_weight
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
                nn.init.normal_(_raw_weight(m), 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()


# --- generator --------------------------------------------------------------------------------------
class SNDCGANGenerator(ModelMixin, ConfigMixin):
    """``G_SNDCGAN``: z -> Linear -> BN -> ReLU -> (s/8)^2 x 8 ngf map -> 3 x [ConvT 4x4/2, BN, ReLU] ->
    ConvT 3x3 -> tanh, mapped to ``output_range`` ((0, 1): ``0.5 * tanh + 0.5``, the official).

    The first BatchNorm normalises the flat linear output, viewed as (B, 8 ngf s_h s_w, 1, 1), as the
    official ``norm_init``. A diffusers model; its config carries ``z_dim``, ``latent`` ("uniform":
    U(-1, 1), the official), ``num_classes`` (0: unconditional) and ``output_range``.

    Shapes: z (B, z_dim), y None -> images (B, 3, image_size, image_size).
    """

    @register_to_config
    def __init__(self, image_size: int = 32, channels: int = 64, z_dim: int = 128, latent: str = "uniform",
                 num_classes: int = 0, output_range: Sequence[float] = (0.0, 1.0)):
        super().__init__()
        if image_size % 8 or image_size < 8:
            raise ValueError(f"SNDCGAN needs image_size divisible by 8, got {image_size}")
        if latent not in ("normal", "uniform"):
            raise ValueError(f"latent must be 'normal' or 'uniform', got {latent!r}")
        if num_classes != 0:
            raise ValueError(f"the SNDCGAN generator is unconditional (num_classes = 0), got {num_classes}")
        if len(output_range) != 2 or not float(output_range[0]) < float(output_range[1]):
            raise ValueError(f"output_range must be (low, high) with low < high, got {output_range!r}")
        self.range = (float(output_range[0]), float(output_range[1]))
        self.z_dim, self.ngf, self.sb = z_dim, channels, image_size // 8
        flat = channels * 8 * self.sb * self.sb
        self.linear = nn.Linear(z_dim, flat)
        self.norm_init = nn.BatchNorm2d(flat)
        ngf = channels
        self.main = nn.Sequential(
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1), nn.BatchNorm2d(ngf * 4), nn.ReLU(),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1), nn.BatchNorm2d(ngf * 2), nn.ReLU(),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1), nn.BatchNorm2d(ngf), nn.ReLU(),
            nn.ConvTranspose2d(ngf, 3, 3, 1, 1), nn.Tanh())
        _normal_init(self)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return draw_latents(n, self.z_dim, self.config.latent, generator)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if y is not None:
            raise ValueError("the SNDCGAN generator is unconditional; pass y=None")
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"need z (B, {self.z_dim}), got {tuple(z.shape)}")
        h = self.linear(z)[:, :, None, None]
        h = F.relu(self.norm_init(h)).view(z.shape[0], self.ngf * 8, self.sb, self.sb)
        lo, hi = self.range
        return lo + (hi - lo) * 0.5 * (self.main(h) + 1.0)


# --- discriminator backbones --------------------------------------------------------------------------
class SNDCGANBackbone(nn.Module):
    """``D_SNDCGAN.main``: conv3 (ndf) / [conv4 s2, conv3] at 2, 4, 8 ndf, LeakyReLU(0.1) after each;
    features = the flattened last map, d = 8 ndf (H/8)(W/8). Input in [0, 1]."""

    def __init__(self, image_size: int = 32, channels: int = 64, sn: bool = True):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"SNDCGAN needs image_size divisible by 8, got {image_size}")
        c = channels
        layers, chans = [], [(3, c, 3, 1), (c, 2 * c, 4, 2), (2 * c, 2 * c, 3, 1), (2 * c, 4 * c, 4, 2),
                             (4 * c, 4 * c, 3, 1), (4 * c, 8 * c, 4, 2), (8 * c, 8 * c, 3, 1)]
        for cin, cout, k, s in chans:
            layers += [_sn(nn.Conv2d(cin, cout, k, s, 1), sn), nn.LeakyReLU(0.1)]
        self.main = nn.Sequential(*layers)
        self.out_features = 8 * c * (image_size // 8) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x * 2.0 - 1.0).flatten(1)


class _BasicBlock(nn.Module):
    """``snresnet.BasicBlock``: lrelu(conv1) -> conv2, + shortcut (1x1 conv if shape changes), lrelu."""

    def __init__(self, cin: int, cout: int, stride: int, sn: bool):
        super().__init__()
        self.conv1 = _sn(nn.Conv2d(cin, cout, 3, stride, 1), sn)
        self.conv2 = _sn(nn.Conv2d(cout, cout, 3, 1, 1), sn)
        self.shortcut = (_sn(nn.Conv2d(cin, cout, 1, stride), sn) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.leaky_relu(self.conv1(x), 0.1))
        return F.leaky_relu(h + self.shortcut(x), 0.1)


class SNResNet18Backbone(nn.Module):
    """``D_SNResNet18``: conv3 64, 4 stages of 2 BasicBlocks (64, 128/2, 256/2, 512/2), 4x4 average pool;
    d = 512. 32 px input only (the official ``avg_pool2d(out, 4)`` + ``view``); PyTorch default init."""

    def __init__(self, image_size: int = 32, sn: bool = True):
        super().__init__()
        if image_size != 32:
            raise ValueError(f"SNResNet-18 (ContraD) takes 32 px images, got {image_size}")
        self.conv1 = _sn(nn.Conv2d(3, 64, 3, 1, 1), sn)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, cout, stride, sn), _BasicBlock(cout, cout, 1, sn)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.out_features = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(F.leaky_relu(self.conv1(x * 2.0 - 1.0), 0.1))
        return F.avg_pool2d(h, 4).flatten(1)


class TinyBackbone(nn.Module):
    """A small CPU backbone in SNDCGAN style (not in the official code): conv3 (c), then conv4 s2 to 2c,
    4c, 8c, LeakyReLU(0.1) after each; features = the flattened (H/8, W/8) map. Input in [0, 1]."""

    def __init__(self, image_size: int = 32, channels: int = 8, sn: bool = True):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"the tiny backbone needs image_size divisible by 8, got {image_size}")
        c, layers = channels, []
        for cin, cout, k, s in ((3, c, 3, 1), (c, 2 * c, 4, 2), (2 * c, 4 * c, 4, 2), (4 * c, 8 * c, 4, 2)):
            layers += [_sn(nn.Conv2d(cin, cout, k, s, 1), sn), nn.LeakyReLU(0.1)]
        self.main = nn.Sequential(*layers)
        self.out_features = 8 * c * (image_size // 8) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x * 2.0 - 1.0).flatten(1)


class ContraDOutput(NamedTuple):
    """logits (B,); proj1, proj2 (B, proj_dim) (not normalised); features (B, d) = backbone output."""

    logits: torch.Tensor
    proj1: torch.Tensor
    proj2: torch.Tensor
    features: torch.Tensor


def _head(d: int, hidden: int, out: int, sn: bool) -> nn.Sequential:
    return nn.Sequential(_sn(nn.Linear(d, hidden), sn), nn.LeakyReLU(0.1), _sn(nn.Linear(hidden, out), sn))


class ContraDiscriminator(nn.Module):
    """Backbone + ``projection`` / ``projection2`` / ``linear`` heads (``BaseDiscriminator`` with
    ``mlp_linear=True``).

    Args:
        arch: ``"sndcgan"`` (h 512), ``"snresnet18"`` (h 1024), ``"tiny"`` (h 512) or ``"stylegan2"``
            (h 512; :class:`text2image.stylegan2.StyleGAN2Backbone`, nn.Linear heads with PyTorch init).
        image_size, channels: backbone size (ndf; ignored by snresnet18).
        hidden: head width h; None = the official value for ``arch``.
        proj_dim: 128 (``d_project``). sn: spectral norm on backbone and heads (must be False for stylegan2).
        small32, channel_multiplier: the StyleGAN2 width table (:func:`text2image.stylegan2.stylegan2_channels`;
            ``channels`` is then the width at 4 px, 512 official).

    ``forward(x, sg_linear=False)``: ``sg_linear`` detaches the features under the discriminator head
    (D's loss). Shapes: x (B, 3, H, W) in [0, 1] -> :class:`ContraDOutput`.
    """

    def __init__(self, arch: str = "sndcgan", image_size: int = 32, channels: int = 64, hidden: Optional[int] = None,
                 proj_dim: int = 128, sn: bool = True, small32: bool = True, channel_multiplier: float = 2.0):
        super().__init__()
        if arch == "stylegan2":           # text2image.stylegan2; small32 / channel_multiplier: its width table
            if sn:
                raise ValueError("the StyleGAN2 discriminator has no spectral norm (official "
                                 "ResidualDiscriminatorP); set model.sn=false")
            self.backbone = StyleGAN2Backbone(image_size, channels, small32, channel_multiplier)
        elif arch == "sndcgan":
            self.backbone = SNDCGANBackbone(image_size, channels, sn)
        elif arch == "snresnet18":
            self.backbone = SNResNet18Backbone(image_size, sn)
        elif arch == "tiny":
            self.backbone = TinyBackbone(image_size, channels, sn)
        else:
            raise ValueError(f"model.arch must be sndcgan, snresnet18, tiny or stylegan2, got {arch!r}")
        hidden = hidden if hidden is not None else (1024 if arch == "snresnet18" else 512)
        d = self.backbone.out_features
        self.projection = _head(d, hidden, proj_dim, sn)
        self.projection2 = _head(d, hidden, proj_dim, sn)
        self.linear = _head(d, hidden, 1, sn)
        if arch not in ("snresnet18", "stylegan2"):   # D_SNDCGAN.reset_parameters covers the heads too
            _normal_init(self)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, sg_linear: bool = False) -> ContraDOutput:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"need images (B, 3, H, W), got {tuple(x.shape)}")
        h = self.backbone(x)
        logits = self.linear(h.detach() if sg_linear else h).squeeze(1)
        return ContraDOutput(logits, self.projection(h), self.projection2(h), h)


# --- losses ---------------------------------------------------------------------------------------
def supcon_fake(real1: torch.Tensor, real2: torch.Tensor, fakes: torch.Tensor, temperature: float,
                gather_distributed: bool = False) -> torch.Tensor:
    """ContraD's supcon-fake (Eq. 5) through :class:`cmgen.losses.SupCon`: rows ``[real1; real2; fakes]``
    (already L2-normalised, (N, D) each), fakes the anchors, other fakes their positives, every other row
    in the denominator; ``base_temperature = temperature``. Real rows get labels unique over all ranks
    so they are nobody's positive."""
    n = real1.shape[0]
    dev = real1.device
    offset = cdist.rank() * 2 * n if gather_distributed else 0
    labels = torch.cat([torch.arange(1, 2 * n + 1, device=dev) + offset, torch.zeros(fakes.shape[0], dtype=torch.long,
                                                                                     device=dev)])
    anchors = torch.cat([torch.zeros(2 * n, dtype=torch.bool, device=dev),
                         torch.ones(fakes.shape[0], dtype=torch.bool, device=dev)])
    loss = SupCon(temperature=temperature, base_temperature=temperature, gather_distributed=gather_distributed)
    return loss(torch.cat([real1, real2, fakes])[:, None, :], labels=labels, anchor_mask=anchors)


@dataclass
class ContraDModelConfig:
    """ContraD model and loss settings (official names in brackets)."""

    mode: Literal["contrad", "std"] = "contrad"   # --mode: "std" = the same G/D as a plain GAN (no heads' losses, no aug)
    arch: Literal["sndcgan", "snresnet18", "tiny", "stylegan2"] = "sndcgan"
    image_size: int = 32
    z_dim: int = 128                     # nz
    latent: Literal["normal", "uniform"] = "uniform"
    g_channels: int = 64                 # ngf
    d_channels: int = 64                 # ndf (sndcgan, tiny)
    d_hidden: Optional[int] = None       # d_hidden: 512 sndcgan / tiny, 1024 snresnet18
    proj_dim: int = 128                  # d_project
    sn: bool = True
    temperature: float = 0.1             # --temp
    lambda_a: float = 1.0                # --lbd_a
    loss: Literal["nonsat", "hinge"] = "nonsat"   # options.loss
    augment: str = "simclr"              # --aug (text2image.augment.build_augment)
    aug_scale: tuple[float, float] = (0.2, 1.0)                  # RandomResizeCropLayer.scale (simclr*)
    aug_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)   # ColorJitterLayer b, c, s, h
    aug_max_pixels: int = 4              # HorizontalFlipRandomCrop.max_pixels (hfrt, simclr_hfrt; 4 at 32 px)
    aug_padding: str = "reflection"      # HorizontalFlipRandomCrop.padding_mode (hfrt, simclr_hfrt)
    gather_distributed: bool = True      # contrastive terms over the global batch under DDP
    # arch = stylegan2 (text2image.stylegan2; official values: tests/test_stylegan2.py OFFICIAL). There
    # g_channels / d_channels are the widths at 4 px (512 official) and scale the whole width table.
    sg_small32: bool = True              # get_architecture 'stylegan2' (32 px table); false: 'stylegan2_512'
    sg_channel_multiplier: float = 2.0   # Generator / ResidualDiscriminatorP default; 1.0 for stylegan2_512
    sg_n_mlp: int = 8                    # n_mlp (mapping layers)
    sg_lr_mlp: float = 0.01              # lr_mlp
    style_mix: float = 0.9               # --style_mix
    r1_gamma: Optional[float] = None     # --lbd_r1; None: 0.1 for stylegan2 (EXPERIMENTS.md, CIFAR), 0 otherwise
    r1_every: int = 1                    # --d_reg_every (16) unless --no_lazy (1, the CIFAR runs)
    d_passes: Literal["joint", "separate"] = "joint"   # one D forward over aug(cat[x, x, fake]), or two


@dataclass
class ContraDConfig(GANConfig):
    method: str = "contrad"
    gan: GANSettings = field(default_factory=lambda: GANSettings(n_dis=1, track_g_bn_in_d_steps=True,
                                                                 samples_per_class=64))
    model: ContraDModelConfig = field(default_factory=ContraDModelConfig)
    data: ClassImageDataConfig = field(default_factory=ClassImageDataConfig)


class ContraDMethod(GANMethod):
    """ContraD on the shared GAN step: ``d_forward`` runs D once on ``aug(cat[x, x, fake])``;
    ``g_forward`` on ``aug(G(z))``; the losses are the module docstring's."""

    config_class = ContraDConfig
    output_range = (0.0, 1.0)

    def __init__(self, cfg: ContraDConfig):
        super().__init__(cfg)
        m = cfg.model
        if m.mode not in ("contrad", "std"):
            raise ValueError(f"model.mode must be 'contrad' or 'std', got {m.mode!r}")
        if m.loss not in ("nonsat", "hinge"):
            raise ValueError(f"model.loss must be 'nonsat' or 'hinge', got {m.loss!r}")
        from text2image.augment import build_augment
        kw = {}
        if m.augment.startswith("simclr"):
            b, c, sat, h = m.aug_jitter
            kw = dict(brightness=b, contrast=c, saturation=sat, hue=h)
        if m.augment in ("hfrt", "simclr_hfrt"):      # integer translation + flip instead of the resized crop
            kw.update(max_pixels=int(m.aug_max_pixels), padding_mode=m.aug_padding)
        elif m.augment.startswith("simclr"):
            kw["scale"] = tuple(m.aug_scale)
        self.aug = build_augment(m.augment, **kw)
        self.nt_xent = NTXent(temperature=m.temperature, normalize=False, gather_distributed=m.gather_distributed)
        self._dataset = None
        if m.d_passes not in ("joint", "separate"):
            raise ValueError(f"model.d_passes must be 'joint' or 'separate', got {m.d_passes!r}")
        if m.r1_every < 1 or self.r1_gamma < 0:
            raise ValueError(f"need model.r1_every >= 1 and model.r1_gamma >= 0, got {m.r1_every}, {m.r1_gamma}")

    @property
    def r1_gamma(self) -> float:
        """R1 weight: ``model.r1_gamma``, or 0.1 for stylegan2 (official CIFAR runs) and 0 for the others."""
        m = self.cfg.model
        return float(m.r1_gamma) if m.r1_gamma is not None else (0.1 if m.arch == "stylegan2" else 0.0)

    def _data(self):
        if self._dataset is None:
            self._dataset = build_class_image_dataset(self.cfg, self.cfg.model.image_size, self.output_range)
        return self._dataset

    def build_models(self, cfg: ContraDConfig) -> dict[str, nn.Module]:
        m = cfg.model
        if m.arch == "stylegan2":
            g = StyleGAN2Generator(m.image_size, m.z_dim, m.sg_n_mlp, m.g_channels, m.sg_small32,
                                   m.sg_channel_multiplier, m.sg_lr_mlp, m.style_mix, m.latent)
        else:
            g = SNDCGANGenerator(m.image_size, m.g_channels, m.z_dim, m.latent, 0, self.output_range)
        return {"g": g, "d": ContraDiscriminator(m.arch, m.image_size, m.d_channels, m.d_hidden, m.proj_dim, m.sn,
                                                 m.sg_small32, m.sg_channel_multiplier)}

    def build_dataset(self, cfg: ContraDConfig):
        return self._data()[0]

    def real_batch(self, batch):
        images, _labels = batch          # unconditional: class labels are not used
        return images, None

    def sample_latents(self, n: int, device: torch.device, generator: torch.Generator | None = None, cond_real=None):
        """z ~ ``model.latent`` (official: U(-1, 1)^128); no condition."""
        return draw_latents(n, self.cfg.model.z_dim, self.cfg.model.latent, generator).to(device), None

    def generate(self, g: nn.Module, z: torch.Tensor, cond) -> torch.Tensor:
        return g(z, None)

    def d_forward(self, d: nn.Module, s: GANStep):
        """One D forward over ``aug(cat[x, x, fake.detach()])``; out_real = both real views (2N rows).
        ``model.d_passes = "separate"``: ``D(aug(fake))`` then ``D(aug(cat[x, x]))``. On R1 steps, after
        those, the per-sample R1 of a fresh ``aug(x)`` (std mode: x) goes to ``s.extras["r1"]``."""
        n, m = s.real.shape[0], self.cfg.model
        if m.mode == "std":      # training/gan/std.py: D(x), D(G(z)), no augmentation
            out = d(torch.cat([s.real, s.fake.detach()]))
            outs = ContraDOutput(*(t[:n] for t in out)), ContraDOutput(*(t[n:] for t in out))
        elif m.d_passes == "separate":          # train_stylegan2_contraD.py G_D.forward: fakes, then cat[x, x]
            out_f = d(self.aug(s.fake.detach()), sg_linear=True)
            outs = d(self.aug(torch.cat([s.real, s.real])), sg_linear=True), out_f
        else:
            out = d(self.aug(torch.cat([s.real, s.real, s.fake.detach()])), sg_linear=True)
            outs = ContraDOutput(*(t[:2 * n] for t in out)), ContraDOutput(*(t[2 * n:] for t in out))
        if self.r1_gamma > 0 and r1_due(s.step, m.r1_every):     # train_stylegan2*.py: R1 after the D loss
            raw_d = s.ctx.unwrap("d") if s.ctx is not None else d
            s.extras["r1"] = r1_penalty(lambda x: raw_d(x).logits, s.real if m.mode == "std" else self.aug(s.real))
        return outs

    def g_forward(self, d: nn.Module, s: GANStep):
        """``D(aug(G(z)))`` through the whole D (D frozen); ``D(G(z))`` in std mode."""
        return None, d(s.fake if self.cfg.model.mode == "std" else self.aug(s.fake))

    def _adv(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        if self.cfg.model.loss == "nonsat":
            return F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        return F.relu(1.0 + d_fake).mean() + F.relu(1.0 - d_real).mean()

    def d_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        m, n = self.cfg.model, s.real.shape[0]
        r1 = {"d_r1": lazy_r1(s.extras["r1"], self.r1_gamma, m.r1_every)} if "r1" in s.extras else {}
        if m.mode == "std":
            return {"d_adv": self._adv(s.out_real.logits, s.out_fake.logits), **r1}
        p1 = F.normalize(s.out_real.proj1, dim=1)
        con = self.nt_xent(p1[:n], p1[n:])
        p2r, p2f = F.normalize(s.out_real.proj2, dim=1), F.normalize(s.out_fake.proj2, dim=1)
        dis = supcon_fake(p2r[:n], p2r[n:], p2f, m.temperature, m.gather_distributed)
        return {"d_simclr": con, "d_supcon_fake": m.lambda_a * dis,
                "d_adv": self._adv(s.out_real.logits[:n], s.out_fake.logits), **r1}

    def g_loss(self, s: GANStep) -> dict[str, torch.Tensor]:
        d_fake = s.out_fake.logits
        return {"g_adv": F.softplus(-d_fake).mean() if self.cfg.model.loss == "nonsat" else -d_fake.mean()}


# --- how the embedded shapes run is judged -----------------------------------------------------------
CONFIDENT_THRESHOLD = 0.5
# issue 7's criterion for an unconditional G on shapes: this share of confident samples, all 5 shapes predicted
SHAPES_CRITERION = {"confident": 0.60, "classes": 5}


def meets_shapes_criterion(scores: dict) -> bool:
    """Whether :func:`unconditional_shapes_scores` output meets :data:`SHAPES_CRITERION`."""
    return (scores.get("confident", 0.0) >= SHAPES_CRITERION["confident"]
            and scores.get("classes_covered", 0) >= SHAPES_CRITERION["classes"])
"""Max softmax probability of the shapes classifier (:class:`evaluation.shapes_eval.ShapesEvaluator`)
above which a sample counts as a recognisable shape. The classifier is under-confident on REAL shapes:
on the 375 held-out real images of its own render, 76% reach 0.5 (89% of those correctly classified),
61% reach 0.6 and only 6% reach 0.9, so 0.9 would fail real images; 0.5 is the threshold used here."""


def unconditional_shapes_scores(evaluator, images01: torch.Tensor,
                                threshold: float = CONFIDENT_THRESHOLD) -> dict[str, float | list[float]]:
    """Scores of UNCONDITIONAL samples ``(N, 3, H, W)`` in [0, 1] (no class to compare with):

    - ``confident``: fraction whose max class probability is >= ``threshold``;
    - ``class_histogram`` (5 fractions of the predicted shape) and ``class_entropy`` = its entropy / log 5
      (1 = all classes equally often, 0 = one class): a collapsed or junk G is often confidently ONE class
      (the classifier calls a random ContraD G's grey images "circle" at 100%), so confidence alone
      means nothing without coverage;
    - ``classes_covered`` (predicted at least once) and ``shapes_fd`` (evaluator feature space, not FID).
    """
    _, logits = evaluator.features(images01)
    conf, pred = logits["shape"].softmax(1).max(1)
    k = logits["shape"].shape[1]
    hist = torch.bincount(pred, minlength=k).double() / pred.numel()
    nz = hist[hist > 0]
    entropy = abs(float((nz * nz.log()).sum() / math.log(k)))      # abs: no -0.0 for one class
    return {"confident": float((conf >= threshold).double().mean()), "threshold": float(threshold),
            "class_histogram": [float(h) for h in hist], "class_entropy": entropy,
            "classes_covered": int((hist > 0).sum()), "shapes_fd": float(evaluator.evaluate(images01)["shapes_fd"])}

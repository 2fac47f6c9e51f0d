"""StudioGAN's DCGAN backbone (``MODEL.backbone: "deep_conv"``) for ContraGAN and its same-size baselines.

Transcribed from PyTorch-StudioGAN at commit 947b35e9835b67860fdce44d337f6d7fee7c8db3:
``src/models/deep_conv.py`` (``GenBlock``, ``Generator``, ``DiscBlock``, ``Discriminator``),
``src/utils/ops.py`` (``ConditionalBatchNorm2d``, ``batchnorm_2d``: eps 1e-4, momentum 0.1) and
``src/config.py`` ``define_modules`` (which layers get spectral norm or BatchNorm). 32 px only, as there.

Generator (``g_cond_mtd = "cBN"``; the cBN condition is the one-hot label, ``affine_input_dim =
num_classes``; no hierarchical z: all of z feeds ``linear0``)::

    z -> linear0 -> (8c, 4, 4) -> 3 x [deconv4 s2 p1 -> cBN(onehot(y)) -> ReLU] -> (c, 32, 32)
      -> conv3 -> tanh

with block in-channels (8, 4, 2) x c and out-channels (4, 2, 1) x c; StudioGAN fixes c = 64
(``in_dims = [512, 256, 128]``, ``out_dims = [256, 128, 64]``), here ``channels`` (default 64) so a CPU
config can shrink it. cBN = ``BN(x, affine=False) * (1 + gain(onehot)) + bias(onehot)`` with bias-free
linear maps (:class:`text2image.layers.ConditionalBatchNorm2d`).

Discriminator (``d_act_fn`` ReLU)::

    3 x [conv3 s1 p1 -> (BN) -> ReLU -> conv4 s2 p1 -> (BN) -> ReLU]   out (1, 2, 4) x c: 32 -> 4 px
      -> conv3 (4c -> 8c) -> (BN) -> ReLU -> sum over H, W = h (B, 8c)

then the heads of :class:`text2image.contragan.ConditionalDiscriminator` (``linear1``; 2C ``linear2`` +
``embedding``; PD ``embedding``). StudioGAN: c = 64 (``in_dims = [3, 64, 128]``, ``out_dims = [64, 128,
256]``, ``conv1`` 256 -> 512). With ``apply_d_sn`` (``sn=True``, every ContraGAN config) each conv /
linear / embedding is spectral-normed and there is no BatchNorm; without it (StudioGAN's own DCGAN.yaml
default) every conv is followed by BatchNorm instead. Self-attention (``apply_attn``, off in StudioGAN's
DCGAN configs) after the block whose output has resolution ``attention_at``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from text2image.contragan import (ClassConditionalGenerator, ConditionalDiscriminator, _check_generator_args,
                                  _check_output_range)
from text2image.layers import ConditionalBatchNorm2d, SelfAttention, init_weights, snconv2d, sndeconv2d, snlinear

__all__ = ["DC_G_LAYOUT", "DC_D_LAYOUT", "DC_BN_EPS", "DCGANGenerator", "DCGANDiscriminator"]

# deep_conv.py (947b35e) as multipliers of c = 64: G in_dims [512, 256, 128] / out_dims [256, 128, 64];
# D in_dims [3, 64, 128] / out_dims [64, 128, 256] ("in" None = RGB), then conv1 256 -> 512 ("top").
DC_G_LAYOUT = {"in": (8, 4, 2), "out": (4, 2, 1)}
DC_D_LAYOUT = {"in": (None, 1, 2), "out": (1, 2, 4), "top": 8}
DC_BN_EPS = 1e-4          # ops.batchnorm_2d
_BOTTOM, _IMAGE_SIZE = 4, 32


def _attention_index(attention_at: Optional[int], resolutions: list[int], what: str) -> Optional[int]:
    if attention_at is None:
        return None
    if attention_at not in resolutions:
        raise ValueError(f"attention_at must be one of {resolutions} or None for the DCGAN {what}, got {attention_at}")
    return resolutions.index(attention_at)


class DCGANGenerator(ClassConditionalGenerator):
    """StudioGAN ``deep_conv.Generator`` with one-hot cBN conditioning (module docstring).

    A diffusers model (``save_pretrained`` / ``from_pretrained``), sampled like the BigGAN
    :class:`text2image.contragan.Generator`.

    Args:
        z_dim: noise size (StudioGAN's DCGAN: 128).
        num_classes, channels (c; StudioGAN 64), image_size (32 only).
        attention_at: 8, 16 or 32 (the resolution after a block; ``attn_g_loc`` 1, 2, 3), None for none.
        sn: spectral norm on every conv / deconv / linear (``apply_g_sn``); init: ``g_init``.
        latent, output_range: as the BigGAN generator.

    Shapes: z (B, z_dim), y (B,) int64 -> images (B, 3, 32, 32) in ``output_range``.
    """

    @register_to_config
    def __init__(self, z_dim: int = 128, num_classes: int = 10, channels: int = 64, image_size: int = 32,
                 attention_at: Optional[int] = None, sn: bool = False, init: str = "ortho", latent: str = "normal",
                 output_range: Sequence[float] = (-1.0, 1.0)):
        super().__init__()
        if image_size != _IMAGE_SIZE:
            raise ValueError(f"the DCGAN (deep_conv) backbone is 32 px only, got image_size={image_size}")
        _check_generator_args(num_classes, latent)
        self.range = _check_output_range(output_range)
        self.num_classes = num_classes
        self.bottom_channels = channels * DC_G_LAYOUT["in"][0]
        self.linear0 = snlinear(z_dim, self.bottom_channels * _BOTTOM * _BOTTOM, sn=sn)
        resolutions = [_BOTTOM * 2 ** (i + 1) for i in range(len(DC_G_LAYOUT["in"]))]
        self.attention_index = _attention_index(attention_at, resolutions, "generator")
        self.deconvs = nn.ModuleList(sndeconv2d(channels * i, channels * o, 4, 2, 1, sn=sn)
                                     for i, o in zip(DC_G_LAYOUT["in"], DC_G_LAYOUT["out"]))
        self.bns = nn.ModuleList(ConditionalBatchNorm2d(channels * o, num_classes, sn, eps=DC_BN_EPS)
                                 for o in DC_G_LAYOUT["out"])
        self.attention = (None if self.attention_index is None else
                          SelfAttention(channels * DC_G_LAYOUT["out"][self.attention_index], sn))
        self.conv_out = snconv2d(channels * DC_G_LAYOUT["out"][-1], 3, 3, 1, 1, sn=sn)
        init_weights(self, init)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        self._check_inputs(z, y)
        onehot = F.one_hot(y, self.num_classes).to(z.dtype)
        h = self.linear0(z).view(z.shape[0], self.bottom_channels, _BOTTOM, _BOTTOM)
        for i, (deconv, bn) in enumerate(zip(self.deconvs, self.bns)):
            h = F.relu(bn(deconv(h), onehot))
            if i == self.attention_index:
                h = self.attention(h)
        return self._to_range(self.conv_out(h))


class _DCBlock(nn.Module):
    """StudioGAN ``deep_conv.DiscBlock``: conv3 s1 -> (BN) -> ReLU -> conv4 s2 -> (BN) -> ReLU; BN only
    without spectral norm."""

    def __init__(self, in_channels: int, out_channels: int, sn: bool):
        super().__init__()
        self.conv0 = snconv2d(in_channels, out_channels, 3, 1, 1, sn=sn)
        self.conv1 = snconv2d(out_channels, out_channels, 4, 2, 1, sn=sn)
        self.bn0 = None if sn else nn.BatchNorm2d(out_channels, eps=DC_BN_EPS)
        self.bn1 = None if sn else nn.BatchNorm2d(out_channels, eps=DC_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(x)
        h = F.relu(h if self.bn0 is None else self.bn0(h))
        h = self.conv1(h)
        return F.relu(h if self.bn1 is None else self.bn1(h))


class DCGANDiscriminator(ConditionalDiscriminator):
    """StudioGAN ``deep_conv.Discriminator`` with the ContraGAN heads (module docstring).

    Args:
        num_classes, channels (c; StudioGAN 64), embed_dim (``d_embed_dim``), image_size (32 only),
        attention_at: 16, 8 or 4 (``attn_d_loc`` 1, 2, 3), None for none,
        sn: ``apply_d_sn`` (False: BatchNorm after every conv instead), init: ``d_init``,
        cond_mtd: ``"2C"``, ``"PD"`` or ``"W/O"``; adc: ``aux_cls_type "ADC"`` (2K proxies, as the BigGAN D).

    Shapes: images (B, 3, 32, 32), y (B,) int64 -> :class:`text2image.contragan.DOutput`.
    """

    def __init__(self, num_classes: int = 10, channels: int = 64, embed_dim: int = 512, image_size: int = 32,
                 attention_at: Optional[int] = None, sn: bool = True, init: str = "ortho", cond_mtd: str = "2C",
                 adc: bool = False):
        super().__init__()
        if image_size != _IMAGE_SIZE:
            raise ValueError(f"the DCGAN (deep_conv) backbone is 32 px only, got image_size={image_size}")
        self.image_size = image_size
        resolutions = [_IMAGE_SIZE // 2 ** (i + 1) for i in range(len(DC_D_LAYOUT["in"]))]
        self.attention_index = _attention_index(attention_at, resolutions, "discriminator")
        self.blocks = nn.ModuleList(_DCBlock(3 if i is None else channels * i, channels * o, sn)
                                    for i, o in zip(DC_D_LAYOUT["in"], DC_D_LAYOUT["out"]))
        self.attention = (None if self.attention_index is None else
                          SelfAttention(channels * DC_D_LAYOUT["out"][self.attention_index], sn))
        top = channels * DC_D_LAYOUT["top"]
        self.conv_top = snconv2d(channels * DC_D_LAYOUT["out"][-1], top, 3, 1, 1, sn=sn)
        self.bn_top = None if sn else nn.BatchNorm2d(top, eps=DC_BN_EPS)
        self._build_heads(num_classes, top, embed_dim, cond_mtd, sn, adc)
        init_weights(self, init)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_top(self._run_blocks(images))
        h = h if self.bn_top is None else self.bn_top(h)
        return F.relu(h).sum(dim=(2, 3))                                 # (B, 8c)

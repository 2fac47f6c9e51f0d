"""StyleGAN2 generator and residual discriminator backbone as in ContraD's StyleGAN2 runs, in pure PyTorch.

Written from github.com/jh-jeong/ContraD at commit 4ac8ce538cfc5d068da52b960afe5227862162ff (itself based
on rosinality/stylegan2-pytorch): ``models/gan/stylegan2/generator.py`` (``Generator``, ``ModulatedConv2d``,
``StyleLayer``, ``ToRGB``, ``NoiseInjection``, ``ConstantInput``), ``models/gan/stylegan2/discriminator.py``
(``ResidualDiscriminatorP``, ``ResBlock``, ``FromRGB``, ``_minibatch_stddev_layer``),
``models/gan/stylegan2/layers.py`` (``EqualLinear``, ``EqualConv2d``, ``ConvLayer``, ``Blur``,
``Upsample``, ``make_kernel``, ``PixelNorm``), ``models/gan/stylegan2/op/{upfirdn2d,fused_act}.py`` (the
CUDA ops; here :func:`upfirdn2d` and :func:`fused_leaky_relu` are plain PyTorch, differentiable twice, as
R1 needs), ``models/gan/__init__.py`` (``get_architecture``: ``stylegan2`` = ``small32`` widths, n_mlp 8,
``d_hidden`` 512; ``stylegan2_512`` = full widths with ``channel_multiplier=1.0``), ``train_stylegan2.py``
(``r1_loss``) and ``train_stylegan2_contraD.py`` (the lazy R1 term).

Widths (``channels[resolution]``, G and D alike) for ``base = 512`` (the official value):

    small32 (arch "stylegan2", 32 px):   4: 512, 8: 512, 16: 256, 32: 128
    full (arch "stylegan2_512"):         4..32: 512, 64: 256 cm, 128: 128 cm, 256: 64 cm, 512: 32 cm, 1024: 16 cm

(cm = ``channel_multiplier``). A smaller ``base`` scales the whole table by ``base / 512`` (at least 1
channel): ``base`` is this module's width knob for CPU runs; 512 is the official network.

Generator (``Generator``): z ~ N(0, I)^style_dim -> PixelNorm -> n_mlp x EqualLinear(lr_mul 0.01,
leaky ReLU 0.2 x sqrt 2) = w; a learned 4x4 constant; per resolution 8..size a modulated 3x3 conv with
upsampling (transposed conv stride 2 + [1, 3, 3, 1] blur) and one without, each + per-pixel noise
(learned scalar weight, 0 at init) + fused leaky ReLU; ToRGB (modulated 1x1, no demodulation) summed into
an upsampled RGB skip. ``n_latent = 2 log2(size) - 2`` style inputs. Style mixing while training: with
probability ``style_mix`` (0.9) a sample takes a second w from a fresh z for every layer from a random
index on. Output ``0.5 * rgb + 0.5`` (range (0, 1); clamped to [0, 1] only in eval mode).

Discriminator backbone (``ResidualDiscriminatorP.penultimate``): x in [0, 1] -> 2x - 1 -> FromRGB (1x1) ->
ResBlocks down to 4x4 (3x3 conv, blurred 3x3 conv stride 2; skip = blurred 1x1 conv stride 2 without
activation or bias; sum / sqrt 2) -> minibatch stddev (group 4, 1 feature) -> 3x3 conv -> flatten:
``d = channels[4] * 16`` features (8192 official). ContraD's three heads attach to these features
(:class:`text2image.contrad.ContraDiscriminator`, arch ``stylegan2``; nn.Linear heads, no spectral norm,
as ``BaseDiscriminator``).

Equalized learning rate: weights ~ N(0, 1) (/ lr_mul), scaled by ``lr_mul / sqrt(fan_in)`` in forward;
biases 0 (modulation biases start at 1: ``bias_init=1``).

R1 (Mescheder et al. 2018): ``r1_penalty`` = ``||grad_x D(x)||^2`` per sample on (augmented) reals;
the D loss adds ``gamma / 2 * mean(r1) * every`` on the steps where ``step % every == 0`` (official
steps count from 1): ``lazy_r1``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["upfirdn2d", "fused_leaky_relu", "FusedLeakyReLU", "make_kernel", "Blur", "Upsample", "PixelNorm",
           "EqualLinear", "EqualConv2d", "ModulatedConv2d", "NoiseInjection", "ConstantInput", "StyledConv",
           "ToRGB", "ConvLayer", "ResBlock", "minibatch_stddev", "stylegan2_channels", "StyleGAN2Generator",
           "StyleGAN2Backbone", "r1_penalty", "lazy_r1", "r1_due", "BLUR_KERNEL"]

BLUR_KERNEL = (1, 3, 3, 1)
SQRT2 = math.sqrt(2.0)


# --- ops (op/upfirdn2d.py, op/fused_act.py) ------------------------------------------------------------
def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: Sequence[int] = (0, 0)) -> torch.Tensor:
    """Upsample (zero insertion: input pixel i lands at i * up), pad (negative = crop), convolve with
    ``kernel`` (a true convolution: the kernel is flipped), keep every ``down``-th sample. ``pad`` is
    ``(p0, p1)`` for both axes (the official wrapper) or ``(x0, x1, y0, y1)``.

    Shapes: x (B, C, H, W), kernel (kh, kw) -> (B, C, (H up + y0 + y1 - kh) // down + 1, ...)."""
    if len(pad) == 2:
        px0, px1, py0, py1 = pad[0], pad[1], pad[0], pad[1]
    elif len(pad) == 4:
        px0, px1, py0, py1 = pad
    else:
        raise ValueError(f"pad must be (p0, p1) or (x0, x1, y0, y1), got {pad!r}")
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1, got {up}, {down}")
    b, c, h, w = x.shape
    if up > 1:
        x = F.pad(x[:, :, :, None, :, None], (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    x = F.pad(x, (max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)))
    x = x[:, :, max(-py0, 0):x.shape[2] - max(-py1, 0), max(-px0, 0):x.shape[3] - max(-px1, 0)]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].expand(c, 1, kh, kw)
    x = F.conv2d(x, weight, groups=c)
    return x[:, :, ::down, ::down]


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = SQRT2) -> torch.Tensor:
    """``leaky_relu(x + bias, 0.2) * sqrt 2``, bias over dimension 1."""
    return F.leaky_relu(x + bias.view(1, -1, *([1] * (x.dim() - 2))), negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Per-channel bias (zeros) + leaky ReLU 0.2, times sqrt 2."""

    def __init__(self, channels: int, negative_slope: float = 0.2, scale: float = SQRT2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.negative_slope, self.scale = negative_slope, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


# --- layers (layers.py) ----------------------------------------------------------------------------------
def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """1-D taps -> their outer product (2-D taps as given), normalised to sum 1."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.dim() == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


class Blur(nn.Module):
    """FIR filter (``make_kernel``, times ``upsample_factor^2`` after an upsampling) with padding ``pad``."""

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor ** 2)
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """x ``factor`` (zero insertion + FIR, kernel x factor^2): H -> factor H (ToRGB skip)."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel) * factor ** 2
        self.register_buffer("kernel", k)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class PixelNorm(nn.Module):
    """``x / sqrt(mean_c x^2 + 1e-8)`` over dimension 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Equalized-lr linear: W ~ N(0, 1) / lr_mul, used as W lr_mul / sqrt(in); bias (0) lr_mul + bias_init;
    ``activation="fused_lrelu"`` adds the bias inside the fused leaky ReLU."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: Optional[str] = None):
        super().__init__()
        if activation not in (None, "fused_lrelu"):
            raise ValueError(f"activation must be None or 'fused_lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.activation, self.lr_mul, self.bias_init = activation, lr_mul, bias_init
        self.scale = lr_mul / math.sqrt(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul + self.bias_init
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)


class EqualConv2d(nn.Module):
    """Equalized-lr conv: W ~ N(0, 1), used as W / sqrt(in k^2); optional zero bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


# --- generator (generator.py) ----------------------------------------------------------------------------
class ModulatedConv2d(nn.Module):
    """Weight ``w[b, o, i] = W[o, i] / sqrt(in k^2) * s[b, i]`` with the style ``s = A(w)`` (EqualLinear,
    bias 1); demodulated ``w / sqrt(sum_{i,kh,kw} w^2 + 1e-8)`` per (b, o); one grouped conv over the batch.
    ``upsample``: transposed conv stride 2 (H -> 2H + 1) then Blur(pad (1, 1), kernel x 4) -> 2H."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.eps, self.kernel_size = 1e-8, kernel_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)

    def modulated_weight(self, style: torch.Tensor) -> torch.Tensor:
        """(B, out, in, k, k) per-sample weights for styles (B, style_dim)."""
        s = self.modulation(style)[:, None, :, None, None]
        w = self.scale * self.weight * s
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4), keepdim=True) + self.eps)
        return w

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, cin, h, wd = x.shape
        k, cout = self.kernel_size, self.out_channels
        w = self.modulated_weight(style)
        x = x.reshape(1, b * cin, h, wd)
        if self.upsample:
            w = w.transpose(1, 2).reshape(b * cin, cout, k, k)        # conv_transpose2d: (in, out / groups, k, k)
            out = F.conv_transpose2d(x, w, stride=2, groups=b)
            return self.blur(out.reshape(b, cout, out.shape[2], out.shape[3]))
        out = F.conv2d(x, w.reshape(b * cout, cin, k, k), padding=self.padding, groups=b)
        return out.reshape(b, cout, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):
    """``x + weight * noise``, noise ~ N(0, 1) per pixel (B, 1, H, W) unless given; weight starts at 0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        return x + self.weight * noise


class ConstantInput(nn.Module):
    """The learned (1, C, 4, 4) input (N(0, 1) at init), repeated over the batch."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.const = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.const.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """``StyleLayer``: modulated conv -> noise -> fused leaky ReLU (bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel: Sequence[float] = BLUR_KERNEL, demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim, demodulate, upsample,
                                    blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB (no demodulation) + bias (zeros) + the upsampled previous RGB skip."""

    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.upsample = Upsample(blur_kernel) if upsample else None
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            if self.upsample is None:
                raise ValueError("this ToRGB has no upsampling; pass skip=None")
            out = out + self.upsample(skip)
        return out


def stylegan2_channels(image_size: int, small32: bool = True, channel_multiplier: float = 2.0,
                       base: int = 512) -> dict[int, int]:
    """``channels[resolution]`` for 4 .. image_size (``Generator.channels`` / the discriminators' table),
    scaled by ``base / 512`` (at least 1). ``small32``: the 32 px table (no entry above 32)."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"StyleGAN2 needs a power-of-two image_size >= 8, got {image_size}")
    if small32:
        if image_size > 32:
            raise ValueError(f"the small32 widths stop at 32 px (official 'stylegan2' arch), got {image_size}; "
                             f"use small32=False (official 'stylegan2_512')")
        table = {4: 512, 8: 512, 16: 256, 32: 128}
    else:
        if image_size > 1024:
            raise ValueError(f"StyleGAN2 widths go up to 1024 px, got {image_size}")
        cm = channel_multiplier
        table = {4: 512, 8: 512, 16: 512, 32: 512, 64: int(256 * cm), 128: int(128 * cm), 256: int(64 * cm),
                 512: int(32 * cm), 1024: int(16 * cm)}
    if base < 1:
        raise ValueError(f"base width must be >= 1, got {base}")
    return {r: max(1, int(c * base / 512)) for r, c in table.items() if r <= image_size}


class StyleGAN2Generator(ModelMixin, ConfigMixin):
    """ContraD's StyleGAN2 ``Generator`` (module docstring). A diffusers model.

    Config: ``image_size``, ``style_dim`` (z and w, 512), ``n_mlp`` (8), ``channels`` (= base width,
    ``channels[4]``; 512 official), ``small32`` / ``channel_multiplier`` (width table), ``lr_mlp`` (0.01),
    ``style_mix`` (0.9, training mode only), ``latent`` ("normal": z ~ N(0, I), ``sample_latent``).

    ``forward(z, y=None, noise=None, style_mix=None, return_latents=False)``: z (B, style_dim) ->
    images (B, 3, image_size, image_size), range (0, 1) (clamped in eval mode); ``noise`` a list of
    ``num_layers`` tensors (B or 1, 1, H, W) or None (fresh N(0, 1)).
    """

    @register_to_config
    def __init__(self, image_size: int = 32, style_dim: int = 512, n_mlp: int = 8, channels: int = 512,
                 small32: bool = True, channel_multiplier: float = 2.0, lr_mlp: float = 0.01,
                 style_mix: float = 0.9, latent: str = "normal", blur_kernel: Sequence[int] = BLUR_KERNEL):
        super().__init__()
        if latent not in ("normal", "uniform"):
            raise ValueError(f"latent must be 'normal' or 'uniform', got {latent!r}")
        if not 0.0 <= style_mix <= 1.0:
            raise ValueError(f"style_mix must be in [0, 1], got {style_mix}")
        self.chan = stylegan2_channels(image_size, small32, channel_multiplier, channels)
        self.style_dim, self.log_size = style_dim, int(math.log2(image_size))
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp,
                                                              activation="fused_lrelu") for _ in range(n_mlp)])
        c4 = self.chan[4]
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(c4, style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        cin = c4
        for i in range(3, self.log_size + 1):
            cout = self.chan[2 ** i]
            self.convs.append(StyledConv(cin, cout, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(cout, cout, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(cout, style_dim, blur_kernel=blur_kernel))
            cin = cout
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        from text2image.contragan import draw_latents
        return draw_latents(n, self.style_dim, self.config.latent, generator)

    def mix_styles(self, w: torch.Tensor, w_mix: torch.Tensor, style_mix: float) -> torch.Tensor:
        """(B, n_latent, D) styles: each sample, with probability ``style_mix``, uses ``w`` for the layers
        before a uniform index in [0, n_latent) and ``w_mix`` from there on (index 0: all ``w_mix``)."""
        b, n = w.shape[0], self.n_latent
        mix_layer = torch.randint(n, (b,), device=w.device)
        mix_layer = mix_layer.masked_fill(torch.rand(b, device=w.device) >= style_mix, n)
        keep = (torch.arange(n, device=w.device)[None] < mix_layer[:, None])[:, :, None]
        return torch.where(keep, w[:, None], w_mix[:, None])

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None, noise: Optional[list] = None,
                style_mix: Optional[float] = None, return_latents: bool = False):
        if y is not None:
            raise ValueError("the StyleGAN2 generator is unconditional; pass y=None")
        if z.dim() != 2 or z.shape[1] != self.style_dim:
            raise ValueError(f"need z (B, {self.style_dim}), got {tuple(z.shape)}")
        style_mix = self.config.style_mix if style_mix is None else style_mix
        b = z.shape[0]
        w = self.style(z)
        if self.training and style_mix > 0:
            z_mix = torch.randn(b, self.style_dim, device=z.device, dtype=z.dtype)
            latents = self.mix_styles(w, self.style(z_mix), style_mix)
        else:
            latents = w[:, None].expand(-1, self.n_latent, -1)
        noise = [None] * self.num_layers if noise is None else noise
        if len(noise) != self.num_layers:
            raise ValueError(f"need {self.num_layers} noise maps, got {len(noise)}")
        out = self.conv1(self.input(b), latents[:, 0], noise[0])
        skip = self.to_rgb1(out, latents[:, 1])
        idx = 1
        for j, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * j](out, latents[:, idx], noise[2 * j + 1])
            out = self.convs[2 * j + 1](out, latents[:, idx + 1], noise[2 * j + 2])
            skip = to_rgb(out, latents[:, idx + 2], skip)
            idx += 2
        image = 0.5 * skip + 0.5
        if not self.training:
            image = image.clamp(0.0, 1.0)
        return (image, latents) if return_latents else image


# --- discriminator (discriminator.py) -------------------------------------------------------------------
class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d (no bias) + [FusedLeakyReLU (bias)]. ``downsample``: Blur with pad
    ((p + 1) // 2, p // 2), p = (len(blur) - 2) + (k - 1), then the conv with stride 2 and no padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 blur_kernel: Sequence[float] = BLUR_KERNEL, downsample: bool = False, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False))
        if activate:
            layers.append(FusedLeakyReLU(out_channels))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """(conv3 -> blurred conv3 stride 2) + blurred 1x1 stride-2 skip (linear), sum / sqrt 2; H -> H / 2."""

    def __init__(self, in_channels: int, out_channels: int, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, blur_kernel, downsample=True)
        self.skip = ConvLayer(in_channels, out_channels, 1, blur_kernel, downsample=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_features: int = 1) -> torch.Tensor:
    """``_minibatch_stddev_layer``: G = min(B, group_size) groups by stride: sample b is with the samples
    b mod (B / G) + k B / G; per group and feature slice, the std over the group (biased, + 1e-8 under
    the root) averaged over channels and pixels, appended as ``num_features`` channels. B % G must be 0."""
    b, c, h, w = x.shape
    g = min(b, group_size)
    if b % g or c % num_features:
        raise ValueError(f"minibatch stddev needs the batch ({b}) divisible by {g} and channels ({c}) by "
                         f"{num_features}")
    y = x.reshape(g, -1, num_features, c // num_features, h, w)
    y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=(2, 3, 4))        # (B / G, F)
    y = y[:, :, None, None].repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


class StyleGAN2Backbone(nn.Module):
    """``ResidualDiscriminatorP.penultimate``: features (B, channels[4] * 16) of images in [0, 1].

    Blocks (``blocks`` attribute, in order): FromRGB, then one ResBlock per resolution image_size .. 8;
    ``last_conv`` after the minibatch stddev. ``out_features`` = channels[4] * 16."""

    def __init__(self, image_size: int = 32, channels: int = 512, small32: bool = True,
                 channel_multiplier: float = 2.0, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        chan = stylegan2_channels(image_size, small32, channel_multiplier, channels)
        self.chan = chan
        blocks: list[nn.Module] = [ConvLayer(3, chan[image_size], 1)]          # FromRGB
        cin = chan[image_size]
        for i in range(int(math.log2(image_size)), 2, -1):
            cout = chan[2 ** (i - 1)]
            blocks.append(ResBlock(cin, cout, blur_kernel))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.last_conv = ConvLayer(cin + 1, chan[4], 3)
        self.out_features = chan[4] * 4 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x * 2.0 - 1.0)
        return self.last_conv(minibatch_stddev(h)).flatten(1)


# --- R1 (train_stylegan2.py r1_loss; train_stylegan2_contraD.py G_D.forward, lines 129-136, 222-226) ------
def r1_penalty(d_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``||grad_x sum D(x)||^2`` per sample (B,), x = ``images`` detached (the official augments the
    reals first and detaches the augmented batch); the graph is kept (create_graph) so the penalty
    trains D. ``d_fn(x)`` returns D's logits (B,) or (B, 1)."""
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        out = d_fn(x)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1)


def lazy_r1(r1: torch.Tensor, gamma: float, every: int) -> torch.Tensor:
    """``gamma / 2 * mean(r1) * every`` (lazy regularisation: applied every ``every`` D steps, scaled up)."""
    return 0.5 * gamma * r1.mean() * every


def r1_due(step: int, every: int) -> bool:
    """Whether R1 applies at engine step ``step`` (0-based): the official ``step % d_reg_every == 0`` with
    steps counted from 1, i.e. engine steps every-1, 2 every-1, ..."""
    if every < 1:
        raise ValueError(f"the R1 interval must be >= 1, got {every}")
    return (step + 1) % every == 0

"""BigGAN / SAGAN building blocks: spectral-norm layers, conditional BatchNorm, residual G/D blocks.

Follows BigGAN (Brock et al., ICLR 2019) as StudioGAN's ``src/models/big_resnet.py`` builds it at 32 px:

- spectral normalisation (Miyato et al., ICLR 2018) on every conv / linear / embedding of G and D,
  one power iteration per forward in train mode (StudioGAN ``ops.sn*`` use ``eps=1e-6``);
- conditional BatchNorm (de Vries et al. 2017; BigGAN Sec. 3 "shared embedding, hierarchical latent"):
  ``BN(x) * (1 + gain(c)) + bias(c)`` with ``c = [shared_embedding(y), z_chunk]`` and SN linear maps;
- residual blocks: G upsamples (nearest) inside the block, D average-pools at the end; D's first block
  is the "optimized" block (conv first, no pre-activation) of Miyato et al.;
- SAGAN self-attention (Zhang et al., ICML 2019) with 2x2 max-pooled keys/values and a zero-initialised
  residual gain, as in BigGAN's ``layers.Attention``.

Shapes: feature maps ``(B, C, H, W)``; conditions ``(B, cond_dim)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["SN_EPS", "init_weights", "snconv2d", "sndeconv2d", "snlinear", "sn_embedding", "is_spectral_normed", "ConditionalBatchNorm2d",
           "GBlock", "DBlock", "SelfAttention"]

SN_EPS = 1e-6  # StudioGAN ops.snconv2d / snlinear / sn_embedding


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(module, eps=SN_EPS) if enabled else module


def _raw_weight(module: nn.Module) -> torch.Tensor:
    """The trainable weight: the original behind a spectral-norm parametrization, else ``weight``."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


@torch.no_grad()
def init_weights(module: nn.Module, kind: str = "ortho") -> nn.Module:
    """Re-initialise every Conv2d / ConvTranspose2d / Linear / Embedding weight below ``module``
    (StudioGAN ``src/utils/ops.py`` ``init_weights``, commit 947b35e9835b67860fdce44d337f6d7fee7c8db3):

    - ``"ortho"``: ``nn.init.orthogonal_`` (StudioGAN ``g_init = d_init = "ortho"``), biases 0;
    - ``"N02"``: N(0, 0.02), biases 0;  ``"glorot"`` / ``"xavier"``: Xavier-uniform, biases 0;
    - ``"pytorch"``: keep PyTorch's default initialisation.

    Under spectral norm the unnormalised weight (the parametrization's ``original``) is initialised, as
    StudioGAN's in-place init of ``weight`` writes into ``weight_orig``'s storage. Embedding rows get no
    bias. Returns ``module``.
    """
    if kind not in ("ortho", "N02", "glorot", "xavier", "pytorch"):
        raise ValueError(f"init must be one of ortho, N02, glorot, xavier, pytorch; got {kind!r}")
    if kind == "pytorch":
        return module
    for m in module.modules():
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            continue
        w = _raw_weight(m)
        if kind == "ortho":
            nn.init.orthogonal_(w)
        elif kind == "N02":
            nn.init.normal_(w, 0.0, 0.02)
        else:
            nn.init.xavier_uniform_(w)
        if not isinstance(m, nn.Embedding) and m.bias is not None:
            m.bias.zero_()
    return module


def snconv2d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
             bias: bool = True, sn: bool = True) -> nn.Module:
    """``nn.Conv2d`` with spectral normalisation on its weight (``sn=False`` gives the plain conv)."""
    return _sn(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias), sn)


def sndeconv2d(in_channels: int, out_channels: int, kernel_size: int = 4, stride: int = 2, padding: int = 1,
               bias: bool = True, sn: bool = True) -> nn.Module:
    """``nn.ConvTranspose2d`` with spectral normalisation (StudioGAN ``ops.sndeconv2d``); ``sn=False``: plain."""
    return _sn(nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias), sn)


def snlinear(in_features: int, out_features: int, bias: bool = True, sn: bool = True) -> nn.Module:
    return _sn(nn.Linear(in_features, out_features, bias=bias), sn)


def sn_embedding(num_embeddings: int, embedding_dim: int, sn: bool = True) -> nn.Module:
    """Class-embedding table; ContraGAN's proxies are its rows (StudioGAN ``ops.sn_embedding``)."""
    return _sn(nn.Embedding(num_embeddings, embedding_dim), sn)


def is_spectral_normed(module: nn.Module) -> bool:
    """True if ``module.weight`` is computed through a spectral-norm parametrization."""
    return parametrize.is_parametrized(module, "weight") and any(
        type(p).__name__ == "_SpectralNorm" for p in module.parametrizations["weight"])


class ConditionalBatchNorm2d(nn.Module):
    """``BN(x) * (1 + gain(c)) + bias(c)``: BatchNorm without affine, modulated per sample by ``c``.

    The ``1 +`` keeps the initial gain near one (BigGAN ``layers.ccbn``). ``c`` is the concatenation of
    the shared class embedding and this block's z chunk, so the label enters every G block.

    Args:
        num_features: channels C of x.
        cond_dim: size of c.
        sn: spectral norm on the gain/bias maps (StudioGAN applies G's SN here too).

    Shapes: x (B, C, H, W), c (B, cond_dim) -> (B, C, H, W).
    """

    def __init__(self, num_features: int, cond_dim: int, sn: bool = True, eps: float = 1e-4, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gain = snlinear(cond_dim, num_features, bias=False, sn=sn)
        self.bias = snlinear(cond_dim, num_features, bias=False, sn=sn)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.shape != (x.shape[0], self.gain.in_features):
            raise ValueError(f"condition must be (B, cond_dim) = ({x.shape[0]}, {self.gain.in_features}), "
                             f"got {tuple(c.shape)}")
        gain = 1.0 + self.gain(c)[:, :, None, None]
        bias = self.bias(c)[:, :, None, None]
        return self.bn(x) * gain + bias


class GBlock(nn.Module):
    """BigGAN generator block: cBN-ReLU-up-conv3-cBN-ReLU-conv3, plus up-conv1 shortcut (doubles H, W).

    Shapes: x (B, in, H, W), c (B, cond_dim) -> (B, out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, sn: bool = True):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_channels, cond_dim, sn)
        self.conv1 = snconv2d(in_channels, out_channels, 3, 1, 1, sn=sn)
        self.bn2 = ConditionalBatchNorm2d(out_channels, cond_dim, sn)
        self.conv2 = snconv2d(out_channels, out_channels, 3, 1, 1, sn=sn)
        self.conv_sc = snconv2d(in_channels, out_channels, 1, 1, 0, sn=sn)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(x, c))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), c)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """SN-ResNet discriminator block (Miyato et al.; StudioGAN ``DiscOptBlock`` / ``DiscBlock``).

    ``optimized=True`` (the first block, on RGB): conv3-ReLU-conv3-pool, shortcut pool-conv1.
    Otherwise: ReLU-conv3-ReLU-conv3-(pool), shortcut conv1-(pool) when channels change or it pools.

    Shapes: (B, in, H, W) -> (B, out, H/2, W/2) with ``downsample``, else (B, out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = True, optimized: bool = False,
                 sn: bool = True):
        super().__init__()
        if optimized and not downsample:
            raise ValueError("the optimized (first) D block always downsamples; got downsample=False")
        self.downsample, self.optimized = downsample, optimized
        self.conv1 = snconv2d(in_channels, out_channels, 3, 1, 1, sn=sn)
        self.conv2 = snconv2d(out_channels, out_channels, 3, 1, 1, sn=sn)
        self.learnable_sc = optimized or downsample or in_channels != out_channels
        self.conv_sc = snconv2d(in_channels, out_channels, 1, 1, 0, sn=sn) if self.learnable_sc else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.optimized else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        if self.optimized:
            sc = self.conv_sc(F.avg_pool2d(x, 2))
        elif self.learnable_sc:
            sc = self.conv_sc(x)
            sc = F.avg_pool2d(sc, 2) if self.downsample else sc
        else:
            sc = x
        return h + sc


class SelfAttention(nn.Module):
    """SAGAN self-attention: ``x + gamma * o(softmax(theta(x)^T phi(x)) g(x))``, gamma initialised to 0.

    theta/phi use C/8 channels, g uses C/2; keys and values are 2x2 max-pooled (BigGAN ``Attention``).

    Shapes: (B, C, H, W) -> (B, C, H, W); H and W must be even; C >= 8.
    """

    def __init__(self, channels: int, sn: bool = True):
        super().__init__()
        if channels < 8:
            raise ValueError(f"self-attention needs channels >= 8 (it uses C/8 query channels), got {channels}")
        self.channels = channels
        self.theta = snconv2d(channels, channels // 8, 1, 1, 0, bias=False, sn=sn)
        self.phi = snconv2d(channels, channels // 8, 1, 1, 0, bias=False, sn=sn)
        self.g = snconv2d(channels, channels // 2, 1, 1, 0, bias=False, sn=sn)
        self.o = snconv2d(channels // 2, channels, 1, 1, 0, bias=False, sn=sn)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"self-attention needs even H, W (2x2 pooled keys), got {h}x{w}")
        theta = self.theta(x).flatten(2)                                     # (B, C/8, HW)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)                        # (B, C/8, HW/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)                            # (B, C/2, HW/4)
        attn = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)            # (B, HW, HW/4)
        o = (g @ attn.transpose(1, 2)).view(b, c // 2, h, w)                 # (B, C/2, H, W)
        return x + self.gamma * self.o(o)

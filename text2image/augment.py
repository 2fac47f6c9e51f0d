"""Differentiable, batched image augmentations for GAN discriminators (ContraD, XMC-GAN, ContraGAN+DiffAug).

Every op maps ``(B, C, H, W)`` images in ``input_range`` (default ``(0, 1)``) to images of the same
shape in the same range, runs on the images' device without a loop over samples, lets gradients flow to
its input (so to G when the input is G's output), draws its own random parameters for every sample, and
takes an optional ``torch.Generator`` in ``forward(x, generator=None)``: random numbers are drawn on the
generator's device (then moved to the images'), so a seeded CPU generator gives the same parameters for
CPU and CUDA images. Each op is applied to a sample with probability ``p`` (a per-sample coin); samples
whose coin fails are returned bit-exactly, and ``p = 0`` is the identity.

An op is ``sample_params(x, generator) -> dict`` (the random draws, ``(B, ...)`` tensors) followed by the
deterministic ``apply(x, params)``, both in the op's *working range* (``(0, 1)`` for the SimCLR ops, as
ContraD; ``(-1, 1)`` for DiffAugment, as its paper code); ``forward`` maps ``input_range`` to the working
range and back.

Sources (read for this file; transcribed hyperparameters come from them):

- ContraD (Jeong & Shin, ICLR 2021), github.com/jh-jeong/ContraD at commit
  4ac8ce538cfc5d068da52b960afe5227862162ff: ``augment/__init__.py`` (``simclr``, ``simclr_hq``,
  ``simclr_hq_cutout``, ``RandomApply``, ``RandomColorGrayLayer``, ``GaussianBlur``, ``DiffAugLayer``),
  ``augment/spatial.py`` (``RandomResizeCropLayer``, ``HorizontalFlipLayer``, ``HorizontalFlipRandomCrop``,
  ``CutOut``),
  ``augment/color_jitter.py`` (``ColorJitterLayer``, ``RandomHSVFunction``), ``augment/utils.py``
  (``rgb2hsv``, ``hsv2rgb``), ``configs/defaults/augment.gin`` (jitter 0.4/0.4/0.4/0.1, crop scale
  (0.2, 1), blur sigma (0.1, 2), CutOut length 15), ``third_party/diffaug.py``.
- DiffAugment (Zhao et al., NeurIPS 2020), github.com/mit-han-lab/data-efficient-gans at HEAD
  0b6339510be1e3859d360cbf464d0a425514a6b4, ``DiffAugment_pytorch.py`` (last changed in 3a5ba9f66fe2).

Where this differs from the official code (each checked in the file named):

- Per-sample randomness everywhere. ContraD ``ColorJitterLayer.transform`` flips ONE coin per batch for
  the order (contrast then HSV, or HSV then contrast) and ``GaussianBlur.forward`` draws ONE sigma per
  batch (``np.random.uniform``); here both are per sample (``ColorJitter(order="per_sample")``, the
  default; ``order="batch"`` is the official coin).
- ContraD ``RandomResizeCropLayer.forward`` unpacks ``N, _, width, height = inputs.shape`` (names
  swapped), so on non-square images its width limit is the height; here widths are checked against W.
  Its pooled rejection sampling (10 N trials, N valid ones picked at random, identity for the rest) draws
  from the same distribution as the per-sample "first valid of 10 trials" used here.
- ContraD ``rgb2hsv`` computes hue with ``atan2`` (its docstring: up to ~1.2 degrees off the hexcone
  hue), while ``hsv2rgb`` inverts the hexcone hue, so its jitter changes colours even at factors
  (0, 1, 1, 1) (its rgb -> hsv -> rgb round trip is off by up to 0.018, measured on U(0, 1) pixels).
  Here hue is the hexcone hue and the round trip is exact; hue shifts match torchvision ``adjust_hue``.
- Clamps (contrast, the HSV step, ``DiffAugment(clamp=True)``) pass the gradient on the closed interval
  [lo, hi]; torch's own ``clamp`` (checked on 2.14) passes none at the end points, which would cut the
  gradient of every pixel the HSV step puts exactly on 0 or 1 before the contrast clamp.
- ContraD ``RandomHSVFunction.backward`` passes the gradient straight through the HSV adjustment
  (identity Jacobian). That is the default here (``hsv_grad="straight_through"``); ``"autograd"``
  differentiates the adjustment exactly.
- ContraD shifts hue by ``f_h * 255 / 360`` turns with ``f_h ~ U(-hue, hue)`` (so hue 0.1 is at most
  0.071 turns; torchvision's ``adjust_hue`` shifts by ``f_h`` turns). Default ``hue_units="contrad"``;
  ``"turns"`` is torchvision's convention.
- DiffAugment does not clamp (its outputs leave [-1, 1]); default ``clamp=False`` keeps that, and
  ``clamp=True`` clips to ``input_range``. Its policy names are "color", "translation", "cutout"; the
  single colour ops "brightness", "saturation", "contrast" are accepted as well.
- ``Cutout`` (ContraD ``CutOut``) requires an odd length there (a conv1d trick); any length >= 1 works
  here, odd lengths with ContraD's centring and even ones with DiffAugment's ``rand_cutout`` centring.
"""
from __future__ import annotations

import abc
import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Augment", "Identity", "Compose", "RandomResizedCrop", "RandomHorizontalFlip",
           "HorizontalFlipRandomCrop", "ColorJitter",
           "RandomGrayscale", "RandomGaussianBlur", "Cutout", "DiffAugment", "build_augment",
           "rgb_to_hsv", "hsv_to_rgb", "AUGMENT_NAMES", "DIFFAUG_OPS"]

Range = tuple[float, float]
Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# random draws (on the generator's device, then moved to the images')

def _draw_device(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.device:
    return x.device if generator is None else generator.device


def _uniform(shape: Sequence[int], low: float, high: float, x: torch.Tensor,
             generator: Optional[torch.Generator], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """U(low, high) of ``shape`` on ``x.device`` (float64 unless ``dtype``)."""
    u = torch.rand(tuple(shape), generator=generator, device=_draw_device(x, generator), dtype=torch.float64)
    return (low + (high - low) * u).to(device=x.device, dtype=dtype)


def _randint(low: torch.Tensor, high: torch.Tensor, x: torch.Tensor,
             generator: Optional[torch.Generator]) -> torch.Tensor:
    """Integers uniform on ``[low, high]`` (inclusive, elementwise, ``high >= low``), int64 on x.device."""
    n = (high - low + 1).to(torch.float64)
    u = _uniform(low.shape, 0.0, 1.0, x, generator)
    return low + torch.minimum(torch.floor(u * n), n - 1).to(torch.int64)


def _coin(p: float, batch: int, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``(B,)`` bool, True with probability ``p``."""
    return _uniform((batch,), 0.0, 1.0, x, generator) < p


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` in x's dtype."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


class _ClampClosed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: Optional[float], hi: Optional[float]) -> torch.Tensor:
        if ctx.needs_input_grad[0]:
            inside = torch.ones_like(x, dtype=torch.bool) if lo is None else x >= lo
            ctx.save_for_backward(inside if hi is None else inside & (x <= hi))
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def _clamp(x: torch.Tensor, lo: Optional[float], hi: Optional[float]) -> torch.Tensor:
    """``clamp(x, lo, hi)`` whose gradient is 1 on the closed interval (0 outside). torch's ``clamp``
    (checked on 2.14) passes no gradient at ``x == lo`` or ``x == hi``, which would cut the gradient of
    every pixel an earlier step put exactly on 0 or 1 (e.g. the HSV step's value clamp)."""
    return _ClampClosed.apply(x, lo, hi)


# --------------------------------------------------------------------------------------------------
# argument checks

def _check_p(p: float, name: str = "p") -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {p!r}")
    return float(p)


def _check_range(r: Sequence[float], name: str = "input_range") -> Range:
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high); got {r!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be finite with low < high; got {r!r}")
    return lo, hi


def _check_interval(r: Sequence[float], name: str, low: float, high: float) -> Range:
    """``(a, b)`` with ``low < a <= b <= high``."""
    try:
        a, b = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high); got {r!r}") from None
    if not low < a <= b <= high:
        raise ValueError(f"{name} must satisfy {low} < low <= high <= {high}; got {r!r}")
    return a, b


def _check_images(x: torch.Tensor, channels: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected floating images (B, C, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else ' ' + str(x.dtype)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"expected {channels} channels (B, {channels}, H, W); got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------
# the base op

class Augment(nn.Module, abc.ABC):
    """One random op applied per sample with probability ``p``.

    Subclasses set ``working_range`` and implement ``sample_params`` / ``apply`` (both on images in the
    working range). ``forward(x (B, C, H, W), generator=None) -> (B, C, H, W)`` in ``input_range``.
    """

    working_range: Range = (0.0, 1.0)
    channels: Optional[int] = None

    def __init__(self, p: float = 1.0, input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__()
        self.p = _check_p(p)
        self.input_range = _check_range(input_range)

    def sample_params(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Params:
        return {}

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The op on images ``x`` in the working range with the draws ``params``."""

    def _to_working(self, x: torch.Tensor) -> torch.Tensor:
        (a, b), (c, d) = self.input_range, self.working_range
        return x if (a, b) == (c, d) else (x - a) * ((d - c) / (b - a)) + c

    def _from_working(self, y: torch.Tensor) -> torch.Tensor:
        (a, b), (c, d) = self.input_range, self.working_range
        return y if (a, b) == (c, d) else (y - c) * ((b - a) / (d - c)) + a

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_images(x, self.channels)
        if self.p == 0.0 or x.shape[0] == 0:
            return x
        z = self._to_working(x)
        params = self.sample_params(z, generator)
        y = self._from_working(self.apply(z, params))
        if self.p == 1.0:
            return y
        mask = _coin(self.p, x.shape[0], x, generator).view(-1, 1, 1, 1).expand_as(x)
        return torch.where(mask, y, x)

    def extra_repr(self) -> str:
        return f"p={self.p}, input_range={self.input_range}"


class Identity(Augment):
    """The "none" augmentation."""

    def __init__(self, input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p=0.0, input_range=input_range)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return x


class Compose(nn.Module):
    """Ops applied in order, each with its own draws: ``forward(x, generator=None)``.

    The ops run in ``(0, 1)``; ``input_range`` maps the input there once and back at the end.
    """

    def __init__(self, ops: Sequence[Augment], input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.input_range = _check_range(input_range)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_images(x)
        a, b = self.input_range
        y = x if (a, b) == (0.0, 1.0) else (x - a) / (b - a)
        for op in self.ops:
            y = op(y, generator)
        if all(op.p == 0.0 for op in self.ops):
            return x                                # bit-exact identity, no range round trip
        return y if (a, b) == (0.0, 1.0) else y * (b - a) + a


# --------------------------------------------------------------------------------------------------
# spatial ops

class RandomResizedCrop(Augment):
    """Inception crop by ``affine_grid``/``grid_sample`` to the input size (ContraD
    ``RandomResizeCropLayer``): area fraction ``~ U(scale)``, aspect ratio w/h log-uniform on ``ratio``;
    crop width/height rounded to whole pixels, kept if it fits (first fitting of ``trials`` draws, else
    the whole image, as ContraD); centre offset ``k / W`` in normalised coordinates, ``k`` a uniform
    integer in ``[w - W, W - w]`` (half-pixel steps, as ContraD). Bilinear, ``padding_mode`` reflection
    (ContraD), ``align_corners=False``.

    ``params["theta"]``: ``(B, 2, 3)`` affine matrices (``theta[:, 0, 0] = w / W``, ``theta[:, 1, 1] = h / H``).
    """

    def __init__(self, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 p: float = 1.0, padding_mode: Literal["reflection", "zeros", "border"] = "reflection",
                 trials: int = 10, input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)
        self.scale = _check_interval(scale, "scale", 0.0, 1.0)
        self.ratio = _check_interval(ratio, "ratio", 0.0, float("inf"))
        if padding_mode not in ("reflection", "zeros", "border"):
            raise ValueError(f"padding_mode must be 'reflection', 'zeros' or 'border'; got {padding_mode!r}")
        if int(trials) < 1:
            raise ValueError(f"trials must be >= 1; got {trials!r}")
        self.padding_mode, self.trials = padding_mode, int(trials)

    def sample_params(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Params:
        B, _, H, W = x.shape
        area = _uniform((B, self.trials), *self.scale, x, generator) * (H * W)
        log_r = _uniform((B, self.trials), math.log(self.ratio[0]), math.log(self.ratio[1]), x, generator)
        w = torch.round(torch.sqrt(area * torch.exp(log_r)))
        h = torch.round(torch.sqrt(area / torch.exp(log_r)))
        fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = fits.to(torch.float32).argmax(1, keepdim=True)    # first fitting trial (0 if none fits)
        any_fit = fits.any(1)
        w = torch.where(any_fit, w.gather(1, first).squeeze(1), torch.full_like(any_fit, W, dtype=w.dtype))
        h = torch.where(any_fit, h.gather(1, first).squeeze(1), torch.full_like(any_fit, H, dtype=h.dtype))
        kx = _randint((w - W).long(), (W - w).long(), x, generator)
        ky = _randint((h - H).long(), (H - h).long(), x, generator)
        theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1] = w / W, h / H
        theta[:, 0, 2], theta[:, 1, 2] = kx / W, ky / H
        return {"theta": theta}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        grid = F.affine_grid(params["theta"].to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, ratio={self.ratio}, padding_mode={self.padding_mode!r}, " + super().extra_repr()


class RandomHorizontalFlip(Augment):
    """Mirror left-right with probability ``p`` (ContraD ``HorizontalFlipLayer``: p = 0.5; it flips with
    ``grid_sample``, which at ``align_corners=False`` lands on pixel centres, so it equals ``flip``)."""

    def __init__(self, p: float = 0.5, input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return x.flip(-1)


def _source_index(src: torch.Tensor, n: int, padding_mode: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Integer source positions ``src`` on an axis of ``n`` pixels -> ``(index in [0, n), inside mask or
    None)`` the way ``grid_sample(mode="nearest", align_corners=False)`` pads: ``"reflection"`` mirrors
    about the pixel edges -0.5 and n - 0.5 (-1 -> 0, n -> n - 1: the edge pixel repeats, numpy's
    ``symmetric``), ``"border"`` clamps, ``"zeros"`` clamps and returns the mask of positions inside."""
    if padding_mode == "reflection":
        m = torch.remainder(src, 2 * n)
        return torch.where(m >= n, 2 * n - 1 - m, m), None
    if padding_mode == "border":
        return src.clamp(0, n - 1), None
    return src.clamp(0, n - 1), (src >= 0) & (src < n)


class HorizontalFlipRandomCrop(Augment):
    """ContraD's ``hfrt`` mode (``HorizontalFlipRandomCrop``, ``augment/spatial.py`` at 4ac8ce5): a
    horizontal flip with probability 1/2 and an integer translation ``dx, dy`` each uniform on
    ``[-max_pixels, max_pixels]``, drawn independently per sample, out-of-image pixels filled by
    ``padding_mode`` (reflection in ``configs/defaults/augment.gin``: ``max_pixels = 4``, ``width = 32``;
    CelebA 128 px: 16 / 128; AFHQ 512 px: 64 / 512).

    The official op builds ``theta = [[s, 0, dx / (width / 2)], [0, 1, dy / (width / 2)]]`` (``s = +-1``,
    ``torch.bernoulli(0.5) * 2 - 1``; ``torch.randint(-max_pixels, max_pixels + 1, (N, 2))`` for
    ``(dx, dy)``) and samples ``grid_sample(mode="nearest", align_corners=False)``. With ``width`` the image
    width (every official config) that lands exactly on pixel centres: output pixel ``(i, j)`` reads input
    pixel ``(i + dy, j' + dx)`` with ``j' = W - 1 - j`` when flipped, else ``j`` (i.e. flip, then shift by
    ``-dx``), so here it is an exact gather, no interpolation. Difference: the official shifts ``dy`` in
    units of ``width / 2`` of the HEIGHT's normalised axis (``dy H / width`` pixels, non-integer on
    non-square images); here ``dy`` is whole pixels on any image.

    ``flip_p`` (official 1/2; 0 gives the official ``RandomCrop``), ``p`` the probability that a sample is
    augmented at all (1 officially). ``params``: ``flip`` ``(B,)`` bool, ``dx``, ``dy`` ``(B,)`` int64.
    """

    def __init__(self, max_pixels: int = 4, padding_mode: Literal["reflection", "zeros", "border"] = "reflection",
                 flip_p: float = 0.5, p: float = 1.0, input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
            raise ValueError(f"max_pixels must be an integer >= 0; got {max_pixels!r}")
        if padding_mode not in ("reflection", "zeros", "border"):
            raise ValueError(f"padding_mode must be 'reflection', 'zeros' or 'border'; got {padding_mode!r}")
        self.max_pixels, self.padding_mode = max_pixels, padding_mode
        self.flip_p = _check_p(flip_p, "flip_p")

    def sample_params(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Params:
        B = x.shape[0]
        flip = _coin(self.flip_p, B, x, generator)
        lim = torch.full((B, 2), self.max_pixels, dtype=torch.int64, device=x.device)
        d = _randint(-lim, lim, x, generator)
        return {"flip": flip, "dx": d[:, 0], "dy": d[:, 1]}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        B, C, H, W = x.shape
        j = torch.arange(W, device=x.device)
        cols = torch.where(params["flip"][:, None], W - 1 - j, j) + params["dx"][:, None]      # (B, W)
        rows = torch.arange(H, device=x.device) + params["dy"][:, None]                        # (B, H)
        cols, in_c = _source_index(cols, W, self.padding_mode)
        rows, in_r = _source_index(rows, H, self.padding_mode)
        y = x.gather(2, rows[:, None, :, None].expand(B, C, H, W))
        y = y.gather(3, cols[:, None, None, :].expand(B, C, H, W))
        if in_c is not None:
            y = y * (in_r[:, None, :, None] & in_c[:, None, None, :]).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"max_pixels={self.max_pixels}, padding_mode={self.padding_mode!r}, flip_p={self.flip_p}, "
                + super().extra_repr())


def _box_mask(top: torch.Tensor, left: torch.Tensor, size_h: int, size_w: int, H: int, W: int,
              like: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` mask: 0 inside rows ``[top, top + size_h)`` x cols ``[left, left + size_w)``
    (clipped to the image), 1 elsewhere."""
    rows = torch.arange(H, device=like.device)
    cols = torch.arange(W, device=like.device)
    in_r = (rows >= top[:, None]) & (rows < top[:, None] + size_h)            # (B, H)
    in_c = (cols >= left[:, None]) & (cols < left[:, None] + size_w)          # (B, W)
    return (~(in_r[:, :, None] & in_c[:, None, :])).to(like.dtype).unsqueeze(1)


def _cutout_offsets(B: int, size: int, extent: int, x: torch.Tensor,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
    """Box start ``o - size // 2`` with ``o`` uniform on ``[0, extent + (1 - size % 2))``: DiffAugment
    ``rand_cutout``; for odd sizes the centre is a uniform pixel, as ContraD ``CutOut``."""
    high = torch.full((B,), extent - (size % 2), dtype=torch.int64, device=x.device)
    return _randint(torch.zeros_like(high), high, x, generator) - size // 2


class Cutout(Augment):
    """Zero a ``length x length`` square (clipped at the border) centred on a uniformly drawn pixel
    (ContraD ``CutOut``, length 15 in ``augment.gin``; fill 0 in [0, 1], i.e. black). Even lengths use
    DiffAugment's centring (see module docstring). ``params``: ``top``, ``left`` ``(B,)`` int64."""

    def __init__(self, length: int = 15, p: float = 1.0, input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an integer >= 1; got {length!r}")
        self.length = length

    def sample_params(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Params:
        B, _, H, W = x.shape
        return {"top": _cutout_offsets(B, self.length, H, x, generator),
                "left": _cutout_offsets(B, self.length, W, x, generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        H, W = x.shape[-2:]
        return x * _box_mask(params["top"], params["left"], self.length, self.length, H, W, x)

    def extra_repr(self) -> str:
        return f"length={self.length}, " + super().extra_repr()


# --------------------------------------------------------------------------------------------------
# colour ops (ContraD color_jitter.py / utils.py)

def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Hexcone HSV of ``(B, 3, H, W)`` RGB in [0, 1]; ``(B, 3, H, W)`` with H in turns [0, 1).

    Hue 0 and saturation 0 where undefined (grey / black); safe denominators keep gradients finite.
    """
    r, g, b = rgb.unbind(1)
    maxc, argmax = rgb.max(1)
    minc = rgb.amin(1)
    delta = maxc - minc
    chroma = delta > 0
    d = torch.where(chroma, delta, torch.ones_like(delta))
    h = torch.where(argmax == 0, torch.remainder((g - b) / d, 6.0),
                    torch.where(argmax == 1, (b - r) / d + 2.0, (r - g) / d + 4.0)) / 6.0
    h = torch.where(chroma, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (the formula of ContraD ``hsv2rgb``): channel ``n in (5, 3, 1)`` is
    ``v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _hsv_adjust(x: torch.Tensor, shift: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """:func:`rgb_to_hsv`, ``h + shift mod 1``, ``s * sat``, ``v * val`` (both clamped to [0, 1]),
    :func:`hsv_to_rgb` in one pass over ``(B, H, W)`` planes; ``shift, sat, val``: ``(B,)``. Hue is kept
    in sixths and reduced mod 6 once; grey pixels get an arbitrary hue, harmless because their
    saturation is 0."""
    tiny = torch.finfo(x.dtype).tiny
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = 1.0 / delta.clamp_min(tiny)
    h6 = torch.where(r == maxc, (g - b) * inv, torch.where(g == maxc, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6 = torch.remainder(h6 + 6.0 * shift.to(x.dtype).view(-1, 1, 1), 6.0)
    s = _clamp(delta / maxc.clamp_min(tiny) * sat.to(x.dtype).view(-1, 1, 1), None, 1.0)
    v = _clamp(maxc * val.to(x.dtype).view(-1, 1, 1), None, 1.0)
    vs = v * s
    out = []
    for n in (5.0, 3.0, 1.0):                         # R, G, B of hsv_to_rgb
        k = h6 + n
        k = k - 6.0 * (k >= 6.0).to(x.dtype)
        out.append(v - vs * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, 1)


class _StraightThrough(torch.autograd.Function):
    """``forward(x, y) = y`` with ``d/dx = identity`` (ContraD ``RandomHSVFunction.backward``). Unlike
    ``x + (y - x).detach()`` the value is exactly ``y``, so a later clamp keeps the gradient of pixels
    that land exactly on 0 or 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _jitter_range(value: float, name: str, center: float, bound: Range) -> Range:
    """ContraD ``ColorJitterLayer._check_input`` for a single number: ``[center - v, center + v]``, the
    lower end clipped to ``bound[0]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    lo, hi = max(center - float(value), bound[0]), center + float(value)
    if hi > bound[1]:
        raise ValueError(f"{name} must be <= {bound[1] - center}; got {value!r}")
    return lo, hi


class ColorJitter(Augment):
    """ContraD ``ColorJitterLayer`` (applied with ``p``, 0.8 in ``simclr``): per sample

    - contrast ``c ~ U(1 - contrast, 1 + contrast)``: ``clamp((x - m) c + m, 0, 1)``, ``m`` the
      per-channel spatial mean (ContraD ``adjust_contrast``; torchvision uses the grey mean);
    - HSV (ContraD ``adjust_hsv`` / ``RandomHSVFunction``): ``h <- (h + f_h u) mod 1`` with
      ``f_h ~ U(-hue, hue)`` and ``u = 255 / 360`` (``hue_units="contrad"``) or 1 (``"turns"``),
      ``s <- clamp(s f_s)``, ``v <- clamp(v f_v)``, ``f_s ~ U(1 - saturation, 1 + saturation)``,
      ``f_v ~ U(1 - brightness, 1 + brightness)`` (lower ends clipped at 0);
    - in the order contrast-then-HSV or HSV-then-contrast, each with probability 1/2, per sample
      (``order="per_sample"``) or one coin per call (``"batch"``, the official code).

    ``hsv_grad="straight_through"`` (official) gives the HSV step an identity Jacobian; ``"autograd"``
    differentiates it. ``params``: ``contrast``, ``hue``, ``saturation``, ``brightness`` ``(B,)``;
    ``contrast_first`` ``(B,)`` bool.
    """

    channels = 3

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 1.0, order: Literal["per_sample", "batch"] = "per_sample",
                 hsv_grad: Literal["straight_through", "autograd"] = "straight_through",
                 hue_units: Literal["contrad", "turns"] = "contrad", input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)
        inf = float("inf")
        self.brightness = _jitter_range(brightness, "brightness", 1.0, (0.0, inf))
        self.contrast = _jitter_range(contrast, "contrast", 1.0, (0.0, inf))
        self.saturation = _jitter_range(saturation, "saturation", 1.0, (0.0, inf))
        self.hue = _jitter_range(hue, "hue", 0.0, (-0.5, 0.5))
        if order not in ("per_sample", "batch"):
            raise ValueError(f"order must be 'per_sample' or 'batch'; got {order!r}")
        if hsv_grad not in ("straight_through", "autograd"):
            raise ValueError(f"hsv_grad must be 'straight_through' or 'autograd'; got {hsv_grad!r}")
        if hue_units not in ("contrad", "turns"):
            raise ValueError(f"hue_units must be 'contrad' or 'turns'; got {hue_units!r}")
        self.order, self.hsv_grad, self.hue_units = order, hsv_grad, hue_units

    def sample_params(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Params:
        B = x.shape[0]
        params = {name: _uniform((B,), *getattr(self, name), x, generator)
                  for name in ("contrast", "hue", "saturation", "brightness")}
        coins = _coin(0.5, 1 if self.order == "batch" else B, x, generator)
        params["contrast_first"] = coins.expand(B)
        return params

    @staticmethod
    def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        # (x - m) c + m written as x c + m (1 - c): exactly x (and its gradient) at c = 1
        c = _per_sample(factor, x)
        return _clamp(x * c + x.mean(dim=(2, 3), keepdim=True) * (1.0 - c), 0.0, 1.0)

    def adjust_hsv(self, x: torch.Tensor, hue: torch.Tensor, saturation: torch.Tensor,
                   brightness: torch.Tensor) -> torch.Tensor:
        """``hsv_to_rgb(h + f_h u mod 1, clamp(s f_s), clamp(v f_v))`` of ``rgb_to_hsv(x)``, per sample."""
        shift = hue * (255.0 / 360.0 if self.hue_units == "contrad" else 1.0)
        if self.hsv_grad == "autograd":
            return _hsv_adjust(x, shift, saturation, brightness)
        return _StraightThrough.apply(x, _hsv_adjust(x.detach(), shift, saturation, brightness))

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        # contrast with factor 1 is exactly the identity: it selects the position of the contrast step
        first = params["contrast_first"]
        one = torch.ones_like(params["contrast"])
        y = self.adjust_contrast(x, torch.where(first, params["contrast"], one))
        y = self.adjust_hsv(y, params["hue"], params["saturation"], params["brightness"])
        return self.adjust_contrast(y, torch.where(first, one, params["contrast"]))

    def extra_repr(self) -> str:
        return (f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"hue={self.hue}, order={self.order!r}, hsv_grad={self.hsv_grad!r}, "
                f"hue_units={self.hue_units!r}, " + super().extra_repr())


class RandomGrayscale(Augment):
    """``L = 0.299 R + 0.587 G + 0.114 B`` copied to 3 channels with probability ``p`` (ContraD
    ``RandomColorGrayLayer`` under ``RandomApply(p=0.2)``)."""

    channels = 3

    def __init__(self, p: float = 0.2, input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)
        self.register_buffer("weight", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return (x * self.weight.to(x.dtype)).sum(1, keepdim=True).expand_as(x)


class RandomGaussianBlur(Augment):
    """Gaussian blur with ``sigma ~ U(sigma_range)`` per sample (ContraD ``GaussianBlur`` draws one per
    batch), applied with ``p`` (0.5 in ``simclr_hq``). Kernel as ContraD: ``k = 2 floor((H // 10) / 2) + 1``
    taps (from the height, for both axes), the normalised 2-D Gaussian of kornia
    ``get_gaussian_kernel2d`` (separable), reflect border (``filter2D(..., "reflect")``). Images under
    20 px high get a 1-tap kernel (the identity), as in ContraD. ``params["sigma"]``: ``(B,)``.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0), p: float = 0.5,
                 input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)
        self.sigma = _check_interval(sigma, "sigma", 0.0, float("inf"))

    @staticmethod
    def kernel_size(height: int) -> int:
        return 2 * int((height // 10) / 2) + 1

    def sample_params(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Params:
        return {"sigma": _uniform((x.shape[0],), *self.sigma, x, generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        B, C, H, W = x.shape
        k = self.kernel_size(H)
        r = k // 2
        if r == 0:
            return x
        taps = torch.arange(k, dtype=x.dtype, device=x.device) - r
        g = torch.exp(-taps[None, :] ** 2 / (2.0 * params["sigma"].to(x.dtype)[:, None] ** 2))   # (B, k)
        g = (g / g.sum(1, keepdim=True)).repeat_interleave(C, 0)                                  # (B C, k)
        y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
        y = F.conv2d(y, g.view(B * C, 1, k, 1), groups=B * C)
        y = F.conv2d(y, g.view(B * C, 1, 1, k), groups=B * C)
        return y.view(B, C, H, W)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, " + super().extra_repr()


# --------------------------------------------------------------------------------------------------
# DiffAugment (mit-han-lab/data-efficient-gans DiffAugment_pytorch.py)

# policy word -> the ops it runs, in the official order (AUGMENT_FNS)
DIFFAUG_OPS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "translation": ("translation",),
    "cutout": ("cutout",),
    "brightness": ("brightness",),
    "saturation": ("saturation",),
    "contrast": ("contrast",),
}


class DiffAugment(Augment):
    """DiffAugment (Zhao et al. 2020), in [-1, 1] as its paper code (``input_range`` is mapped there:
    with (0, 1) this is ContraD ``third_party/diffaug.py``'s ``2x - 1`` ... ``0.5x + 0.5``). Per sample:

    - brightness ``x + (u - 0.5)``, ``u ~ U(0, 1)`` (``rand_brightness``);
    - saturation ``(x - m_c) 2u + m_c``, ``m_c`` the mean over channels per pixel (``rand_saturation``);
    - contrast ``(x - m) (u + 0.5) + m``, ``m`` the mean over C, H, W (``rand_contrast``);
    - translation by integers ``t_h in [-s_h, s_h]``, ``s_h = int(H ratio + 0.5)`` (same for W), ratio
      1/8, zero (mid-grey) fill (``rand_translation``);
    - cutout of an ``int(H ratio + 0.5) x int(W ratio + 0.5)`` box, ratio 1/2, start ``o - size // 2``,
      ``o`` uniform on ``[0, H + 1 - size % 2)``, clipped, filled with 0 (``rand_cutout``).

    ``policy``: comma-separated words of :data:`DIFFAUG_OPS`, run in the given order ("color,translation,
    cutout" is the paper's; ContraD's ``diffaug`` mode uses "color,cutout"). ``p``: probability that a
    sample is augmented at all (1 in the official code). ``clamp``: clip the output to ``input_range``
    (the official code does not). ``params``: per op name, ``(B,)`` factors or ``(B, 2)`` int offsets.
    """

    working_range = (-1.0, 1.0)

    def __init__(self, policy: str = "color,translation,cutout", translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5, p: float = 1.0, clamp: bool = False,
                 input_range: Sequence[float] = (0.0, 1.0)):
        super().__init__(p, input_range)
        if not isinstance(policy, str):
            raise ValueError(f"policy must be a comma-separated string; got {policy!r}")
        words = [w.strip() for w in policy.split(",") if w.strip()]
        bad = [w for w in words if w not in DIFFAUG_OPS]
        if bad:
            raise ValueError(f"unknown DiffAugment policy word(s) {bad} in policy {policy!r}; "
                             f"known: {sorted(DIFFAUG_OPS)}")
        if not 0.0 <= float(translation_ratio) <= 1.0:
            raise ValueError(f"translation_ratio must be in [0, 1]; got {translation_ratio!r}")
        if not 0.0 <= float(cutout_ratio) <= 1.0:
            raise ValueError(f"cutout_ratio must be in [0, 1]; got {cutout_ratio!r}")
        self.policy = ",".join(words)
        self.ops = tuple(op for w in words for op in DIFFAUG_OPS[w])
        self.translation_ratio, self.cutout_ratio = float(translation_ratio), float(cutout_ratio)
        self.clamp = bool(clamp)

    def shifts(self, H: int, W: int) -> tuple[int, int]:
        return int(H * self.translation_ratio + 0.5), int(W * self.translation_ratio + 0.5)

    def cutout_size(self, H: int, W: int) -> tuple[int, int]:
        return int(H * self.cutout_ratio + 0.5), int(W * self.cutout_ratio + 0.5)

    def sample_params(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> Params:
        B, _, H, W = x.shape
        params: list[torch.Tensor] = []
        for op in self.ops:
            if op in ("brightness", "saturation", "contrast"):
                params.append(_uniform((B,), 0.0, 1.0, x, generator))
            elif op == "translation":
                sh, sw = self.shifts(H, W)
                lim = torch.tensor([sh, sw], device=x.device).expand(B, 2)
                params.append(_randint(-lim, lim, x, generator))
            elif op == "cutout":
                ch, cw = self.cutout_size(H, W)
                params.append(torch.stack([_cutout_offsets(B, ch, H, x, generator),
                                           _cutout_offsets(B, cw, W, x, generator)], 1))
            else:
                raise ValueError(f"unknown DiffAugment op {op!r}")
        return {f"{i}:{op}": v for i, (op, v) in enumerate(zip(self.ops, params))}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        B, C, H, W = x.shape
        for key, v in params.items():
            op = key.split(":", 1)[1]
            if op == "brightness":
                x = x + _per_sample(v - 0.5, x)
            elif op == "saturation":
                m = x.mean(dim=1, keepdim=True)
                x = (x - m) * _per_sample(2.0 * v, x) + m
            elif op == "contrast":
                m = x.mean(dim=(1, 2, 3), keepdim=True)
                x = (x - m) * _per_sample(v + 0.5, x) + m
            elif op == "translation":
                rows = torch.arange(H, device=x.device) + v[:, 0:1]            # (B, H): source row
                cols = torch.arange(W, device=x.device) + v[:, 1:2]            # (B, W): source col
                inside = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[:, None, None, :]
                x = x.gather(2, rows.clamp(0, H - 1)[:, None, :, None].expand(B, C, H, W))
                x = x.gather(3, cols.clamp(0, W - 1)[:, None, None, :].expand(B, C, H, W))
                x = x * inside.to(x.dtype)
            elif op == "cutout":
                ch, cw = self.cutout_size(H, W)
                x = x * _box_mask(v[:, 0], v[:, 1], ch, cw, H, W, x)
            else:
                raise ValueError(f"unknown DiffAugment op {op!r}")
        return x

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        y = super().forward(x, generator)
        if self.clamp and self.p > 0.0:
            y = _clamp(y, *self.input_range)
        return y

    def extra_repr(self) -> str:
        return (f"policy={self.policy!r}, translation_ratio={self.translation_ratio}, "
                f"cutout_ratio={self.cutout_ratio}, clamp={self.clamp}, " + super().extra_repr())


# --------------------------------------------------------------------------------------------------
# builder

AUGMENT_NAMES = ("none", "simclr", "simclr_hq", "simclr_hq_cutout", "cutout", "diffaug", "hfrt",
                 "simclr_hfrt")


def _simclr_ops(kw: dict, blur: bool, cutout: bool, spatial: str = "crop") -> list[Augment]:
    if spatial == "crop":            # RandomResizeCropLayer, HorizontalFlipLayer
        ops: list[Augment] = [
            RandomResizedCrop(scale=kw.pop("scale", (0.2, 1.0)), ratio=kw.pop("ratio", (3 / 4, 4 / 3)),
                              p=kw.pop("crop_p", 1.0), padding_mode=kw.pop("padding_mode", "reflection")),
            RandomHorizontalFlip(p=kw.pop("flip_p", 0.5))]
    else:                            # HorizontalFlipRandomCrop (the hfrt mode)
        ops = [HorizontalFlipRandomCrop(max_pixels=kw.pop("max_pixels", 4),
                                        padding_mode=kw.pop("padding_mode", "reflection"),
                                        flip_p=kw.pop("flip_p", 0.5), p=kw.pop("hfrt_p", 1.0))]
    ops += [
        ColorJitter(brightness=kw.pop("brightness", 0.4), contrast=kw.pop("contrast", 0.4),
                    saturation=kw.pop("saturation", 0.4), hue=kw.pop("hue", 0.1), p=kw.pop("jitter_p", 0.8),
                    order=kw.pop("order", "per_sample"), hsv_grad=kw.pop("hsv_grad", "straight_through"),
                    hue_units=kw.pop("hue_units", "contrad")),
        RandomGrayscale(p=kw.pop("gray_p", 0.2)),
    ]
    if blur:
        ops.append(RandomGaussianBlur(sigma=kw.pop("sigma", (0.1, 2.0)), p=kw.pop("blur_p", 0.5)))
    if cutout:
        ops.append(Cutout(length=kw.pop("length", 15), p=kw.pop("cutout_p", 0.5)))
    return ops


def build_augment(name: str, **kwargs) -> nn.Module:
    """The augmentation called ``name`` (ContraD ``get_augment`` modes); ``forward(x, generator=None)``.

    - ``"none"``: identity.
    - ``"simclr"`` (ContraD CIFAR): crop (``scale=(0.2, 1)``, ``ratio=(3/4, 4/3)``, ``crop_p=1``,
      ``padding_mode="reflection"``), flip (``flip_p=0.5``), colour jitter (``brightness=contrast=
      saturation=0.4``, ``hue=0.1``, ``jitter_p=0.8``, ``order``, ``hsv_grad``, ``hue_units``),
      grayscale (``gray_p=0.2``).
    - ``"simclr_hq"``: simclr + Gaussian blur (``sigma=(0.1, 2)``, ``blur_p=0.5``).
    - ``"simclr_hq_cutout"``: simclr_hq + cutout (``length=15``, ``cutout_p=0.5``).
    - ``"cutout"``: :class:`Cutout` (``length=15``, ``p=1``).
    - ``"diffaug"``: :class:`DiffAugment` (``policy="color,translation,cutout"``, ``translation_ratio``,
      ``cutout_ratio``, ``p``, ``clamp``).
    - ``"hfrt"`` (ContraD ``HorizontalFlipRandomCrop``, official mode of the same name): flip with
      ``flip_p=0.5`` and an integer translation ``dx, dy`` uniform on ``[-max_pixels, max_pixels]``
      (``max_pixels=4``: ``augment.gin`` at 32 px; scale it with the image, 16 at 128 px, 64 at 512 px),
      ``padding_mode="reflection"``, ``p=1``.
    - ``"simclr_hfrt"`` (not an official mode): simclr with its spatial part (the bilinear resized crop
      and the flip) replaced by the hfrt op (``max_pixels=4``, ``padding_mode="reflection"``,
      ``flip_p=0.5``, ``hfrt_p=1``), followed by simclr's colour jitter and grayscale with simclr's
      keywords and defaults. For data whose content is a few pixels (the embedded shapes, 3-6 px
      objects) where the half-pixel bilinear zoom of the crop blurs what D should see; the official
      ``simclr`` stays the ContraD default.

    Every name takes ``input_range=(0, 1)``. Unknown names or keywords and bad values raise
    ``ValueError`` naming them.
    """
    kw = dict(kwargs)
    input_range = kw.pop("input_range", (0.0, 1.0))
    if not isinstance(name, str) or name not in AUGMENT_NAMES:
        raise ValueError(f"unknown augmentation {name!r}; known: {list(AUGMENT_NAMES)}")
    if name == "none":
        module: nn.Module = Identity(input_range=input_range)
    elif name in ("simclr", "simclr_hq", "simclr_hq_cutout"):
        module = Compose(_simclr_ops(kw, blur=name != "simclr", cutout=name == "simclr_hq_cutout"),
                         input_range=input_range)
    elif name == "simclr_hfrt":
        module = Compose(_simclr_ops(kw, blur=False, cutout=False, spatial="hfrt"), input_range=input_range)
    elif name == "hfrt":
        module = HorizontalFlipRandomCrop(max_pixels=kw.pop("max_pixels", 4),
                                          padding_mode=kw.pop("padding_mode", "reflection"),
                                          flip_p=kw.pop("flip_p", 0.5), p=kw.pop("p", 1.0), input_range=input_range)
    elif name == "cutout":
        module = Cutout(length=kw.pop("length", 15), p=kw.pop("p", 1.0), input_range=input_range)
    elif name == "diffaug":
        module = DiffAugment(policy=kw.pop("policy", "color,translation,cutout"),
                             translation_ratio=kw.pop("translation_ratio", 0.125),
                             cutout_ratio=kw.pop("cutout_ratio", 0.5), p=kw.pop("p", 1.0),
                             clamp=kw.pop("clamp", False), input_range=input_range)
    else:
        raise ValueError(f"unknown augmentation {name!r}")
    if kw:
        raise ValueError(f"unknown keyword(s) {sorted(kw)} for augmentation {name!r}")
    return module

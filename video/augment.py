"""VideoMoCo's pretraining augmentation, batched on the clips' device.

Official code: tinapan-pt/VideoMoCo at commit 42e069aef6f8952fa67b87ba5269851eedd834c3.

- On the CPU, per clip (``train.py``: ``RandomResizedCropVideo(crop_size, (0.2, 1))`` in the dataset's
  transform, applied separately to the query and the key view of one decoded clip): one crop box for
  all frames. Here: :class:`video.videomoco.ClipAugment` with ``brightness=0``.
- On the GPU (``moco/loader.py::MoCoAugment``, kornia on ``(B*T, C, H, W)``): ``RandomGrayscale(p=0.2)``,
  ``ColorJitter(0.4, 0.4, 0.4, 0.4)``, ``RandomHorizontalFlip()``, ``Normalize(ImageNet mean, std)``.
  Because kornia sees the frames as a batch of images, every FRAME draws its own grey coin, jitter
  factors and flip (``per="frame"``, the default). ``per="clip"`` draws once per clip.

kornia semantics, read in kornia v0.5.0 (``augmentation/augmentation.py::ColorJitter``,
``random_generator.random_color_jitter_generator``, ``functional.apply_color_jitter``,
``enhance/adjust.py``): factors ``b, c, s ~ U(0.6, 1.4)``, ``h ~ U(-0.4, 0.4)`` per image; brightness is
ADDITIVE, ``clamp(x + (b - 1), 0, 1)``; contrast multiplies without a mean, ``clamp(x c, 0, 1)``;
saturation ``clamp(S s, 0, 1)`` and hue ``H + h`` turns (mod 1) in HSV; the four are applied in ONE
random order per call (``order=torch.randperm(4)``), with probability 1. Grey is
``0.299 R + 0.587 G + 0.114 B``. HSV conversion: :func:`text2image.augment.rgb_to_hsv` (hexcone).
"""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import nn

__all__ = ["VideoMoCoAugment"]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VideoMoCoAugment(nn.Module):
    """Official GPU augmentation of clips ``(B, 3, T, H, W)`` in [0, 1] -> the same shape, normalised.

    Args:
        grayscale_p: probability of the grey conversion (0.2).
        brightness, contrast, saturation, hue: jitter strengths (0.4 each; kornia ranges above).
        flip_p: horizontal flip probability (0.5; 0 for data whose labels depend on left/right).
        normalize: ImageNet mean/std at the end.
        per: ``"frame"`` (official: independent draws per frame) or ``"clip"``.
    """

    def __init__(self, grayscale_p: float = 0.2, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.4, flip_p: float = 0.5, normalize: bool = True,
                 per: str = "frame"):
        super().__init__()
        if per not in ("frame", "clip"):
            raise ValueError(f"per must be 'frame' or 'clip', got {per!r}")
        for name, v, hi in (("grayscale_p", grayscale_p, 1), ("flip_p", flip_p, 1), ("brightness", brightness, 1),
                            ("contrast", contrast, float("inf")), ("saturation", saturation, float("inf")),
                            ("hue", hue, 0.5)):
            if not 0 <= v <= hi:
                raise ValueError(f"{name} must be in [0, {hi}], got {v}")
        self.grayscale_p, self.flip_p, self.per, self.normalize = grayscale_p, flip_p, per, normalize
        self.ranges = {"brightness": (1 - brightness, 1 + brightness), "contrast": (max(0.0, 1 - contrast), 1 + contrast),
                       "saturation": (max(0.0, 1 - saturation), 1 + saturation), "hue": (-hue, hue)}
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("grey", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def sample_params(self, b: int, t: int, device: torch.device,
                      generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Draws for ``b`` clips of ``t`` frames: ``(b * t,)`` tensors (repeated over frames when
        ``per="clip"``) and ``order (4,)``."""
        n = b * t if self.per == "frame" else b
        gdev = generator.device if generator is not None else device

        def u(lo, hi):
            return (torch.rand(n, generator=generator, device=gdev) * (hi - lo) + lo).to(device)

        p = {"grey": u(0, 1) < self.grayscale_p}
        p.update({name: u(*r) for name, r in self.ranges.items()})
        p["flip"] = u(0, 1) < self.flip_p
        if self.per == "clip":
            p = {k: v.repeat_interleave(t) for k, v in p.items()}
        p["order"] = torch.randperm(4, generator=generator, device=gdev).to(device)
        return p

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Frames ``(N, 3, H, W)`` in [0, 1] with the draws ``p`` -> ``(N, 3, H, W)``."""
        from text2image.augment import hsv_to_rgb, rgb_to_hsv

        def col(v):
            return v.to(x.dtype).view(-1, 1, 1, 1)

        grey = (x * self.grey.to(x.dtype)).sum(1, keepdim=True).expand_as(x)
        x = torch.where(p["grey"].view(-1, 1, 1, 1), grey, x)
        for op in p["order"].tolist():
            if op == 0:
                x = (x + (col(p["brightness"]) - 1)).clamp(0, 1)
            elif op == 1:
                x = (x * col(p["contrast"])).clamp(0, 1)
            elif op == 2:
                hsv = rgb_to_hsv(x)
                x = hsv_to_rgb(torch.cat([hsv[:, :1], (hsv[:, 1:2] * col(p["saturation"])).clamp(0, 1), hsv[:, 2:]], 1))
            elif op == 3:
                hsv = rgb_to_hsv(x)
                x = hsv_to_rgb(torch.cat([torch.remainder(hsv[:, :1] + col(p["hue"]), 1.0), hsv[:, 1:]], 1))
            else:
                raise ValueError(f"jitter order entries must be 0..3, got {op}")
        x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def forward(self, clips: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if clips.dim() != 5 or clips.shape[1] != 3:
            raise ValueError(f"expected clips (B, 3, T, H, W), got shape {tuple(clips.shape)}")
        b, _, t = clips.shape[:3]
        frames = rearrange(clips, "b c t h w -> (b t) c h w")
        out = self.apply(frames, self.sample_params(b, t, clips.device, generator))
        return rearrange(out, "(b t) c h w -> b c t h w", b=b)

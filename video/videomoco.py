"""VideoMoCo (Pan et al., CVPR 2021): adversarial temporal dropout + MoCo with temporal decay.

A generator G scores every frame of a clip and drops the lowest-scoring 25% (each replaced by its own
mean, a grey frame, so the clip keeps its length). The discriminator D is MoCo (He et al., CVPR 2020):
the dropped clip G(x_q) is the query, the intact clip's other augmentation x_k goes through the
momentum key encoder, and the queue's negatives are weighted by temporal decay t^age.

Official code: tinapan-pt/VideoMoCo at commit 42e069aef6f8952fa67b87ba5269851eedd834c3
(``moco/builder.py``, ``train.py``, ``eval.py``, ``moco/loader.py``); every "official" below names the
file and function it was read from.

Losses:

- D: InfoNCE (paper Eq. 4/6) ``L_D = -log exp(q.k/T) / (exp(q.k/T) + sum_j w_j(q, n_j))``, q = D(G(x_q)),
  with ``w_j`` the temporal-decay term. ``negative_weight_mode="logit"`` (default here) is the official
  ``MoCo.forward`` (``weight = t ** count; l_neg = q . (weight * queue)``); ``"exp"`` is the paper's
  Eq. 6 (``t^age exp(q . n_j / T)``, issue #12 of the official repository). No run here shows which one
  gives the published numbers; the official code is the default because it is the code that was
  released with them. :class:`cmgen.losses.InfoNCE` itself defaults to ``"exp"``: there
  ``negative_weights`` are generic per-negative weights on the denominator terms (the paper's reading,
  shared with MoCHi), and the VideoMoCo config chooses the official reading explicitly.
- G, ``g_objective``:

  - ``"official"`` (default; ``train.py::train``): ONE forward (``q_real = D(x_q)``, ``q_fake =
    D(G(x_q))``, keys, logits), then ``loss_g = -100 L1(q_fake, q_real)`` backward with D's parameters
    frozen (``set_requires_grad([netD], False)``), then ``loss_d`` backward WITHOUT zeroing G's
    gradients, then both optimizers step. G's gradient is therefore that of ``-100 L1 + L_D``: G is
    pushed away from the intact clip's embedding but also *helps* D's InfoNCE; D's gradient is that
    of ``L_D`` alone. D and G both see the models as they were before the step.
  - ``"l1"``: the G loss alone, ``L_G = -lambda L1(q_fake, q_real)`` (lambda = 100), with a D update
    first and then a G update through the frozen, just-updated D (the engine's GAN order).
  - ``"maximize_d"`` (paper, Eq. 3 ``max_G min_D``): ``L_G = -lambda L_D(G(x_q))``, same order as ``"l1"``.
- ``adversarial_start_step``: plain MoCo (query = intact clip, G idle) before it, as the recipe's
  MoCo-only first half (official README: "100 epochs to train D for initialization"); joint from it on.

Temporal decay (``moco/builder.py::MoCo._dequeue_and_enqueue``: ``count += 1; count[ptr:ptr+B] = 1``):
a key's age counts *enqueues* (training steps), not keys. With K = 65536 and a global batch of 32 (the
README's ``-b 32``) the oldest key is 2048 enqueues old and weighs 0.99999^2048 = 0.9797; with the
``train.py`` default batch 256 it weighs 0.99744, and in ``configs/videomoco/moving_digits.yaml``
(K = 256, batch 8: 32 enqueues) 0.99968. So at t = 0.99999 the decay is nearly flat.
``decay_ages="index"`` offers the other reading of the paper's t^i: i = the key's position in the
queue counted from the newest key (1 .. K), so the oldest of K = 65536 keys weighs 0.99999^65536 = 0.519.

Where this differs from the official code:

- The official G (``moco/builder.py::Generator_Mask``) stacks 32 frames of 112 px into channels
  (2D convs + ASPP + BiLSTM) and only works at 32 x 112. :class:`FrameDropGenerator` keeps the idea
  at any size: a shared per-frame 2D CNN, a BiLSTM over time, one logit per frame, softmax over frames
  (the official ``fc`` ends in ``Softmax``).
- Gradient to G's scores: the official ``VideoTopk.backward`` is a straight-through estimator that
  gives each score the sum of its frame's pixel gradients (``torch.sum(grad_output, dim=(1, 3, 4))``,
  for kept and dropped frames alike) and the clip no gradient: ``straight_through="official"``. The
  default ``"soft_mask"`` uses the gradient of the soft mask ``x + k softmax(-logits) (mean - x)``,
  which is zero for a frame equal to its own mean (see :meth:`FrameDropGenerator.drop`).
- The queue's ages live in a buffer and are saved in checkpoints (the official ``count`` is not).
- BatchNorm forwards of D's query encoder per step: the official ``MoCo.forward`` runs it once on the
  intact clip and once on the dropped clip (``g_objective="official"`` does the same, in that order).
  ``"l1"`` runs it three times (dropped clip for D; dropped and intact clip again through the updated
  D for G) and ``"maximize_d"`` twice, so BN running statistics take more updates per step there.
- Shuffle-BN (``MoCo._batch_shuffle_ddp``) permutes the global batch across processes; in ONE process
  :func:`cmgen.distributed.batch_shuffle` is the identity (there is nothing to shuffle across), so a
  single-process run's key encoder normalises its batch with its own statistics and the leak shuffle-BN
  guards against is not prevented (the official code does not run without DDP at all).
- Gradient accumulation (``train.grad_accum = n``, micro-batches of B/n; the official code has none):
  the momentum update runs on the first micro-batch and the keys of all n micro-batches are enqueued
  together after the last, so every micro-batch sees the key encoder, negatives and ages of the step
  and the queue advances once per step by B keys. With the ``"official"`` objective
  (one update of each model from the summed gradients) the step then equals one step on the whole
  batch, except that BatchNorm normalises each micro-batch with its own statistics (as any
  accumulation does); with BN in eval mode it is exact (``tests/test_videomoco.py``). ``"l1"`` and
  ``"maximize_d"`` update D before G inside a step, so there G's gradient of micro-batches 1..n-1 goes
  through the not yet updated D: an approximation, as for every D-then-G step (``cmgen.engine.method``).
  On several processes the enqueued keys are ordered by micro-batch, then by rank (the order of the
  engine's global micro-batches).
- ``train.py`` backpropagates twice through one DDP forward (``loss_g`` with ``retain_graph``, then
  ``loss_d``). Done that way with current PyTorch, DDP all-reduces only the first backward and the
  ranks drift apart (seen in a 2-process run of an earlier version of this step). Here the same
  gradients come from one backward pass (see :meth:`VideoMoCoMethod.train_step`), all-reduced once.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import Dataset

from cmgen.config import ExperimentConfig, OptimConfig
from cmgen.distributed import batch_shuffle, batch_unshuffle, gather_no_grad
from cmgen.engine.method import Method, StepContext
from cmgen.engine.schedules import build_optimizer
from cmgen.losses import InfoNCE, MoCoQueue, momentum_update

from .backbones import build_backbone
from .augment import VideoMoCoAugment
from .datasets import Kinetics400, MovingDigitsSpec, SkipReport, UCF101, stratified_subset
from .finetune import IMAGENET_MEAN, IMAGENET_STD, ClipTransform

__all__ = ["FrameDropGenerator", "VideoMoCo", "ClipAugment", "TwoViewClips", "VideoMoCoModelConfig",
           "VideoMoCoDataConfig", "VideoMoCoConfig", "VideoMoCoMethod"]


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
class FrameDropGenerator(nn.Module):
    """G: one score per frame; the ``floor(drop_ratio * T)`` lowest-scoring frames become grey frames.

    Per-frame features (two stride-2 conv-BN-ReLU, global pool) -> BiLSTM over time -> Linear -> one
    logit per frame; ``scores = softmax(logits)`` over frames as the official generator's ``Softmax``.

    Args:
        width: channels of the per-frame CNN (``width``, ``2 * width``).
        hidden: BiLSTM output size (``hidden // 2`` per direction, as the official ``hidden_dim // 2``).
        drop_ratio: share of frames dropped, k = floor(drop_ratio * T) (official: 8 of 32); k must be in
            [1, T - 1].
        straight_through: gradient of the hard drop with respect to the scores, see :meth:`drop`:
            ``"soft_mask"`` (default) or ``"official"`` (``moco/builder.py::VideoTopk.backward``).
    """

    ESTIMATORS = ("soft_mask", "official")

    def __init__(self, width: int = 16, hidden: int = 32, drop_ratio: float = 0.25,
                 straight_through: str = "soft_mask"):
        super().__init__()
        if width < 1 or hidden < 2 or hidden % 2:
            raise ValueError(f"width must be >= 1 and hidden even >= 2, got width={width}, hidden={hidden}")
        if not 0.0 < drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must be in (0, 1), got {drop_ratio}")
        if straight_through not in self.ESTIMATORS:
            raise ValueError(f"straight_through must be one of {self.ESTIMATORS}, got {straight_through!r}")
        self.drop_ratio = float(drop_ratio)
        self.straight_through = straight_through
        self.frame_net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.rnn = nn.LSTM(2 * width, hidden // 2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(hidden, 1)

    def num_dropped(self, t: int) -> int:
        """k = floor(drop_ratio * T): 8 of 32 and 4 of 16 frames at 25%."""
        k = math.floor(self.drop_ratio * t)
        if not 1 <= k < t:
            raise ValueError(f"drop_ratio={self.drop_ratio} drops {k} of T={t} frames; need 1 <= k < T")
        return k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W) -> (B, T)`` per-frame logits."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected clips (B, 3, T, H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        feats = self.frame_net(rearrange(x, "b c t h w -> (b t) c h w"))
        seq, _ = self.rnn(rearrange(feats, "(b t) d -> b t d", b=b))   # (B, T, hidden)
        return self.fc(seq).squeeze(-1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` frame scores, softmax over frames (official ``fc`` + ``Softmax``)."""
        return self.logits(x).softmax(dim=1)

    def drop(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the k lowest-logit frames of each clip by their mean; straight-through gradient.

        Args:
            x: clips ``(B, 3, T, H, W)``.
            logits: ``(B, T)`` frame logits (the ranking equals the official ranking of softmax scores).

        Returns ``(x_fake (B, 3, T, H, W), dropped (B, T) bool)``. A dropped frame is replaced by the mean
        over its C, H, W (official ``VideoTopk.forward``: ``im_q_fake[i, :, j] = mean(im_q_fake[i, :, j])``).
        The forward value is the hard drop in both estimators; the gradient with respect to ``logits``:

        - ``"soft_mask"``: with hard mask h (1 = dropped) and soft mask s = k * softmax(-logits) (sums to
          k like h, large for low logits), ``x_fake = where(h, mean, x) + (s - sg(s)) * (mean - x)``: the
          gradient of ``x + s * (mean - x)``.
        - ``"official"``: ``x_fake = sg(where(h, mean, x)) + (p - sg(p))`` with p = softmax(logits)
          broadcast over C, H, W: each score p_j receives the sum of its frame's pixel gradients and
          the clip none (``VideoTopk.backward`` returns ``grad_im = None, sum(grad_output, (1, 3, 4))``).
        """
        k = self.num_dropped(x.shape[2])
        idx = logits.topk(k, dim=1, largest=False).indices
        dropped = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)
        mean = x.mean(dim=(1, 3, 4), keepdim=True)                    # (B, 1, T, 1, 1) grey level per frame
        hard = torch.where(dropped[:, None, :, None, None], mean.expand_as(x), x)
        if self.straight_through == "soft_mask":
            soft = k * torch.softmax(-logits, dim=1)
            return hard + (soft - soft.detach())[:, None, :, None, None] * (mean - x), dropped
        if self.straight_through == "official":
            p = logits.softmax(dim=1)
            return hard.detach() + (p - p.detach())[:, None, :, None, None], dropped
        raise ValueError(f"straight_through must be one of {self.ESTIMATORS}, got {self.straight_through!r}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``drop(x, logits(x))``: ``(x_fake (B, 3, T, H, W), dropped (B, T) bool)``."""
        return self.drop(x, self.logits(x))


class VideoMoCo(nn.Module):
    """D: MoCo query encoder, momentum key encoder, queue of K keys with temporal decay, InfoNCE.

    Args:
        encoder: the query encoder ``(B, 3, T, H, W) -> (B, dim)``; the key encoder is a frozen copy.
        dim: embedding size (128).
        K: queue size (65536).
        m: key-encoder momentum (0.999), MoCo Eq. 2.
        T: softmax temperature (0.07).
        temporal_decay: t (0.99999); None = plain MoCo (unit weights).
        negative_weight_mode: ``"logit"`` (official code, default) or ``"exp"`` (paper Eq. 6).
        decay_ages: ``"enqueue"`` (official ``count``: a key enqueued a steps ago weighs t^a, so the oldest
            key of a full queue weighs t^(K / global batch)) or ``"index"`` (t^i with i = 1 .. K the key's
            position from the newest key).

    Distributed helpers (shuffle-BN, gathering keys) stay with the caller (:class:`VideoMoCoMethod`).
    """

    DECAY_AGES = ("enqueue", "index")

    def __init__(self, encoder: nn.Module, dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.07,
                 temporal_decay: float | None = 0.99999, negative_weight_mode: str = "logit",
                 decay_ages: str = "enqueue"):
        super().__init__()
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum m must be in [0, 1], got {m}")
        if decay_ages not in self.DECAY_AGES:
            raise ValueError(f"decay_ages must be one of {self.DECAY_AGES}, got {decay_ages!r}")
        self.K, self.m, self.T, self.decay_ages = K, m, T, decay_ages
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)          # initialised as the query encoder (MoCo)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.queue = MoCoQueue(dim, K, temporal_decay)
        self.criterion = InfoNCE(T, negative_weight_mode=negative_weight_mode)

    def forward(self, *clips: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Normalised queries ``(B, 3, T, H, W) -> (B, dim)``, one query-encoder pass per clip tensor
        (several in one call so a DDP-wrapped D sees one forward, as the official ``MoCo.forward`` runs
        ``encoder_q`` on the intact and the dropped clip); a tuple when given several."""
        if not clips:
            raise ValueError("VideoMoCo.forward needs at least one clip batch")
        out = tuple(F.normalize(self.encoder_q(x), dim=1) for x in clips)
        return out[0] if len(out) == 1 else out

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys (K, dim), weights (K,))``: copies of the queue and its decay weights, to take before
        the step's enqueue (see ``decay_ages``)."""
        keys, weights = self.queue.snapshot()
        if self.decay_ages == "index" and self.queue.temporal_decay is not None:
            slots = torch.arange(self.K, device=self.queue.ptr.device)
            index = (self.queue.ptr - 1 - slots) % self.K + 1            # newest slot 1, oldest K
            decay = torch.tensor(self.queue.temporal_decay, dtype=torch.float64, device=index.device)
            weights = torch.pow(decay, index.to(torch.float64)).to(keys.dtype).to(keys.device)
        return keys, weights

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised keys from the momentum encoder, no gradient: ``(B, 3, T, H, W) -> (B, dim)``."""
        return F.normalize(self.encoder_k(x), dim=1)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q (MoCo Eq. 2; BN buffers untouched, as MoCo)."""
        momentum_update(self.encoder_q, self.encoder_k, self.m)

    def loss(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """InfoNCE with logits ``Nx(1+K)`` = [q.k, q.(w_j n_j) or q.n_j + log w_j] / T, target 0.

        ``negatives (K, dim), weights (K,)`` come from :meth:`negatives` taken before the
        step's enqueue.
        """
        return self.criterion(q, k, negatives=negatives, negative_weights=weights)


# --------------------------------------------------------------------------------------------------
# data: two augmentations of one clip
# --------------------------------------------------------------------------------------------------
class ClipAugment:
    """Optional short-side resize (aspect ratio kept), random resized crop (one box for all frames; scale
    ``(0.2, 1)`` and ratio (3/4, 4/3) as the official ``RandomResizedCropVideo``) to ``size``, then
    brightness jitter ``x * U(1 - b, 1 + b)`` with probability 0.8 (``brightness=0``: none, the official
    CPU side). No horizontal flip: on moving-digits it would swap left/right motion classes.

    Shape: ``(3, T, H, W) -> (3, T, size, size)``, values clamped to [0, 1]. Draws from torch's global
    RNG (seeded per batch by the engine's loader).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), brightness: float = 0.4,
                 short_side: int | None = None):
        if size < 1 or not 0.0 < scale[0] <= scale[1] <= 1.0 or not 0.0 <= brightness < 1.0:
            raise ValueError(f"need size >= 1, 0 < scale[0] <= scale[1] <= 1, 0 <= brightness < 1; "
                             f"got size={size}, scale={scale}, brightness={brightness}")
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side must be None or >= 1, got {short_side}")
        self.size, self.scale, self.brightness = int(size), tuple(scale), float(brightness)
        self.short_side = short_side

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.functional import resize, resized_crop
        frames = clip.transpose(0, 1)                                   # (T, 3, H, W), decoded at its own aspect
        if self.short_side is not None:
            h, w = frames.shape[-2:]
            r = self.short_side / min(h, w)
            frames = resize(frames, [max(1, round(h * r)), max(1, round(w * r))], antialias=True)
        top, left, h, w = RandomResizedCrop.get_params(frames, list(self.scale), [3 / 4, 4 / 3])
        out = resized_crop(frames, top, left, h, w, [self.size, self.size], antialias=True)
        if self.brightness and torch.rand(()) < 0.8:
            out = out * torch.empty(()).uniform_(1 - self.brightness, 1 + self.brightness)
        return out.clamp_(0, 1).transpose(0, 1).contiguous()


class TwoViewClips(Dataset):
    """``{"q": view 1, "k": view 2, "label": int}`` of one random clip per video (two augmentations of
    the same clip, as the official ``video[0], video[1]``); views ``(3, T, size, size)``."""

    def __init__(self, clips: Dataset, augment: ClipAugment):
        self.clips, self.augment = clips, augment

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip, label = self.clips[i]
        return {"q": self.augment(clip), "k": self.augment(clip), "label": label}


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@dataclass
class VideoMoCoModelConfig:
    backbone: Literal["tiny", "r3d_18", "r2plus1d_18", "c3d"] = "r2plus1d_18"
    backbone_width: int = 16              # tiny backbone only
    weights_path: Optional[str] = None    # local torchvision state dict for r3d_18 / r2plus1d_18
    mlp: bool = False
    dim: int = 128
    K: int = 65536
    m: float = 0.999
    T: float = 0.07
    temporal_decay: Optional[float] = 0.99999
    negative_weight_mode: Literal["logit", "exp"] = "logit"   # logit: official code; exp: paper Eq. 6
    decay_ages: Literal["enqueue", "index"] = "enqueue"       # enqueue: official count; index: t^i per key
    drop_ratio: float = 0.25
    g_width: int = 16
    g_hidden: int = 128                   # official BiLSTM hidden_dim
    g_straight_through: Literal["soft_mask", "official"] = "soft_mask"
    # official: train.py's one-forward loop; l1: its G loss alone after a D step; maximize_d: paper Eq. 3
    g_objective: Literal["official", "l1", "maximize_d"] = "official"
    g_loss_weight: Optional[float] = None  # None: 100 for official and l1 (train.py), 1 for maximize_d
    adversarial_start_step: int = 0        # plain MoCo before this step (recipe: first 100 epochs)


@dataclass
class VideoMoCoDataConfig(MovingDigitsSpec):
    # None: cmgen's embedded moving-digits at its one location, data/moving-digits-<digest> (or under
    # $CMGEN_DATA), written on first use; a path: a UCF101 layout root (root/ucf101/UCF-101, ucfTrainTestlist)
    root: Optional[str] = None
    generate: Literal["auto", "always", "never"] = "auto"  # cmgen.data.prepare_embedded_data
    # ucf101: root/ucf101/{UCF-101, ucfTrainTestlist}; kinetics400: root/kinetics_video_dir (+ the CSV)
    dataset: Literal["ucf101", "kinetics400"] = "ucf101"
    kinetics_video_dir: str = "train"      # <label>/<youtube_id>_<start:06d>_<end:06d>.mp4, relative to root
    kinetics_csv: Optional[str] = None     # official kinetics_400_train.csv (relative to root); None: folders
    kinetics_split: Optional[str] = "train"
    clip_len: int = 16
    stride: int = 1
    size: int = 32                         # crop size (train.py -cs 112); frames are decoded natively
    short_side: Optional[int] = None       # short side (aspect kept) scaled while decoding, then crop; None: native
    crop_scale: tuple[float, float] = (0.2, 1.0)
    # tiny: ClipAugment's crop + brightness on the CPU, no flip, no normalisation (moving digits);
    # official: crop on the CPU, then moco/loader.py MoCoAugment on the device (video/augment.py)
    augment: Literal["tiny", "official"] = "tiny"
    augment_per: Literal["frame", "clip"] = "frame"   # official draws per frame (kornia on (B*T, C, H, W))
    flip: bool = True                      # official augment only (no flip for direction labels)
    brightness: float = 0.4                # tiny augment only
    eval_clips: int = 64                   # train/test videos (stratified by class) of evaluate's 1-NN, each split
    eval_root: Optional[str] = None        # kinetics400: a UCF101-layout root for the 1-NN monitor; None: none
    # the embedded data's writer settings (num_videos, num_frames, frame_size, ...) come from MovingDigitsSpec


@dataclass
class VideoMoCoProtocolConfig:
    """Epoch-based recipe (train.py counts epochs of one random clip per video, ``RandomClipSampler(
    video_clips, 1)``): with ``epochs`` set, ``train.max_steps``, the step schedule's milestones and
    ``model.adversarial_start_step`` are derived from the training set size and ``train.batch_size``."""
    epochs: Optional[int] = None              # README: --epochs 200
    lr_drop_epochs: list[int] = field(default_factory=lambda: [120, 160])   # --schedule 120 160
    adversarial_start_epoch: int = 100        # README: 100 epochs D only, then G and D


@dataclass
class VideoMoCoConfig(ExperimentConfig):
    method: str = "videomoco"
    model: VideoMoCoModelConfig = field(default_factory=VideoMoCoModelConfig)
    data: VideoMoCoDataConfig = field(default_factory=VideoMoCoDataConfig)
    protocol: VideoMoCoProtocolConfig = field(default_factory=VideoMoCoProtocolConfig)
    optim_g: Optional[OptimConfig] = None  # G's optimizer; None = same settings as ``optim``


def _as_backward(ctx: StepContext, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` as ``ctx.backward`` would differentiate it: divided by the accumulation steps and scaled
    by the fp16 grad scaler (when the context has an Accelerator)."""
    acc = getattr(ctx, "accelerator", None)
    if acc is None:
        return loss
    loss = loss / acc.gradient_accumulation_steps
    return acc.scaler.scale(loss) if acc.scaler is not None else loss


# --------------------------------------------------------------------------------------------------
# the engine method
# --------------------------------------------------------------------------------------------------
class VideoMoCoMethod(Method):
    """Models ``{"g": FrameDropGenerator, "d": VideoMoCo}``, one optimizer each; the step order follows
    ``model.g_objective`` (see the module docstring)."""

    config_class = VideoMoCoConfig

    def __init__(self, cfg: VideoMoCoConfig):
        super().__init__(cfg)
        m = cfg.model
        if m.adversarial_start_step < 0:
            raise ValueError(f"model.adversarial_start_step must be >= 0, got {m.adversarial_start_step}")
        if m.g_objective not in ("official", "l1", "maximize_d"):
            raise ValueError(f"model.g_objective must be 'official', 'l1' or 'maximize_d', got {m.g_objective!r}")
        default_weight = 1.0 if m.g_objective == "maximize_d" else 100.0
        self.g_weight = m.g_loss_weight if m.g_loss_weight is not None else default_weight
        self._eval_cache: dict | None = None
        self.gpu_augment: VideoMoCoAugment | None = None
        self.skips: SkipReport | None = None
        self._videos: Dataset | None = None
        self._step_keys: list[torch.Tensor] = []          # keys of this step's micro-batches, enqueued after the last
        p = cfg.protocol
        if p.epochs is not None:
            self._videos = self._train_videos()
            steps = len(self._videos) // cfg.train.batch_size
            if steps < 1 or p.epochs < 1:
                raise ValueError(f"protocol.epochs={p.epochs} with {len(self._videos)} videos and train.batch_size="
                                 f"{cfg.train.batch_size} gives no step")
            cfg.train.max_steps = p.epochs * steps
            cfg.schedule.kind = "step"
            cfg.schedule.milestones = [e * steps for e in p.lr_drop_epochs]
            m.adversarial_start_step = p.adversarial_start_epoch * steps

    def build_models(self, cfg: VideoMoCoConfig) -> dict[str, nn.Module]:
        m = cfg.model
        encoder = build_backbone(m.backbone, m.dim, m.backbone_width, m.mlp, m.weights_path)
        return {"g": FrameDropGenerator(m.g_width, m.g_hidden, m.drop_ratio, m.g_straight_through),
                "d": VideoMoCo(encoder, m.dim, m.K, m.m, m.T, m.temporal_decay, m.negative_weight_mode,
                               m.decay_ages)}

    def build_optimizers(self, cfg: VideoMoCoConfig, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        trainable = {n: [p for p in models[n].parameters() if p.requires_grad] for n in ("g", "d")}
        return {"g": build_optimizer(cfg.optim_g or cfg.optim, trainable["g"]),
                "d": build_optimizer(cfg.optim, trainable["d"])}

    def _data_root(self) -> Path:
        """``data.root``, or the embedded moving-digits written there on first use (resolved once: it
        waits on every rank)."""
        if getattr(self, "_resolved_root", None) is None:
            from cmgen.data import prepare_embedded_data
            d = self.cfg.data
            self._resolved_root = prepare_embedded_data(
                d.root, "moving-digits", d.writer_settings(), d.generate, required=("ucf101/UCF-101", "ucf101/ucfTrainTestlist/classInd.txt",
                                      "ucf101/ucfTrainTestlist/trainlist01.txt",
                                      "ucf101/ucfTrainTestlist/testlist01.txt"))
        return self._resolved_root

    def _ucf(self, split: str, train: bool) -> UCF101:
        """UCF101 videos decoded at their own size; test-time clips (``train=False``) get the short side
        resized to ``data.size`` and a centre crop (normalised with the official augmentation)."""
        d = self.cfg.data
        if d.dataset == "kinetics400":
            root = Path(d.eval_root) / "ucf101"
        else:
            root = self._data_root() / "ucf101"
        transform = None if train else ClipTransform(d.size, train=False, short_side=d.size,
                                                     normalize=d.augment == "official")
        return UCF101(root / "UCF-101", root / "ucfTrainTestlist" / f"{split}list01.txt",
                      root / "ucfTrainTestlist" / "classInd.txt", clip_len=d.clip_len, stride=d.stride,
                      size=None, train=train, transform=transform, short_side=d.short_side if train else None)

    def _train_videos(self) -> Dataset:
        d = self.cfg.data
        if d.dataset == "ucf101":
            return self._ucf("train", train=True)
        if d.dataset == "kinetics400":
            if d.root is None:
                raise ValueError("data.dataset=kinetics400 needs data.root (the Kinetics-400 folder)")
            root = Path(d.root)
            csv = None if d.kinetics_csv is None else root / d.kinetics_csv
            return Kinetics400(root / d.kinetics_video_dir, csv, d.kinetics_split, clip_len=d.clip_len,
                               stride=d.stride, train=True, short_side=d.short_side)
        raise ValueError(f"data.dataset must be 'ucf101' or 'kinetics400', got {d.dataset!r}")

    def build_dataset(self, cfg: VideoMoCoConfig) -> Dataset:
        d = cfg.data
        if d.augment not in ("tiny", "official"):
            raise ValueError(f"data.augment must be 'tiny' or 'official', got {d.augment!r}")
        videos = self._videos if self._videos is not None else self._train_videos()
        brightness = d.brightness if d.augment == "tiny" else 0.0
        dataset = TwoViewClips(videos, ClipAugment(d.size, d.crop_scale, brightness, d.short_side))
        if d.augment == "official":
            self.gpu_augment = VideoMoCoAugment(flip_p=0.5 if d.flip else 0.0, per=d.augment_per)
        from cmgen.engine.trainer import run_dir_of
        self.skips = SkipReport(run_dir_of(cfg) / "logs" / "skipped", len(dataset) // cfg.train.batch_size,
                                cfg.train.max_steps, cfg.train.log_every)
        missing = getattr(videos, "missing", [])
        if missing:
            log = run_dir_of(cfg) / "logs" / "missing_videos.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(m + "\n" for m in missing))
            print(f"data: {len(missing)} videos of the CSV are missing, left out (listed in {log})", flush=True)
        return self.skips.attach(dataset)

    def train_step(self, batch, step: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        m = self.cfg.model
        g, d = ctx.models["g"], ctx.models["d"]
        moco = ctx.unwrap("d")
        im_q, im_k = batch["q"], batch["k"]                            # (B, 3, T, H, W) each
        if self.gpu_augment is not None:                              # train.py: augmentation_gpu(video[i])
            with torch.no_grad():
                aug = self.gpu_augment.to(im_q.device)
                im_q, im_k = aug(im_q), aug(im_k)
        adversarial = step >= m.adversarial_start_step
        # Gradient accumulation (train.grad_accum micro-batches per step): the momentum update happens on
        # the first micro-batch and the step's keys are enqueued together after the last one, so every
        # micro-batch of a step sees the key encoder, negatives and ages of one step on their
        # concatenation (see the module docstring).
        first = not self._step_keys
        last = getattr(ctx, "sync_gradients", True)

        # Keys (MoCo Alg. 1): momentum update, then the key encoder on a batch shuffled across ranks,
        # so BN statistics cannot give the positive pair away (shuffle-BN; identity in one process).
        with torch.no_grad():
            if first:
                moco.momentum_update()
            shuffled, idx_unshuffle = batch_shuffle(im_k)
            k = batch_unshuffle(moco.key(shuffled), idx_unshuffle)   # (B, dim)
        negatives, weights = moco.negatives()                         # (K, dim), (K,) before this step's enqueue

        if not adversarial:                                           # MoCo-only warm-up: G idle
            loss_d = moco.loss(d(im_q), k, negatives, weights)
            ctx.backward(loss_d)
            ctx.step("d")
            loss_g = torch.zeros((), device=loss_d.device)
        elif m.g_objective == "official":
            # train.py::train: one forward; loss_g backward with D frozen; loss_d backward on top of
            # G's gradients (not zeroed); both optimizers step. Same gradients with ONE backward pass, so
            # DDP all-reduces once: loss_g's gradient for G alone (autograd.grad never reaches D's
            # parameters), added to G's .grad before loss_d's backward, whose all-reduce then averages
            # the sum (DDP reduces the accumulated .grad).
            x_fake, _ = g(im_q)
            q_real, q_fake = d(im_q, x_fake)
            loss_d = moco.loss(q_fake, k, negatives, weights)
            loss_g = -self.g_weight * F.l1_loss(q_fake, q_real)
            g_params = [p for p in ctx.unwrap("g").parameters() if p.requires_grad]
            grads = torch.autograd.grad(_as_backward(ctx, loss_g), g_params, retain_graph=True, allow_unused=True)
            for p, grad in zip(g_params, grads):
                if grad is not None:
                    p.grad = grad if p.grad is None else p.grad + grad
            ctx.backward(loss_d)
            ctx.step("g")
            ctx.step("d")
        else:
            # 1) D: the dropped clip is the query; no gradient into G here.
            x_fake, _ = g(im_q)
            loss_d = moco.loss(d(x_fake.detach()), k, negatives, weights)
            ctx.backward(loss_d)
            ctx.step("d")
            # 2) G through the frozen (just updated) D.
            with ctx.frozen("d"):
                q_fake = moco(x_fake)
                if m.g_objective == "l1":
                    with torch.no_grad():
                        q_real = moco(im_q)
                    loss_g = -self.g_weight * F.l1_loss(q_fake, q_real)
                elif m.g_objective == "maximize_d":
                    loss_g = -self.g_weight * moco.loss(q_fake, k, negatives, weights)
                else:
                    raise ValueError(f"model.g_objective must be 'official', 'l1' or 'maximize_d', "
                                     f"got {m.g_objective!r}")
            ctx.backward(loss_g)
            ctx.step("g")

        self._step_keys.append(gather_no_grad(k))
        if last:
            moco.queue.enqueue(torch.cat(self._step_keys))
            self._step_keys = []
        out = {"loss_d": loss_d, "loss_g": loss_g}
        if self.skips is not None:                                    # all workers and ranks, see SkipReport
            out["data/skipped"] = torch.tensor(float(self.skips.update(step, getattr(ctx, "is_main_process", True))),
                                               device=loss_d.device)
        return out

    # ----------------------------------------------------------------------------------------------
    def _eval_clips(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``eval_clips`` train and test videos sampled stratified by class with the run's seed (split
        files are sorted by class: their first lines are one or two classes), one centred clip each
        (decoded once, cached)."""
        if self._eval_cache is None:
            cache = {}
            for split in ("train", "test"):
                data = self._ucf(split, train=False)
                chosen = stratified_subset(data.targets, self.cfg.data.eval_clips, seed=self.cfg.run.seed)
                items = [data[i] for i in chosen]
                cache[split] = torch.stack([c for c, _ in items])
                cache[split + "_labels"] = torch.tensor([y for _, y in items])
            self._eval_cache = cache
        return {k: v.to(device) for k, v in self._eval_cache.items()}

    @torch.no_grad()
    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        """1-NN accuracy (%, cosine, query-encoder pooled features) of the test clips against the train
        clips, and ``knn_chance``: the accuracy of always answering the most frequent train class
        (nothing for Kinetics pretraining without ``data.eval_root``)."""
        if self.cfg.data.dataset == "kinetics400" and self.cfg.data.eval_root is None:
            return {}
        clips = self._eval_clips(ctx.device)
        enc = ctx.unwrap("d").encoder_q
        was_training = enc.training
        enc.eval()
        feats = {s: F.normalize(enc.forward_features(clips[s]), dim=1) for s in ("train", "test")}
        enc.train(was_training)
        nearest = (feats["test"] @ feats["train"].T).argmax(dim=1)
        acc = (clips["train_labels"][nearest] == clips["test_labels"]).float().mean()
        majority = torch.bincount(clips["train_labels"]).argmax()
        chance = (clips["test_labels"] == majority).float().mean()
        return {"knn_top1": float(acc) * 100.0, "knn_chance": float(chance) * 100.0}

    @torch.no_grad()
    def sample(self, ctx: StepContext) -> torch.Tensor:
        """Frames of two test clips after G's frame dropping: ``(2 * T, 3, H, W)``, one clip per row."""
        if self.cfg.data.dataset == "kinetics400" and self.cfg.data.eval_root is None:
            return None
        clips = self._eval_clips(ctx.device)["test"][:2]
        g = ctx.unwrap("g")
        was_training = g.training
        g.eval()
        x_fake, _ = g(clips)
        g.train(was_training)
        if self.cfg.data.augment == "official":                      # undo the ImageNet normalisation
            x_fake = x_fake * x_fake.new_tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) + \
                x_fake.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
        return rearrange(x_fake, "b c t h w -> (b t) c h w").clamp(0, 1)

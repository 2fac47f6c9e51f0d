"""Action-recognition fine-tuning of a pretrained video encoder: the protocol of VideoMoCo's ``eval.py``.

Official code: tinapan-pt/VideoMoCo at commit 42e069aef6f8952fa67b87ba5269851eedd834c3, ``eval.py``
(with ``dataset/ucf101_eval.py`` and ``utils/train_utils.py``). What it does and where each setting here
comes from:

- model: the backbone with a NEW ``fc = Linear(512, num_class)``, weight ~ N(0, 0.01), bias 0
  (``model.fc.weight.data.normal_(mean=0.0, std=0.01)``); the pretrained weights are D's query encoder
  without its projection (``module.encoder_q.*`` minus ``module.encoder_q.fc.*``); every layer is trained
  (the freezing loop is commented out), so this is full fine-tuning, not a linear probe.
- BatchNorm in eval mode during training (``train()`` calls ``model.eval()``): running statistics stay
  the pretrained ones (``model.bn_mode="eval"``, default; ``"train"`` is the usual fine-tune).
- SGD lr 0.005, momentum 0.9, weight decay 1e-4; 10 epochs, lr x0.1 at epochs 6 and 8
  (``--schedule 6 8``, ``adjust_learning_rate``); batch 256 (total over GPUs); 32 frames per clip
  (``-fpc 32``), step 1 between frames; crop ``-cs 224`` by default (112 matches pretraining).
- training clips: ``RandomClipSampler(video_clips, 10)``: 10 random clips per video per epoch, each
  ``RandomResizedCropVideo(crop)`` (scale (0.08, 1), ratio (3/4, 4/3), one box per clip),
  ``RandomHorizontalFlipVideo`` (p 0.5 per clip), ImageNet mean/std.
- test: ``UniformClipSampler(video_clips, 10)``: 10 evenly spaced clips per video, ``CenterCropVideo``,
  the 10 clips' logits averaged (``output.view(-1, clip_per_video, num_class).mean(1)``), top-1/top-5.
- UCF101 ``trainlist0{fold}.txt`` / ``testlist0{fold}.txt`` (``fold=1``); ``protocol.splits`` here
  runs several folds (:func:`finetune_splits`) and reports their mean.

Differences: videos are decoded at their own resolution (as the official ``VideoClips`` with no
resizing) and ``data.short_side`` optionally resizes keeping the aspect ratio before the crop (never a
squash); a video shorter than the clip repeats its last frame (torchvision's ``VideoClips`` drops it);
clip starts are rounded rather than floored (:func:`video.io.dense_clips`); the accuracy reported is the
one after the last epoch (the official script also keeps the best epoch's checkpoint).

Run: ``cmgen train configs/finetune/ucf101.yaml model.init_from=RUN/checkpoints/step_N``;
all three splits: ``python -m video.finetune configs/finetune/ucf101.yaml --splits 1 2 3 key=value ...``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cmgen.config import ExperimentConfig
from cmgen.engine.method import Method, StepContext

from .backbones import build_backbone
from .datasets import HMDB51, MovingDigitsSpec, SkipReport, UCF101, collate, stratified_subset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ClipTransform", "RepeatVideos", "ActionClassifier",
           "load_pretrained_encoder", "FinetuneDataConfig", "FinetuneModelConfig", "FinetuneProtocolConfig",
           "FinetuneConfig", "FinetuneMethod", "build_action_dataset", "finetune_splits", "demo_stage"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # eval.py NormalizeVideo / moco/loader.py MoCoAugment
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
class ClipTransform:
    """One float clip ``(3, T, H, W)`` in [0, 1] -> ``(3, T, crop, crop)``: optional resize of the short
    side to ``short_side`` (aspect ratio kept), then a random resized crop (``train``, one box for all
    frames, ``scale``, ratio (3/4, 4/3)) and a clip-level horizontal flip, or a centre crop (test, padded
    with zeros if the frame is smaller), then ImageNet normalisation when ``normalize``."""

    def __init__(self, crop: int, train: bool, short_side: int | None = None,
                 scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, normalize: bool = True):
        if crop < 1 or (short_side is not None and short_side < 1) or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"need crop >= 1, short_side None or >= 1, 0 < scale[0] <= scale[1] <= 1; got "
                             f"crop={crop}, short_side={short_side}, scale={scale}")
        self.crop, self.train, self.short_side = int(crop), bool(train), short_side
        self.scale, self.flip, self.normalize = tuple(scale), bool(flip), bool(normalize)

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as TF
        frames = clip.transpose(0, 1)                                     # (T, 3, H, W)
        if self.short_side is not None:
            h, w = frames.shape[-2:]
            r = self.short_side / min(h, w)
            frames = TF.resize(frames, [max(1, round(h * r)), max(1, round(w * r))], antialias=True)
        if self.train:
            top, left, h, w = RandomResizedCrop.get_params(frames, list(self.scale), [3 / 4, 4 / 3])
            frames = TF.resized_crop(frames, top, left, h, w, [self.crop, self.crop], antialias=True)
            if self.flip and torch.rand(()) < 0.5:
                frames = frames.flip(-1)
        else:
            frames = TF.center_crop(frames, [self.crop, self.crop])
        if self.normalize:
            mean = frames.new_tensor(IMAGENET_MEAN)[None, :, None, None]
            std = frames.new_tensor(IMAGENET_STD)[None, :, None, None]
            frames = (frames - mean) / std
        return frames.transpose(0, 1).contiguous()


class RepeatVideos(Dataset):
    """``repeats`` items per video (official ``RandomClipSampler(video_clips, 10)``): item i is a fresh
    random clip of video ``i % len(videos)``, so an epoch visits each video ``repeats`` times."""

    def __init__(self, videos: Dataset, repeats: int):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.videos, self.repeats = videos, int(repeats)

    def __len__(self) -> int:
        return len(self.videos) * self.repeats

    def __getitem__(self, i: int):
        return self.videos[i % len(self.videos)]


# --------------------------------------------------------------------------------------------------
# model and pretrained weights
# --------------------------------------------------------------------------------------------------
def _strip_projection(backbone: nn.Module) -> nn.Module:
    """Replace the backbone's projection ``fc`` by the identity (its pooled features are the input of
    the new classifier)."""
    holder = backbone.net if hasattr(backbone, "net") else backbone
    if not hasattr(holder, "fc"):
        raise ValueError(f"{type(backbone).__name__} has no 'fc' projection to replace")
    holder.fc = nn.Identity()
    return backbone


class ActionClassifier(nn.Module):
    """``encoder.forward_features`` (pooled, e.g. 512-d) -> new ``Linear(feature_dim, num_classes)``.

    ``bn_mode="eval"`` keeps every BatchNorm in eval mode even under ``train()`` (official ``eval.py``
    calls ``model.eval()`` before its training loop); ``"train"`` updates them as usual.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, bn_mode: str = "eval", head_init_std: float = 0.01):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        self.encoder = encoder
        self.bn_mode = bn_mode
        self.fc = nn.Linear(encoder.feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=head_init_std)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> "ActionClassifier":
        super().train(mode)
        if self.bn_mode == "eval":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W) -> (B, num_classes)`` logits."""
        return self.fc(self.encoder.forward_features(x))


def _read_state(path: str | os.PathLike, model_name: str) -> dict[str, torch.Tensor]:
    """A state dict from an engine checkpoint directory (``RUN/checkpoints/step_N``), a run's
    ``checkpoints`` directory or run directory (newest checkpoint), or a ``.pth``/``.pth.tar``/``.pt``
    file (``{"state_dict": ...}`` as the official checkpoints, or a bare state dict)."""
    from cmgen.engine.checkpoint import STATE_FILE, latest_checkpoint, load_model_state
    p = Path(path)
    if p.is_dir():
        for candidate in (p, p / "checkpoints"):
            if (candidate / STATE_FILE).is_file():
                return load_model_state(candidate, model_name)
            newest = latest_checkpoint(candidate)
            if newest is not None:
                return load_model_state(newest, model_name)
        raise ValueError(f"model.init_from={path!r}: no complete checkpoint (engine_state.json) in it or in "
                         f"its checkpoints/ folder")
    if not p.is_file():
        raise ValueError(f"model.init_from={path!r} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"model.init_from={path!r} holds no state dict of tensors")
    return state


def load_pretrained_encoder(encoder: nn.Module, path: str | os.PathLike, model_name: str = "d",
                            allow_missing: bool = False, allow_unexpected: bool = False) -> dict[str, list[str]]:
    """Load a pretrained query encoder into ``encoder`` (a backbone whose projection is stripped).

    Key mapping (official ``eval.py``): drop a ``module.`` prefix; when keys start with ``encoder_q.``
    (a VideoMoCo D: ours or the official ``netD``), keep only those, drop the projection
    (``encoder_q.fc.*`` / ``encoder_q.net.fc.*``) and strip the prefix; torchvision keys without our
    ``net.`` wrapper (the official checkpoints) get it. Other D entries (``encoder_k``, ``queue``) are
    ignored. A fine-tuned :class:`ActionClassifier` (``encoder.*``, ``model.init_model=model``) loads
    the same way without its classifier.

    Returns ``{"loaded", "missing", "unexpected", "dropped"}`` key lists. Raises ValueError naming the
    keys when some are missing or unexpected (unless allowed) or a shape differs.
    """
    state = {k.removeprefix("module."): v for k, v in _read_state(path, model_name).items()}
    dropped: list[str] = []
    for prefix in ("encoder_q.", "encoder."):      # a VideoMoCo D, or a fine-tuned ActionClassifier
        if any(k.startswith(prefix) for k in state):
            dropped = [k for k in state if not k.startswith(prefix)]
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    for k in list(state):
        if k.startswith("fc.") or k.startswith("net.fc."):
            dropped.append(k)
            del state[k]
    target = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in state.items():
        name = k if k in target else f"net.{k}" if f"net.{k}" in target else None
        if name is None:
            unexpected.append(k)
            continue
        if tuple(target[name].shape) != tuple(v.shape):
            raise ValueError(f"model.init_from={path!r}: {k} has shape {tuple(v.shape)}, the model's {name} "
                             f"{tuple(target[name].shape)} (another backbone or width?)")
        mapped[name] = v
    missing = sorted(k for k in target if k not in mapped)
    problems = []
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing keys {missing[:8]} (model.allow_missing=true to accept)")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {sorted(unexpected)[:8]} "
                        f"(model.allow_unexpected=true to accept)")
    if problems:
        raise ValueError(f"model.init_from={path!r} does not match the encoder: " + "; ".join(problems))
    encoder.load_state_dict(mapped, strict=False)
    return {"loaded": sorted(mapped), "missing": missing, "unexpected": sorted(unexpected), "dropped": sorted(dropped)}


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@dataclass
class FinetuneDataConfig:
    dataset: Literal["ucf101", "hmdb51"] = "ucf101"
    root: Optional[str] = None                 # ucf101: holds UCF-101/ and ucfTrainTestlist/; null: embedded
                                               # moving digits (its ucf101/ folder), written on first use
    video_dir: str = "UCF-101"                 # relative to root (hmdb51: e.g. hmdb51_org)
    split_dir: str = "ucfTrainTestlist"        # relative to root (hmdb51: testTrainMulti_7030_splits)
    split: int = 1
    clip_len: int = 32                         # eval.py -fpc 32
    stride: int = 1                            # eval.py -sbc 1
    crop_size: int = 224                       # eval.py -cs 224 (112 as in pretraining)
    short_side: Optional[int] = None           # None: native resolution, as eval.py
    train_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCropVideo default
    flip: bool = True                          # RandomHorizontalFlipVideo (off for direction labels)
    normalize: bool = True                     # ImageNet mean/std (NormalizeVideo)
    train_clips_per_video: int = 10            # RandomClipSampler(video_clips, 10)
    test_clips_per_video: int = 10             # UniformClipSampler(video_clips, 10)
    eval_videos: Optional[int] = None          # stratified subset of test videos per evaluation; None: all
    eval_batch_videos: int = 4                 # test videos per forward batch (x clips each)
    label_field: Optional[str] = None          # moving digits only: "digit" or "direction" from labels.json
    generate: Literal["auto", "always", "never"] = "auto"   # embedded data only (root null)
    moving_digits: MovingDigitsSpec = field(default_factory=MovingDigitsSpec)


@dataclass
class FinetuneModelConfig:
    backbone: Literal["tiny", "r3d_18", "r2plus1d_18", "c3d"] = "r2plus1d_18"
    backbone_width: int = 16                   # tiny backbone only
    num_classes: Optional[int] = None          # None: from the split files
    init_from: Optional[str] = None            # RUN/checkpoints/step_N, RUN, or an official .pth.tar
    init_model: str = "d"                      # model name inside an engine checkpoint
    allow_missing: bool = False
    allow_unexpected: bool = False
    bn_mode: Literal["eval", "train"] = "eval"  # eval.py: model.eval() while training
    head_init_std: float = 0.01


@dataclass
class FinetuneProtocolConfig:
    epochs: Optional[int] = 10                 # sets train.max_steps; None: train.max_steps as given
    lr_drop_epochs: list[int] = field(default_factory=lambda: [6, 8])   # eval.py --schedule 6 8
    eval_each_epoch: bool = True               # sets train.eval_every to one epoch


@dataclass
class FinetuneConfig(ExperimentConfig):
    method: str = "finetune"
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    protocol: FinetuneProtocolConfig = field(default_factory=FinetuneProtocolConfig)


def _data_root(d: FinetuneDataConfig) -> Path:
    """``data.root``, or the embedded moving digits' ``ucf101`` folder (written on first use)."""
    if d.root is not None and str(d.root) != "":
        return Path(d.root)
    if d.dataset != "ucf101":
        raise ValueError(f"data.root=null means the embedded moving digits in UCF101 format; data.dataset="
                         f"{d.dataset!r} needs a data.root")
    from cmgen.data import prepare_embedded_data
    md = d.moving_digits
    base = prepare_embedded_data(None, "moving-digits", md.writer_settings(), d.generate,
        required=("ucf101/UCF-101", "ucf101/ucfTrainTestlist/classInd.txt"))
    return base / "ucf101"


def _relabel(ds: UCF101, d: FinetuneDataConfig) -> None:
    """Labels from moving digits' ``labels.json`` (``digit`` or ``direction``) instead of the split files."""
    path = _data_root(d).parent / "labels.json"
    if not path.is_file():
        raise ValueError(f"data.label_field={d.label_field!r} needs moving digits' labels.json at {path}")
    info = json.loads(path.read_text())
    if d.label_field == "digit":
        classes = [f"Digit{i}" for i in range(10)]
        by_path = {v["ucf101_path"]: int(v["digit"]) for v in info["videos"]}
    elif d.label_field == "direction":
        classes = list(info["directions"])
        by_path = {v["ucf101_path"]: classes.index(v["direction"]) for v in info["videos"]}
    else:
        raise ValueError(f"data.label_field must be null, 'digit' or 'direction', got {d.label_field!r}")
    missing = [rel for rel, _ in ds.samples if rel not in by_path]
    if missing:
        raise ValueError(f"{path} has no labels for {len(missing)} videos, e.g. {missing[:3]}")
    ds.samples = [(rel, by_path[rel]) for rel, _ in ds.samples]
    ds.classes = classes


def build_action_dataset(d: FinetuneDataConfig, train_split: bool, augment: bool, clips_per_video: int = 1) -> UCF101:
    """The UCF101/HMDB51 videos of ``d.split`` (train or test list): random augmented clips
    (``augment``) or ``clips_per_video`` evenly spaced centre-cropped clips per item."""
    root = _data_root(d)
    transform = ClipTransform(d.crop_size, augment, d.short_side, tuple(d.train_scale), d.flip, d.normalize)
    common = dict(clip_len=d.clip_len, stride=d.stride, size=None, clips_per_video=1 if augment else clips_per_video,
                  train=augment, transform=transform)
    if d.dataset == "ucf101":
        if d.split not in (1, 2, 3):
            raise ValueError(f"data.split must be 1, 2 or 3, got {d.split!r}")
        lists = root / d.split_dir
        name = f"{'train' if train_split else 'test'}list{d.split:02d}.txt"
        ds = UCF101(root / d.video_dir, lists / name, lists / "classInd.txt", **common)
    elif d.dataset == "hmdb51":
        common.pop("train")
        ds = HMDB51(root / d.video_dir, root / d.split_dir, d.split, train=train_split, **common)
        ds.train = augment                                          # sampling follows augment, the list train_split
    else:
        raise ValueError(f"data.dataset must be 'ucf101' or 'hmdb51', got {d.dataset!r}")
    if d.label_field is not None:
        _relabel(ds, d)
    if not len(ds):
        raise ValueError(f"{d.dataset} split {d.split} ({'train' if train_split else 'test'}) under {root} is empty")
    return ds


# --------------------------------------------------------------------------------------------------
# the engine method
# --------------------------------------------------------------------------------------------------
class FinetuneMethod(Method):
    """Fine-tune ``{"model": ActionClassifier}`` with cross-entropy on random training clips; evaluate
    top-1/top-5 with the 10-clip test protocol (see the module docstring)."""

    config_class = FinetuneConfig

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.videos = build_action_dataset(cfg.data, train_split=True, augment=True)
        self.train_set = RepeatVideos(self.videos, cfg.data.train_clips_per_video)
        self._test: UCF101 | None = None
        self.init_report: dict[str, list[str]] | None = None
        self.skips: SkipReport | None = None
        p = cfg.protocol
        if p.epochs is not None:
            # eval.py counts epochs; the engine counts steps: one epoch = len(train_set) // batch steps
            steps = len(self.train_set) // cfg.train.batch_size
            if steps < 1 or p.epochs < 1:
                raise ValueError(f"protocol.epochs={p.epochs} with {len(self.train_set)} training clips per epoch "
                                 f"and train.batch_size={cfg.train.batch_size} gives no step")
            cfg.train.max_steps = p.epochs * steps
            cfg.schedule.kind = "step"
            cfg.schedule.milestones = [e * steps for e in p.lr_drop_epochs]
            if p.eval_each_epoch:
                cfg.train.eval_every = steps
        if cfg.model.num_classes is not None and cfg.model.num_classes != len(self.videos.classes):
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the split files have "
                             f"{len(self.videos.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.videos.classes)

    def build_models(self, cfg: FinetuneConfig) -> dict[str, nn.Module]:
        m = cfg.model
        encoder = _strip_projection(build_backbone(m.backbone, 8, m.backbone_width))
        if m.init_from:
            self.init_report = load_pretrained_encoder(encoder, m.init_from, m.init_model, m.allow_missing,
                                                       m.allow_unexpected)
        return {"model": ActionClassifier(encoder, self.num_classes, m.bn_mode, m.head_init_std)}

    def build_dataset(self, cfg: FinetuneConfig) -> Dataset:
        from cmgen.engine.trainer import run_dir_of
        self.skips = SkipReport(run_dir_of(cfg) / "logs" / "skipped", len(self.train_set) // cfg.train.batch_size,
                                cfg.train.max_steps, cfg.train.log_every)
        return self.skips.attach(self.train_set)

    def train_step(self, batch, step: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        clips, labels = batch                                        # (B, 3, T, H, W), (B,)
        logits = ctx.models["model"](clips)
        loss = F.cross_entropy(logits, labels)
        ctx.backward(loss)
        ctx.step("model")
        out = {"loss": loss, "train_top1": (logits.argmax(1) == labels).float().mean().detach() * 100}
        if self.skips is not None:                                    # all workers and ranks, see SkipReport
            out["data/skipped"] = torch.tensor(float(self.skips.update(step, getattr(ctx, "is_main_process", True))),
                                               device=loss.device)
        return out

    def _test_set(self) -> UCF101:
        if self._test is None:
            self._test = build_action_dataset(self.cfg.data, train_split=False, augment=False,
                                              clips_per_video=self.cfg.data.test_clips_per_video)
        return self._test

    @torch.no_grad()
    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        """Video-level top-1/top-5 (%): each test video's clip logits averaged; ``chance`` = accuracy of
        always answering the most frequent training class."""
        d = self.cfg.data
        test = self._test_set()
        videos = list(range(len(test)))
        if d.eval_videos is not None:
            videos = stratified_subset(test.targets, d.eval_videos, seed=self.cfg.run.seed)
        mine = videos[ctx.rank::ctx.world_size]
        model = ctx.unwrap("model")
        was_training = model.training
        model.eval()
        counts = torch.zeros(3, dtype=torch.float64, device=ctx.device)   # top1, top5, videos
        loader = DataLoader(torch.utils.data.Subset(test, mine), batch_size=d.eval_batch_videos,
                            num_workers=self.cfg.train.num_workers, collate_fn=collate)
        for clips, labels in loader:
            if clips.dim() == 5:                                     # one clip per video
                clips = clips[:, None]
            b, n = clips.shape[:2]
            logits = model(clips.flatten(0, 1).to(ctx.device)).view(b, n, -1).mean(1)
            labels = labels.to(ctx.device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += (top[:, 0] == labels).sum()
            counts[1] += (top == labels[:, None]).any(1).sum()
            counts[2] += b
        model.train(was_training)
        if ctx.world_size > 1:
            torch.distributed.all_reduce(counts)
        train_y = torch.tensor(self.videos.targets)
        majority = int(torch.bincount(train_y).argmax())
        test_y = torch.tensor([test.targets[i] for i in videos])
        chance = float((test_y == majority).double().mean()) * 100
        return {"top1": float(counts[0] / counts[2]) * 100, "top5": float(counts[1] / counts[2]) * 100,
                "chance": chance, "test_videos": float(counts[2])}


# --------------------------------------------------------------------------------------------------
# several splits
# --------------------------------------------------------------------------------------------------
def finetune_splits(config: str | os.PathLike, overrides: Sequence[str] = (), splits: Sequence[int] = (1, 2, 3)) -> dict:
    """Fine-tune once per split (run name ``<name>-split<k>``) and return the per-split final top-1/top-5
    and their mean (UCF101/HMDB51 papers report the mean over the three splits); also written to
    ``<output_dir>/<name>-splits.json``."""
    from cmgen.engine import load_config, train
    results: dict[str, dict] = {}
    cfg = None
    for k in splits:
        cfg = load_config(config, [*overrides, f"data.split={k}"])
        cfg.run.name = f"{cfg.run.name}-split{k}"
        res = train(cfg)
        if "eval/top1" not in res.metrics:
            raise ValueError(f"split {k}: the run did not evaluate at its last step (train.eval_every must "
                             f"divide train.max_steps)")
        results[str(k)] = {"top1": res.metrics["eval/top1"], "top5": res.metrics["eval/top5"],
                           "chance": res.metrics["eval/chance"], "run_dir": str(res.run_dir)}
    summary = {"splits": results,
               "mean_top1": sum(r["top1"] for r in results.values()) / len(results),
               "mean_top5": sum(r["top5"] for r in results.values()) / len(results)}
    base = cfg.run.name.rsplit("-split", 1)[0]
    out = Path(cfg.run.output_dir) / f"{base}-splits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def demo_stage(out, report: list[str], summary: dict, budget_s: float) -> None:
    """``cmgen demo``'s VideoMoCo section: VideoMoCo vs plain MoCo vs random init, probes and fine-tunes
    on moving digits (:func:`video.video_demo.demo_stage`)."""
    from .video_demo import demo_stage as stage
    stage(out, report, summary, budget_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m video.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    summary = finetune_splits(args.config, args.overrides, args.splits)
    rows = [f"| {k} | {r['top1']:.2f} | {r['top5']:.2f} |" for k, r in summary["splits"].items()]
    print("\n".join(["| split | top-1 | top-5 |", "|---|---|---|", *rows,
                     f"| mean | {summary['mean_top1']:.2f} | {summary['mean_top5']:.2f} |"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

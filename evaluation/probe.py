"""Frozen-feature probes of a video encoder or a GAN discriminator: weighted kNN and a linear classifier,
on cached features.

Features: every video's ``clips_per_video`` evenly spaced, centre-cropped clips go through the frozen
encoder (``forward_features``: pooled, before any projection, eval mode) and are averaged
(:func:`clip_features`). They are saved with :func:`save_features` as safetensors (tensors plus a JSON
metadata string naming the checkpoint, the data settings and the video list), so a sweep over k,
temperatures or weight decays decodes the videos once.

GAN discriminators (ContraD's second claim: its D learns a representation, paper Sec. 4.3 / Table 5,
linear evaluation of the frozen D): :func:`image_features` runs any ``(B, 3, H, W) -> (B, D)`` feature
function over an image tensor in batches; ``evaluation.probe_cli.discriminator_features`` feeds it the
backbone features of a run's D on shapes images (class = primary shape).

- :func:`knn_accuracy`: cosine similarity to every training video, the k most similar vote with weight
  ``exp(sim / temperature)`` (the weighted kNN of Wu et al., CVPR 2018, "Unsupervised Feature Learning
  via Non-Parametric Instance Discrimination", Sec. 3.4; the same rule as DINO's ``eval_knn``); k = 1
  is plain nearest neighbour.
- :func:`linear_probe`: multinomial logistic regression on standardised features (train statistics),
  full-batch L-BFGS with an L2 penalty, deterministic.
- :func:`chance_accuracy`: the accuracy of always answering the most frequent training class.
- :func:`official_lineval`: ContraD's own linear evaluation of D (``test_lineval.py``): a linear layer
  trained by SGD on frozen features of freshly augmented images every epoch (see its docstring).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["clip_features", "image_features", "save_features", "load_features", "knn_accuracy", "linear_probe",
           "chance_accuracy", "probe_report", "official_lineval", "lineval_crop_params", "LINEVAL_DEFAULTS"]


def _collate(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    clips = torch.stack([c if c.dim() == 5 else c[None] for c, _ in batch])   # (B, clips, 3, T, H, W)
    return clips, torch.tensor([int(y) for _, y in batch])


@torch.no_grad()
def clip_features(encoder: nn.Module, dataset: Dataset, batch_size: int = 4, num_workers: int = 0,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Clip-averaged pooled features of every item of ``dataset``.

    Args:
        encoder: has ``forward_features((B, 3, T, H, W)) -> (B, D)``; run in eval mode, restored after.
        dataset: items ``(clips (n, 3, T, H, W) or (3, T, H, W), label)``.
        batch_size: videos per forward batch.

    Returns ``(features (N, D) float32 on CPU, labels (N,) long)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    try:
        for clips, y in loader:
            b, n = clips.shape[:2]
            f = encoder.forward_features(clips.flatten(0, 1).to(device))
            feats.append(f.view(b, n, -1).mean(1).float().cpu())
            labels.append(y)
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def image_features(extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """``extract`` (a frozen feature function, ``(B, 3, H, W) -> (B, D)``) over ``images (N, 3, H, W)`` in
    batches of ``batch_size`` on ``device``; returns ``(N, D)`` float32 on CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    feats = [extract(images[s:s + batch_size].to(device)).flatten(1).float().cpu()
             for s in range(0, images.shape[0], batch_size)]
    return torch.cat(feats)


def save_features(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write ``tensors`` and ``metadata`` (JSON-serialisable) to a safetensors file, atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"cmgen": json.dumps(metadata)})
    os.replace(tmp, path)


def load_features(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` written by :func:`save_features`."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "cmgen" not in meta:
        raise ValueError(f"{path} is not a cmgen feature cache (no 'cmgen' metadata)")
    return load_file(str(path)), json.loads(meta["cmgen"])


def _check(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> None:
    if train_f.dim() != 2 or test_f.dim() != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(train_f.shape)}, {tuple(test_f.shape)}")
    if train_y.shape != (train_f.shape[0],) or test_y.shape != (test_f.shape[0],):
        raise ValueError(f"labels must be (N,) and (M,), got {tuple(train_y.shape)}, {tuple(test_y.shape)}")
    if train_f.shape[0] == 0 or test_f.shape[0] == 0:
        raise ValueError("need at least one training and one test feature")


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> float:
    """Top-1 accuracy (%) of temperature-weighted cosine kNN: class score ``sum_{j in top-k} exp(s_j / T)
    [y_j = c]``; ties between classes go to the lowest class index.

    Shapes: ``train_f (N, D), train_y (N,), test_f (M, D), test_y (M,)``; k is clipped to N.
    """
    _check(train_f, train_y, test_f, test_y)
    if k < 1 or not temperature > 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train_f.shape[0])
    a = F.normalize(train_f.double(), dim=1)
    correct = 0
    for s in range(0, test_f.shape[0], chunk_size):
        q = F.normalize(test_f[s:s + chunk_size].double(), dim=1)
        sims, idx = (q @ a.T).topk(k, dim=1)                           # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_y[idx].long(), torch.exp((sims - 1.0) / temperature))  # shift: same argmax
        correct += int((votes.argmax(1) == test_y[s:s + chunk_size]).sum())
    return 100.0 * correct / test_f.shape[0]


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 weight_decay: float = 1e-4, max_iter: int = 300) -> dict[str, float]:
    """Logistic regression ``softmax(W z + b)`` on standardised features ``z``, minimising mean
    cross-entropy + ``weight_decay * ||W||^2 / 2`` by full-batch L-BFGS (strong Wolfe line search).

    Returns ``{"top1", "train_top1"}`` in percent.
    """
    _check(train_f, train_y, test_f, test_y)
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(f"need weight_decay >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    x = train_f.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z, zt = (x - mean) / std, (test_f.double() - mean) / std
    w = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    y = train_y.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = float(((z @ w + b).argmax(1) == y).double().mean()) * 100
        test_acc = float(((zt @ w + b).argmax(1) == test_y.long()).double().mean()) * 100
    return {"top1": test_acc, "train_top1": train_acc}


def chance_accuracy(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy (%) on ``test_y`` of always answering the most frequent class of ``train_y``."""
    majority = int(torch.bincount(train_y.long()).argmax())
    return float((test_y.long() == majority).double().mean()) * 100


def probe_report(features: dict[str, torch.Tensor], ks: Sequence[int] = (1, 20), temperature: float = 0.07,
                 weight_decays: Sequence[float] = (1e-4,)) -> dict[str, float]:
    """kNN for every k and a linear probe for every weight decay on ``{"train_features", "train_labels",
    "test_features", "test_labels"}``, plus ``chance``."""
    tr, ty, te, yy = (features[k] for k in ("train_features", "train_labels", "test_features", "test_labels"))
    out = {f"knn{k}_top1": knn_accuracy(tr, ty, te, yy, k, temperature) for k in ks}
    for wd in weight_decays:
        out[f"linear_wd{wd:g}_top1"] = linear_probe(tr, ty, te, yy, wd)["top1"]
    out["chance"] = chance_accuracy(ty, yy)
    return out


# --- ContraD's linear evaluation protocol -----------------------------------------------------------
LINEVAL_DEFAULTS = {"epochs": 100, "lr": 0.1, "milestones": (60, 75, 90), "gamma": 0.1, "batch_size": 256,
                    "crop_scale": (0.2, 1.0), "crop_ratio": (3 / 4, 4 / 3), "flip_p": 0.5}
"""jh-jeong/ContraD 4ac8ce5 ``test_lineval.py``: ``SGD(model.linear.parameters(), lr=0.1)`` (no momentum, no
weight decay), ``MultiStepLR(gamma=0.1, milestones=[60, 75, 90])`` stepped once per epoch, 100 epochs,
``--batch_size 256`` with ``shuffle=True``; ``datasets.py`` ``cifar10_lin`` train transform
``RandomResizedCrop(32, scale=(0.2, 1.))`` (torchvision's default ratio (3/4, 4/3)) +
``RandomHorizontalFlip()`` (p 0.5), test images un-augmented."""


def lineval_crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                        generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of one random resized crop: torchvision ``RandomResizedCrop.get_params`` itself
    (up to 10 draws of area ``~ U(scale)`` and log-uniform aspect ratio, first that fits, else a central
    crop with the ratio clamped), run on a forked global RNG seeded from ``generator``, so that the crops
    follow ``generator`` and the caller's global RNG is untouched."""
    from torchvision.transforms import RandomResizedCrop

    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio))
    return int(top), int(left), int(h), int(w)


def _lineval_augment(images: torch.Tensor, scale: Sequence[float], ratio: Sequence[float], flip_p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Per image: random resized crop back to the input size (bilinear, antialiased) and a flip with
    probability ``flip_p``. ``images (B, 3, H, W)`` in [0, 1] -> the same shape."""
    from torchvision.transforms.v2 import functional as TF

    H, W = images.shape[-2:]
    out = []
    for im in images:
        top, left, h, w = lineval_crop_params(H, W, scale, ratio, generator)
        im = TF.resized_crop(im, top, left, h, w, [H, W], antialias=True)
        if float(torch.rand((), generator=generator)) < flip_p:
            im = im.flip(-1)
        out.append(im)
    return torch.stack(out).clamp(0.0, 1.0)


def official_lineval(extract: Callable[[torch.Tensor], torch.Tensor], train_images: torch.Tensor,
                     train_y: torch.Tensor, test_images: torch.Tensor, test_y: torch.Tensor, *,
                     epochs: int = 100, lr: float = 0.1, milestones: Sequence[int] | None = None,
                     gamma: float = 0.1, batch_size: int = 256, crop_scale: Sequence[float] = (0.2, 1.0),
                     crop_ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5, augment: bool = True,
                     seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """ContraD's linear evaluation of a frozen discriminator (jh-jeong/ContraD 4ac8ce5 ``test_lineval.py``,
    ``datasets.py`` ``*_lin``; defaults: :data:`LINEVAL_DEFAULTS`).

    ``extract``: the frozen feature function (``(B, 3, H, W)`` in [0, 1] -> ``(B, D)``; the official
    ``model(inputs, penultimate=True)`` in eval mode, the backbone output), called under ``no_grad``.
    Every epoch the training images are shuffled (``DataLoader(shuffle=True)``, last batch kept), each
    batch is augmented afresh (``augment``: random resized crop ``crop_scale`` / ``crop_ratio`` + flip,
    as the official torchvision transforms; here on float tensors instead of PIL uint8 images), and
    ``nn.Linear(D, classes)`` (PyTorch default init, the official ``LinearWrapper``) takes one plain SGD
    step on the mean cross-entropy per batch; the learning rate is multiplied by ``gamma`` after each
    epoch in ``milestones`` (default (60, 75, 90) scaled by ``epochs / 100``, so the official schedule at
    100 epochs). After every epoch the un-augmented test images are classified; the official script logs
    that test accuracy each epoch, and ``top1`` here is the LAST epoch's (no selection on the test set).
    All randomness (order, crops, flips, the layer's init) comes from ``seed``.

    Returns ``{"top1", "train_top1" (running accuracy of the last epoch, on augmented images),
    "test_top1_per_epoch", "epochs", ...settings}``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    if train_images.dim() != 4 or test_images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(train_images.shape)}, {tuple(test_images.shape)}")
    if train_y.shape != (train_images.shape[0],) or test_y.shape != (test_images.shape[0],):
        raise ValueError(f"labels must be (N,) and (M,), got {tuple(train_y.shape)}, {tuple(test_y.shape)}")
    if milestones is None:
        milestones = tuple(max(1, round(m * epochs / 100)) for m in LINEVAL_DEFAULTS["milestones"])
    gen = torch.Generator().manual_seed(int(seed))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_y, test_y = train_y.long(), test_y.long()

    @torch.no_grad()
    def feats(x: torch.Tensor) -> torch.Tensor:
        return extract(x.to(device)).flatten(1).float()

    test_f = torch.cat([feats(test_images[s:s + batch_size]) for s in range(0, test_images.shape[0], batch_size)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        linear = nn.Linear(test_f.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(linear.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    per_epoch: list[float] = []
    train_acc = 0.0
    for _ in range(epochs):
        order = torch.randperm(train_images.shape[0], generator=gen)
        correct = 0
        for s in range(0, order.numel(), batch_size):
            idx = order[s:s + batch_size]
            x = train_images[idx]
            if augment:
                x = _lineval_augment(x, crop_scale, crop_ratio, flip_p, gen)
            logits = linear(feats(x))
            y = train_y[idx].to(device)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y).sum())
        sched.step()
        train_acc = 100.0 * correct / order.numel()
        with torch.no_grad():
            per_epoch.append(100.0 * float((linear(test_f).argmax(1).cpu() == test_y).double().mean()))
    return {"top1": per_epoch[-1], "train_top1": train_acc, "test_top1_per_epoch": per_epoch, "epochs": epochs,
            "feature_dim": int(test_f.shape[1]),
            "lr": lr, "milestones": list(milestones), "gamma": gamma, "batch_size": batch_size,
            "augment": bool(augment), "crop_scale": list(crop_scale), "flip_p": flip_p, "seed": int(seed)}

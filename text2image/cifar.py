"""CIFAR-10 / CIFAR-100 from the official python pickle files (Krizhevsky 2009), no download.

Layout (the archives ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` extracted)::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}

Each data file is a pickled dict (protocol 2, byte-string keys, ``encoding="bytes"`` to read) with
``b"data"``: uint8 ``(N, 3072)``, row = 1024 red, 1024 green, 1024 blue values of a 32x32 image in
row-major order, and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` / ``b"coarse_labels"`` (CIFAR-100).
The meta file holds ``b"label_names"`` (CIFAR-10) or ``b"fine_label_names"`` / ``b"coarse_label_names"``.

A missing file, a file that does not unpickle, or a dict without the expected keys / shapes raises
``FileNotFoundError`` / ``ValueError`` naming the file.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CIFAR", "read_cifar_file", "CIFAR_FILES"]

CIFAR_FILES = {
    "cifar10": {"folder": "cifar-10-batches-py", "meta": "batches.meta",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"folder": "cifar-100-python", "meta": "meta", "train": ["train"], "test": ["test"]},
}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated files, wrong format, ...
        raise ValueError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(d: dict, key: str):
    """Look up ``key`` as bytes (the official files) or str (files written under Python 3 with str keys)."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar_file(path: str | os.PathLike, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 32, 32, 3), labels int64 (N,))`` from one CIFAR data pickle."""
    path = Path(path)
    d = _unpickle(path)
    data, labels = _get(d, "data"), _get(d, label_key)
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise ValueError(f"{path}: missing key 'data' or {label_key!r} (keys: {keys})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {label_key!r} must have N = {data.shape[0]} entries, got {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class CIFAR(Dataset):
    """CIFAR-10 or CIFAR-100 as ``(image (3, 32, 32) float32 in value_range, label)`` pairs.

    Args:
        root: the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``, or that folder itself.
        name: ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` (50 000 images) or ``"test"`` (10 000).
        value_range: ``(0, 1)`` (ContraD, XMC-GAN) or ``(-1, 1)`` (tanh GANs), any ``(low, high)``.
        label: CIFAR-100 only, ``"fine"`` (100 classes, default) or ``"coarse"`` (20).
        transform: applied to each image tensor last (e.g. a random flip).

    ``classes``: the label names from the meta file.
    """

    def __init__(self, root: str | os.PathLike, name: Literal["cifar10", "cifar100"] = "cifar10",
                 split: Literal["train", "test"] = "train", value_range: Sequence[float] = (0.0, 1.0),
                 label: Literal["fine", "coarse"] = "fine",
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if name not in CIFAR_FILES:
            raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if label not in ("fine", "coarse"):
            raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
        if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        spec = CIFAR_FILES[name]
        root = Path(root)
        folder = root if root.name == spec["folder"] else root / spec["folder"]
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} folder not found: {folder} (extract the official python archive "
                                    f"under {root})")
        label_key = "labels" if name == "cifar10" else f"{label}_labels"
        parts = [read_cifar_file(folder / f, label_key) for f in spec[split]]
        self.images = np.concatenate([p[0] for p in parts])
        self.labels = np.concatenate([p[1] for p in parts])
        meta_path = folder / spec["meta"]
        meta = _unpickle(meta_path)
        names_key = "label_names" if name == "cifar10" else f"{label}_label_names"
        names = _get(meta, names_key)
        if names is None:
            raise ValueError(f"{meta_path}: missing key {names_key!r}")
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{folder}: labels outside [0, {len(self.classes)}) for the {len(self.classes)} "
                             f"names in {meta_path}")
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        lo, hi = self.value_range
        x = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1).float() / 255.0
        x = x * (hi - lo) + lo
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])

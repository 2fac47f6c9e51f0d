"""Caption datasets for text-to-image training beyond COCO: CUB-200 (AttnGAN layout), LN-COCO, and one factory.

Every dataset here yields the same items as :class:`text2image.data.CocoCaptions` (it reuses its caption
choice, tokenization and item code): ``image (3, H, W)``, ``caption``, ``caption_index``, ``image_id``,
``file_name`` and, with a tokenizer, ``input_ids`` / ``attention_mask``.

**CUB-200-2011 in the AttnGAN layout** (taoxugit/AttnGAN ``code/datasets.py::TextDataset``)::

    ROOT/CUB_200_2011/images/<key>.jpg           key = "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18"
    ROOT/CUB_200_2011/images.txt                 "<image id> <key>.jpg" per line
    ROOT/CUB_200_2011/bounding_boxes.txt         "<image id> <x> <y> <width> <height>" per line
    ROOT/text/<key>.txt                          10 captions, one per line
    ROOT/train/filenames.pickle, ROOT/test/filenames.pickle    pickled list of keys

AttnGAN crops each bird to a square of side ``1.5 max(w, h)`` around its box centre (``get_imgs``;
``bbox_crop=True``), reads the first ``captions_per_image`` non-empty lines of the text file (replacing
``"\\ufffd\\ufffd"`` by a space) and draws one of them per access. AttnGAN prints an error and goes on
when a file has fewer captions; here that is a ``ValueError`` naming the file.

**LN-COCO** (Localized Narratives on COCO 2017, Pont-Tuset et al., ECCV 2020): JSON lines
``{"dataset_id", "image_id", "annotator_id", "caption", "timed_caption", "traces", "voice_recording"}``
in ``coco_{train,val}_localized_narratives[-0000k-of-0000n].jsonl``; images are COCO 2017 files named
``<image_id:012d>.jpg``. XMC-GAN uses one item per narrative (``coco_dataset.py``: ``sentence_num = 1``
for ``"ln"``, ``num_examples`` 134,272 train / 8,573 val are narrative counts) and 64 tokens.

A malformed line or entry raises ``ValueError`` naming the file and the line / entry.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from text2image.data import CocoCaptions, _check_range

__all__ = ["CUBCaptions", "LNCocoCaptions", "caption_dataset", "random_hflip", "DATASET_KINDS"]

DATASET_KINDS = ("shapes", "coco", "cub", "lncoco")


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip ``(3, H, W)`` left-right with probability 1/2 (``tf.image.random_flip_left_right``)."""
    return x.flip(-1) if torch.rand(()) < 0.5 else x


class _ListedCaptions(CocoCaptions):
    """:class:`CocoCaptions`' item logic over image/caption lists a subclass builds (no COCO JSON)."""

    def _setup(self, root: str | os.PathLike, image_dir: str | os.PathLike, image_size: int | None,
               transform: Callable | None, caption: str, tokenizer: Any, max_tokens: int,
               value_range: Sequence[float], seed: int | None, antialias: bool, missing: str) -> None:
        if caption not in ("random", "all", "first"):
            raise ValueError(f"caption must be one of ('random', 'all', 'first'), got {caption!r}")
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size}")
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3 ([CLS], one token, [SEP]), got {max_tokens}")
        self.root = Path(root)
        self.image_dir = self.root / image_dir
        self.image_size, self.transform, self.caption = image_size, transform, caption
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.value_range = _check_range(value_range)
        self.seed, self.epoch, self.antialias, self._missing_mode = seed, 0, antialias, missing
        self.ids: list[int] = []
        self.file_names: list[str] = []
        self.captions: list[list[str]] = []
        self.missing_files: list[str] = []
        self.num_uncaptioned = 0

    def _add(self, image_id: int, file_name: str, captions: list[str], source: Path) -> None:
        path = self.image_dir / file_name
        if not path.is_file():
            if self._missing_mode == "error":
                raise FileNotFoundError(f"image file not found: {path} (image {image_id} in {source}); "
                                        "pass missing='skip' to drop such images")
            self.missing_files.append(str(path))
            return
        self.ids.append(image_id)
        self.file_names.append(file_name)
        self.captions.append(captions)

    def _finish(self, source: Path) -> None:
        if not self.ids:
            raise ValueError(f"no usable images in {source} (missing files: {len(self.missing_files)})")


def _read_table(path: Path, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of exactly ``columns`` fields; ValueError naming file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != columns:
            raise ValueError(f"{path}:{n}: expected {columns} fields, got {len(fields)}: {line[:200]!r}")
        rows.append(fields)
    return rows


class CUBCaptions(_ListedCaptions):
    """CUB-200-2011 birds with the 10 captions per image of Reed et al., in AttnGAN's layout.

    Args:
        root: the AttnGAN ``data/birds`` directory (module docstring).
        split: ``"train"`` or ``"test"`` (``<split>/filenames.pickle``).
        bbox_crop: crop around the bounding box as AttnGAN's ``get_imgs`` (needs ``CUB_200_2011/images.txt``
            and ``bounding_boxes.txt``).
        captions_per_image: AttnGAN's ``CAPTIONS_PER_IMAGE`` (10).
        Others as :class:`text2image.data.CocoCaptions`.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int | None = None,
                 transform: Callable | None = None, caption: str = "random", tokenizer: Any = None,
                 max_tokens: int = 17, value_range: Sequence[float] = (-1.0, 1.0), seed: int | None = None,
                 bbox_crop: bool = True, captions_per_image: int = 10, antialias: bool = True,
                 missing: str = "error"):
        if split not in ("train", "test"):
            raise ValueError(f"CUB split must be 'train' or 'test' (AttnGAN), got {split!r}")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self._setup(root, Path("CUB_200_2011") / "images", image_size, transform, caption, tokenizer, max_tokens,
                    value_range, seed, antialias, missing)
        self.ann_file = self.root / split / "filenames.pickle"
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"CUB split file not found: {self.ann_file}")
        with open(self.ann_file, "rb") as f:
            try:
                keys = pickle.load(f, encoding="latin1")
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
                raise ValueError(f"{self.ann_file}: not a pickled list of file names ({e})") from e
        if not isinstance(keys, (list, tuple)) or not keys:
            raise ValueError(f"{self.ann_file}: expected a non-empty list of file names, got {type(keys).__name__}")
        numeric_ids: dict[str, int] = {}
        self.bboxes: dict[str, tuple[float, float, float, float]] | None = None
        if bbox_crop:
            cub = self.root / "CUB_200_2011"
            names = {row[0]: row[1] for row in _read_table(cub / "images.txt", 2)}
            self.bboxes = {}
            for row in _read_table(cub / "bounding_boxes.txt", 5):
                if row[0] not in names:
                    raise ValueError(f"{cub / 'bounding_boxes.txt'}: image id {row[0]} is not in images.txt")
                try:
                    box = tuple(float(v) for v in row[1:])
                except ValueError as e:
                    raise ValueError(f"{cub / 'bounding_boxes.txt'}: image id {row[0]}: bad box {row[1:]}") from e
                key = os.path.splitext(names[row[0]])[0]
                self.bboxes[key] = box
                numeric_ids[key] = int(row[0])
        for i, key in enumerate(keys):
            if isinstance(key, bytes):
                key = key.decode("utf-8")
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.ann_file}: entry {i} is {key!r}, not a file name")
            if self.bboxes is not None and key not in self.bboxes:
                raise ValueError(f"{self.ann_file}: entry {i} ({key!r}) has no bounding box in "
                                 f"{self.root / 'CUB_200_2011' / 'bounding_boxes.txt'}")
            self._add(numeric_ids.get(key, i), key + ".jpg", self._read_captions(key, captions_per_image),
                      self.ann_file)
        self._finish(self.ann_file)

    def _read_captions(self, key: str, k: int) -> list[str]:
        path = self.root / "text" / f"{key}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"CUB caption file not found: {path}")
        lines = [ln.replace("\ufffd\ufffd", " ").strip() for ln in path.read_text(encoding="utf-8").split("\n")]
        caps = [ln for ln in lines if ln][:k]
        if len(caps) < k:
            raise ValueError(f"{path}: {len(caps)} captions, expected {k} (captions_per_image)")
        return caps

    def load(self, index: int) -> torch.Tensor:
        file_name = self.file_names[index]
        with Image.open(self.image_dir / file_name) as im:
            im = im.convert("RGB")
            if self.bboxes is not None:
                x, y, w, h = (int(v) for v in self.bboxes[os.path.splitext(file_name)[0]])  # AttnGAN .astype(int)
                r = int(max(w, h) * 0.75)
                cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
                im = im.crop((max(0, cx - r), max(0, cy - r), min(im.width, cx + r), min(im.height, cy + r)))
            arr = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.image_size is not None and tuple(x.shape[1:]) != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=self.antialias)[0].clamp_(0.0, 1.0)
        low, high = self.value_range
        return x * (high - low) + low


class LNCocoCaptions(_ListedCaptions):
    """Localized Narratives captions of COCO 2017 images.

    Args:
        root: dataset root; ``ann_files`` and ``image_dir`` are relative to it.
        ann_files: a jsonl path, a glob pattern (``annotations/coco_train_localized_narratives*.jsonl``) or
            a list of them (the sharded train files).
        image_dir: the COCO 2017 image folder (``train2017`` / ``val2017``).
        per: ``"narrative"`` (default, the XMC-GAN setup: one item per narrative) or ``"image"`` (one
            item per image holding all its narratives).
        Others as :class:`text2image.data.CocoCaptions` (XMC-GAN: ``max_tokens=64``).
    """

    def __init__(self, root: str | os.PathLike, ann_files: str | Sequence[str], image_dir: str | os.PathLike,
                 image_size: int | None = None, transform: Callable | None = None, caption: str = "random",
                 tokenizer: Any = None, max_tokens: int = 64, value_range: Sequence[float] = (-1.0, 1.0),
                 seed: int | None = None, per: str = "narrative", antialias: bool = True, missing: str = "error"):
        if per not in ("narrative", "image"):
            raise ValueError(f"per must be 'narrative' or 'image', got {per!r}")
        self._setup(root, image_dir, image_size, transform, caption, tokenizer, max_tokens, value_range, seed,
                    antialias, missing)
        patterns = [ann_files] if isinstance(ann_files, (str, os.PathLike)) else list(ann_files)
        files: list[Path] = []
        for pat in patterns:
            matched = sorted(glob.glob(str(self.root / pat)))
            if not matched:
                raise FileNotFoundError(f"no Localized Narratives file matches {self.root / pat}")
            files += [Path(m) for m in matched]
        self.ann_file = files[0]
        records: list[tuple[int, str, Path]] = []
        for path in files:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        image_id, text = int(rec["image_id"]), rec["caption"]
                        if not isinstance(text, str) or not text.strip():
                            raise ValueError(f"caption is {text!r}")
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                        raise ValueError(f"{path}:{n}: malformed narrative {line.strip()[:200]!r} "
                                         f"({type(e).__name__}: {e})") from e
                    records.append((image_id, text.strip(), path))
        if per == "narrative":
            for image_id, text, path in records:
                self._add(image_id, f"{image_id:012d}.jpg", [text], path)
        else:
            grouped: dict[int, list[str]] = {}
            for image_id, text, _ in records:
                grouped.setdefault(image_id, []).append(text)
            for image_id, texts in grouped.items():
                self._add(image_id, f"{image_id:012d}.jpg", texts, files[0])
        self._finish(files[0])


def caption_dataset(kind: str, root: str | os.PathLike, split: str, image_size: int, *, tokenizer: Any = None,
                    max_tokens: int = 17, hflip: bool = True, caption: str = "random", seed: int | None = None,
                    version: str = "2014", value_range: Sequence[float] = (0.0, 1.0),
                    antialias: bool = False, missing: str = "error"):
    """The XMC-GAN input pipeline for ``kind`` in :data:`DATASET_KINDS` (``coco_dataset.py::preprocess``).

    Bilinear resize without antialias (``tf.image.resize``), random left-right flip (training), images in
    [0, 1] (``convert_image_dtype``), one random caption per access. ``split`` is ``"train"`` / ``"val"``
    (``"test"`` for CUB; ``"val"`` maps to it). COCO: ``annotations/captions_<split><version>.json`` with
    images in ``<split><version>/``; LN-COCO: ``annotations/coco_<split>_localized_narratives*.jsonl``
    with images in ``<split>2017/``; shapes: ``annotations/captions_<split>.json`` with ``<split>/``.
    """
    flip = random_hflip if hflip else None
    common = dict(image_size=image_size, transform=flip, caption=caption, tokenizer=tokenizer,
                  max_tokens=max_tokens, value_range=value_range, seed=seed, antialias=antialias, missing=missing)
    if kind == "shapes":
        return CocoCaptions(root, f"annotations/captions_{split}.json", split, **common)
    if kind == "coco":
        if str(version) not in ("2014", "2017"):
            raise ValueError(f"COCO version must be '2014' or '2017', got {version!r}")
        return CocoCaptions(root, f"annotations/captions_{split}{version}.json", f"{split}{version}", **common)
    if kind == "cub":
        return CUBCaptions(root, "test" if split == "val" else split, **common)
    if kind == "lncoco":
        return LNCocoCaptions(root, f"annotations/coco_{split}_localized_narratives*.jsonl", f"{split}2017",
                              **common)
    raise ValueError(f"data kind must be one of {DATASET_KINDS}, got {kind!r}")

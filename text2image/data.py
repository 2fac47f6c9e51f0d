"""Image-text datasets for text-to-image GANs: COCO captions, shapes attributes, class-conditional folders.

All image tensors are ``(3, H, W)`` float32 in ``value_range``: ``(-1, 1)`` by default (tanh generators:
ContraGAN) or ``(0, 1)`` (ContraD, whose generator ends in ``0.5 * tanh + 0.5`` and whose D maps [0, 1]
to [-1, 1] itself; XMC-GAN, whose generator ends in ``(tanh + 1) / 2`` and whose input pipeline uses
``tf.image.convert_image_dtype`` to [0, 1]).

:class:`CocoCaptions` reads the real COCO captions format, so the embedded ``shapes`` dataset
(``cmgen.data.write_shapes``) and real COCO 2014/2017 load through the same code::

    {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "id", "caption"}]}
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

__all__ = ["CocoCaptions", "ShapesAttributes", "class_conditional_imagefolder", "load_image"]

_CAPTION_MODES = ("random", "all", "first")
_MISSING_MODES = ("error", "skip")


def _check_range(value_range: Sequence[float]) -> tuple[float, float]:
    if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    return float(value_range[0]), float(value_range[1])


def load_image(path: str | os.PathLike, image_size: int | None = None,
               value_range: Sequence[float] = (-1.0, 1.0), antialias: bool = True) -> torch.Tensor:
    """Read an image file as RGB, resize to ``image_size`` (square, bilinear) if given.

    ``antialias=False`` is plain bilinear interpolation, as ``tf.image.resize(method="bilinear")`` (XMC-GAN's
    ``coco_dataset.py::preprocess``); True (default) low-pass filters first when shrinking.

    Returns:
        ``(3, H, W)`` float32 with pixel 0 -> ``value_range[0]`` and 255 -> ``value_range[1]``.
    """
    low, high = _check_range(value_range)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    if image_size is not None and tuple(x.shape[1:]) != (image_size, image_size):
        x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=antialias)[0].clamp_(0.0, 1.0)
    return x * (high - low) + low


class CocoCaptions(Dataset):
    """COCO-captions dataset: one item per image, with one or all of its captions.

    Args:
        root: dataset root; ``ann_file`` and ``image_dir`` are relative to it (absolute paths also work).
        ann_file: COCO captions JSON (e.g. ``annotations/captions_train2014.json``, or
            ``annotations/captions_train.json`` for ``shapes``).
        image_dir: folder holding the ``file_name`` of every image (``train2014``; ``train`` for shapes).
        image_size: square output size; None keeps the file's size (batching then needs equal sizes).
        transform: callable applied last to the ``(3, H, W)`` tensor (already in ``value_range``), e.g. a
            random flip. Deterministic transforms belong here too; resizing is ``image_size``'s job.
        caption: ``"random"``: one caption drawn per access (the XMC-GAN training setup, which draws a
            random one of the 5 each step); ``"first"``: the caption with the lowest annotation id;
            ``"all"``: every caption of the image, as a list (COCO has 5-7 per image, so batching ``"all"``
            needs a custom collate unless every image has the same count, as in ``shapes``).
        tokenizer: optional Hugging Face tokenizer; adds ``input_ids`` and ``attention_mask`` (int64,
            ``(max_tokens,)``, or ``(K, max_tokens)`` for ``"all"``), padded to ``max_tokens``.
        max_tokens: token budget including ``[CLS]`` and ``[SEP]`` (17 in XMC-GAN's COCO setup).
        value_range: ``(-1, 1)`` (default, tanh GANs) or ``(0, 1)`` (XMC-GAN), any ``(low, high)``.
        seed: with a seed, ``"random"`` picks caption ``rng(seed, epoch, index)``: the same every time for
            the same (epoch, index), in any worker or process; call :meth:`set_epoch` each epoch. Without
            a seed the pick uses Python's ``random`` (DataLoader seeds it per worker).
        missing: ``"error"`` (default) raises ``FileNotFoundError`` naming the first missing image when the
            dataset is built (files are checked once, here); ``"skip"`` drops those images and records
            them in ``missing_files`` (their count is ``num_missing``).
        antialias: passed to :func:`load_image` (False = plain bilinear, as XMC-GAN's TF pipeline).

    A malformed entry of ``images`` or ``annotations`` (missing ``id`` / ``file_name`` / ``image_id`` /
    ``caption``, or a non-integer id) raises ``ValueError`` naming the file and the entry.

    Images without any caption are dropped (``num_uncaptioned``); items keep the JSON's image order.

    Item (a dict): ``image`` ``(3, H, W)``, ``caption`` (str, or list of str for ``"all"``),
    ``caption_index`` (int; -1 for ``"all"``), ``image_id`` (int), ``file_name`` (str), and with a
    tokenizer ``input_ids``/``attention_mask``.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, image_dir: str | os.PathLike,
                 image_size: int | None = None, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 caption: str = "random", tokenizer: Any = None, max_tokens: int = 17,
                 value_range: Sequence[float] = (-1.0, 1.0), seed: int | None = None, missing: str = "error",
                 antialias: bool = True):
        if caption not in _CAPTION_MODES:
            raise ValueError(f"caption must be one of {_CAPTION_MODES}, got {caption!r}")
        if missing not in _MISSING_MODES:
            raise ValueError(f"missing must be one of {_MISSING_MODES}, got {missing!r}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size}")
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3 ([CLS], one token, [SEP]), got {max_tokens}")
        self.root = Path(root)
        self.ann_file = self.root / ann_file
        self.image_dir = self.root / image_dir
        self.image_size = image_size
        self.transform = transform
        self.caption = caption
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.value_range = _check_range(value_range)
        self.seed = seed
        self.epoch = 0
        self.antialias = antialias

        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO captions file not found: {self.ann_file}")
        with open(self.ann_file, encoding="utf-8") as f:
            try:
                coco = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.ann_file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        for key in ("images", "annotations"):
            if key not in coco:
                raise ValueError(f"{self.ann_file} is not a COCO captions file: no {key!r} key "
                                 f"(keys: {sorted(coco)})")
        images: dict[int, str] = {}
        for i, im in enumerate(coco["images"]):
            try:
                images[int(im["id"])] = str(im["file_name"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.ann_file}: malformed images[{i}] = {str(im)[:200]} "
                                 f"({type(e).__name__}: {e})") from e
        by_image: dict[int, list[tuple[int, str]]] = {}
        for i, ann in enumerate(coco["annotations"]):
            try:
                image_id, ann_id, text = int(ann["image_id"]), int(ann["id"]), ann["caption"]
                if not isinstance(text, str):
                    raise TypeError(f"caption is {type(text).__name__}, not str")
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.ann_file}: malformed annotations[{i}] = {str(ann)[:200]} "
                                 f"({type(e).__name__}: {e})") from e
            if image_id not in images:
                raise ValueError(f"{self.ann_file}: annotation {ann_id} refers to image_id {image_id}, "
                                 "which is not in 'images'")
            by_image.setdefault(image_id, []).append((ann_id, text.strip()))

        self.ids: list[int] = []
        self.file_names: list[str] = []
        self.captions: list[list[str]] = []
        self.missing_files: list[str] = []
        self.num_uncaptioned = 0
        for image_id, file_name in images.items():
            anns = by_image.get(image_id)
            if not anns:
                self.num_uncaptioned += 1
                continue
            path = self.image_dir / file_name
            if not path.is_file():
                if missing == "error":
                    raise FileNotFoundError(f"image file not found: {path} (image_id {image_id} in "
                                            f"{self.ann_file}); pass missing='skip' to drop such images")
                self.missing_files.append(str(path))
                continue
            self.ids.append(image_id)
            self.file_names.append(file_name)
            self.captions.append([c for _, c in sorted(anns)])
        if not self.ids:
            raise ValueError(f"no usable images in {self.ann_file} (missing files: {len(self.missing_files)}, "
                             f"uncaptioned: {self.num_uncaptioned})")

    @property
    def num_missing(self) -> int:
        return len(self.missing_files)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for seeded caption choice (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def caption_choice(self, index: int) -> int:
        """Index of the caption that ``"random"``/``"first"`` returns for item ``index`` now."""
        n = len(self.captions[index])
        if self.caption == "first":
            return 0
        if self.caption != "random":
            raise ValueError(f"caption_choice is defined for 'random' and 'first', not {self.caption!r}")
        if self.seed is None:
            return random.randrange(n)
        return int(np.random.default_rng([self.seed, self.epoch, index]).integers(n))

    def __len__(self) -> int:
        return len(self.ids)

    def _tokenize(self, text: str | list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(text, max_length=self.max_tokens, padding="max_length", truncation=True,
                             return_tensors="pt")
        squeeze = isinstance(text, str)
        return {k: (enc[k][0] if squeeze else enc[k]).long() for k in ("input_ids", "attention_mask")}

    def load(self, index: int) -> torch.Tensor:
        """The ``(3, H, W)`` image of item ``index`` in ``value_range``, before ``transform``."""
        return load_image(self.image_dir / self.file_names[index], self.image_size, self.value_range,
                          self.antialias)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.caption == "all":
            text: str | list[str] = list(self.captions[index])
            choice = -1
        else:
            choice = self.caption_choice(index)
            text = self.captions[index][choice]
        item = {"image": image, "caption": text, "caption_index": choice, "image_id": self.ids[index],
                "file_name": self.file_names[index]}
        if self.tokenizer is not None:
            item.update(self._tokenize(text))
        return item


class ShapesAttributes:
    """Class labels of the ``shapes`` dataset from ``annotations/attributes_<split>.json``.

    The class is the shape of the primary (unique largest) object, indexed in ``classes`` order
    (``cmgen.data.SHAPES``: circle, square, triangle, diamond, star). torchvision's ImageFolder sorts class
    folders alphabetically instead; pass ``classes=attrs.classes`` to
    :func:`class_conditional_imagefolder` so both agree.

    Args:
        path: the attributes JSON, or a shapes root together with ``split``.
        split: ``"train"`` or ``"val"`` when ``path`` is the dataset root.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None):
        path = Path(path)
        if split is not None:
            path = path / "annotations" / f"attributes_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"shapes attributes file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        if "classes" not in data or "images" not in data:
            raise ValueError(f"{path} is not a shapes attributes file (keys: {sorted(data)})")
        self.path = path
        self.classes: list[str] = list(data["classes"])
        self.records: list[dict[str, Any]] = data["images"]
        self.labels: dict[int, int] = {}
        self.file_labels: dict[str, int] = {}
        for rec in self.records:
            label = int(rec["label"])
            if self.classes[label] != rec["label_name"]:
                raise ValueError(f"{path}: image {rec['id']} has label {label} ({self.classes[label]!r}) "
                                 f"but label_name {rec['label_name']!r}")
            self.labels[int(rec["id"])] = label
            self.file_labels[rec["file_name"]] = label

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.records)

    def label(self, image_id: int) -> int:
        """Class index of ``image_id``; ``KeyError`` naming the id if it is not in this split."""
        if image_id not in self.labels:
            raise KeyError(f"image_id {image_id} not in {self.path}")
        return self.labels[image_id]

    def labels_for(self, image_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``(B,)`` int64 labels for a batch of image ids (e.g. ``CocoCaptions`` items' ``image_id``)."""
        ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
        return torch.tensor([self.label(int(i)) for i in ids], dtype=torch.long)


class _OrderedImageFolder(ImageFolder):
    """ImageFolder whose class index follows a given class list instead of alphabetical order."""

    def __init__(self, root: str, class_order: Sequence[str] | None, **kwargs: Any):
        self._class_order = None if class_order is None else list(class_order)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        if self._class_order is None:
            return classes, {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(classes) - set(self._class_order))
        if unknown:
            raise ValueError(f"class folders {unknown} under {directory} are not in classes={self._class_order}")
        return self._class_order, {c: i for i, c in enumerate(self._class_order)}


def class_conditional_imagefolder(root: str | os.PathLike, image_size: int | None = None,
                                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                  value_range: Sequence[float] = (-1.0, 1.0),
                                  classes: Sequence[str] | None = None) -> ImageFolder:
    """torchvision ``ImageFolder`` giving ``(image (3, H, W) in value_range, class index)`` pairs.

    Same image pipeline as :class:`CocoCaptions` (RGB, optional square resize, ``value_range``,
    ``transform`` last). ``classes`` fixes the class order (e.g. ``ShapesAttributes.classes``); None keeps
    ImageFolder's alphabetical order. Folders of listed classes may be absent (they get no samples).
    """
    value_range = _check_range(value_range)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"ImageFolder root not found: {root}")

    def loader(path: str) -> torch.Tensor:
        return load_image(path, image_size, value_range)

    return _OrderedImageFolder(str(root), classes, loader=loader, transform=transform,
                               allow_empty=classes is not None)

"""Video datasets read from the official benchmark files: UCF101 and HMDB51 split files, Kinetics-400, MSR-VTT.

Items hold float clips ``(3, T, H, W)`` in ``[0, 1]`` (``(clips, 3, T, H, W)`` with several clips per
video), so a DataLoader batch is the ``(B, 3, T, H, W)`` tensor 3D backbones and VideoMoCo take.
``transform`` is applied to that float tensor (per clip).

Unreadable videos (missing, truncated, corrupt, too short to index) never stop a run: ``__getitem__``
warns once naming the file, counts it in ``dataset.skipped`` (paths in ``dataset.skipped_paths``) and
returns the next readable item instead. The counters live in the process that reads (each DataLoader
worker keeps its own); set ``dataset.skip_log = DIR`` before the workers start and every process
(workers, ranks) also appends each video it skips to ``DIR/skipped-<pid>.tsv``, which
:func:`read_skip_log` merges: that is how the training methods count skipped videos of all workers and
ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import abc
import csv
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from .io import VideoReadError, dense_clips, num_frames, random_clip_indices, read_frames, uniform_indices

__all__ = ["MovingDigitsSpec", "UCF101", "HMDB51", "Kinetics400", "MSRVTT", "read_class_ind", "read_split_file",
           "read_hmdb51_splits", "read_kinetics_csv", "read_skip_log", "SkipReport", "stratified_subset", "collate"]


def read_class_ind(path: str | os.PathLike) -> list[str]:
    """Class names from a ``classInd.txt`` (lines ``"1 ApplyEyeMakeup"``, 1-based); index i of the result
    is class ``i + 1``. Raises ValueError on gaps, duplicates or malformed lines."""
    entries: dict[int, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{n}: expected '<index> <ClassName>', got {line!r}")
        index = int(parts[0])
        if index in entries:
            raise ValueError(f"{path}:{n}: class index {index} appears twice")
        entries[index] = parts[1]
    if sorted(entries) != list(range(1, len(entries) + 1)):
        raise ValueError(f"{path}: class indices must be 1..{len(entries)}, got {sorted(entries)}")
    return [entries[i] for i in range(1, len(entries) + 1)]


def read_split_file(path: str | os.PathLike) -> list[tuple[str, int | None]]:
    """``(relative video path, 1-based label or None)`` for every line of a UCF101-style split file:
    ``"Class/v_x.avi 1"`` (trainlist) or ``"Class/v_x.avi"`` (testlist)."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
            raise ValueError(f"{path}:{n}: expected '<Class/video> [label]', got {line!r}")
        items.append((parts[0], int(parts[1]) if len(parts) == 2 else None))
    return items


class _SkippingVideoDataset(Dataset, abc.ABC):
    """Base class: ``_load(i)`` builds item ``i`` or raises :class:`VideoReadError`; ``__getitem__``
    falls back to the following items (cyclically) and counts each unreadable video once."""

    def __init__(self) -> None:
        self.skipped_paths: set[str] = set()
        self._num_frames: dict[str, int] = {}  # per-video frame counts, so each file is counted once
        self.skip_log: str | os.PathLike | None = None
        self.short_side: int | None = None  # decode-time short-side scaling (UCF101 and its subclasses)

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable videos met so far in this process."""
        return len(self.skipped_paths)

    @abc.abstractmethod
    def _load(self, index: int) -> Any:
        """Item ``index``; raises :class:`VideoReadError` when its video cannot be read."""

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for k in range(n):
            try:
                return self._load((index + k) % n)
            except VideoReadError as e:
                if e.path not in self.skipped_paths:
                    self.skipped_paths.add(e.path)
                    warnings.warn(f"skipping unreadable video {e.path}: {e.reason}", RuntimeWarning, stacklevel=2)
                    if self.skip_log is not None:
                        _append_skip(self.skip_log, e.path, e.reason)
        raise RuntimeError(f"none of the {n} videos of {type(self).__name__} could be read; "
                           f"e.g. {sorted(self.skipped_paths)[:3]}")

    def _count(self, path: str) -> int:
        if path not in self._num_frames:
            self._num_frames[path] = num_frames(path, backend=self.backend)
        return self._num_frames[path]

    def _frames(self, path: str, indices: torch.Tensor) -> torch.Tensor:
        """Decode ``(clips, T)`` indices once (union of frames) -> ``(clips, 3, T, H, W)`` float in [0, 1],
        with ``transform`` applied per clip; ``(3, T, H, W)`` when there is one clip."""
        short_side = self.short_side
        if indices.shape[0] == 1 and bool((indices.diff(dim=1) > 0).all()):
            # one clip of distinct increasing frames (the training case): decode exactly those, no gather copy
            frames = read_frames(path, indices[0], size=self.size, short_side=short_side, timeout=self.timeout,
                                 backend=self.backend)[None]
        else:
            unique, inverse = torch.unique(indices, return_inverse=True)
            frames = read_frames(path, unique, size=self.size, short_side=short_side, timeout=self.timeout,
                                 backend=self.backend)[inverse]
        clips = frames.permute(0, 4, 1, 2, 3).float().div_(255.0)  # (clips, T, H, W, 3) -> (clips, 3, T, H, W)
        if self.transform is not None:
            clips = torch.stack([self.transform(c) for c in clips])
        return clips[0] if clips.shape[0] == 1 else clips


def _append_skip(log_dir: str | os.PathLike, path: str, reason: str) -> None:
    """One line ``path<TAB>reason`` appended to this process's file (a single small write: concurrent
    processes never interleave inside a line of their own file)."""
    d = Path(log_dir)
    d.mkdir(parents=True, exist_ok=True)
    line = f"{path}\t{' '.join(reason.split())}\n"
    with open(d / f"skipped-{os.getpid()}.tsv", "a") as f:
        f.write(line)


def read_skip_log(log_dir: str | os.PathLike) -> dict[str, str]:
    """``{path: reason}`` of every video skipped by any process that wrote to ``log_dir``."""
    out: dict[str, str] = {}
    d = Path(log_dir)
    if not d.is_dir():
        return out
    for f in sorted(d.glob("skipped-*.tsv")):
        for line in f.read_text().splitlines():
            path, _, reason = line.partition("\t")
            if path:
                out.setdefault(path, reason)
    return out


class SkipReport:
    """Skipped videos of a whole run (all DataLoader workers and ranks), for a method's ``train_step``.

    ``attach(dataset)`` points the dataset's ``skip_log`` at ``log_dir`` (call it in ``build_dataset``,
    before the engine starts workers). ``update(step, main_process)`` returns the number of distinct
    skipped videos so far (re-read every ``refresh_steps`` steps and at epoch ends; files of other
    processes may lag by a few batches) and, on the main process, prints the videos first skipped during
    the epoch at each epoch end and the whole list after the last step.
    """

    def __init__(self, log_dir: str | os.PathLike, steps_per_epoch: int, max_steps: int, refresh_steps: int = 10):
        self.log_dir, self.steps_per_epoch, self.max_steps = Path(log_dir), max(1, steps_per_epoch), max_steps
        self.refresh_steps = max(1, refresh_steps)
        self._count, self._reported = 0, set()

    def attach(self, dataset: Dataset) -> Dataset:
        inner = dataset
        while not isinstance(inner, _SkippingVideoDataset):
            inner = getattr(inner, "clips", None) or getattr(inner, "videos", None)
            if inner is None:
                raise ValueError(f"{type(dataset).__name__} wraps no video dataset with a skip log")
        inner.skip_log = os.fspath(self.log_dir)
        return dataset

    def update(self, step: int, main_process: bool = True) -> int:
        done = step + 1
        epoch_end = done % self.steps_per_epoch == 0
        last = done >= self.max_steps
        if done % self.refresh_steps and not epoch_end and not last:
            return self._count
        skipped = read_skip_log(self.log_dir)
        self._count = len(skipped)
        if main_process and (epoch_end or last):
            paths = list(skipped)
            if last and paths:
                print(f"data: {len(paths)} unreadable videos skipped in this run:\n" +
                      "\n".join(f"  {p}: {skipped[p]}" for p in paths), flush=True)
            elif any(p not in self._reported for p in paths):
                new = [p for p in paths if p not in self._reported]
                print(f"data: epoch {done // self.steps_per_epoch}: {len(new)} more unreadable videos skipped "
                      f"({len(paths)} in all):\n" + "\n".join(f"  {p}: {skipped[p]}" for p in new), flush=True)
            self._reported = set(paths)
        return self._count


class UCF101(_SkippingVideoDataset):
    """Action recognition clips from the official UCF101 split files (also HMDB51 in the same format).

    Args:
        root: video root that split-file paths are relative to (``UCF-101/``).
        split_file: ``trainlist0X.txt`` (``"Class/v_x.avi 1"``) or ``testlist0X.txt`` (``"Class/v_x.avi"``).
        class_ind: ``classInd.txt``. Labels are 0-based: the split file's label - 1 when given, else the
            class of the path's folder (matched case-insensitively: real UCF101 writes ``HandStandPushups``
            in file names under the ``HandstandPushups`` folder).
        clip_len: frames per clip (T).
        stride: step between sampled frames.
        size: decoded frame size (``None`` native, ``s`` or ``(H, W)``).
        short_side: instead of ``size``, decode with the shorter side scaled to this (aspect kept), for
            training pipelines that crop from a short-side resize (see :func:`video.io.read_frames`).
        clips_per_video: random clips per item when ``train``; evenly spaced clips otherwise
            (10 at test time, as VideoMoCo's evaluation).
        train: random clip positions (training) or deterministic dense clips (testing).
        transform: callable on a float clip ``(3, T, H, W)``.
        backend, timeout: passed to :func:`video.io.read_frames`.

    Items: ``(clip, label)`` with clip ``(3, T, H, W)`` (or ``(clips_per_video, 3, T, H, W)``) float in
    ``[0, 1]`` and label an int.
    """

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike, class_ind: str | os.PathLike,
                 clip_len: int = 16, stride: int = 1, size: int | Sequence[int] | None = None,
                 clips_per_video: int = 1, train: bool = True, transform: Callable | None = None,
                 backend: str = "decord", timeout: float | None = 30.0,
                 short_side: int | None = None):
        super().__init__()
        self.root = Path(root)
        self.classes = read_class_ind(class_ind)
        lookup = {c.lower(): i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for rel, label in read_split_file(split_file):
            if label is None:
                folder = Path(rel).parts[0] if len(Path(rel).parts) > 1 else ""
                if folder.lower() not in lookup:
                    raise ValueError(f"{split_file}: {rel!r} has no label and its folder {folder!r} is not a "
                                     f"class of {class_ind}")
                label = lookup[folder.lower()] + 1
            if not 1 <= label <= len(self.classes):
                raise ValueError(f"{split_file}: label {label} of {rel!r} outside 1..{len(self.classes)}")
            self.samples.append((rel, label - 1))
        self._configure(clip_len, stride, size, clips_per_video, train, transform, backend, timeout, short_side)

    def _configure(self, clip_len: int, stride: int, size, clips_per_video: int, train: bool,
                   transform: Callable | None, backend: str, timeout: float | None,
                   short_side: int | None = None) -> None:
        if clip_len < 1 or stride < 1 or clips_per_video < 1:
            raise ValueError(f"clip_len, stride and clips_per_video must be >= 1, got {clip_len}, {stride}, "
                             f"{clips_per_video}")
        if short_side is not None and (size is not None or short_side < 1):
            raise ValueError(f"short_side must be None or >= 1 and excludes size; got short_side={short_side!r}, "
                             f"size={size!r}")
        self.short_side = short_side
        self.clip_len, self.stride, self.size = clip_len, stride, size
        self.clips_per_video, self.train, self.transform = clips_per_video, train, transform
        self.backend, self.timeout = backend, timeout

    @property
    def targets(self) -> list[int]:
        """0-based label of every item."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _clip_indices(self, path: str) -> torch.Tensor:
        """``(clips, T)`` frame indices for one video, by the train/test sampling rule."""
        count = self._count(path)
        if self.train:
            return torch.stack([random_clip_indices(count, self.clip_len, self.stride)
                                for _ in range(self.clips_per_video)])
        return dense_clips(count, self.clip_len, self.clips_per_video, self.stride)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[index]
        path = os.fspath(self.root / rel)
        return self._frames(path, self._clip_indices(path)), label


_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<k>[1-3])\.txt$")


def read_hmdb51_splits(split_dir: str | os.PathLike, split: int = 1) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The official HMDB51 split files (``testTrainMulti_7030_splits/<class>_test_split<k>.txt``).

    Each line is ``"<video>.avi <tag>"`` with tag 1 = train, 2 = test, 0 = unused (torchvision's
    ``HMDB51`` ``TRAIN_TAG``/``TEST_TAG``). Classes are the ``<class>`` parts of the file names (they
    contain underscores, e.g. ``brush_hair``), sorted alphabetically as the class folders.

    Returns ``(classes, {"train": [(class/video, label)], "test": [...]})`` with 0-based labels.
    Raises ValueError for a missing split, an unknown tag or a malformed line.
    """
    if split not in (1, 2, 3):
        raise ValueError(f"HMDB51 split must be 1, 2 or 3, got {split!r}")
    split_dir = Path(split_dir)
    files = {}
    for f in sorted(split_dir.glob("*_test_split*.txt")):
        m = _HMDB_SPLIT.match(f.name)
        if m and int(m["k"]) == split:
            files[m["cls"]] = f
    if not files:
        raise ValueError(f"{split_dir}: no HMDB51 split files '<class>_test_split{split}.txt'")
    classes = sorted(files)
    out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, cls in enumerate(classes):
        for n, line in enumerate(files[cls].read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{files[cls]}:{n}: expected '<video>.avi <0|1|2>', got {line!r}")
            if parts[1] != "0":
                out["train" if parts[1] == "1" else "test"].append((f"{cls}/{parts[0]}", label))
    return classes, out


class HMDB51(UCF101):
    """HMDB51 clips from the official split files (see :func:`read_hmdb51_splits`).

    Args:
        root: the video root with one folder per class (``hmdb51_org/<class>/<video>.avi``).
        split_dir: folder of ``<class>_test_split<k>.txt`` (``testTrainMulti_7030_splits``).
        split: 1, 2 or 3.
        train: the train (tag 1) or test (tag 2) videos; also selects random or dense clips as UCF101.
        clip_len, stride, size, clips_per_video, transform, backend, timeout, short_side: as :class:`UCF101`.

    Lists already converted to the UCF101 format read with :class:`UCF101`.
    """

    def __init__(self, root: str | os.PathLike, split_dir: str | os.PathLike, split: int = 1, train: bool = True,
                 clip_len: int = 16, stride: int = 1, size: int | Sequence[int] | None = None,
                 clips_per_video: int = 1, transform: Callable | None = None, backend: str = "decord",
                 timeout: float | None = 30.0, short_side: int | None = None):
        _SkippingVideoDataset.__init__(self)
        self.root = Path(root)
        self.classes, splits = read_hmdb51_splits(split_dir, split)
        self.samples = splits["train" if train else "test"]
        self._configure(clip_len, stride, size, clips_per_video, train, transform, backend, timeout, short_side)


KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


def read_kinetics_csv(path: str | os.PathLike, split: str | None = None) -> list[tuple[str, str]]:
    """``(label, file name)`` rows of an official Kinetics-400 annotation CSV
    (``label,youtube_id,time_start,time_end,split[,is_cc]``), the file named
    ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` as the official downloader writes it.
    ``split`` keeps only rows of that split (``train``, ``validate``, ``test``)."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(KINETICS_COLUMNS) <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns {','.join(KINETICS_COLUMNS)}, got {reader.fieldnames}")
        for n, row in enumerate(reader, 2):
            if split is not None and row["split"] != split:
                continue
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                raise ValueError(f"{path}:{n}: time_start/time_end must be numbers, got {row['time_start']!r}, "
                                 f"{row['time_end']!r}") from None
            rows.append((row["label"], f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"))
    return rows


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


class Kinetics400(UCF101):
    """Kinetics-400 clips, from the official annotation CSV or from a plain folder of class folders.

    Args:
        root: the split's video folder: ``<label>/<youtube_id>_<start:06d>_<end:06d>.mp4``. A label's
            folder is the label itself or the label with spaces replaced by underscores (both layouts
            exist among downloaders), whichever exists.
        csv: the official CSV (``kinetics_400_train.csv``, ...); None: the plain layout, every video
            file (``VIDEO_EXTENSIONS``) under ``root/<class>/``, classes = sorted folder names.
        split: rows of the CSV to keep (``"train"``, ``"validate"``); None keeps all.
        classes: the class order (default: the sorted labels of the CSV, or the folder names).
        missing: CSV rows whose file is absent: ``"skip"`` (left out; listed once in ``self.missing``
            and one warning) or ``"error"``.
        clip_len, stride, size, clips_per_video, train, transform, backend, timeout, short_side: as
            :class:`UCF101`.

    Items: ``(clip (3, T, H, W) float in [0, 1], label int)``.
    """

    def __init__(self, root: str | os.PathLike, csv: str | os.PathLike | None = None, split: str | None = None,
                 classes: Sequence[str] | None = None, missing: str = "skip", clip_len: int = 16, stride: int = 1,
                 size: int | Sequence[int] | None = None, clips_per_video: int = 1, train: bool = True,
                 transform: Callable | None = None, backend: str = "decord", timeout: float | None = 30.0,
                 short_side: int | None = None):
        _SkippingVideoDataset.__init__(self)
        if missing not in ("skip", "error"):
            raise ValueError(f"missing must be 'skip' or 'error', got {missing!r}")
        self.root = Path(root)
        if csv is not None:
            rows = read_kinetics_csv(csv, split)
            self.classes = list(classes) if classes is not None else sorted({label for label, _ in rows})
            folder = {}
            for label in self.classes:
                candidates = [label, label.replace(" ", "_")]
                folder[label] = next((c for c in candidates if (self.root / c).is_dir()), candidates[0])
        else:
            if not self.root.is_dir():
                raise ValueError(f"Kinetics root {self.root} is not a folder")
            names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            self.classes = list(classes) if classes is not None else names
            folder = {c: c for c in self.classes}
            rows = [(c, f.name) for c in names if c in folder for f in sorted((self.root / c).iterdir())
                    if f.suffix.lower() in VIDEO_EXTENSIONS]
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({label for label, _ in rows if label not in index})
        if unknown:
            raise ValueError(f"labels {unknown[:5]} of {csv or root} are not among the {len(self.classes)} classes")
        self.samples, self.missing = [], []
        for label, name in rows:
            rel = f"{folder[label]}/{name}"
            if csv is not None and not (self.root / rel).is_file():
                self.missing.append(os.fspath(self.root / rel))
                continue
            self.samples.append((rel, index[label]))
        if self.missing:
            if missing == "error":
                raise ValueError(f"{len(self.missing)} videos of {csv} are missing under {self.root}, e.g. "
                                 f"{self.missing[:3]}")
            warnings.warn(f"{len(self.missing)} of {len(rows)} videos listed in {csv} are missing under "
                          f"{self.root} and left out (dataset.missing lists them), e.g. {self.missing[:3]}",
                          RuntimeWarning, stacklevel=2)
        self._configure(clip_len, stride, size, clips_per_video, train, transform, backend, timeout, short_side)


def stratified_subset(labels: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """``min(n, len(labels))`` indices drawn class by class in turn (classes and members in a random
    order fixed by ``seed``), so every class gets ``n // C`` or one more while it has members. Sorted.

    For evaluation subsets of class-sorted split files, whose first ``n`` lines are a few classes only.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    queues = []
    for c in sorted(by_class):
        members = by_class[c]
        queues.append([members[j] for j in torch.randperm(len(members), generator=g).tolist()])
    order = torch.randperm(len(queues), generator=g).tolist()
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(labels)):
        for c in order:
            if depth < len(queues[c]) and len(picked) < n:
                picked.append(queues[c][depth])
        depth += 1
    return sorted(picked)


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a csv with a header; a missing column or a short row is an error naming the file (and line)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        lacking = [c for c in columns if c not in (reader.fieldnames or [])]
        if lacking:
            raise ValueError(f"{path}: missing column(s) {lacking}; header is {reader.fieldnames}")
        rows = []
        for row in reader:
            if any(row.get(c) is None for c in columns):
                raise ValueError(f"{path}:{reader.line_num}: expected the columns {list(reader.fieldnames)}, "
                                 f"got {row}")
            rows.append(row)
    return rows


class MSRVTT(_SkippingVideoDataset):
    """MSR-VTT video-text pairs: ``MSRVTT_data.json`` captions with the 9k train / JSFusion 1k-A test split.

    Args:
        root: folder holding ``MSRVTT_data.json``, ``MSRVTT_train.9k.csv``, ``MSRVTT_JSFUSION_test.csv``.
        split: ``"train"``: one item per (video, caption) over ALL captions of the train-csv videos in
            the JSON; ``"test"``: one item per JSFusion row, its single caption (1k-A protocol).
        video_dir: folder of ``<video_id>.mp4`` files, relative to ``root`` (or absolute).
        train_csv, test_csv, data_json: file names inside ``root`` (e.g. ``MSRVTT_train.7k.csv``).
        clip_len: frames per clip, spread uniformly over the whole video (CLIP4Clip sampling).
        size, transform, backend, timeout: as :class:`UCF101`.

    Items: ``(clip (3, T, H, W) float in [0, 1], caption str, video index int)``; the video index points
    into ``self.video_ids``, so ``self.text_to_video`` is the ground truth for
    :func:`evaluation.retrieval.retrieval_metrics`.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", video_dir: str | os.PathLike = "videos/all",
                 clip_len: int = 12, size: int | Sequence[int] | None = None, transform: Callable | None = None,
                 train_csv: str = "MSRVTT_train.9k.csv", test_csv: str = "MSRVTT_JSFUSION_test.csv",
                 data_json: str = "MSRVTT_data.json", backend: str = "decord", timeout: float | None = 30.0):
        super().__init__()
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        self.root = Path(root)
        self.video_dir = self.root / video_dir
        self.split = split
        pairs: list[tuple[str, str]] = []  # (video_id, caption)
        if split == "train":
            wanted = [row["video_id"] for row in _csv_rows(self.root / train_csv, ("video_id",))]
            with open(self.root / data_json) as f:
                try:
                    sentences = json.load(f)["sentences"]
                    captions: dict[str, list[str]] = {}
                    for s in sentences:
                        captions.setdefault(s["video_id"], []).append(s["caption"])
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.root / data_json}:{e.lineno}:{e.colno}: not valid JSON "
                                     f"({e.msg})") from None
                except (KeyError, TypeError) as e:
                    raise ValueError(f"{self.root / data_json}: expected {{'sentences': [{{'video_id', 'caption'}}, "
                                     f"...]}}, missing {e}") from None
            missing = [v for v in wanted if v not in captions]
            if missing:
                raise ValueError(f"{data_json} has no captions for {len(missing)} train videos, e.g. {missing[:3]}")
            pairs = [(v, c) for v in wanted for c in captions[v]]
        else:
            pairs = [(row["video_id"], row["sentence"])
                     for row in _csv_rows(self.root / test_csv, ("video_id", "sentence"))]
        self.video_ids: list[str] = list(dict.fromkeys(v for v, _ in pairs))
        position = {v: i for i, v in enumerate(self.video_ids)}
        self.captions = [c for _, c in pairs]
        self.text_to_video = [position[v] for v, _ in pairs]
        self.clip_len, self.size, self.transform = clip_len, size, transform
        self.backend, self.timeout = backend, timeout

    def __len__(self) -> int:
        return len(self.captions)

    def video_path(self, video_index: int) -> str:
        return os.fspath(self.video_dir / f"{self.video_ids[video_index]}.mp4")

    def _load(self, index: int) -> tuple[torch.Tensor, str, int]:
        v = self.text_to_video[index]
        path = self.video_path(v)
        indices = uniform_indices(self._count(path), self.clip_len)[None]
        return self._frames(path, indices), self.captions[index], v


def collate(batch: list[tuple]) -> tuple:
    """Stack clips and ints, keep strings as a list: ``[(clip, label)]`` -> ``(clips (B, ...), labels (B,))``,
    ``[(clip, caption, video)]`` -> ``(clips, [captions], videos (B,))``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    fields = list(zip(*batch))
    out = []
    for field in fields:
        if isinstance(field[0], str):
            out.append(list(field))
        else:
            out.append(default_collate(list(field)))
    return tuple(out)


@dataclass
class MovingDigitsSpec:
    """The writer settings of the embedded moving digits (``cmgen.data.write_moving_digits``). VideoMoCo's
    and the fine-tune's data configs share them, so the same settings find the same folder under
    :func:`cmgen.data.prepare_embedded_data`; with a ``data.root`` cmgen did not write they are unused."""

    num_videos: int = 64
    num_frames: int = 16
    frame_size: int = 32
    digit_size: int = 16
    speed: int = 1
    clips_per_group: int = 2
    test_groups: int = 1          # groups 1..test_groups of every class are the test split
    seed: int = 0

    def writer_settings(self) -> dict:
        """Keyword arguments of ``write_moving_digits`` (``frame_size`` is its ``size``)."""
        return dict(num_videos=self.num_videos, num_frames=self.num_frames, size=self.frame_size,
                    digit_size=self.digit_size, speed=self.speed, clips_per_group=self.clips_per_group,
                    test_groups=self.test_groups, seed=self.seed)


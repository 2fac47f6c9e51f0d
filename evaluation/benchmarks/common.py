"""What every benchmark reader returns, where its videos come from, and how gaps are reported.

A reader turns the official annotation files of one benchmark split into a :class:`RetrievalSplit`:
the split's video ids (the columns of a similarity matrix, in this order), its queries (captions, or
one paragraph per video for paragraph retrieval) and ``text_to_video``, the ground truth that
:func:`evaluation.retrieval.retrieval_metrics` takes. Errors in the files raise
:class:`BenchmarkError` (a ``ValueError``) naming the file and the entry.

Videos are either files (``<root>/<video_id>.<ext>``, decoded with :mod:`video.io`) or pre-extracted
features (:func:`open_features`: one ``.npy`` per video in a folder, one ``.safetensors`` file keyed by
video id, or one HDF5 file with a dataset per video id, which needs ``h5py``). :func:`check_complete`
lists the videos of a split that are missing from such a source once, and refuses an incomplete test
set unless ``allow_missing`` (then the split is restricted to the present videos and remembers how
many were dropped, so every table can say so).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BenchmarkError", "RetrievalSplit", "read_id_list", "read_json", "VideoFiles", "FeatureStore",
           "open_features", "check_complete", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class BenchmarkError(ValueError):
    """A benchmark file is malformed or inconsistent, or the test set is incomplete."""


@dataclass
class RetrievalSplit:
    """One benchmark split ready for ranking.

    Attributes:
        benchmark: registry name (``"msrvtt-1ka"``, ``"msvd"``, ...).
        split: ``"test"``, ``"val"``, ``"train"``, ...
        video_ids: ids of the split's videos; column j of a similarity matrix is ``video_ids[j]``.
        texts: the queries (row t of a similarity matrix): captions, or paragraphs.
        text_to_video: (len(texts),) index into ``video_ids`` of every query.
        recall_ks: the R@K the benchmark's papers report (ActivityNet adds R@50).
        paragraph: queries are whole-video paragraphs (ActivityNet, DiDeMo).
        files: the annotation files read (for the report).
        num_missing / missing: videos of the split absent from the video source and dropped
            (only with ``allow_missing``); 0 / [] for a complete split.
    """

    benchmark: str
    split: str
    video_ids: list[str]
    texts: list[str]
    text_to_video: list[int]
    recall_ks: tuple[int, ...] = (1, 5, 10)
    paragraph: bool = False
    files: list[str] = field(default_factory=list)
    num_missing: int = 0
    missing: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.text_to_video):
            raise BenchmarkError(f"{self.benchmark}/{self.split}: {len(self.texts)} texts but "
                                 f"{len(self.text_to_video)} text_to_video entries")
        if len(set(self.video_ids)) != len(self.video_ids):
            dup = next(v for v in self.video_ids if self.video_ids.count(v) > 1)
            raise BenchmarkError(f"{self.benchmark}/{self.split}: video {dup!r} listed twice")
        bad = [i for i in self.text_to_video if not 0 <= i < len(self.video_ids)]
        if bad:
            raise BenchmarkError(f"{self.benchmark}/{self.split}: text_to_video index {bad[0]} outside "
                                 f"[0, {len(self.video_ids)})")

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    def subset(self, keep: Iterable[str]) -> "RetrievalSplit":
        """The split restricted to the videos in ``keep`` (and their queries), order preserved."""
        keep = set(keep)
        new_ids = [v for v in self.video_ids if v in keep]
        position = {v: i for i, v in enumerate(new_ids)}
        pairs = [(t, position[self.video_ids[j]]) for t, j in zip(self.texts, self.text_to_video)
                 if self.video_ids[j] in position]
        dropped = [v for v in self.video_ids if v not in keep]
        return replace(self, video_ids=new_ids, texts=[t for t, _ in pairs], text_to_video=[j for _, j in pairs],
                       num_missing=self.num_missing + len(dropped), missing=self.missing + dropped)

    def summary(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "split": self.split, "num_videos": self.num_videos,
                "num_texts": self.num_texts, "paragraph": self.paragraph, "recall_ks": list(self.recall_ks),
                "num_missing": self.num_missing, "files": self.files}


def from_pairs(benchmark: str, split: str, pairs: Sequence[tuple[str, str]], video_order: Sequence[str] | None = None,
               **kwargs) -> RetrievalSplit:
    """Build a split from ``(video_id, text)`` pairs; videos in ``video_order`` (default: first appearance)."""
    ids = list(dict.fromkeys(video_order if video_order is not None else (v for v, _ in pairs)))
    position = {v: i for i, v in enumerate(ids)}
    return RetrievalSplit(benchmark, split, ids, [t for _, t in pairs], [position[v] for v, _ in pairs], **kwargs)


def from_listed_captions(benchmark: str, split: str, list_path: Path, captions: dict[str, list[str]],
                         captions_path: Path) -> RetrievalSplit:
    """Every caption of every video of the id list ``list_path`` (captions from ``captions_path``); a
    listed video without captions is an error naming both files."""
    ids = read_id_list(list_path)
    lacking = [v for v in ids if v not in captions]
    if lacking:
        raise BenchmarkError(f"{captions_path}: no captions for {len(lacking)} videos of {list_path}, "
                             f"e.g. {lacking[:5]}")
    return from_pairs(benchmark, split, [(v, c) for v in ids for c in captions[v]], ids,
                      files=[str(list_path), str(captions_path)])


# ------------------------------------------------------------------------------------ small readers

def read_json(path: str | os.PathLike) -> Any:
    """``json.load`` with the file named in the error."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Video ids, one per line (``{train,val,test}_list.txt``) or a JSON list; blank lines skipped;
    a duplicate or a line with whitespace inside is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: file not found")
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            data = list(data)
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise BenchmarkError(f"{path}: expected a JSON list of video id strings")
        lines = list(enumerate(data, 1))
    else:
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    ids: list[str] = []
    seen: dict[str, int] = {}
    for n, vid in lines:
        if not vid:
            continue
        if len(vid.split()) != 1:
            raise BenchmarkError(f"{path}:{n}: expected one video id, got {vid!r}")
        if vid in seen:
            raise BenchmarkError(f"{path}:{n}: video {vid!r} already listed on line {seen[vid]}")
        seen[vid] = n
        ids.append(vid)
    if not ids:
        raise BenchmarkError(f"{path}: no video ids")
    return ids


# ------------------------------------------------------------------------------------ video sources

class VideoFiles:
    """Video files ``<root>/<id><ext>`` (any of :data:`VIDEO_EXTENSIONS`; also ``v_<id>`` as ActivityNet
    dumps name them), found by one directory listing."""

    kind = "videos"

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BenchmarkError(f"{self.root}: video folder not found")
        self._paths: dict[str, Path] = {}
        for p in sorted(self.root.iterdir()):
            if p.suffix.lower() in extensions and p.is_file():
                self._paths.setdefault(p.stem, p)

    def path(self, video_id: str) -> Path:
        for key in (video_id, f"v_{video_id}"):
            if key in self._paths:
                return self._paths[key]
        raise KeyError(video_id)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._paths or f"v_{video_id}" in self._paths


class FeatureStore:
    """Pre-extracted per-video features, ``store[video_id]`` -> ``(frames, D)`` float32 numpy array."""

    kind = "features"

    def __init__(self, path: str | os.PathLike, keys: Iterable[str], getter, closer=None):
        self.path = Path(path)
        self._keys = set(keys)
        self._get = getter
        self._close = closer

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._keys or f"v_{video_id}" in self._keys

    def keys(self) -> list[str]:
        """The stored video ids, sorted."""
        return sorted(self._keys)

    def __getitem__(self, video_id: str) -> np.ndarray:
        key = video_id if video_id in self._keys else f"v_{video_id}"
        if key not in self._keys:
            raise KeyError(video_id)
        x = np.asarray(self._get(key))
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.number):
            raise BenchmarkError(f"{self.path}: features of {video_id!r} must be (frames, D) numbers, got shape "
                                 f"{x.shape} dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise BenchmarkError(f"{self.path}: features of {video_id!r} contain NaN or inf")
        return x.astype(np.float32, copy=False)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def open_features(path: str | os.PathLike) -> FeatureStore:
    """A folder of ``<id>.npy`` files, a ``.safetensors`` file (one tensor per video id) or an HDF5 file
    (``.h5`` / ``.hdf5``, one dataset per video id at the top level; needs ``h5py``)."""
    path = Path(path)
    if path.is_dir():
        files = {p.stem: p for p in path.glob("*.npy")}
        if not files:
            raise BenchmarkError(f"{path}: no <video_id>.npy feature files in this folder")

        def get(key):
            try:
                return np.load(files[key], allow_pickle=False)
            except ValueError as e:
                raise BenchmarkError(f"{files[key]}: not a numeric .npy array ({e})") from e
        return FeatureStore(path, files, get)
    if not path.is_file():
        raise BenchmarkError(f"{path}: feature file or folder not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="np")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise BenchmarkError(f"{path}: not a readable safetensors file ({e})") from e
        return FeatureStore(path, keys, handle.get_tensor)
    if path.suffix in (".h5", ".hdf5"):
        try:
            import h5py
        except ImportError as e:
            raise BenchmarkError(f"{path}: reading HDF5 features needs h5py (pip install h5py)") from e
        handle = h5py.File(path, "r")
        return FeatureStore(path, list(handle.keys()), lambda k: handle[k][()], handle.close)
    raise BenchmarkError(f"{path}: features must be a folder of .npy files, a .safetensors or an .h5/.hdf5 file")


def check_complete(split: RetrievalSplit, source, allow_missing: bool = False, where: str | None = None
                   ) -> RetrievalSplit:
    """``split`` if every video is in ``source`` (anything supporting ``in``: :class:`VideoFiles`, a
    :class:`FeatureStore`, a set of ids); else one error listing all missing ids, or with
    ``allow_missing`` the split restricted to the present videos (``num_missing`` set). ``where``
    names the source in messages (default: its folder or file)."""
    missing = [v for v in split.video_ids if v not in source]
    if not missing:
        return split
    where = where or getattr(source, "root", None) or getattr(source, "path", "the video source")
    if not allow_missing:
        listed = ", ".join(missing[:50]) + (f", ... ({len(missing) - 50} more)" if len(missing) > 50 else "")
        raise BenchmarkError(
            f"{split.benchmark}/{split.split}: {len(missing)} of {split.num_videos} videos are missing from {where}: "
            f"{listed}. A benchmark number on an incomplete test set is not comparable to published ones; "
            f"pass --allow-missing (allow_missing=True) to evaluate the {split.num_videos - len(missing)} present "
            f"videos anyway (the table then says how many are missing)")
    if len(missing) == split.num_videos:
        raise BenchmarkError(f"{split.benchmark}/{split.split}: none of the {split.num_videos} videos is in {where}")
    warnings.warn(f"{split.benchmark}/{split.split}: evaluating without {len(missing)} of {split.num_videos} videos "
                  f"missing from {where}: {', '.join(missing)}", RuntimeWarning, stacklevel=2)
    return split.subset(v for v in split.video_ids if v in source)

"""MSR-VTT (Xu et al., CVPR 2016) retrieval splits from the files CLIP4Clip / JSFusion distribute.

- 1k-A test (Yu et al., ECCV 2018, "JSFusion"): ``MSRVTT_JSFUSION_test.csv`` with header
  ``key,vid_key,video_id,sentence``, 1000 rows, one caption per video: a square t2v problem.
- 7k / 9k training lists: ``MSRVTT_train.7k.csv`` / ``MSRVTT_train.9k.csv``, one column ``video_id``;
  their captions (20 per video) come from ``MSRVTT_data.json``.
- Full split (the dataset's own): ``MSRVTT_data.json`` ``videos[{video_id, split, ...}]`` with split
  ``train`` (6513) / ``validate`` (497) / ``test`` (2990) and ``sentences[{video_id, caption, sen_id}]``;
  the full test set has 2990 videos x 20 captions (multi-caption metrics).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .common import BenchmarkError, RetrievalSplit, from_pairs, read_json

__all__ = ["read_jsfusion_csv", "read_train_csv", "read_msrvtt_data", "msrvtt_1ka", "msrvtt_train", "msrvtt_full"]

FULL_SPLITS = {"train": "train", "val": "validate", "validate": "validate", "test": "test"}


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise BenchmarkError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        lacking = [c for c in columns if c not in header]
        if lacking:
            raise BenchmarkError(f"{path}: missing column(s) {lacking}; header is {header}")
        rows = []
        for row in reader:
            n = reader.line_num
            if None in row or any(row.get(c) is None for c in columns):
                raise BenchmarkError(f"{path}:{n}: expected {len(header)} fields ({','.join(header)}), got "
                                     f"{sum(v is not None for v in row.values()) + len(row.get(None, []))}")
            for c in columns:
                if not row[c].strip():
                    raise BenchmarkError(f"{path}:{n}: empty {c!r}")
            rows.append((n, {c: row[c].strip() for c in columns}))
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    return rows


def read_jsfusion_csv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(video_id, sentence)`` per row of the JSFusion 1k-A csv; a repeated video is an error (1k-A has
    one caption per video)."""
    path = Path(path)
    seen: dict[str, int] = {}
    pairs = []
    for n, row in _read_csv(path, ("video_id", "sentence")):
        if row["video_id"] in seen:
            raise BenchmarkError(f"{path}:{n}: video {row['video_id']!r} already on line {seen[row['video_id']]} "
                                 f"(1k-A has one caption per video)")
        seen[row["video_id"]] = n
        pairs.append((row["video_id"], row["sentence"]))
    return pairs


def read_train_csv(path: str | os.PathLike) -> list[str]:
    """Video ids of ``MSRVTT_train.{7k,9k}.csv`` (column ``video_id``), duplicates rejected."""
    path = Path(path)
    seen: dict[str, int] = {}
    for n, row in _read_csv(path, ("video_id",)):
        if row["video_id"] in seen:
            raise BenchmarkError(f"{path}:{n}: video {row['video_id']!r} already on line {seen[row['video_id']]}")
        seen[row["video_id"]] = n
    return list(seen)


def read_msrvtt_data(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``MSRVTT_data.json`` -> (video_id -> split, video_id -> captions in sen_id order)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) or \
            not isinstance(data.get("sentences"), list):
        raise BenchmarkError(f"{path}: expected an object with lists 'videos' and 'sentences'")
    splits: dict[str, str] = {}
    for i, v in enumerate(data["videos"]):
        if not isinstance(v, dict) or not isinstance(v.get("video_id"), str) or not isinstance(v.get("split"), str):
            raise BenchmarkError(f"{path}: videos[{i}] needs string 'video_id' and 'split', got {v!r:.200}")
        if v["video_id"] in splits:
            raise BenchmarkError(f"{path}: videos[{i}]: video {v['video_id']!r} listed twice")
        splits[v["video_id"]] = v["split"]
    captions: dict[str, list[tuple[int, str]]] = {}
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or not isinstance(s.get("video_id"), str) or not isinstance(s.get("caption"), str):
            raise BenchmarkError(f"{path}: sentences[{i}] needs string 'video_id' and 'caption', got {s!r:.200}")
        if s["video_id"] not in splits:
            raise BenchmarkError(f"{path}: sentences[{i}] refers to video {s['video_id']!r}, which is not in 'videos'")
        captions.setdefault(s["video_id"], []).append((int(s.get("sen_id", i)), s["caption"].strip()))
    return splits, {v: [c for _, c in sorted(cs)] for v, cs in captions.items()}


def msrvtt_1ka(root: str | os.PathLike, test_csv: str = "MSRVTT_JSFUSION_test.csv") -> RetrievalSplit:
    """The 1k-A test split: 1000 videos, one caption each (square t2v, v2t)."""
    path = Path(root) / test_csv
    return from_pairs("msrvtt-1ka", "test", read_jsfusion_csv(path), files=[str(path)])


def msrvtt_train(root: str | os.PathLike, train_csv: str = "MSRVTT_train.9k.csv",
                 data_json: str = "MSRVTT_data.json") -> RetrievalSplit:
    """All captions of the 7k / 9k training videos (pass ``train_csv="MSRVTT_train.7k.csv"``)."""
    root = Path(root)
    ids = read_train_csv(root / train_csv)
    _, captions = read_msrvtt_data(root / data_json)
    lacking = [v for v in ids if v not in captions]
    if lacking:
        raise BenchmarkError(f"{root / data_json}: no captions for {len(lacking)} videos of {root / train_csv}, "
                             f"e.g. {lacking[:5]}")
    return from_pairs("msrvtt-train", Path(train_csv).stem, [(v, c) for v in ids for c in captions[v]], ids,
                      files=[str(root / train_csv), str(root / data_json)])


def msrvtt_full(root: str | os.PathLike, split: str = "test", data_json: str = "MSRVTT_data.json") -> RetrievalSplit:
    """The dataset's own split (``train`` / ``val`` / ``test``) with every caption of every video."""
    if split not in FULL_SPLITS:
        raise ValueError(f"split must be one of {sorted(FULL_SPLITS)}, got {split!r}")
    path = Path(root) / data_json
    splits, captions = read_msrvtt_data(path)
    ids = [v for v, s in splits.items() if s == FULL_SPLITS[split]]
    if not ids:
        raise BenchmarkError(f"{path}: no video has split {FULL_SPLITS[split]!r} (splits present: "
                             f"{sorted(set(splits.values()))})")
    lacking = [v for v in ids if v not in captions]
    if lacking:
        raise BenchmarkError(f"{path}: {len(lacking)} {split} videos have no sentence, e.g. {lacking[:5]}")
    return from_pairs("msrvtt-full", split, [(v, c) for v in ids for c in captions[v]], ids, files=[str(path)])

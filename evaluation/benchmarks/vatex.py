"""VATEX (Wang et al., ICCV 2019) English retrieval split with the HGR lists (Chen et al., CVPR 2020).

Captions: the official ``vatex_training_v1.0.json`` / ``vatex_validation_v1.0.json`` layout, a list of
``{"videoID": ..., "enCap": [10 captions], "chCap": [...]}``, or the dict form ``{video_id: {"enCap":
[...]}}`` that retrieval code bases save; only ``enCap`` is used. Splits: the HGR lists (1500 val and
1500 test videos, both drawn from the official validation set, the rest of which trains), one video
id per line or a JSON list (``<split>_list.txt`` by default). 10 captions per video: multi-caption
metrics.
"""
from __future__ import annotations

import os
from pathlib import Path

from .common import BenchmarkError, RetrievalSplit, from_listed_captions, read_json

__all__ = ["read_vatex_captions", "vatex"]


def read_vatex_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """video_id -> English captions, from either layout; a record without a list of strings under
    ``enCap`` is an error naming it."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, list):
        items = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict) or not isinstance(rec.get("videoID"), str):
                raise BenchmarkError(f"{path}: [{i}] needs a string 'videoID', got {rec!r:.200}")
            items.append((f"[{i}] ({rec['videoID']})", rec["videoID"], rec))
    elif isinstance(data, dict):
        items = [(repr(k), k, v) for k, v in data.items()]
    else:
        raise BenchmarkError(f"{path}: expected a list of records or a dict video_id -> record")
    out: dict[str, list[str]] = {}
    for where, vid, rec in items:
        caps = rec.get("enCap") if isinstance(rec, dict) else None
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise BenchmarkError(f"{path}: entry {where}: 'enCap' must be a non-empty list of captions, got {caps!r:.200}")
        if vid in out:
            raise BenchmarkError(f"{path}: entry {where}: video {vid!r} appears twice")
        out[vid] = [c.strip() for c in caps]
    return out


def vatex(root: str | os.PathLike, split: str = "test", captions_file: str = "vatex_data.json",
          list_file: str | None = None) -> RetrievalSplit:
    """Every English caption of the videos in the HGR ``<split>_list.txt`` (or ``list_file``)."""
    root = Path(root)
    list_path = root / (list_file or f"{split}_list.txt")
    cap_path = root / captions_file
    return from_listed_captions("vatex", split, list_path, read_vatex_captions(cap_path), cap_path)

"""DiDeMo (Hendricks et al., ICCV 2017) paragraph-to-video retrieval.

``{train,val,test}_data.json``: a list of ``{"video": id, "description": str, "times": [[s, e], ...],
...}``, one record per moment; ``{split}_list.txt`` (optional) lists the split's videos. As in
CLIP4Clip's ``dataloader_didemo_retrieval.py``, all descriptions of a video are joined with spaces into
one paragraph (in file order) and ranked against whole videos (test: about 1000 videos).
"""
from __future__ import annotations

import os
from pathlib import Path

from .common import BenchmarkError, RetrievalSplit, from_pairs, read_id_list, read_json

__all__ = ["read_didemo_data", "didemo"]

SPLITS = ("train", "val", "test")


def read_didemo_data(path: str | os.PathLike) -> dict[str, str]:
    """video id -> paragraph of its moments' descriptions."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a list of {{video, description, times}} records")
    parts: dict[str, list[str]] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("video"), str) or \
                not isinstance(rec.get("description"), str):
            raise BenchmarkError(f"{path}: [{i}] needs string 'video' and 'description', got {rec!r:.200}")
        times = rec.get("times")
        if times is not None and (not isinstance(times, list) or
                                  not all(isinstance(t, list) and len(t) == 2 for t in times)):
            raise BenchmarkError(f"{path}: [{i}] ({rec['video']}): 'times' must be a list of [start, end] pairs, "
                                 f"got {times!r:.100}")
        if rec["description"].strip():
            parts.setdefault(rec["video"], []).append(rec["description"].strip())
    if not parts:
        raise BenchmarkError(f"{path}: no descriptions")
    return {v: " ".join(d) for v, d in parts.items()}


def didemo(root: str | os.PathLike, split: str = "test") -> RetrievalSplit:
    """One paragraph per video of ``<split>_data.json`` (restricted to ``<split>_list.txt`` if present)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    path = root / f"{split}_data.json"
    paragraphs = read_didemo_data(path)
    files = [str(path)]
    ids = list(paragraphs)
    list_path = root / f"{split}_list.txt"
    if list_path.is_file():
        files.append(str(list_path))
        listed = read_id_list(list_path)
        # CLIP4Clip keeps the videos in both the list and the annotations; a listed video without any
        # description cannot be queried, so it is an inconsistency worth stopping for
        lacking = [v for v in listed if v not in paragraphs]
        if lacking:
            raise BenchmarkError(f"{path}: no description for {len(lacking)} videos of {list_path}, e.g. {lacking[:5]}")
        ids = listed
    return from_pairs("didemo", split, [(v, paragraphs[v]) for v in ids], ids, paragraph=True, files=files)

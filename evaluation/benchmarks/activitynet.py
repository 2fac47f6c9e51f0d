"""ActivityNet Captions (Krishna et al., ICCV 2017) paragraph-to-video retrieval.

``train.json`` / ``val_1.json``: ``{"v_<id>": {"duration": s, "timestamps": [[start, end], ...],
"sentences": [...]}}``. Paragraph retrieval (Zhang et al., ECCV 2018; CLIP4Clip
``dataloader_activitynet_retrieval.py``): every video's sentences are joined into ONE query with
spaces, in file order, and ranked against whole videos; the test set is ``val_1`` (4917 videos).
Video ids keep their ``v_`` prefix here; :class:`~evaluation.benchmarks.common.VideoFiles` and feature
stores also find files named without it. Papers report R@1, R@5, R@50 (and MdR).
"""
from __future__ import annotations

import os
from pathlib import Path

from .common import BenchmarkError, RetrievalSplit, from_pairs, read_id_list, read_json

__all__ = ["read_activitynet_captions", "activitynet"]

FILES = {"train": "train.json", "val": "val_1.json", "test": "val_1.json", "val_2": "val_2.json"}
RECALL_KS = (1, 5, 50)


def read_activitynet_captions(path: str | os.PathLike) -> dict[str, str]:
    """video_id -> paragraph; sentences must be a non-empty list of strings with one timestamp pair each."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected a dict video_id -> {{duration, timestamps, sentences}}")
    out = {}
    for vid, rec in data.items():
        sentences = rec.get("sentences") if isinstance(rec, dict) else None
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
            raise BenchmarkError(f"{path}: entry {vid!r}: 'sentences' must be a non-empty list of strings, "
                                 f"got {sentences!r:.200}")
        stamps = rec.get("timestamps")
        if stamps is not None and (not isinstance(stamps, list) or len(stamps) != len(sentences)):
            raise BenchmarkError(f"{path}: entry {vid!r}: {len(sentences)} sentences but "
                                 f"{len(stamps) if isinstance(stamps, list) else stamps!r} timestamps")
        paragraph = " ".join(s.strip() for s in sentences).strip()
        if not paragraph:
            raise BenchmarkError(f"{path}: entry {vid!r}: all sentences are empty")
        out[vid] = paragraph
    return out


def activitynet(root: str | os.PathLike, split: str = "test", ids_file: str | None = None) -> RetrievalSplit:
    """One paragraph per video of ``val_1.json`` (test/val) or ``train.json``; ``ids_file`` (e.g.
    CLIP4Clip's ``val_ids.json``) restricts and orders the videos."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    root = Path(root)
    path = root / FILES[split]
    paragraphs = read_activitynet_captions(path)
    files = [str(path)]
    ids = list(paragraphs)
    if ids_file is not None:
        ids = read_id_list(root / ids_file)
        files.append(str(root / ids_file))
        lacking = [v for v in ids if v not in paragraphs]
        if lacking:
            raise BenchmarkError(f"{path}: no sentences for {len(lacking)} videos of {root / ids_file}, e.g. {lacking[:5]}")
    return from_pairs("anet", split, [(v, paragraphs[v]) for v in ids], ids, recall_ks=RECALL_KS, paragraph=True,
                      files=files)

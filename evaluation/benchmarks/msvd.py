"""MSVD (Chen & Dolan, ACL 2011) retrieval split as CLIP4Clip / collaborative-experts distribute it.

- ``raw-captions.pkl``: a pickled dict ``video_id -> list of captions``, each caption a list of tokens
  (``[["a", "man", "is", "singing"], ...]``); captions are joined with single spaces, as CLIP4Clip's
  ``dataloader_msvd_retrieval.py`` does (``" ".join(cap)``).
- ``{train,val,test}_list.txt``: one video id per line (1200 / 100 / 670 videos).

About 40 captions per video, so t2v ranks every caption and v2t is multi-caption ("best" or
"maxpool", see :mod:`evaluation.retrieval`).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

from .common import BenchmarkError, RetrievalSplit, from_listed_captions

__all__ = ["read_raw_captions", "msvd"]

SPLITS = ("train", "val", "test")


def read_raw_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """``raw-captions.pkl`` -> video_id -> captions (tokens joined by spaces). A value that is not a
    non-empty list of token lists (or strings) is an error naming the video."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise BenchmarkError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected a dict video_id -> captions, got {type(data).__name__}")
    out: dict[str, list[str]] = {}
    for vid, caps in data.items():
        if not isinstance(vid, str) or not isinstance(caps, (list, tuple)) or not caps:
            raise BenchmarkError(f"{path}: entry {vid!r}: expected a non-empty list of captions, got {caps!r:.100}")
        joined = []
        for k, cap in enumerate(caps):
            if isinstance(cap, str):
                text = cap.strip()
            elif isinstance(cap, (list, tuple)) and all(isinstance(w, str) for w in cap):
                text = " ".join(cap).strip()
            else:
                raise BenchmarkError(f"{path}: entry {vid!r}, caption {k}: expected a list of tokens, got {cap!r:.100}")
            if not text:
                raise BenchmarkError(f"{path}: entry {vid!r}, caption {k} is empty")
            joined.append(text)
        out[vid] = joined
    return out


def msvd(root: str | os.PathLike, split: str = "test", captions_file: str = "raw-captions.pkl") -> RetrievalSplit:
    """Every caption of every video listed in ``<split>_list.txt``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    list_path, cap_path = root / f"{split}_list.txt", root / captions_file
    return from_listed_captions("msvd", split, list_path, read_raw_captions(cap_path), cap_path)

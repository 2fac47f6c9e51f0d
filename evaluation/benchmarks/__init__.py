"""Readers for the standard video-text retrieval benchmarks, one per annotation format.

``load_benchmark(name, root, split="test")`` -> :class:`RetrievalSplit` (video ids = similarity-matrix
columns, queries = rows, ``text_to_video``). Names (``BENCHMARKS``):

======================  ==========================================================================
``msrvtt-1ka``          MSR-VTT 1k-A test: ``MSRVTT_JSFUSION_test.csv`` (1000 videos, 1 caption each)
``msrvtt-train``        MSR-VTT 9k (or 7k, ``train_csv=``) training videos, captions from ``MSRVTT_data.json``
``msrvtt-full``         MSR-VTT's own split in ``MSRVTT_data.json`` (test: 2990 videos x 20 captions)
``msvd``                MSVD ``raw-captions.pkl`` + ``{train,val,test}_list.txt`` (670 test videos, ~40 captions)
``vatex``               VATEX ``enCap`` JSON + HGR ``{val,test}_list.txt`` (1500 videos, 10 captions)
``anet``                ActivityNet Captions ``val_1.json``, paragraph -> video, R@1/5/50
``didemo``              DiDeMo ``test_data.json``, paragraph -> video
======================  ==========================================================================

File formats are in each reader's module docstring. Videos come from :class:`VideoFiles` or
:func:`open_features`; :func:`check_complete` refuses an incomplete test set unless told otherwise.
"""
from __future__ import annotations

import os
from typing import Callable

from .activitynet import activitynet, read_activitynet_captions
from .common import (BenchmarkError, FeatureStore, RetrievalSplit, VideoFiles, check_complete, open_features,
                     read_id_list, read_json)
from .didemo import didemo, read_didemo_data
from .msrvtt import msrvtt_1ka, msrvtt_full, msrvtt_train, read_jsfusion_csv, read_msrvtt_data, read_train_csv
from .msvd import msvd, read_raw_captions
from .vatex import read_vatex_captions, vatex

__all__ = ["BENCHMARKS", "load_benchmark", "BenchmarkError", "RetrievalSplit", "VideoFiles", "FeatureStore",
           "open_features", "check_complete", "read_id_list", "read_json", "msrvtt_1ka", "msrvtt_train",
           "msrvtt_full", "msvd", "vatex", "activitynet", "didemo", "read_jsfusion_csv", "read_train_csv",
           "read_msrvtt_data", "read_raw_captions", "read_vatex_captions", "read_activitynet_captions",
           "read_didemo_data"]


def _no_split(fn: Callable, name: str) -> Callable:
    def load(root, split="test", **kwargs):
        if split != "test":
            raise ValueError(f"{name} has only the 'test' split (use msrvtt-train / msrvtt-full for others), "
                             f"got {split!r}")
        return fn(root, **kwargs)
    return load


def _train_only(root, split="train", **kwargs):
    return msrvtt_train(root, **kwargs)


BENCHMARKS: dict[str, Callable[..., RetrievalSplit]] = {
    "msrvtt-1ka": _no_split(msrvtt_1ka, "msrvtt-1ka"),
    "msrvtt-train": _train_only,
    "msrvtt-full": msrvtt_full,
    "msvd": msvd,
    "vatex": vatex,
    "anet": activitynet,
    "didemo": didemo,
}


def load_benchmark(name: str, root: str | os.PathLike, split: str = "test", **kwargs) -> RetrievalSplit:
    """The ``split`` of benchmark ``name`` from the annotation files under ``root``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](root, split=split, **kwargs)

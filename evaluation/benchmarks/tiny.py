"""Tiny benchmark folders in each REAL annotation format, with pre-extracted features, for smoke runs.

:func:`write_tiny_benchmark` writes what a user would download for MSR-VTT, MSVD, VATEX or ActivityNet
Captions, at a few dozen videos: the annotation files exactly as the readers of this package expect
them (``MSRVTT_data.json`` + ``MSRVTT_train.{9k,7k}.csv`` + ``MSRVTT_JSFUSION_test.csv``;
``raw-captions.pkl`` of token lists + ``{train,val,test}_list.txt``; VATEX's official
``[{"videoID", "enCap", "chCap"}]`` list + HGR-style lists; ``train.json`` / ``val_1.json`` with
``duration``, ``timestamps`` and ``sentences``) and one ``(frames, F)`` float32 ``.npy`` per video
under ``features`` (a feature folder as :func:`~evaluation.benchmarks.open_features` reads it),
with a different number of rows per video.

Content: every video shows one of ``4 x 8`` (digit, direction) combinations; its captions name them in
a few templates ("the digit 3 moves up and to the left"), and its feature rows are the combination's
fixed random direction plus noise, so a model can learn the pairing. Deterministic in ``seed``.
The support-set configs' ``# smoke:`` lines train on these folders (``data.tiny_benchmark``), so
their smoke runs go through the real loaders.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np

__all__ = ["TINY_BENCHMARKS", "write_tiny_benchmark", "prepare_tiny_benchmark"]

TINY_BENCHMARKS = ("msrvtt", "msvd", "vatex", "anet")
_DIRECTIONS = ("up", "down", "left", "right", "up and to the left", "up and to the right",
               "down and to the left", "down and to the right")
_TEMPLATES = ("the digit {d} moves {m}", "a {d} is moving {m}", "digit {d} going {m} across the frame",
              "a handwritten {d} drifts {m}")


def _captions(combo: int, n: int) -> list[str]:
    d, m = combo % 4, _DIRECTIONS[combo // 4]
    return [_TEMPLATES[k % len(_TEMPLATES)].format(d=d, m=m) for k in range(n)]


def write_tiny_benchmark(root: str | os.PathLike, benchmark: str, features: str = "features", num_train: int = 16,
                         num_test: int = 8, num_val: int = 4, feature_dim: int = 16, seed: int = 0) -> Path:
    """Write a tiny ``benchmark`` folder (one of ``TINY_BENCHMARKS``) under ``root``; returns ``root``.

    ``features``: the feature folder, relative to ``root`` (a config's ``data.features``). Split sizes
    are videos; the test split is MSR-VTT's 1k-A csv, MSVD's/VATEX's ``test_list.txt`` or ActivityNet's
    ``val_1.json``."""
    if benchmark not in TINY_BENCHMARKS:
        raise ValueError(f"benchmark must be one of {TINY_BENCHMARKS}, got {benchmark!r}")
    if min(num_train, num_test, num_val) < 1 or feature_dim < 1:
        raise ValueError(f"need positive split sizes and feature_dim, got {num_train}, {num_test}, {num_val}, "
                         f"{feature_dim}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = num_train + num_val + num_test
    combos = rng.integers(0, 4 * len(_DIRECTIONS), n)
    split = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
    ids = {"msrvtt": [f"video{i}" for i in range(n)],
           "msvd": [f"{''.join(rng.choice(list('abcdefghijkXYZ_-0123456789'), 11))}_{3 * i}_{3 * i + 7}"
                    for i in range(n)],
           "vatex": [f"{''.join(rng.choice(list('abcdefghijkXYZ_-0123456789'), 11))}_{i:06d}_{i + 10:06d}"
                     for i in range(n)],
           "anet": [f"v_{''.join(rng.choice(list('abcdefghijkXYZ_-0123456789'), 11))}" for i in range(n)]}[benchmark]
    ncap = {"msrvtt": 20, "msvd": 40, "vatex": 10, "anet": 3}[benchmark]
    caps = {v: _captions(int(c), ncap) for v, c in zip(ids, combos)}
    by = {s: [v for v, t in zip(ids, split) if t == s] for s in ("train", "val", "test")}

    if benchmark == "msrvtt":
        msr_split = {"train": "train", "val": "validate", "test": "test"}
        data = {"info": {"contributor": "cmgen tiny benchmark", "year": 2016},
                "videos": [{"category": int(c) % 20, "url": f"https://example.invalid/{v}", "video_id": v,
                            "start time": 0.0, "end time": 10.0, "split": msr_split[s], "id": i}
                           for i, (v, c, s) in enumerate(zip(ids, combos, split))],
                "sentences": [{"caption": c, "video_id": v, "sen_id": k * n + i}
                              for k in range(ncap) for i, v in enumerate(ids) for c in [caps[v][k]]]}
        (root / "MSRVTT_data.json").write_text(json.dumps(data))
        for name, rows in (("MSRVTT_train.9k.csv", by["train"] + by["val"]), ("MSRVTT_train.7k.csv", by["train"])):
            with open(root / name, "w", newline="") as f:
                csv.writer(f).writerows([["video_id"], *[[v] for v in rows]])
        with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
            csv.writer(f).writerows([["key", "vid_key", "video_id", "sentence"],
                                     *[[f"ret{i}", f"msr{v[5:]}", v, caps[v][0]] for i, v in enumerate(by["test"])]])
    elif benchmark == "msvd":
        (root / "raw-captions.pkl").write_bytes(pickle.dumps({v: [c.split() for c in caps[v]] for v in ids}))
        for s in ("train", "val", "test"):
            (root / f"{s}_list.txt").write_text("".join(f"{v}\n" for v in by[s]))
    elif benchmark == "vatex":
        records = [{"videoID": v, "enCap": caps[v], "chCap": ["一个数字在移动"] * ncap} for v in ids]
        (root / "vatex_data.json").write_text(json.dumps(records, ensure_ascii=False))
        for s in ("train", "val", "test"):
            (root / f"{s}_list.txt").write_text("".join(f"{v}\n" for v in by[s]))
    else:  # anet: train.json, val_1.json (the test set of paragraph retrieval), val_2.json
        for name, vids in (("train.json", by["train"]), ("val_1.json", by["test"]), ("val_2.json", by["val"])):
            entries = {}
            for v in vids:
                duration = float(rng.uniform(30, 120))
                cuts = np.sort(rng.uniform(0, duration, 2 * ncap)).round(2).reshape(ncap, 2)
                entries[v] = {"duration": round(duration, 2), "timestamps": cuts.tolist(),
                              "sentences": [c[0].upper() + c[1:] + "." for c in caps[v]]}
            (root / name).write_text(json.dumps(entries))

    feat_dir = root / features
    feat_dir.mkdir(parents=True, exist_ok=True)
    centres = rng.standard_normal((4 * len(_DIRECTIONS), feature_dim)).astype(np.float32)
    for v, c in zip(ids, combos):
        rows = int(rng.integers(3, 12))
        x = centres[c] + 0.3 * rng.standard_normal((rows, feature_dim)).astype(np.float32)
        np.save(feat_dir / f"{v}.npy", x.astype(np.float32))
    return root


def prepare_tiny_benchmark(benchmark: str, features: str = "features", seed: int = 0) -> Path:
    """The tiny ``benchmark`` folder at ``$CMGEN_DATA/tiny-<benchmark>-<digest>`` (``data/`` by default),
    written on first use: by rank 0 into a temporary sibling renamed into place (a concurrent writer
    never exposes half a folder), every process waiting for it."""
    import hashlib

    from cmgen.data.common import DATA_ENV
    from cmgen.distributed import barrier, rank

    if Path(features).is_absolute() or ".." in Path(features).parts:
        raise ValueError(f"features must be a folder inside the tiny benchmark, got {features!r}")
    settings = {"benchmark": benchmark, "features": str(features), "seed": int(seed), "format": 1}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    target = Path(os.environ.get(DATA_ENV) or "data") / f"tiny-{benchmark}-{digest}"
    done = target / "tiny_benchmark.json"
    if rank() == 0 and not done.is_file():
        import shutil

        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_benchmark(tmp, benchmark, features, seed=seed)
        (tmp / "tiny_benchmark.json").write_text(json.dumps(settings) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another run renamed its copy first: same settings, same files
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return target

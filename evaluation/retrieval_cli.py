"""``cmgen eval retrieval``: R@K / MdR / MnR from a similarity matrix, from embeddings or from a checkpoint.

Without ``--benchmark`` (any matrix)::

    cmgen eval retrieval --sims S.npy [--text-to-video M.npy] [--out metrics.json]
    cmgen eval retrieval --text-emb T.npy --video-emb V.npy [--text-to-video M.npy]

With ``--benchmark msrvtt-1ka|msrvtt-full|msvd|vatex|anet|didemo --data-root DIR [--split test]`` the
ground truth, the number of queries and videos and the reported R@K come from the benchmark's own
files (:mod:`evaluation.benchmarks`), and the scores from one of

- ``--sims S.npy``: (num_queries, num_videos) in the benchmark's order (queries as the reader lists them,
  videos in split order); any other shape is one error line naming the file and the expected shape;
- ``--embeddings E.npz`` (arrays ``text`` (num_queries, D), ``video`` (num_videos, D), optional
  ``video_ids`` to match rows to videos by id) or ``--text-emb`` / ``--video-emb`` ``.npy`` files;
- ``--checkpoint RUN_OR_CHECKPOINT`` with ``--features`` (npy folder / safetensors / HDF5) or
  ``--videos`` (video files): the trained method embeds the split, streaming the embeddings to the
  folder ``--save-embeddings`` (default ``<out stem>_embeddings/`` or a temporary folder), which
  ``--embeddings`` reads back. The method class must
  provide ``embed_for_retrieval`` (``video.supportset`` does).

``--videos`` / ``--features`` (or ``video_ids`` in the embeddings) are checked against the split: missing
videos are listed once and the run stops unless ``--allow-missing``, in which case only the present
videos (and their queries) are ranked and the table says how many were left out.

The table has the plain numbers and, in separate columns, the re-scored ones (``--dual-softmax TAU``,
``--querybank BANK``: transductive or using extra data, see :mod:`evaluation.retrieval`). Plain
metrics from embeddings never build the similarity matrix; DSL / QB-Norm need it (they normalise over
all queries) and build it only when asked for. ``--out metrics.json`` also writes ``metrics.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .retrieval import RECALL_KS, TIES, V2T_MODES

COLUMNS = [f"R@{k}" for k in RECALL_KS] + ["MdR", "MnR"]
BENCHMARK_NAMES = ("msrvtt-1ka", "msrvtt-full", "msvd", "vatex", "anet", "didemo")
TITLES = {"msrvtt-1ka": "MSR-VTT 1k-A", "msrvtt-full": "MSR-VTT full split", "msrvtt-train": "MSR-VTT train",
          "msvd": "MSVD", "vatex": "VATEX (HGR split)", "anet": "ActivityNet Captions (paragraph -> video)",
          "didemo": "DiDeMo (paragraph -> video)"}
# a similarity matrix built for DSL / QB-Norm must stay below this many entries (8 GiB of float64)
MAX_DENSE = 2**30


class CLIError(ValueError):
    """A user error reported as one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("scores (one of)")
    src.add_argument("--sims", default=None, help=".npy similarity matrix (num_texts, num_videos), rows = captions")
    src.add_argument("--embeddings", default=None, metavar="E.npz|DIR",
                     help=".npz with arrays text (num_texts, D), video (num_videos, D) [, video_ids], or a folder "
                          "with text.npy, video.npy [, video_ids.json] (what --checkpoint writes)")
    src.add_argument("--text-emb", default=None, help=".npy text embeddings (num_texts, D)")
    src.add_argument("--video-emb", default=None, help=".npy video embeddings (num_videos, D)")
    src.add_argument("--checkpoint", default=None,
                     help="run directory or checkpoint directory of a method that can embed videos and texts")
    parser.add_argument("--text-to-video", default=None,
                        help=".npy int array (num_texts,): video index of each caption (default: square, i <-> i; "
                             "with --benchmark it comes from the benchmark)")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", default=None, choices=BENCHMARK_NAMES, help="standard split and table")
    bench.add_argument("--data-root", default=None, help="folder with the benchmark's annotation files")
    bench.add_argument("--split", default="test", help="benchmark split (default test)")
    bench.add_argument("--videos", default=None, help="folder of <video_id>.mp4/... files (completeness, --checkpoint)")
    bench.add_argument("--features", default=None,
                       help="pre-extracted features: folder of <video_id>.npy, a .safetensors or an .h5 file")
    bench.add_argument("--allow-missing", action="store_true",
                       help="evaluate a test set with missing videos (the table says how many)")
    bench.add_argument("--save-embeddings", default=None,
                       help="with --checkpoint: folder the embeddings stream to (text.npy, video.npy, video_ids.json)")
    bench.add_argument("--batch-size", type=int, default=64, help="with --checkpoint: items embedded at a time")
    bench.add_argument("--device", default=None, help="with --checkpoint: torch device (default cuda if available)")
    parser.add_argument("--ties", default="average", choices=TIES, help="tie handling (default: average)")
    parser.add_argument("--v2t", default="best", choices=V2T_MODES,
                        help="video->text protocol: best correct caption (collaborative-experts) or "
                             "max-pooled captions (CLIP4Clip)")
    parser.add_argument("--chunk-size", type=int, default=None, help="queries ranked at a time (bounds memory)")
    parser.add_argument("--mmap", action="store_true",
                        help="memory-map --sims; with --chunk-size only chunk-sized pieces are read into memory")
    parser.add_argument("--dual-softmax", type=float, default=None, metavar="TAU",
                        help="also report t2v/v2t after dual-softmax re-scoring (transductive)")
    parser.add_argument("--querybank", default=None, metavar="BANK.npy",
                        help="also report t2v after QB-Norm: a (num_bank, num_videos) similarity bank with --sims, "
                             "a (num_bank, D) bank of text embeddings with embeddings")
    parser.add_argument("--qb-beta", type=float, default=20.0, help="QB-Norm beta (default 20)")
    parser.add_argument("--qb-k", type=int, default=1, help="QB-Norm top-k of the bank (default 1)")
    parser.add_argument("--out", default=None, help="write metrics + settings + shapes as JSON here (and .md)")


# ------------------------------------------------------------------------------------------ tables

def _fmt(key: str, value: float) -> str:
    return f"{value:.2f}" if key.startswith("R@") else f"{value:.1f}"


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """``{"t2v": {...}, ...}`` -> a markdown table with one line per entry (columns from the first)."""
    columns = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(c, metrics[c]) for c in columns) + " |")
    return "\n".join(lines)


def benchmark_table(title: str, info: dict, variants: dict[str, dict[str, dict[str, float]]]) -> str:
    """The benchmark's standard table: one row per direction, the plain metrics first, then each
    re-scoring (``variants``: name -> {"t2v": ..., "v2t": ...}) in its own group of columns."""
    names = list(variants)
    columns = list(variants[names[0]]["t2v"])
    head = ["direction"] + [c if n == "plain" else f"{c} {n}" for n in names for c in columns]
    lines = [f"**{title}** — {info['split']}: {info['num_videos']} videos, {info['num_texts']} "
             f"{'paragraphs' if info['paragraph'] else 'queries'}; ties: {info['ties']}, v2t: {info['v2t']}"]
    if info.get("num_missing"):
        total = info["num_videos"] + info["num_missing"]
        lines.append(f"**Incomplete test set: {info['num_missing']} of {total} videos missing** (evaluated on the "
                     f"{info['num_videos']} present; not comparable to published numbers).")
    lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for direction, label in (("t2v", "text → video"), ("v2t", "video → text")):
        cells = []
        for n in names:
            m = variants[n].get(direction)
            cells += ["—"] * len(columns) if m is None else [_fmt(c, m[c]) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ inputs

def _load_npy(path: str, what: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CLIError(f"{path}: cannot read {what} ({e})") from e


def _load_embeddings(args) -> tuple[np.ndarray, np.ndarray, list[str] | None, str]:
    if args.embeddings and Path(args.embeddings).is_dir():  # written by --checkpoint / embed_for_retrieval
        d = Path(args.embeddings)
        ids_file = d / "video_ids.json"
        ids = [str(v) for v in json.loads(ids_file.read_text())] if ids_file.is_file() else None
        return (_load_npy(str(d / "text.npy"), "text embeddings", True),
                _load_npy(str(d / "video.npy"), "video embeddings", True), ids, str(d))
    if args.embeddings:
        try:
            with np.load(args.embeddings, allow_pickle=False) as z:
                if "text" not in z or "video" not in z:
                    raise CLIError(f"{args.embeddings}: needs arrays 'text' and 'video', has {sorted(z.files)}")
                ids = [str(v) for v in z["video_ids"]] if "video_ids" in z else None
                return z["text"], z["video"], ids, args.embeddings
        except (OSError, ValueError) as e:
            if isinstance(e, CLIError):
                raise
            raise CLIError(f"{args.embeddings}: cannot read embeddings ({e})") from e
    if not (args.text_emb and args.video_emb):
        raise CLIError("--text-emb and --video-emb go together")
    return (_load_npy(args.text_emb, "text embeddings"), _load_npy(args.video_emb, "video embeddings"), None,
            f"{args.text_emb}, {args.video_emb}")


def _video_source(args):
    from .benchmarks import VideoFiles, open_features

    if args.features and args.videos:
        raise CLIError("give --features or --videos, not both")
    if args.features:
        return open_features(args.features)
    if args.videos:
        return VideoFiles(args.videos)
    return None


def _resolve_checkpoint(path: str) -> Path:
    from cmgen.engine.checkpoint import STATE_FILE, latest_checkpoint

    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise CLIError(f"{path}: no checkpoint here (expected a run directory with checkpoints/step_*/ or a "
                   f"checkpoint directory with {STATE_FILE})")


def embed_from_checkpoint(args, split, source) -> tuple[np.ndarray, np.ndarray]:
    """Build the run's method from its saved config, load its models and let it embed the split."""
    import torch

    from cmgen.engine.checkpoint import load_model_state
    from cmgen.engine.registry import load_config, resolve_method

    if source is None:
        raise CLIError("--checkpoint needs --features or --videos to embed the benchmark's videos")
    ckpt = _resolve_checkpoint(args.checkpoint)
    cfg = load_config(ckpt / "config.yaml")
    method = resolve_method(cfg.method)(cfg)
    if not hasattr(method, "embed_for_retrieval"):
        raise CLIError(f"{ckpt}: method {cfg.method!r} cannot embed videos and texts (no embed_for_retrieval)")
    if hasattr(method, "use_video_source"):
        method.use_video_source(source)
    models = method.build_models(cfg)
    for name, model in models.items():
        model.load_state_dict(load_model_state(ckpt, name))
        model.eval()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.save_embeddings or (str(Path(args.out).with_suffix("")) + "_embeddings" if args.out else
                                   tempfile.mkdtemp(prefix="cmgen-emb-"))
    text, video = method.embed_for_retrieval(models, split, source, out_path=out, batch_size=args.batch_size,
                                             device=device)
    print(f"embeddings of {split.num_texts} queries and {split.num_videos} videos written to {out}", file=sys.stderr)
    return text, video


def _check_shape(array, expected: tuple[int, ...], path: str, what: str) -> None:
    if tuple(array.shape[:len(expected)]) != expected or array.ndim != (len(expected) if what == "sims" else 2):
        want = " x ".join(str(e) for e in expected)
        raise CLIError(f"{path}: {what} has shape {tuple(array.shape)}, expected ({want}"
                       f"{', D' if what != 'sims' else ''})")


# ----------------------------------------------------------------------------------------- metrics

def _score(kind: str, data: tuple, t2v, args, ks) -> dict:
    """Plain metrics, plus DSL / QB-Norm variants when asked for."""
    from .retrieval import (dual_softmax, querybank_normalize, retrieval_metrics,
                            retrieval_metrics_from_embeddings)

    kwargs = dict(ties=args.ties, v2t=args.v2t, chunk_size=args.chunk_size, ks=ks)
    if kind == "sims":
        (sims,) = data
        variants = {"plain": retrieval_metrics(sims, t2v, **kwargs)}
    else:
        text, video = data
        variants = {"plain": retrieval_metrics_from_embeddings(text, video, t2v, **kwargs)}
    if args.dual_softmax is None and args.querybank is None:
        return variants
    if kind != "sims":
        n = text.shape[0] * video.shape[0]
        if n > MAX_DENSE:
            raise CLIError(f"DSL / QB-Norm normalise over all queries and need the full {text.shape[0]} x "
                           f"{video.shape[0]} matrix, more than {MAX_DENSE} entries; run them on a smaller split")
        sims = np.asarray(text, dtype=np.float64) @ np.asarray(video, dtype=np.float64).T
    if args.dual_softmax is not None:
        t2v_ds = retrieval_metrics(dual_softmax(sims, args.dual_softmax), t2v, **kwargs)["t2v"]
        # v2t re-scores with the prior over the video (query) axis: DSL applied to sim.T
        v2t_ds = retrieval_metrics(dual_softmax(np.asarray(sims).T, args.dual_softmax).T, t2v, **kwargs)["v2t"]
        variants["+DSL"] = {"t2v": t2v_ds, "v2t": v2t_ds}
    if args.querybank is not None:
        bank = _load_npy(args.querybank, "query bank", args.mmap)
        if kind != "sims":
            if bank.ndim != 2 or bank.shape[1] != video.shape[1]:
                raise CLIError(f"{args.querybank}: query bank of text embeddings has shape {bank.shape}, expected "
                               f"(num_bank, {video.shape[1]})")
            bank = np.asarray(bank, dtype=np.float64) @ np.asarray(video, dtype=np.float64).T
        qb = querybank_normalize(sims, bank, beta=args.qb_beta, k=args.qb_k)
        variants["+QB-Norm"] = {"t2v": retrieval_metrics(qb, t2v, **kwargs)["t2v"]}
    return variants


def _legacy_report(variants: dict) -> dict:
    """The JSON layout of the matrix-only CLI: metrics, metrics_dual_softmax, metrics_qb_norm."""
    report = {"metrics": variants["plain"]}
    if "+DSL" in variants:
        report["metrics_dual_softmax"] = variants["+DSL"]
    if "+QB-Norm" in variants:
        report["metrics_qb_norm"] = variants["+QB-Norm"]
    return report


def _run_plain(args) -> tuple[dict, str]:
    if args.sims:
        sims = _load_npy(args.sims, "similarity matrix", args.mmap)
        if sims.ndim != 2:
            raise CLIError(f"{args.sims}: similarity matrix has shape {sims.shape}, expected 2-D (num_texts, num_videos)")
        kind, data, shape = "sims", (sims,), sims.shape
    else:
        text, video, _, _ = _load_embeddings(args)
        kind, data, shape = "emb", (text, video), (text.shape[0], video.shape[0])
    t2v = None if args.text_to_video is None else _load_npy(args.text_to_video, "text_to_video")
    variants = _score(kind, data, t2v, args, RECALL_KS)
    report = _legacy_report(variants)
    table = {"t2v": variants["plain"]["t2v"], "v2t": variants["plain"]["v2t"]}
    for name, m in variants.items():
        if name != "plain":
            table.update({f"{d} {name}": m[d] for d in ("t2v", "v2t") if d in m})
    report["shapes"] = {"num_texts": int(shape[0]), "num_videos": int(shape[1]),
                        "captions_per_video": float(shape[0] / shape[1])}
    return report, markdown_table(table)


def _run_benchmark(args) -> tuple[dict, str]:
    from .benchmarks import check_complete, load_benchmark

    if args.data_root is None:
        raise CLIError("--benchmark needs --data-root (the folder with its annotation files)")
    if args.text_to_video is not None:
        raise CLIError("--text-to-video comes from the benchmark; drop it")
    full = load_benchmark(args.benchmark, args.data_root, split=args.split)
    source = _video_source(args)
    split = full if source is None else check_complete(full, source, allow_missing=args.allow_missing)
    given = [n for n in ("sims", "embeddings", "text_emb", "checkpoint") if getattr(args, n)]
    if len(given) != 1:
        raise CLIError("give exactly one of --sims, --embeddings, --text-emb/--video-emb, --checkpoint "
                       f"(got {', '.join('--' + g.replace('_', '-') for g in given) or 'none'})")
    expected = (full.num_texts, full.num_videos)
    position = {v: j for j, v in enumerate(full.video_ids)}

    def kept(part):  # video columns and query rows of ``part`` within the full split
        present = set(part.video_ids)
        return ([position[v] for v in part.video_ids],
                [t for t, j in enumerate(full.text_to_video) if full.video_ids[j] in present])

    keep_videos, keep_rows = kept(split)
    if args.sims:
        sims = _load_npy(args.sims, "similarity matrix", args.mmap)
        _check_shape(sims, expected, args.sims, "sims")
        if split is not full:
            sims = np.asarray(sims)[np.ix_(keep_rows, keep_videos)]
        kind, data = "sims", (sims,)
    elif args.checkpoint:
        kind, data = "emb", embed_from_checkpoint(args, split, source)
    else:
        text, video, ids, path = _load_embeddings(args)
        _check_shape(text, (full.num_texts,), path, "text embeddings")
        if ids is not None:
            if len(ids) != video.shape[0]:
                raise CLIError(f"{path}: {len(ids)} video_ids for {video.shape[0]} video rows")
            if source is None:  # the embeddings themselves say which videos exist
                split = check_complete(full, set(ids), allow_missing=args.allow_missing, where=f"{path} (video_ids)")
                keep_videos, keep_rows = kept(split)
            row = {v: i for i, v in enumerate(ids)}
            lacking = [v for v in split.video_ids if v not in row]
            if lacking:
                raise CLIError(f"{path}: no embedding for {len(lacking)} videos of the split, e.g. {lacking[:5]}")
            video = np.asarray(video)[[row[v] for v in split.video_ids]]
        else:
            _check_shape(video, (full.num_videos,), path, "video embeddings")
            video = np.asarray(video)[keep_videos]
        text = np.asarray(text)[keep_rows]
        kind, data = "emb", (text, video)
    variants = _score(kind, data, split.text_to_video, args, split.recall_ks)
    info = {**split.summary(), "ties": args.ties, "v2t": args.v2t}
    report = {"benchmark": info, "metrics": variants["plain"],
              "metrics_postprocessed": {k: v for k, v in variants.items() if k != "plain"},
              "missing_videos": split.missing}
    return report, benchmark_table(TITLES.get(args.benchmark, args.benchmark), info, variants)


def run(args: argparse.Namespace) -> int:
    from .benchmarks import BenchmarkError

    try:
        if args.benchmark is not None:
            report, table = _run_benchmark(args)
        else:
            if sum(bool(x) for x in (args.sims, args.embeddings, args.text_emb or args.video_emb)) != 1 or \
                    args.checkpoint:
                raise CLIError("give exactly one of --sims, --embeddings, --text-emb/--video-emb "
                               "(--checkpoint needs --benchmark)")
            report, table = _run_plain(args)
    except (OSError, ValueError, BenchmarkError) as err:
        print(f"cmgen eval retrieval: error: {err}", file=sys.stderr)
        return 2
    report["settings"] = {
        "sims": None if args.sims is None else os.path.abspath(args.sims),
        "embeddings": next((os.path.abspath(p) for p in (args.embeddings, args.text_emb) if p), None),
        "checkpoint": None if args.checkpoint is None else os.path.abspath(args.checkpoint),
        "text_to_video": None if args.text_to_video is None else os.path.abspath(args.text_to_video),
        "ties": args.ties, "v2t": args.v2t, "chunk_size": args.chunk_size,
        "dual_softmax_temperature": args.dual_softmax,
        "querybank": None if args.querybank is None else os.path.abspath(args.querybank),
        "qb_beta": args.qb_beta if args.querybank is not None else None,
        "qb_k": args.qb_k if args.querybank is not None else None,
    }
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
    return 0

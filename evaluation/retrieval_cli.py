"""``cmgen eval retrieval --sims S.npy [--text-to-video M.npy] [--out metrics.json]``.

Prints a markdown table of t2v / v2t R@1/5/10, MdR, MnR and writes JSON with the metrics, the settings
and the shapes. ``--dual-softmax TAU`` and ``--querybank BANK.npy`` add re-scored rows, kept under their
own keys because they are transductive (see ``evaluation.retrieval``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .retrieval import RECALL_KS, TIES, V2T_MODES

COLUMNS = [f"R@{k}" for k in RECALL_KS] + ["MdR", "MnR"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sims", required=True, help=".npy similarity matrix (num_texts, num_videos), rows = captions")
    parser.add_argument("--text-to-video", default=None,
                        help=".npy int array (num_texts,): video index of each caption (default: square, i <-> i)")
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
                        help="also report t2v after QB-Norm with this (num_bank, num_videos) bank")
    parser.add_argument("--qb-beta", type=float, default=20.0, help="QB-Norm beta (default 20)")
    parser.add_argument("--qb-k", type=int, default=1, help="QB-Norm top-k of the bank (default 1)")
    parser.add_argument("--out", default=None, help="write metrics + settings + shapes as JSON here")


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """``{"t2v": {...}, ...}`` -> a markdown table with one line per direction."""
    lines = ["| | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.2f}" if c.startswith("R@") else f"{metrics[c]:.1f}"
                                               for c in COLUMNS) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .retrieval import dual_softmax, querybank_normalize, retrieval_metrics

    try:
        sims = np.load(args.sims, mmap_mode="r" if args.mmap else None, allow_pickle=False)
        t2v = None if args.text_to_video is None else np.load(args.text_to_video, allow_pickle=False)
        kwargs = dict(ties=args.ties, v2t=args.v2t, chunk_size=args.chunk_size)
        metrics = retrieval_metrics(sims, t2v, **kwargs)
        table = {"t2v": metrics["t2v"], "v2t": metrics["v2t"]}
        report = {"metrics": metrics}
        if args.dual_softmax is not None:
            t2v_ds = retrieval_metrics(dual_softmax(sims, args.dual_softmax), t2v, **kwargs)["t2v"]
            # v2t re-scores with the prior over the video (query) axis: DSL applied to sim.T
            v2t_ds = retrieval_metrics(dual_softmax(np.asarray(sims).T, args.dual_softmax).T, t2v, **kwargs)["v2t"]
            report["metrics_dual_softmax"] = {"t2v": t2v_ds, "v2t": v2t_ds}
            table.update({"t2v +DSL": t2v_ds, "v2t +DSL": v2t_ds})
        if args.querybank is not None:
            bank = np.load(args.querybank, mmap_mode="r" if args.mmap else None, allow_pickle=False)
            qb = querybank_normalize(sims, bank, beta=args.qb_beta, k=args.qb_k)
            report["metrics_qb_norm"] = {"t2v": retrieval_metrics(qb, t2v, **kwargs)["t2v"]}
            table["t2v +QB-Norm"] = report["metrics_qb_norm"]["t2v"]
    except (OSError, ValueError) as err:
        print(f"cmgen eval retrieval: error: {err}", file=sys.stderr)
        return 2
    num_texts, num_videos = sims.shape
    report["settings"] = {
        "sims": os.path.abspath(args.sims),
        "text_to_video": None if args.text_to_video is None else os.path.abspath(args.text_to_video),
        "ties": args.ties, "v2t": args.v2t, "chunk_size": args.chunk_size,
        "dual_softmax_temperature": args.dual_softmax,
        "querybank": None if args.querybank is None else os.path.abspath(args.querybank),
        "qb_beta": args.qb_beta if args.querybank is not None else None,
        "qb_k": args.qb_k if args.querybank is not None else None,
    }
    report["shapes"] = {"num_texts": int(num_texts), "num_videos": int(num_videos),
                        "captions_per_video": float(num_texts / num_videos)}
    print(markdown_table(table))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0

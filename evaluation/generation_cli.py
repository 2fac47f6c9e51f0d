"""``cmgen eval generation``: FID / KID / IS / R-precision from saved features.

    cmgen eval generation --real real_feats.npy --fake fake_feats.npy [--probs fake_probs.npy] \\
        [--image-emb img.npy --text-emb txt.npy [--text-labels cls.npy]] [--out metrics.json]

Features are ``.npy`` arrays (N, D) (e.g. Inception pool3); ``--real`` may instead be a pytorch-fid
``.npz`` with ``mu`` and ``sigma`` (precomputed reference statistics; FID only, KID needs features).
Each metric runs when its inputs are given; the table goes to stdout and the JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from evaluation import generation as gen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", type=Path, help="real features (N, D) .npy, or pytorch-fid .npz (mu, sigma)")
    parser.add_argument("--fake", type=Path, help="generated features (M, D) .npy")
    parser.add_argument("--probs", type=Path, help="class probabilities of generated images (M, C) .npy, for IS")
    parser.add_argument("--image-emb", type=Path, help="generated image embeddings (N, D) .npy, for R-precision")
    parser.add_argument("--text-emb", type=Path, help="embeddings of their captions (N, D) .npy, for R-precision")
    parser.add_argument("--text-labels", type=Path,
                        help="class id of each caption (N,) .npy; mismatched captions come from other classes")
    parser.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                        help="sqrtm reproduces pytorch-fid; eigh is exact and faster (default: %(default)s)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="default: %(default)s (torch-fidelity)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="must not exceed either set size (default: %(default)s, torch-fidelity)")
    parser.add_argument("--no-kid", action="store_true", help="skip KID even when features are given")
    parser.add_argument("--is-splits", type=int, default=10,
                        help="IS splits (default: %(default)s, the published protocol)")
    parser.add_argument("--rp-candidates", type=int, default=100, help="default: %(default)s (AttnGAN)")
    parser.add_argument("--rp-splits", type=int, default=10, help="default: %(default)s (DM-GAN)")
    parser.add_argument("--seed", type=int, default=0, help="KID subsets and R-precision candidates")
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here")


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    return np.load(path, allow_pickle=False)


def compute(args: argparse.Namespace) -> dict:
    """All metrics whose inputs are given, as a flat dict of floats and ints."""
    if (args.real is None) != (args.fake is None):
        raise ValueError(f"--real and --fake go together, got --real {args.real} --fake {args.fake}")
    if (args.image_emb is None) != (args.text_emb is None):
        raise ValueError(f"--image-emb and --text-emb go together, got {args.image_emb} and {args.text_emb}")
    if args.real is None and args.probs is None and args.image_emb is None:
        raise ValueError("nothing to evaluate: give --real/--fake, --probs or --image-emb/--text-emb")

    metrics: dict = {}
    if args.real is not None:
        fake = _load(args.fake, "--fake")
        if args.real.suffix == ".npz":
            with np.load(args.real) as stats:
                if "mu" not in stats or "sigma" not in stats:
                    raise ValueError(f"{args.real} must hold 'mu' and 'sigma', has {sorted(stats.files)}")
                mu_r, sigma_r = stats["mu"], stats["sigma"]
            real = None
        else:
            real = _load(args.real, "--real")
            mu_r, sigma_r = gen.feature_statistics(real)
        mu_f, sigma_f = gen.feature_statistics(fake)
        metrics["fid"] = gen.frechet_distance(mu_r, sigma_r, mu_f, sigma_f, method=args.fid_method)
        metrics["num_fake"] = int(fake.shape[0])
        if real is not None:
            metrics["num_real"] = int(real.shape[0])
            if not args.no_kid:
                if args.kid_subset_size > min(len(real), len(fake)):
                    raise ValueError(f"--kid-subset-size {args.kid_subset_size} exceeds the smaller feature "
                                     f"set ({len(real)} real, {len(fake)} fake); lower it or pass --no-kid")
                metrics["kid_mean"], metrics["kid_std"] = gen.kid_from_features(
                    real, fake, num_subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed)
    if args.probs is not None:
        probs = _load(args.probs, "--probs")
        metrics["is_mean"], metrics["is_std"] = gen.inception_score(probs, splits=args.is_splits)
    if args.image_emb is not None:
        labels = None if args.text_labels is None else _load(args.text_labels, "--text-labels")
        metrics["r_precision_mean"], metrics["r_precision_std"] = gen.r_precision(
            _load(args.image_emb, "--image-emb"), _load(args.text_emb, "--text-emb"),
            num_candidates=args.rp_candidates, splits=args.rp_splits, labels=labels, seed=args.seed)
    return metrics


def markdown_table(metrics: dict) -> str:
    rows = ["| metric | value | std |", "|---|---:|---:|"]
    if "fid" in metrics:
        rows.append(f"| FID | {metrics['fid']:.4f} | |")
    for key, name, scale in (("kid", "KID (x1e3)", 1e3), ("is", "IS", 1.0), ("r_precision", "R-precision (%)", 100.0)):
        if f"{key}_mean" in metrics:
            rows.append(f"| {name} | {metrics[key + '_mean'] * scale:.4f} | {metrics[key + '_std'] * scale:.4f} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    metrics = compute(args)
    print(markdown_table(metrics))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0

"""``cmgen eval generation``: FID / KID / IS / precision-recall / R-precision, from images or from features.

From a generator (samples the G-EMA, extracts features, compares with a real set)::

    cmgen eval generation --checkpoint runs/contragan-shapes --real DIR|stats.npz --n 50000 \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--out metrics.json] [--markdown m.md]
    cmgen eval generation --checkpoint runs/contragan-shapes --extractor shapes --n 2000   # offline

A text-conditioned generator (XMC-GAN) is sampled from captions of its run's evaluation split
(``--rp-split``, one random caption per image) and also gets R-precision (:mod:`evaluation.rprecision`:
AttnGAN's protocol, 1 true + 99 mismatched captions, with the ``--rp-encoder`` dual encoder, by default
for shapes runs a small one trained on the real shapes captions and labelled not comparable).

From image folders: ``--real DIR --fake DIR``. From saved features (as before)::

    cmgen eval generation --real real_feats.npy --fake fake_feats.npy [--probs fake_probs.npy] \\
        [--image-emb img.npy --text-emb txt.npy [--text-labels cls.npy]] [--out metrics.json]

``--real`` may be a pytorch-fid ``.npz`` with ``mu`` and ``sigma`` (FID only; KID and precision/recall
need features, which a cmgen stats file also holds). Real-set statistics of an image folder are cached
in ``--stats-cache`` (default ``~/.cache/cmgen/fid_stats``) as npz keyed by the folder's file list (names
and sizes) and the extractor (name and weights hash). Every result records the sample count, the seed,
the extractor and its weights; the shapes extractor's numbers are labelled as not comparable with
published FID.

Protocols: FID pytorch-fid; KID torch-fidelity (100 subsets of 1000, cubic kernel); IS 10 splits on the
softmax of the unbiased logits (improved-gan); precision/recall Kynkäänniemi et al. k = 3. With fewer
samples than a protocol needs, the metric is computed with what there is (KID subset size and IS splits
shrink to the sample count) and a warning says so; a metric that cannot be computed at all is skipped
with a warning instead of losing the others.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import generation as gen

_STATS_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("inputs")
    src.add_argument("--real", type=Path,
                     help="real set: image folder, features (N, D) .npy, or .npz statistics (mu, sigma[, features])")
    src.add_argument("--fake", type=Path, help="generated set: image folder or features (M, D) .npy")
    src.add_argument("--checkpoint", type=Path,
                     help="sample this generator (run dir, checkpoint dir or exported folder) instead of --fake")
    src.add_argument("--probs", type=Path, help="class probabilities of generated images (M, C) .npy, for IS")
    src.add_argument("--image-emb", type=Path, help="generated image embeddings (N, D) .npy, for R-precision")
    src.add_argument("--text-emb", type=Path, help="embeddings of their captions (N, D) .npy, for R-precision")
    src.add_argument("--text-labels", type=Path,
                     help="class id of each caption (N,) .npy; mismatched captions come from other classes")
    smp = parser.add_argument_group("sampling (--checkpoint)")
    smp.add_argument("--n", type=int, default=10000, help="generated images (default: %(default)s; papers: 50000)")
    smp.add_argument("--class", dest="class_id", type=int, default=None, help="only this class (default: uniform)")
    smp.add_argument("--which", choices=("latest", "best"), default="latest", help="checkpoint of a run dir")
    smp.add_argument("--live", action="store_true", help="sample the live G instead of the EMA")
    ext = parser.add_argument_group("feature extractor (image inputs)")
    ext.add_argument("--extractor", choices=("inception", "shapes", "resnet50", "vgg16"), default="inception",
                     help="inception = FID Inception-v3 (comparable with papers); shapes = the offline "
                          "shapes classifier (NOT comparable) (default: %(default)s)")
    ext.add_argument("--inception-weights", type=Path, default=None,
                     help="pt_inception-2015-12-05-6726825d.pth (default: $CMGEN_INCEPTION_WEIGHTS)")
    ext.add_argument("--encoder-weights", type=Path, default=None, help="torchvision weight file for resnet50/vgg16")
    ext.add_argument("--shapes-root", type=Path, default=None,
                     help="shapes data root for --extractor shapes (default: the run's data root)")
    ext.add_argument("--random-weights-for-tests", action="store_true",
                     help="random extractor weights: for tests only, the numbers mean nothing")
    ext.add_argument("--batch-size", type=int, default=50, help="default: %(default)s (pytorch-fid's)")
    ext.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading image folders")
    ext.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ext.add_argument("--stats-cache", type=Path, default=None,
                     help="folder of cached real statistics (default: $XDG_CACHE_HOME/cmgen/fid_stats)")
    ext.add_argument("--no-progress", action="store_true")
    met = parser.add_argument_group("metrics")
    met.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                     help="sqrtm reproduces pytorch-fid; eigh is exact and faster (default: %(default)s)")
    met.add_argument("--kid-subsets", type=int, default=100, help="default: %(default)s (torch-fidelity)")
    met.add_argument("--kid-subset-size", type=int, default=1000,
                     help="shrunk to the smaller set with a warning (default: %(default)s, torch-fidelity)")
    met.add_argument("--no-kid", action="store_true", help="skip KID even when features are given")
    met.add_argument("--is-splits", type=int, default=10, help="IS splits (default: %(default)s, the published protocol)")
    met.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    met.add_argument("--pr-k", type=int, default=3, help="precision/recall neighbourhood (default: %(default)s)")
    met.add_argument("--rp-candidates", type=int, default=100, help="default: %(default)s (AttnGAN)")
    met.add_argument("--rp-splits", type=int, default=10, help="default: %(default)s (DM-GAN)")
    met.add_argument("--rp-encoder", default=None,
                     help="R-precision dual encoder of a text-conditioned --checkpoint: a local CLIP folder, or "
                          "'shapes' (default for shapes runs: a small encoder trained once on the real shapes "
                          "captions, NOT comparable with published R-precision)")
    met.add_argument("--rp-split", default="val",
                     help="caption split the images are generated from (default: %(default)s)")
    met.add_argument("--no-rp", action="store_true", help="skip R-precision of a text-conditioned generator")
    met.add_argument("--seed", type=int, default=0, help="sampling, KID subsets and R-precision candidates")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here too")


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    return np.load(path, allow_pickle=False)


def _warn(warns: list[str], msg: str) -> None:
    warns.append(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ metrics


def metrics_from_features(args: argparse.Namespace, *, real: np.ndarray | None, mu_r, sigma_r,
                          fake: np.ndarray | None, probs: np.ndarray | None, warns: list[str]) -> dict:
    """Every metric the given arrays allow; what cannot be computed is skipped with a warning."""
    m: dict[str, Any] = {}
    if fake is not None:
        m["num_fake"] = int(fake.shape[0])
        if fake.shape[0] < 2:
            _warn(warns, f"FID skipped: {fake.shape[0]} generated feature row(s), need >= 2")
        else:
            mu_f, sigma_f = gen.feature_statistics(fake)
            m["fid"] = gen.frechet_distance(mu_r, sigma_r, mu_f, sigma_f, method=args.fid_method)
        if real is not None:
            m["num_real"] = int(real.shape[0])
            small = min(len(real), len(fake))
            if not args.no_kid:
                size = args.kid_subset_size
                if size > small:
                    if small < 2:
                        _warn(warns, f"KID skipped: need >= 2 rows per set, have {len(real)} real, {len(fake)} fake")
                        size = 0
                    else:
                        _warn(warns, f"KID: subset size {size} exceeds the smaller set ({len(real)} real, "
                                     f"{len(fake)} fake); computed with subsets of {small} (the unbiased MMD "
                                     f"estimate keeps its mean, its spread differs from the protocol's)")
                        size = small
                if size:
                    m["kid_mean"], m["kid_std"] = gen.kid_from_features(
                        real, fake, num_subsets=args.kid_subsets, subset_size=size, seed=args.seed)
                    m["kid_subset_size"] = size
            if not args.no_pr:
                if small <= args.pr_k:
                    _warn(warns, f"precision/recall skipped: need more than k={args.pr_k} rows per set")
                else:
                    m["precision"], m["recall"] = gen.precision_recall(real, fake, k=args.pr_k)
        elif not (args.no_kid and args.no_pr):
            _warn(warns, "KID and precision/recall skipped: the real side has statistics only (mu, sigma), no "
                         "features")
    if probs is not None:
        splits = args.is_splits
        if splits > len(probs):
            _warn(warns, f"IS: {splits} splits need >= {splits} samples, have {len(probs)}; using {len(probs)} splits")
            splits = len(probs)
        m["is_mean"], m["is_std"] = gen.inception_score(probs, splits=splits)
        m["is_splits"] = splits
    return m


def compute(args: argparse.Namespace) -> dict:
    """Feature-file mode: all metrics whose inputs are given, as a flat dict (plus ``warnings``)."""
    if (args.real is None) != (args.fake is None):
        raise ValueError(f"--real and --fake go together, got --real {args.real} --fake {args.fake}")
    if (args.image_emb is None) != (args.text_emb is None):
        raise ValueError(f"--image-emb and --text-emb go together, got {args.image_emb} and {args.text_emb}")
    if args.real is None and args.probs is None and args.image_emb is None:
        raise ValueError("nothing to evaluate: give --checkpoint, --real/--fake, --probs or --image-emb/--text-emb")
    warns: list[str] = []
    real = fake = mu_r = sigma_r = None
    if args.real is not None:
        fake = _load(args.fake, "--fake")
        real, mu_r, sigma_r = _real_from_file(args.real)
    probs = None if args.probs is None else _load(args.probs, "--probs")
    metrics = metrics_from_features(args, real=real, mu_r=mu_r, sigma_r=sigma_r, fake=fake, probs=probs, warns=warns)
    if args.image_emb is not None:
        labels = None if args.text_labels is None else _load(args.text_labels, "--text-labels")
        metrics["r_precision_mean"], metrics["r_precision_std"] = gen.r_precision(
            _load(args.image_emb, "--image-emb"), _load(args.text_emb, "--text-emb"),
            num_candidates=args.rp_candidates, splits=args.rp_splits, labels=labels, seed=args.seed)
    if warns:
        metrics["warnings"] = warns
    return metrics


def _real_from_file(path: Path):
    """(features or None, mu, sigma) from a .npy of features or a .npz of statistics."""
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"--real file not found: {path}")
        with np.load(path) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ValueError(f"{path} must hold 'mu' and 'sigma', has {sorted(stats.files)}")
            feats = stats["features"] if "features" in stats else None
            return feats, stats["mu"], stats["sigma"]
    real = _load(path, "--real")
    mu, sigma = gen.feature_statistics(real)
    return real, mu, sigma


# -------------------------------------------------------------------------------------- image mode


def _stats_cache_dir(args: argparse.Namespace | None = None) -> Path:
    if args is not None and args.stats_cache is not None:
        return args.stats_cache
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cmgen" / "fid_stats"


def real_set_key(files: list[Path], root: Path, extractor_info: dict) -> str:
    """sha256 of the folder's file list (relative names and sizes) and the extractor (name, weights hash)."""
    h = hashlib.sha256(f"v{_STATS_VERSION}|{extractor_info.get('extractor')}|{extractor_info.get('sha256')}|"
                       f"{extractor_info.get('fused_bn', '')}".encode())
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


def real_statistics(path: Path, extractor, *, cache_dir: Path, batch_size: int = 50, num_workers: int = 0,
                    progress: bool = True, warns: list[str] | None = None) -> tuple[Any, Any, Any, dict]:
    """(features or None, mu, sigma, provenance) of a real set: a folder (cached), a .npy or a .npz."""
    from evaluation.extractors import extract, list_images

    warns = [] if warns is None else warns
    path = Path(path)
    if not path.is_dir():
        feats, mu, sigma = _real_from_file(path)
        if path.suffix == ".npz":
            _warn(warns, f"real statistics read from {path}: make sure they were computed with the same extractor "
                         f"({extractor.info['network']})")
        return feats, mu, sigma, {"source": str(path)}
    files = list_images(path)
    key = real_set_key(files, path, extractor.info)
    cache = Path(cache_dir) / f"{extractor.info['extractor']}-{key[:24]}.npz"
    prov = {"source": str(path.resolve()), "num_files": len(files), "cache": str(cache), "key": key}
    if cache.is_file():
        with np.load(cache) as f:
            prov["cached"] = True
            return f["features"], f["mu"], f["sigma"], prov
    out = extract(extractor, files, batch_size=batch_size, num_workers=num_workers, statistics=True,
                  progress=progress, desc="real")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, mu=out["mu"], sigma=out["sigma"], features=out["features"],
                 meta=json.dumps({"extractor": extractor.info, "source": str(path.resolve()), "n": out["n"]}))
    os.replace(tmp, cache)
    prov["cached"] = False
    return out["features"], out["mu"], out["sigma"], prov


def shapes_root_of(method, cfg) -> Path | None:
    """The shapes data root a GAN run trained on, or None when it did not train on shapes.

    Asks the method (``data_root()``), else walks up from its training ImageFolder
    (``<root>/imagefolder/train``) to the folder holding the shapes ``dataset_info.json``.
    """
    data = getattr(cfg, "data", None)
    if data is not None and getattr(data, "kind", "shapes") != "shapes":
        return None
    if callable(getattr(method, "data_root", None)):
        return Path(method.data_root())
    dataset = None
    if hasattr(method, "_data"):
        dataset = method._data()[0]
    root = getattr(dataset, "root", None)
    for parent in ([Path(root), *Path(root).parents] if root else []):
        info = parent / "dataset_info.json"
        if info.is_file() and json.loads(info.read_text()).get("dataset") == "shapes":
            return parent
    return None


def evaluate_images(args: argparse.Namespace) -> dict:
    """Image mode: sample ``--checkpoint`` (or read ``--fake DIR``), extract, compare with ``--real``."""
    import torch

    from evaluation.extractors import build_extractor, extract

    warns: list[str] = []
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lg = None
    if args.checkpoint is not None:
        from cmgen.generate_cli import load_generator
        lg = load_generator(args.checkpoint, which=args.which, use_ema=not args.live, device=device)
    shapes_root = args.shapes_root
    text = lg is not None and lg.conditioning == "text"
    run_shapes_root = None
    if (args.extractor == "shapes" or text) and lg is not None and lg.method is not None:
        run_shapes_root = shapes_root_of(lg.method, lg.cfg)
    if args.extractor == "shapes" and shapes_root is None:
        shapes_root = run_shapes_root
        if shapes_root is None:
            raise ValueError("--extractor shapes needs --shapes-root (the generator's run does not name shapes data)")
    if text and lg.method is None:
        raise ValueError(f"{args.checkpoint}: a text-conditioned generator is evaluated on its run's captions; "
                         "pass the run or checkpoint directory, not an exported folder")
    rp_encoder = None
    if text and not args.no_rp:
        from evaluation.rprecision import load_dual_encoder

        if args.rp_encoder is None and run_shapes_root is None:
            _warn(warns, "R-precision skipped: the run did not train on shapes, so there is no default dual "
                         "encoder; pass --rp-encoder PATH (a local CLIP folder)")
        else:
            rp_encoder = load_dual_encoder(args.rp_encoder, shapes_root=run_shapes_root, device=device)
    extractor = build_extractor(args.extractor, inception_weights=args.inception_weights,
                                encoder_weights=args.encoder_weights, shapes_root=shapes_root,
                                random_init_for_tests=args.random_weights_for_tests, device=device)
    if args.real is None:
        if args.extractor != "shapes":
            raise ValueError("--real is required (image folder, features .npy or statistics .npz)")
        args.real = Path(shapes_root) / "train"
    real, mu_r, sigma_r, real_prov = real_statistics(args.real, extractor, cache_dir=_stats_cache_dir(args),
                                                     batch_size=args.batch_size, num_workers=args.num_workers,
                                                     progress=not args.no_progress, warns=warns)
    keep = tuple(k for k in ("features", "probs") if k in extractor.outputs)
    labels: list = []
    image_emb: list = []
    captions = caption_index = None
    if lg is not None:
        from cmgen.generate_cli import sample_images
        from evaluation.rprecision import evaluation_captions, generate_from_captions

        if text:
            if args.class_id is not None:
                raise ValueError("--class does not apply to a text-conditioned generator")
            captions, caption_index = evaluation_captions(lg.method, args.n, split=args.rp_split, seed=args.seed)

        def batches():
            if text:
                source = ((x, None) for x in generate_from_captions(lg, captions, seed=args.seed,
                                                                     batch_size=args.batch_size))
            else:
                source = sample_images(lg, args.n, seed=args.seed, class_id=args.class_id, batch_size=args.batch_size)
            for images, cond in source:
                if isinstance(cond, torch.Tensor):
                    labels.append(cond.cpu())
                if rp_encoder is not None:
                    image_emb.append(rp_encoder.embed_images(images.float().cpu()))
                yield images

        fake_out = extract(extractor, batches(), batch_size=args.batch_size, keep=keep,
                           progress=not args.no_progress, desc="generated")
        generator_info = lg.source
    elif args.fake is not None and args.fake.is_dir():
        fake_out = extract(extractor, args.fake, batch_size=args.batch_size, num_workers=args.num_workers, keep=keep,
                           progress=not args.no_progress, desc="generated")
        generator_info = {"kind": "folder", "path": str(args.fake.resolve())}
    else:
        raise ValueError("image mode needs --checkpoint or --fake DIR")
    probs = fake_out.get("probs")
    metrics = metrics_from_features(args, real=real, mu_r=mu_r, sigma_r=sigma_r, fake=fake_out["features"],
                                    probs=probs, warns=warns)
    if labels and probs is not None and args.extractor == "shapes":
        y = torch.cat(labels).numpy()
        metrics["class_accuracy"] = float((probs.argmax(1) == y).mean())
    rp_info = None
    if rp_encoder is not None:
        # equivalent captions (of the same image) never serve as each other's mismatched candidates
        metrics["r_precision_mean"], metrics["r_precision_std"] = gen.r_precision(
            np.concatenate(image_emb), rp_encoder.embed_texts(captions), num_candidates=args.rp_candidates,
            splits=min(args.rp_splits, len(captions)), labels=caption_index, seed=args.seed)
        rp_info = {**rp_encoder.info, "captions": f"{args.rp_split} split, one random caption per image",
                   "num_candidates": args.rp_candidates,
                   "protocol": "AttnGAN / DM-GAN (evaluation.generation.r_precision)"}
        from evaluation.rprecision import CLIPDualEncoder

        if isinstance(rp_encoder, CLIPDualEncoder):
            # CLIP score of each image with the caption it was generated from (w = 100, as torchmetrics)
            from evaluation.extractors import clip_score

            metrics["clip_score"] = clip_score(np.concatenate(image_emb), rp_encoder.embed_texts(captions))
    result: dict[str, Any] = {
        "metrics": metrics, "num_fake": int(fake_out["n"]), "seed": args.seed, "extractor": extractor.info,
        "real": real_prov, "generator": generator_info, "protocol": {
            "fid": f"pytorch-fid ({args.fid_method})", "kid": f"torch-fidelity, {args.kid_subsets} subsets",
            "is": "softmax of unbiased logits, contiguous splits", "precision_recall": f"Kynkaenniemi et al. k={args.pr_k}"},
        "warnings": warns}
    if rp_info is not None:
        result["r_precision"] = rp_info
    if extractor.info.get("random_init"):
        result["note"] = "RANDOM extractor weights (test only): these numbers mean nothing"
    elif args.extractor == "shapes":
        result["note"] = extractor.info["note"]
    elif args.extractor != "inception":
        result["note"] = f"{extractor.info['network']} features: not comparable with published FID"
    return result


# ------------------------------------------------------------------------------------------- output


def markdown_table(metrics: dict) -> str:
    rows = ["| metric | value | std |", "|---|---:|---:|"]
    if "fid" in metrics:
        rows.append(f"| FID | {metrics['fid']:.4f} | |")
    for key, name, scale in (("kid", "KID (x1e3)", 1e3), ("is", "IS", 1.0), ("r_precision", "R-precision (%)", 100.0)):
        if f"{key}_mean" in metrics:
            rows.append(f"| {name} | {metrics[key + '_mean'] * scale:.4f} | {metrics[key + '_std'] * scale:.4f} |")
    for key, name in (("precision", "precision"), ("recall", "recall"), ("class_accuracy", "class accuracy"),
                      ("clip_score", "CLIP score (w = 100)")):
        if key in metrics:
            rows.append(f"| {name} | {metrics[key]:.4f} | |")
    return "\n".join(rows)


def result_markdown(result: dict) -> str:
    lines = [markdown_table(result["metrics"]), ""]
    ext = result["extractor"]
    lines.append(f"- extractor: {ext['network']}; weights {ext['weights']} (sha256 {str(ext.get('sha256'))[:16]}...)")
    lines.append(f"- generated: {result['num_fake']} images, seed {result['seed']}, from {result['generator']}")
    lines.append(f"- real: {result['real'].get('source')} ({result['metrics'].get('num_real', 'statistics only')} rows)")
    if "note" in result:
        lines.append(f"- **note: {result['note']}**")
    if "r_precision" in result:
        rp = result["r_precision"]
        lines.append(f"- R-precision: {rp['encoder']} (sha256 {str(rp.get('sha256'))[:16]}...), {rp['num_candidates']} "
                     f"candidates, {rp['captions']}" + (f"; real val images score {rp['real_val_r_precision']:.3f}"
                                                        if rp.get("real_val_r_precision") is not None else ""))
        if rp.get("note"):
            lines.append(f"- **note: {rp['note']}**")
    for w in result["warnings"]:
        lines.append(f"- warning: {w}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    image_mode = args.checkpoint is not None or (args.real is not None and args.real.is_dir()) or \
        (args.fake is not None and args.fake.is_dir())
    if image_mode:
        result = evaluate_images(args)
        text = result_markdown(result)
    else:
        result = compute(args)
        text = markdown_table(result)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0

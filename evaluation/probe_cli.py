"""``cmgen eval probe CONFIG [key=value ...] [--checkpoint CKPT] [--cache FEATS.safetensors] [--out probe.json]``.

Linear probe and weighted kNN (k = 1 and 20 by default, cosine, temperature 0.07) on frozen,
clip-averaged features of a fine-tune config's train and test videos (``configs/finetune/*.yaml``: its
``data`` section chooses the dataset, split, clip length, crop and clips per video; its ``model``
section the backbone). The encoder is ``--checkpoint`` (else ``model.init_from``; neither: random
initialisation, the baseline). ``--cache`` keeps the features: a later call with the same checkpoint
file, data settings and videos reads them instead of decoding again (labels always come from the
split files, so ``data.label_field=digit`` on moving digits reuses a direction-label cache).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

COLUMNS_HELP = "kNN top-1 for each --k, linear-probe top-1 for each --wd, chance (majority class)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a fine-tune config (configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--checkpoint", default=None,
                        help="RUN/checkpoints/step_N, RUN, or an official .pth.tar (default: model.init_from)")
    parser.add_argument("--random-init", action="store_true", help="ignore model.init_from (random-init baseline)")
    parser.add_argument("--cache", default=None, help="safetensors file for the features (read when it matches)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 20], help="kNN neighbours (default 1 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    parser.add_argument("--wd", type=float, nargs="+", default=[1e-4], help="linear-probe L2 weights (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=4, help="videos per forward batch")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--out", default=None, help="write the metrics and settings as JSON here")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _fingerprint(path: str | None) -> dict:
    if path is None:
        return {"checkpoint": None}
    p = Path(path).resolve()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for q in files:
        st = q.stat()
        h.update(f"{q.relative_to(p) if p.is_dir() else q.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return {"checkpoint": str(p), "checkpoint_files": h.hexdigest()}


def features_for(cfg, checkpoint: str | None, cache: str | None, batch_size: int = 4, num_workers: int = 0,
                 device: str = "cpu", log=print) -> dict:
    """``{"train_features", "train_labels", "test_features", "test_labels"}`` for a fine-tune config,
    read from ``cache`` when its metadata matches, else computed (and written to ``cache``)."""
    import dataclasses

    import torch

    from evaluation.probe import clip_features, load_features, save_features
    from video.backbones import build_backbone
    from video.finetune import _strip_projection, build_action_dataset, load_pretrained_encoder

    d, m = cfg.data, cfg.model
    sets = {s: build_action_dataset(d, train_split=(s == "train"), augment=False,
                                    clips_per_video=d.test_clips_per_video) for s in ("train", "test")}
    data_settings = {k: v for k, v in dataclasses.asdict(d).items() if k not in ("label_field", "eval_videos",
                                                                                  "eval_batch_videos")}
    meta = {"data": data_settings, "backbone": m.backbone, "backbone_width": m.backbone_width,
            "init_model": m.init_model, **_fingerprint(checkpoint),
            "videos": {s: [rel for rel, _ in ds.samples] for s, ds in sets.items()}}
    meta = json.loads(json.dumps(meta))                # tuples -> lists, as read back
    labels = {f"{s}_labels": torch.tensor(ds.targets) for s, ds in sets.items()}
    if cache is not None and Path(cache).is_file():
        tensors, cached = load_features(cache)
        if cached == meta:
            log(f"features read from {cache}")
            return {"train_features": tensors["train_features"], "test_features": tensors["test_features"], **labels}
        log(f"{cache} holds features of other settings; recomputing")
    encoder = _strip_projection(build_backbone(m.backbone, 8, m.backbone_width))
    if checkpoint is not None:
        report = load_pretrained_encoder(encoder, checkpoint, m.init_model, m.allow_missing, m.allow_unexpected)
        log(f"loaded {len(report['loaded'])} tensors from {checkpoint}")
    encoder.to(device)
    out = {}
    for s, ds in sets.items():
        out[f"{s}_features"], _ = clip_features(encoder, ds, batch_size, num_workers, device)
    if cache is not None:
        save_features(cache, out, meta)
    return {**out, **labels}


def run(args: argparse.Namespace) -> int:
    from cmgen.config import ConfigError
    from cmgen.engine.registry import load_config
    from evaluation.probe import probe_report
    from video.finetune import FinetuneConfig

    try:
        cfg = load_config(args.config, args.overrides)
        if not isinstance(cfg, FinetuneConfig):
            raise ValueError(f"{args.config}: cmgen eval probe needs a fine-tune config (method: finetune), "
                             f"got method {cfg.method!r}")
        checkpoint = None if args.random_init else (args.checkpoint or cfg.model.init_from)
        feats = features_for(cfg, checkpoint, args.cache, args.batch_size, args.num_workers, args.device,
                             log=lambda s: print(s, file=sys.stderr))
        metrics = probe_report(feats, args.k, args.temperature, args.wd)
    except (OSError, ValueError, ConfigError) as err:
        print(f"cmgen eval probe: error: {err}", file=sys.stderr)
        return 2
    print("| metric | top-1 (%) |\n|---|---|")
    for name, value in metrics.items():
        print(f"| {name} | {value:.2f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        report = {"metrics": metrics, "settings": {"config": os.path.abspath(args.config), "overrides": args.overrides,
                                                   "checkpoint": checkpoint, "k": args.k,
                                                   "temperature": args.temperature, "weight_decays": args.wd},
                  "shapes": {s: list(feats[f"{s}_features"].shape) for s in ("train", "test")}}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0

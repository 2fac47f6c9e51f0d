"""``cmgen eval probe CONFIG [key=value ...] [--checkpoint CKPT] [--cache FEATS.safetensors] [--out probe.json]``
and ``cmgen eval probe --gan-checkpoint RUN [--random-init] [--data-root SHAPES] [--protocol lbfgs|official]
[--out probe.json]``.

Linear probe and weighted kNN (k = 1 and 20 by default, cosine, temperature 0.07) on frozen,
clip-averaged features of a fine-tune config's train and test videos (``configs/finetune/*.yaml``: its
``data`` section chooses the dataset, split, clip length, crop and clips per video; its ``model``
section the backbone). The encoder is ``--checkpoint`` (else ``model.init_from``; neither: random
initialisation, the baseline). ``--cache`` keeps the features: a later call with the same checkpoint
file, data settings and videos reads them instead of decoding again (labels always come from the
split files, so ``data.label_field=digit`` on moving digits reuses a direction-label cache).

``--gan-checkpoint RUN`` (a GAN run directory or checkpoint; no config argument): the frozen backbone
features of its discriminator (``out.features``: ContraD's backbone output, ContraGAN's ReLU-sum-pooled
last map) on a shapes data root's ``train`` images (probe training set) and ``val`` images (test set),
class = primary shape; ``--data-root`` defaults to the shapes data the run trained on. ``--random-init``
builds the same D from the run's config and seed without loading its weights (the baseline). This is
ContraD's linear evaluation of D (jh-jeong/ContraD 4ac8ce5 ``test_lineval.py``: a linear layer on the
frozen ``penultimate`` features, D in eval mode). ``--protocol lbfgs`` (default): the deterministic
L-BFGS probe on un-augmented, cached features (:func:`evaluation.probe.linear_probe`) plus the weighted
kNN. ``--protocol official``: the official training of that layer (:func:`evaluation.probe.official_lineval`:
plain SGD lr 0.1, MultiStepLR x0.1 at epochs 60/75/90, 100 epochs (``--lineval-epochs``), batch 256,
SupContrast's random resized crop (0.2, 1) + flip on the training images every epoch, ``--seed``),
reported as ``linear_official_top1`` (last epoch). The table goes to stdout as markdown; ``--out
X.json`` also writes ``X.md``.
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
    parser.add_argument("config", nargs="?", default=None,
                        help="a fine-tune config (configs/finetune/*.yaml); not with --gan-checkpoint")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--checkpoint", default=None,
                        help="RUN/checkpoints/step_N, RUN, or an official .pth.tar (default: model.init_from)")
    parser.add_argument("--random-init", action="store_true",
                        help="ignore model.init_from / the GAN checkpoint's weights (random-init baseline)")
    parser.add_argument("--gan-checkpoint", default=None, metavar="RUN",
                        help="probe the discriminator of a GAN run (run dir or checkpoint) on shapes images")
    parser.add_argument("--data-root", default=None,
                        help="shapes data root for --gan-checkpoint (default: the run's shapes data)")
    parser.add_argument("--protocol", choices=("lbfgs", "official"), default="lbfgs",
                        help="with --gan-checkpoint: 'lbfgs' (kNN + L-BFGS logistic regression on cached, "
                             "un-augmented features; default) or 'official' (ContraD test_lineval.py: SGD lr 0.1, "
                             "MultiStepLR 60/75/90 x0.1, 100 epochs, batch 256, crop + flip every epoch)")
    parser.add_argument("--lineval-epochs", type=int, default=100,
                        help="epochs of --protocol official (default 100, the official; milestones scale with it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --protocol official (order, crops, init)")
    parser.add_argument("--cache", default=None, help="safetensors file for the features (read when it matches)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 20], help="kNN neighbours (default 1 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    parser.add_argument("--wd", type=float, nargs="+", default=[1e-4], help="linear-probe L2 weights (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="videos (default 4) or images (default 256) per forward batch")
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


def load_discriminator(source: str, *, data_root: str | None = None, random_init: bool = False,
                       device: str = "cpu", log=print) -> tuple:
    """``(extract, splits, settings)`` for a GAN run (``source``: run dir or checkpoint): ``extract`` maps
    ``(B, 3, H, W)`` images in [0, 1] to the frozen D's ``out.features`` (D in eval mode, fed images in G's
    output range); ``splits`` = ``{"train": (images, shape labels), "test": (...)}`` from the shapes
    data root's train / val images (module docstring)."""
    from pathlib import Path

    import torch

    from cmgen.engine.checkpoint import load_model_state
    from cmgen.engine.registry import load_config, resolve_method
    from cmgen.generate_cli import resolve_checkpoint
    from evaluation.generation_cli import shapes_root_of
    from evaluation.shapes_eval import load_split

    ckpt = resolve_checkpoint(source)
    cfg = load_config(ckpt / "config.yaml")
    method = resolve_method(cfg.method)(cfg)
    torch.manual_seed(cfg.run.seed)
    models = method.build_models(cfg)
    if "d" not in models:
        raise ValueError(f"method {cfg.method!r} of {ckpt} has no discriminator model 'd' (models: {list(models)})")
    d = models["d"]
    if not random_init:
        d.load_state_dict(load_model_state(ckpt, "d"))
        log(f"loaded D from {ckpt}")
    d.to(device).eval()
    if data_root is None:
        data_root = shapes_root_of(method, cfg)
        if data_root is None:
            raise ValueError(f"{source}: its run did not train on shapes data; pass --data-root")
    root = Path(data_root)
    image_size = int(getattr(cfg.model, "image_size", 32))
    lo, hi = getattr(method, "output_range", (-1.0, 1.0))
    num_classes = int(getattr(method, "num_classes", 0) or 0)

    @torch.no_grad()
    def extract(x01: torch.Tensor) -> torch.Tensor:
        x = lo + (hi - lo) * x01                     # D sees images in G's output range
        y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if num_classes else None
        out = d(x, y) if y is not None else d(x)
        if not hasattr(out, "features"):
            raise ValueError(f"the discriminator of method {cfg.method!r} returns no .features")
        return out.features

    splits = {}
    for name, split in (("train", "train"), ("test", "val")):
        images, targets, _ = load_split(root, split, image_size)
        splits[name] = (images, targets["shape"])
    settings = {"gan_checkpoint": str(ckpt.resolve()), "method": cfg.method, "random_init": random_init,
                "data_root": str(root.resolve()), "splits": {"train": "train", "test": "val"}, "label": "shape"}
    return extract, splits, settings


def discriminator_features(source: str, *, data_root: str | None = None, random_init: bool = False,
                           batch_size: int = 256, device: str = "cpu", log=print) -> tuple[dict, dict]:
    """``({"train_features", "train_labels", "test_features", "test_labels"}, settings)``: the frozen
    discriminator features of a GAN run (``source``: run dir or checkpoint) on a shapes data root's
    train / val images, class = primary shape (module docstring)."""
    from evaluation.probe import image_features

    extract, splits, settings = load_discriminator(source, data_root=data_root, random_init=random_init,
                                                   device=device, log=log)
    out = {}
    for name, (images, labels) in splits.items():
        out[f"{name}_features"] = image_features(extract, images, batch_size, device)
        out[f"{name}_labels"] = labels
    return out, settings


def official_gan_lineval(source: str, *, data_root: str | None = None, random_init: bool = False,
                         epochs: int = 100, seed: int = 0, batch_size: int = 256, device: str = "cpu",
                         log=print) -> tuple[dict, dict]:
    """``(metrics, settings)`` of ContraD's own linear evaluation (:func:`evaluation.probe.official_lineval`)
    of a GAN run's frozen D on the shapes train / val images; ``metrics``: ``linear_official_top1`` (last
    epoch), ``linear_official_train_top1`` and ``chance``."""
    from evaluation.probe import chance_accuracy, official_lineval

    extract, splits, settings = load_discriminator(source, data_root=data_root, random_init=random_init,
                                                   device=device, log=log)
    (tr_x, tr_y), (te_x, te_y) = splits["train"], splits["test"]
    res = official_lineval(extract, tr_x, tr_y, te_x, te_y, epochs=epochs, batch_size=batch_size, seed=seed,
                           device=device)
    metrics = {"linear_official_top1": res["top1"], "linear_official_train_top1": res["train_top1"],
               "chance": chance_accuracy(tr_y, te_y)}
    settings = {**settings, "protocol": "official", "num_train": int(tr_x.shape[0]), "num_test": int(te_x.shape[0]),
                "lineval": {k: v for k, v in res.items() if k not in ("top1", "train_top1")}}
    return metrics, settings


def _markdown(metrics: dict, title: str) -> str:
    rows = "".join(f"| {name} | {value:.2f} |\n" for name, value in metrics.items())
    return f"{title}\n\n| metric | top-1 (%) |\n|---|---|\n{rows}"


def _run_gan(args: argparse.Namespace) -> int:
    from cmgen.config import ConfigError
    from evaluation.probe import probe_report

    try:
        if args.config is not None or args.overrides:
            raise ValueError(f"--gan-checkpoint takes no config or overrides, got {[args.config, *args.overrides]}")
        log = lambda s: print(s, file=sys.stderr)
        if args.protocol == "official":
            metrics, settings = official_gan_lineval(args.gan_checkpoint, data_root=args.data_root,
                                                     random_init=args.random_init, epochs=args.lineval_epochs,
                                                     seed=args.seed, batch_size=args.batch_size or 256,
                                                     device=args.device, log=log)
            dim = settings["lineval"]["feature_dim"]
            shapes = {"train": [settings["num_train"], dim], "test": [settings["num_test"], dim]}
        else:
            feats, settings = discriminator_features(args.gan_checkpoint, data_root=args.data_root,
                                                     random_init=args.random_init, batch_size=args.batch_size or 256,
                                                     device=args.device, log=log)
            metrics = probe_report(feats, args.k, args.temperature, args.wd)
            shapes = {s: list(feats[f"{s}_features"].shape) for s in ("train", "test")}
    except (OSError, ValueError, ConfigError) as err:
        print(f"cmgen eval probe: error: {err}", file=sys.stderr)
        return 2
    which = "random-init D" if args.random_init else "trained D"
    md = _markdown(metrics, f"Probe of the frozen {settings['method']} discriminator features ({which}, "
                            f"{settings['gan_checkpoint']}), class = shape, "
                            f"{shapes['train'][0]} train / {shapes['test'][0]} test images"
                            + (", ContraD's official linear evaluation (SGD, augmented)" if args.protocol == "official"
                               else ""))
    print(md, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        extra = ({} if args.protocol == "official" else
                 {"k": args.k, "temperature": args.temperature, "weight_decays": args.wd})
        report = {"metrics": metrics, "settings": {**settings, "protocol": args.protocol, **extra}, "shapes": shapes}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(md)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.gan_checkpoint is not None:
        return _run_gan(args)
    from cmgen.config import ConfigError
    from cmgen.engine.registry import load_config
    from evaluation.probe import probe_report
    from video.finetune import FinetuneConfig

    try:
        if args.config is None:
            raise ValueError("give a fine-tune config, or --gan-checkpoint RUN")
        cfg = load_config(args.config, args.overrides)
        if not isinstance(cfg, FinetuneConfig):
            raise ValueError(f"{args.config}: cmgen eval probe needs a fine-tune config (method: finetune), "
                             f"got method {cfg.method!r}")
        checkpoint = None if args.random_init else (args.checkpoint or cfg.model.init_from)
        feats = features_for(cfg, checkpoint, args.cache, args.batch_size or 4, args.num_workers, args.device,
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

"""``cmgen generate``: images from a trained generator (a run, a checkpoint or an exported folder).

    cmgen generate runs/contragan-shapes --n 64 --class 3 --seed 0 --out grid.png
    cmgen generate exported/contragan --n 16 --out-dir samples/        # one PNG per image
    cmgen generate exported/xmcgan --prompt "a small red circle in the center" --n 8 --out grid.png

The source is resolved by :func:`load_generator`:

- an **exported folder** (``cmgen export``): diffusers ``config.json`` + safetensors weights and
  ``cmgen_generator.json`` naming the generator's ``module:Class``; loaded with ``from_pretrained``;
- a **checkpoint** directory (``checkpoints/step_NNNNNN``) or a **run** directory (its newest
  checkpoint, or ``--which best``): the method is rebuilt from the checkpoint's saved ``config.yaml``
  through the method registry, and the generator gets the EMA weights (``ema/g``; the live G with
  ``--live`` or when the run kept no EMA).

Sampling is deterministic in ``--seed`` and independent of the batch size: all noise comes from one
CPU ``torch.Generator`` (``z`` for all n images first, then the labels when no ``--class`` is given),
and G runs in eval mode (BN running statistics), so a run and its export give the same images.

Generators plug in through a small protocol (diffusers ``ModelMixin`` generators of this project
implement it): ``config.z_dim``, ``config.num_classes`` (0 = unconditional), ``config.output_range``,
``sample_latents(n, generator)`` and ``forward(z, cond)`` with ``cond`` = labels ``(B,)``, None, or, for
a generator whose config has ``conditioning == "text"``, the prompts: ``encode_prompts(list[str])``
when the generator defines it, else the list of strings itself.

XMC-GAN (``text2image.xmcgan.XMCGenerator``, text-conditioned on word + sentence features) samples
through :class:`text2image.pipeline.XMCGANPipeline`: from a run, the pipeline is built from the EMA
generator and the run's own frozen text encoder (``text.*`` of its config); its export
(``cmgen export``) is that pipeline's ``save_pretrained`` folder (``model_index.json``, ``generator/``,
``text_encoder/``, ``tokenizer/``) plus ``cmgen_generator.json``, and a plain ``XMCGANPipeline`` folder
loads too. The z of every image still comes from the one ``--seed`` generator, so a run and its export
give the same images.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

__all__ = ["EXPORT_META", "LoadedGenerator", "load_generator", "resolve_checkpoint", "sample_images",
           "sample_tensors", "quiet_progress_bars", "add_arguments", "run"]

EXPORT_META = "cmgen_generator.json"


@dataclass
class LoadedGenerator:
    """A generator ready to sample: model in eval mode plus what sampling needs to know."""

    g: nn.Module
    output_range: tuple[float, float]
    num_classes: int
    conditioning: str                      # "class" | "text" | "none"
    z_dim: int
    source: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    method: Any = None
    cfg: Any = None
    pipeline: Any = None                   # an XMCGANPipeline for text-to-image GANs with word features

    @property
    def device(self) -> torch.device:
        return next(self.g.parameters()).device

    def latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if hasattr(self.g, "sample_latents"):
            return self.g.sample_latents(n, generator=generator)
        return torch.randn(n, self.z_dim, generator=generator)

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        lo, hi = self.output_range
        return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def _config_get(g: nn.Module, name: str, default: Any = None) -> Any:
    cfg = getattr(g, "config", None)
    if cfg is not None and name in cfg:
        return cfg[name]
    return getattr(g, name, default)


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory from a checkpoint, a run directory (``which`` = latest | best) or a
    ``checkpoints/`` folder."""
    from cmgen.engine.checkpoint import STATE_FILE, latest_checkpoint

    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if which == "best":
        best = root / "best"
        target = None
        if best.is_symlink() or best.is_dir():
            target = best.resolve()
        elif (root / "best.json").is_file():
            target = root / json.loads((root / "best.json").read_text())["checkpoint"]
        if target is None or not (target / STATE_FILE).is_file():
            raise ValueError(f"{path} has no 'best' checkpoint ({best} missing or dangling); train with "
                             f"eval.fid_every > 0 or use --which latest")
        return target
    if which != "latest":
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise ValueError(f"no complete checkpoint under {root} (expected a run directory, its checkpoints/ "
                         f"folder, a checkpoints/step_NNNNNN directory or an exported generator folder)")
    return ckpt


def _import(spec: str, where: Path):
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where} names class {spec!r}, which cannot be imported: {e}") from e


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No diffusers / transformers progress bars while loading or saving a pipeline (the CLI prints its own
    line); warnings, e.g. transformers' report of missing weights, still show."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def _pipeline_generator(pipe, source: dict[str, Any]) -> LoadedGenerator:
    g = pipe.generator.eval()
    return LoadedGenerator(g, (0.0, 1.0), 0, "text", int(g.config.z_dim), source, pipeline=pipe)


def _load_exported(folder: Path, device: torch.device) -> LoadedGenerator:
    meta = json.loads((folder / EXPORT_META).read_text())
    source = {**meta.get("source", {}), "kind": "export", "path": str(folder)}
    if meta.get("pipeline"):
        with quiet_progress_bars():
            pipe = _import(meta["pipeline"], folder / EXPORT_META).from_pretrained(str(folder)).to(device)
        return _pipeline_generator(pipe, source)
    g = _import(meta["class"], folder / EXPORT_META).from_pretrained(str(folder)).to(device).eval()
    return LoadedGenerator(g, tuple(meta["output_range"]), int(meta["num_classes"]), meta["conditioning"],
                           int(meta["z_dim"]), source, meta.get("class_names"))


def _load_pipeline_folder(folder: Path, device: torch.device) -> LoadedGenerator:
    """A diffusers ``save_pretrained`` folder of an :class:`~text2image.pipeline.XMCGANPipeline`."""
    from text2image.pipeline import XMCGANPipeline

    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if name != XMCGANPipeline.__name__:
        raise ValueError(f"{folder} holds a diffusers {name} pipeline; cmgen generate samples XMCGANPipeline folders "
                         f"and cmgen export folders")
    with quiet_progress_bars():
        pipe = XMCGANPipeline.from_pretrained(str(folder)).to(device)
    return _pipeline_generator(pipe, {"kind": "pipeline", "path": str(folder)})


def _text_pipeline(method: Any, g: nn.Module):
    """The XMCGANPipeline of a run's generator and the frozen text encoder the method trained it with."""
    from text2image.pipeline import XMCGANPipeline
    from text2image.xmcgan import XMCGenerator

    text = getattr(method, "text", None)
    if not isinstance(g, XMCGenerator) or text is None:
        return None
    return XMCGANPipeline.from_text_encoder(g, text)


def checkpoint_generator_state(ckpt: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The generator's state dict as the checkpoint stores it (EMA or live weights), buffers included.

    ``eval()`` of a spectral-norm generator refreshes its ``u``, ``v`` from these; ``cmgen export`` saves
    these rather than the refreshed ones, so that loading the export and calling ``eval()`` runs the same
    power iterations from the same start and samples exactly what the checkpoint samples.
    """
    from cmgen.engine.checkpoint import load_ema_state, load_model_state

    return load_ema_state(ckpt, "g") if ema else load_model_state(ckpt, "g")


def _load_from_checkpoint(ckpt: Path, device: torch.device, use_ema: bool) -> LoadedGenerator:
    from cmgen.engine.checkpoint import read_engine_state
    from cmgen.engine.registry import load_config, resolve_method

    cfg = load_config(ckpt / "config.yaml")
    method = resolve_method(cfg.method)(cfg)
    with quiet_progress_bars():     # a text encoder loads from its local folder here
        models = method.build_models(cfg)
    if "g" not in models:
        raise ValueError(f"method {cfg.method!r} of {ckpt} has no generator model 'g' (models: {list(models)})")
    g = models["g"]
    state = read_engine_state(ckpt)
    ema = use_ema and "ema/g" in state["custom"]
    g.load_state_dict(checkpoint_generator_state(ckpt, ema))
    g = g.to(device).eval()
    num_classes = int(_config_get(g, "num_classes", getattr(method, "num_classes", 0) or 0) or 0)
    conditioning = _config_get(g, "conditioning", None) or ("class" if num_classes > 0 else "none")
    output_range = tuple(float(v) for v in getattr(method, "output_range", _config_get(g, "output_range", (-1, 1))))
    z_dim = int(_config_get(g, "z_dim", getattr(getattr(cfg, "model", None), "z_dim", 0)))
    class_names = getattr(method, "class_names", None)
    if class_names is None and num_classes and hasattr(method, "_data"):
        try:
            class_names = list(method._data()[1])
        except Exception:  # class names are a nicety for the export; sampling does not need them
            class_names = None
    source = {"kind": "checkpoint", "checkpoint": str(ckpt.resolve()), "step": int(state["step"]),
              "method": cfg.method, "weights": "ema" if ema else "live"}
    pipe = _text_pipeline(method, g) if conditioning == "text" else None
    if pipe is not None:
        pipe.to(device)
    return LoadedGenerator(g, output_range, num_classes, conditioning, z_dim, source, class_names, method, cfg, pipe)


def load_generator(path: str | Path, *, which: str = "latest", use_ema: bool = True,
                   device: torch.device | str = "cpu") -> LoadedGenerator:
    """Load a generator from an exported folder, a checkpoint or a run directory (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"generator source not found: {path}")
    device = torch.device(device)
    if (path / EXPORT_META).is_file():
        return _load_exported(path, device)
    if (path / "model_index.json").is_file():
        return _load_pipeline_folder(path, device)
    return _load_from_checkpoint(resolve_checkpoint(path, which), device, use_ema)


@torch.no_grad()
def sample_images(lg: LoadedGenerator, n: int, *, seed: int = 0, class_id: int | None = None,
                  prompts: Sequence[str] | None = None, batch_size: int = 64
                  ) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield ``(images (B, 3, H, W) in [0, 1] on G's device, conditions of the batch)`` for n images.

    The conditions are labels ``(B,)`` (class-conditional), prompts (text) or None. Latents and labels
    come from ``seed``; so does any randomness drawn inside the generator's forward (StyleGAN2 noise), per
    batch, so such generators give the same images for the same seed and ``batch_size``; generators
    without it also give the same images at any ``batch_size``.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    gen = torch.Generator().manual_seed(int(seed))
    z = lg.latents(n, gen)
    cond: Any = None
    if lg.conditioning == "text":
        if not prompts:
            raise ValueError(f"this generator ({type(lg.g).__name__}) is text-conditioned: pass --prompt")
        cond = [prompts[i % len(prompts)] for i in range(n)]
    elif prompts:
        raise ValueError(f"--prompt given, but the generator ({type(lg.g).__name__}) is not text-conditioned "
                         f"(conditioning={lg.conditioning!r})")
    elif lg.num_classes > 0:
        if class_id is None:
            cond = torch.randint(lg.num_classes, (n,), generator=gen)
        elif not 0 <= class_id < lg.num_classes:
            names = f" ({', '.join(lg.class_names)})" if lg.class_names else ""
            raise ValueError(f"--class {class_id} out of range: the generator has {lg.num_classes} classes{names}")
        else:
            cond = torch.full((n,), int(class_id), dtype=torch.long)
    elif class_id is not None:
        raise ValueError("--class given, but the generator is unconditional")
    device = lg.device
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    for lo in range(0, n, batch_size):
        zb = z[lo:lo + batch_size].to(device)
        # randomness inside G (StyleGAN2's per-pixel noise) comes from the global RNG: seed it per batch
        # from (seed, first index) in a forked RNG state, so the caller's RNG is untouched and the same
        # seed and batch size give the same images
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(int(seed) * 1_000_003 + lo)
            if isinstance(cond, torch.Tensor):
                cb: Any = cond[lo:lo + batch_size].to(device)
                out = lg.g(zb, cb)
            elif isinstance(cond, list):
                cb = cond[lo:lo + batch_size]
                if lg.pipeline is not None:
                    out = lg.pipeline(cb, latents=zb, output_type="pt").images
                else:
                    out = lg.g(zb, lg.g.encode_prompts(cb) if hasattr(lg.g, "encode_prompts") else cb)
            else:
                cb = None
                out = lg.g(zb, None)
        yield lg.to_unit(out), cb


@torch.no_grad()
def sample_tensors(lg: LoadedGenerator, n: int, *, seed: int = 0, batch_size: int = 100
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All of :func:`sample_images`'s batches on the CPU: ``(images (n, 3, H, W) in [0, 1], labels (n,)``
    for a class-conditional generator, else ``None)``; classes drawn uniformly from ``seed``."""
    images, labels = [], []
    for batch, cond in sample_images(lg, n, seed=seed, batch_size=batch_size):
        images.append(batch.cpu())
        if isinstance(cond, torch.Tensor):
            labels.append(cond.cpu())
    return torch.cat(images), (torch.cat(labels) if labels else None)


# --------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="exported generator folder, run directory or checkpoint directory")
    parser.add_argument("--n", type=int, default=64, help="number of images (default: %(default)s)")
    parser.add_argument("--class", dest="class_id", type=str, default=None,
                        help="class index or name for every image (default: classes drawn at random)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="caption for a text-conditioned generator (repeatable; cycled over the n images)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=None, help="write one grid PNG here (default: samples.png)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write one PNG per image into this folder")
    parser.add_argument("--nrow", type=int, default=None,
                        help="grid columns (default: one column per --prompt when several are given, else sqrt(n))")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--which", choices=("latest", "best"), default="latest",
                        help="checkpoint of a run directory (default: %(default)s)")
    parser.add_argument("--live", action="store_true", help="use the live G weights instead of the EMA")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _class_index(lg: LoadedGenerator, value: str | None) -> int | None:
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    if lg.class_names and value in lg.class_names:
        return lg.class_names.index(value)
    raise ValueError(f"--class {value!r} is neither an index nor one of the class names {lg.class_names}")


def run(args: argparse.Namespace) -> int:
    import torchvision.utils as vutils

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lg = load_generator(args.source, which=args.which, use_ema=not args.live, device=device)
    images = []
    for batch, _ in sample_images(lg, args.n, seed=args.seed, class_id=_class_index(lg, args.class_id),
                                  prompts=args.prompt, batch_size=args.batch_size):
        images.append(batch.cpu())
    images = torch.cat(images)
    out = args.out if args.out is not None or args.out_dir is not None else Path("samples.png")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        # the prompts cycle over the images, so with one column per prompt each column is one caption
        nrow = args.nrow or (len(args.prompt) if args.prompt and len(args.prompt) > 1
                             else int(math.ceil(math.sqrt(len(images)))))
        vutils.save_image(images, out, nrow=nrow, padding=2)
        print(f"wrote {out} ({len(images)} images, seed {args.seed}, from {lg.source.get('checkpoint', args.source)})")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            vutils.save_image(im, args.out_dir / f"{i:05d}.png")
        print(f"wrote {len(images)} PNGs to {args.out_dir}")
    return 0

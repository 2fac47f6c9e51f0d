"""``cmgen export RUN --out DIR``: a run's generator (EMA weights) as a diffusers model folder.

    cmgen export runs/contragan-shapes --out exported/contragan-shapes
    cmgen generate exported/contragan-shapes --n 64 --out grid.png

The folder holds what ``ModelMixin.save_pretrained`` writes (``config.json`` with the generator's
constructor arguments, ``diffusion_pytorch_model.safetensors``) plus ``cmgen_generator.json``: the
generator's ``module:Class`` (so :func:`cmgen.generate_cli.load_generator` knows what to import), its
output range, conditioning, class names and where the weights came from (run, checkpoint, step,
EMA or live). Anyone can also load it directly: ``Generator.from_pretrained(DIR)``.

A text-to-image run with word features (XMC-GAN) exports its whole
:class:`text2image.pipeline.XMCGANPipeline` instead (``save_pretrained``: ``model_index.json``,
``generator/``, ``text_encoder/``, ``tokenizer/``; ``cmgen_generator.json`` then also names the
pipeline class): ``XMCGANPipeline.from_pretrained(DIR)(["a red circle"], generator=g).images``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cmgen.generate_cli import EXPORT_META, checkpoint_generator_state, load_generator, quiet_progress_bars

__all__ = ["export_generator", "add_arguments", "run"]


def export_generator(source: str | Path, out: str | Path, *, which: str = "latest", use_ema: bool = True,
                     overwrite: bool = False) -> Path:
    """Write the generator of ``source`` (run or checkpoint directory) to ``out``; returns ``out``."""
    from diffusers.models.modeling_utils import ModelMixin

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    lg = load_generator(source, which=which, use_ema=use_ema, device="cpu")
    if lg.source.get("kind") in ("export", "pipeline"):
        raise ValueError(f"{source} is already an exported generator folder")
    if not isinstance(lg.g, ModelMixin):
        raise ValueError(f"the generator of {source} ({type(lg.g).__module__}.{type(lg.g).__qualname__}) is not a "
                         f"diffusers ModelMixin, so it cannot be saved with save_pretrained")
    # the checkpoint's own buffers, not those eval() refreshed on loading: the export's eval() refreshes
    # spectral-norm u, v from the same start, so it samples what the checkpoint samples
    lg.g.load_state_dict(checkpoint_generator_state(Path(lg.source["checkpoint"]), lg.source["weights"] == "ema"))
    cls = type(lg.g)
    meta = {"format": 1, "class": f"{cls.__module__}:{cls.__qualname__}", "output_range": list(lg.output_range),
            "num_classes": lg.num_classes, "conditioning": lg.conditioning, "z_dim": lg.z_dim,
            "class_names": lg.class_names, "source": lg.source}
    if lg.pipeline is not None:
        with quiet_progress_bars():
            lg.pipeline.save_pretrained(str(out), safe_serialization=True)
        pcls = type(lg.pipeline)
        meta["pipeline"] = f"{pcls.__module__}:{pcls.__qualname__}"
    else:
        lg.g.save_pretrained(str(out), safe_serialization=True)
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output folder (diffusers save_pretrained layout)")
    parser.add_argument("--which", choices=("latest", "best"), default="latest",
                        help="checkpoint of a run directory (default: %(default)s)")
    parser.add_argument("--live", action="store_true", help="export the live G weights instead of the EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    out = export_generator(args.source, args.out, which=args.which, use_ema=not args.live, overwrite=args.overwrite)
    meta = json.loads((out / EXPORT_META).read_text())
    what = meta.get("pipeline") or meta["class"]
    print(f"exported {what} ({meta['source'].get('weights')} weights, step {meta['source'].get('step')}) to {out}")
    return 0

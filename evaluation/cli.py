"""``cmgen eval retrieval|generation ...``: each kind lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib

KINDS = {
    "retrieval": ("evaluation.retrieval_cli", "R@K / MdR / MnR of a benchmark split from a similarity matrix, saved embeddings or a checkpoint"),
    "generation": ("evaluation.generation_cli",
                   "FID / KID / IS / precision-recall / R-precision of a generator checkpoint, image folders "
                   "or saved features"),
    "probe": ("evaluation.probe_cli", "linear probe and kNN on frozen features: a video encoder checkpoint (clip-averaged) or a GAN discriminator (--gan-checkpoint)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, (module, help_text) in KINDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_eval_module=module)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._eval_module).run(args) or 0)

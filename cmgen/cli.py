"""The ``cmgen`` command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``cmgen data`` does not pay for importing the
training stack. The same entry point serves ``cmgen ...``, ``python -m cmgen ...``,
``accelerate launch -m cmgen ...`` and ``torchrun -m cmgen ...``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("cmgen.engine.train_cli", "train a method from a YAML config: cmgen train CONFIG [key=value ...]"),
    "data": ("cmgen.data.cli", "write the embedded synthetic datasets (shapes, moving-digits)"),
    "eval": ("evaluation.cli", "evaluate: cmgen eval retrieval|generation ..."),
    "generate": ("cmgen.generate_cli", "images from a run, checkpoint or exported generator: cmgen generate SRC --n 64 --out grid.png"),
    "export": ("cmgen.export_cli", "a run's generator (EMA) as a diffusers save_pretrained folder: cmgen export RUN --out DIR"),
    "demo": ("cmgen.demo", "build the embedded data, train each subsystem briefly, write runs/demo/report.md"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="cmgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``cmgen train CONFIG [key=value ...]`` — the same command under ``accelerate launch`` and ``torchrun``.

Options and ``key=value`` overrides may come in any order (``cmgen train C --output-dir D a=1``). Errors
in the config, the overrides or the data end in one line (see :mod:`cmgen.cli`).
"""
from __future__ import annotations

import argparse
import os
import sys

from cmgen.config import ConfigError, to_yaml

EXTRA_POSITIONALS = "overrides"   # cmgen.cli: key=value items after options go here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/toy/synthetic.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="nested overrides (optim.lr=1e-3 train.max_steps=10); resume=latest continues")
    parser.add_argument("--output-dir", default=None, help="root of run directories (same as run.output_dir=)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    from cmgen.engine.registry import load_config

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)   # ConfigError / FileNotFoundError: one line in cmgen.cli
    except ConfigError as e:
        if str(e).startswith(("override ", str(args.config))):
            raise
        raise ConfigError(f"{args.config}: {e}") from e   # a key or value of the file itself
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    from cmgen.engine.trainer import NonFiniteLossError, train
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        print(f"cmgen train: stopped: {e}", file=sys.stderr)
        return 3
    if _is_main():
        where = result.checkpoint if result.checkpoint is not None else result.run_dir
        print(f"cmgen train: finished at step {result.step}; {where}")
    return 0

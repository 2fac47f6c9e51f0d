"""``cmgen train CONFIG [key=value ...]`` — the same command under ``accelerate launch`` and ``torchrun``."""
from __future__ import annotations

import argparse
import os
import sys

from cmgen.config import ConfigError, to_yaml


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
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        if _is_main():
            print(f"cmgen train: {e}", file=sys.stderr)
        return 2
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

"""The ``cmgen`` command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``cmgen data`` does not pay for importing the
training stack. The same entry point serves ``cmgen ...``, ``python -m cmgen ...``,
``accelerate launch -m cmgen ...`` and ``torchrun -m cmgen ...``.

Errors in what the user gave (a config, an override, a data path, an input file, a checkpoint) end in
one line, ``cmgen: error: <message>``, and exit status 2; ``--debug`` (anywhere on the command line)
shows the traceback instead. A failed collective of a multi-process run (a peer rank hung past
``train.collective_timeout_s`` or died, :class:`cmgen.errors.CollectiveError`) is one line too, on each
rank that saw it, with exit status 1, and that process ends with ``os._exit`` once its output is flushed
(:func:`entry`): a process group whose peer died leaves gloo/NCCL threads that abort the interpreter's
shutdown ("terminate called without an active exception", status -6) if normal exit runs their
destructors. Checkpoints and trackers are closed before the error reaches the CLI. A module may name the destination of its ``key=value`` positionals in
``EXTRA_POSITIONALS``; then such items are accepted after options too (``cmgen train C --output-dir D
a=1``).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import pickle
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
EXIT_USER_ERROR = 2
EXIT_COLLECTIVE_ERROR = 1
# What counts as a problem with the user's input rather than a bug: cmgen.errors.UserError (ConfigError,
# DataError, CheckpointError, ...), file-system errors on the paths given, and the ValueErrors (including
# json.JSONDecodeError) and parse errors that loaders raise for malformed files.
_INPUT_ERRORS = (OSError, ValueError, pickle.UnpicklingError, csv.Error, EOFError)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (whitespace runs, newlines included, become one space)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


# set by main() when a CollectiveError ended the command; entry() then skips interpreter shutdown
_collective_failed = False


def entry() -> None:
    """``cmgen`` / ``python -m cmgen``: exit with :func:`main`'s status.

    After a failed collective, and after any other error in a multi-process run (``WORLD_SIZE`` > 1), the
    process leaves with ``os._exit`` (streams and logging flushed first; trackers and checkpoints are
    already closed by the engine): a process group whose peer has already exited can abort interpreter
    shutdown from its C++ threads with SIGABRT ("terminate called without an active exception") and
    replace the documented status (1, or 2 for a failed checkpoint write agreed by every rank) with -6.
    Seen on the CI machine for a killed peer and for a peer whose checkpoint write failed. A successful
    run exits normally. :func:`main` itself returns (or, with ``--debug``, raises), so it stays callable
    in-process (tests, notebooks).
    """
    from cmgen.errors import CollectiveError

    distributed = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    try:
        code = main()
    except Exception as err:                # --debug: the traceback, then the same hard exit
        if not (distributed or isinstance(err, CollectiveError)):
            raise
        import traceback

        traceback.print_exc()
        code, failed = EXIT_COLLECTIVE_ERROR, True
    else:
        failed = _collective_failed or (code != 0 and distributed)
    if failed:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    global _collective_failed
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="cmgen", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    if extra:
        dest = getattr(module, "EXTRA_POSITIONALS", None)
        misplaced = [a for a in extra if a.startswith("-") or "=" not in a]
        if dest is None or misplaced:
            parser.error(f"unrecognized arguments: {' '.join(misplaced or extra)}")
        setattr(args, dest, list(getattr(args, dest) or []) + extra)
    args.debug = debug
    if debug:
        return int(importlib.import_module(args._module).run(args) or 0)
    from cmgen.errors import CollectiveError, UserError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("cmgen: interrupted", file=sys.stderr)
        return 130
    except CollectiveError as err:          # the message names this rank; the peers print their own
        print(f"cmgen: error: {one_line(err)}", file=sys.stderr)
        _collective_failed = True
        return EXIT_COLLECTIVE_ERROR
    except (UserError, *_INPUT_ERRORS) as err:
        if isinstance(err, UserError) and _rank() != 0:
            return EXIT_USER_ERROR          # the same message on every rank: rank 0 prints it
        where = f"[rank {_rank()}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        hint = "" if isinstance(err, (UserError, OSError)) else " (cmgen --debug ... shows the traceback)"
        print(f"cmgen: error: {where}{one_line(err)}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    entry()

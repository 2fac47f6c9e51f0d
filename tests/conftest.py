"""Shared fixtures: CUDA-only tests skip without a GPU; the reference toy runs of the multi-process tests.

``@pytest.mark.cuda`` (registered in setup.cfg) marks a test that needs CUDA; without a CUDA device it
is skipped with that reason (``pytest -m cuda`` on a GPU machine runs exactly these: scripts/gpu_check.sh).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (@pytest.mark.cuda); no CUDA device here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_two_process_run(tmp_path_factory):
    """The toy method for ``TOY_DIST`` steps in 2 gloo processes (torchrun), with per-step dumps."""
    from tests.multiproc import TOY_CONFIG, TOY_DIST, launch

    return launch(TOY_CONFIG, TOY_DIST, out_dir=tmp_path_factory.mktemp("toy2"), name="two", dump=True).check()


@pytest.fixture(scope="session")
def toy_one_process_run(tmp_path_factory):
    """The same run in this process (1 process, the same global batch), with per-step dumps."""
    from cmgen.engine import load_config, train
    from cmgen.engine.probe import DUMP_ENV
    from tests.multiproc import QUIET, TOY_CONFIG, TOY_DIST

    out = tmp_path_factory.mktemp("toy1")
    saved = os.environ.get(DUMP_ENV)
    os.environ[DUMP_ENV] = str(out / "one-dump")
    try:
        train(load_config(TOY_CONFIG, [f"run.output_dir={out}", "run.name=one", *QUIET, *TOY_DIST]))
    finally:
        if saved is None:
            os.environ.pop(DUMP_ENV)
        else:
            os.environ[DUMP_ENV] = saved
    return Path(out / "one"), out / "one-dump"

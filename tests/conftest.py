"""Shared fixtures: CUDA-only tests skip without a GPU; the embedded data outside the checkout; the
reference toy runs of the multi-process tests.

``@pytest.mark.cuda`` (registered in setup.cfg) marks a test that needs CUDA; without a CUDA device it
is skipped with that reason (``pytest -m cuda`` on a GPU machine runs exactly these: scripts/gpu_check.sh).

Embedded data: for the whole session ``$CMGEN_DATA`` points at a temporary directory, so methods that
write cmgen's embedded datasets on first use (and the ``torchrun`` children of the multi-process tests,
which inherit the environment) never write ``./data`` into the checkout. A test about the default
location itself (``data/`` under the current directory) requests :func:`default_data_location`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_ENV = "CMGEN_DATA"  # cmgen.data.common.DATA_ENV (not imported here: conftest stays import-light)

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (@pytest.mark.cuda); no CUDA device here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def embedded_data_store(tmp_path_factory):
    """``$CMGEN_DATA`` = one temporary directory for the session (autouse: before any other fixture)."""
    saved = os.environ.get(DATA_ENV)
    store = tmp_path_factory.mktemp("cmgen-data")
    os.environ[DATA_ENV] = str(store)
    try:
        yield store
    finally:
        if saved is None:
            os.environ.pop(DATA_ENV, None)
        else:
            os.environ[DATA_ENV] = saved


@pytest.fixture
def default_data_location(tmp_path, monkeypatch):
    """Opt-out of the session store: ``$CMGEN_DATA`` unset and the current directory ``tmp_path``, so the
    embedded data goes where a user's would, ``./data`` (returned: ``tmp_path / "data"``)."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"


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


# 2-step generator runs shared by the export/generate and generation-evaluation tests (one each per session)
GAN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "contragan" / "shapes.yaml"
XMC_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "xmcgan" / "shapes.yaml"


def train_tiny_gan(out: Path, overrides: list[str] = ()) -> Path:
    """2 steps of the ContraGAN shapes config (EMA on from step 0) under ``out``, one checkpoint; the run
    directory."""
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    cfg = load_config(GAN_CONFIG, [f"run.output_dir={out}", "run.name=tiny", "train.max_steps=2",
                                   "train.sample_every=0", "train.checkpoint_every=2", "train.log_every=1",
                                   "train.progress_bar=false", "train.trackers=[]", "data.num_images=64",
                                   "gan.n_dis=1", "train.batch_size=8", "ema.start_step=0", *overrides])
    return train(cfg).run_dir


@pytest.fixture(scope="session")
def tiny_gan_run(tmp_path_factory):
    """2 steps of the ContraGAN shapes config (its DCGAN backbone), one checkpoint."""
    return train_tiny_gan(tmp_path_factory.mktemp("gan"))


@pytest.fixture(scope="session")
def tiny_xmcgan_run(tmp_path_factory):
    """2 steps of the XMC-GAN shapes config with a tiny random text encoder and tiny widths."""
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    out = tmp_path_factory.mktemp("xmcgan")
    cfg = load_config(XMC_CONFIG, [f"run.output_dir={out}", "run.name=tiny", "train.max_steps=2", "train.sample_every=0",
                                   "train.checkpoint_every=2", "train.log_every=1", "train.progress_bar=false",
                                   "train.trackers=[]", "data.num_images=48", "train.batch_size=8",
                                   "gan.samples_per_class=2", "text.random_init=true", "text.cache=null",
                                   "model.gf_dim=4", "model.df_dim=4", "model.z_dim=8"])
    return train(cfg).run_dir

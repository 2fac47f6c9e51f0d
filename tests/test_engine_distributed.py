"""``accelerate launch`` with 2 gloo processes ends with the same parameters as 1 process, by default.

(torchrun: tests/test_multiprocess_methods.py, which also compares every step; here the checkpoint
files as a whole, through Accelerate's own launcher.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmgen.engine import train
from cmgen.engine.checkpoint import read_engine_state
from tests.test_engine import QUIET, ROOT, TOY, assert_same, checkpoint_contents, toy_cfg

# Global batch 32 in 2 accumulation micro-batches: 2 processes x 8 samples vs 1 process x 16 samples.
# (Accumulation itself is not neutral for the toy: its second update sees the first only on the last
# micro-batch, as in any multi-update step, so both sides accumulate the same way.)
COMMON = ["train.grad_accum=2", "train.max_steps=8", "train.batch_size=32", "train.checkpoint_every=4", "train.keep_last=1",
          "data.num_samples=96", "data.aug_noise=0.1", "ema.start_step=2", "schedule.warmup_steps=2", "train.log_every=4"]
BIN = Path(sys.executable).parent

LAUNCHERS = {
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cmgen", "train"],
}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    return train(toy_cfg(root, "one", *COMMON)).checkpoint


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one_process(tmp_path, launcher, single_process_run):
    if not shutil.which(LAUNCHERS[launcher][0]):
        pytest.skip(f"{launcher} is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [TOY, f"run.output_dir={tmp_path}", "run.name=two", *QUIET, *COMMON]
    proc = subprocess.run(LAUNCHERS[launcher] + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "checkpoints" / "step_000008"

    one_state, two_state = read_engine_state(single_process_run), read_engine_state(two)
    assert two_state["world_size"] == 2 and one_state["world_size"] == 1
    # 96 samples = 3 steps per epoch: step 8 ends 2 steps (64 samples) into epoch 2.
    assert two_state["data"] == one_state["data"] == {"epoch": 2, "batch": 4, "samples": 64}
    assert sorted(p.name for p in two.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]

    # Models (with queue buffers), optimizers, schedulers, EMA and method state; reduction order differs.
    skip = ("config.yaml", "engine_state.json", "random_states_0.pkl", "random_states_1.pkl")
    assert_same(checkpoint_contents(single_process_run, skip), checkpoint_contents(two, skip),
                exact=False, rtol=1e-5, atol=1e-6)


def test_default_data_seeding_gives_one_process_the_same_augmented_batch_as_two():
    """The default (``train.data_seeding=sample``) seeds every sample by its position in the epoch, so
    the union of the ranks' micro-batches is the single-process micro-batch, augmentation included."""
    from cmgen.config import TrainConfig
    from cmgen.engine.data import ResumableLoader
    from cmgen.engine.toy import SyntheticRegression

    assert TrainConfig().data_seeding == "sample"
    data = SyntheticRegression(24, 3, 2, aug_noise=0.5, seed=0)
    take = lambda loader: [b for b, _ in zip(loader, range(8))]  # noqa: E731  (crosses an epoch boundary)
    one = take(ResumableLoader(data, 6, 0, 1, seed=2))
    two = [take(ResumableLoader(data, 6, r, 2, seed=2)) for r in range(2)]
    for b in range(8):
        assert torch.equal(one[b]["x"], torch.cat([two[0][b]["x"], two[1][b]["x"]]))
    batch = [take(ResumableLoader(data, 6, r, 2, seed=2, seeding="batch")) for r in range(2)]
    assert not torch.equal(one[0]["x"], torch.cat([batch[0][0]["x"], batch[1][0]["x"]]))  # per-rank seeds differ

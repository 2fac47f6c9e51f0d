"""cmgen.engine: run outputs, exact resume (in-process and after kill -9), NaN guard, schedules, EMA, data."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmgen import cli
from cmgen.config import from_yaml
from cmgen.engine import (EMA, LRMultiplier, NonFiniteLossError, list_checkpoints, load_config, load_ema_state,
                          load_model_state, train)
from cmgen.engine.checkpoint import read_engine_state
from cmgen.engine.data import ResumableLoader
from cmgen.engine.toy import SyntheticRegression, ToyConfig

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy" / "synthetic.yaml")
QUIET = ["train.progress_bar=false", "train.trackers=[]", "train.sample_every=0", "train.eval_every=0"]


def toy_cfg(tmp_path, name, *overrides):
    return load_config(TOY, [f"run.output_dir={tmp_path}", f"run.name={name}", *QUIET, *overrides])


# ---------------------------------------------------------------------------------------------------
# checkpoint comparison helpers
# ---------------------------------------------------------------------------------------------------
def _load_any(path: Path):
    if path.suffix == ".json":
        state = json.loads(path.read_text())
        state.pop("time")
        return state
    if path.suffix == ".yaml":
        return path.read_text()
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_contents(ckpt: Path, skip=("config.yaml",)) -> dict:
    return {p.name: _load_any(p) for p in sorted(ckpt.iterdir()) if p.name not in skip}


def assert_same(a, b, where="", exact=True, rtol=1e-5, atol=1e-6):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}", exact, rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", exact, rtol, atol)
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, where
        if exact:
            assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, float) and not exact:
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------------
# a run and its outputs
# ---------------------------------------------------------------------------------------------------
def test_run_writes_config_metrics_tensorboard_samples_and_keeps_last_checkpoints(tmp_path):
    cfg = toy_cfg(tmp_path, "out", "train.max_steps=6", "train.log_every=2", "train.checkpoint_every=2",
                  "train.keep_last=2", "train.sample_every=3", "train.eval_every=3", "train.trackers=[tensorboard]",
                  "ema.start_step=2")
    result = train(cfg)
    run = tmp_path / "out"
    assert result.run_dir == run and result.step == 6 and result.checkpoint == run / "checkpoints" / "step_000006"

    assert from_yaml(ToyConfig, run / "config.yaml") == cfg
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss_enc" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert {"loss_head", "lr/enc", "lr/head", "grad_norm/enc", "steps_per_sec", "epoch"} <= set(train_records[0])
    assert all(math.isfinite(r["loss_enc"]) for r in train_records)
    assert [r["step"] for r in records if "eval/val_mse" in r] == [3, 6]
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]

    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 6]        # keep_last=2
    state = read_engine_state(result.checkpoint)
    assert state["step"] == 6 and state["models"] == ["enc", "head"] and state["optimizers"] == ["enc", "head"]
    assert state["custom"] == ["scheduler/enc", "scheduler/head", "ema/enc", "method/stats"]
    # 256 samples / 32 per step = 8 steps per epoch: after 6 steps, epoch 0, 6 batches in.
    assert state["data"] == {"epoch": 0, "batch": 6, "samples": 192}
    assert from_yaml(ToyConfig, result.checkpoint / "config.yaml") == cfg
    enc = load_model_state(result.checkpoint, "enc")
    ema = load_ema_state(result.checkpoint, "enc")
    assert enc.keys() == ema.keys() and not torch.equal(enc["net.0.weight"], ema["net.0.weight"])
    assert "queue" in load_model_state(result.checkpoint, "head")

    with pytest.raises(ValueError, match="already has checkpoints.*resume=latest"):
        train(cfg)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_checkpoints(tmp_path, precision):
    result = train(toy_cfg(tmp_path, precision, f"train.mixed_precision={precision}", "train.max_steps=3",
                           "train.log_every=3"))
    assert result.step == 3 and math.isfinite(result.metrics["loss_enc"])
    assert read_engine_state(result.checkpoint)["step"] == 3


def test_bad_global_batch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=30 .*world_size \* grad_accum = 1 \* 4"):
        train(toy_cfg(tmp_path, "bad", "train.batch_size=30", "train.grad_accum=4", "train.max_steps=1"))


# ---------------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------------
RESUME_OVERRIDES = ["train.max_steps=7", "train.checkpoint_every=3", "train.keep_last=null", "train.batch_size=16",
                    "train.grad_accum=2", "data.num_samples=40", "model.input_noise=0.1", "data.aug_noise=0.1",
                    "train.sample_every=2", "train.eval_every=2", "train.log_every=1", "ema.start_step=2",
                    "schedule.warmup_steps=2"]


def test_resume_latest_continues_bitwise_like_an_uninterrupted_run(tmp_path):
    """Mid-epoch, mid-schedule, with accumulation, per-process noise, augmentation, EMA, queue buffers."""
    full = train(toy_cfg(tmp_path, "full", *RESUME_OVERRIDES))
    assert [s for s, _ in list_checkpoints(tmp_path / "full" / "checkpoints")] == [3, 6, 7]

    # The same run, cut after its step-3 checkpoint, with a half-written checkpoint left behind.
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for step in (6, 7):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step_{step:06d}")
    half = tmp_path / "cut" / "checkpoints" / ".tmp-step6"
    half.mkdir()
    (half / "pytorch_model.bin").write_bytes(b"truncated")
    resumed = train(toy_cfg(tmp_path, "cut", *RESUME_OVERRIDES, "resume=latest"))

    assert not half.exists()
    assert resumed.step == 7
    assert_same(checkpoint_contents(full.checkpoint), checkpoint_contents(resumed.checkpoint))
    # The log is cut back to the checkpoint and continues with the same values.
    drop = ("time", "steps_per_sec")
    lines = [[{k: v for k, v in json.loads(line).items() if k not in drop}
              for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("full", "cut")]
    assert lines[0] == lines[1]


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    result = train(toy_cfg(tmp_path, "fresh", "train.max_steps=2", "resume=latest"))
    assert result.step == 2 and result.checkpoint.name == "step_000002"


def _wait_for(path_glob, root: Path, timeout: float, proc) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(root.glob(path_glob)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (rc={proc.returncode}) before {path_glob} appeared")
        time.sleep(0.005)
    raise AssertionError(f"{path_glob} did not appear within {timeout} s")


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = [f"run.output_dir={tmp_path}", *QUIET, "train.max_steps=100", "train.checkpoint_every=10",
              "train.keep_last=2", "model.hidden=128", "train.batch_size=64", "data.num_samples=1000",
              "model.input_noise=0.1", "train.log_every=5"]
    cmd = [sys.executable, "-m", "cmgen", "train", TOY]
    quiet = dict(env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    whole = subprocess.Popen(cmd + common + ["run.name=whole"], **quiet)   # the uninterrupted reference
    proc = subprocess.Popen(cmd + common + ["run.name=killed"], **quiet)
    try:
        _wait_for("killed/checkpoints/step_*", tmp_path, 120, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = [s for s, _ in list_checkpoints(tmp_path / "killed" / "checkpoints")]
    assert done and done[-1] < 100, f"the run was not interrupted: {done}"

    subprocess.run(cmd + common + ["run.name=killed", "resume=latest"], check=True, timeout=300, **quiet)
    assert whole.wait(timeout=300) == 0
    a = checkpoint_contents(tmp_path / "whole" / "checkpoints" / "step_000100")
    b = checkpoint_contents(tmp_path / "killed" / "checkpoints" / "step_000100")
    assert_same(a, b)


# ---------------------------------------------------------------------------------------------------
# NaN/Inf guard
# ---------------------------------------------------------------------------------------------------
def test_nan_guard_names_term_and_step_and_keeps_last_checkpoint(tmp_path, capsys):
    args = ["train", TOY, f"run.output_dir={tmp_path}", "run.name=diverge", *QUIET, "optim.name=sgd", "optim.lr=3",
            "train.grad_clip=null", "schedule.kind=constant", "schedule.warmup_steps=0", "train.max_steps=30",
            "train.checkpoint_every=2"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    m = re.search(r"loss term '(loss_enc|loss_head)' is (nan|inf) at step (\d+); last good checkpoint: (\S+)", err)
    assert m, err
    step, ckpt = int(m.group(3)), Path(m.group(4))
    ckpts = list_checkpoints(tmp_path / "diverge" / "checkpoints")
    assert ckpts and ckpts[-1][1] == ckpt and ckpts[-1][0] <= step < 30
    assert not list((tmp_path / "diverge" / "checkpoints").glob(".tmp-*"))
    for name in ("enc", "head"):
        assert all(torch.isfinite(t).all() for t in load_model_state(ckpt, name).values())

    with pytest.raises(NonFiniteLossError, match=r"loss term '\w+' is (nan|inf) at step \d+"):
        train(toy_cfg(tmp_path, "diverge", "optim.name=sgd", "optim.lr=3", "train.grad_clip=null",
                      "schedule.kind=constant", "schedule.warmup_steps=0", "train.max_steps=30", "resume=latest"))


def test_cli_reports_config_errors(capsys):
    assert cli.main(["train", TOY, "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# schedules, EMA, data order
# ---------------------------------------------------------------------------------------------------
def test_lr_multiplier_warmup_cosine_step():
    f = LRMultiplier("cosine", max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [f(t) for t in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(10) == pytest.approx(1.0) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)                                 # half-way: cos(pi/2) = 0
    g = LRMultiplier("step", max_steps=100, milestones=[30, 60], gamma=0.5)
    assert [g(29), g(30), g(59), g(60), g(99)] == [1.0, 0.5, 0.5, 0.25, 0.25]
    assert LRMultiplier("constant", 10)(7) == 1.0
    with pytest.raises(ValueError, match="schedule kind"):
        LRMultiplier("linear", 10)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRMultiplier("cosine", 4, warmup_steps=2))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.0])                                # warm-up, then cos(0), cos(pi/2)


def test_ema_matches_float64_reference():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, start_step=2)
    ref = [p.detach().double().clone() for p in model.parameters()]
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        for i, p in enumerate(model.parameters()):
            ref[i] = p.detach().double().clone() if step <= 2 else 0.9 * ref[i] + 0.1 * p.detach().double()
    for r, p in zip(ref, ema.module.parameters()):
        torch.testing.assert_close(p.double(), r, rtol=1e-6, atol=1e-6)
    other = EMA(torch.nn.Linear(3, 2))
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and all(torch.equal(a, b) for a, b in zip(other.module.parameters(), ema.module.parameters()))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("seeding", ["sample", "batch"])
def test_loader_splits_global_batch_across_ranks_and_resumes_exactly(seeding):
    data = SyntheticRegression(20, 3, 2, aug_noise=0.5, seed=0)
    # global micro-batch 4 -> 5 per epoch; 7 batches cross an epoch boundary.
    single = _take(ResumableLoader(data, 4, 0, 1, seed=3, seeding=seeding), 7)
    ranks = [_take(ResumableLoader(data, 4, r, 2, seed=3, seeding=seeding), 7) for r in range(2)]
    for b in range(7):
        assert torch.equal(single[b]["y"], torch.cat([ranks[0][b]["y"], ranks[1][b]["y"]]))   # same samples
        same_aug = torch.equal(single[b]["x"], torch.cat([ranks[0][b]["x"], ranks[1][b]["x"]]))
        assert same_aug == (seeding == "sample")                  # per-sample seeds ignore the world size
    loader = ResumableLoader(data, 4, 0, 1, seed=3, seeding=seeding)
    _take(loader, 3)
    assert loader.state_dict() == {"epoch": 0, "batch": 3, "samples": 12}
    rest = _take(ResumableLoader(data, 4, 0, 1, seed=3, epoch=0, batch=3, seeding=seeding), 4)
    for a, b in zip(single[3:], rest):
        assert torch.equal(a["x"], b["x"])
    # Workers see the same seeds as the main process.
    workers = _take(ResumableLoader(data, 4, 0, 1, seed=3, seeding=seeding, num_workers=2), 7)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(single, workers))
    # Loading data does not consume the caller's RNG.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _take(ResumableLoader(data, 4, 0, 1, seed=3, seeding=seeding), 2)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        ResumableLoader(data, 32, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------------------
# a checkpoint write that fails (disk full, read-only directory)
# ---------------------------------------------------------------------------------------------------
def test_failed_checkpoint_write_keeps_the_previous_one_and_says_where_and_why(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    from cmgen.errors import CheckpointError

    cfg = toy_cfg(tmp_path, "full", "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=1")
    real_save = Accelerator.save_state
    calls = []

    def disk_full_on_second(self, output_dir, **kw):
        calls.append(output_dir)
        if len(calls) == 2:     # a partial file, then the disk is full
            (Path(output_dir) / "pytorch_model.bin").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_on_second)
    root = tmp_path / "full" / "checkpoints"
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert str(root / ".tmp-step4") in message and "No space left on device" in message
    assert f"previous checkpoint {root / 'step_000002'} is intact" in message
    assert [s for s, _ in list_checkpoints(root)] == [2] and not list(root.glob(".*"))  # keep_last did not prune
    before = checkpoint_contents(root / "step_000002")

    monkeypatch.setattr(Accelerator, "save_state", real_save)
    resumed = train(toy_cfg(tmp_path, "full", "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=1",
                            "resume=latest"))
    assert resumed.step == 4
    whole = train(toy_cfg(tmp_path, "whole", "train.max_steps=4", "train.checkpoint_every=2"))
    assert_same(checkpoint_contents(whole.checkpoint), checkpoint_contents(resumed.checkpoint))
    assert before["engine_state.json"]["step"] == 2


def test_cli_reports_a_failed_checkpoint_write_in_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from cmgen.engine import checkpoint

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro" / "checkpoints"))

    monkeypatch.setattr(checkpoint.Path, "mkdir", read_only)
    assert cli.main(["train", TOY, f"run.output_dir={tmp_path}", "run.name=ro", *QUIET, "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmgen: error: ") and "Read-only file system" in err[0], err


# ---------------------------------------------------------------------------------------------------
# resuming with other overrides
# ---------------------------------------------------------------------------------------------------
def test_resume_extending_max_steps_extends_the_schedule_and_records_the_change(tmp_path, capsys):
    """The README's lines: 50 steps at lr 1e-3, then resume=latest with the config's 200 steps. The lr
    after step 50 is the cosine of a 200-step run (not the restored 50-step schedule, 0 from there on)."""
    base = ["train.log_every=1", "train.checkpoint_every=0", "schedule.warmup_steps=0"]
    train(toy_cfg(tmp_path, "try1", *base, "optim.lr=1e-3", "train.max_steps=5"))
    capsys.readouterr()
    resumed = train(toy_cfg(tmp_path, "try1", *base, "train.max_steps=9", "resume=latest"))
    assert resumed.step == 9
    out = capsys.readouterr().out
    assert "resumed from step 5" in out
    assert "optim.lr 0.001 -> 0.003" in out and "train.max_steps 5 -> 9" in out
    cfg = toy_cfg(tmp_path, "x", *base, "train.max_steps=9")
    f = LRMultiplier("cosine", max_steps=9, warmup_steps=0, min_lr_ratio=cfg.schedule.min_lr_ratio)
    records = [json.loads(line) for line in (tmp_path / "try1" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr/enc"] for r in records}
    assert lrs[5] == pytest.approx(0.0 + 1e-3 * LRMultiplier("cosine", 5, 0, min_lr_ratio=cfg.schedule.min_lr_ratio)(5))
    for step in (6, 7, 8):     # the lr logged after step s is the one of step s (0-based) of the new run
        assert lrs[step] == pytest.approx(3e-3 * f(step)) and lrs[step] > 0
    text = (tmp_path / "try1" / "config.yaml").read_text()
    assert text.startswith("# resumed at step 5 from ") and "optim.lr" in text.splitlines()[0]
    assert from_yaml(ToyConfig, tmp_path / "try1" / "config.yaml") == resumed_cfg(cfg, tmp_path)


def resumed_cfg(cfg, tmp_path):
    return load_config(TOY, [f"run.output_dir={tmp_path}", "run.name=try1", *QUIET, "train.log_every=1",
                             "train.checkpoint_every=0", "schedule.warmup_steps=0", "train.max_steps=9",
                             "resume=latest"])


def test_resume_refuses_changes_it_cannot_honour_and_other_methods(tmp_path):
    from cmgen.errors import CheckpointError

    first = train(toy_cfg(tmp_path, "a", "train.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"model.hidden 32 -> 8, train.batch_size 32 -> 16"):
        train(toy_cfg(tmp_path, "a", "train.max_steps=4", "model.hidden=8", "train.batch_size=16", "resume=latest"))
    state = json.loads((first.checkpoint / "engine_state.json").read_text())
    (first.checkpoint / "engine_state.json").write_text(json.dumps({**state, "method": "videomoco"}))
    with pytest.raises(CheckpointError, match="written by method 'videomoco'; this config trains 'toy'"):
        train(toy_cfg(tmp_path, "a", "train.max_steps=4", "resume=latest"))
    # an older config (a key this version does not know, a model of other width) is named, not a traceback
    (first.checkpoint / "engine_state.json").write_text(json.dumps(state))
    import yaml

    saved = yaml.safe_load((first.checkpoint / "config.yaml").read_text())
    saved["model"].update(hidden=8, legacy=1)
    (first.checkpoint / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match=r"model.hidden 8 -> 32"):
        train(toy_cfg(tmp_path, "a", "train.max_steps=4", "resume=latest"))
    saved["model"]["hidden"] = 32
    (first.checkpoint / "config.yaml").write_text(yaml.safe_dump(saved))
    torch.save({"net.0.weight": torch.zeros(3, 3)}, first.checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"does not fit the models this config builds"):
        train(toy_cfg(tmp_path, "a", "train.max_steps=4", "resume=latest"))

"""GPU readiness: fp16 grad scaling, bf16, CUDA RNG in checkpoints, NCCL, compile, channels_last, TF32, pinning.

Tests marked ``@pytest.mark.cuda`` need a CUDA device and are skipped without one (tests/conftest.py);
``scripts/gpu_check.sh`` runs them with ``pytest -m cuda``. The unmarked tests check on CPU what can be
checked there: the skipped-update counter of the fp16 path (with a CPU ``GradScaler``), that
``train.channels_last``, ``train.pin_memory`` and ``train.compile`` reach the models and the loader and
leave results and checkpoint keys unchanged.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import types

import pytest
import torch
from torch import nn

from cmgen.engine import load_config, train
from cmgen.engine.checkpoint import load_model_state, read_engine_state
from cmgen.engine.method import StepContext
from cmgen.engine.probe import DUMP_ENV
from cmgen.engine.toy import ToyMethod
from tests.multiproc import (QUIET, ROOT, TOY_CONFIG, TOY_DIST, assert_ranks_agree, assert_states_close, launch,
                             read_dumps)
from tests.test_engine import assert_same, checkpoint_contents

CONTRAGAN = str(ROOT / "configs" / "contragan" / "shapes.yaml")


def _toy(tmp_path, name, *overrides):
    return load_config(TOY_CONFIG, [f"run.output_dir={tmp_path}", f"run.name={name}", *QUIET, *overrides])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


class _InfGrad(torch.autograd.Function):
    """Identity forward; an all-inf gradient backward (an fp16 overflow, deterministically)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class InfAtStep(ToyMethod):
    """The toy method whose encoder gets inf gradients at step ``INF_STEP`` (its losses stay finite)."""

    INF_STEP = 2

    def train_step(self, batch, step, ctx):
        if step == self.INF_STEP:
            enc = ctx.models["enc"]
            # Accelerate's fp16 prepare puts an autocast forward on the instance: put back what was there.
            own, forward = "forward" in vars(enc), enc.forward
            enc.forward = lambda x: _InfGrad.apply(forward(x))
            try:
                return super().train_step(batch, step, ctx)
            finally:
                if own:
                    enc.forward = forward
                else:
                    del enc.forward
        return super().train_step(batch, step, ctx)


# ---------------------------------------------------------------------------------------------------
# CPU: what the device options do without a GPU
# ---------------------------------------------------------------------------------------------------
def _tensors(batch) -> list[torch.Tensor]:
    """Every tensor of a batch: a tensor, or dicts / lists / tuples of them (ImageFolder gives [images, labels])."""
    if torch.is_tensor(batch):
        return [batch]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        return [t for part in batch for t in _tensors(part)]
    return []


def _copy_spy(monkeypatch) -> list[tuple[list[torch.Tensor], bool]]:
    """Record ``(tensors of the batch, non_blocking)`` of every host-to-device batch copy of the engine."""
    from cmgen.engine import trainer

    copies = []
    real = trainer.send_to_device

    def spy(batch, device, non_blocking=False):
        copies.append((_tensors(batch), non_blocking))
        return real(batch, device, non_blocking=non_blocking)

    monkeypatch.setattr(trainer, "send_to_device", spy)
    return copies


def test_batch_copies_are_non_blocking_and_the_spy_sees_every_tensor(tmp_path, monkeypatch):
    # What test_cuda_tf32_channels_last_and_pinned_batches checks on a GPU, minus pinning: ContraGAN's
    # batches are [images, labels] lists, not dicts.
    copies = _copy_spy(monkeypatch)
    train(load_config(CONTRAGAN, [f"run.output_dir={tmp_path}", "run.name=copy", *QUIET, "train.max_steps=1",
                                  "gan.n_dis=1", "train.checkpoint_every=0"]))
    assert copies and all(non_blocking for _, non_blocking in copies)
    assert all([t.dim() for t in tensors] == [4, 1] for tensors, _ in copies), [[t.shape for t in c] for c, _ in copies]


def test_skipped_fp16_updates_are_counted_per_optimizer():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    from accelerate.utils import DistributedType

    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    raw = {"a": torch.optim.SGD([p], lr=0.1), "b": torch.optim.SGD([q], lr=0.1)}
    opts = {n: types.SimpleNamespace(optimizer=o, param_groups=o.param_groups) for n, o in raw.items()}
    acc = types.SimpleNamespace(distributed_type=DistributedType.NO, sync_gradients=True, scaler=scaler)
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(grad_clip=None))
    ctx = StepContext(acc, cfg, {}, opts, {})
    scaler.scale((p * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()  # inf gradient in a
    scaler.scale(q.sum()).backward()
    ctx.step("a")
    assert torch.equal(p.detach(), torch.ones(3)) and ctx.amp_skipped == {"a": 1}  # no update, counted
    assert scaler.get_scale() == 2.0 ** 9
    ctx.step("b")
    assert ctx.amp_skipped == {"a": 1} and (q.detach() < 1).all()  # finite: updated, not counted


def test_channels_last_converts_2d_models_and_their_batches(tmp_path, monkeypatch):
    import cmgen.engine.trainer as trainer

    images = []
    real = trainer._channels_last

    def spy(batch):
        out = real(batch)
        parts = out.values() if isinstance(out, dict) else out
        images.extend(t for t in parts if torch.is_tensor(t) and t.dim() == 4)
        return out

    monkeypatch.setattr(trainer, "_channels_last", spy)
    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "dump"))
    cfg = load_config(CONTRAGAN, [f"run.output_dir={tmp_path}", "run.name=cl", *QUIET, "train.max_steps=1",
                                  "gan.n_dis=1", "train.checkpoint_every=0", "train.channels_last=true"])
    train(cfg)
    record = read_dumps(tmp_path / "dump")[0][1]
    assert all(v == v for v in record["losses"].values())  # finite (NaN != NaN)
    convs = {f"{m}.{k}": v for m, sd in record["models"].items() for k, v in sd.items()
             if v.dim() == 4 and v.shape[-1] > 1 and v.shape[1] > 1}
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
                         for v in convs.values()), [k for k, v in convs.items() if v.is_contiguous()]
    assert images and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in images)
    # Checkpoints stay loadable into plain (contiguous) models.
    assert set(load_model_state(tmp_path / "cl" / "checkpoints" / "step_000001", "d")) == set(record["models"]["d"])


def test_pin_memory_option_reaches_the_loader(tmp_path, monkeypatch):
    import cmgen.engine.trainer as trainer

    seen = []

    class Recording(trainer.ResumableLoader):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["pin_memory"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer, "ResumableLoader", Recording)
    train(_toy(tmp_path, "auto", "train.max_steps=1"))
    # On CPU PyTorch ignores pinning (with a warning); the flag must still get through.
    cpu_only = not torch.cuda.is_available()
    with pytest.warns(UserWarning, match="pin_memory") if cpu_only else contextlib.nullcontext():
        train(_toy(tmp_path, "pinned", "train.max_steps=1", "train.pin_memory=true"))
    assert seen == [torch.cuda.is_available(), True]
    assert _metrics(tmp_path / "auto")[-1]["loss_enc"] == _metrics(tmp_path / "pinned")[-1]["loss_enc"]


@pytest.mark.slow
def test_compile_option_keeps_results_and_checkpoint_keys(tmp_path):
    # The eager backend traces with TorchDynamo without generating code (inductor needs a C++ build on
    # CPU, minutes); on a GPU, test_cuda_compile_inductor below uses the default backend.
    plain = train(_toy(tmp_path, "plain", "train.max_steps=3"))
    compiled = train(_toy(tmp_path, "compiled", "train.max_steps=3", "train.compile=true",
                          "train.compile_backend=eager"))
    skip = ("config.yaml", "engine_state.json", "random_states_0.pkl")
    assert_same(checkpoint_contents(plain.checkpoint, skip), checkpoint_contents(compiled.checkpoint, skip),
                exact=False, rtol=1e-6, atol=1e-7)  # same keys (no "_orig_mod."), same values


# ---------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_fp16_scaler_skips_and_counts_inf_steps_and_resumes_bitwise(tmp_path):
    over = ["train.mixed_precision=fp16", "train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=null",
            "train.log_every=1", "model.input_noise=0.1"]
    full = train(_toy(tmp_path, "full", *over), method_cls=InfAtStep)
    records = _metrics(full.run_dir)
    skipped = [r["amp/skipped/enc"] for r in records if "amp/skipped/enc" in r]
    assert skipped == [0, 0, 1, 1, 1, 1], skipped  # step index 2 (logged as step 3) skipped once
    assert all(r["amp/skipped/head"] == 0 for r in records if "amp/skipped/head" in r)
    scales = [r["amp/scale"] for r in records if "amp/scale" in r]
    assert scales[2] == scales[1] / 2  # the skip halved the scale (backoff 0.5)
    assert read_engine_state(full.checkpoint)["amp_skipped"] == {"enc": 1}
    ckpt2 = full.run_dir / "checkpoints" / "step_000002"
    assert (ckpt2 / "scaler.pt").is_file()

    # Resume from step 2 (before the skip): scale, counter, CUDA RNG (input_noise), weights: bitwise.
    shutil.copytree(ckpt2, tmp_path / "resumed" / "checkpoints" / ckpt2.name)
    resumed = train(_toy(tmp_path, "resumed", *over, "resume=latest"), method_cls=InfAtStep)
    assert_same(checkpoint_contents(full.checkpoint), checkpoint_contents(resumed.checkpoint))
    assert torch.load(resumed.checkpoint / "scaler.pt", weights_only=False)["scale"] == scales[-1]


@pytest.mark.cuda
def test_cuda_bf16_trains_without_a_scaler(tmp_path):
    result = train(_toy(tmp_path, "bf16", "train.mixed_precision=bf16", "train.max_steps=40", "train.log_every=10"))
    records = _metrics(result.run_dir)
    assert records[-1]["loss_enc"] < records[0]["loss_enc"] and all("amp/scale" not in r for r in records)
    assert not (result.checkpoint / "scaler.pt").exists()


@pytest.mark.cuda
def test_cuda_rng_state_is_checkpointed_and_resume_is_bitwise(tmp_path):
    # input_noise draws from the CUDA generator inside train_step; a resume must restore it.
    over = ["train.max_steps=6", "train.checkpoint_every=3", "train.keep_last=null", "model.input_noise=0.5"]
    full = train(_toy(tmp_path, "full", *over))
    states = torch.load(full.checkpoint / "random_states_0.pkl", weights_only=False)
    assert "torch_cuda_manual_seed" in states
    ckpt = full.run_dir / "checkpoints" / "step_000003"
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / ckpt.name)
    resumed = train(_toy(tmp_path, "resumed", *over, "resume=latest"))
    assert_same(checkpoint_contents(full.checkpoint), checkpoint_contents(resumed.checkpoint))


@pytest.mark.cuda
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_nccl_ranks_agree_and_match_one_gpu(tmp_path, toy_one_process_run):
    run = launch(TOY_CONFIG, TOY_DIST, out_dir=tmp_path, name="nccl", dump=True).check()
    dumps = read_dumps(run.dump_dir)
    assert {rec["backend"] for rank in dumps.values() for rec in rank.values()} == {"nccl"}
    assert_ranks_agree(dumps)
    one = read_dumps(toy_one_process_run[1])[0]  # CPU float32 reference: TF32 off, so close
    for step in one:
        assert_states_close(one[step]["models"], dumps[0][step]["models"], f"step {step}", rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_compile_inductor_matches_eager(tmp_path):
    plain = train(_toy(tmp_path, "plain", "train.max_steps=5"))
    compiled = train(_toy(tmp_path, "compiled", "train.max_steps=5", "train.compile=true"))
    skip = ("config.yaml", "engine_state.json", "random_states_0.pkl")
    assert_same(checkpoint_contents(plain.checkpoint, skip), checkpoint_contents(compiled.checkpoint, skip),
                exact=False, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_tf32_channels_last_and_pinned_batches(tmp_path, monkeypatch):
    copies = _copy_spy(monkeypatch)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        monkeypatch.setenv(DUMP_ENV, str(tmp_path / "dump"))
        train(load_config(CONTRAGAN, [f"run.output_dir={tmp_path}", "run.name=gpu", *QUIET, "train.max_steps=2",
                                      "train.checkpoint_every=0", "train.channels_last=true", "train.tf32=true"]))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    # pin_memory defaults to on with CUDA; copies are non_blocking
    assert copies and all(tensors and all(t.is_pinned() for t in tensors) and non_blocking
                          for tensors, non_blocking in copies)
    record = read_dumps(tmp_path / "dump")[0][2]
    assert all(v == v for v in record["losses"].values())
    w = record["models"]["d"]
    assert any(v.dim() == 4 and v.shape[1] > 1 and v.is_contiguous(memory_format=torch.channels_last)
               and not v.is_contiguous() for v in w.values())

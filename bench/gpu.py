"""GPU throughput: ContraGAN-32 training steps, VideoMoCo R(2+1)D-18 training steps, NT-Xent at N = 65536.

Three measurements, each through cmgen's own code (no re-implementation of a step):

1. **ContraGAN-32**: ``cmgen.engine.train`` on ``configs/contragan/shapes.yaml`` at StudioGAN's CIFAR-10
   widths (``CONTRAGAN_PAPER``: g/d channels 96, z 80, embedding 512), 64 reals per D update, 5 D
   updates + 1 G update per step (``gan.d_batches=split``: a step loads 5 x 64 reals). The reals are
   decoded once and held in memory (PNG decoding on the training thread would be timed otherwise).
   Reported: real images through D per second (``64 * n_dis * steps/s``), steps/s and peak GPU memory.
2. **VideoMoCo**: ``cmgen.engine.train`` on ``configs/videomoco/moving_digits.yaml`` with the
   ``r2plus1d_18`` backbone, 16 x 112 x 112 clips, dim 128, K = 65536, the adversarial frame-dropping
   G active from step 0; the clips are random tensors generated once and held in memory (the benchmark
   measures the GPU step, not video decoding). Reported: clips per second (``batch * steps/s``) and peak
   memory.
3. **NT-Xent** N = 65536 pairs (2N = 131072 rows), D = 128, temperature 0.1: one forward + backward
   of ``cmgen.losses.NTXent`` (default, and chunked) and lightly's ``NTXentLoss`` where it fits in GPU
   memory (out-of-memory is reported as such); seconds per fwd+bwd and peak GPU memory.

Engine throughput comes from the engine's own ``steps_per_sec`` log records: the first ``--warmup``
steps (CUDA context and cuDNN/cuBLAS handle creation, allocator warm-up) form one log window that is
discarded; the mean over the following windows is reported. Each window ends on a device synchronisation
(the logged loss means are read back to the host), and one epoch is longer than the whole run, so no
epoch boundary falls inside a window. Peak GPU memory is ``max_memory_allocated`` after ``gc.collect`` +
``empty_cache`` + ``reset_peak_memory_stats`` at the start of each workload (``baseline_gpu_bytes``:
what was still allocated then). The engine sets TF32 from ``train.tf32`` for the whole process, so the
NT-Xent rows record the matmul TF32 flag they ran under. The report is rewritten after every workload,
so a run cut short by scripts/gpu_check.sh's time limit still leaves the finished ones. ``--smoke`` runs
tiny versions of all three on CPU in well under a minute (tests/test_bench_smoke.py), so the script is
known to work before it meets a GPU.

    python bench/gpu.py                       # on a GPU: writes bench/results/gpu.json and gpu.md
    python bench/gpu.py --smoke --out /tmp/x  # CPU, tiny settings
    scripts/gpu_check.sh                      # pytest -m cuda + this benchmark, at most 8 minutes
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import _measure  # noqa: E402

QUIET = ["train.progress_bar=false", "train.trackers=[]", "train.sample_every=0", "train.eval_every=0",
         "train.checkpoint_every=0", "train.keep_last=1"]
# StudioGAN CIFAR-10 ContraGAN (configs/contragan/shapes.yaml comment): widths 96, z 80, embed 512.
CONTRAGAN_PAPER = ["model.g_channels=96", "model.d_channels=96", "model.z_dim=80", "model.shared_dim=128",
                   "model.embed_dim=512", "data.num_images=2048"]
CONTRAGAN_SMOKE = ["data.num_images=256"]
VIDEOMOCO_PAPER = ["model.backbone=r2plus1d_18", "model.dim=128", "model.K=65536", "data.clip_len=16",
                   "data.size=112", "model.g_width=16", "model.g_hidden=128"]
VIDEOMOCO_SMOKE = ["model.backbone=tiny", "model.backbone_width=4", "model.dim=16", "model.K=64",
                   "data.clip_len=4", "data.size=16", "model.g_width=4", "model.g_hidden=8"]


def _load_bench_losses():
    if "bench_losses" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_losses", BENCH / "losses.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_losses"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_losses"]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> int | None:
    """Free what the previous workload left (reference cycles included), reset the peak; returns the
    bytes still allocated (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def _peak_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------------
# engine workloads
# ---------------------------------------------------------------------------------------------------
class _Repeat(torch.utils.data.Dataset):
    """``items`` (held in memory) repeated to ``length`` samples: one epoch spans the whole run."""

    def __init__(self, items: list, length: int):
        self.items, self.length = items, max(length, len(items))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.items[i % len(self.items)]


def _samples_needed(cfg) -> int:
    return cfg.train.batch_size * (cfg.train.max_steps + 1)


def _in_memory_contragan():
    """ContraGAN whose reals are decoded once (the shapes PNGs) and repeated for the whole run."""
    from cmgen.engine.registry import resolve_method

    class InMemoryContraGAN(resolve_method("contragan")):
        def build_dataset(self, cfg):
            real = super().build_dataset(cfg)
            return _Repeat([real[i] for i in range(len(real))], _samples_needed(cfg))

    return InMemoryContraGAN


def _synthetic_videomoco():
    """VideoMoCo whose training clips are seeded random tensors, generated once and held in memory."""
    from video.videomoco import VideoMoCoMethod

    def clips(n: int, t: int, size: int) -> list[dict]:
        g = torch.Generator().manual_seed(0)
        return [{"q": torch.rand((3, t, size, size), generator=g), "k": torch.rand((3, t, size, size), generator=g),
                 "label": i % 10} for i in range(n)]

    class SyntheticVideoMoCo(VideoMoCoMethod):
        def build_dataset(self, cfg):
            return _Repeat(clips(4 * cfg.train.batch_size, cfg.data.clip_len, cfg.data.size), _samples_needed(cfg))

    return SyntheticVideoMoCo


def engine_throughput(config: str, overrides: list[str], warmup: int, windows: int, out_dir: Path, name: str,
                      method_cls=None) -> dict:
    """Train ``warmup * (1 + windows)`` steps; steps/s = mean of the engine's log windows after the first."""
    from cmgen.engine import load_config, train

    cfg = load_config(config, [f"run.output_dir={out_dir}", f"run.name={name}", *QUIET, *overrides,
                               f"train.log_every={warmup}", f"train.max_steps={warmup * (1 + windows)}"])
    baseline = _reset_peak()
    t0 = time.perf_counter()
    result = train(cfg, method_cls=method_cls)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip() and "steps_per_sec" in line]
    rates = [r["steps_per_sec"] for r in records[1:]]
    losses = {k: v for k, v in records[-1].items() if "loss" in k}
    return {"steps_per_sec": sum(rates) / len(rates), "windows": len(rates), "steps": result.step,
            "peak_gpu_bytes": _peak_bytes(), "baseline_gpu_bytes": baseline, "wall_s": wall, "final_losses": losses,
            "finite": all(math.isfinite(v) for v in losses.values()), "batch_size": cfg.train.batch_size,
            "n_dis": getattr(getattr(cfg, "gan", None), "n_dis", None)}


def bench_contragan(args, out_dir: Path) -> dict:
    per_d = 8 if args.smoke else 64
    n_dis = 5
    over = (CONTRAGAN_SMOKE if args.smoke else CONTRAGAN_PAPER) + [
        f"train.batch_size={per_d * n_dis}", f"gan.n_dis={n_dis}", "gan.d_batches=split", *args.engine_overrides]
    r = engine_throughput(str(ROOT / "configs" / "contragan" / "shapes.yaml"), over, args.warmup, args.windows,
                          out_dir, "contragan", method_cls=_in_memory_contragan())
    r.update(what=f"ContraGAN-32, {per_d} reals per D update, {n_dis} D + 1 G updates per step",
             images_per_sec=r["steps_per_sec"] * per_d * n_dis, overrides=over)
    return r


def bench_videomoco(args, out_dir: Path) -> dict:
    batch = 2 if args.smoke else args.clips_batch
    over = (VIDEOMOCO_SMOKE if args.smoke else VIDEOMOCO_PAPER) + [
        f"train.batch_size={batch}", "model.adversarial_start_step=0", *args.engine_overrides]
    r = engine_throughput(str(ROOT / "configs" / "videomoco" / "moving_digits.yaml"), over, args.warmup,
                          args.windows, out_dir, "videomoco", method_cls=_synthetic_videomoco())
    size = "4 x 16 x 16 tiny backbone" if args.smoke else "16 x 112 x 112, r2plus1d_18"
    r.update(what=f"VideoMoCo {size}, batch {batch}, K={'64' if args.smoke else '65536'}, G active",
             clips_per_sec=r["steps_per_sec"] * batch, overrides=over)
    return r


# ---------------------------------------------------------------------------------------------------
# NT-Xent
# ---------------------------------------------------------------------------------------------------
def bench_ntxent(args) -> list[dict]:
    losses = _load_bench_losses()
    device = _device()
    n, dim = (256, 16) if args.smoke else (65536, 128)
    impls = [("cmgen", None), ("cmgen-chunked", args.chunk_size), ("lightly", None)]
    rows = []
    for impl, chunk in impls:
        row = {"impl": impl, "n": n, "dim": dim, "chunk_size": chunk,
               "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None}
        try:
            fn = losses.build_loss(impl, n, 0.1, chunk or 0)
        except ImportError as e:
            rows.append({**row, "status": f"not installed ({e.name})"})
            continue
        z0, z1 = (t.detach().to(device).requires_grad_() for t in losses.make_inputs(n, dim, seed=0))

        def step():
            z0.grad = z1.grad = None
            loss = fn(z0, z1)
            loss.backward()
            return loss

        try:
            _reset_peak()
            with _measure.PeakMemory(str(device)) as peak:
                value = float(step().detach())
            times = _measure.time_repeated(step, repeat=args.repeat, budget_s=args.budget_s, sync=_sync)
            row.update(status="ok", loss=value, peak_bytes=peak.extra_bytes, peak_method=peak.method,
                       **_measure.summarize_times(times))
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="out of GPU memory", error=str(e).splitlines()[0][:200])
        except RuntimeError as e:   # any other failure is reported in the row, the other rows still run
            row.update(status=f"error: {type(e).__name__}", error=" ".join(str(e).split())[:200])
        finally:
            del z0, z1
            _reset_peak()
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        ref = next((r for r in ok if r["impl"] == "lightly"), ok[0])
        for r in ok:
            r["loss_rel_diff_vs_" + ref["impl"]] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
    return rows


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def _gib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f} GiB"


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU benchmark ({'smoke, CPU-sized' if report['smoke'] else 'full'})", "",
             f"{m.get('gpu', 'no GPU')}; {m['cpu']}; torch {m['torch']}; {m['date']}. "
             f"Engine options: {' '.join(report['engine_overrides']) or 'defaults (fp32, TF32 off)'}.", ""]
    rows = []
    for key, unit in (("contragan", "images_per_sec"), ("videomoco", "clips_per_sec")):
        r = report.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append([key, r.get("what", key), "error", "-", "-", r["error"][:120]])
            continue
        label = "img/s (reals through D)" if key == "contragan" else "clips/s"
        rows.append([key, r["what"], f"{r[unit]:.1f} {label}", f"{r['steps_per_sec']:.2f}", _gib(r["peak_gpu_bytes"]),
                     "finite" if r["finite"] else f"NON-FINITE {r['final_losses']}"])
    lines += [_measure.markdown_table(["workload", "setting", "throughput", "steps/s", "peak GPU memory", "losses"],
                                      rows, align="llrrrl"), ""]
    nt = report.get("ntxent", [])
    if nt:
        n, d = nt[0]["n"], nt[0]["dim"]
        tf32 = nt[0].get("tf32_matmul")
        precision = "" if tf32 is None else f", fp32 inputs, matmul TF32 {'on' if tf32 else 'off'}"
        lines += [f"NT-Xent, N = {n} pairs ({2 * n} rows), D = {d}, temperature 0.1{precision}, one forward + "
                  f"backward:", ""]
        nrows = []
        for r in nt:
            name = r["impl"] + (f" (chunk {r['chunk_size']})" if r["chunk_size"] else "")
            if r["status"] != "ok":
                nrows.append([name, r["status"], "-", "-", "-"])
                continue
            diff = next((v for k, v in r.items() if k.startswith("loss_rel_diff")), None)
            nrows.append([name, f"{r['median_s']:.4f} s (min {r['min_s']:.4f}, {r['reps']} reps)",
                          _gib(r["peak_bytes"]), f"{r['loss']:.6f}", f"{diff:.1e}" if diff is not None else "-"])
        lines += [_measure.markdown_table(["implementation", "fwd+bwd", "extra peak memory", "loss",
                                           "rel. diff vs reference"], nrows, align="lrrrr"), ""]
    if report.get("pytest"):
        lines += [f"`pytest -m cuda`: {report['pytest']}", ""]
    lines.append("Written by `bench/gpu.py` (see its docstring for what each number measures).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized settings (seconds)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--only", default="contragan,videomoco,ntxent")
    p.add_argument("--warmup", type=int, default=None, help="steps per log window (first one discarded)")
    p.add_argument("--windows", type=int, default=None, help="measured log windows")
    p.add_argument("--clips-batch", type=int, default=16, help="VideoMoCo clips per step")
    p.add_argument("--chunk-size", type=int, default=8192, help="NT-Xent chunked variant")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=30.0, help="time budget per NT-Xent implementation")
    p.add_argument("--pytest-log", type=Path, default=None, help="pytest output whose last line goes in the report")
    p.add_argument("engine_overrides", nargs="*", metavar="key=value",
                   help="engine overrides for both training workloads, e.g. train.tf32=true train.mixed_precision=bf16")
    args = p.parse_args(argv)
    args.warmup = args.warmup or (1 if args.smoke else 5)
    args.windows = args.windows or (1 if args.smoke else 2)
    if args.smoke:
        args.repeat, args.budget_s = min(args.repeat, 2), min(args.budget_s, 2.0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"smoke": args.smoke, "machine": _measure.machine_info(), "engine_overrides": args.engine_overrides,
              "device": str(_device())}
    only = set(args.only.split(","))
    if args.pytest_log is not None and args.pytest_log.is_file():
        tail = [line for line in args.pytest_log.read_text().splitlines() if line.strip()]
        report["pytest"] = tail[-1].strip("= ") if tail else "no output"
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:   # after every workload: a run stopped by a time limit keeps what it finished
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "gpu.md").write_text(render(report))

    with tempfile.TemporaryDirectory(prefix="cmgen-gpu-bench-") as tmp:
        for key, fn in (("contragan", bench_contragan), ("videomoco", bench_videomoco)):
            if key in only:
                try:
                    report[key] = fn(args, Path(tmp))
                except Exception as e:  # report and go on: one failing workload must not hide the others
                    report[key] = {"what": key, "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()[-3000:]}
                print(f"{key}: {json.dumps({k: v for k, v in report[key].items() if k != 'traceback'})}", flush=True)
                save()
    if "ntxent" in only:
        report["ntxent"] = bench_ntxent(args)
        print(f"ntxent: {json.dumps(report['ntxent'])}", flush=True)
    save()
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    failed = [k for k in ("contragan", "videomoco") if isinstance(report.get(k), dict) and "error" in report[k]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

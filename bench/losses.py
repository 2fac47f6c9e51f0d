"""NT-Xent forward+backward benchmark: cmgen vs lightly vs pytorch-metric-learning.

Setting (SimCLR): N pairs -> 2N rows of D = 128, temperature 0.1, fp32, 2 threads. Each configuration
(implementation x N) runs in a fresh worker process (``--worker``), which

1. builds seeded inputs ``z0, z1`` (N, D) with ``requires_grad`` (``z1`` is a noisy copy of ``z0``, so
   positives are more similar than negatives, as after training starts),
2. reads the resident memory, runs one forward+backward, reads the high-water mark:
   extra peak = VmHWM - VmRSS before the step,
3. times forward+backward ``--repeat`` times or until ``--budget`` seconds are spent (at least once;
   the measured pass itself when it alone outlasts the budget) and reports the median wall time and
   the process CPU time,
4. reports the loss and two gradient fingerprints (norm, projection on a fixed random direction) so
   the driver can check that all implementations compute the same loss and gradient.

Implementations (every one normalizes its inputs itself, so all receive the same raw embeddings):

* ``cmgen``          ``cmgen.losses.NTXent(temperature=0.1)``
* ``cmgen-chunked``  ``cmgen.losses.NTXent(temperature=0.1, chunk_size=--chunk-size)``
* ``lightly``        ``lightly.loss.NTXentLoss(temperature=0.1)``
* ``pml-supcon``     ``pytorch_metric_learning.losses.SupConLoss(temperature=0.1)`` on
  ``cat([z0, z1])`` with labels ``arange(N).repeat(2)``: each row's only positive is its other view,
  which is NT-Xent exactly. (PML's own ``NTXentLoss`` builds one term per positive pair with all
  negatives, O(N^3), so it is not a fair stand-in.)

Configurations predicted to need more memory than allowed (``--max-mem-gb``, default 60% of
MemAvailable) are skipped with the estimate, and the driver kills any worker whose RSS passes the
limit, so a shared machine without swap is never pushed into the OOM killer. At N >= 65536 only
``--large-impls`` (default: cmgen-chunked) run, as one pass takes minutes on 2 threads.

    python bench/losses.py                      # full run, writes bench/results/losses.{md,json}
    python bench/losses.py --quick              # N = 256, 1024 in about a minute
    python bench/losses.py --sizes 4096 --impls cmgen,lightly --repeat 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402  (bench/ is a folder of scripts, not a package)

FULL_SIZES = (1024, 4096, 16384, 65536)
QUICK_SIZES = (256, 1024)
REFERENCE_IMPL = "lightly"
# Agreement tolerances (fp32 sums over 2N rows in different orders).
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
# Targets from the benchmark issue, checked at TARGET_N.
TARGET_N = 4096
TARGET_TIME_RATIO = 0.35
TARGET_MEM_RATIO = 0.25
LARGE_N = 65536
LARGE_MEM_LIMIT = 4 * _measure.GIB


@dataclass(frozen=True)
class Impl:
    """One implementation under test.

    ``dense``: it materializes (2N)^2 matrices, so its memory grows as N^2 (else as N, chunked).
    ``bytes_per_elem``: prior estimate of extra peak bytes per element of the (2N)^2 logit matrix
    (dense) or of the chunk_size x 2N block (chunked), used before any size has been measured;
    afterwards the measured peak at the largest smaller N is extrapolated.
    """

    name: str
    label: str
    package: str
    dense: bool
    bytes_per_elem: float


IMPLS = {
    impl.name: impl
    for impl in (
        Impl("cmgen", "cmgen `NTXent(temperature=0.1)`", "cmgen", True, 16.0),
        Impl("cmgen-chunked", "cmgen `NTXent(temperature=0.1, chunk_size={chunk})`", "cmgen", False, 16.0),
        Impl("lightly", "lightly `NTXentLoss(temperature=0.1)`", "lightly", True, 40.0),
        Impl("pml-supcon", "PML `SupConLoss(temperature=0.1)`", "pytorch-metric-learning", True, 100.0),
    )
}


# --------------------------------------------------------------------------------------- worker


def build_loss(impl: str, n: int, temperature: float, chunk_size: int):
    """A callable ``(z0 (N, D), z1 (N, D)) -> scalar loss`` for one implementation."""
    import torch

    if impl == "cmgen":
        from cmgen.losses import NTXent

        return NTXent(temperature=temperature)
    if impl == "cmgen-chunked":
        from cmgen.losses import NTXent

        return NTXent(temperature=temperature, chunk_size=chunk_size)
    if impl == "lightly":
        from lightly.loss import NTXentLoss

        return NTXentLoss(temperature=temperature)
    if impl == "pml-supcon":
        from pytorch_metric_learning.losses import SupConLoss

        loss = SupConLoss(temperature=temperature)
        # Row i and row i + N are the two views of sample i: its only positive.
        labels = torch.arange(n).repeat(2)
        return lambda z0, z1: loss(torch.cat([z0, z1]), labels)
    raise ValueError(f"unknown implementation {impl!r}; choose from {sorted(IMPLS)}")


def make_inputs(n: int, dim: int, seed: int):
    """Seeded embeddings ``z0, z1`` (N, D), leaf tensors with ``requires_grad``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, dim, generator=g)
    z1 = z0 + 0.7 * torch.randn(n, dim, generator=g)
    return z0.requires_grad_(), z1.requires_grad_()


def worker(args: argparse.Namespace) -> dict:
    import gc

    import torch

    torch.set_num_threads(args.threads)
    n = args.n[0]
    step_inputs: tuple = ()

    def step():
        z0, z1, loss_fn = step_inputs
        z0.grad = None
        z1.grad = None
        loss = loss_fn(z0, z1)
        loss.backward()
        return loss

    # A tiny step first, so one-time costs (lazy imports, thread pools, kernel selection) are paid
    # before the baseline and are counted in neither the peak nor the time.
    small = min(n, 64)
    step_inputs = (*make_inputs(small, args.dim, args.seed), build_loss(args.impl, small, args.temperature, args.chunk_size))
    step()

    z0, z1 = make_inputs(n, args.dim, args.seed)
    step_inputs = (z0, z1, build_loss(args.impl, n, args.temperature, args.chunk_size))
    gc.collect()
    with _measure.PeakMemory("cpu") as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        first_s, first_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    loss_value = float(loss.detach())

    grad = torch.cat([z0.grad, z1.grad]).double()
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    direction /= direction.norm()
    fingerprint = {"grad_norm": float(grad.norm()), "grad_proj": float((grad * direction).sum())}
    del grad, direction, loss

    if first_s >= args.budget:
        # One pass already outlasts the timing budget (N = 65536): a second pass would double the run
        # for no new information, so the measured pass is the timing (reps = 1).
        times = {"wall": [first_s], "cpu": [first_cpu_s]}
    else:
        times = _measure.time_repeated(step, repeat=args.repeat, budget_s=args.budget)
    return {
        "impl": args.impl,
        "n": n,
        "rows": 2 * n,
        "dim": args.dim,
        "temperature": args.temperature,
        "chunk_size": args.chunk_size if args.impl == "cmgen-chunked" else None,
        "threads": torch.get_num_threads(),
        "loss": loss_value,
        **fingerprint,
        "extra_peak_bytes": peak.extra_bytes,
        "baseline_rss_bytes": peak.baseline_bytes,
        "mem_method": peak.method,
        "first_step_s": first_s,
        **_measure.summarize_times(times),
        "times_s": times["wall"],
        "cpu_times_s": times["cpu"],
    }


# --------------------------------------------------------------------------------------- driver


def available_impls(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split the requested implementations into importable ones and {name: why not}."""
    import importlib

    modules = {"cmgen": "cmgen.losses", "cmgen-chunked": "cmgen.losses", "lightly": "lightly.loss",
               "pml-supcon": "pytorch_metric_learning.losses"}
    ok, missing = [], {}
    for name in names:
        if name not in IMPLS:
            raise ValueError(f"unknown implementation {name!r}; choose from {sorted(IMPLS)}")
        try:
            module = importlib.import_module(modules[name])
            if name.startswith("cmgen") and not hasattr(module, "NTXent"):
                raise ImportError("cmgen.losses has no NTXent")
            ok.append(name)
        except ImportError as exc:
            missing[name] = f"not importable ({exc})"
    return ok, missing


def predict_extra_bytes(impl: Impl, n: int, chunk_size: int, measured: dict[int, int]) -> float:
    """Extra peak memory expected for ``impl`` at ``n`` pairs: the measured peak at the largest smaller
    size scaled as N^2 (dense) or N (chunked), else the prior ``bytes_per_elem`` estimate."""
    smaller = [m for m in measured if m < n]
    if smaller:
        m = max(smaller)
        return measured[m] * (n / m) ** (2 if impl.dense else 1)
    elems = (2 * n) ** 2 if impl.dense else min(chunk_size, 2 * n) * 2 * n
    return impl.bytes_per_elem * elems


def merge_rounds(runs: list[dict]) -> dict:
    """One result from the same configuration's workers: all timed passes pooled, the median extra
    peak memory, the first worker's loss and gradient fingerprint (the inputs are seeded, so every
    worker computes the same ones)."""
    if len(runs) == 1:
        return {**runs[0], "rounds": 1}
    merged = dict(runs[0])
    wall = [t for r in runs for t in r["times_s"]]
    cpu = [t for r in runs for t in r["cpu_times_s"]]
    merged.update(_measure.summarize_times({"wall": wall, "cpu": cpu}))
    merged.update({"times_s": wall, "cpu_times_s": cpu, "rounds": len(runs),
                   "extra_peak_bytes": int(statistics.median(r["extra_peak_bytes"] for r in runs)),
                   "extra_peak_bytes_all": [r["extra_peak_bytes"] for r in runs]})
    return merged


def check_agreement(results: list[dict]) -> None:
    """Annotate each successful result with its deviation from the reference at the same N
    (lightly when it ran, else the first implementation that did)."""
    by_n: dict[int, list[dict]] = {}
    for r in results:
        if r["status"] == "ok":
            by_n.setdefault(r["n"], []).append(r)
    for n, rows in by_n.items():
        ref = next((r for r in rows if r["impl"] == REFERENCE_IMPL), rows[0])
        for r in rows:
            r["reference"] = ref["impl"]
            loss_rel = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
            # Projections are on a unit direction, so |proj| <= grad_norm: relative to grad_norm.
            grad_rel = max(abs(r["grad_norm"] - ref["grad_norm"]), abs(r["grad_proj"] - ref["grad_proj"])) / ref["grad_norm"]
            r["loss_rel_diff"] = loss_rel
            r["grad_rel_diff"] = grad_rel
            r["agrees"] = loss_rel <= LOSS_RTOL and grad_rel <= GRAD_RTOL


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _fmt_bytes(nbytes: float) -> str:
    return f"{nbytes / _measure.MIB:.0f} MiB" if nbytes < 10 * _measure.GIB else f"{nbytes / _measure.GIB:.1f} GiB"


def evaluate_targets(results: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and pass/fail (None when not measured)."""
    ok = {(r["impl"], r["n"]): r for r in results if r["status"] == "ok"}
    targets = []
    ref = ok.get((REFERENCE_IMPL, TARGET_N))
    for impl in ("cmgen", "cmgen-chunked"):
        mine = ok.get((impl, TARGET_N))
        time_ratio = mine["median_s"] / ref["median_s"] if (mine and ref) else None
        cpu_ratio = mine["cpu_median_s"] / ref["cpu_median_s"] if (mine and ref) else None
        mem_ratio = mine["extra_peak_bytes"] / ref["extra_peak_bytes"] if (mine and ref) else None
        targets.append({"what": f"{impl} time / lightly time at N={TARGET_N}", "target": f"<= {TARGET_TIME_RATIO}",
                        "value": time_ratio, "cpu_time_ratio": cpu_ratio,
                        "passed": None if time_ratio is None else time_ratio <= TARGET_TIME_RATIO})
        targets.append({"what": f"{impl} extra peak / lightly extra peak at N={TARGET_N}", "target": f"<= {TARGET_MEM_RATIO}",
                        "value": mem_ratio, "passed": None if mem_ratio is None else mem_ratio <= TARGET_MEM_RATIO})
    large = ok.get(("cmgen-chunked", LARGE_N))
    targets.append({"what": f"cmgen-chunked extra peak in GiB at N={LARGE_N} (exact gradients)", "target": "<= 4",
                    "value": large["extra_peak_bytes"] / _measure.GIB if large else None,
                    "passed": None if large is None else large["extra_peak_bytes"] <= LARGE_MEM_LIMIT})
    return targets


def render_markdown(machine: dict, settings: dict, results: list[dict], targets: list[dict]) -> str:
    ok = {(r["impl"], r["n"]): r for r in results if r["status"] == "ok"}
    rows = []
    for r in results:
        impl = IMPLS[r["impl"]]
        label = impl.label.format(chunk=settings["chunk_size"])
        if r["status"] != "ok":
            rows.append([f"{r['n']:,}", label, "—", "—", "—", "—", "—", "—", "—", r.get("note", r["status"])])
            continue
        ref = ok.get((REFERENCE_IMPL, r["n"]))
        t_ratio = (f"{r['median_s'] / ref['median_s']:.2f}× / {r['cpu_median_s'] / ref['cpu_median_s']:.2f}×"
                   if ref else "—")
        m_ratio = f"{r['extra_peak_bytes'] / ref['extra_peak_bytes']:.2f}×" if ref and ref["extra_peak_bytes"] else "—"
        if r["impl"] == r["reference"]:
            agree = "reference"
        else:
            agree = ("yes" if r["agrees"] else "**NO**") + f" ({max(r['loss_rel_diff'], r['grad_rel_diff']):.0e})"
        rows.append([
            f"{r['n']:,}", label, f"{_fmt_time(r['median_s'])} ({_fmt_time(r['min_s'])})",
            _fmt_time(r["cpu_median_s"]), t_ratio, _fmt_bytes(r["extra_peak_bytes"]), m_ratio,
            f"{r['loss']:.6f}", agree, f"{r['reps']} reps" + (f" in {r['rounds']} workers" if r.get("rounds", 1) > 1 else ""),
        ])
    table = _measure.markdown_table(
        ["N pairs", "implementation", "fwd+bwd wall median (min)", "CPU time", "time vs lightly (wall / CPU)",
         "extra peak RAM", "RAM vs lightly", "loss", "agrees (max rel. diff)", "note"],
        rows, align="rlrrrrrrll",
    )
    lines = [
        "# NT-Xent forward+backward benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs, "
        f"{machine['mem_total_gib']} GiB RAM; torch {machine['torch']}, lightly {settings['versions'].get('lightly')}, "
        f"pytorch-metric-learning {settings['versions'].get('pytorch-metric-learning')}; {machine['date']}.",
        "",
        f"Setting: 2N rows of D = {settings['dim']}, T = {settings['temperature']}, fp32, "
        f"{settings['threads']} threads, each row measured in {settings['rounds']} fresh process(es) (interleaved "
        f"with the other rows of the same N); time = median of up to {settings['repeat']} forward+backward passes "
        f"per process within {settings['budget_s']:.0f} s after the memory-measuring pass (that pass alone when it "
        "outlasts the budget), CPU time = "
        "process CPU time (all threads) per pass, which other jobs on a shared machine inflate far less "
        "than the wall time; extra peak RAM = "
        "VmHWM during one forward+backward minus VmRSS before it. 'agrees' compares loss, gradient norm and a "
        f"random projection of the gradient with the reference (lightly, else the first row at that N); "
        f"tolerance {LOSS_RTOL:g} (loss), {GRAD_RTOL:g} (gradient).",
        "",
        table,
        "",
        "Targets:",
        "",
    ]
    for t in targets:
        if t["passed"] is None:
            lines.append(f"- {t['what']}: target {t['target']} — not measured")
        else:
            extra = f", CPU-time ratio {t['cpu_time_ratio']:.3f}" if t.get("cpu_time_ratio") is not None else ""
            lines.append(f"- {t['what']}: {t['value']:.3f} (target {t['target']}{extra}) — "
                         f"{'met' if t['passed'] else '**missed**'}")
    return "\n".join(lines) + "\n"


def driver(args: argparse.Namespace) -> int:
    requested = [s for s in args.impls.split(",") if s]
    sizes = args.n or (QUICK_SIZES if args.quick else FULL_SIZES)
    impls, missing = available_impls(requested)
    large_impls = {s for s in args.large_impls.split(",") if s}
    for name, why in missing.items():
        print(f"[bench] {name}: skipped, {why}", file=sys.stderr)
    if not impls:
        print("[bench] nothing to run", file=sys.stderr)
        return 1
    max_extra = args.max_mem_gb * _measure.GIB if args.max_mem_gb else 0.6 * _measure.mem_available_bytes()
    script = str(Path(__file__).resolve())
    settings = {
        "dim": args.dim, "temperature": args.temperature, "threads": args.threads, "chunk_size": args.chunk_size,
        "repeat": args.repeat, "rounds": args.rounds, "budget_s": args.budget, "seed": args.seed, "max_extra_bytes": max_extra,
        "timeout_s": args.timeout, "sizes": list(sizes), "impls": impls, "large_impls": sorted(large_impls),
        "versions": {p: _measure.package_version(p) for p in ("torch", "lightly", "pytorch-metric-learning")},
    }
    machine = _measure.machine_info(threads=args.threads)

    results: list[dict] = []
    measured: dict[str, dict[int, int]] = {name: {} for name in impls}
    failed: dict[str, str] = {}
    for n in sizes:
        runnable = []
        for name in impls:
            base = {"impl": name, "n": n}
            if name in failed:
                results.append({**base, "status": "skipped", "note": f"skipped: {failed[name]} at a smaller N"})
                continue
            need = predict_extra_bytes(IMPLS[name], n, args.chunk_size, measured[name])
            note = None
            if need > max_extra:
                note = f"skipped: needs ≈ {need / _measure.GIB:.0f} GB (limit {max_extra / _measure.GIB:.0f} GB)"
            elif n >= LARGE_N and name not in large_impls:
                note = f"not run at N ≥ {LARGE_N:,} (one pass takes minutes; add it to --large-impls)"
            if note is not None:
                results.append({**base, "status": "skipped", "note": note, "predicted_bytes": need})
                print(f"[bench] N={n} {name}: {note}", file=sys.stderr)
            else:
                runnable.append(name)
        # Rounds interleave the implementations, so a burst of load from other jobs on a shared
        # machine spreads over all of them instead of landing on one.
        runs: dict[str, list[dict]] = {name: [] for name in runnable}
        for round_ in range(args.rounds):
            for name in runnable:
                if name in failed:
                    continue
                print(f"[bench] N={n} {name} (round {round_ + 1}/{args.rounds}): running", file=sys.stderr, flush=True)
                argv = [script, "--worker", "--impl", name, "--sizes", str(n), "--dim", str(args.dim),
                        "--temperature", str(args.temperature), "--threads", str(args.threads),
                        "--chunk-size", str(args.chunk_size), "--repeat", str(args.repeat),
                        "--budget", str(args.budget), "--seed", str(args.seed)]
                res = _measure.run_worker(argv, timeout_s=args.timeout,
                                          max_rss_bytes=int(max_extra + 2 * _measure.GIB), threads=args.threads)
                if res["status"] != "ok":
                    why = res.get("reason") or f"error (exit {res.get('returncode')}): {res.get('stderr', '')[-300:]}"
                    failed[name] = res["status"]
                    res.update({"impl": name, "n": n, "note": f"{res['status']}: {why}"})
                    print(f"[bench] N={n} {name}: {res['note']}", file=sys.stderr)
                    runs[name] = [res]
                    continue
                runs[name].append(res)
                print(f"[bench] N={n} {name}: {_fmt_time(res['median_s'])}, {_fmt_bytes(res['extra_peak_bytes'])}, "
                      f"loss {res['loss']:.6f}", file=sys.stderr, flush=True)
        for name in runnable:
            res = merge_rounds(runs[name])
            if res["status"] == "ok":
                measured[name][n] = res["extra_peak_bytes"]
            results.append(res)

    order = list(IMPLS)
    results.sort(key=lambda r: (r["n"], order.index(r["impl"])))
    check_agreement(results)
    for r in results:
        if r["status"] == "ok" and not r["agrees"]:
            print(f"[bench] WARNING: N={r['n']} {r['impl']} disagrees with {r['reference']}: loss rel diff "
                  f"{r['loss_rel_diff']:.2e}, gradient rel diff {r['grad_rel_diff']:.2e}", file=sys.stderr)
    targets = evaluate_targets(results)
    markdown = render_markdown(machine, settings, results, targets)
    print(markdown)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("losses_quick" if args.quick else "losses")
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine, "settings": settings, "results": results, "targets": targets}, indent=2) + "\n")
    print(f"[bench] wrote {out / stem}.md and .json", file=sys.stderr)
    return 0 if all(r["agrees"] for r in results if r["status"] == "ok") else 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", "--n", dest="n", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help=f"comma-separated N (pairs); default {','.join(map(str, FULL_SIZES))} "
                        f"(--quick: {','.join(map(str, QUICK_SIZES))})")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--large-impls", default="cmgen-chunked",
                   help=f"the implementations run at N >= {LARGE_N} (others are listed as not run)")
    p.add_argument("--quick", action="store_true", help="small sizes, short budget: a smoke run in about a minute")
    p.add_argument("--repeat", type=int, default=None, help="timed passes per configuration (default 5, --quick 3)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per configuration; no new pass starts after it (default 20, --quick 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration in this many fresh workers, interleaved, and pool the timings")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=2048, help="chunk_size of cmgen-chunked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a worker is killed")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip configurations predicted to need more extra memory (default 60%% of MemAvailable)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for .md and .json")
    p.add_argument("--stem", default=None, help="file name (no suffix) in --out; default losses (--quick: losses_quick)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.budget is None:
        args.budget = 2.0 if args.quick else 20.0
    for name in ("repeat", "rounds", "dim", "threads", "chunk_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0 or args.budget <= 0 or args.timeout <= 0:
        raise SystemExit(f"--temperature, --budget and --timeout must be > 0, got "
                         f"{args.temperature}, {args.budget}, {args.timeout}")
    if args.n is not None and (not args.n or min(args.n) < 2):
        raise SystemExit(f"--sizes needs N >= 2, got {args.n}")
    if args.worker and (args.impl is None or args.n is None or len(args.n) != 1):
        raise SystemExit("--worker needs --impl and exactly one --sizes value")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())

"""Retrieval evaluation at scale: cmgen from embeddings vs faiss top-k vs a CLIP4Clip full matrix.

Setting: N texts x N videos (one caption per video, text i <-> video i), D = 256, fp32, 2 threads.
The embeddings are seeded unit vectors with video_i = normalize(text_i + sigma * noise), so the correct
item is often but not always near the top (sigma = 4 puts the correct pair's cosine near 0.25, about
4 standard deviations of the other pairs').
Each configuration runs in a fresh worker process (``--worker``) that builds the embeddings, resets the
kernel's RSS high-water mark, runs the evaluation once and reports wall time, process CPU time, the
extra peak RSS (``VmHWM`` - ``VmRSS`` before the call, :class:`_measure.PeakMemory`) and the total
peak RSS of the process.

Implementations:

* ``cmgen``     ``evaluation.retrieval.retrieval_metrics_from_embeddings(text, video)``: every rank in
  both directions, so R@1/5/10, MdR and MnR (tie-aware; no ties occur on this data).
* ``faiss``     ``faiss.IndexFlatIP`` (exact inner product): videos indexed and searched by the texts,
  top 10, then texts indexed and searched by the videos; R@1/5/10 only (a top-10 list cannot give
  the median or mean rank).
* ``clip4clip`` the full (N, N) matrix ``text @ video.T`` in numpy and CLIP4Clip's ``compute_metrics``
  (``np.sort(-x)`` per row, position of the diagonal) on it and on its transpose, as CLIP4Clip's
  evaluation does; run at the largest N (multiple of 1000) whose predicted peak, 4 float32 N x N
  arrays (the matrix, -x, its sort and the difference), fits in ``--full-max-gb``. cmgen and faiss
  run at that N as well, for a side-by-side row and an agreement check on all five metrics.

Checks: R@1/5/10 of cmgen and faiss must be identical at every N (the script exits 2 otherwise) and all
five cmgen metrics equal CLIP4Clip's at the full-matrix N. Targets (100k): cmgen total peak RSS <= 2 GiB
and time <= 1.5x faiss.

    python bench/retrieval.py                 # N = 100000, writes bench/results/retrieval.{md,json}
    python bench/retrieval.py --smoke         # N = 3000 / 1000 in seconds (writes retrieval_smoke.*)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402  (bench/ is a folder of scripts, not a package)

IMPLS = ("cmgen", "faiss", "clip4clip")
KS = (1, 5, 10)
TARGET_PEAK_BYTES = 2 * _measure.GIB
TARGET_TIME_RATIO = 1.5
FULL_ARRAYS = 4  # float32 N x N arrays alive at CLIP4Clip's peak


def make_embeddings(n: int, dim: int, sigma: float, seed: int):
    """(text, video), both (n, dim) float32 unit rows; video_i = normalize(text_i + sigma * noise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    video = torch.nn.functional.normalize(text + sigma * torch.randn(n, dim, generator=g) / math.sqrt(dim), dim=1)
    return text.contiguous(), video.contiguous()


def clip4clip_compute_metrics(x):
    """CLIP4Clip ``metrics.py::compute_metrics``, rows are queries, ground truth on the diagonal."""
    import numpy as np

    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, np.newaxis]
    ind = np.where(sx - d == 0)[1]
    return {"R@1": float(np.sum(ind == 0)) * 100 / len(ind), "R@5": float(np.sum(ind < 5)) * 100 / len(ind),
            "R@10": float(np.sum(ind < 10)) * 100 / len(ind), "MdR": float(np.median(ind) + 1),
            "MnR": float(np.mean(ind) + 1)}


def faiss_recalls(index_emb, query_emb, threads: int) -> dict[str, float]:
    """R@1/5/10 of queries i -> item i from an exact inner-product top-10 search."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(index_emb.shape[1])
    index.add(index_emb)
    _, labels = index.search(query_emb, max(KS))
    hit = labels == np.arange(len(query_emb))[:, None]
    return {f"R@{k}": float(100.0 * hit[:, :k].any(1).mean()) for k in KS}


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    text, video = make_embeddings(args.n, args.dim, args.sigma, args.seed)
    if args.impl == "cmgen":
        from evaluation.retrieval import retrieval_metrics_from_embeddings

        def run():
            return retrieval_metrics_from_embeddings(text, video)
    elif args.impl == "faiss":
        text_np, video_np = text.numpy(), video.numpy()

        def run():
            return {"t2v": faiss_recalls(video_np, text_np, args.threads),
                    "v2t": faiss_recalls(text_np, video_np, args.threads)}
    elif args.impl == "clip4clip":
        text_np, video_np = text.numpy(), video.numpy()

        def run():
            sim = text_np @ video_np.T
            return {"t2v": clip4clip_compute_metrics(sim), "v2t": clip4clip_compute_metrics(sim.T)}
    else:
        raise ValueError(f"unknown impl {args.impl!r}; choose from {IMPLS}")
    with _measure.PeakMemory("cpu") as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"impl": args.impl, "n": args.n, "metrics": metrics, "time_s": wall, "cpu_s": cpu,
            "extra_peak_bytes": peak.extra_bytes, "peak_rss_bytes": _measure._status_kib("VmHWM") * _measure.KIB,
            "baseline_rss_bytes": peak.baseline_bytes, "memory_method": peak.method}


# ------------------------------------------------------------------------------------------ driver

def full_matrix_n(max_bytes: float, cap: int) -> int:
    """Largest multiple of 1000 (or of 100 below 1000) whose CLIP4Clip peak fits in ``max_bytes``."""
    n = int(math.sqrt(max_bytes / (FULL_ARRAYS * 4)))
    n = (n // 1000) * 1000 if n >= 1000 else (n // 100) * 100
    return max(min(n, cap), 100)


def check_agreement(results: list[dict]) -> list[str]:
    """Problems found: cmgen vs faiss R@K at each N, cmgen vs CLIP4Clip on everything at the full N."""
    problems = []
    by = {(r["impl"], r["n"]): r for r in results if r["status"] == "ok"}
    for (impl, n), r in by.items():
        if impl == "cmgen":
            continue
        ours = by.get(("cmgen", n))
        if ours is None:
            continue
        keys = [f"R@{k}" for k in KS] + (["MdR", "MnR"] if impl == "clip4clip" else [])
        mine = [f"N={n} {d} {key}: cmgen {ours['metrics'][d][key]} vs {impl} {r['metrics'][d][key]}"
                for d in ("t2v", "v2t") for key in keys
                if not math.isclose(ours["metrics"][d][key], r["metrics"][d][key], rel_tol=0, abs_tol=1e-9)]
        r["agrees_with_cmgen"] = not mine
        problems += mine
    return problems


def _fmt_bytes(b: float) -> str:
    return f"{b / _measure.GIB:.2f} GiB" if b >= _measure.GIB / 4 else f"{b / _measure.MIB:.0f} MiB"


def _fmt_metric(m: dict, key: str) -> str:
    return "—" if key not in m else (f"{m[key]:.2f}" if key.startswith("R@") else f"{m[key]:.1f}")


def render_markdown(machine: dict, settings: dict, results: list[dict], problems: list[str],
                    targets: list[str]) -> str:
    lines = [f"# Retrieval evaluation at scale ({'smoke' if settings['smoke'] else 'full'} run)", "",
             f"Machine: {machine['cpu']}, {machine['threads']} threads, {machine['mem_total_gib']} GiB RAM, "
             f"torch {machine['torch']}, faiss {settings['faiss_version']}, {machine['date']}. "
             "The machine is shared with other jobs: wall times are noisy, the CPU time column less so.", "",
             f"N texts x N videos (text i <-> video i), D = {settings['dim']}, fp32, sigma = {settings['sigma']}. "
             "Peak = the worker's peak resident set (VmHWM, torch and the embeddings included); extra = "
             "above the RSS just before the call.", ""]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["n"], r["impl"], r["status"] + ": " + r.get("reason", r.get("stderr", ""))[-120:]]
                        + [""] * 9)
            continue
        t, v = r["metrics"]["t2v"], r["metrics"]["v2t"]
        rows.append([r["n"], r["impl"], f"{r['time_s']:.1f}", f"{r['cpu_s']:.1f}", _fmt_bytes(r["peak_rss_bytes"]),
                     _fmt_bytes(r["extra_peak_bytes"]),
                     " / ".join(_fmt_metric(t, f"R@{k}") for k in KS), _fmt_metric(t, "MdR"), _fmt_metric(t, "MnR"),
                     " / ".join(_fmt_metric(v, f"R@{k}") for k in KS), _fmt_metric(v, "MdR")])
    lines.append(_measure.markdown_table(
        ["N", "implementation", "time (s)", "CPU (s)", "peak RSS", "extra", "t2v R@1/5/10", "t2v MdR", "t2v MnR",
         "v2t R@1/5/10", "v2t MdR"], rows, align="rlrrrrlrrlr"))
    lines += ["", "## Checks", ""]
    lines += [f"- {t}" for t in targets]
    lines += ["- agreement: " + ("cmgen's R@1/5/10 equal faiss's at every N, and all five metrics equal "
                                 "CLIP4Clip's at its N" if not problems else "DISAGREEMENT: " + "; ".join(problems))]
    return "\n".join(lines) + "\n"


def evaluate_targets(results: list[dict], n: int) -> list[str]:
    by = {(r["impl"], r["n"]): r for r in results if r["status"] == "ok"}
    ours, theirs = by.get(("cmgen", n)), by.get(("faiss", n))
    out = []
    if ours is not None:
        ok = ours["peak_rss_bytes"] <= TARGET_PEAK_BYTES
        out.append(f"peak RSS at N={n}: {_fmt_bytes(ours['peak_rss_bytes'])} (target <= 2 GiB: "
                   f"{'met' if ok else 'MISSED'})")
    if ours is not None and theirs is not None:
        ratio = ours["time_s"] / theirs["time_s"]
        cpu_ratio = ours["cpu_s"] / max(theirs["cpu_s"], 1e-9)
        out.append(f"time at N={n}: cmgen {ours['time_s']:.1f} s vs faiss {theirs['time_s']:.1f} s = {ratio:.2f}x "
                   f"(CPU time {cpu_ratio:.2f}x; target <= {TARGET_TIME_RATIO}x: "
                   f"{'met' if ratio <= TARGET_TIME_RATIO else 'MISSED'})")
    return out


def driver(args: argparse.Namespace) -> int:
    if args.smoke:
        n, full_cap, max_gb = args.n or 3000, 1000, 0.1
    else:
        n, full_cap, max_gb = args.n or 100_000, 10**9, args.full_max_gb
    n_full = full_matrix_n(max_gb * _measure.GIB, min(full_cap, n))
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"unknown implementation(s) {unknown}; choose from {IMPLS}")
    if "faiss" in impls and _measure.package_version("faiss-cpu") is None and \
            _measure.package_version("faiss-gpu") is None:
        print("faiss is not installed (pip install faiss-cpu, or the [bench] extra); skipping it", file=sys.stderr)
        impls.remove("faiss")
    plan = [(impl, n_full) for impl in impls] + [(impl, n) for impl in impls if impl != "clip4clip" and n != n_full]
    limit = int(args.max_rss_gb * _measure.GIB)
    results = []
    for impl, size in plan:
        argv = [str(Path(__file__).resolve()), "--worker", "--impl", impl, "--n", str(size), "--dim", str(args.dim),
                "--sigma", str(args.sigma), "--seed", str(args.seed), "--threads", str(args.threads)]
        print(f"[retrieval bench] {impl} N={size} ...", file=sys.stderr, flush=True)
        if args.inline:  # smoke tests: no fresh process, so the memory columns include earlier runs
            r = {"status": "ok", **worker(parse_args(argv[1:]))}
        else:
            r = _measure.run_worker(argv, timeout_s=args.timeout, max_rss_bytes=limit, threads=args.threads)
        r.setdefault("impl", impl)
        r.setdefault("n", size)
        results.append(r)
        if r["status"] == "ok":
            print(f"  {r['time_s']:.1f} s, peak {_fmt_bytes(r['peak_rss_bytes'])}", file=sys.stderr, flush=True)
        else:
            print(f"  {r['status']}: {r.get('reason', r.get('stderr', ''))[-400:]}", file=sys.stderr, flush=True)
    problems = check_agreement(results)
    targets = evaluate_targets(results, n)
    machine = _measure.machine_info(args.threads)
    settings = {"n": n, "n_full": n_full, "dim": args.dim, "sigma": args.sigma, "seed": args.seed,
                "threads": args.threads, "smoke": args.smoke, "full_max_gb": max_gb,
                "faiss_version": _measure.package_version("faiss-cpu") or _measure.package_version("faiss-gpu")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("retrieval_smoke" if args.smoke else "retrieval")
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "settings": settings, "results": results,
                                                  "targets": targets, "problems": problems}, indent=2) + "\n")
    markdown = render_markdown(machine, settings, results, problems, targets)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    if any(r["status"] != "ok" for r in results):
        return 1
    return 2 if problems else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="texts = videos (default 100000, --smoke 3000)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--sigma", type=float, default=4.0, help="noise between a text and its video")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-max-gb", type=float, default=4.0,
                   help="memory allowed for the CLIP4Clip full-matrix run (sets its N)")
    p.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a worker whose RSS passes this")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a worker is killed")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds")
    p.add_argument("--inline", action="store_true",
                   help="run every configuration in this process (tests; memory numbers are then not per run)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for .md and .json")
    p.add_argument("--stem", default=None, help="file name (no suffix) in --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())

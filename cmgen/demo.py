"""``cmgen demo`` — the README's main job, on the embedded data, in a few CPU minutes.

It runs what exists, in order, and writes ``runs/demo/report.md`` (+ ``report.json``) with pictures
and tables:

1. the embedded datasets (shapes, moving-digits), written in their real benchmark formats and shown
   as PNG grids read back with the same decoders real data uses (PIL, decord);
2. the loss benchmark (``bench/losses.py --quick``: cmgen's NT-Xent against lightly and
   pytorch-metric-learning, where those are installed);
3. the training engine on its test method (``configs/toy/synthetic.yaml``), then each method that
   exists on its embedded dataset (VideoMoCo on moving digits, ContraGAN on shapes): loss curves,
   sample grids, metrics, checkpoints.

The other method subsystems (ContraD, XMC-GAN, support-set retrieval) are added as they land; until
then the report says they are not part of the demo yet.
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
NOT_YET = ("ContraD", "XMC-GAN", "support-set retrieval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where the report, data and runs go")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the engine's test method")
    parser.add_argument("--video-steps", type=int, default=150, help="training steps of VideoMoCo")
    parser.add_argument("--gan-steps", type=int, default=300, help="training steps of ContraGAN")
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


def _line_plot(series: dict[str, list[tuple[int, float]]], width: int = 480, panel: int = 90) -> Image.Image:
    """Loss curves as small multiples (one panel per term, linear axis with its own range), drawn with PIL
    so the demo needs no plotting library; terms of different scale and sign stay readable."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    img = Image.new("RGB", (width, max(1, len(series)) * panel), "white")
    draw = ImageDraw.Draw(img)
    s_max = max((s for pts in series.values() for s, _ in pts), default=1) or 1
    for k, (name, pts) in enumerate(series.items()):
        top, bottom = k * panel + 14, (k + 1) * panel - 14
        left, right = 60, width - 10
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        hi = hi if hi > lo else lo + 1e-12
        draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
        draw.text((2, top - 2), f"{hi:.3g}", fill="black")
        draw.text((2, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((left + 4, top - 13), name, fill=colours[k % len(colours)])
        draw.text((right - 60, bottom + 1), f"step {s_max}", fill="black")
        xy = [(left + (right - left) * s / s_max, bottom - (bottom - top) * (v - lo) / (hi - lo)) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colours[k % len(colours)], width=2)
        else:
            x, y = xy[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colours[k % len(colours)])
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


# metrics.jsonl keys that are bookkeeping, not loss terms or evaluation metrics
_NOT_PLOTTED = ("step", "epoch", "time", "steps_per_sec", "lr/", "grad_norm/")


def _train_and_report(out: Path, config: Path, run_name: str, steps: int, overrides: list[str], title: str,
                      blurb: str, report: list[str], summary: dict) -> None:
    """Train ``config`` for ``steps`` steps under ``out/runs/run_name`` and add its section to the report:
    loss curves, first/last values, the last sample grid, the checkpoints kept."""
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    _stage(f"training {run_name} for {steps} steps ({config.relative_to(PROJECT_ROOT)})")
    cfg = load_config(config, [f"run.output_dir={out / 'runs'}", f"run.name={run_name}", f"train.max_steps={steps}",
                               f"train.checkpoint_every={max(steps // 2, 1)}", f"train.sample_every={steps}",
                               f"train.eval_every={max(steps // 3, 1)}", f"train.log_every={max(steps // 20, 1)}", *overrides])
    # the demo is a fresh run every time; its own earlier run is replaced, never resumed
    shutil.rmtree(out / "runs" / run_name, ignore_errors=True)
    start = time.time()
    result = train(cfg)
    seconds = time.time() - start
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if not k.startswith(_NOT_PLOTTED) and isinstance(v, (int, float)):
                series.setdefault(k, []).append((r["step"], float(v)))
    _line_plot(series).save(out / f"{run_name}_losses.png")
    checkpoints = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir() if p.is_dir())
    report += [f"## {title}", "", blurb, "",
               f"{steps} steps in {seconds:.0f} s. Run directory: `{result.run_dir}` (config.yaml, checkpoints/, "
               "samples/, logs/ for TensorBoard, metrics.jsonl).", "",
               f"![{run_name} losses]({run_name}_losses.png)", "",
               "| term | first | last |", "|---|---|---|",
               *[f"| {k} | {v[0][1]:.4g} | {v[-1][1]:.4g} |" for k, v in series.items()], ""]
    samples = sorted((result.run_dir / "samples").glob("*.png"))
    if samples:
        grid = Image.open(samples[-1])
        zoom = max(1, 480 // max(grid.size))      # small grids (32 px images) are enlarged to be seen
        grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(out / f"{run_name}_samples.png")
        report += [f"Samples at step {result.step}:", "", f"![{run_name} samples]({run_name}_samples.png)", ""]
    report += [f"Checkpoints kept: {', '.join(checkpoints)}. Continue with "
               f"`cmgen train {config.relative_to(PROJECT_ROOT)} run.output_dir={out / 'runs'} "
               f"run.name={run_name} resume=latest train.max_steps=...`.", ""]
    summary[run_name] = {"run_dir": str(result.run_dir), "step": result.step, "seconds": round(seconds, 1),
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
    configs = PROJECT_ROOT / "configs"
    _train_and_report(out, configs / "toy" / "synthetic.yaml", "toy", args.steps, [],
                      "Training engine: test method `toy`",
                      "Two models, two optimizer updates per batch, EMA, a queue buffer: the engine's worked example.",
                      report, summary)
    _train_and_report(out, configs / "videomoco" / "moving_digits.yaml", "videomoco", args.video_steps,
                      [f"data.root={out / 'data' / 'videomoco_digits'}",
                       f"model.adversarial_start_step={args.video_steps // 3}"],
                      "VideoMoCo on moving digits",
                      "MoCo discriminator with a temporally decayed queue; after a MoCo-only third, the generator "
                      "learns which 25% of frames to drop. `eval/knn_top1`: 1-NN accuracy of test clips' "
                      "embeddings against training clips (8 direction classes: chance 12.5%). Samples: frames "
                      "of test clips after the generator's dropping (grey frames).",
                      report, summary)
    _train_and_report(out, configs / "contragan" / "shapes.yaml", "contragan", args.gan_steps, [],
                      "ContraGAN on shapes",
                      "BigGAN-style class-conditional GAN with the 2C loss; one row of EMA-generator samples "
                      "per shape class.", report, summary)
    report += ["## Not in the demo yet", "",
               "These subsystems are not implemented yet; each adds its part here when it lands: "
               + ", ".join(NOT_YET) + ".", "",
               f"Total demo time: {time.time() - start:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(report))
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    _stage(f"report: {out / 'report.md'}")
    return 0

"""``cmgen demo`` — the README's main job, on the embedded data, in a few CPU minutes.

It runs what exists, in order, and writes ``runs/demo/report.md`` (+ ``report.json``) with pictures
and tables:

1. the embedded datasets (shapes, moving-digits), written in their real benchmark formats and shown
   as PNG grids read back with the same decoders real data uses (PIL, decord);
2. the loss benchmark (``bench/losses.py --quick``: cmgen's NT-Xent against lightly and
   pytorch-metric-learning, where those are installed);
3. the training engine on its test method (``configs/toy/synthetic.yaml``), then each method subsystem
   on its embedded dataset (:data:`METHOD_STAGES`), each within its share of ``--budget`` seconds: loss
   curves (matplotlib), sample grids, metrics against baselines and chance, checkpoints;
4. the same report as one self-contained HTML page (``report.html``, images inline).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where the report, data and runs go")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the engine's test method")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds of training shared by the method stages (the whole demo adds about 1 min)")
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


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1.0 - weight) * v
        out.append(avg / (1.0 - weight ** i))
    return out


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path, title: str, smoothing: float = 0.8) -> Path:
    """One panel per logged term (terms differ in scale and sign), raw values faint and the smoothed curve
    solid, with axes, ticks and a legend; saved as PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series) or ["(nothing logged)"]
    cols = 2 if len(names) > 1 else 1
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = series.get(name, [])
        if pts:
            steps, values = zip(*pts)
            sparse = len(values) < 20                       # few points (eval metrics): show each one
            ax.plot(steps, values, color="tab:blue", alpha=1.0 if sparse else 0.3, linewidth=1,
                    marker="o" if sparse else None, markersize=4, label="raw")
            if len(values) > 2 and not sparse:
                ax.plot(steps, _smooth(list(values), smoothing), color="tab:blue", linewidth=2,
                        label=f"smoothed (EMA {smoothing})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("metric" if name.startswith("eval/") else "loss (per term)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_html(markdown_text: str, out: Path, name: str = "report.html") -> Path:
    """The report as one self-contained HTML page: markdown rendered with tables, every local PNG inlined
    as a data URI, so the page can be mailed or opened anywhere."""
    import base64
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])

    def inline(match: re.Match) -> str:
        src = match.group(1)
        file = out / src
        if src.startswith(("http:", "https:", "data:")) or not file.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(file.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"]+)"', inline, body)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>cmgen demo report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px}"
            "img{max-width:100%;image-rendering:pixelated}code{background:#f3f3f3}</style></head><body>"
            f"{body}</body></html>\n")
    path = out / name
    path.write_text(page, encoding="utf-8")
    return path


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


def probe_speed(result, steps: int, seconds: float) -> tuple[float, float]:
    """``(steps per second, fixed seconds)`` of a timed ``steps``-step probe run: the engine's logged
    training speed, and what the run cost beyond its steps (data, model build, evaluation)."""
    speed = float(result.metrics.get("steps_per_sec") or steps / seconds)
    return speed, max(seconds - steps / speed, 0.0)


def steps_within(seconds: float, speed: float, fixed: float, minimum: int) -> int:
    """Steps of one run that fit ``seconds`` at ``speed`` steps/s after its ``fixed`` cost (10% margin),
    at least ``minimum`` (so a tiny budget overruns rather than training nothing)."""
    return max(minimum, int((seconds - fixed) * speed * 0.9))


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
    plot_curves(series, out / f"{run_name}_losses.png", f"{title}: logged terms ({steps} steps)")
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


def _videomoco_run(out: Path, report: list[str], summary: dict, budget_s: float) -> None:
    """VideoMoCo's plain training run (loss curves, dropped-frame samples, 1-NN accuracy)."""
    steps = max(3, int(budget_s / 0.6))                  # about 0.6 s a step on 2 cores
    _train_and_report(out, PROJECT_ROOT / "configs" / "videomoco" / "moving_digits.yaml", "videomoco", steps,
                      [f"model.adversarial_start_step={steps // 3}"], "VideoMoCo on moving digits",
                      "MoCo discriminator with a temporally decayed queue; after a MoCo-only third, the generator "
                      "learns which 25% of frames to drop. `eval/knn_top1`: 1-NN accuracy of test clips' "
                      "embeddings against training clips (8 direction classes: chance 12.5%). Samples: frames "
                      "of test clips after the generator's dropping (grey frames).", report, summary)


def _contragan_run(out: Path, report: list[str], summary: dict, budget_s: float) -> None:
    """ContraGAN's plain training run (loss curves, one row of EMA samples per class)."""
    steps = max(2, int(budget_s / 0.5))
    _train_and_report(out, PROJECT_ROOT / "configs" / "contragan" / "shapes.yaml", "contragan", steps, [],
                      "ContraGAN on shapes", "class-conditional DCGAN with the 2C loss; one row of "
                      "EMA-generator samples per shape class.", report, summary)


# Method subsystems that add their own demo section: (title, "module:function", share of the training
# budget, fallback). Each function is ``demo_stage(out, report, summary, budget_s)``: it trains and
# evaluates on the embedded data within about ``budget_s`` seconds and appends its markdown section to
# ``report``. Where a subsystem has no such function, its plain training run (fallback) stands in.
METHOD_STAGES = (
    ("VideoMoCo: pretraining and probes on moving digits", "video.finetune:demo_stage", 0.17, _videomoco_run),
    ("Contrastive GAN discriminators on shapes", "text2image.gan_demo:demo_stage", 0.45, _contragan_run),
    ("XMC-GAN text-to-image on shapes", "text2image.xmcgan_demo:demo_stage", 0.25, None),
    ("Support-set video-text retrieval on moving digits", "video.supportset:demo_stage", 0.13, None),
)


def _stage_function(target: str):
    """The stage function named ``module:function``, or None where that subsystem has none yet."""
    import importlib

    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the method stages' embedded datasets go under the demo's folder too (not ./data), unless the user
    # chose a data location
    os.environ.setdefault("CMGEN_DATA", str((out / "data").resolve()))
    from cmgen.generate_cli import quiet_progress_bars

    with quiet_progress_bars():      # no "Loading weights" bar each time a stage loads the text encoder
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    start = time.time()
    report = ["# cmgen demo report", "",
              f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
              f"torch {torch.__version__} · {torch.get_num_threads()} threads · "
              f"training budget {args.budget:.0f} s", ""]
    summary: dict = {"budget_s": args.budget, "stages": {}}
    _demo_data(out, report, summary)
    if not args.skip_bench:
        _demo_bench(out, report, summary)
    configs = PROJECT_ROOT / "configs"
    _train_and_report(out, configs / "toy" / "synthetic.yaml", "toy", args.steps, [],
                      "Training engine: test method `toy`",
                      "Two models, two optimizer updates per batch, EMA, a queue buffer: the engine's worked example.",
                      report, summary)
    missing = []
    for title, target, share, fallback in METHOD_STAGES:
        fn = _stage_function(target) or fallback
        if fn is None:
            missing.append(title)
            continue
        _stage(f"{title} (budget {share * args.budget:.0f} s)")
        t0 = time.time()
        fn(out, report, summary, share * args.budget)
        summary["stages"][title] = {"seconds": round(time.time() - t0, 1), "budget_s": round(share * args.budget, 1)}
    if missing:
        report += ["## Not in the demo yet", "", "These subsystems have no demo stage yet: " + ", ".join(missing) + ".", ""]
    total = time.time() - start
    summary["seconds"] = round(total, 1)
    report += ["## Time", "", "| stage | seconds | budget |", "|---|---:|---:|",
               *[f"| {t} | {v['seconds']:.0f} | {v['budget_s']:.0f} |" for t, v in summary["stages"].items()],
               f"| whole demo (data, benchmark, engine, methods) | {total:.0f} | |", ""]
    (out / "report.md").write_text("\n".join(report))
    write_html("\n".join(report), out)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    _stage(f"report: {out / 'report.md'} and {out / 'report.html'} ({total:.0f} s)")
    return 0

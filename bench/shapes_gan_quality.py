"""Sample quality of a GAN shapes config per seed (issue 7): train, time, sample the G-EMA, score.

    python bench/shapes_gan_quality.py configs/contrad/shapes.yaml --seeds 0 1 2
    python bench/shapes_gan_quality.py configs/contrad/shapes.yaml --seeds 0 --tag hfrt2000 \\
        --out /tmp/me/sq --json bench/results/shapes_gan_quality.jsonl model.augment=simclr_hfrt train.max_steps=2000

Per seed (``run.seed``; the data stay ``data.seed``'s): the config with the overrides is trained from
scratch under ``--out`` (a temporary folder by default; with ``--out`` the data, in the GAN demo's folder
for their settings, and the shapes evaluator are written once and reused), ``train.sample_every=0`` and no trackers. The data are written before the
clocks start, so CPU seconds (``time.process_time``, this process, ``--threads`` threads) and wall seconds
cover ``cmgen.engine.trainer.train`` only. Then ``--samples`` images of the G-EMA (the run's last
checkpoint, ``cmgen.generate_cli``, sample seed 0) are scored by the shapes evaluator of the run's data:

- class-conditional G: ``evaluation.shapes_eval.evaluate_generator`` (class accuracy against the drawn
  classes, uniform; shapes-FD), as the GAN demo scores; criterion class accuracy >= 0.60. Also how the
  run's own D reads classes with its conditional head (``Discriminator.classify``, nearest 2C proxy or
  largest projection): ``d_real_acc`` on the real val images, ``d_fake_acc`` on the fakes against their
  labels (a D head near chance on reals gives G no class signal);
- unconditional G: ``text2image.contrad.unconditional_shapes_scores`` (confident share at max prob >=
  0.5, classes covered, class entropy / log 5, shapes-FD); criterion >= 60 % confident with all 5 classes.

Shapes-FD is in the evaluator's feature space, not FID. Prints a markdown table (one row per seed, then
the mean); ``--json FILE`` appends one JSON line per seed. ``--curve`` also scores every kept checkpoint
(a learning curve: how many steps a config needs; pick them with ``train.checkpoint_every`` and
``train.keep_last``) and prints a step-by-seed table; ``--plot FILE.png`` draws the curves against the
step and the CPU minutes of this machine, with chance and the criterion.

    python bench/shapes_gan_quality.py configs/contragan/shapes.yaml --seeds 0 --curve --plot curve.png \\
        train.max_steps=8000 train.checkpoint_every=1000 train.keep_last=8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

import _measure  # noqa: E402

from text2image.contrad import SHAPES_CRITERION  # noqa: E402

CRITERION = {"class_accuracy": 0.60, **SHAPES_CRITERION}   # issue 7


def score(source, samples: int) -> dict:
    """Score ``samples`` G-EMA images of ``source`` (run or checkpoint directory) with its kind's scorer;
    one draw of samples serves the evaluator and, for a conditional G, D's own head."""
    from cmgen.generate_cli import load_generator, sample_tensors
    from evaluation.generation_cli import shapes_root_of
    from evaluation.shapes_eval import ShapesEvaluator
    from text2image.contrad import meets_shapes_criterion, unconditional_shapes_scores

    lg = load_generator(source)
    ev = ShapesEvaluator.load_or_train(shapes_root_of(lg.method, lg.cfg))
    fakes, labels = sample_tensors(lg, samples, seed=0)
    rec: dict = {"weights": lg.source.get("weights")}
    if lg.num_classes:
        m = ev.evaluate(fakes, labels=labels)
        rec.update(class_accuracy=m["class_accuracy"], shapes_fd=m["shapes_fd"])
        rec["meets"] = m["class_accuracy"] >= CRITERION["class_accuracy"]
        rec.update(d_head_accuracy(lg, source, fakes, labels))
    else:
        rec.update(unconditional_shapes_scores(ev, fakes))
        rec["meets"] = meets_shapes_criterion(rec)
    return rec


def d_head_accuracy(lg, source, fakes, labels) -> dict:
    """How well the run's D reads classes with its own conditional head (``Discriminator.classify``): on the
    real val images of its data (``d_real_acc``) and on ``fakes`` G(z, y) (in [0, 1]) against
    ``labels`` y (``d_fake_acc``).
    Empty for a D without one."""
    from cmgen.engine.checkpoint import load_model_state
    from cmgen.generate_cli import resolve_checkpoint
    from evaluation.generation_cli import shapes_root_of
    from evaluation.shapes_eval import load_split

    d = lg.method.build_models(lg.cfg).get("d")
    if not hasattr(d, "classify") or getattr(d, "cond_mtd", "W/O") == "W/O":
        return {}
    d.load_state_dict(load_model_state(resolve_checkpoint(source), "d"))
    d.eval()
    lo, hi = lg.output_range
    images, targets, _ = load_split(Path(shapes_root_of(lg.method, lg.cfg)), "val", lg.cfg.model.image_size)
    acc = lambda x, y: float((d.classify(lo + (hi - lo) * x) == y).float().mean())   # noqa: E731
    return {"d_real_acc": acc(images, targets["shape"]), "d_fake_acc": acc(fakes, labels)}


def _rounded(rec: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}


def measure_seed(config: str, seed: int, out: Path, overrides: list[str], samples: int, tag: str,
                 curve: bool = False) -> dict:
    """Train ``config`` at ``run.seed=seed`` under ``out``, then score ``samples`` G-EMA images; with
    ``curve``, also every kept checkpoint (``record["curve"]``, oldest first; ``train.keep_last`` and
    ``train.checkpoint_every`` decide which are kept)."""
    from cmgen.engine.checkpoint import list_checkpoints
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import run_dir_of, train
    from text2image import gan_demo
    from text2image.contragan import build_class_image_dataset

    base = load_config(config, overrides)
    # one data folder per (size, num_images, data seed, max_shapes), as the GAN demo names them
    data = [] if base.data.root else [f"data.root={gan_demo.shapes_data_root(out, base)}"]
    cfg = load_config(config, [*overrides, *data, f"run.seed={seed}", f"run.output_dir={out / 'runs'}",
                               f"run.name={tag}-s{seed}", "train.sample_every=0", "train.trackers=[]",
                               "train.progress_bar=false"])
    shutil.rmtree(run_dir_of(cfg), ignore_errors=True)                 # a fresh run, never a resume
    build_class_image_dataset(cfg, cfg.model.image_size, (0.0, 1.0))   # the data, before the clocks
    c0, w0 = time.process_time(), time.perf_counter()
    train(cfg)
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
    run_dir = run_dir_of(cfg)
    rec = {"tag": tag, "config": config, "overrides": overrides, "seed": seed, "steps": cfg.train.max_steps,
           "cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1), "samples": samples, **score(run_dir, samples)}
    if curve:
        rec["curve"] = [_rounded({"step": step, **score(path, samples)})
                        for step, path in list_checkpoints(run_dir / "checkpoints")]
    return _rounded(rec)


def metric_key(records: list[dict]) -> str:
    """The criterion metric of these records: class accuracy (conditional G) or confident share."""
    return "class_accuracy" if "class_accuracy" in records[0] else "confident"


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """The curve of each seed (metric against step, and CPU-s on a second axis), chance and criterion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric_key(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in records:
        pts = r.get("curve") or [{"step": r["steps"], key: r[key]}]
        ax.plot([p["step"] for p in pts], [p[key] for p in pts], marker="o", label=f"seed {r['seed']}")
    ax.axhline(CRITERION[key], color="tab:green", ls="--", lw=1, label=f"target {CRITERION[key]:.0%}")
    if key == "class_accuracy":
        ax.axhline(0.2, color="grey", ls=":", lw=1, label="chance 20%")
    ax.set_xlabel("training step")
    ax.set_ylabel("class accuracy of EMA samples" if key == "class_accuracy" else "confident share of EMA samples")
    ax.set_ylim(0, 1)
    sec_per_step = statistics.fmean(r["cpu_s"] / r["steps"] for r in records)
    top = ax.secondary_xaxis("top", functions=(lambda s: s * sec_per_step / 60, lambda m: m * 60 / sec_per_step))
    top.set_xlabel(f"CPU minutes at {sec_per_step:.2f} CPU-s/step (this machine)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_table(records: list[dict]) -> str:
    """One row per kept checkpoint step, one metric column per seed."""
    key = metric_key(records)
    steps = sorted({p["step"] for r in records for p in r.get("curve", [])})
    per = {r["seed"]: {p["step"]: p for p in r.get("curve", [])} for r in records}
    fmt = (lambda v: f"{v:.2f}") if key == "class_accuracy" else (lambda v: f"{v:.0%}")
    rows = [[s, *(fmt(per[r["seed"]][s][key]) if s in per[r["seed"]] else "" for r in records)] for s in steps]
    return _measure.markdown_table(["step", *(f"seed {r['seed']}" for r in records)], rows,
                                   align="l" + "r" * len(records))


def table(records: list[dict]) -> str:
    """One row per seed, then the mean of the numeric columns and the number of seeds meeting the criterion."""
    cond = metric_key(records) == "class_accuracy"
    cols = (["class_accuracy"] if cond else ["confident", "classes_covered", "class_entropy"]) + ["shapes_fd"]
    heads = ["seed", "steps", "CPU-s", "wall-s", *("class acc" if c == "class_accuracy" else c for c in cols),
             "meets"]
    fmt = {"confident": "{:.0%}", "class_accuracy": "{:.2f}", "classes_covered": "{:.1f}",
           "class_entropy": "{:.2f}", "shapes_fd": "{:.0f}"}
    rows = [[r["seed"], r["steps"], f"{r['cpu_s']:.0f}", f"{r['wall_s']:.0f}",
             *(fmt[c].format(r[c]) if c != "classes_covered" else r[c] for c in cols), "yes" if r["meets"] else "no"]
            for r in records]
    mean = lambda k: statistics.fmean(r[k] for r in records)  # noqa: E731
    rows.append(["mean", "", f"{mean('cpu_s'):.0f}", f"{mean('wall_s'):.0f}", *(fmt[c].format(mean(c)) for c in cols),
                 f"{sum(r['meets'] for r in records)}/{len(records)}"])
    return _measure.markdown_table(heads, rows, align="l" + "r" * (len(heads) - 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--tag", default=None, help="run name prefix and JSON tag (default: the config's stem)")
    p.add_argument("--out", type=Path, default=None, help="runs and data go here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per seed to this file")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--curve", action="store_true",
                   help="also score every kept checkpoint (set train.checkpoint_every / train.keep_last)")
    p.add_argument("--plot", type=Path, default=None, help="write the curves (or final scores) as a PNG here")
    args = p.parse_intermixed_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    tag = args.tag or Path(args.config).stem
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="shapes_gan_quality_")
    out = args.out or Path(tmp.name)
    try:
        records = []
        for seed in args.seeds:
            records.append(measure_seed(args.config, seed, out, args.overrides, args.samples, tag, args.curve))
            print(json.dumps(records[-1]), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                with open(args.json, "a") as f:
                    f.write(json.dumps({**records[-1], "machine": _measure.cpu_model()}) + "\n")
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\n{tag}: {args.config} {' '.join(args.overrides)} ({args.samples} G-EMA samples, "
          f"{args.threads} thread(s))\n\n{table(records)}")
    if args.curve:
        print(f"\nper kept checkpoint (G-EMA):\n\n{curve_table(records)}")
    if args.plot:
        plot_curves(records, args.plot, f"{tag}: {Path(args.config).name} {' '.join(args.overrides)}"[:110])
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

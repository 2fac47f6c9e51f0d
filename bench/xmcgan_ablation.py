"""XMC-GAN ablation on the embedded shapes (issue 9): which contrastive terms make G follow its caption?

    python bench/xmcgan_ablation.py --steps 600            # four runs, one thread each, CPU minutes
    python bench/xmcgan_ablation.py --steps 4 --smoke      # seconds (checks the script runs)

Trains ``configs/xmcgan/shapes.yaml`` four times for the same number of steps, the only difference being
the contrastive terms (``text2image.xmcgan_demo.ABLATION``): none (hinge + the projection head only),
sentence-image, + word-region, + image-image on D's features (the full official objective without the
ImageNet term, which needs weights no machine here has). Each G-EMA draws one image per held-out (val)
caption; the shapes evaluator predicts the primary object's shape, colour, size and position, scored
against the caption (and against shuffled captions: the caption-blind baseline). Shapes-evaluator
numbers, not comparable with anything published. Results: ``bench/results/xmcgan_ablation.{md,json}``;
time is CPU seconds of this process (``time.process_time``), one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", type=Path, default=Path("runs/xmcgan_ablation"), help="runs and data go here")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help="tiny evaluator and data: checks the script, numbers mean nothing")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from text2image import xmcgan_demo

    extra = list(args.overrides)
    if args.smoke:
        from evaluation import shapes_eval

        shapes_eval._TRAIN_IMAGES, shapes_eval._EPOCHS = 400, 1
        xmcgan_demo.DATA_SETTINGS = {**xmcgan_demo.DATA_SETTINGS, "num_images": 64}
        extra += ["train.batch_size=8"]
    res = xmcgan_demo.ablation(args.out, args.steps, extra=extra)
    name = "xmcgan_ablation_smoke" if args.smoke else "xmcgan_ablation"
    lines = [f"# XMC-GAN ablation on shapes ({args.steps} steps per run, {args.threads} thread(s))", "",
             "Attribute accuracy of the primary object of images generated from every val caption "
             "(shapes evaluator; not comparable with published numbers).", "", *res["markdown"], "",
             "| run | CPU s (process_time) |", "|---|---:|",
             *[f"| {k} | {v:.1f} |" for k, v in res["cpu_seconds"].items()], ""]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.md").write_text("\n".join(lines))
    (args.results / f"{name}.json").write_text(json.dumps({k: v for k, v in res.items() if k != "markdown"},
                                                          indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

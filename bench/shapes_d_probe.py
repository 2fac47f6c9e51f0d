"""How fast a ContraGAN config's discriminator learns the shape class without a generator (issue 7).

D is trained on the config's real training images with only its conditional term, ``lambda * 2C(e(x),
p_y, y)`` (the D side of the GAN's class signal), by the config's D optimiser, ``train.batch_size`` images
a step; every ``--every`` steps its head (``Discriminator.classify``: nearest proxy) is read on held-out
shapes images written with the same settings and another data seed (``--test-seed``). The anchor is the
shapes evaluator's network (:class:`evaluation.shapes_eval.ShapesClassifier`, shape head, cross-entropy)
trained on the same batches with the same optimiser. A D whose head stays far below the anchor here
cannot tell G the shape in the GAN either. Prints a step table (D head, anchor) and CPU seconds;
``--json FILE`` appends one line.

    python bench/shapes_d_probe.py configs/contragan/shapes.yaml model.backbone=deep_conv \\
        model.attention_at=null --steps 1000

Session-17 readings (1000 steps, 224 training images, 448 held-out, one seed; about +-0.08 between
seeds): BigGAN D of configs/contragan/shapes.yaml 0.45 (anchor 0.57), DCGAN D (``model.backbone=deep_conv
model.attention_at=null``) 0.52 (anchor 0.65) at half the BigGAN D's CPU time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

import _measure  # noqa: E402


def _optimizer(params, cfg):
    import torch

    o = cfg.gan.d_optim or cfg.optim
    if o.name != "adam":
        raise ValueError(f"the probe uses the D optimiser's Adam settings; gan.d_optim.name is {o.name!r}")
    return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def probe(config: str, overrides: list[str], steps: int, every: int, out: Path, test_seed: int = 7,
          seed: int = 0) -> dict:
    """Train D (2C only) and the anchor for ``steps`` on the same batches; held-out accuracies every ``every``."""
    import torch
    import torch.nn.functional as F

    from cmgen.data import ensure_dataset, write_shapes
    from cmgen.engine.registry import load_config, resolve_method
    from evaluation.shapes_eval import ShapesClassifier, load_split
    from text2image.contragan import build_class_image_dataset

    cfg = load_config(config, [*overrides, f"run.output_dir={out / 'runs'}", f"run.seed={seed}"])
    if cfg.method != "contragan" or cfg.model.d_cond_mtd != "2C" or cfg.data.kind != "shapes":
        raise ValueError(f"{config}: the probe needs a ContraGAN config with model.d_cond_mtd=2C on shapes data")
    method = resolve_method(cfg.method)(cfg)
    size, (lo, hi) = cfg.model.image_size, method.output_range
    ds, _ = build_class_image_dataset(cfg, size, (lo, hi))
    x_train, y_train = zip(*(ds[i] for i in range(len(ds))))
    x_train, y_train = torch.stack(x_train), torch.tensor(y_train)
    d = cfg.data
    test_root = out / "data" / f"probe_test_{size}px_s{test_seed}_m{d.max_shapes}_{d.primary_size}"
    ensure_dataset(test_root, "dataset_info.json", lambda: write_shapes(
        test_root, num_images=512, image_size=size, seed=test_seed, max_shapes=d.max_shapes,
        primary_size=d.primary_size, progress=False))
    x_test, t_test, _ = load_split(test_root, "train", size)

    torch.manual_seed(seed)
    disc = method.build_models(cfg)["d"]
    anchor = ShapesClassifier(size)
    opt_d, opt_a = _optimizer(disc.parameters(), cfg), _optimizer(anchor.parameters(), cfg)
    gen = torch.Generator().manual_seed(seed)
    rows, cpu = [], {"d": 0.0, "anchor": 0.0}
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_train), (cfg.train.batch_size,), generator=gen)
        x, y = x_train[idx], y_train[idx]
        t0 = time.process_time()
        out_d = disc(x, y)
        loss_d = cfg.model.cond_lambda * method.two_c(out_d.embeddings, out_d.proxies, y)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        t1 = time.process_time()
        loss_a = F.cross_entropy(anchor((x - lo) / (hi - lo))[1]["shape"], y)
        opt_a.zero_grad(set_to_none=True)
        loss_a.backward()
        opt_a.step()
        cpu["d"] += t1 - t0
        cpu["anchor"] += time.process_time() - t1
        if step % every == 0 or step == steps:
            disc.eval(), anchor.eval()
            with torch.no_grad():
                acc_d = float((disc.classify(lo + (hi - lo) * x_test) == t_test["shape"]).float().mean())
                acc_a = float((anchor(x_test)[1]["shape"].argmax(1) == t_test["shape"]).float().mean())
            disc.train(), anchor.train()
            rows.append({"step": step, "d_head_acc": round(acc_d, 4), "anchor_acc": round(acc_a, 4),
                         "d_2c": round(loss_d.item(), 4)})
    return {"config": config, "overrides": overrides, "steps": steps, "train_images": len(ds),
            "test_images": len(x_test), "cpu_s_d": round(cpu["d"], 1), "cpu_s_anchor": round(cpu["anchor"], 1),
            "curve": rows}


def table(rec: dict) -> str:
    rows = [[r["step"], f"{r['d_head_acc']:.2f}", f"{r['anchor_acc']:.2f}", f"{r['d_2c']:.3f}"] for r in rec["curve"]]
    return _measure.markdown_table(["step", "D head (2C only)", "anchor (evaluator net, CE)", "D 2C loss"], rows,
                                   align="lrrr")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--test-seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=None, help="data and runs go here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="append the record as one JSON line")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_intermixed_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="shapes_d_probe_")
    try:
        rec = probe(args.config, args.overrides, args.steps, args.every, args.out or Path(tmp.name), args.test_seed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"{args.config} {' '.join(args.overrides)}: {rec['train_images']} training images, {rec['test_images']} "
          f"held-out, {args.threads} thread(s); CPU-s D {rec['cpu_s_d']}, anchor {rec['cpu_s_anchor']} "
          f"({_measure.cpu_model()})\n\n{table(rec)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps({**rec, "machine": _measure.cpu_model()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

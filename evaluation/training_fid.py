"""FID during GAN training: what ``GANMethod.evaluate`` runs every ``eval.fid_every`` steps.

The G-EMA (the live G when the run keeps no EMA) is sampled in eval mode from a fixed seed
(``eval.seed``: the same noise and labels at every evaluation, so the curve is not noisier than the
generator), ``eval.fid_samples`` images in batches of ``eval.batch_size``, and compared with the real set:

- ``eval.extractor = "shapes"`` (default, offline): the shapes classifier of
  :mod:`evaluation.shapes_eval` against the run's own shapes training images; logged as
  ``eval/shapes_fd`` (NOT comparable with published FID) and, for class-conditional G, the
  ``eval/class_accuracy`` of the images for the class they were generated for;
- ``eval.extractor = "inception"``: the FID Inception-v3 (weights from ``eval.inception_weights`` or
  ``CMGEN_INCEPTION_WEIGHTS``) against ``eval.real`` (image folder, cached statistics, or a pytorch-fid
  ``.npz``); logged as ``eval/fid`` and ``eval/is``.

The value goes through the engine's evaluate path to ``metrics.jsonl`` and TensorBoard, and the
engine keeps ``checkpoints/best`` (a link to, and ``best.json`` naming, the checkpoint with the lowest
value; see :mod:`cmgen.engine.best`). Every process computes the same number from the same seed and
the same EMA weights, so all ranks agree on when a best checkpoint is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["check_settings", "metric_name", "fid_during_training"]


def check_settings(cfg) -> None:
    """``ValueError`` naming the keys when ``eval.fid_every`` can never run or is misconfigured."""
    e, every = cfg.eval, cfg.train.eval_every
    if e.fid_every < 0 or e.fid_samples < 2 or e.batch_size < 1:
        raise ValueError(f"eval.fid_every must be >= 0, eval.fid_samples >= 2 and eval.batch_size >= 1, got "
                         f"{e.fid_every}, {e.fid_samples}, {e.batch_size}")
    if e.extractor not in ("shapes", "inception"):
        raise ValueError(f"eval.extractor must be 'shapes' or 'inception', got {e.extractor!r}")
    if e.fid_every and (every == 0 or e.fid_every % every):
        raise ValueError(f"eval.fid_every={e.fid_every} runs at evaluation steps: set train.eval_every to a divisor "
                         f"of it (train.eval_every={every})")
    if e.fid_every and e.extractor == "inception" and not e.real:
        raise ValueError("eval.extractor=inception needs eval.real (real image folder or statistics .npz)")


def metric_name(cfg) -> str:
    return "shapes_fd" if cfg.eval.extractor == "shapes" else "fid"


class _State:
    """Extractor / evaluator and real statistics, built on the first evaluation and kept."""

    def __init__(self, method, device: torch.device):
        from evaluation.extractors import InceptionExtractor

        e = method.cfg.eval
        self.shapes = None
        if e.extractor == "shapes":
            from evaluation.generation_cli import shapes_root_of
            from evaluation.shapes_eval import ShapesEvaluator

            root = Path(e.real) if e.real else shapes_root_of(method, method.cfg)
            if root is None:
                raise ValueError("eval.extractor=shapes needs shapes training data or eval.real = a shapes data root")
            self.shapes = ShapesEvaluator.load_or_train(root, device=device)
        else:
            from evaluation.generation_cli import _stats_cache_dir, real_statistics

            self.extractor = InceptionExtractor(e.inception_weights, device=device)
            _, self.mu, self.sigma, _ = real_statistics(Path(e.real), self.extractor, cache_dir=_stats_cache_dir(),
                                                        batch_size=e.batch_size, progress=False)


@torch.no_grad()
def fid_during_training(method, ctx) -> dict[str, float]:
    """Sample the G-EMA and return ``{metric_name: value, ...}`` (module docstring)."""
    from evaluation import generation as gen
    from evaluation.extractors import extract

    e = method.cfg.eval
    state: Any = getattr(method, "_fid_state", None)
    if state is None:
        state = method._fid_state = _State(method, ctx.device)
    g = ctx.ema.get("g", ctx.unwrap("g"))
    was_training = g.training
    g.eval()
    gen_cpu = torch.Generator().manual_seed(e.seed)
    labels: list[torch.Tensor] = []

    def batches():
        for lo in range(0, e.fid_samples, e.batch_size):
            n = min(e.batch_size, e.fid_samples - lo)
            z, cond = method.sample_latents(n, ctx.device, gen_cpu)
            if isinstance(cond, torch.Tensor) and not cond.is_floating_point():
                labels.append(cond.cpu())
            yield method.to_unit(method.generate(g, z, cond))

    try:
        if state.shapes is not None:
            images = torch.cat([b.cpu() for b in batches()])
            from evaluation.shapes_eval import ATTRIBUTES

            y = torch.cat(labels) if labels and sum(map(len, labels)) == len(images) else None
            if y is not None and int(y.max()) >= len(ATTRIBUTES["shape"]):
                y = None                                  # not the shapes classes: no class accuracy
            m = state.shapes.evaluate(images, labels=y)
            out = {"shapes_fd": m["shapes_fd"]}
            if "class_accuracy" in m:
                out["class_accuracy"] = m["class_accuracy"]
            return out
        res = extract(state.extractor, batches(), keep=("probs",), statistics=True, progress=False)
        fid = gen.frechet_distance(state.mu, state.sigma, res["mu"], res["sigma"], method="eigh")
        is_mean, _ = gen.inception_score(res["probs"], splits=min(10, res["n"]))
        return {"fid": fid, "is": is_mean}
    finally:
        g.train(was_training)

"""An offline evaluator for generators trained on the embedded ``shapes`` data.

No machine here can download an Inception network, so images generated from ``shapes`` are scored by a
small CNN trained here on real shapes images (the same renderer, :func:`cmgen.data.write_shapes`, read
back through :class:`text2image.data.ShapesAttributes`). It predicts four attributes of an image's
primary (unique largest) object: its **shape** (the ImageFolder class), **colour**, **size** and
**position** (3x3 grid cell), and gives

- class accuracy of generated images against the class they were generated for (class-conditional G);
- attribute accuracy against the attributes a caption asked for (text-conditional G);
- the Fréchet distance (Heusel et al. 2017, Eq. 6) between the CNN's 128-d penultimate features of the
  generated images and of the generator's real training images: **a shapes-classifier Fréchet distance,
  not comparable with published FID** (it is not Inception-v3 pool3). Every result says so in its
  ``"note"`` and names the classifier file and its hash.

Every result also carries the reference numbers a reader needs: the classifier's accuracy on held-out
real images (what a perfect generator would score), chance level, and the Fréchet distance between
held-out real images and the reference set (the floor at that sample size).

The classifier is trained once per (data root, image size) in well under a minute on one CPU core and
cached as ``<data_root>/evaluator/shapes_cnn_<S>px.pt``; its own training images (a larger render of the
same distribution, another seed) go to ``<data_root>/evaluator/train_<S>px/``. The reference statistics
of the data root's train split are cached next to it, keyed by that split's file list::

    ev = ShapesEvaluator.load_or_train("runs/data/shapes_32px", image_size=32)
    metrics = ev.evaluate(images01, labels=y)          # images (N, 3, H, W) in [0, 1], y (N,) class ids
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.generation import feature_statistics, frechet_distance

__all__ = ["ATTRIBUTES", "NOT_COMPARABLE", "ShapesClassifier", "ShapesEvaluator", "primary_attributes",
           "evaluate_generator", "demo_stage", "load_split"]

NOT_COMPARABLE = ("shapes-classifier features (cmgen ShapesEvaluator), not Inception-v3: "
                  "not comparable with published FID")
_VERSION = 2   # 2: the size head has small / large / huge (write_shapes(primary_size="huge"))
_TRAIN_IMAGES = 3000
_TRAIN_SEED = 20_261_202
_EPOCHS = 6


def _attribute_names() -> dict[str, tuple[str, ...]]:
    from cmgen.data import COLOURS, POSITIONS, SHAPES, SIZES
    return {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}


ATTRIBUTES: dict[str, tuple[str, ...]] = _attribute_names()


def primary_attributes(record: Mapping[str, Any]) -> dict[str, int]:
    """Attribute indices of the primary object of a shapes attributes record (``objects[0]``)."""
    obj = record["objects"][0]
    return {name: ATTRIBUTES[name].index(obj[name]) for name in ATTRIBUTES}


class ShapesClassifier(nn.Module):
    """conv-ReLU-maxpool x3 (32/64/128 channels) -> 4x4 map -> 128-d features -> one head per attribute.

    Inputs larger than 32 px first pass ``log2(S / 32)`` stride-2 convs, so every size ends at 4x4 and
    the position of an object stays in the flattened map.

    Shapes: images (B, 3, S, S) in [0, 1] -> ``(features (B, 128), {attribute: logits (B, K)})``.
    """

    def __init__(self, image_size: int = 32, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if image_size < 32 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 32, got {image_size}")
        self.image_size = image_size
        stem = []
        for _ in range(int(np.log2(image_size // 32))):
            stem += [nn.Conv2d(3 if not stem else width, width, 3, 2, 1), nn.ReLU()]
        c_in = width if stem else 3
        self.body = nn.Sequential(
            *stem,
            nn.Conv2d(c_in, width, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.BatchNorm2d(4 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.body(images * 2.0 - 1.0)
        return h, {name: head(h) for name, head in self.heads.items()}


def load_split(root: Path, split: str, image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """All images of a shapes split as (N, 3, S, S) in [0, 1], primary attributes, and file names."""
    from text2image.data import ShapesAttributes, load_image

    attrs = ShapesAttributes(root, split)
    images = torch.stack([load_image(root / split / rec["file_name"], image_size, (0.0, 1.0))
                          for rec in attrs.records])
    targets = {name: torch.tensor([primary_attributes(rec)[name] for rec in attrs.records]) for name in ATTRIBUTES}
    return images, targets, [rec["file_name"] for rec in attrs.records]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _predict(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256):
    feats, logits = [], {name: [] for name in ATTRIBUTES}
    device = next(model.parameters()).device
    for lo in range(0, len(images), batch_size):
        h, out = model(images[lo:lo + batch_size].to(device, torch.float32))
        feats.append(h.float().cpu())
        for name in ATTRIBUTES:
            logits[name].append(out[name].float().cpu())
    return torch.cat(feats), {name: torch.cat(v) for name, v in logits.items()}


def train_classifier(train_images: torch.Tensor, train_targets: dict[str, torch.Tensor], image_size: int,
                     epochs: int = _EPOCHS, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> ShapesClassifier:
    """Adam on the sum of the four cross-entropies; deterministic in ``seed`` and outside RNG-neutral."""
    # may be called from an evaluation hook running under no_grad / inference_mode
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        model = ShapesClassifier(image_size)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        n = len(train_images)
        steps = epochs * ((n + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
        model.train()
        train_images, train_targets = train_images.clone(), {k: v.clone() for k, v in train_targets.items()}
        for _ in range(epochs):
            order = torch.randperm(n)
            for lo in range(0, n, batch_size):
                idx = order[lo:lo + batch_size]
                _, out = model(train_images[idx])
                loss = sum(F.cross_entropy(out[k], train_targets[k][idx]) for k in ATTRIBUTES)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


class ShapesEvaluator:
    """A trained :class:`ShapesClassifier` plus the reference feature statistics of a data root.

    Build with :meth:`load_or_train`. ``info`` holds the classifier file, its sha256, held-out real
    accuracies and the real-vs-real Fréchet floor.
    """

    def __init__(self, model: ShapesClassifier, info: dict[str, Any], ref_mu: np.ndarray, ref_sigma: np.ndarray,
                 device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.info, self.ref_mu, self.ref_sigma = info, ref_mu, ref_sigma
        self.image_size = model.image_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "ShapesEvaluator":
        self.model.to(device)
        return self

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def load_or_train(cls, data_root: str | os.PathLike, image_size: int | None = None, *,
                      train_images: int | None = None, epochs: int | None = None,
                      device: torch.device | str = "cpu", progress: bool = False) -> "ShapesEvaluator":
        """Load the cached classifier of ``data_root`` (a shapes dataset root), training it first if missing.

        ``image_size`` defaults to the data root's. ``train_images`` / ``epochs`` size the one-off
        training (defaults: 3000 rendered images, 6 epochs, about a minute on one CPU core; tests pass
        less). Under ``torch.distributed`` rank 0 trains and writes, every process waits and loads. A
        cached file from another version or training size is retrained.
        """
        from cmgen.distributed import barrier, rank

        root = Path(data_root)
        info_file = root / "dataset_info.json"
        if not info_file.is_file():
            raise ValueError(f"{root} is not a shapes dataset root (no dataset_info.json); write one with "
                             f"`cmgen data shapes --out {root}`")
        data_info = json.loads(info_file.read_text())
        if data_info.get("dataset") != "shapes":
            raise ValueError(f"{root} holds {data_info.get('dataset')!r}, not the shapes dataset")
        image_size = int(image_size or data_info["config"]["image_size"])
        train_images = _TRAIN_IMAGES if train_images is None else train_images
        epochs = _EPOCHS if epochs is None else epochs
        if train_images < 80 or epochs < 1:
            raise ValueError(f"train_images must be >= 80 and epochs >= 1, got {train_images} and {epochs}")
        ckpt = root / "evaluator" / f"shapes_cnn_{image_size}px.pt"
        recipe = {"train_images": int(train_images), "epochs": int(epochs)}
        # the evaluator learns the data's own variant (a classifier of small shapes misreads huge ones);
        # recorded only when not the default, so evaluators cached before the option stay valid
        primary_size = data_info["config"].get("primary_size", "mixed")
        if primary_size != "mixed":
            recipe["primary_size"] = primary_size
        if rank() == 0 and not cls._valid(ckpt, recipe):
            cls._train_and_save(root, data_info, image_size, ckpt, recipe, progress)
        barrier()
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model = ShapesClassifier(image_size)
        model.load_state_dict(state["model"])
        info = {k: v for k, v in state.items() if k != "model"}
        info.update({"file": str(ckpt), "sha256": _file_hash(ckpt)})
        ev = cls(model, info, np.zeros(1), np.zeros((1, 1)), device)
        ev.ref_mu, ev.ref_sigma, ref_key = ev._reference_statistics(root)
        info["reference"] = {"split": "train", "key": ref_key, "num_images": info.get("reference_images")}
        return ev

    @staticmethod
    def _valid(ckpt: Path, recipe: dict) -> bool:
        if not ckpt.is_file():
            return False
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            return state.get("version") == _VERSION and state.get("recipe") == recipe
        except Exception:  # a truncated or foreign file: retrain over it
            return False

    @staticmethod
    def _train_and_save(root: Path, data_info: dict, image_size: int, ckpt: Path, recipe: dict,
                        progress: bool) -> None:
        from cmgen.data import write_shapes, writer_config

        t0 = time.perf_counter()
        train_root = root / "evaluator" / f"train_{image_size}px"
        max_shapes = int(data_info["config"].get("max_shapes", 2))
        primary_size = recipe.get("primary_size", "mixed")
        settings = dict(num_images=recipe["train_images"], image_size=image_size, seed=_TRAIN_SEED,
                        max_shapes=max_shapes, val_fraction=0.125, captions_per_image=1, primary_size=primary_size)
        written = train_root / "dataset_info.json"
        if not (written.is_file() and json.loads(written.read_text())["config"] == writer_config("shapes", settings)):
            write_shapes(train_root, **settings, overwrite=True, progress=progress)
        x_tr, y_tr, _ = load_split(train_root, "train", image_size)
        x_va, y_va, _ = load_split(train_root, "val", image_size)
        model = train_classifier(x_tr, y_tr, image_size, epochs=recipe["epochs"])
        feats, logits = _predict(model, x_va)
        val_acc = {name: float((logits[name].argmax(1) == y_va[name]).float().mean()) for name in ATTRIBUTES}
        _atomic_save({"version": _VERSION, "recipe": recipe, "model": model.state_dict(), "image_size": image_size,
                      "train_data": {"root": str(train_root), "num_train": len(x_tr), "num_val": len(x_va),
                                     "seed": _TRAIN_SEED, "max_shapes": max_shapes, "primary_size": primary_size},
                      "val_accuracy": val_acc, "val_features": feats.numpy().astype(np.float32),
                      "train_seconds": time.perf_counter() - t0}, ckpt)

    def _reference_statistics(self, root: Path) -> tuple[np.ndarray, np.ndarray, str]:
        """mu, sigma of the data root's train images, cached per file list and classifier hash."""
        from text2image.data import ShapesAttributes

        names = sorted(rec["file_name"] for rec in ShapesAttributes(root, "train").records)
        key = hashlib.sha256(("\n".join(names) + self.info["sha256"]).encode()).hexdigest()[:16]
        path = root / "evaluator" / f"reference_{self.image_size}px_{key}.npz"
        if path.is_file():
            with np.load(path) as f:
                self.info["reference_images"] = int(f["n"])
                self.info.setdefault("real_val_fd", float(f["real_val_fd"]))
                return f["mu"], f["sigma"], key
        images, _, _ = load_split(root, "train", self.image_size)
        feats, _ = _predict(self.model, images)
        mu, sigma = feature_statistics(feats.numpy())
        val = np.asarray(self.info["val_features"], dtype=np.float64)
        mu_v, sigma_v = feature_statistics(val)
        real_val_fd = frechet_distance(mu_v, sigma_v, mu, sigma, method="eigh")
        _atomic_save({"mu": mu, "sigma": sigma, "n": np.int64(len(images)), "real_val_fd": real_val_fd}, path)
        self.info["reference_images"] = len(images)
        self.info["real_val_fd"] = real_val_fd
        return mu, sigma, key

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images01: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """128-d features and attribute logits of images ``(N, 3, H, W)`` in [0, 1] (resized to S)."""
        x = torch.as_tensor(images01)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(x.shape)}")
        x = x.float().clamp(0.0, 1.0)
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
        was_training = self.model.training
        self.model.eval()
        out = _predict(self.model, x)
        self.model.train(was_training)
        return out

    def evaluate(self, images01: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None,
                 captions_attrs: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Scores of generated images.

        Args:
            images01: (N, 3, H, W) in [0, 1], N >= 2.
            labels: (N,) class (primary shape) index each image was generated for, or None.
            captions_attrs: per image, the attributes its caption asked for: a mapping with any of
                ``shape``, ``colour``, ``size``, ``position`` (names or indices), or None.

        Returns:
            A flat dict: ``shapes_fd`` (vs the real train split), ``class_accuracy`` (with labels),
            ``attr_accuracy/<name>`` (with captions_attrs), ``pred_class_fraction/<shape>``, the real
            references ``real/...`` and ``chance/...``, and ``note``/``evaluator``/``evaluator_sha256``.
        """
        feats, logits = self.features(images01)
        n = feats.shape[0]
        if n < 2:
            raise ValueError(f"need at least 2 images for the Fréchet distance, got {n}")
        mu, sigma = feature_statistics(feats.numpy())
        pred = {name: logits[name].argmax(1) for name in ATTRIBUTES}
        out: dict[str, Any] = {
            "note": NOT_COMPARABLE, "evaluator": f"ShapesClassifier v{_VERSION} {self.image_size}px",
            "evaluator_file": self.info["file"], "evaluator_sha256": self.info["sha256"], "num_images": n,
            "shapes_fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma, method="eigh"),
        }
        if labels is not None:
            y = torch.as_tensor(labels).long().cpu().reshape(-1)
            if y.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
            if y.min() < 0 or y.max() >= len(ATTRIBUTES["shape"]):
                raise ValueError(f"labels must be shape classes in [0, {len(ATTRIBUTES['shape'])}), "
                                 f"got range [{int(y.min())}, {int(y.max())}]")
            out["class_accuracy"] = float((pred["shape"] == y).float().mean())
        if captions_attrs is not None:
            if len(captions_attrs) != n:
                raise ValueError(f"captions_attrs must have one entry per image ({n}), got {len(captions_attrs)}")
            for name, values in ATTRIBUTES.items():
                wanted = [(i, a[name]) for i, a in enumerate(captions_attrs) if a.get(name) is not None]
                if not wanted:
                    continue
                idx = torch.tensor([i for i, _ in wanted])
                target = torch.tensor([v if isinstance(v, (int, np.integer)) else values.index(v) for _, v in wanted])
                out[f"attr_accuracy/{name}"] = float((pred[name][idx] == target).float().mean())
        for k, shape in enumerate(ATTRIBUTES["shape"]):
            out[f"pred_class_fraction/{shape}"] = float((pred["shape"] == k).float().mean())
        val = self.info["val_accuracy"]
        out["real/class_accuracy"] = val["shape"]
        from cmgen.data.shapes import sizes_of
        used = {**{k: len(v) for k, v in ATTRIBUTES.items()},   # a variant draws only some of the sizes
                "size": len(sizes_of(self.info["train_data"].get("primary_size", "mixed")))}
        for name in ATTRIBUTES:
            out[f"real/attr_accuracy/{name}"] = val[name]
            out[f"chance/{name}"] = 1.0 / used[name]
        out["real/shapes_fd_val_vs_train"] = float(self.info["real_val_fd"])
        out["real/num_val_images"] = int(self.info["train_data"]["num_val"])
        return out


def evaluate_generator(source, n: int = 500, *, seed: int = 0, data_root: str | None = None,
                       device: torch.device | str = "cpu", batch_size: int = 100) -> dict[str, Any]:
    """Shapes-evaluator scores of a trained generator (run dir, checkpoint or exported folder, or one already
    loaded by :func:`cmgen.generate_cli.load_generator`): n images of the G-EMA from ``seed``, classes
    drawn uniformly, scored against the classes they were drawn for.

    ``data_root`` defaults to the shapes data the run trained on. For the demo report of each GAN.
    """
    from cmgen.generate_cli import LoadedGenerator, load_generator, sample_tensors
    from evaluation.generation_cli import shapes_root_of

    lg = source if isinstance(source, LoadedGenerator) else load_generator(source, device=device)
    if data_root is None:
        data_root = shapes_root_of(lg.method, lg.cfg) if lg.method is not None else None
        if data_root is None:
            raise ValueError(f"{source}: pass data_root (the generator's run does not name shapes data)")
    ev = ShapesEvaluator.load_or_train(data_root, device=device)
    images, labels = sample_tensors(lg, n, seed=seed, batch_size=batch_size)
    y = labels if labels is not None and lg.num_classes == len(ATTRIBUTES["shape"]) else None
    return {**ev.evaluate(images, labels=y), "generator": lg.source, "seed": seed}


def demo_stage(out: Path, report: list[str], summary: dict, budget_s: float) -> None:
    """Train (or load) the evaluator on the demo's shapes data and report its real-image references."""
    from cmgen.data import ensure_dataset, write_shapes

    root = Path(out) / "data" / "shapes_32px"
    ensure_dataset(root, "dataset_info.json", lambda: write_shapes(root, num_images=512, image_size=32, seed=0,
                                                                   progress=False))
    t0 = time.perf_counter()
    ev = ShapesEvaluator.load_or_train(root, 32)
    images, targets, _ = load_split(root, "val", 32)
    m = ev.evaluate(images, labels=targets["shape"],
                    captions_attrs=[{k: int(targets[k][i]) for k in ATTRIBUTES} for i in range(len(images))])
    report += ["## Shapes evaluator", "", f"{NOT_COMPARABLE}.", "",
               "| on real val images | class | colour | size | position | shapes-FD |", "|---|---:|---:|---:|---:|---:|",
               f"| classifier (n={len(images)}) | {m['class_accuracy']:.3f} | {m['attr_accuracy/colour']:.3f} | "
               f"{m['attr_accuracy/size']:.3f} | {m['attr_accuracy/position']:.3f} | {m['shapes_fd']:.3f} |",
               f"| chance | {m['chance/shape']:.3f} | {m['chance/colour']:.3f} | {m['chance/size']:.3f} | "
               f"{m['chance/position']:.3f} | |", "",
               f"(trained or loaded in {time.perf_counter() - t0:.1f} s; budget {budget_s:.0f} s)", ""]
    summary["shapes_evaluator"] = {k: m[k] for k in ("class_accuracy", "shapes_fd", "attr_accuracy/colour",
                                                     "attr_accuracy/size", "attr_accuracy/position")}

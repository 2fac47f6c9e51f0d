"""R-precision of text-conditioned generators: dual encoders and the generate-embed-rank loop.

Protocol (AttnGAN, Xu et al. 2018, Sec. 4.1; DM-GAN's evaluation code): generate one image per caption
of the evaluation split, embed images and captions with an image-text dual encoder trained on REAL
pairs, and count an image as a hit when its own caption ranks first among itself and 99 mismatched
captions (:func:`evaluation.generation.r_precision`, which this module feeds). The official XMC-GAN code
(google-research/xmcgan_image_generation @ 22a7ef2) has no R-precision: its evaluator
(``xmcgan/utils/eval_metrics.py::EvalMetric``) computes FID and IS only, so the ranking protocol here is
AttnGAN's; the encoder is what differs between papers (AttnGAN/DM-GAN: their DAMSM encoders; others: a
dual encoder pretrained on real images, or CLIP).

Encoders (:func:`load_dual_encoder`):

- :class:`ShapesDualEncoder` for the embedded shapes data: a small CNN image tower and a bidirectional
  LSTM text tower over the captions' words (DAMSM's structure, Xu et al. 2018 Sec. 3.4, trained from
  scratch), matched with symmetric InfoNCE (:class:`cmgen.losses.InfoNCE`, T = 0.1) on real shapes
  image-caption pairs, trained once (about a CPU minute) and cached as
  ``<data_root>/evaluator/dual_encoder_<S>px.pt``. Its numbers are **not comparable with published
  R-precision** (every result says so in its ``note``).
- :class:`CLIPDualEncoder`: a CLIP model from a local Hugging Face directory (``transformers``
  ``CLIPModel`` + its tokenizer, ``local_files_only``), images resized (bicubic) to its input size and
  normalised with its processor's mean/std. Nothing is downloaded.

Shapes: images (N, 3, H, W) in [0, 1]; captions list of N strings -> embeddings (N, D) float32.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NOT_COMPARABLE", "WordVocab", "ShapesDualEncoder", "CLIPDualEncoder", "train_dual_encoder",
           "load_or_train_shapes_encoder", "load_dual_encoder", "rprecision_of_pairs", "evaluation_captions",
           "generate_from_captions"]

NOT_COMPARABLE = ("R-precision with the cmgen shapes dual encoder (trained here on real shapes captions), "
                  "not a published encoder: not comparable with published R-precision")
_VERSION = 1
_TRAIN_IMAGES = 3000
_EPOCHS = 8
_TOKEN = re.compile(r"[a-z]+|[0-9]+")


class WordVocab:
    """Lower-cased word tokens of a caption set; index 0 = padding, 1 = unknown word."""

    def __init__(self, words: Sequence[str]):
        self.words = ["<pad>", "<unk>", *sorted(set(words) - {"<pad>", "<unk>"})]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_captions(cls, captions: Sequence[str]) -> "WordVocab":
        return cls([w for c in captions for w in _TOKEN.findall(c.lower())])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: Sequence[str], max_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (N, T) int64, lengths (N,))``, T = the longest caption (at most ``max_len``)."""
        toks = [[self.index.get(w, 1) for w in _TOKEN.findall(c.lower())][:max_len] or [1] for c in captions]
        t = max(len(x) for x in toks)
        ids = torch.zeros(len(toks), t, dtype=torch.long)
        for i, x in enumerate(toks):
            ids[i, :len(x)] = torch.tensor(x)
        return ids, torch.tensor([len(x) for x in toks])


class ShapesDualEncoder(nn.Module):
    """Image tower: conv-ReLU-maxpool x3 (32/64/128 ch, BN) -> 4x4 map -> Linear(dim); inputs above 32 px
    are first brought to 32 px by stride-2 convs. Text tower: word embedding (64) -> bidirectional LSTM
    (64 per direction) -> the last forward and first backward states -> Linear(dim). Outputs are
    L2-normalised.

    Shapes: images (N, 3, S, S) in [0, 1] -> (N, dim); ids (N, T), lengths (N,) -> (N, dim).
    """

    def __init__(self, vocab_size: int, image_size: int = 32, dim: int = 128, width: int = 32):
        super().__init__()
        if image_size < 32 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 32, got {image_size}")
        self.image_size = image_size
        stem: list[nn.Module] = []
        for i in range(int(np.log2(image_size // 32))):
            stem += [nn.Conv2d(3 if i == 0 else width, width, 3, 2, 1), nn.ReLU()]
        c_in = width if stem else 3
        self.image = nn.Sequential(
            *stem,
            nn.Conv2d(c_in, width, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.BatchNorm2d(4 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * width * 16, dim))
        self.embed = nn.Embedding(vocab_size, 64, padding_idx=0)
        self.lstm = nn.LSTM(64, 64, batch_first=True, bidirectional=True)
        self.text_proj = nn.Linear(128, dim)

    def encode_image(self, images01: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images01 * 2.0 - 1.0), dim=-1)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)                      # h (2, N, 64): forward last, backward first
        return F.normalize(self.text_proj(torch.cat([h[0], h[1]], dim=1)), dim=-1)


def _load_pairs(root: Path, split: str, image_size: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """Images (N, 3, S, S) in [0, 1] of a shapes split, every caption, and each caption's image index."""
    from text2image.data import ShapesAttributes, load_image

    records = ShapesAttributes(root, split).records
    images = torch.stack([load_image(root / split / r["file_name"], image_size, (0.0, 1.0)) for r in records])
    captions = [c for r in records for c in r["captions"]]
    index = np.asarray([i for i, r in enumerate(records) for _ in r["captions"]])
    return images, captions, index


def train_dual_encoder(images: torch.Tensor, captions: Sequence[str], image_index: np.ndarray, image_size: int,
                       epochs: int = _EPOCHS, batch_size: int = 64, lr: float = 2e-3, seed: int = 0
                       ) -> tuple[ShapesDualEncoder, WordVocab]:
    """Symmetric InfoNCE (T = 0.1) over batches of (image, one of its captions); RNG-neutral outside."""
    from cmgen.losses import InfoNCE

    vocab = WordVocab.from_captions(captions)
    ids, lengths = vocab.encode(captions)
    # one caption per image and epoch, so a batch never holds two captions of the same image
    by_image: dict[int, list[int]] = {}
    for j, i in enumerate(image_index):
        by_image.setdefault(int(i), []).append(j)
    loss_fn = InfoNCE(0.1, symmetric=True, normalize=False)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        gen = np.random.default_rng(seed)
        model = ShapesDualEncoder(len(vocab), image_size)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        n = len(images)
        steps = epochs * ((n + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n)
            pick = torch.tensor([by_image[int(i)][gen.integers(len(by_image[int(i)]))] for i in order])
            for lo in range(0, n, batch_size):
                idx, cap = order[lo:lo + batch_size], pick[lo:lo + batch_size]
                if len(idx) < 2:
                    continue
                img = model.encode_image(images[idx])
                txt = model.encode_text(ids[cap], lengths[cap])
                loss = loss_fn(img, txt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval(), vocab


class _ShapesEncoderHandle:
    """A trained :class:`ShapesDualEncoder` with its vocabulary, as the R-precision loop uses it."""

    def __init__(self, model: ShapesDualEncoder, vocab: WordVocab, info: dict[str, Any], device="cpu"):
        self.model, self.vocab, self.info = model.to(device).eval(), vocab, info
        self.image_size = model.image_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images01: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        x = torch.as_tensor(images01).float().clamp(0, 1)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True).clamp(0, 1)
        return torch.cat([self.model.encode_image(x[lo:lo + batch_size].to(self.device)).cpu()
                          for lo in range(0, len(x), batch_size)]).numpy()

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for lo in range(0, len(captions), batch_size):
            ids, lengths = self.vocab.encode(captions[lo:lo + batch_size])
            out.append(self.model.encode_text(ids.to(self.device), lengths).cpu())
        return torch.cat(out).numpy()



def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_or_train_shapes_encoder(data_root: str | os.PathLike, image_size: int | None = None, *,
                                 train_images: int | None = None, epochs: int | None = None,
                                 device: torch.device | str = "cpu", progress: bool = False) -> _ShapesEncoderHandle:
    """The cached shapes dual encoder of ``data_root``, trained first if missing (module docstring).

    Training pairs: a larger render of the same distribution (the shapes evaluator's training images,
    ``<data_root>/evaluator/train_<S>px``, written here if missing); the data root's own val split
    measures the encoder's real-image R-precision (``info["real_val_r_precision"]``). Rank 0 trains
    and writes under ``torch.distributed``; every process loads.
    """
    from cmgen.data import write_shapes
    from cmgen.distributed import barrier, rank
    from evaluation import shapes_eval
    from evaluation.generation import r_precision

    root = Path(data_root)
    info_file = root / "dataset_info.json"
    if not info_file.is_file() or json.loads(info_file.read_text()).get("dataset") != "shapes":
        raise ValueError(f"{root} is not a shapes dataset root (no shapes dataset_info.json)")
    data_info = json.loads(info_file.read_text())
    image_size = int(image_size or data_info["config"]["image_size"])
    recipe = {"train_images": int(_TRAIN_IMAGES if train_images is None else train_images),
              "epochs": int(_EPOCHS if epochs is None else epochs)}
    if recipe["train_images"] < 80 or recipe["epochs"] < 1:
        raise ValueError(f"train_images must be >= 80 and epochs >= 1, got {recipe}")
    ckpt = root / "evaluator" / f"dual_encoder_{image_size}px.pt"

    def valid() -> bool:
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            return state.get("version") == _VERSION and state.get("recipe") == recipe
        except Exception:  # missing, truncated or foreign: (re)train
            return False

    if rank() == 0 and not valid():
        t0 = time.perf_counter()
        train_root = root / "evaluator" / f"train_{image_size}px"
        written = train_root / "dataset_info.json"
        have = json.loads(written.read_text())["config"]["num_images"] if written.is_file() else None
        if have != recipe["train_images"]:
            # the same render as the shapes evaluator's, so both share it
            write_shapes(train_root, num_images=recipe["train_images"], image_size=image_size,
                         seed=shapes_eval._TRAIN_SEED, max_shapes=int(data_info["config"].get("max_shapes", 2)),
                         val_fraction=0.125, captions_per_image=1, overwrite=True, progress=progress)
        images, captions, index = _load_pairs(train_root, "train", image_size)
        model, vocab = train_dual_encoder(images, captions, index, image_size, epochs=recipe["epochs"])
        handle = _ShapesEncoderHandle(model, vocab, {})
        val_rp = None
        if (root / "annotations" / "attributes_val.json").is_file():
            v_images, v_captions, v_index = _load_pairs(root, "val", image_size)
            if len(v_images) > 1:
                val_rp = r_precision(handle.embed_images(v_images)[v_index], handle.embed_texts(v_captions),
                                     num_candidates=100, splits=1, labels=v_index)[0]
        state = {"version": _VERSION, "recipe": recipe, "image_size": image_size, "model": model.state_dict(),
                 "vocab": vocab.words, "real_val_r_precision": val_rp, "train_root": str(train_root),
                 "train_seconds": time.perf_counter() - t0}
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(f".{ckpt.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, ckpt)
    barrier()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    vocab = WordVocab(state["vocab"][2:])
    model = ShapesDualEncoder(len(vocab), state["image_size"])
    model.load_state_dict(state["model"])
    info = {"encoder": f"cmgen ShapesDualEncoder v{_VERSION} {state['image_size']}px", "file": str(ckpt),
            "sha256": _file_hash(ckpt), "real_val_r_precision": state["real_val_r_precision"],
            "note": NOT_COMPARABLE}
    return _ShapesEncoderHandle(model, vocab, info, device)


def _projected(out) -> torch.Tensor:
    """``get_*_features`` return the projected features (transformers 4) or an output whose
    ``pooler_output`` holds them (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPDualEncoder:
    """A CLIP model from a local directory (``CLIPModel.from_pretrained(path, local_files_only=True)`` and
    ``AutoTokenizer`` from the same folder). Images: bicubic resize to the vision tower's size, then the
    processor's ``image_mean`` / ``image_std`` (OpenAI CLIP's when the folder has no processor config)."""

    _MEAN, _STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a local Hugging Face model folder (no config.json)")
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        mean, std = self._MEAN, self._STD
        pp = path / "preprocessor_config.json"
        if pp.is_file():
            cfg = json.loads(pp.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        self.info = {"encoder": f"CLIP ({path})", "file": str(path),
                     "sha256": _file_hash(weights[0]) if weights else None, "real_val_r_precision": None}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images01: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for lo in range(0, len(images01), batch_size):
            x = torch.as_tensor(images01[lo:lo + batch_size]).float().clamp(0, 1)
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(self.device)
            out.append(F.normalize(_projected(self.model.get_image_features(pixel_values=x)), dim=-1).cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = []
        max_len = int(self.model.config.text_config.max_position_embeddings)
        for lo in range(0, len(captions), batch_size):
            enc = self.tokenizer(list(captions[lo:lo + batch_size]), padding=True, truncation=True,
                                 max_length=max_len, return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(F.normalize(_projected(feats), dim=-1).cpu())
        return torch.cat(out).numpy()


def load_dual_encoder(spec: str | os.PathLike | None, *, shapes_root: str | os.PathLike | None = None,
                      image_size: int | None = None, device: torch.device | str = "cpu"):
    """``spec``: a local CLIP folder, or None / ``"shapes"`` for the shapes dual encoder of
    ``shapes_root`` (trained there first if missing)."""
    if spec is None or str(spec) == "shapes":
        if shapes_root is None:
            raise ValueError("the shapes dual encoder needs a shapes data root; for other data give a local "
                             "CLIP folder (--rp-encoder PATH)")
        return load_or_train_shapes_encoder(shapes_root, image_size, device=device)
    return CLIPDualEncoder(spec, device=device)


def rprecision_of_pairs(encoder, images01: torch.Tensor, captions: Sequence[str], labels: np.ndarray | None = None,
                        *, num_candidates: int = 100, splits: int = 10, seed: int = 0) -> dict[str, Any]:
    """R-precision of ``images01[i]`` generated from ``captions[i]``; ``labels`` (e.g. the source image of
    each caption) keep equivalent captions out of each other's mismatched candidates."""
    from evaluation.generation import r_precision

    mean, std = r_precision(encoder.embed_images(images01), encoder.embed_texts(captions),
                            num_candidates=num_candidates, splits=min(splits, len(captions)), labels=labels, seed=seed)
    return {"r_precision_mean": mean, "r_precision_std": std, "r_precision_candidates": num_candidates,
            "r_precision_num_images": len(captions)}


def evaluation_captions(method, n: int, *, split: str = "val", seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` captions of the run's evaluation split and the image each belongs to: images in order
    (cycled when n exceeds the split), one caption of each drawn at random (``seed``), as XMC-GAN
    evaluates on COCO val with one random caption per image.

    Returns ``(captions (n,), image_index (n,))``.
    """
    from text2image.caption_data import caption_dataset

    cfg = method.cfg
    root = method.data_root() if hasattr(method, "data_root") else Path(cfg.data.root)
    data = caption_dataset(cfg.data.kind, root, split, cfg.model.image_size, hflip=False,
                           version=getattr(cfg.data, "version", "2014"), missing="skip")
    rng = np.random.default_rng(seed)
    index = np.arange(n) % len(data.captions)
    return [data.captions[i][rng.integers(len(data.captions[i]))] for i in index], index


@torch.no_grad()
def generate_from_captions(lg, captions: Sequence[str], *, seed: int = 0, batch_size: int = 64):
    """Yield images ``(B, 3, S, S)`` in [0, 1] of a text-conditioned generator (``LoadedGenerator``), image
    i from ``captions[i]``; all z drawn first from one CPU generator seeded ``seed`` (as ``cmgen
    generate``). A run's method encodes the captions (``encode_captions``) and runs G (``generate``);
    an exported generator goes through ``cmgen.generate_cli.sample_images``'s prompt path."""
    method = lg.method
    if method is None or not hasattr(method, "encode_captions"):
        from cmgen.generate_cli import sample_images

        for images, _ in sample_images(lg, len(captions), seed=seed, prompts=list(captions), batch_size=batch_size):
            yield images
        return
    z = lg.latents(len(captions), torch.Generator().manual_seed(int(seed)))
    device = lg.device
    for lo in range(0, len(captions), batch_size):
        cond = method.encode_captions(list(captions[lo:lo + batch_size]), device)
        yield lg.to_unit(method.generate(lg.g, z[lo:lo + batch_size].to(device), cond))

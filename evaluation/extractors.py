"""Feature extractors for generation metrics, and the batched loop that runs them.

An :class:`Extractor` maps images ``(B, 3, H, W)`` in [0, 1] (float32, on its device) to named outputs:
``"features"`` (always) and ``"probs"`` (class probabilities, for the Inception Score) where it has a
classifier. Each carries ``info``, a dict naming the network and the weights (file and sha256) that
every result records.

- :class:`InceptionExtractor`: the FID Inception-v3 (:mod:`evaluation.inception`), pool3 2048-d and
  softmax of the unbiased 1008 logits. ``fuse=True`` folds each eval-mode batch norm into its
  convolution (same function up to float round-off, ~1e-6 relative) and runs channels-last.
- :class:`TorchvisionEncoder`: torchvision ResNet-50 (pooled 2048-d, and its ImageNet logits) or VGG-16
  (fc7 4096-d) from a local weight file (XMC-GAN's image-image term, R-precision image encoders).
- :class:`CLIPEncoder`: a CLIP image/text model through transformers from a local folder, for
  :func:`clip_score`.
- :class:`ShapesExtractor`: the offline shapes classifier (:mod:`evaluation.shapes_eval`).

:func:`extract` runs an extractor over a folder of image files (a DataLoader with ``num_workers``), a
tensor, or an iterator of batches (a generator being sampled), with a tqdm bar, fp32 features (TF32
off on CUDA) and optionally the running mean/covariance instead of the stored features.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

__all__ = ["IMAGE_EXTENSIONS", "list_images", "ImageFiles", "Extractor", "InceptionExtractor",
           "TorchvisionEncoder", "CLIPEncoder", "ShapesExtractor", "RunningStatistics", "extract",
           "clip_score", "fuse_conv_bn", "build_extractor", "fp32_matmul"]

# pytorch-fid fid_score.IMAGE_EXTENSIONS
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (pytorch-fid's extensions, either case), sorted by path.

    pytorch-fid lists only the folder itself; ``recursive=True`` (default) also walks sub-folders, so an
    ImageFolder tree (``<class>/*.png``) works as a real set.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Image files as ``(3, H, W)`` uint8 RGB tensors (PIL ``convert("RGB")``, as pytorch-fid); the
    division by 255 happens on the extractor's device, so workers ship a quarter of the bytes."""

    def __init__(self, files: Sequence[str | os.PathLike]):
        self.files = [Path(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@contextlib.contextmanager
def fp32_matmul():
    """Turn off TF32 in CUDA matmuls and convolutions inside the block (features stay true fp32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Extractor(abc.ABC):
    """Images ``(B, 3, H, W)`` float32 in [0, 1] on ``device`` -> ``{"features": (B, D), ...}``."""

    name: str = ""
    info: dict[str, Any]
    device: torch.device

    @abc.abstractmethod
    def __call__(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        ...

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("features",)


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every torchvision ``BasicConv2d`` (conv, eval BN, ReLU) has its batch
    norm folded into the convolution: w' = w g / sqrt(v + eps), b' = beta - m g / sqrt(v + eps)."""
    from torchvision.models.inception import BasicConv2d

    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, BasicConv2d) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.conv, module.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, bias=True).to(conv.weight.device)
            new.weight.copy_(conv.weight * scale[:, None, None, None])
            new.bias.copy_(bn.bias - bn.running_mean * scale)
            module.conv, module.bn = new, nn.Identity()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


class InceptionExtractor(Extractor):
    """FID Inception-v3: ``features`` = pool3 (B, 2048), ``probs`` = softmax(pool3 @ W_fc^T) (B, 1008).

    Args:
        weights: local pt_inception file (None: ``CMGEN_INCEPTION_WEIGHTS``); see
            :func:`evaluation.inception.load_fid_inception`.
        random_init_for_tests: random weights, results labelled TEST ONLY.
        fuse: fold batch norms into convolutions and run channels-last (faster; equal to ~1e-6).
        device: default CUDA when available.
    """

    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, *, random_init_for_tests: bool = False,
                 fuse: bool = True, device: torch.device | str | None = None, seed: int = 0):
        from evaluation.inception import load_fid_inception

        self.device = torch.device(device) if device is not None else _default_device()
        model, info = load_fid_inception(weights, random_init_for_tests=random_init_for_tests, seed=seed)
        self.model = (fuse_conv_bn(model) if fuse else model).to(self.device)
        self.channels_last = fuse
        if fuse:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.info = {**info, "extractor": "inception", "outputs": "pool3 2048-d; softmax of unbiased logits",
                     "fused_bn": fuse}

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("features", "probs")

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images01
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pool3 = self.model(x)
        return {"features": pool3, "probs": torch.softmax(self.model.logits(pool3), dim=1)}


class TorchvisionEncoder(Extractor):
    """torchvision ImageNet encoder from a local weight file: ``resnet50`` (pooled 2048-d ``features``,
    1000 ``logits``) or ``vgg16`` (fc7 4096-d ``features``). Input resized to 224 (bilinear, antialias)
    and ImageNet-normalised, as torchvision's ``IMAGENET1K_V1`` transforms do after their crop."""

    name = "torchvision"

    def __init__(self, arch: str = "resnet50", weights: str | os.PathLike | None = None, *,
                 random_init_for_tests: bool = False, device: torch.device | str | None = None):
        import torchvision

        if arch not in ("resnet50", "vgg16"):
            raise ValueError(f"arch must be 'resnet50' or 'vgg16', got {arch!r}")
        self.arch, self.device = arch, torch.device(device) if device is not None else _default_device()
        model = getattr(torchvision.models, arch)(weights=None)
        if random_init_for_tests:
            if weights is not None:
                raise ValueError("pass either weights or random_init_for_tests=True, not both")
            from evaluation.inception import state_dict_sha256
            info = {"weights": "random init, TEST ONLY", "sha256": state_dict_sha256(model.state_dict()),
                    "random_init": True}
        else:
            if weights is None or not Path(weights).is_file():
                raise ValueError(f"{arch} needs a local torchvision weight file (e.g. {arch}-*.pth from "
                                 f"torchvision's model URLs, downloaded elsewhere); got {weights!r}")
            from evaluation.inception import file_sha256
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            info = {"weights": str(Path(weights).resolve()), "sha256": file_sha256(weights), "random_init": False}
        self.model = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.info = {"network": f"torchvision {arch}", "extractor": arch, **info}

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("features", "logits") if self.arch == "resnet50" else ("features",)

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(images01, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        m = self.model
        if self.arch == "resnet50":
            h = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
            h = torch.flatten(m.avgpool(h), 1)
            return {"features": h, "logits": m.fc(h)}
        h = torch.flatten(m.avgpool(m.features(x)), 1)
        return {"features": m.classifier[:-1](h)}                         # fc7 after ReLU (dropout is off)


class CLIPEncoder(Extractor):
    """A CLIP model (transformers ``CLIPModel``) from a local folder: image and text embeddings.

    Images are resized to the model's ``image_size`` with bicubic interpolation and normalised with the
    processor's mean/std (CLIP resizes the short side then centre-crops; generated images are square).
    """

    name = "clip"

    def __init__(self, path: str | os.PathLike | None = None, *, random_init_for_tests: bool = False,
                 config: Any = None, device: torch.device | str | None = None):
        from transformers import CLIPModel

        self.device = torch.device(device) if device is not None else _default_device()
        self.tokenizer = None
        if random_init_for_tests:
            if config is None:
                raise ValueError("random_init_for_tests needs a transformers CLIPConfig (config=...)")
            model = CLIPModel(config)
            info = {"weights": "random init, TEST ONLY", "random_init": True}
        else:
            if path is None or not Path(path).is_dir():
                raise ValueError(f"CLIP needs a local model folder (save_pretrained of e.g. openai/clip-vit-base-"
                                 f"patch32, copied here); got {path!r}")
            from transformers import AutoTokenizer
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            info = {"weights": str(Path(path).resolve()), "random_init": False}
        self.model = model.eval().to(self.device)
        self.image_size = int(model.config.vision_config.image_size)
        # OpenAI CLIP's normalisation (CLIPImageProcessor defaults)
        self.mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        self.std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        self.info = {"network": "CLIP (transformers CLIPModel)", "extractor": "clip", **info}

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(images01, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        out = self.model.get_image_features(pixel_values=x)
        return {"features": out if torch.is_tensor(out) else out.pooler_output}

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | None = None, input_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings (N, D) from strings (needs the folder's tokenizer) or token ids."""
        if input_ids is None:
            if self.tokenizer is None:
                raise ValueError("this CLIPEncoder has no tokenizer; pass input_ids")
            enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        out = self.model.get_text_features(input_ids=input_ids.to(self.device),
                                           attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        return out if torch.is_tensor(out) else out.pooler_output


def clip_score(image_emb, text_emb, w: float = 100.0) -> float:
    """CLIPScore = mean_i w * max(cos(image_i, text_i), 0) (Hessel et al. 2021, Eq. 1 uses w = 2.5;
    torchmetrics' ``CLIPScore`` and most text-to-image papers report w = 100)."""
    a = torch.as_tensor(image_emb, dtype=torch.float64)
    b = torch.as_tensor(text_emb, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"image_emb and text_emb must both be (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    cos = F.cosine_similarity(a, b, dim=1)
    return float(w * cos.clamp(min=0).mean())


class ShapesExtractor(Extractor):
    """The offline shapes classifier's 128-d features and primary-shape probabilities (NOT Inception)."""

    name = "shapes"

    def __init__(self, data_root: str | os.PathLike, image_size: int | None = None,
                 device: torch.device | str | None = None, **train_kwargs: Any):
        from evaluation.shapes_eval import NOT_COMPARABLE, ShapesEvaluator

        self.device = torch.device(device) if device is not None else _default_device()
        self.evaluator = ShapesEvaluator.load_or_train(data_root, image_size, device=self.device, **train_kwargs)
        info = self.evaluator.info
        self.info = {"network": f"cmgen ShapesClassifier {self.evaluator.image_size}px", "extractor": "shapes",
                     "weights": info["file"], "sha256": info["sha256"], "random_init": False, "note": NOT_COMPARABLE}

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("features", "probs")

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.evaluator.image_size
        x = images01
        if tuple(x.shape[2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        h, logits = self.evaluator.model(x)
        return {"features": h, "probs": torch.softmax(logits["shape"], dim=1)}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_extractor(kind: str, *, inception_weights: str | None = None, encoder_weights: str | None = None,
                    shapes_root: str | None = None, image_size: int | None = None,
                    random_init_for_tests: bool = False, device: torch.device | str | None = None) -> Extractor:
    """An extractor by name: ``inception``, ``resnet50``, ``vgg16``, ``shapes``."""
    if kind == "inception":
        return InceptionExtractor(inception_weights, random_init_for_tests=random_init_for_tests, device=device)
    if kind in ("resnet50", "vgg16"):
        return TorchvisionEncoder(kind, encoder_weights, random_init_for_tests=random_init_for_tests, device=device)
    if kind == "shapes":
        if shapes_root is None:
            raise ValueError("the shapes extractor needs the shapes data root (--shapes-root)")
        return ShapesExtractor(shapes_root, image_size, device=device)
    raise ValueError(f"unknown extractor {kind!r}; expected inception, resnet50, vgg16 or shapes")


class RunningStatistics:
    """Mean and unbiased covariance accumulated batch by batch in float64 (Chan et al. pairwise update:
    M2 = M2_a + M2_b + d d^T n_a n_b / n with d = mean_b - mean_a), so no (N, D) array is kept.
    Equals ``feature_statistics`` of the concatenated batches up to float64 round-off."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        d = mb - self.mean
        self.m2 = self.m2 + m2b + torch.outer(d, d) * (self.n * nb / n)
        self.mean = self.mean + d * (nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.n}")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


def _batches(source: Any, batch_size: int, num_workers: int, device: torch.device) -> tuple[Iterator, int | None]:
    """(iterator of float32 [0, 1] batches on device, total count or None)."""
    def to01(b: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(b) or b.dim() != 4 or b.shape[1] != 3:
            raise ValueError(f"image batches must be (B, 3, H, W) tensors, got "
                             f"{tuple(b.shape) if torch.is_tensor(b) else type(b).__name__}")
        b = b.to(device, non_blocking=True)
        return b.float().div_(255.0) if b.dtype == torch.uint8 else b.float()

    if isinstance(source, (str, os.PathLike)) or (isinstance(source, (list, tuple)) and source
                                                    and isinstance(source[0], (str, os.PathLike))):
        files = list_images(source) if isinstance(source, (str, os.PathLike)) else [Path(f) for f in source]
        loader = torch.utils.data.DataLoader(ImageFiles(files), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")
        return (to01(b) for b in loader), len(files)
    if torch.is_tensor(source):
        return (to01(source[i:i + batch_size]) for i in range(0, len(source), batch_size)), len(source)
    if isinstance(source, Iterable):
        return (to01(b) for b in source), None
    raise ValueError(f"source must be an image folder, a list of files, a tensor or an iterable of batches, "
                     f"got {type(source).__name__}")


def extract(extractor: Extractor, source: Any, *, batch_size: int = 50, num_workers: int = 0,
            keep: Sequence[str] = ("features",), statistics: bool = False, progress: bool = True,
            desc: str = "features") -> dict[str, Any]:
    """Run ``extractor`` over ``source`` batch by batch.

    Args:
        source: an image folder (recursive, sorted), a list of image files, a tensor ``(N, 3, H, W)``
            (uint8 or float in [0, 1]) or an iterable of such batches (e.g. generator samples).
        keep: outputs to return as float32 numpy arrays, e.g. ``("features", "probs")``.
        statistics: also accumulate the float64 mean/covariance of ``features``
            (:class:`RunningStatistics`); with ``keep=()`` nothing of size N is kept.

    Returns:
        ``{"n": N, <kept output>: (N, D) float32, "mu": (D,), "sigma": (D, D)}`` (the last two with
        ``statistics``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unknown = set(keep) - set(extractor.outputs)
    if unknown:
        raise ValueError(f"extractor {extractor.name!r} has outputs {extractor.outputs}, not {sorted(unknown)}")
    batches, count = _batches(source, batch_size, num_workers, extractor.device)
    kept: dict[str, list[np.ndarray]] = {k: [] for k in keep}
    stats = RunningStatistics() if statistics else None
    n = 0
    with fp32_matmul(), torch.inference_mode():
        for x in tqdm(batches, total=None if count is None else -(-count // batch_size), desc=desc,
                      disable=not progress, unit="batch", dynamic_ncols=True):
            out = extractor(x)
            for k in keep:
                kept[k].append(out[k].float().cpu().numpy())
            if stats is not None:
                stats.update(out["features"])
            n += x.shape[0]
    result: dict[str, Any] = {"n": n, **{k: np.concatenate(v) if v else np.zeros((0, 0), np.float32)
                                           for k, v in kept.items()}}
    if stats is not None:
        result["mu"], result["sigma"] = stats.result()
    return result

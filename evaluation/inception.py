"""The FID Inception-v3, as pytorch-fid defines it, with weights only from a local file.

FID, KID and IS are only comparable with published numbers when computed with *this* network: the
TensorFlow ``inception-2015-12-05`` graph ported to PyTorch by pytorch-fid (``src/pytorch_fid/inception.py``,
v0.3.0: ``fid_inception_v3``, ``FIDInceptionA``/``C``/``E_1``/``E_2``, ``InceptionV3.forward``). It differs
from torchvision's ImageNet Inception-v3 in

- 1008 output classes (``fc``: 2048 -> 1008), no auxiliary head;
- the average pools inside the A, C and E blocks exclude the zero padding (``count_include_pad=False``,
  as TensorFlow's average pool);
- the last E block (``Mixed_7c``) pools its pool branch with a 3x3 **max** pool (a quirk of the TF graph);
- the input: images in [0, 1] are resized to 299x299 with ``F.interpolate(mode="bilinear",
  align_corners=False)`` and scaled to [-1, 1] with ``2x - 1``; pool3 is the 2048-d global average pool
  after ``Mixed_7c``.

The module names follow torchvision's ``Inception3``, so pytorch-fid's weight file
``pt_inception-2015-12-05-6726825d.pth`` loads as is (``load_state_dict(strict=True)``). Nothing is
downloaded: give the file with ``--inception-weights PATH`` or ``CMGEN_INCEPTION_WEIGHTS``. Random
weights exist only behind :func:`load_fid_inception`'s explicit ``random_init_for_tests=True``.

Inception Score logits: improved-gan (``inception_score/model.py``) multiplies pool3 by the softmax
weight matrix **without the bias**, as does torch-fidelity (``logits_unbiased``, its ISC default);
:meth:`FIDInceptionV3.logits` does the same unless ``unbiased=False``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

__all__ = ["FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "WEIGHTS_ENV", "InceptionWeightsError", "FIDInceptionV3",
           "random_state_dict", "load_fid_inception", "state_dict_sha256", "file_sha256"]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
WEIGHTS_ENV = "CMGEN_INCEPTION_WEIGHTS"


class InceptionWeightsError(ValueError):
    """No (or an unusable) local weight file for the FID Inception network."""


class FIDInceptionA(tv.InceptionA):
    """InceptionA whose pool branch averages without the zero padding (TF average pool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)


class FIDInceptionC(tv.InceptionC):
    """InceptionC whose pool branch averages without the zero padding (TF average pool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, b7d, bp], 1)


class FIDInceptionE(tv.InceptionE):
    """InceptionE with the FID graph's pool branch: average without padding (``Mixed_7b``) or, in the
    last block (``Mixed_7c``, ``max_pool=True``), a 3x3 max pool."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([b1, b3, b3d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (pytorch-fid layout). Build with :func:`load_fid_inception`.

    ``forward(images)``: images ``(N, 3, H, W)`` in [0, 1] (any H, W) -> pool3 features ``(N, 2048)``.
    ``logits(pool3)`` -> ``(N, 1008)``. ``resize_input`` / ``normalize_input`` as pytorch-fid's flags.
    """

    def __init__(self, resize_input: bool = True, normalize_input: bool = True):
        super().__init__()
        self.resize_input, self.normalize_input = resize_input, normalize_input
        conv = tv.BasicConv2d
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = tv.InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv.InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if self.normalize_input:
            x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)                        # block 0 ends (64 x 73 x 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)                        # block 1 ends (192 x 35 x 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)                # pool3 (N, 2048)

    def logits(self, pool3: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
        """``pool3 @ fc.weight.T`` (+ ``fc.bias`` unless ``unbiased``): (N, 2048) -> (N, 1008)."""
        out = pool3 @ self.fc.weight.T
        return out if unbiased else out + self.fc.bias


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, shapes and float32 values, in sorted name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the pt_inception layout, for tests only (the features mean nothing).

    Convolutions get He-scaled N(0, 2/fan_in) weights and the batch norms random affine parameters
    near 1 and small running means, so activations keep their scale and their dependence on the input
    through all 94 layers (torchvision's own init, std 0.1 at every fan-in, makes them grow by orders of
    magnitude; 1/fan_in lets the biases drown the input).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):                 # names and shapes only; no time spent on a default init
        model = FIDInceptionV3()
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif name.endswith("conv.weight") or name == "fc.weight":
            fan_in = t[0].numel()
            state[name] = torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight") or name.endswith("running_var"):
            state[name] = 0.8 + 0.4 * torch.rand(t.shape, generator=gen)
        else:                                             # bn.bias, running_mean, fc.bias
            state[name] = 0.01 * torch.randn(t.shape, generator=gen)
    return state


def _resolve_weights(weights: str | os.PathLike | None) -> Path:
    where = (f"Download {FID_WEIGHTS_FILE} (pytorch-fid's port of TF inception-2015-12-05) from\n  "
             f"{FID_WEIGHTS_URL}\non a machine with internet access and pass --inception-weights PATH or set "
             f"{WEIGHTS_ENV}=PATH.")
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV) or None
    if weights is None:
        raise InceptionWeightsError(f"FID needs the Inception weights from a local file; none given. {where}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weight file not found: {path}. {where}")
    return path


def load_fid_inception(weights: str | os.PathLike | None = None, *, random_init_for_tests: bool = False,
                       seed: int = 0, device: torch.device | str = "cpu") -> tuple[FIDInceptionV3, dict]:
    """Build the FID Inception in eval mode and say which weights it holds.

    Args:
        weights: path of a state dict in pytorch-fid's layout (``pt_inception-2015-12-05-6726825d.pth``);
            None reads ``CMGEN_INCEPTION_WEIGHTS``. Neither: :class:`InceptionWeightsError` saying where
            to get the file.
        random_init_for_tests: use :func:`random_state_dict` (``seed``) instead; results are then labelled
            random and must never be reported.

    Returns:
        ``(model, info)``; ``info`` = ``{"network", "weights", "sha256", "random_init"}`` for every result.
    """
    with torch.device("meta"):                 # every tensor comes from the state dict (assign=True)
        model = FIDInceptionV3()
    if random_init_for_tests:
        if weights is not None:
            raise ValueError("pass either weights or random_init_for_tests=True, not both")
        state = random_state_dict(seed)
        info = {"weights": f"random init (seed {seed}), TEST ONLY", "sha256": state_dict_sha256(state),
                "random_init": True}
    else:
        path = _resolve_weights(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InceptionWeightsError(f"cannot read {path} as a PyTorch state dict: {e}") from e
        if not isinstance(state, dict):
            raise InceptionWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
        info = {"weights": str(path.resolve()), "sha256": file_sha256(path), "random_init": False}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InceptionWeightsError(f"the weights ({info['weights']}) do not fit the FID Inception-v3 "
                                    f"(pytorch-fid layout): {e}") from e
    info = {"network": "FID Inception-v3 (pytorch-fid 0.3.0 layout, pool3 2048-d, bilinear resize to 299)", **info}
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), info

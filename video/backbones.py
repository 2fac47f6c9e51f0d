"""3D video backbones that map a clip ``(B, 3, T, H, W)`` to an embedding ``(B, dim)``.

- ``r3d_18`` / ``r2plus1d_18``: torchvision's ``VideoResNet`` builders with random initialisation
  (``weights=None``; nothing is downloaded). As in VideoMoCo/MoCo (``base_encoder(num_classes=dim)``)
  the final ``fc`` is the projection to ``dim``; ``mlp=True`` puts MoCo v2's hidden layer in front of it.
  ``weights_path`` loads a local state dict (e.g. a Kinetics checkpoint) into everything but ``fc``.
- ``c3d``: C3D (Tran et al., ICCV 2015; the VideoMoCo paper's third backbone) in the self-supervised
  form with BatchNorm after every conv and ``pool5 = AdaptiveAvgPool3d(1)`` (512-d), transcribed from
  xudejing/video-clip-order-prediction ``models/c3d.py`` at commit
  7a1710d3debd66a328e2395676fecd18ecdebeae (the official VideoMoCo code ships no C3D). Needs T >= 8.
- ``tiny``: a 3-block 3D CNN (conv-BN-ReLU, strided in space and time) for CPU tests and the demo.
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["TinyVideoCNN", "C3D", "TorchvisionVideoBackbone", "build_backbone", "BACKBONES", "C3D_LAYERS"]

BACKBONES = ("tiny", "r3d_18", "r2plus1d_18", "c3d")

# (name, out channels, max-pool after it as (T, H, W) or None), c3d.py's conv1 .. conv5b
C3D_LAYERS = (("conv1", 64, (1, 2, 2)), ("conv2", 128, (2, 2, 2)), ("conv3a", 256, None), ("conv3b", 256, (2, 2, 2)),
              ("conv4a", 512, None), ("conv4b", 512, (2, 2, 2)), ("conv5a", 512, None), ("conv5b", 512, None))


def _check_clip(x: torch.Tensor) -> None:
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"expected clips (B, 3, T, H, W), got shape {tuple(x.shape)}")


class TinyVideoCNN(nn.Module):
    """Three conv3d(3x3x3)-BN-ReLU blocks of ``width``, ``2*width``, ``4*width`` channels (the last two
    strided by 2 in T, H, W), global average pooling, then ``fc`` to ``dim`` (optionally MLP first).

    Shape: ``(B, 3, T, H, W) -> (B, dim)``; any T, H, W >= 1.
    """

    def __init__(self, dim: int = 128, width: int = 16, mlp: bool = False):
        super().__init__()
        if dim < 1 or width < 1:
            raise ValueError(f"dim and width must be >= 1, got dim={dim}, width={width}")
        chans = [3, width, 2 * width, 4 * width]
        layers = []
        for i in range(3):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv3d(chans[i], chans[i + 1], 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm3d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
        self.fc = _head(chans[-1], dim, mlp)
        self.feature_dim = chans[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W) -> (B, 4 * width)`` pooled features before the projection."""
        _check_clip(x)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class C3D(nn.Module):
    """C3D with BN: eight 3x3x3 conv (padding 1) - BN - ReLU layers of :data:`C3D_LAYERS` widths with
    max-pools after conv1 (1, 2, 2), conv2, conv3b, conv4b (2, 2, 2), then global average pooling to
    512 and ``fc`` to ``dim`` (optionally MoCo v2's MLP first).

    Shape: ``(B, 3, T, H, W) -> (B, dim)``, T >= 8 and H, W >= 16.
    """

    def __init__(self, dim: int = 128, mlp: bool = False):
        super().__init__()
        layers, c_in = [], 3
        for name, c_out, pool in C3D_LAYERS:
            layers += [nn.Conv3d(c_in, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
            if pool is not None:
                layers.append(nn.MaxPool3d(pool, stride=pool))
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
        self.feature_dim = c_in
        self.fc = _head(c_in, dim, mlp)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W) -> (B, 512)`` pooled features before the projection."""
        _check_clip(x)
        if x.shape[2] < 8 or min(x.shape[3:]) < 16:
            raise ValueError(f"C3D pools T by 8 and H, W by 16: need T >= 8 and H, W >= 16, got {tuple(x.shape)}")
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class TorchvisionVideoBackbone(nn.Module):
    """torchvision ``r3d_18`` / ``r2plus1d_18`` (random init) with ``fc`` = projection to ``dim``.

    Args:
        arch: ``"r3d_18"`` or ``"r2plus1d_18"``.
        dim: output dimension (VideoMoCo: 128).
        mlp: MoCo v2 head ``Linear(512, 512) - ReLU - Linear(512, dim)``.
        weights_path: optional local ``.pth``/``.pt`` state dict of the torchvision model (keys as in
            ``torchvision.models.video.r3d_18().state_dict()``, optionally under ``"state_dict"``);
            ``fc.*`` entries are ignored because the projection is new. Nothing is ever downloaded.
    """

    def __init__(self, arch: str = "r2plus1d_18", dim: int = 128, mlp: bool = False,
                 weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torchvision.models import video as tv_video
        builders = {"r3d_18": tv_video.r3d_18, "r2plus1d_18": tv_video.r2plus1d_18}
        if arch not in builders:
            raise ValueError(f"arch must be one of {sorted(builders)}, got {arch!r}")
        net = builders[arch](weights=None)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(f"{weights_path} does not match {arch}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        self.feature_dim = net.fc.in_features
        net.fc = _head(self.feature_dim, dim, mlp)
        self.net = net

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W) -> (B, 512)`` pooled features before the projection."""
        _check_clip(x)
        n = self.net
        return torch.flatten(n.avgpool(n.layer4(n.layer3(n.layer2(n.layer1(n.stem(x)))))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.forward_features(x))


def _head(in_dim: int, dim: int, mlp: bool) -> nn.Module:
    if mlp:
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, dim))
    return nn.Linear(in_dim, dim)


def build_backbone(name: str, dim: int = 128, width: int = 16, mlp: bool = False,
                   weights_path: str | os.PathLike | None = None) -> nn.Module:
    """A backbone by name (see :data:`BACKBONES`); ``width`` is used by ``tiny`` only."""
    if name == "tiny":
        if weights_path is not None:
            raise ValueError(f"the tiny backbone has no pretrained weights, got weights_path={weights_path!r}")
        return TinyVideoCNN(dim, width, mlp)
    if name in ("r3d_18", "r2plus1d_18"):
        return TorchvisionVideoBackbone(name, dim, mlp, weights_path)
    if name == "c3d":
        if weights_path is not None:
            raise ValueError("c3d loads pretrained weights through model.init_from of a fine-tune, not weights_path")
        return C3D(dim, mlp)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")

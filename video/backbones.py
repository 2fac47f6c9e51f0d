"""3D video backbones that map a clip ``(B, 3, T, H, W)`` to an embedding ``(B, dim)``.

- ``r3d_18`` / ``r2plus1d_18``: torchvision's ``VideoResNet`` builders with random initialisation
  (``weights=None``; nothing is downloaded). As in VideoMoCo/MoCo (``base_encoder(num_classes=dim)``)
  the final ``fc`` is the projection to ``dim``; ``mlp=True`` puts MoCo v2's hidden layer in front of it.
  ``weights_path`` loads a local state dict (e.g. a Kinetics checkpoint) into everything but ``fc``.
- ``tiny``: a 3-block 3D CNN (conv-BN-ReLU, strided in space and time) for CPU tests and the demo.
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["TinyVideoCNN", "TorchvisionVideoBackbone", "build_backbone", "BACKBONES"]

BACKBONES = ("tiny", "r3d_18", "r2plus1d_18")


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
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")

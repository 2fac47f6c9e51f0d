"""Negative cosine similarity with a stop-gradient target (SimSiam Eq. 1; BYOL Eq. 2).

D(p, z) = −⟨p/‖p‖, stopgrad(z)/‖z‖⟩, averaged over the batch. SimSiam's symmetric loss is
½·D(p1, z2) + ½·D(p2, z1) (:meth:`NegativeCosine.symmetric`). BYOL writes its per-direction loss as
‖p̄ − z̄‖² = 2 − 2·cos(p, z) = 2 + 2·D(p, z) and sums both directions; it has the same gradient as
4× the symmetric loss, so this module serves both methods (scale the learning rate or the loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NegativeCosine"]


class NegativeCosine(nn.Module):
    """−cos(p, stopgrad(z)), mean over the batch. The target z never receives a gradient.

    Args:
        eps: clamp on the norms (F.cosine_similarity's eps).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        if not float(eps) > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Shape: p (N, D) predictor output, z (N, D) target projection; returns a scalar."""
        if p.dim() != 2 or p.shape != z.shape:
            raise ValueError(
                f"p and z must both be (N, D) with the same shape, got {tuple(p.shape)} and {tuple(z.shape)}")
        return -F.cosine_similarity(p, z.detach(), dim=1, eps=self.eps).mean()

    def symmetric(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """SimSiam's symmetrized loss ½·D(p1, z2) + ½·D(p2, z1); all inputs (N, D)."""
        return 0.5 * self.forward(p1, z2) + 0.5 * self.forward(p2, z1)

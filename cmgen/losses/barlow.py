"""Barlow Twins redundancy-reduction loss (Zbontar et al., ICML 2021, Eq. 1-2).

c = BN(z1)ᵀ·BN(z2) / N, where BN standardizes every feature with the batch mean and the biased batch
variance (``nn.BatchNorm1d(affine=False)`` in training mode, eps = 1e-5), and

    L = Σ_i (1 − c_ii)² + λ·Σ_i Σ_{j≠i} c_ij².

Distributed (``gather_distributed=True``), matching the official facebookresearch/barlowtwins
``main.py``: the model is converted with ``nn.SyncBatchNorm`` (so the BN statistics are those of the
global batch) and c is divided by the global batch size and summed over ranks. The official sum is
a plain ``all_reduce``, which leaves every rank only the gradient of its own term (1/world_size of the
correct gradient under DDP averaging, lightly #1977); here both the statistics and c are reduced with
:func:`cmgen.distributed.all_reduce_with_grad`, so the loss and (after DDP averaging) the gradient
equal those of one process on the global batch.
"""
from __future__ import annotations

import torch
from torch import nn

from cmgen import distributed

__all__ = ["BarlowTwins"]


class BarlowTwins(nn.Module):
    """Barlow Twins loss.

    Args:
        lambd: weight λ of the off-diagonal (redundancy) term; 0.0051 in the paper (D = 8192).
        gather_distributed: use global-batch BN statistics and sum c over ranks (see module docstring).
        eps: BN variance epsilon (BatchNorm1d's default 1e-5).
    """

    def __init__(self, lambd: float = 0.0051, gather_distributed: bool = False, eps: float = 1e-5):
        super().__init__()
        if not float(lambd) >= 0:
            raise ValueError(f"lambd must be >= 0, got {lambd!r}")
        if not float(eps) >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.lambd, self.gather_distributed, self.eps = float(lambd), bool(gather_distributed), float(eps)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, gather_distributed={self.gather_distributed}"

    def _standardize(self, z: torch.Tensor, n_total: int, reduce: bool) -> torch.Tensor:
        # Two passes (mean, then centred second moment), as BatchNorm's biased batch variance.
        total = z.sum(dim=0)
        mean = (distributed.all_reduce_with_grad(total) if reduce else total) / n_total
        sq = (z - mean).pow(2).sum(dim=0)
        var = (distributed.all_reduce_with_grad(sq) if reduce else sq) / n_total
        return (z - mean) / torch.sqrt(var + self.eps)

    def cross_correlation(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The (D, D) cross-correlation matrix c (summed over ranks under ``gather_distributed``)."""
        if z1.dim() != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"z1 and z2 must both be (N, D) with the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        reduce = self.gather_distributed and distributed.is_distributed()
        n_total = z1.shape[0] * (distributed.world_size() if reduce else 1)
        if n_total < 2:
            raise ValueError(f"Barlow Twins needs a batch of at least 2 for batch statistics, got {n_total}")
        c = self._standardize(z1, n_total, reduce).t() @ self._standardize(z2, n_total, reduce) / n_total
        return distributed.all_reduce_with_grad(c) if reduce else c

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Shape: z1 (N, D), z2 (N, D) projector outputs of the two views; returns a scalar."""
        c = self.cross_correlation(z1, z2)
        on_diag = (1 - c.diagonal()).pow(2).sum()
        eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        off_diag = c.pow(2).masked_fill(eye, 0).sum()
        return on_diag + self.lambd * off_diag

"""Bidirectional max-margin ranking loss (VSE++, Faghri et al. BMVC 2018; collaborative experts).

With similarities s_ij = ⟨a_i, b_j⟩ of L2-normalized embeddings (pairs (a_i, b_i) match):

- a→b: for anchor a_i and every negative b_j (j ≠ i): [margin − s_ii + s_ij]_+
- b→a: for anchor b_j and every negative a_i (i ≠ j): [margin − s_jj + s_ij]_+

VSE++ Eq. 2 (``hardest=False``, the "sum of hinges" of Kiros et al.) keeps every negative; VSE++ Eq. 4
(``max_violation``, ``hardest=True``) keeps only the hardest negative of each anchor.

Reduction: ``"sum"`` (default) is VSE++'s ``ContrastiveLoss`` (a sum over anchors and negatives).
``"mean"`` divides by the number of hinge terms: 2N(N−1) with all negatives, which is the
collaborative-experts / support-set ``MaxMarginRankingLoss`` (``fix_norm=True``: mean over the
off-diagonal pairs), or 2N with the hardest negative only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaxMarginRanking"]


class MaxMarginRanking(nn.Module):
    """Bidirectional hinge ranking loss on the in-batch similarity matrix.

    Args:
        margin: hinge margin (0.2 in VSE++ and collaborative experts).
        hardest: keep only the hardest negative per anchor (VSE++ ``max_violation``).
        reduction: ``"sum"`` (VSE++) or ``"mean"`` (collaborative experts; see module docstring).
        normalize: L2-normalize the inputs, so s_ij is a cosine similarity. VSE++ normalizes inside
            its encoders and takes the plain dot product in the loss; pass ``normalize=False`` for
            embeddings that are already normalized or when raw dot products are wanted.
    """

    def __init__(self, margin: float = 0.2, hardest: bool = False, reduction: str = "sum", normalize: bool = True):
        super().__init__()
        if not float(margin) >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margin, self.hardest, self.reduction, self.normalize = float(margin), bool(hardest), reduction, normalize

    def extra_repr(self) -> str:
        return f"margin={self.margin}, hardest={self.hardest}, reduction={self.reduction!r}, normalize={self.normalize}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Shape: a (N, D), b (N, D) with a_i matching b_i; returns a scalar."""
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(
                f"a and b must both be (N, D) with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if self.normalize:
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        return self.from_similarity(a @ b.t())

    def from_similarity(self, sim: torch.Tensor) -> torch.Tensor:
        """The loss from a precomputed (N, N) similarity matrix with matches on the diagonal."""
        if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
            raise ValueError(f"sim must be a square (N, N) matrix with N >= 2, got {tuple(sim.shape)}")
        n = sim.shape[0]
        pos = sim.diagonal()
        off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        # cost_ab[i, j]: anchor a_i, negative b_j; cost_ba[i, j]: anchor b_j, negative a_i (VSE++ Eq. 2).
        cost_ab = (self.margin - pos[:, None] + sim).clamp_min(0) * off
        cost_ba = (self.margin - pos[None, :] + sim).clamp_min(0) * off
        if self.hardest:
            # VSE++ Eq. 4: the hardest negative of each anchor (the zeroed diagonal never wins over a
            # positive hinge, and when all hinges are 0 the max is 0 either way).
            cost_ab, cost_ba = cost_ab.max(dim=1).values, cost_ba.max(dim=0).values
            count = 2 * n
        else:
            count = 2 * n * (n - 1)
        total = cost_ab.sum() + cost_ba.sum()
        return total if self.reduction == "sum" else total / count

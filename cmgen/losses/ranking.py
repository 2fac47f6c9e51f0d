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

``gather_distributed=True`` (the "local loss"): rank r's anchors are its own a_i (against the b of all
ranks, gathered with gradient) and its own b_j (against the gathered a). With W ranks of n pairs each
(global N = W n), the rank's loss is W · (sum of its anchors' hinges) for ``"sum"`` and that divided by
the global count 2N(N−1) (or 2N) for ``"mean"``; every hinge belongs to exactly one rank's anchors, so
the mean of the rank losses equals the single-process loss on the global batch, and the per-rank input
gradients follow the convention of :mod:`cmgen.distributed` (W × the global gradient, which DDP's
averaging divides back).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmgen import distributed as cdist

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
        gather_distributed: rank the local anchors against the global batch (module docstring).
    """

    def __init__(self, margin: float = 0.2, hardest: bool = False, reduction: str = "sum", normalize: bool = True,
                 gather_distributed: bool = False):
        super().__init__()
        if not float(margin) >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margin, self.hardest, self.reduction, self.normalize = float(margin), bool(hardest), reduction, normalize
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, hardest={self.hardest}, reduction={self.reduction!r}, "
                f"normalize={self.normalize}, gather_distributed={self.gather_distributed}")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Shape: a (N, D), b (N, D) with a_i matching b_i; returns a scalar."""
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(
                f"a and b must both be (N, D) with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if self.normalize:
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        if not (self.gather_distributed and cdist.is_distributed()):
            return self.from_similarity(a @ b.t())
        n, world = a.shape[0], cdist.world_size()
        total_n = world * n
        if total_n < 2:
            raise ValueError(f"the global batch needs N >= 2, got N={total_n}")
        own = torch.arange(n, device=a.device) + cdist.rank() * n
        pos = (a * b).sum(1)  # s_ii of the local pairs
        # a→b: local a_i against every b_j; b→a: local b_j against every a_i (rows of (b a^T) = columns of s)
        local = (self._anchor_hinges(a @ cdist.gather_with_grad(b).t(), pos, own).sum()
                 + self._anchor_hinges(b @ cdist.gather_with_grad(a).t(), pos, own).sum())
        count = 2 * total_n if self.hardest else 2 * total_n * (total_n - 1)
        return local * world if self.reduction == "sum" else local * (world / count)

    def _anchor_hinges(self, sim_rows: torch.Tensor, pos: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Per-anchor hinge sum (or hardest hinge) of VSE++ Eq. 2 (Eq. 4), shape (n,).

        ``sim_rows`` (n, M): similarities of n anchors to M candidates, ``pos`` (n,) the anchors' matching
        similarity, ``own`` (n,) the column of each anchor's match, which is not a negative.
        """
        off = torch.ones_like(sim_rows, dtype=torch.bool)
        off[torch.arange(sim_rows.shape[0], device=sim_rows.device), own] = False
        cost = (self.margin - pos[:, None] + sim_rows).clamp_min(0) * off
        # the zeroed own column never wins over a positive hinge, and when all hinges are 0 the max is 0
        return cost.max(dim=1).values if self.hardest else cost.sum(dim=1)

    def from_similarity(self, sim: torch.Tensor) -> torch.Tensor:
        """The loss from a precomputed (N, N) similarity matrix with matches on the diagonal."""
        if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
            raise ValueError(f"sim must be a square (N, N) matrix with N >= 2, got {tuple(sim.shape)}")
        n = sim.shape[0]
        pos, own = sim.diagonal(), torch.arange(n, device=sim.device)
        # anchor a_i: row i of s against the b_j; anchor b_j: column j of s against the a_i (VSE++ Eq. 2)
        total = self._anchor_hinges(sim, pos, own).sum() + self._anchor_hinges(sim.t(), pos, own).sum()
        count = 2 * n if self.hardest else 2 * n * (n - 1)
        return total if self.reduction == "sum" else total / count

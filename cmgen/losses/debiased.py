"""DCL (decoupled) and HCL (hard negatives, debiased) contrastive losses on the shared core.

Both use SimCLR batches: z = [z0; z1] (2N, D) L2-normalised, s_ij = z_i . z_j, anchor i's positive is the
other view p(i), and its 2N - 2 negatives are every row except i and p(i) (the official codes' masks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmgen import distributed as cdist
from cmgen.losses._core import check_chunk_size, check_pair, check_temperature, masked_logsumexp, rowdot

__all__ = ["DCL", "HCL"]


class _PairLoss(nn.Module):
    def __init__(self, temperature, normalize, chunk_size, gather_distributed):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.normalize = normalize
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = gather_distributed

    def _negatives_lse(self, z0, z1, scale: float):
        """LSE over the 2N - 2 (global: 2WN - 2) negatives of each anchor, and that count. (2N,), int."""
        n = z0.shape[0]
        z = torch.cat([z0, z1], dim=0)
        sample = torch.arange(n, device=z.device)
        if self.gather_distributed and cdist.is_distributed():
            w = cdist.world_size()
            cols = torch.cat([cdist.gather_with_grad(z0), cdist.gather_with_grad(z1)], dim=0)
            global_sample = torch.arange(w * n, device=z.device)
            lse = masked_logsumexp(z, cols, scale=scale, row_labels=(sample + cdist.rank() * n).repeat(2),
                                   col_labels=global_sample.repeat(2), label_mode="different",
                                   chunk_size=self.chunk_size)
            return lse, 2 * w * n - 2
        # a sample's two views share a label, so "different label" drops the anchor and its positive
        lse = masked_logsumexp(z, scale=scale, row_labels=sample.repeat(2), label_mode="different",
                               chunk_size=self.chunk_size)
        return lse, 2 * n - 2

    def _prepare(self, z0, z1):
        check_pair(z0, z1)
        if z0.shape[0] < 2 and not (self.gather_distributed and cdist.is_distributed()):
            raise ValueError(f"{type(self).__name__} needs N >= 2 samples for negatives, got N={z0.shape[0]}")
        if self.normalize:
            z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
        return z0, z1


class DCL(_PairLoss):
    """Decoupled contrastive loss (Yeh et al., ECCV 2022, Eq. 6): the positive leaves the denominator.

        l_i = -s_{i,p(i)} / T + log sum_{j not in {i, p(i)}} exp(s_ij / T),   mean over the 2N anchors.

    Averaging over both views' anchors equals lightly's ``DCLLoss`` (0.5 * (L(z0, z1) + L(z1, z0))); the
    widely used third-party implementation (raminnakhli/Decoupled-Contrastive-Learning; the authors released
    none) sums the two directions in its README, exactly twice this value. The DCLW weighting is not
    included. Not to be confused with Chuang et al.'s *debiased* contrastive loss: that is ``HCL(beta=0)``.
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True, chunk_size: int | None = None,
                 gather_distributed: bool = False):
        super().__init__(temperature, normalize, chunk_size, gather_distributed)

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """z0, z1: (N, D) the two views. Returns a scalar."""
        z0, z1 = self._prepare(z0, z1)
        scale = 1.0 / self.temperature
        lse_neg, _ = self._negatives_lse(z0, z1, scale)
        pos = scale * rowdot(z0, z1)
        return lse_neg.mean() - pos.mean()


class HCL(_PairLoss):
    """Hard-negative contrastive loss (Robinson et al., ICLR 2021, Eq. 5 and the official ``criterion``).

    With pos = exp(s_{i,p(i)} / t), neg_j = exp(s_ij / t) over the M = 2N - 2 negatives,
    imp_j = neg_j^beta:

        reweight = sum_j imp_j neg_j / mean_j(imp_j)
        Ng = max( (-tau_plus * M * pos + reweight) / (1 - tau_plus),  M * exp(-1 / t) )
        l_i = -log( pos / (pos + Ng) ),   mean over the 2N anchors.

    beta = 0 is the debiased loss of Chuang et al. (2020); beta = 0 and tau_plus = 0 is NT-Xent. The
    sums are two core log-sum-exps (scales (1 + beta)/t and beta/t) and everything is evaluated with a
    per-row shift, so no exp overflows at small t.
    """

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0,
                 normalize: bool = True, chunk_size: int | None = None, gather_distributed: bool = False):
        super().__init__(temperature, normalize, chunk_size, gather_distributed)
        if not 0.0 <= tau_plus < 1.0:
            raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus!r}")
        if not beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.tau_plus = float(tau_plus)
        self.beta = float(beta)

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """z0, z1: (N, D) the two views. Returns a scalar."""
        z0, z1 = self._prepare(z0, z1)
        t, b = self.temperature, self.beta
        lse_hard, m = self._negatives_lse(z0, z1, (1.0 + b) / t)
        if b == 0.0:
            log_reweight = lse_hard
        else:
            lse_imp, _ = self._negatives_lse(z0, z1, b / t)
            # log(sum imp*neg / mean imp) = LSE((1+b)s/t) - LSE(b s/t) + log M
            log_reweight = lse_hard - lse_imp + math.log(m)
        pos_logit = (rowdot(z0, z1) / t).repeat(2)
        c = torch.maximum(log_reweight, pos_logit).detach()
        pos = torch.exp(pos_logit - c)
        ng = (torch.exp(log_reweight - c) - self.tau_plus * m * pos) / (1.0 - self.tau_plus)
        ng = torch.maximum(ng, torch.exp(math.log(m) - 1.0 / t - c))
        # -log(pos / (pos + Ng)) with both scaled by exp(-c)
        return (torch.log(pos + ng) - (pos_logit - c)).mean()

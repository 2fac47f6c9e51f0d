"""Supervised contrastive loss (Khosla et al. 2020, L_out, Eq. 2) on the shared core."""
from __future__ import annotations

import torch
from torch import nn

from cmgen import distributed as cdist
from cmgen.losses._core import check_chunk_size, check_temperature, masked_logsumexp

__all__ = ["SupCon"]


class SupCon(nn.Module):
    """SupCon L_out with the SupContrast (HobbitLong/SupContrast ``losses.py``) conventions.

    ``features`` (N, V, D) are flattened view-major into A = N V rows z_a (row v * N + i is view v of
    sample i). For anchor a with positives P(a) (other rows whose sample is a positive of a's sample) and
    A(a) = all rows except a:

        l_a = -(T / base_T) * (1 / |P(a)|) * sum_{p in P(a)} log( exp(z_a . z_p / T) / sum_{b in A(a)} exp(z_a . z_b / T) )

    and the loss is the mean of l_a over the anchors. Features are used as given (SupContrast expects
    L2-normalised inputs). ``labels`` (N,) make same-label samples positives; ``mask`` (N, N) float gives
    positive weights m_ij (SupContrast's ``mask``; it may be asymmetric, rows are anchors); with neither it
    is SimCLR (the positives of a row are the other views of its sample).

    Anchors without positives follow SupContrast's current code: their term is 0 but they still count in
    the mean. ``anchor_mask`` (N,) or (N, V) bool chooses which rows act as anchors (all rows stay in
    every denominator and may be positives), e.g. ContraD's supcon-fake where only fakes are anchors;
    the mean is over the chosen anchors, and an empty choice raises.

    The positive term is linear in z_p, so it is computed from per-label sums of features (or mask @
    features) without the A x A matrix; the denominator is the core's symmetric log-sum-exp.

    ``gather_distributed=True`` (the "local loss"): this rank's N V rows are the anchors, and the features
    of all ranks, gathered with gradient, are the contrast set (W N V rows, view-major over the global
    batch: global row v * W N + r N + i is view v of sample i of rank r), so positives and denominators
    are those of the single-process loss on the concatenated global batch. Labels are gathered (no
    gradient); without labels every global sample is its own class (SimCLR). A dense ``mask`` describes
    local pairs only and cannot be gathered, so it raises ``ValueError`` with ``gather_distributed=True``
    (also in a single process, so a script behaves the same on one and on many processes).
    ``anchor_mask`` stays local. The rank's loss is (sum over its anchors) * W / (global anchor count),
    the count being summed over ranks without gradient: the mean of the rank losses is then exactly the
    global mean even when ranks select different numbers of anchors (without ``anchor_mask`` this is the
    plain local mean). Every rank needs the same N. With no process group it is the single-process loss.

    Args:
        temperature: T > 0.
        base_temperature: base_T > 0; the loss is scaled by T / base_T (SupContrast).
        chunk_size: rows per tile of the core, ``None`` = automatic; value and gradient do not depend on it.
        gather_distributed: contrast the local anchors against the global batch (see above).
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, chunk_size: int | None = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.base_temperature = check_temperature(base_temperature, "base_temperature")
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"chunk_size={self.chunk_size}, gather_distributed={self.gather_distributed}")

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                anchor_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            features: (N, V, D).
            labels: (N,) integer labels, or None.
            mask: (N, N) positive weights (bool or float), or None; not together with ``labels``.
            anchor_mask: (N,) or (N, V) bool, or None (every row is an anchor).

        Returns:
            scalar float32 (float64 for float64 inputs).
        """
        if features.dim() != 3:
            raise ValueError(f"features must be (N, V, D), got shape {tuple(features.shape)}")
        n, v, _ = features.shape
        if labels is not None and mask is not None:
            raise ValueError("pass labels or mask, not both")
        if mask is not None and self.gather_distributed:
            raise ValueError("mask cannot be gathered across processes; with gather_distributed=True pass "
                             "labels (or neither, for SimCLR)")
        dtype = torch.promote_types(features.dtype, torch.float32)
        x = features.to(dtype)
        gathered = self.gather_distributed and cdist.is_distributed()
        rank, world = (cdist.rank(), cdist.world_size()) if gathered else (0, 1)
        # xg: the contrast samples (W N, V, D), this rank's at [rank * N, (rank + 1) * N)
        xg = cdist.gather_with_grad(x) if gathered else x
        if mask is not None:
            if mask.shape != (n, n):
                raise ValueError(f"mask must be (N, N) = ({n}, {n}), got {tuple(mask.shape)}")
            w = mask.to(dtype)
            pos_sum = w @ x.sum(1)          # (N, D): sum over all views of the weighted positive samples
            self_w = w.diagonal()           # (N,)  weight of the anchor's own sample
            count = v * w.sum(1)            # (N,)
        else:
            if labels is None:
                labels_g = torch.arange(world * n, device=features.device)
            else:
                if labels.shape != (n,):
                    raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
                labels_g = cdist.gather_no_grad(labels) if gathered else labels
            _, inv_g = torch.unique(labels_g, return_inverse=True)
            class_sum = x.new_zeros(int(inv_g.max()) + 1, x.shape[2]).index_add_(0, inv_g, xg.sum(1))
            inv = inv_g[rank * n:(rank + 1) * n]
            pos_sum = class_sum[inv]
            self_w = x.new_ones(n)
            count = v * torch.bincount(inv_g).to(dtype)[inv]
        # per view: remove the anchor itself from its positive set -> (V, N, D) and (V, N)
        pos_sum = pos_sum[None] - self_w[None, :, None] * x.transpose(0, 1)
        count = (count - self_w).expand(v, n)

        z = x.transpose(0, 1).reshape(v * n, -1)
        scale = 1.0 / self.temperature
        if gathered:
            zg = xg.transpose(0, 1).reshape(v * world * n, -1)
            # local row v * N + i is global contrast row v * W N + rank * N + i: that one leaves its denominator
            own = (torch.arange(v, device=z.device)[:, None] * (world * n)
                   + rank * n + torch.arange(n, device=z.device)[None, :]).reshape(-1)
            lse = masked_logsumexp(z, zg, scale=scale, exclude=own, chunk_size=self.chunk_size).view(v, n)
        else:
            lse = masked_logsumexp(z, scale=scale, exclude="diagonal", chunk_size=self.chunk_size).view(v, n)
        pos_logit_sum = scale * (x.transpose(0, 1) * pos_sum).sum(-1)       # sum_p w_p z_a . z_p / T
        # SupContrast: anchors with no positive get a 0 term (count clamped to 1, sum is 0)
        has_pos = count > 1e-6
        mean_log_prob = torch.where(has_pos, pos_logit_sum / count.clamp_min(1e-6) - lse, torch.zeros_like(lse))
        loss = -(self.temperature / self.base_temperature) * mean_log_prob   # (V, N)

        if anchor_mask is None:
            return loss.mean()
        if anchor_mask.dtype != torch.bool or anchor_mask.shape not in ((n,), (n, v)):
            raise ValueError(f"anchor_mask must be bool (N,) or (N, V) = ({n},) / ({n}, {v}), "
                             f"got {anchor_mask.dtype} {tuple(anchor_mask.shape)}")
        sel = (anchor_mask[:, None].expand(n, v) if anchor_mask.dim() == 1 else anchor_mask).t()
        if not gathered:
            if not bool(sel.any()):
                raise ValueError("anchor_mask selects no anchor")
            return loss[sel].mean()
        # sum * W / (global count): the mean over ranks is the global mean over anchors even when the ranks
        # select different numbers of anchors (the count is a constant, summed without gradient)
        total = int(round(float(cdist.all_reduce_mean(sel.sum().to(dtype))) * world))
        if total == 0:
            raise ValueError("anchor_mask selects no anchor on any rank")
        return loss[sel].sum() * (world / total)

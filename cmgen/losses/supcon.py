"""Supervised contrastive loss (Khosla et al. 2020, L_out, Eq. 2) on the shared core."""
from __future__ import annotations

import torch
from torch import nn

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
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, chunk_size: int | None = None):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.base_temperature = check_temperature(base_temperature, "base_temperature")
        self.chunk_size = check_chunk_size(chunk_size)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, base_temperature={self.base_temperature}, chunk_size={self.chunk_size}"

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
        dtype = torch.promote_types(features.dtype, torch.float32)
        x = features.to(dtype)
        if mask is not None:
            if mask.shape != (n, n):
                raise ValueError(f"mask must be (N, N) = ({n}, {n}), got {tuple(mask.shape)}")
            w = mask.to(dtype)
            pos_sum = w @ x.sum(1)          # (N, D): sum over all views of the weighted positive samples
            self_w = w.diagonal()           # (N,)  weight of the anchor's own sample
            count = v * w.sum(1)            # (N,)
        else:
            if labels is None:
                labels = torch.arange(n, device=features.device)
            if labels.shape != (n,):
                raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
            _, inv = torch.unique(labels, return_inverse=True)
            class_sum = x.new_zeros(int(inv.max()) + 1, x.shape[2]).index_add_(0, inv, x.sum(1))
            pos_sum = class_sum[inv]
            self_w = x.new_ones(n)
            count = v * torch.bincount(inv).to(dtype)[inv]
        # per view: remove the anchor itself from its positive set -> (V, N, D) and (V, N)
        pos_sum = pos_sum[None] - self_w[None, :, None] * x.transpose(0, 1)
        count = (count - self_w).expand(v, n)

        z = x.transpose(0, 1).reshape(v * n, -1)
        scale = 1.0 / self.temperature
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
        if not bool(sel.any()):
            raise ValueError("anchor_mask selects no anchor")
        return loss[sel].mean()

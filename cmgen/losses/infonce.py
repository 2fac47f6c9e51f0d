"""InfoNCE (CPC/MoCo) and its symmetric CLIP form, on the shared masked log-sum-exp core."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmgen import distributed as cdist
from cmgen.losses._core import check_chunk_size, check_pair, check_temperature, masked_logsumexp, rowdot

__all__ = ["InfoNCE"]


class InfoNCE(nn.Module):
    """InfoNCE: row i's positive is key i, the negatives are the other keys or a given set.

    In-batch (``negatives=None``): logits = query . key^T / T (N, N), target on the diagonal,
    loss_i = LSE_j(q_i . k_j / T) - q_i . k_i / T, mean over i. ``symmetric=True`` averages the
    query->key and key->query losses (CLIP / open_clip ``ClipLoss``).

    Given negatives (MoCo, ``moco/builder.py``): logits row i = [q_i . k_i, q_i . n_1, ..., q_i . n_K] / T,
    target 0; no in-batch negatives. ``negative_weights`` w_j (VideoMoCo temporal decay):

    - ``negative_weight_mode="exp"`` (VideoMoCo paper Eq. 6): denominator term w_j exp(q . n_j / T),
      i.e. a column bias log w_j; w_j = 0 drops the negative. Weights are constants here (detached).
    - ``negative_weight_mode="logit"`` (official VideoMoCo code, ``l_neg = q . (w_j n_j)``): the dot
      product becomes q . (w_j n_j) / T.

    ``gather_distributed=True`` (in-batch only): local rows against the keys of all ranks gathered with
    gradient (the open_clip "local loss"); row i's positive is column rank * N + i. With negatives given
    every row is independent, so nothing is gathered. ``chunk_size`` bounds memory to O(N * chunk_size)
    with the exact same value and gradient.

    Args:
        temperature: T > 0.
        symmetric: average both directions (in-batch only).
        normalize: L2-normalise query, key and negatives first.
        chunk_size: rows per tile of the core, ``None`` = automatic.
        gather_distributed: contrast against the global batch of keys.
        negative_weight_mode: "exp" or "logit".
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = False, normalize: bool = True,
                 chunk_size: int | None = None, gather_distributed: bool = False,
                 negative_weight_mode: str = "exp"):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if negative_weight_mode not in ("exp", "logit"):
            raise ValueError(f"negative_weight_mode must be 'exp' or 'logit', got {negative_weight_mode!r}")
        self.symmetric = symmetric
        self.normalize = normalize
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = gather_distributed
        self.negative_weight_mode = negative_weight_mode

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, normalize={self.normalize}, "
                f"chunk_size={self.chunk_size}, gather_distributed={self.gather_distributed}, "
                f"negative_weight_mode={self.negative_weight_mode!r}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor | None = None,
                negative_weights: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            query: (N, D).
            key: (N, D), key i is query i's positive.
            negatives: (K, D) or None.
            negative_weights: (K,) non-negative, only with ``negatives``.

        Returns:
            scalar float32 (float64 for float64 inputs).
        """
        check_pair(query, key, "query, key")
        if self.normalize:
            query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        scale = 1.0 / self.temperature
        if negatives is not None:
            return self._with_negatives(query, key, negatives, negative_weights, scale)
        if negative_weights is not None:
            raise ValueError("negative_weights needs negatives, got negatives=None")
        loss = self._in_batch(query, key, scale)
        if self.symmetric:
            loss = 0.5 * (loss + self._in_batch(key, query, scale))
        return loss

    def _in_batch(self, rows: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:
        n = rows.shape[0]
        offset = 0
        if self.gather_distributed:
            offset = cdist.rank() * n
            cols = cdist.gather_with_grad(cols)
        lse = masked_logsumexp(rows, cols, scale=scale, chunk_size=self.chunk_size)
        # positive logit q_i . k_i / T straight from the local pair (the gathered copy holds the same rows)
        pos = scale * rowdot(rows, cols[offset:offset + n])
        return (lse - pos).mean()

    def _with_negatives(self, query, key, negatives, weights, scale):
        if negatives.dim() != 2 or negatives.shape[1] != query.shape[1]:
            raise ValueError(f"negatives must be (K, D) with D = {query.shape[1]}, got {tuple(negatives.shape)}")
        if self.normalize:
            negatives = F.normalize(negatives, dim=1)
        bias = None
        if weights is not None:
            if weights.shape != (negatives.shape[0],):
                raise ValueError(f"negative_weights must be (K,) = ({negatives.shape[0]},), got {tuple(weights.shape)}")
            if self.negative_weight_mode == "exp":
                # Eq. 6: w_j exp(s_j / T) = exp(s_j / T + log w_j); log 0 = -inf removes the column.
                bias = torch.log(weights.detach().to(torch.promote_types(weights.dtype, torch.float32)))
            else:
                negatives = negatives * weights[:, None].to(negatives.dtype)
        pos = scale * rowdot(query, key)
        lse_neg = masked_logsumexp(query, negatives, scale=scale, bias=bias, chunk_size=self.chunk_size)
        # log(exp(l_pos) + sum_j exp(l_neg_j)) - l_pos: cross-entropy with target column 0
        return (torch.logaddexp(pos, lse_neg) - pos).mean()

"""MoCHi: hard negative mixing for MoCo (Kalantidis et al., NeurIPS 2020, Sec. 4).

For every query q (unit norm) and the queue Q of unit negatives:

1. rank the queue by similarity q·n and keep the N hardest, Q̃^N (Sec. 4.1);
2. synthesize s negatives h_k = h̃_k/‖h̃_k‖, h̃_k = α_k n_i + (1 − α_k) n_j with n_i, n_j drawn uniformly
   from Q̃^N and α_k ~ U(0, 1) (Eq. 4);
3. synthesize s' harder ones h'_k = h̃'_k/‖h̃'_k‖, h̃'_k = β_k q + (1 − β_k) n_j, n_j from Q̃^N and
   β_k ~ U(0, 0.5), so the query's own contribution stays below one half (Sec. 4.2);
4. add the s + s' synthetic points to that query's negatives. They are built without gradient: the
   loss treats them as constants, like the queue.

Loss: row i's logits are [q_i·k_i, q_i·Q, q_i·H_i] / T with target 0 (MoCo InfoNCE, averaged over
rows). The synthetic negatives H_i differ per query, while :class:`cmgen.losses.InfoNCE` takes one
negative set shared by all rows, so the loss cannot be a call to InfoNCE. It is computed the same way
instead: the queue part goes through the shared chunked core ``masked_logsumexp`` (the N×K logits are
never kept for backward), the small per-row part (N × (s + s')) directly, and the two are merged
with ``logaddexp``. With s = s' = 0 it equals ``InfoNCE(temperature)(q, k, queue)`` exactly (tested).
Optional ``negative_weights`` on the queue act as in InfoNCE (``negative_weight_mode``); synthetic
points are new and get weight 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmgen.losses._core import check_chunk_size, check_temperature, masked_logsumexp, rowdot

__all__ = ["MoCHi"]


class MoCHi(nn.Module):
    """MoCo InfoNCE with per-query synthetic hard negatives.

    Args:
        num_hard: N, size of each query's hard set Q̃^N (1024 in the paper's ImageNet-1k runs).
        num_mix_negatives: s, negatives mixed from pairs of hard negatives.
        num_mix_query: s', negatives mixed from the query and one hard negative.
        temperature: T > 0 (0.2: the paper builds on MoCo-v2).
        normalize: L2-normalize query, key and negatives first (mixing assumes unit vectors).
        negative_weight_mode: how ``negative_weights`` enter, "exp" or "logit", as in InfoNCE.
        chunk_size: rows per tile for ranking the queue and for the core; ``None`` = automatic.

    The paper starts mixing after a few warm-up epochs; set the counts to 0 (plain MoCo) until then,
    or switch between this module and InfoNCE in the training loop.
    """

    def __init__(self, num_hard: int = 1024, num_mix_negatives: int = 1024, num_mix_query: int = 256,
                 temperature: float = 0.2, normalize: bool = True, negative_weight_mode: str = "exp",
                 chunk_size: int | None = None):
        super().__init__()
        for name, value, low in (("num_hard", num_hard, 1), ("num_mix_negatives", num_mix_negatives, 0),
                                 ("num_mix_query", num_mix_query, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if negative_weight_mode not in ("exp", "logit"):
            raise ValueError(f"negative_weight_mode must be 'exp' or 'logit', got {negative_weight_mode!r}")
        self.num_hard, self.num_mix_negatives, self.num_mix_query = num_hard, num_mix_negatives, num_mix_query
        self.temperature = check_temperature(temperature)
        self.normalize = normalize
        self.negative_weight_mode = negative_weight_mode
        self.chunk_size = check_chunk_size(chunk_size)

    def extra_repr(self) -> str:
        return (f"num_hard={self.num_hard}, num_mix_negatives={self.num_mix_negatives}, "
                f"num_mix_query={self.num_mix_query}, temperature={self.temperature}, "
                f"negative_weight_mode={self.negative_weight_mode!r}")

    def _check(self, query: torch.Tensor, negatives: torch.Tensor) -> None:
        if query.dim() != 2:
            raise ValueError(f"query must be (N, D), got {tuple(query.shape)}")
        if negatives.dim() != 2 or negatives.shape[1] != query.shape[1]:
            raise ValueError(f"negatives must be (K, D) with D = {query.shape[1]}, got {tuple(negatives.shape)}")

    @torch.no_grad()
    def hardest(self, query: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Indices (N, num_hard) of each query's hardest negatives, most similar first.

        Shape: query (N, D), negatives (K, D), both unit norm; needs K >= num_hard.
        """
        self._check(query, negatives)
        if negatives.shape[0] < self.num_hard:
            raise ValueError(f"num_hard={self.num_hard} exceeds the number of negatives K={negatives.shape[0]}")
        n = query.shape[0]
        rows = self.chunk_size or max(1, (1 << 22) // max(negatives.shape[0], 1))
        out = []
        for r0 in range(0, n, rows):
            sim = query[r0:r0 + rows] @ negatives.t()
            out.append(sim.topk(self.num_hard, dim=1).indices)
        return torch.cat(out, dim=0) if out else query.new_empty(0, self.num_hard, dtype=torch.long)

    @torch.no_grad()
    def synthesize(self, query: torch.Tensor, negatives: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Synthetic negatives (N, s + s', D), unit norm, detached: s pair mixes then s' query mixes.

        Shape: query (N, D), negatives (K, D); normalized here when ``normalize=True``. Random draws
        come from ``generator`` (on its device) for reproducibility, else the global RNG.
        """
        self._check(query, negatives)
        query, negatives = query.detach(), negatives.detach()
        if self.normalize:
            query, negatives = F.normalize(query, dim=1), F.normalize(negatives, dim=1)
        n, d = query.shape
        s, s2 = self.num_mix_negatives, self.num_mix_query
        if s + s2 == 0:
            return query.new_empty(n, 0, d)
        hard = self.hardest(query, negatives)  # (N, num_hard) indices into negatives
        dev = generator.device if generator is not None else query.device

        def pick(count):
            # uniform draws from each query's own hard set -> indices into the queue, (N, count)
            slot = torch.randint(self.num_hard, (n, count), generator=generator, device=dev).to(query.device)
            return hard.gather(1, slot)

        i, j = pick(s), pick(s)
        alpha = torch.rand(n, s, 1, generator=generator, device=dev).to(query)
        mixed = alpha * negatives[i] + (1 - alpha) * negatives[j]  # Eq. 4
        c = pick(s2)
        beta = 0.5 * torch.rand(n, s2, 1, generator=generator, device=dev).to(query)
        mixed_q = beta * query[:, None, :] + (1 - beta) * negatives[c]  # Sec. 4.2, β < 0.5
        return F.normalize(torch.cat([mixed, mixed_q], dim=1), dim=2)

    def loss_with_synthetic(self, query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor,
                            synthetic: torch.Tensor, negative_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The MoCHi loss for given per-query synthetic negatives (N, S, D), used as constants."""
        self._check(query, negatives)
        if key.shape != query.shape:
            raise ValueError(f"query and key must both be (N, D) with the same shape, got {tuple(query.shape)} "
                             f"and {tuple(key.shape)}")
        n, d = query.shape
        if synthetic.dim() != 3 or synthetic.shape[0] != n or synthetic.shape[2] != d:
            raise ValueError(f"synthetic must be (N, S, D) = ({n}, S, {d}), got {tuple(synthetic.shape)}")
        if self.normalize:
            query, key, negatives = F.normalize(query, dim=1), F.normalize(key, dim=1), F.normalize(negatives, dim=1)
        scale = 1.0 / self.temperature
        bias = None
        if negative_weights is not None:
            if negative_weights.shape != (negatives.shape[0],):
                raise ValueError(f"negative_weights must be (K,) = ({negatives.shape[0]},), got "
                                 f"{tuple(negative_weights.shape)}")
            if self.negative_weight_mode == "exp":
                # VideoMoCo Eq. 6: w_j exp(s_j / T) = exp(s_j / T + log w_j)
                w = negative_weights.detach()
                bias = torch.log(w.to(torch.promote_types(w.dtype, torch.float32)))
            else:
                negatives = negatives * negative_weights[:, None].to(negatives.dtype)
        pos = scale * rowdot(query, key)  # (N,)
        lse_queue = masked_logsumexp(query, negatives, scale=scale, bias=bias, chunk_size=self.chunk_size)
        synth_logits = scale * torch.einsum("nd,nsd->ns", query.to(pos.dtype), synthetic.detach().to(pos.dtype))
        lse = torch.logsumexp(torch.cat([pos[:, None], lse_queue[:, None], synth_logits], dim=1), dim=1)
        return (lse - pos).mean()  # cross-entropy with target column 0

    def forward(self, query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor,
                negative_weights: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Shape: query (N, D), key (N, D), negatives (K, D) (the queue), negative_weights (K,) or None.

        Returns a scalar.
        """
        synthetic = self.synthesize(query, negatives, generator)
        return self.loss_with_synthetic(query, key, negatives, synthetic, negative_weights)

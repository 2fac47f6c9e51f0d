"""NT-Xent, the SimCLR loss, on the shared masked log-sum-exp core."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmgen import distributed as cdist
from cmgen.losses._core import check_chunk_size, check_pair, check_temperature, masked_logsumexp, rowdot

__all__ = ["NTXent"]


class NTXent(nn.Module):
    """NT-Xent (SimCLR, Chen et al. 2020, Eq. 1): 2N anchors, one positive, 2N - 2 negatives each.

    With z = [z0; z1] (2N, D) L2-normalised and s_ij = z_i . z_j,

        l_i = -log( exp(s_{i,p(i)} / T) / sum_{j != i} exp(s_ij / T) ),   loss = mean over the 2N anchors,

    p(i) being the other view of the same sample. Identical embeddings give log(2N - 1).

    The denominator is the core's symmetric path (z z^T is computed tile by tile, only tiles I <= J), so
    no 2N x 2N matrix exists even with ``chunk_size=None``. ``gather_distributed=True``: local anchors
    against the views of all ranks (gathered with gradient), positives at the global column of the pair.
    """

    def __init__(self, temperature: float = 0.5, normalize: bool = True, chunk_size: int | None = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.normalize = normalize
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, chunk_size={self.chunk_size}, "
                f"gather_distributed={self.gather_distributed}")

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z0, z1: (N, D) the two views' embeddings.

        Returns:
            scalar float32 (float64 for float64 inputs).
        """
        check_pair(z0, z1)
        if self.normalize:
            z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
        n = z0.shape[0]
        scale = 1.0 / self.temperature
        z = torch.cat([z0, z1], dim=0)
        if self.gather_distributed and cdist.is_distributed():
            r, w = cdist.rank(), cdist.world_size()
            cols = torch.cat([cdist.gather_with_grad(z0), cdist.gather_with_grad(z1)], dim=0)
            own = torch.arange(n, device=z.device) + r * n
            # row i of view 0 is global column r*n + i, row i of view 1 is column w*n + r*n + i
            lse = masked_logsumexp(z, cols, scale=scale, exclude=torch.cat([own, own + w * n]),
                                   chunk_size=self.chunk_size)
        else:
            lse = masked_logsumexp(z, scale=scale, exclude="diagonal", chunk_size=self.chunk_size)
        pos = scale * rowdot(z0, z1)
        # both anchors of a pair share the positive logit: mean(lse) - (2 * sum pos) / 2N
        return lse.mean() - pos.mean()

"""ContraGAN's conditional contrastive (2C) loss (Kang & Park, NeurIPS 2020, Eq. 7) on the shared core."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmgen import distributed as cdist
from cmgen.losses._core import check_chunk_size, check_pair, check_temperature, masked_logsumexp, rowdot

__all__ = ["TwoC"]


class TwoC(nn.Module):
    """2C loss with StudioGAN's ``ConditionalContrastiveLoss`` conventions.

    With cosine similarities s_ij = cos(e_i, e_j), proxy term a_i = cos(e_i, p_i) and margin m:

        num_i = exp((a_i - m) / t) + sum_{j != i, y_j = y_i} exp((s_ij - m) / t)
        den_i = exp((a_i - m) / t) + sum_{j != i} exp((s_ij - m) / t)
        loss  = mean_i -log(num_i / den_i)

    ``pos_collected_numerator=True`` (default; StudioGAN's current code and the paper) collects the
    same-label samples in the numerator; ``False`` is the paper-era code's option where the numerator is
    the proxy term only (the maintainers later advised it, StudioGAN #81).

    Paper vs code: the paper's numerator also sums k = i (a constant exp(1/t)); the code removes the
    diagonal from both sums, as done here. The paper-era code subtracted the margin from every similarity,
    which cancels in num/den, so ``margin`` only exists for config compatibility and does not change the
    loss (0 in every published config); its extra factor t inside the log (StudioGAN #85) only shifts the
    value by -log t (0 at the default t = 1) and is not reproduced.

    ``gather_distributed=True`` (the "local loss"): this rank's samples are the anchors i, and the sums
    over j run over the normalised embeddings of all ranks, gathered with gradient, with their labels
    gathered without gradient (j != i means "not this anchor's own global column"); the proxy term stays
    local. Every rank needs the same N, so the mean of the rank losses is the single-process loss on the
    global batch. With no process group it is the single-process loss.

    Args:
        temperature: t > 0.
        margin: m, subtracted from every similarity (cancels; see above).
        pos_collected_numerator: same-label samples join the numerator.
        chunk_size: rows per tile of the shared core, ``None`` = automatic.
        gather_distributed: sum over the global batch (see above).
    """

    def __init__(self, temperature: float = 1.0, margin: float = 0.0, pos_collected_numerator: bool = True,
                 chunk_size: int | None = None, gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.margin = float(margin)
        self.pos_collected_numerator = pos_collected_numerator
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, margin={self.margin}, "
                f"pos_collected_numerator={self.pos_collected_numerator}, "
                f"gather_distributed={self.gather_distributed}")

    def forward(self, embeddings: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: (N, D) discriminator embeddings of the samples.
            proxies: (N, D) class embedding of each sample's label.
            labels: (N,) integer labels.

        Returns:
            scalar float32 (float64 for float64 inputs).
        """
        check_pair(embeddings, proxies, "embeddings, proxies")
        n = embeddings.shape[0]
        if labels.shape != (n,):
            raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
        e, p = F.normalize(embeddings, dim=1), F.normalize(proxies, dim=1)
        scale, shift = 1.0 / self.temperature, self.margin / self.temperature
        proxy_term = scale * rowdot(e, p) - shift
        if self.gather_distributed and cdist.is_distributed():
            # local anchors against the global batch; anchor i is global column rank * N + i
            cols, exclude = cdist.gather_with_grad(e), torch.arange(n, device=e.device) + cdist.rank() * n
            col_labels = cdist.gather_no_grad(labels)
        else:
            cols, exclude, col_labels = None, "diagonal", None
        den = torch.logaddexp(proxy_term, masked_logsumexp(e, cols, scale=scale, exclude=exclude,
                                                           chunk_size=self.chunk_size) - shift)
        if self.pos_collected_numerator:
            same = masked_logsumexp(e, cols, scale=scale, exclude=exclude, row_labels=labels, col_labels=col_labels,
                                    label_mode="same", chunk_size=self.chunk_size)
            num = torch.logaddexp(proxy_term, same - shift)
        else:
            num = proxy_term
        return (den - num).mean()

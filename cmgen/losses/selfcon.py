"""Self-contrastive loss (Bae et al. 2021, arXiv 2106.15499, Eq. 2): SupCon over a network's exits."""
from __future__ import annotations

import torch
from torch import nn

from cmgen import distributed as cdist
from cmgen.losses._core import check_chunk_size, check_temperature
from cmgen.losses.supcon import SupCon

__all__ = ["SelfCon"]


class SelfCon(nn.Module):
    """SelfCon: the outputs of the sub-network exit(s) G and the backbone exit F act as views.

    ``features`` holds the L2-normalised projections of every exit, sub-network exits first and the
    backbone exit last (the official ``torch.cat([f1..., f2], dim=1)`` order):

    - SelfCon-S (one augmented view): (B, E, D). Anchors are all B E outputs; for an anchor, the positives
      are the other exits of its own sample and every exit of same-label samples (Eq. 2 with I = {1..B}).
    - SelfCon-M (two augmented views): (B, 2, E, D). The two views are stacked into 2B samples (view-major,
      as the official training script concatenates the two augmented batches) with labels repeated.

    The loss is then exactly :class:`SupCon` with the exits as views, which is what the official
    ``ConLoss`` computes (same T / base_T scaling and anchor mean). Without labels (SelfCon-SU/-MU) each
    sample is its own class; for SelfCon-M that follows the official code, where the two augmented views of
    an image are NOT positives of each other (mask = identity over the 2B rows).

    ``backbone_anchors=False`` is the FG term of the official ``selfcon_s_FG`` / ``selfcon_m_FG`` variants:
    the backbone exit's outputs are not anchors (they still appear as positives and in the denominators).
    There the official code builds the unlabelled mask as eye(B) tiled over the 2B rows, so for SelfCon-M
    without labels the two augmented views of an image ARE positives of each other; that is reproduced.
    The official ``*_FG`` runs add a separate backbone-only SupCon term (weighted against this one by
    ``alpha``); compute it with :class:`SupCon` on the backbone outputs.

    ``gather_distributed=True``: this rank's outputs are the anchors and the outputs of all ranks, gathered
    with gradient, the contrast set, exactly as :class:`SupCon` with ``gather_distributed=True`` (labels
    gathered, the rank's loss scaled so that the mean over ranks is the global mean over anchors). For
    SelfCon-M the local rows are [view 1 of the local batch; view 2 of the local batch], so the gathered
    sample order differs from the single-process order on the concatenated batch, but positives are
    defined by labels (or sample identity) and the loss is a mean over anchors, so value and gradients
    are those of the single-process loss on the global batch. Every rank needs the same B.

    Args:
        temperature: T > 0.
        base_temperature: base_T > 0 (loss scaled by T / base_T, as the official ``ConLoss``).
        backbone_anchors: the backbone exit's outputs act as anchors (False: ``selfcon_*_FG``).
        chunk_size: rows per tile of the shared core, ``None`` = automatic.
        gather_distributed: contrast the local anchors against the global batch.
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, backbone_anchors: bool = True,
                 chunk_size: int | None = None, gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.base_temperature = check_temperature(base_temperature, "base_temperature")
        self.backbone_anchors = backbone_anchors
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = gather_distributed
        self.supcon = SupCon(self.temperature, self.base_temperature, chunk_size=self.chunk_size,
                             gather_distributed=gather_distributed)

    def extra_repr(self) -> str:
        return f"backbone_anchors={self.backbone_anchors}, gather_distributed={self.gather_distributed}"

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            features: (B, E, D) for SelfCon-S or (B, 2, E, D) for SelfCon-M, E >= 2 exits, backbone last.
            labels: (B,) or None.

        Returns:
            scalar float32 (float64 for float64 inputs).
        """
        if features.dim() == 4:
            b, n_views, e, d = features.shape
            if n_views != 2:
                raise ValueError(f"SelfCon-M features must be (B, 2, E, D), got shape {tuple(features.shape)}")
            features = features.transpose(0, 1).reshape(2 * b, e, d)
            if labels is None and not self.backbone_anchors:
                # official selfcon_m_FG: eye(B) tiled over both views; the global sample index keeps the
                # samples of different ranks apart under gather_distributed
                labels = torch.arange(b, device=features.device) + cdist.rank() * b
            if labels is not None:
                if labels.shape != (b,):
                    raise ValueError(f"labels must be (B,) = ({b},), got {tuple(labels.shape)}")
                labels = labels.repeat(2)
        elif features.dim() != 3:
            raise ValueError(f"features must be (B, E, D) or (B, 2, E, D), got shape {tuple(features.shape)}")
        rows, e, _ = features.shape
        if e < 2:
            raise ValueError(f"SelfCon needs at least 2 exits (sub-network + backbone), got E={e}")
        anchor_mask = None
        if not self.backbone_anchors:
            anchor_mask = torch.ones(rows, e, dtype=torch.bool, device=features.device)
            anchor_mask[:, -1] = False
        return self.supcon(features, labels=labels, anchor_mask=anchor_mask)

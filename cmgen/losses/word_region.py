"""Attentional word-region contrastive loss (XMC-GAN, Zhang et al. CVPR 2021; DAMSM of AttnGAN).

Follows the official ``xmcgan/libml/attention_lib.py::word_loss``:

1. regions r and words w are L2-normalized; attention of word t of caption i over the regions of
   image b is α = softmax_over_regions(γ1·⟨r, w_t⟩) and the word's context is c_t = Σ_r α_r·r
   (a combination of the *normalized* regions);
2. the caption-image score is score(b, i) = (1/γ2)·log Σ_{valid t} exp(γ2·cos(w_t, c_t))
   (XMC-GAN Eq. 6, AttnGAN Eq. 10);
3. logits = γ3·score, an (images × captions) matrix with matches on the diagonal; the loss is the
   mean cross-entropy over images (each image picks its caption) PLUS the mean cross-entropy over
   captions (each caption picks its image) — a sum of both directions, as the official code returns.

Padding: the official code masks words at positions ≥ the caption length; here ``word_mask`` marks
valid words, so any pattern works. A padded word has no effect on the loss and receives a zero
gradient.

``gather_distributed=True`` (the "local loss"): the images of this rank are scored against the captions
of all ranks (words gathered with gradient, word_mask without) and the captions of this rank against the
images of all ranks (regions gathered with gradient); the two cross-entropies become the means over the
local rows of these (n × W n) score matrices, the target of local row i being global column rank·n + i.
Every rank needs the same n, so the mean of the rank losses is the single-process loss on the global
batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmgen import distributed as cdist

__all__ = ["WordRegion"]


class WordRegion(nn.Module):
    """XMC-GAN word-region contrastive loss.

    Args:
        gamma1: sharpness of the attention over regions (γ1, default 5).
        gamma2: sharpness of the soft-max over words in the score (γ2, default 5).
        gamma3: logit scale (γ3, default 50).
        eps: clamp on vector norms for normalization and cosine similarity.
        gather_distributed: score local images and captions against the global batch (module docstring).
    """

    def __init__(self, gamma1: float = 5.0, gamma2: float = 5.0, gamma3: float = 50.0, eps: float = 1e-8,
                 gather_distributed: bool = False):
        super().__init__()
        for name, value in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3), ("eps", eps)):
            if not float(value) > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.gamma1, self.gamma2, self.gamma3, self.eps = float(gamma1), float(gamma2), float(gamma3), float(eps)
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return (f"gamma1={self.gamma1}, gamma2={self.gamma2}, gamma3={self.gamma3}, "
                f"gather_distributed={self.gather_distributed}")

    def scores(self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """Caption-image logits γ3·score(b, i), shape (N_images, N_captions).

        Shape:
            regions (N_images, R, D), words (N_captions, T, D), word_mask (N_captions, T) bool.
        """
        if regions.dim() != 3 or words.dim() != 3 or regions.shape[-1] != words.shape[-1]:
            raise ValueError(
                f"regions must be (N, R, D) and words (N, T, D) with the same D, got "
                f"{tuple(regions.shape)} and {tuple(words.shape)}")
        if word_mask.shape != words.shape[:2] or word_mask.dtype != torch.bool:
            raise ValueError(
                f"word_mask must be a bool tensor of shape {tuple(words.shape[:2])}, got "
                f"{word_mask.dtype} {tuple(word_mask.shape)}")
        empty = ~word_mask.any(dim=1)
        if empty.any():
            raise ValueError(f"captions {empty.nonzero().flatten().tolist()} have no valid word in word_mask")
        r = F.normalize(regions, dim=-1, eps=self.eps)  # (B, R, D)
        w = F.normalize(words, dim=-1, eps=self.eps)  # (I, T, D)
        # α[i, b, r, t] = softmax over regions r of γ1·⟨r_br, w_it⟩ (XMC-GAN Eq. 5).
        attn = torch.softmax(self.gamma1 * torch.einsum("brd,itd->ibrt", r, w), dim=2)
        context = torch.einsum("ibrt,brd->ibtd", attn, r)  # c_t for caption i, image b
        cos = torch.einsum("itd,ibtd->ibt", w, context) / context.norm(dim=-1).clamp_min(self.eps)
        # Padded words leave the log-sum-exp; masked_fill also blocks their gradient.
        cos = (self.gamma2 * cos).masked_fill(~word_mask[:, None, :], float("-inf"))
        score = torch.logsumexp(cos, dim=-1) / self.gamma2  # (I, B), XMC-GAN Eq. 6
        return self.gamma3 * score.t()

    def forward(self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """Sum of the image→caption and caption→image cross-entropies (each a batch mean).

        Shape:
            regions (N, R, D): image region features (e.g. a 16×16 map flattened, R = 256).
            words (N, T, D): word features, caption i describes image i.
            word_mask (N, T) bool: True for real words, False for padding.
            Returns a scalar.
        """
        if regions.shape[0] != words.shape[0]:
            raise ValueError(
                f"regions and words must have the same batch size, got {regions.shape[0]} and {words.shape[0]}")
        if not (self.gather_distributed and cdist.is_distributed()):
            logits = self.scores(regions, words, word_mask)  # (images, captions)
            target = torch.arange(logits.shape[0], device=logits.device)
            return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
        n = regions.shape[0]
        # gloo cannot all-gather bool tensors
        mask_all = cdist.gather_no_grad(word_mask.to(torch.uint8)).bool()
        image_rows = self.scores(regions, cdist.gather_with_grad(words), mask_all)  # (n, W n)
        caption_rows = self.scores(cdist.gather_with_grad(regions), words, word_mask).t()  # (n, W n)
        target = torch.arange(n, device=regions.device) + cdist.rank() * n
        return F.cross_entropy(image_rows, target) + F.cross_entropy(caption_rows, target)

"""MoCo negative queue with VideoMoCo temporal decay, and the momentum-encoder update.

MoCo (He et al., CVPR 2020) keeps a FIFO queue of K normalized keys from the momentum encoder; each
step the loss uses the queue as negatives and *then* the batch's keys replace the oldest entries.
VideoMoCo (Pan et al., CVPR 2021) additionally tracks each key's age: every enqueue ages every stored
key by one step and a key of age a is weighted by t^a (temporal decay, Eq. 6 of the paper). How the
weight enters the loss (outside the exponential as in the paper, or multiplying the key inside the
dot product as in the official code) is decided by :class:`cmgen.losses.InfoNCE`'s
``negative_weight_mode``; the queue only supplies the weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoCoQueue", "momentum_update"]


class MoCoQueue(nn.Module):
    """FIFO queue of ``size`` keys of dimension ``dim`` with per-key ages.

    Buffers (all in ``state_dict()``, so a resumed run continues with the same queue; the official
    VideoMoCo code does not save the ages):

    - ``keys`` (size, dim): random unit vectors at construction (as MoCo), then enqueued keys.
    - ``ages`` (size,) long: number of enqueues since each slot was written, counting the write itself,
      as VideoMoCo's ``count`` (a key enqueued at the last step has age 1, weight t; never-written slots age
      from construction too, as in VideoMoCo).
    - ``ptr`` () long: the slot the next key is written to.
    - ``num_filled`` () long: how many slots hold enqueued keys, ``min(total enqueued, size)``; see
      :meth:`valid_mask` to exclude the random initial keys.

    Distributed training: :meth:`enqueue` stores exactly what it is given. Under DDP the caller gathers
    the keys of all ranks first (``cmgen.distributed.gather_no_grad``, MoCo's ``concat_all_gather``) so
    that every rank holds the same queue.

    Args:
        dim: key dimension D.
        size: number of slots K.
        temporal_decay: t in (0, 1]; :meth:`weights` returns t ** ages. ``None`` gives unit weights
            (plain MoCo). VideoMoCo uses t = 0.99999.
    """

    def __init__(self, dim: int, size: int, temporal_decay: float | None = None):
        super().__init__()
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if temporal_decay is not None and not 0.0 < float(temporal_decay) <= 1.0:
            raise ValueError(f"temporal_decay must be in (0, 1] or None, got {temporal_decay!r}")
        self.dim, self.size = int(dim), int(size)
        self.temporal_decay = None if temporal_decay is None else float(temporal_decay)
        self.register_buffer("keys", F.normalize(torch.randn(self.size, self.dim), dim=1))
        self.register_buffer("ages", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, temporal_decay={self.temporal_decay}"

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, D) at the pointer, wrapping around; B need not divide ``size``.

        Every stored key ages by one step and the new keys get age 1 (VideoMoCo's ``_dequeue_and_enqueue``:
        ``count += 1`` then ``count[ptr:ptr + B] = 1``), so the freshest keys already carry weight t.
        The keys are stored detached, cast to the queue's dtype and device. Call this *after* the loss
        of the step has been computed (MoCo), and note that it writes in place: a loss that still needs
        the old ``keys`` for backward must use :meth:`snapshot` (or ``keys.clone()``).
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        b = keys.shape[0]
        if b > self.size:
            raise ValueError(
                f"cannot enqueue {b} keys into a queue of size {self.size}; "
                "the batch (gathered over ranks) must not exceed the queue size")
        if b == 0:
            return
        idx = (self.ptr + torch.arange(b, device=self.ptr.device)) % self.size
        idx = idx.to(self.keys.device)
        self.keys[idx] = keys.detach().to(dtype=self.keys.dtype, device=self.keys.device)
        self.ages += 1
        self.ages[idx] = 1
        self.ptr.copy_((self.ptr + b) % self.size)
        self.num_filled.copy_(torch.clamp(self.num_filled + b, max=self.size))

    def weights(self) -> torch.Tensor:
        """Temporal-decay weights t ** ages, shape (size,), in the keys' dtype (ones when t is None)."""
        if self.temporal_decay is None:
            return torch.ones(self.size, dtype=self.keys.dtype, device=self.keys.device)
        # float64 power: t**age for t = 0.99999 and ages ~ 6e4 loses digits in float32 exponents.
        decay = torch.tensor(self.temporal_decay, dtype=torch.float64, device=self.ages.device)
        return torch.pow(decay, self.ages.to(torch.float64)).to(self.keys.dtype)

    def valid_mask(self) -> torch.Tensor:
        """(size,) bool, True for slots that hold enqueued keys (not the random initial ones)."""
        # Slots are written in order from 0 until the first wrap, so the written ones are a prefix.
        return torch.arange(self.size, device=self.keys.device) < self.num_filled.to(self.keys.device)

    def snapshot(self, valid_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of ``(keys (K, D), weights (K,))`` for use as negatives in this step's loss.

        Copies, because :meth:`enqueue` later overwrites the buffers in place and autograd keeps the
        negatives for the query's gradient. ``valid_only`` drops never-written slots (K <= size).
        """
        keys, weights = self.keys.detach().clone(), self.weights()
        if valid_only:
            mask = self.valid_mask()
            keys, weights = keys[mask], weights[mask]
        return keys, weights


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float, buffers: str = "none") -> None:
    """Momentum (EMA) update of a target encoder, in place: θ_t ← m·θ_t + (1 − m)·θ_o.

    MoCo Eq. 2 (``param_k = m * param_k + (1 - m) * param_q``), also BYOL's target network. Parameters
    are matched in ``parameters()`` order and must agree in number and shape.

    Args:
        online: the encoder trained by the optimizer (θ_o).
        target: the momentum encoder (θ_t), updated in place.
        m: momentum in [0, 1]; m = 1 leaves the target unchanged, m = 0 copies the online weights.
        buffers: what happens to buffers (BatchNorm running statistics and counters):
            ``"none"`` (default, as MoCo): buffers untouched; the target's BN keeps its own running
            statistics from its own forward passes. ``"copy"``: copy every online buffer.
            ``"ema"``: floating-point buffers get the same momentum update, integer buffers
            (``num_batches_tracked``) are copied.
    """
    if not 0.0 <= float(m) <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m!r}")
    if buffers not in ("none", "copy", "ema"):
        raise ValueError(f"buffers must be 'none', 'copy' or 'ema', got {buffers!r}")
    p_o, p_t = list(online.parameters()), list(target.parameters())
    _check_pairs(p_o, p_t, "parameters")
    if p_t:
        torch._foreach_mul_(p_t, m)
        torch._foreach_add_(p_t, p_o, alpha=1.0 - m)
    if buffers == "none":
        return
    b_o, b_t = list(online.buffers()), list(target.buffers())
    _check_pairs(b_o, b_t, "buffers")
    if buffers == "copy":
        for bt, bo in zip(b_t, b_o):
            bt.copy_(bo)
    elif buffers == "ema":
        floats = [(bt, bo) for bt, bo in zip(b_t, b_o) if bt.is_floating_point()]
        for bt, bo in zip(b_t, b_o):
            if not bt.is_floating_point():
                bt.copy_(bo)
        if floats:
            ft, fo = [bt for bt, _ in floats], [bo for _, bo in floats]
            torch._foreach_mul_(ft, m)
            torch._foreach_add_(ft, fo, alpha=1.0 - m)
    else:
        raise ValueError(f"buffers must be 'none', 'copy' or 'ema', got {buffers!r}")


def _check_pairs(online: list[torch.Tensor], target: list[torch.Tensor], what: str) -> None:
    if len(online) != len(target):
        raise ValueError(f"online and target have different numbers of {what}: {len(online)} vs {len(target)}")
    for i, (o, t) in enumerate(zip(online, target)):
        if o.shape != t.shape:
            raise ValueError(f"{what} #{i} differ in shape: online {tuple(o.shape)} vs target {tuple(t.shape)}")

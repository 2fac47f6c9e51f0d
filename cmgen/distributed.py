"""Process-group helpers that also work with no process group at all.

Models never call these; losses call them only when ``gather_distributed=True`` and the engine uses
them for logging and shuffle-BN. Every helper is an identity (or a trivial value) in a single process,
so one code path serves a laptop and a cluster.

Gradient convention for the "local loss" (open_clip): every rank computes a loss on its local rows
against the globally gathered columns and the engine/DDP averages gradients over ranks. The backward
of :func:`gather_with_grad` therefore SUMS the incoming gradients of all ranks and returns this rank's
slice, so that after DDP averaging the parameter gradient equals the single-process gradient of the
mean loss over the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "barrier",
    "gather_with_grad",
    "gather_no_grad",
    "all_reduce_with_grad",
    "all_reduce_mean",
    "batch_shuffle",
    "batch_unshuffle",
]


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 with no process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 with no process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _check_equal_sizes(x: torch.Tensor) -> None:
    sizes = [None] * world_size()
    dist.all_gather_object(sizes, tuple(x.shape))
    if len(set(sizes)) != 1:
        raise ValueError(f"gather needs the same shape on every rank, got {sizes} (use drop_last=True)")


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, check_sizes: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) from every rank along dim 0 -> (world_size * N, ...), with gradient.

    Rank r's rows are at ``[r * N, (r + 1) * N)``. Identity with no process group.
    """
    if not is_distributed():
        return x
    if check_sizes:
        _check_equal_sizes(x)
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (MoCo's ``concat_all_gather``). Identity with no process group."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # y = sum_r x_r is used by the loss of every rank; d(mean_s L_s)/dx_r needs the sum over s.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks with a gradient that is correct under DDP averaging (lightly #1977)."""
    if not is_distributed():
        return x
    return _AllReduceSumWithGrad.apply(x)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (for logging), no gradient."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, generator: torch.Generator | None = None):
    """Shuffle-BN (MoCo): permute the global batch across ranks so BN statistics cannot leak.

    Returns ``(x_local_shuffled, idx_unshuffle)``. With no process group it is the identity.
    """
    if not is_distributed():
        return x, None
    n = x.shape[0]
    x_all = gather_no_grad(x)
    idx = torch.randperm(x_all.shape[0], device=x.device, generator=generator)
    dist.broadcast(idx, src=0)
    idx_unshuffle = torch.argsort(idx)
    r = rank()
    return x_all[idx[r * n:(r + 1) * n]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`batch_shuffle` for the (local) outputs ``x``."""
    if idx_unshuffle is None:
        return x
    n = x.shape[0]
    x_all = gather_no_grad(x)
    r = rank()
    return x_all[idx_unshuffle[r * n:(r + 1) * n]]

"""2 gloo processes with gather_distributed=True == 1 process on the concatenated global batch.

Convention (cmgen.distributed): each rank computes the "local loss" (its rows against the gathered
columns); the mean of the rank losses equals the single-process loss on the global batch. The backward of
gather_with_grad sums the column gradients of all ranks, so the gradient a rank sees for its own inputs is
world_size times the gradient of the global mean loss; DDP's averaging over ranks divides that back.
"""
from __future__ import annotations

import pytest
import torch

from cmgen.losses import DCL, HCL, InfoNCE, NTXent
from tests.dist_utils import run_distributed

N_LOCAL, D, WORLD = 5, 6, 2


def _make(name):
    return {
        "ntxent": lambda g: NTXent(0.3, gather_distributed=g),
        "ntxent_chunked": lambda g: NTXent(0.3, chunk_size=3, gather_distributed=g),
        "infonce": lambda g: InfoNCE(0.2, gather_distributed=g),
        "clip": lambda g: InfoNCE(0.2, symmetric=True, chunk_size=4, gather_distributed=g),
        "dcl": lambda g: DCL(0.2, gather_distributed=g),
        "hcl": lambda g: HCL(0.5, tau_plus=0.1, beta=1.0, gather_distributed=g),
    }[name]


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N_LOCAL, D, generator=g), torch.randn(WORLD * N_LOCAL, D, generator=g)


NAMES = ["ntxent", "ntxent_chunked", "infonce", "clip", "dcl", "hcl"]


def _rank_fn(rank, world_size):
    out = {}
    for name in NAMES:
        a, b = _global_batch()
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        a, b = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_()
        loss = _make(name)(True)(a, b)
        loss.backward()
        out[name] = (loss.detach(), a.grad, b.grad)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process_on_global_batch():
    a, b = _global_batch()
    a.requires_grad_(), b.requires_grad_()
    per_rank = run_distributed(_rank_fn, world_size=WORLD)
    for name in NAMES:
        results = [r[name] for r in per_rank]
        a.grad = b.grad = None
        ref = _make(name)(False)(a, b)
        ref.backward()
        mean_loss = torch.stack([r[0] for r in results]).mean()
        torch.testing.assert_close(mean_loss, ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
        for rank, (_, ga, gb) in enumerate(results):
            sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            torch.testing.assert_close(ga, WORLD * a.grad[sl], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(gb, WORLD * b.grad[sl], rtol=1e-4, atol=1e-6, msg=name)

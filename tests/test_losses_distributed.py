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


# ---------------------------------------------------------------- SupCon, SelfCon, TwoC, ranking, word-region
# Each case: make(gather) -> loss module, and the global batch as (tensors that get gradients, other
# inputs), all split along dim 0 across ranks, in float64. Labels repeat across ranks so that positives
# and same-label sums cross the rank boundary; anchor_mask selects 3 anchors on rank 0 and 1 on rank 1.

N2 = 4  # samples per rank


def _labels():
    return torch.tensor([0, 1, 2, 0, 1, 1, 3, 2])


def _features(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _cases():
    from cmgen.losses import MaxMarginRanking, SelfCon, SupCon, TwoC, WordRegion

    n = WORLD * N2
    word_mask = torch.ones(n, 5, dtype=torch.bool)
    word_mask[1, 3:] = False
    word_mask[6, 1:] = False
    anchors = torch.tensor([True, True, False, True, False, False, True, False])
    cases = {
        "supcon_simclr": (lambda g: SupCon(0.3, 0.2, gather_distributed=g), [_features(n, 2, D, seed=1)], {}),
        "supcon_labels": (lambda g: SupCon(0.3, 0.3, gather_distributed=g), [_features(n, 3, D, seed=2)],
                          {"labels": _labels()}),
        # one view: the rank-1 sample of label 3 has no positive (a 0 term that still counts)
        "supcon_one_view": (lambda g: SupCon(0.5, 0.5, gather_distributed=g), [_features(n, 1, D, seed=3)],
                            {"labels": _labels()}),
        "supcon_anchor_mask": (lambda g: SupCon(0.2, 0.1, chunk_size=3, gather_distributed=g),
                               [_features(n, 2, D, seed=4)], {"labels": _labels(), "anchor_mask": anchors}),
        "selfcon_s": (lambda g: SelfCon(0.2, 0.1, gather_distributed=g), [_features(n, 3, D, seed=5)],
                      {"labels": _labels()}),
        "selfcon_m_fg": (lambda g: SelfCon(0.2, backbone_anchors=False, gather_distributed=g),
                         [_features(n, 2, 2, D, seed=6)], {"labels": _labels()}),
        "selfcon_m_unsup": (lambda g: SelfCon(0.2, gather_distributed=g), [_features(n, 2, 2, D, seed=7)], {}),
        "twoc": (lambda g: TwoC(0.5, gather_distributed=g),
                 [_features(n, D, seed=8), _features(n, D, seed=9)], {"labels": _labels()}),
        "twoc_proxy_numerator": (lambda g: TwoC(0.7, margin=0.1, pos_collected_numerator=False, chunk_size=3,
                                                gather_distributed=g),
                                 [_features(n, D, seed=10), _features(n, D, seed=11)], {"labels": _labels()}),
        "word_region": (lambda g: WordRegion(4.0, 5.0, 10.0, gather_distributed=g),
                        [_features(n, 3, D, seed=12), _features(n, 5, D, seed=13)], {"word_mask": word_mask}),
    }
    for hardest in (False, True):
        for reduction in ("sum", "mean"):
            cases[f"ranking_{reduction}_{'hardest' if hardest else 'all'}"] = (
                lambda g, h=hardest, r=reduction: MaxMarginRanking(0.5, hardest=h, reduction=r, gather_distributed=g),
                [_features(n, D, seed=14), _features(n, D, seed=15)], {})
    return cases


def _call(module, tensors, extras):
    if "word_mask" in extras:
        return module(*tensors, extras["word_mask"])
    if "labels" in extras and len(tensors) == 2:  # TwoC(embeddings, proxies, labels)
        return module(*tensors, extras["labels"])
    return module(*tensors, **extras)


def _run_case(make, tensors, extras, gather, sl=slice(None)):
    tensors = [t[sl].clone().requires_grad_() for t in tensors]
    loss = _call(make(gather), tensors, {k: v[sl] for k, v in extras.items()})
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


def _rank_fn_more(rank, world_size):
    sl = slice(rank * N2, (rank + 1) * N2)
    return {name: _run_case(make, tensors, extras, True, sl) for name, (make, tensors, extras) in _cases().items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process_supcon_selfcon_twoc_ranking_word_region():
    per_rank = run_distributed(_rank_fn_more, world_size=WORLD)
    for name, (make, tensors, extras) in _cases().items():
        ref, ref_grads = _run_case(make, tensors, extras, False)
        mean_loss = torch.stack([r[name][0] for r in per_rank]).mean()
        torch.testing.assert_close(mean_loss, ref, rtol=1e-6, atol=1e-9, msg=name)
        for rank, r in enumerate(per_rank):
            sl = slice(rank * N2, (rank + 1) * N2)
            for grad, ref_grad in zip(r[name][1], ref_grads):
                torch.testing.assert_close(grad, WORLD * ref_grad[sl], rtol=1e-6, atol=1e-9, msg=name)


def test_gather_distributed_without_process_group_is_the_single_process_loss():
    for name, (make, tensors, extras) in _cases().items():
        loss, grads = _run_case(make, tensors, extras, True)
        ref, ref_grads = _run_case(make, tensors, extras, False)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12, msg=name)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12, msg=name)


def test_supcon_gather_distributed_rejects_a_dense_mask():
    from cmgen.losses import SupCon

    with pytest.raises(ValueError, match="mask cannot be gathered"):
        SupCon(gather_distributed=True)(_features(4, 2, D, seed=0), mask=torch.eye(4))

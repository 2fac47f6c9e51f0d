"""WordRegion, MaxMarginRanking, BarlowTwins, NegativeCosine against float64 loop references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmgen.losses.barlow import BarlowTwins
from cmgen.losses.byol import NegativeCosine
from cmgen.losses.infonce import InfoNCE
from cmgen.losses.mochi import MoCHi
from cmgen.losses.ranking import MaxMarginRanking
from cmgen.losses.word_region import WordRegion
from tests import loss_refs_misc as ref
from tests.dist_utils import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _assert_same(fn_a, fn_b, *inputs):
    va, ga = _grads(fn_a, *inputs)
    vb, gb = _grads(fn_b, *inputs)
    torch.testing.assert_close(va, vb, **TOL)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **TOL)


# ---------------------------------------------------------------- WordRegion

def _word_inputs(n, r, t, d, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, r, d, generator=g, dtype=torch.float64)
    words = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return regions, words, mask


@pytest.mark.parametrize("n,r,t,d,lengths,gammas", [
    (3, 4, 5, 6, [5, 2, 3], (5.0, 5.0, 50.0)),
    (4, 3, 4, 5, [1, 4, 2, 3], (4.0, 5.0, 10.0)),
    (2, 5, 3, 4, [3, 3], (1.0, 2.0, 3.0)),
])
def test_word_region_matches_loop_reference(n, r, t, d, lengths, gammas):
    regions, words, mask = _word_inputs(n, r, t, d, lengths, seed=n * 7 + t)
    loss = WordRegion(*gammas)
    _assert_same(lambda a, b: loss(a, b, mask),
                 lambda a, b: ref.word_region_ref(a, b, mask, *gammas),
                 regions, words)


def test_word_region_non_prefix_mask_matches_reference():
    regions, words, _ = _word_inputs(3, 4, 5, 6, [5, 5, 5], seed=3)
    mask = torch.tensor([[True, False, True, False, True],
                         [False, False, True, True, False],
                         [True, True, True, True, True]])
    loss = WordRegion(3.0, 4.0, 20.0)
    _assert_same(lambda a, b: loss(a, b, mask), lambda a, b: ref.word_region_ref(a, b, mask, 3.0, 4.0, 20.0),
                 regions, words)


def test_word_region_padded_words_take_no_part():
    regions, words, mask = _word_inputs(3, 4, 6, 5, [6, 2, 4], seed=11)
    loss = WordRegion()
    words = words.requires_grad_(True)
    value = loss(regions, words, mask)
    (grad,) = torch.autograd.grad(value, words)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask].abs().sum(-1) > 0)
    # changing padded words (even to zeros) leaves the loss unchanged
    other = words.detach().clone()
    other[~mask] = torch.randn(int((~mask).sum()), 5, dtype=torch.float64) * 100
    torch.testing.assert_close(loss(regions, other, mask), value.detach(), rtol=0, atol=1e-12)
    other[~mask] = 0
    torch.testing.assert_close(loss(regions, other, mask), value.detach(), rtol=0, atol=1e-12)


def test_word_region_is_sum_of_two_cross_entropies():
    regions, words, mask = _word_inputs(4, 3, 4, 5, [4, 3, 2, 1], seed=5)
    loss = WordRegion()
    logits = loss.scores(regions, words, mask)
    target = torch.arange(4)
    expected = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
    torch.testing.assert_close(loss(regions, words, mask), expected)
    # single region: the context is that region, so the cosine is ⟨w, r⟩ of unit vectors
    r1 = regions[:, :1]
    s = WordRegion(gamma2=2.0, gamma3=3.0).scores(r1, words, mask)
    rn, wn = F.normalize(r1[:, 0], dim=-1), F.normalize(words, dim=-1)
    cos = torch.einsum("bd,itd->bit", rn, wn).masked_fill(~mask[None], float("-inf"))
    torch.testing.assert_close(s, 3.0 * torch.logsumexp(2.0 * cos, dim=-1) / 2.0)


def test_word_region_bad_inputs():
    regions, words, mask = _word_inputs(2, 3, 4, 5, [4, 2], seed=0)
    loss = WordRegion()
    with pytest.raises(ValueError, match="no valid word"):
        loss(regions, words, torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="bool"):
        loss(regions, words, mask.float())
    with pytest.raises(ValueError, match="same D"):
        loss(regions, words[..., :4], mask)
    with pytest.raises(ValueError, match="batch size"):
        loss(regions[:1], words, mask)
    with pytest.raises(ValueError, match="gamma1"):
        WordRegion(gamma1=0.0)


# ---------------------------------------------------------------- MaxMarginRanking

@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n,d,margin", [(5, 4, 0.2), (3, 7, 0.5), (6, 3, 1.5)])
def test_max_margin_matches_loop_reference(hardest, reduction, n, d, margin):
    g = torch.Generator().manual_seed(n * 13 + d)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    loss = MaxMarginRanking(margin=margin, hardest=hardest, reduction=reduction)
    _assert_same(loss, lambda x, y: ref.max_margin_ref(x, y, margin, hardest, reduction), a, b)


def test_max_margin_unnormalized_and_analytic():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    loss = MaxMarginRanking(margin=0.3, normalize=False)
    _assert_same(loss, lambda x, y: ref.max_margin_ref(x, y, 0.3, normalize=False), a, b)
    # identical constant embeddings: every hinge equals the margin
    same = torch.ones(4, 3, dtype=torch.float64)
    assert float(MaxMarginRanking(0.2)(same, same)) == pytest.approx(0.2 * 2 * 4 * 3)
    assert float(MaxMarginRanking(0.2, reduction="mean")(same, same)) == pytest.approx(0.2)
    assert float(MaxMarginRanking(0.2, hardest=True)(same, same)) == pytest.approx(0.2 * 2 * 4)
    # orthonormal matches: s_ii = 1, s_ij = 0, every hinge is zero for margin < 1
    eye = torch.eye(4, dtype=torch.float64)
    assert float(MaxMarginRanking(0.9)(eye, eye)) == 0.0


def test_max_margin_bad_inputs():
    with pytest.raises(ValueError, match="reduction"):
        MaxMarginRanking(reduction="none")
    with pytest.raises(ValueError, match="margin"):
        MaxMarginRanking(margin=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        MaxMarginRanking()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        MaxMarginRanking()(torch.randn(1, 4), torch.randn(1, 4))


# ---------------------------------------------------------------- BarlowTwins

@pytest.mark.parametrize("n,d,lambd", [(6, 4, 0.0051), (5, 3, 0.5), (9, 5, 1.0)])
def test_barlow_twins_matches_loop_reference(n, d, lambd):
    g = torch.Generator().manual_seed(n * 31 + d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64) - 0.5
    _assert_same(BarlowTwins(lambd), lambda a, b: ref.barlow_twins_ref(a, b, lambd), z1, z2)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_barlow_twins_analytic_values():
    # Columns 1.. of an 8x8 Hadamard matrix: zero mean, mutually orthogonal; scaled by 3 the biased
    # variance is 9, so c_ii = 9 / (9 + eps) and the shift is removed by BN.
    z = _hadamard(8)[:, 1:6] * 3 + 7
    d, eps, lambd = 5, 1e-5, 0.3
    cii = 9 / (9 + eps)
    loss = BarlowTwins(lambd)
    torch.testing.assert_close(loss(z, z), torch.tensor(d * (1 - cii) ** 2, dtype=torch.float64))
    torch.testing.assert_close(loss(z, -z), torch.tensor(d * (1 + cii) ** 2, dtype=torch.float64))
    # a cyclic feature permutation: c is a permutation matrix with zero diagonal
    perm = z[:, [1, 2, 3, 4, 0]]
    torch.testing.assert_close(loss(z, perm), torch.tensor(d + lambd * d * cii ** 2, dtype=torch.float64))
    # affine BN-equivalence: c matches BatchNorm1d(affine=False) in training mode
    bn = torch.nn.BatchNorm1d(5, affine=False).double().train()
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(loss.cross_correlation(z1, z2), bn(z1).t() @ bn(z2) / 7)


def test_barlow_twins_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        BarlowTwins()(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwins()(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="lambd"):
        BarlowTwins(lambd=-0.1)


def _barlow_worker(rank, world_size, z1, z2, lambd):
    n = z1.shape[0] // world_size
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    value = BarlowTwins(lambd, gather_distributed=True)(a, b)
    value.backward()
    return value.detach(), a.grad, b.grad


@pytest.mark.slow
def test_barlow_twins_two_processes_equal_one_process():
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(8, 5, generator=g, dtype=torch.float64) + 0.3
    z2 = torch.randn(8, 5, generator=g, dtype=torch.float64) * 2
    lambd = 0.2
    full_value, (g1, g2) = _grads(BarlowTwins(lambd), z1, z2)
    results = run_distributed(_barlow_worker, world_size=2, args=(z1, z2, lambd))
    for r, (value, ga, gb) in enumerate(results):
        torch.testing.assert_close(value, full_value, **TOL)
        # Every rank's backward sums the gradients of all ranks' (identical) losses; DDP then averages
        # over the 2 ranks, so the local gradient is world_size x the single-process one.
        torch.testing.assert_close(ga / 2, g1[r * 4:(r + 1) * 4], **TOL)
        torch.testing.assert_close(gb / 2, g2[r * 4:(r + 1) * 4], **TOL)


def test_barlow_twins_gather_without_process_group_is_plain():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    torch.testing.assert_close(BarlowTwins(gather_distributed=True)(z1, z2), BarlowTwins()(z1, z2))


# ---------------------------------------------------------------- NegativeCosine

@pytest.mark.parametrize("n,d", [(4, 3), (7, 8)])
def test_negative_cosine_matches_loop_reference(n, d):
    g = torch.Generator().manual_seed(n + d)
    p = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    _assert_same(NegativeCosine(), ref.negative_cosine_ref, p, z)


def test_negative_cosine_stop_gradient_and_analytic():
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    NegativeCosine()(p, z).backward()
    assert z.grad is None and p.grad is not None
    x = torch.randn(5, 4, dtype=torch.float64)
    assert float(NegativeCosine()(x, 3 * x)) == pytest.approx(-1.0)
    assert float(NegativeCosine()(x, -x)) == pytest.approx(1.0)
    loss = NegativeCosine()
    p1, p2, z1, z2 = (torch.randn(5, 4, dtype=torch.float64) for _ in range(4))
    torch.testing.assert_close(loss.symmetric(p1, p2, z1, z2), 0.5 * (loss(p1, z2) + loss(p2, z1)))
    with pytest.raises(ValueError, match="same shape"):
        loss(p1, z1[:3])


# ---------------------------------------------------------------- MoCHi

def _mochi_inputs(n=4, k=12, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    key = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    return q, key, queue


def test_mochi_synthetic_count_norm_and_determinism():
    q, _, queue = _mochi_inputs()
    loss = MoCHi(num_hard=5, num_mix_negatives=7, num_mix_query=3)
    a = loss.synthesize(q, queue, torch.Generator().manual_seed(3))
    b = loss.synthesize(q, queue, torch.Generator().manual_seed(3))
    c = loss.synthesize(q, queue, torch.Generator().manual_seed(4))
    assert a.shape == (4, 10, 6)
    torch.testing.assert_close(a.norm(dim=2), torch.ones(4, 10, dtype=torch.float64))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert MoCHi(num_hard=5, num_mix_negatives=0, num_mix_query=0).synthesize(q, queue).shape == (4, 0, 6)


def test_mochi_mixes_only_the_hardest_negatives():
    # Queue = one-hot vectors e_1..e_K in R^(K+1); q = (1, x_1..x_K)/|.| so q . e_j ∝ x_j and the hard
    # set is known. A pair mix α e_a + (1-α) e_b has support {a, b}; a query mix β q + (1-β) e_c differs
    # from a multiple of q only at c.
    k, num_hard = 10, 3
    x = torch.tensor([0.3, -0.2, 0.9, 0.1, 0.8, -0.5, 0.05, 0.7, 0.0, -0.9], dtype=torch.float64)
    hard_set = {3, 5, 8}  # coordinates (1-based, index 0 is the query's own axis) of 0.9, 0.8, 0.7
    q = F.normalize(torch.cat([torch.ones(1, dtype=torch.float64), x])[None], dim=1).repeat(2, 1)
    queue = torch.eye(k + 1, dtype=torch.float64)[1:]
    loss = MoCHi(num_hard=num_hard, num_mix_negatives=40, num_mix_query=40)
    assert set((loss.hardest(q, queue)[0] + 1).tolist()) == hard_set
    synth = loss.synthesize(q, queue, torch.Generator().manual_seed(0))
    pairs, qmix = synth[:, :40], synth[:, 40:]
    support = set((pairs.abs() > 1e-12).nonzero()[:, 2].tolist())
    assert support == hard_set
    assert torch.all(pairs >= 0)
    assert torch.all(qmix[..., 0] > 0)
    resid = qmix / qmix[..., :1] - q[:, None, :] / q[:, None, :1]
    moved = (resid.abs() > 1e-9)
    assert torch.all(moved.sum(-1) == 1)  # exactly one queue coordinate added per query mix
    assert set(moved.nonzero()[:, 2].tolist()) <= hard_set
    # β < 0.5: the query's share of the unnormalized mix is below one half
    c = moved.float().argmax(-1, keepdim=True)
    q_part = qmix[..., :1] / q[:, None, :1]  # ∝ β
    n_part = qmix.gather(2, c) - q_part * q[:, None, :].expand_as(qmix).gather(2, c)  # ∝ (1 - β)
    beta = q_part / (q_part + n_part)
    assert torch.all((beta > 0) & (beta < 0.5))


def test_mochi_loss_equals_loop_reference_and_no_grad_through_synthetic():
    q, key, queue = _mochi_inputs(n=3, k=9, d=5, seed=2)
    loss = MoCHi(num_hard=4, num_mix_negatives=3, num_mix_query=2, temperature=0.3)
    synth = loss.synthesize(q, queue, torch.Generator().manual_seed(7))

    def lib(a, b):
        return loss(a, b, queue, generator=torch.Generator().manual_seed(7))

    # the reference treats the synthetic points as constants; equal gradients => none flows through them
    _assert_same(lib, lambda a, b: ref.mochi_ref(a, b, queue, synth, 0.3), q, key)
    qg = q.clone().requires_grad_(True)
    s = loss.synthesize(qg, queue)
    assert not s.requires_grad


def test_mochi_without_mixing_equals_infonce_and_weights():
    q, key, queue = _mochi_inputs(n=5, k=8, d=4, seed=5)
    w = torch.linspace(0.5, 1.0, 8, dtype=torch.float64)
    for mode in ("exp", "logit"):
        plain = MoCHi(num_hard=3, num_mix_negatives=0, num_mix_query=0, temperature=0.1, negative_weight_mode=mode)
        info = InfoNCE(temperature=0.1, negative_weight_mode=mode)
        _assert_same(lambda a, b: plain(a, b, queue, w), lambda a, b: info(a, b, queue, w), q, key)
    # with weights and synthetic negatives, both modes against the loop reference
    for mode in ("exp", "logit"):
        loss = MoCHi(num_hard=3, num_mix_negatives=2, num_mix_query=2, temperature=0.1, negative_weight_mode=mode)
        synth = loss.synthesize(q, queue, torch.Generator().manual_seed(1))
        _assert_same(lambda a, b: loss.loss_with_synthetic(a, b, queue, synth, w),
                     lambda a, b: ref.mochi_ref(a, b, queue, synth, 0.1, w, mode), q, key)


def test_mochi_bad_arguments():
    q, key, queue = _mochi_inputs(k=4)
    with pytest.raises(ValueError, match="num_hard=5 exceeds"):
        MoCHi(num_hard=5)(q, key, queue)
    with pytest.raises(ValueError, match="num_hard"):
        MoCHi(num_hard=0)
    with pytest.raises(ValueError, match="num_mix_query"):
        MoCHi(num_mix_query=-1)
    with pytest.raises(ValueError, match="temperature"):
        MoCHi(temperature=0.0)
    with pytest.raises(ValueError, match="negatives must be"):
        MoCHi(num_hard=2)(q, key, queue[:, :3])
    with pytest.raises(ValueError, match="synthetic must be"):
        MoCHi(num_hard=2).loss_with_synthetic(q, key, queue, torch.zeros(2, 1, 6))

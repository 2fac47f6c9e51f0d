"""Every core-based loss against its float64 loop reference (tests/loss_refs.py): values and gradients."""
from __future__ import annotations

import math

import pytest
import torch

from cmgen.losses import DCL, HCL, InfoNCE, NTXent, SelfCon, SupCon, TwoC
from tests import loss_refs as refs

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def _check(lib_fn, ref_fn, tensors):
    """Loss and input gradients of the library (float64 inputs) vs the reference."""
    out = lib_fn(*tensors)
    grads = torch.autograd.grad(out, tensors)
    ref = ref_fn(*tensors)
    ref_grads = torch.autograd.grad(ref, tensors)
    assert out.shape == ()
    torch.testing.assert_close(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **TOL)


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (5, 4, 0.1), (9, 7, 1.3)])
@pytest.mark.parametrize("chunk", [None, 4])
def test_ntxent_matches_reference(n, d, t, chunk):
    _check(NTXent(t, chunk_size=chunk), lambda a, b: refs.ntxent_ref(a, b, t), _inputs(n, (n, d), (n, d)))


def test_ntxent_unnormalized_matches_reference():
    z0, z1 = _inputs(3, (6, 4), (6, 4))
    _check(NTXent(0.7, normalize=False), lambda a, b: refs.ntxent_ref(a, b, 0.7, normalize=False), [z0, z1])


@pytest.mark.parametrize("n,d,t", [(3, 4, 0.07), (8, 5, 0.5)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("chunk", [None, 3])
def test_infonce_in_batch_matches_reference(n, d, t, symmetric, chunk):
    _check(InfoNCE(t, symmetric=symmetric, chunk_size=chunk),
           lambda q, k: refs.infonce_ref(q, k, t, symmetric=symmetric), _inputs(n + d, (n, d), (n, d)))


@pytest.mark.parametrize("mode", ["exp", "logit"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
def test_infonce_negatives_matches_reference(mode, weighted, chunk):
    q, k, neg = _inputs(11, (5, 4), (5, 4), (7, 4))
    w = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) if weighted else None
    loss = InfoNCE(0.2, chunk_size=chunk, negative_weight_mode=mode)
    _check(lambda a, b, c: loss(a, b, c, w), lambda a, b, c: refs.infonce_ref(a, b, 0.2, negatives=c, weights=w, mode=mode),
           [q, k, neg])


def test_infonce_zero_weights_drop_negatives():
    q, k, neg = _inputs(12, (4, 3), (4, 3), (6, 3))
    w = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.2], dtype=torch.float64)
    loss = InfoNCE(0.3)
    out = loss(q, k, neg, w)
    keep = w > 0
    dropped = loss(q, k, neg[keep], w[keep])
    torch.testing.assert_close(out, dropped, **TOL)
    (gq,) = torch.autograd.grad(out, q)
    assert torch.isfinite(gq).all()
    _check(lambda a, b, c: loss(a, b, c, w), lambda a, b, c: refs.infonce_ref(a, b, 0.3, negatives=c, weights=w),
           [q, k, neg])


@pytest.mark.parametrize("n,v,d", [(4, 2, 3), (6, 3, 5)])
@pytest.mark.parametrize("t,base_t", [(0.07, 0.07), (0.5, 0.1)])
@pytest.mark.parametrize("kind", ["none", "labels", "mask"])
def test_supcon_matches_reference(n, v, d, t, base_t, kind):
    (f,) = _inputs(n * v, (n, v, d))
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, 3, (n,), generator=g) if kind == "labels" else None
    mask = (torch.rand(n, n, generator=g) > 0.5).double() if kind == "mask" else None
    loss = SupCon(t, base_t)
    _check(lambda x: loss(x, labels=labels, mask=mask), lambda x: refs.supcon_ref(x, t, base_t, labels=labels, mask=mask), [f])


@pytest.mark.parametrize("anchor_shape", ["n", "nv"])
def test_supcon_anchor_mask_matches_reference(anchor_shape):
    (f,) = _inputs(5, (6, 2, 4))
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    g = torch.Generator().manual_seed(2)
    am = torch.tensor([True, False, True, False, True, True]) if anchor_shape == "n" else torch.rand(6, 2, generator=g) > 0.4
    loss = SupCon(0.1, 0.07)
    _check(lambda x: loss(x, labels=labels, anchor_mask=am),
           lambda x: refs.supcon_ref(x, 0.1, 0.07, labels=labels, anchor_mask=am), [f])


def test_supcon_anchor_without_positive_counts_as_zero():
    # single view, label 0 appears once: that anchor contributes 0 but is in the mean (SupContrast)
    (f,) = _inputs(7, (4, 1, 3))
    labels = torch.tensor([0, 1, 1, 2])
    _check(lambda x: SupCon(0.2, 0.2)(x, labels=labels), lambda x: refs.supcon_ref(x, 0.2, 0.2, labels=labels), [f])
    with pytest.raises(ValueError, match="no anchor"):
        SupCon()(f, labels=labels, anchor_mask=torch.zeros(4, dtype=torch.bool))


def test_supcon_equals_pytorch_metric_learning_when_t_equals_base_t():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(8, 2, 5, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 3, (8,), generator=g)
    ours = SupCon(0.1, 0.1)(f, labels=labels)
    theirs = pml.SupConLoss(temperature=0.1)(f.transpose(0, 1).reshape(16, 5), labels.repeat(2))
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("shape", [(5, 2, 4), (4, 3, 3), (3, 2, 2, 4)])
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("backbone_anchors", [True, False])
def test_selfcon_matches_reference(shape, use_labels, backbone_anchors):
    (f,) = _inputs(len(shape), shape)
    labels = torch.randint(0, 2, (shape[0],), generator=torch.Generator().manual_seed(3)) if use_labels else None
    loss = SelfCon(0.1, 0.07, backbone_anchors=backbone_anchors)
    _check(lambda x: loss(x, labels), lambda x: refs.selfcon_ref(x, 0.1, 0.07, labels, backbone_anchors), [f])


@pytest.mark.parametrize("t", [1.0, 0.1])
@pytest.mark.parametrize("margin", [0.0, 0.3])
@pytest.mark.parametrize("collected", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
def test_twoc_matches_reference(t, margin, collected, chunk):
    e, p = _inputs(4, (7, 5), (7, 5))
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])     # class 2 and 3 have no other sample
    loss = TwoC(t, margin=margin, pos_collected_numerator=collected, chunk_size=chunk)
    _check(lambda a, b: loss(a, b, labels), lambda a, b: refs.twoc_ref(a, b, labels, t, margin, collected), [e, p])


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.1), (6, 4, 0.5)])
@pytest.mark.parametrize("chunk", [None, 5])
def test_dcl_matches_reference(n, d, t, chunk):
    _check(DCL(t, chunk_size=chunk), lambda a, b: refs.dcl_ref(a, b, t), _inputs(n, (n, d), (n, d)))


def test_dcl_equals_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    z0, z1 = _inputs(8, (6, 4), (6, 4))
    torch.testing.assert_close(DCL(0.2)(z0, z1), lightly_loss.DCLLoss(temperature=0.2)(z0, z1), **TOL)


@pytest.mark.parametrize("n,t", [(3, 0.5), (6, 0.2)])
@pytest.mark.parametrize("tau_plus,beta", [(0.0, 0.0), (0.1, 0.0), (0.1, 1.0), (0.05, 0.5)])
@pytest.mark.parametrize("chunk", [None, 4])
def test_hcl_matches_reference(n, t, tau_plus, beta, chunk):
    _check(HCL(t, tau_plus=tau_plus, beta=beta, chunk_size=chunk),
           lambda a, b: refs.hcl_ref(a, b, t, tau_plus, beta), _inputs(n + 1, (n, 4), (n, 4)))


def test_hcl_clamp_branch_matches_reference():
    # a large tau_plus drives Ng below its floor M e^{-1/t}
    z0, z1 = _inputs(5, (4, 3), (4, 3))
    with torch.no_grad():
        z1.copy_(z0 + 0.01 * z1)
    _check(HCL(0.5, tau_plus=0.9, beta=1.0), lambda a, b: refs.hcl_ref(a, b, 0.5, 0.9, 1.0), [z0, z1])


def test_hcl_without_debiasing_is_ntxent():
    z0, z1 = _inputs(6, (5, 4), (5, 4))
    torch.testing.assert_close(HCL(0.3, tau_plus=0.0, beta=0.0)(z0, z1), NTXent(0.3)(z0, z1), **TOL)


# ----- analytic values -----

@pytest.mark.parametrize("n", [1, 4, 33])
def test_ntxent_identical_embeddings_is_log_2n_minus_1(n):
    z = torch.randn(1, 8).repeat(n, 1)
    assert NTXent(0.5)(z, z).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5, abs=1e-6)


def test_infonce_orthogonal_keys():
    # q_i = k_i = e_i: positive logit 1/T, the N-1 others 0 -> loss = log(e^{1/T} + N - 1) - 1/T
    n, t = 6, 0.25
    eye = torch.eye(n)
    expected = math.log(math.exp(1 / t) + n - 1) - 1 / t
    assert InfoNCE(t)(eye, eye).item() == pytest.approx(expected, rel=1e-5)
    assert InfoNCE(t, symmetric=True)(eye, eye).item() == pytest.approx(expected, rel=1e-5)


def test_twoc_margin_cancels_and_no_positive_is_exact():
    e, p = _inputs(9, (5, 3), (5, 3))
    labels = torch.arange(5)
    a = TwoC(0.5, margin=0.0)(e, p, labels)
    torch.testing.assert_close(a, TwoC(0.5, margin=0.4)(e, p, labels), **TOL)
    # no same-label sample: collected numerator == proxy-only numerator
    torch.testing.assert_close(a, TwoC(0.5, pos_collected_numerator=False)(e, p, labels), **TOL)


# ----- argument checking -----

@pytest.mark.parametrize("cls", [InfoNCE, NTXent, SupCon, SelfCon, TwoC, DCL, HCL])
@pytest.mark.parametrize("t", [0.0, -0.1])
def test_bad_temperature_raises(cls, t):
    with pytest.raises(ValueError, match="temperature"):
        cls(temperature=t)


def test_bad_shapes_raise():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
        NTXent()(a, b)
    with pytest.raises(ValueError, match="query, key"):
        InfoNCE()(a, b)
    with pytest.raises(ValueError, match="negatives"):
        InfoNCE()(a, a, torch.randn(3, 2))
    with pytest.raises(ValueError, match="negative_weights"):
        InfoNCE()(a, a, torch.randn(3, 3), torch.ones(4))
    with pytest.raises(ValueError, match="features"):
        SupCon()(a)
    with pytest.raises(ValueError, match="labels"):
        SupCon()(torch.randn(4, 2, 3), labels=torch.zeros(5))
    with pytest.raises(ValueError, match="labels"):
        TwoC()(a, a, torch.zeros(3))
    with pytest.raises(ValueError, match="negative_weight_mode"):
        InfoNCE(negative_weight_mode="outside")
    with pytest.raises(ValueError, match="chunk_size"):
        NTXent(chunk_size=0)
    with pytest.raises(ValueError, match="tau_plus"):
        HCL(tau_plus=1.0)

"""The shared masked log-sum-exp core: exactness, chunking, mixed precision and memory bound."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cmgen.losses import DCL, HCL, InfoNCE, NTXent, SupCon, TwoC, masked_logsumexp


def _dense_lse(q, k, scale, allowed, bias=None):
    """Plain loop over rows in float64 of log sum over allowed columns."""
    out = []
    for i in range(q.shape[0]):
        vals = [scale * (q[i] @ k[j]) + (0.0 if bias is None else bias[j]) for j in range(k.shape[0]) if allowed[i][j]]
        if not vals:
            out.append(torch.tensor(float("-inf"), dtype=torch.float64))
            continue
        vals = torch.stack(vals)
        m = vals.max().detach()
        out.append(m + torch.log(torch.exp(vals - m).sum()))
    return torch.stack(out)


def _grads(fn, tensors, weights):
    out = fn(*tensors)
    finite = torch.isfinite(out)
    val = (out.masked_fill(~finite, 0.0) * weights).sum()
    return out.detach(), torch.autograd.grad(val, tensors, allow_unused=True)


CASES = ["plain", "exclude", "same", "different", "mask", "bias"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 50])
def test_rectangular_core_matches_loop(case, chunk):
    g = torch.Generator().manual_seed(0)
    n, m, d = 7, 9, 4
    q = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    rl, cl = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    ex = torch.tensor([0, 8, 3, 11, 2, 5, -1])          # 11 and -1 are out of range: drop nothing
    dense = torch.rand(n, m, generator=g) > 0.3
    kw, allowed = {}, [[True] * m for _ in range(n)]
    if case == "exclude":
        kw = dict(exclude=ex)
        allowed = [[j != int(ex[i]) for j in range(m)] for i in range(n)]
    elif case in ("same", "different"):
        kw = dict(row_labels=rl, col_labels=cl, label_mode=case)
        allowed = [[(rl[i] == cl[j]) == (case == "same") for j in range(m)] for i in range(n)]
    elif case == "mask":
        kw = dict(mask=dense)
        allowed = dense.tolist()
    bias = b if case == "bias" else None
    w = torch.randn(n, generator=g, dtype=torch.float64)
    out, grads = _grads(lambda q_, k_, b_: masked_logsumexp(q_, k_, scale=1.3, bias=b_ if case == "bias" else None,
                                                            chunk_size=chunk, **kw), [q, k, b], w)
    ref, ref_grads = _grads(lambda q_, k_, b_: _dense_lse(q_, k_, 1.3, allowed, b_ if case == "bias" else None),
                            [q, k, b], w)
    torch.testing.assert_close(out, ref)
    for gr, rg in zip(grads, ref_grads):
        if rg is None:
            assert gr is None or not gr.abs().sum()
        else:
            torch.testing.assert_close(gr, rg)


@pytest.mark.parametrize("case", ["plain", "diagonal", "same", "different", "same+diagonal"])
@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 64])
def test_symmetric_core_matches_loop(case, chunk):
    g = torch.Generator().manual_seed(1)
    n, d = 13, 3
    z = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 4, (n,), generator=g)
    kw = {}
    if "diagonal" in case:
        kw["exclude"] = "diagonal"
    if case.startswith("same") or case == "different":
        kw.update(row_labels=lab, label_mode=case.split("+")[0])
    allowed = [[("diagonal" not in case or i != j)
                and (not case.startswith("same") or lab[i] == lab[j])
                and (case != "different" or lab[i] != lab[j]) for j in range(n)] for i in range(n)]
    w = torch.randn(n, generator=g, dtype=torch.float64)
    out, (gz,) = _grads(lambda z_: masked_logsumexp(z_, scale=0.8, chunk_size=chunk, **kw), [z], w)
    ref, (rz,) = _grads(lambda z_: _dense_lse(z_, z_, 0.8, allowed), [z], w)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gz, rz)


def _loss_suite():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 2, 0, 1])
    return [
        ("ntxent", lambda: NTXent(0.2), lambda L, a, b, c: L(a, b)),
        ("infonce", lambda: InfoNCE(0.1), lambda L, a, b, c: L(a, b)),
        ("clip", lambda: InfoNCE(0.1, symmetric=True), lambda L, a, b, c: L(a, b)),
        ("moco", lambda: InfoNCE(0.1), lambda L, a, b, c: L(a, b, c, torch.linspace(0, 1, c.shape[0], dtype=c.dtype))),
        ("supcon", lambda: SupCon(0.1), lambda L, a, b, c: L(torch.stack([a, b], 1), labels=labels)),
        ("twoc", lambda: TwoC(0.5), lambda L, a, b, c: L(a, b, labels)),
        ("dcl", lambda: DCL(0.2), lambda L, a, b, c: L(a, b)),
        ("hcl", lambda: HCL(0.5, tau_plus=0.1, beta=1.0), lambda L, a, b, c: L(a, b)),
    ]


@pytest.mark.parametrize("name,loss,call", _loss_suite(), ids=[c[0] for c in _loss_suite()])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_equals_unchunked(name, loss, call, chunk):
    # float64 so that only the tiling, not float32 summation order, could make a difference
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(s, 6, generator=g, dtype=torch.float64, requires_grad=True) for s in (11, 11, 9))
    plain, chunked = loss(), loss()
    chunked.chunk_size = chunk
    ref = call(plain, a, b, c)
    ref_grads = torch.autograd.grad(ref, [a, b, c], allow_unused=True)
    out = call(chunked, a, b, c)
    grads = torch.autograd.grad(out, [a, b, c], allow_unused=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for gr, rg in zip(grads, ref_grads):
        if rg is not None:
            torch.testing.assert_close(gr, rg, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,loss,call", _loss_suite(), ids=[c[0] for c in _loss_suite()])
def test_autocast_bf16_gives_float32_close_to_fp32(name, loss, call):
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(s, 6, generator=g) for s in (11, 11, 9))
    loss = loss()
    ref = call(loss, a, b, c)
    lin = torch.nn.Linear(6, 6).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
        lin.bias.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a16, b16, c16 = lin(a), lin(b), lin(c)      # bf16 activations, as a network under autocast gives
        assert a16.dtype == torch.bfloat16
        out = call(loss, a16, b16, c16)
    assert out.dtype == torch.float32
    # only the bf16 rounding of the inputs (~3 significant digits) separates the two
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    out.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("name,make", [
    ("ntxent", lambda z0, z1: NTXent(0.1, chunk_size=50)(z0, z1)),
    ("infonce", lambda z0, z1: InfoNCE(0.1, symmetric=True, chunk_size=50)(z0, z1)),
    ("supcon", lambda z0, z1: SupCon(0.1, chunk_size=50)(torch.stack([z0, z1], 1), labels=torch.arange(z0.shape[0]) % 7)),
    ("hcl", lambda z0, z1: HCL(0.5, chunk_size=50)(z0, z1)),
])
def test_no_full_similarity_matrix_is_materialised(name, make):
    n = 200                                     # 2N = 400 rows: the full matrix would be 160k elements
    z0, z1 = torch.randn(n, 16, requires_grad=True), torch.randn(n, 16, requires_grad=True)
    with _MaxNumel() as mode:
        make(z0, z1).backward()
    limit = 50 * 2 * n
    assert mode.max_numel <= limit, mode.max_numel
    assert z0.grad is not None and torch.isfinite(z0.grad).all()


def test_core_argument_errors():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"k must be \(M, D\)"):
        masked_logsumexp(q, torch.randn(5, 2), scale=1.0)
    with pytest.raises(ValueError, match="label_mode"):
        masked_logsumexp(q, scale=1.0, label_mode="other")
    with pytest.raises(ValueError, match="mask"):
        masked_logsumexp(q, scale=1.0, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        masked_logsumexp(q, torch.randn(5, 3), scale=1.0, exclude="diagonal")
    with pytest.raises(ValueError, match="bias"):
        masked_logsumexp(q, torch.randn(5, 3), scale=1.0, bias=torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_temperature_takes_the_stable_path_exactly(dtype):
    # T = 0.004: every logit of a low-similarity row sits far below the bound 1/T, so exp(S - 1/T)
    # underflows and the core must switch to per-row shifts; the result must still match the reference.
    from tests.loss_refs import ntxent_ref

    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    z1 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    ref = ntxent_ref(z0, z1, 0.004)
    a, b = z0.to(dtype).clone().requires_grad_(), z1.to(dtype).clone().requires_grad_()
    out = NTXent(0.004, chunk_size=4)(a, b)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(a.grad).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    r0, r1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    ntxent_ref(r0, r1, 0.004).backward()
    torch.testing.assert_close(a.grad.double(), r0.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [None, 3])
def test_rectangular_tiny_temperature_and_zero_weights_are_exact(chunk):
    # MoCo shape (queries vs a queue) at T = 0.003 with unnormalised inputs: exp(S - bound) underflows for
    # most rows, so the rectangular core must fall back to max-shifted rows; zero weights drop columns.
    g = torch.Generator().manual_seed(11)
    q = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = (3 * torch.randn(9, 6, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.rand(9, generator=g, dtype=torch.float64)
    w[[1, 4]] = 0.0
    bias = torch.log(w)
    allowed = [[bool(w[j] > 0) for j in range(9)] for _ in range(5)]
    weights = torch.randn(5, generator=g, dtype=torch.float64)
    out, grads = _grads(lambda q_, k_: masked_logsumexp(q_, k_, scale=1 / 0.003, bias=bias, chunk_size=chunk),
                        [q, k], weights)
    ref, ref_grads = _grads(lambda q_, k_: _dense_lse(q_, k_, 1 / 0.003, allowed, bias), [q, k], weights)
    torch.testing.assert_close(out, ref)
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg)


def test_kept_tiles_survive_a_second_backward():
    # chunk_size=None keeps the forward's exp tiles for backward; retain_graph must see them unchanged.
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 5, generator=g, requires_grad=True)
    k = torch.randn(30, 5, generator=g)
    loss = InfoNCE(0.1)(q, q.detach() + 0.1, negatives=k)
    (g1,) = torch.autograd.grad(loss, q, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, q)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)

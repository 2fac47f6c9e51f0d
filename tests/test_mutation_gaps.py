"""Tests for single-point bugs a mutation run found that no other test caught (issue 6, part 3).

Each test names the mutant it kills; every one was checked by injecting that bug by hand.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from cmgen.engine.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints
from cmgen.losses import InfoNCE
from cmgen.losses._core import masked_logsumexp


# ------------------------------------------------------------------------------ cmgen/engine/checkpoint.py

def _step(root, step, complete=True):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    if complete:
        (d / STATE_FILE).write_text(json.dumps({"step": step}))
    return d


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    """Kills: ``latest_checkpoint`` returning ``ckpts[0]`` (the oldest), and a ``step_*`` folder without
    ``engine_state.json`` (a half-written or foreign folder) being accepted."""
    for step in (10, 2, 100):                    # created out of order: not the file-system order
        _step(tmp_path, step)
    _step(tmp_path, 200, complete=False)          # newest, but incomplete
    (tmp_path / "step_000300").write_text("a file, not a folder")
    (tmp_path / ".tmp-step400").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10, 100]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000100"
    assert latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "step_000200" / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000200"


# ------------------------------------------------------------------------------ cmgen/losses/infonce.py

def test_infonce_exp_mode_weights_get_no_gradient():
    """Kills: dropping ``.detach()`` on ``log w`` in ``negative_weight_mode="exp"`` (VideoMoCo Eq. 6 treats
    the temporal-decay weights as constants). In ``"logit"`` mode w multiplies the negatives, so its
    gradient is the ordinary one and must reach it (that path is not detached)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(4, 8, generator=g)
    negatives = torch.randn(6, 8, generator=g)
    w = torch.rand(6, generator=g).add_(0.1).requires_grad_()
    loss = InfoNCE(temperature=0.2, negative_weight_mode="exp")(q, k, negatives=negatives, negative_weights=w)
    loss.backward()
    assert w.grad is None and q.grad is not None and q.grad.abs().sum() > 0
    # the value still depends on w (the bias is applied, only its gradient is stopped)
    other = InfoNCE(temperature=0.2, negative_weight_mode="exp")(q, k, negatives=negatives,
                                                               negative_weights=w.detach() * 2)
    assert not torch.isclose(loss, other)
    w.grad = None
    InfoNCE(temperature=0.2, negative_weight_mode="logit")(q, k, negatives=negatives, negative_weights=w).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ cmgen/losses/_core.py

def _reference_lse(q, k, scale, exclude):
    s = scale * q.double() @ k.double().t()
    for i, j in enumerate(exclude.tolist()):
        if 0 <= j < s.shape[1]:
            s[i, j] = float("-inf")
    return torch.logsumexp(s, dim=1)


def test_rectangular_stable_path_excludes_row0_col0():
    """Kills mutants of ``_Spec.apply_mask_rows`` (the stable fallback) that skip row 0 or column 0:
    ``hit = ex > 0`` or ``r = nonzero(hit)[1:]``. Every logit is far below its Cauchy-Schwarz bound
    (q points away from every k), so every row takes the stable path; row 0 drops column 0, which holds
    its largest logit, so not dropping it changes the value by far more than rounding."""
    q = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.2]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([[-0.80, 0.20], [-1.00, 0.00], [-0.90, 0.10], [-0.95, 0.05]], dtype=torch.float64,
                     requires_grad=True)
    exclude = torch.tensor([0, 2, 7])            # row 2: out of range, drops nothing
    scale = 50.0
    for chunk in (None, 1, 2):
        lse = masked_logsumexp(q, k, scale=scale, exclude=exclude, chunk_size=chunk)
        ref = _reference_lse(q, k, scale, exclude)
        torch.testing.assert_close(lse, ref, rtol=1e-12, atol=1e-12)
        g = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
        dq, dk = torch.autograd.grad((lse * g).sum(), (q, k))
        rq, rk = torch.autograd.grad((ref * g).sum(), (q, k))
        torch.testing.assert_close(dq, rq, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dk, rk, rtol=1e-10, atol=1e-12)
    # column 0 really matters for row 0 here
    assert (_reference_lse(q, k, scale, torch.tensor([9, 2, 7]))[0] - ref[0]).abs() > 1.0


# ------------------------------------------------------------------------------ evaluation/retrieval.py

def _maxpool_v2t_reference(sim: np.ndarray, t2v: np.ndarray):
    """Slow CLIP4Clip v2t: S[u, v] = max over the captions t of video u of sim[t, v]; rank of S[v, v]
    in column v, ties averaged ((greater + 1) + (equal - 1) / 2)."""
    n_videos = sim.shape[1]
    pooled = np.array([[max(sim[t, v] for t in range(len(t2v)) if t2v[t] == u) for v in range(n_videos)]
                       for u in range(n_videos)])
    ranks = []
    for v in range(n_videos):
        greater = sum(pooled[u, v] > pooled[v, v] for u in range(n_videos))
        equal = sum(pooled[u, v] == pooled[v, v] for u in range(n_videos))
        ranks.append(greater + 1 + (equal - 1) / 2)
    return np.array(ranks)


def test_maxpool_v2t_on_an_all_negative_matrix():
    """Kills: initialising the max-pool buffer with 0 (or any value above the scores) instead of the
    lowest representable value: with every similarity negative, all pooled scores would become 0 and
    tie."""
    from evaluation.retrieval import retrieval_metrics

    rng = np.random.default_rng(0)
    t2v = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    sim = -rng.uniform(0.5, 3.0, size=(8, 4))
    sim[[0, 3, 5, 7], [0, 1, 2, 3]] = -0.1        # most videos find a caption of their own best
    sim[6, 0] = -0.05                             # ... but video 0 is beaten in its column by a caption of 3
    ranks = _maxpool_v2t_reference(sim, t2v)
    assert ranks.tolist() != [1.0] * 4 and ranks.max() <= 4
    for chunk in (None, 1, 3):
        for s in (sim, sim.astype(np.float32), torch.from_numpy(sim)):
            got = retrieval_metrics(s, t2v, v2t="maxpool", chunk_size=chunk)["v2t"]
            assert got["MnR"] == ranks.mean() and got["MdR"] == np.median(ranks)
            assert got["R@1"] == 100.0 * np.mean(ranks <= 1)

"""evaluation.retrieval against plain-loop float64 references, analytic cases and CLIP4Clip's code."""
from __future__ import annotations

import argparse
import json
import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from evaluation import retrieval_cli
from evaluation.retrieval import dual_softmax, querybank_normalize, retrieval_metrics

KS = (1, 5, 10)
KEYS = ("R@1", "R@5", "R@10", "MdR", "MnR")


# ------------------------------------------------------------------------------------ loop reference

def _ref_query(scores, correct, ties):
    """One query by counting: returns (expected rank, [P(rank <= K) for K in KS]) as exact Fractions.

    Under "average" the first correct item among e tied slots with c correct lands at slot j with
    probability C(e - j, c - 1) / C(e, c) (the other c - 1 correct items fill later slots)."""
    best = max(scores[i] for i in correct)
    g = sum(1 for s in scores if s > best)
    e = sum(1 for s in scores if s == best)
    c = sum(1 for i in correct if scores[i] == best)
    if ties == "optimistic":
        dist = {g + 1: Fraction(1)}
    elif ties == "pessimistic":
        dist = {g + e - c + 1: Fraction(1)}
    else:
        dist = {g + j: Fraction(math.comb(e - j, c - 1), math.comb(e, c)) for j in range(1, e - c + 2)}
    assert sum(dist.values()) == 1
    rank = sum(r * p for r, p in dist.items())
    return rank, [sum((p for r, p in dist.items() if r <= k), Fraction(0)) for k in KS]


def _ref_summary(queries):
    ranks = [float(r) for r, _ in queries]
    out = {f"R@{k}": 100.0 * float(sum(h[i] for _, h in queries) / len(queries)) for i, k in enumerate(KS)}
    ordered = sorted(ranks)
    n = len(ordered)
    out["MdR"] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    out["MnR"] = sum(ranks) / n
    return out


def reference_metrics(sim, text_to_video=None, ties="average", v2t="best"):
    sim = [[float(x) for x in row] for row in np.asarray(sim, dtype=np.float64)]
    num_texts, num_videos = len(sim), len(sim[0])
    t2v = list(range(num_texts)) if text_to_video is None else [int(v) for v in text_to_video]
    t2v_q = [_ref_query(sim[t], [t2v[t]], ties) for t in range(num_texts)]
    v2t_q = []
    for v in range(num_videos):
        mine = [t for t in range(num_texts) if t2v[t] == v]
        if v2t == "best":
            v2t_q.append(_ref_query([sim[t][v] for t in range(num_texts)], mine, ties))
        else:
            pooled = [max([sim[t][v] for t in range(num_texts) if t2v[t] == u]) for u in range(num_videos)]
            v2t_q.append(_ref_query(pooled, [v], ties))
    return {"t2v": _ref_summary(t2v_q), "v2t": _ref_summary(v2t_q)}


def assert_metrics_close(got, want, tol=1e-9):
    assert set(got) == {"t2v", "v2t"}
    for direction in ("t2v", "v2t"):
        assert set(got[direction]) == set(KEYS)
        for key in KEYS:
            assert isinstance(got[direction][key], float)
            assert got[direction][key] == pytest.approx(want[direction][key], abs=tol), (direction, key)


def _multi_caption(num_videos, counts, rng, levels=None):
    t2v = np.repeat(np.arange(num_videos), counts)
    rng.shuffle(t2v)
    shape = (len(t2v), num_videos)
    sim = rng.integers(0, levels, size=shape).astype(np.float64) if levels else rng.standard_normal(shape)
    return sim, t2v


# ---------------------------------------------------------------------------------------- analytic

@pytest.mark.parametrize("ties", ["average", "optimistic", "pessimistic"])
def test_identity_is_perfect(ties):
    m = retrieval_metrics(np.eye(7), ties=ties)
    for direction in ("t2v", "v2t"):
        assert m[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.0}


def test_reversed_order_known_ranks():
    # sim[i, j] = -(i + j): every query ranks the other side by index, so caption i's video sits at
    # rank i + 1 and video j's caption at rank j + 1
    n = 12
    sim = -(np.arange(n)[:, None] + np.arange(n)[None, :]).astype(np.float64)
    m = retrieval_metrics(sim)
    want = {"R@1": 100 / n, "R@5": 500 / n, "R@10": 1000 / n, "MdR": (n + 1) / 2, "MnR": (n + 1) / 2}
    for direction in ("t2v", "v2t"):
        assert m[direction] == pytest.approx(want)
    # anti-identity: the correct video is always last
    m = retrieval_metrics(-np.eye(n))
    assert m["t2v"] == pytest.approx({"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "MdR": n, "MnR": n})


def test_constant_matrix_ties():
    n = 20
    sim = np.full((n, n), 0.3)
    avg = retrieval_metrics(sim)
    for direction in ("t2v", "v2t"):
        # chance: P(rank <= K) = K / n, expected rank (n + 1) / 2
        assert avg[direction] == pytest.approx({"R@1": 5.0, "R@5": 25.0, "R@10": 50.0,
                                                "MdR": 10.5, "MnR": 10.5})
    assert retrieval_metrics(sim, ties="optimistic")["t2v"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0,
                                                               "MdR": 1.0, "MnR": 1.0}
    assert retrieval_metrics(sim, ties="pessimistic")["v2t"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0,
                                                                "MdR": 20.0, "MnR": 20.0}


def test_constant_matrix_multi_caption_best():
    # 3 videos x 4 captions, all tied: the best of 4 correct among 12 has E[rank] = 13/5 and
    # P(rank = 1) = 4/12
    t2v = np.repeat(np.arange(3), 4)
    m = retrieval_metrics(np.zeros((12, 3)), t2v)
    assert m["v2t"]["MnR"] == pytest.approx(13 / 5)
    assert m["v2t"]["R@1"] == pytest.approx(100 * 4 / 12)
    assert m["v2t"]["R@10"] == 100.0
    assert m["t2v"]["R@1"] == pytest.approx(100 / 3)
    assert retrieval_metrics(np.zeros((12, 3)), t2v, ties="pessimistic")["v2t"]["MnR"] == 9.0


# ------------------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("ties", ["average", "optimistic", "pessimistic"])
@pytest.mark.parametrize("levels", [None, 3])
def test_square_matches_reference(ties, levels):
    rng = np.random.default_rng(0 if levels is None else 1)
    n = 37
    sim = rng.integers(0, levels, size=(n, n)).astype(np.float32) if levels else rng.standard_normal((n, n))
    assert_metrics_close(retrieval_metrics(sim, ties=ties), reference_metrics(sim, ties=ties))


@pytest.mark.parametrize("v2t", ["best", "maxpool"])
@pytest.mark.parametrize("ties", ["average", "optimistic", "pessimistic"])
@pytest.mark.parametrize("layout", ["msrvtt20", "variable"])
def test_multi_caption_matches_reference(v2t, ties, layout):
    rng = np.random.default_rng(zlib.crc32(f"{v2t}/{ties}/{layout}".encode()))
    if layout == "msrvtt20":  # 20 captions per video, as MSR-VTT train
        num_videos, counts = 8, 20
    else:
        num_videos = 15
        counts = rng.integers(2, 11, size=num_videos)
    for levels in (None, 4):  # continuous scores and heavily tied integer scores
        sim, t2v = _multi_caption(num_videos, counts, rng, levels)
        got = retrieval_metrics(sim, t2v, ties=ties, v2t=v2t)
        assert_metrics_close(got, reference_metrics(sim, t2v, ties=ties, v2t=v2t))


def test_v2t_modes_agree_for_one_caption_per_video():
    rng = np.random.default_rng(3)
    sim = rng.integers(0, 5, size=(25, 25)).astype(np.float64)
    perm = rng.permutation(25)
    a = retrieval_metrics(sim, perm, v2t="best")
    b = retrieval_metrics(sim, perm, v2t="maxpool")
    assert a == b
    assert_metrics_close(a, reference_metrics(sim, perm))


# --------------------------------------------------------------------------- CLIP4Clip's own code

def clip4clip_compute_metrics(x):
    """Literal re-implementation of CLIP4Clip ``metrics.py::compute_metrics`` (rows are queries)."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)
    d = d[:, np.newaxis]
    ind = sx - d
    ind = np.where(ind == 0)
    ind = ind[1]
    return {"R@1": float(np.sum(ind == 0)) * 100 / len(ind), "R@5": float(np.sum(ind < 5)) * 100 / len(ind),
            "R@10": float(np.sum(ind < 10)) * 100 / len(ind), "MdR": float(np.median(ind) + 1),
            "MnR": float(np.mean(ind) + 1)}


def clip4clip_multi_sentence(sim, t2v):
    """CLIP4Clip's multi-sentence path: captions grouped into a (V, max_captions, V) tensor padded
    with -inf, ``tensor_text_to_video_metrics`` for t2v and ``tensor_video_to_text_sim`` +
    ``compute_metrics`` for v2t (restated)."""
    num_videos = sim.shape[1]
    groups = [np.flatnonzero(t2v == v) for v in range(num_videos)]
    width = max(len(g) for g in groups)
    sim_tensor = torch.full((num_videos, width, num_videos), float("-inf"), dtype=torch.float64)
    for v, g in enumerate(groups):
        sim_tensor[v, :len(g)] = torch.from_numpy(sim[g])
    stacked = sim_tensor.permute(1, 0, 2)
    first_argsort = torch.argsort(stacked, dim=-1, descending=True)
    second_argsort = torch.argsort(first_argsort, dim=-1, descending=False)
    ranks = torch.flatten(torch.diagonal(second_argsort, dim1=1, dim2=2))
    original = torch.flatten(torch.diagonal(sim_tensor, dim1=0, dim2=2))
    valid_ranks = ranks[~torch.logical_or(torch.isinf(original), torch.isnan(original))]
    t2v_metrics = {f"R@{k}": float(torch.sum(valid_ranks < k) * 100 / len(valid_ranks)) for k in KS}
    t2v_metrics["MdR_lower"] = float(torch.median(valid_ranks + 1))  # torch.median: lower middle value
    t2v_metrics["MdR"] = float(np.median(valid_ranks.numpy() + 1))
    t2v_metrics["MnR"] = float(np.mean(valid_ranks.numpy() + 1))
    values, _ = torch.max(sim_tensor, dim=1, keepdim=True)
    v2t_matrix = torch.squeeze(values).T
    return t2v_metrics, clip4clip_compute_metrics(v2t_matrix.numpy())


def test_square_equals_clip4clip_without_ties():
    rng = np.random.default_rng(4)
    sim = rng.standard_normal((60, 60))
    m = retrieval_metrics(sim)
    assert m["t2v"] == pytest.approx(clip4clip_compute_metrics(sim), abs=1e-12)
    assert m["v2t"] == pytest.approx(clip4clip_compute_metrics(sim.T), abs=1e-12)


def test_clip4clip_tie_behaviour_documented_difference():
    # query 0 ties with all 10 videos, every other query is ranked first: CLIP4Clip counts query 0
    # ten times (once per tied position) -> R@1 = 10 / 19; we count each query once, rank 5.5 for it
    n = 10
    sim = np.eye(n)
    sim[0] = 1.0
    theirs = clip4clip_compute_metrics(sim)
    assert theirs["R@1"] == pytest.approx(100 * 10 / 19)
    ours = retrieval_metrics(sim)["t2v"]
    assert ours["R@1"] == pytest.approx(100 * (9 + 1 / n) / n)
    assert ours["MnR"] == pytest.approx((9 + 5.5) / n)
    # on a constant matrix every query has the same tie size, so the two coincide
    const = np.ones((n, n))
    assert retrieval_metrics(const)["t2v"] == pytest.approx(clip4clip_compute_metrics(const))


def test_multi_caption_equals_clip4clip_without_ties():
    rng = np.random.default_rng(5)
    counts = rng.integers(2, 11, size=12)
    sim, t2v = _multi_caption(12, counts, rng)
    ours = retrieval_metrics(sim, t2v, v2t="maxpool")
    theirs_t2v, theirs_v2t = clip4clip_multi_sentence(sim, t2v)
    for key in ("R@1", "R@5", "R@10", "MdR", "MnR"):  # their R@K is a float32 tensor
        assert ours["t2v"][key] == pytest.approx(theirs_t2v[key], rel=1e-6)
    assert ours["v2t"] == pytest.approx(theirs_v2t, abs=1e-12)
    # MdR differs from CLIP4Clip's torch.median only by its choice of the lower middle value
    assert theirs_t2v["MdR_lower"] <= ours["t2v"]["MdR"]


# ------------------------------------------------------------------------- chunking and input kinds

@pytest.mark.parametrize("v2t", ["best", "maxpool"])
def test_chunked_equals_unchunked(v2t):
    rng = np.random.default_rng(6)
    sim, t2v = _multi_caption(11, rng.integers(1, 6, size=11), rng, levels=4)
    full = retrieval_metrics(sim, t2v, v2t=v2t)
    for chunk in (1, 3, 7, 1000):
        for ties in ("average", "pessimistic"):
            assert retrieval_metrics(sim, t2v, v2t=v2t, chunk_size=chunk, ties=ties) == \
                retrieval_metrics(sim, t2v, v2t=v2t, ties=ties)
    assert retrieval_metrics(sim, t2v, v2t=v2t, chunk_size=2) == full


def test_torch_numpy_and_readonly_inputs_agree():
    rng = np.random.default_rng(7)
    sim, t2v = _multi_caption(9, 3, rng, levels=5)
    sim = sim.astype(np.float32)
    want = retrieval_metrics(sim, t2v)
    assert retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(t2v)) == want
    assert retrieval_metrics(sim.tolist(), t2v.tolist()) == want
    frozen = sim.copy()
    frozen.flags.writeable = False
    assert retrieval_metrics(frozen, t2v, chunk_size=4) == want
    assert retrieval_metrics(np.asfortranarray(sim), t2v, v2t="maxpool", chunk_size=2) == \
        retrieval_metrics(sim, t2v, v2t="maxpool")
    assert retrieval_metrics(sim.astype(np.int64), t2v) == want  # integer-valued scores
    json.dumps(want)


# ------------------------------------------------------------------------------------------ errors

def test_validation_messages():
    sim = np.zeros((4, 4))
    sim[1, 2] = np.nan
    sim[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"2 NaN.*row 1, column 2"):
        retrieval_metrics(sim)
    with pytest.raises(ValueError, match=r"2 NaN.*row 1, column 2"):
        retrieval_metrics(torch.from_numpy(sim), chunk_size=1)
    with pytest.raises(ValueError, match="non-square"):
        retrieval_metrics(np.zeros((6, 3)))
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        retrieval_metrics(np.zeros((6, 3)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*text_to_video\[4\] = 3"):
        retrieval_metrics(np.zeros((6, 3)), np.array([0, 1, 2, 0, 3, -1]))
    with pytest.raises(ValueError, match="2 of 4 videos have no caption"):
        retrieval_metrics(np.zeros((6, 4)), np.array([0, 0, 2, 2, 2, 0]), v2t="maxpool")
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(np.zeros((3, 3)), np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3))
    with pytest.raises(ValueError, match="'random'"):
        retrieval_metrics(np.eye(3), ties="random")
    with pytest.raises(ValueError, match="'mean'"):
        retrieval_metrics(np.eye(3), v2t="mean")
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(np.eye(3), chunk_size=0)


# ------------------------------------------------------------------------------------ DSL and QB-Norm

def test_dual_softmax_matches_loop():
    rng = np.random.default_rng(8)
    sim = rng.standard_normal((7, 5))
    tau = 0.5
    got = dual_softmax(sim, tau)
    assert isinstance(got, np.ndarray) and got.shape == sim.shape
    for t in range(7):
        for v in range(5):
            column = [math.exp(sim[q, v] / tau) for q in range(7)]
            want = sim[t, v] * math.exp(sim[t, v] / tau) / sum(column) * 7
            assert got[t, v] == pytest.approx(want, rel=1e-12)
    assert torch.allclose(dual_softmax(torch.from_numpy(sim), tau), torch.from_numpy(got))
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(sim, 0.0)


def test_dual_softmax_fixes_hub_video():
    # video 2 is a hub (the top video of every caption); the prior over captions demotes it
    sim = np.array([[0.8, 0.1, 0.9], [0.1, 0.8, 0.9], [0.1, 0.1, 0.95]])
    assert retrieval_metrics(sim)["t2v"]["R@1"] == pytest.approx(100 / 3)
    assert retrieval_metrics(dual_softmax(sim, 0.05))["t2v"]["R@1"] == 100.0


def _qbnorm_official(train_test, test_test, beta, k):
    """The official ``dynamic_inverted_softmax.py::qb_norm``, restated with explicit loops."""
    test_test = test_test.copy()
    retrieved = set()
    for row in train_test:
        retrieved.update(np.argsort(-row, kind="stable")[:k].tolist())
    norm = [sum(math.exp(beta * train_test[b, v]) for b in range(len(train_test)))
            for v in range(train_test.shape[1])]
    for q in range(len(test_test)):
        if int(np.argmax(test_test[q])) in retrieved:
            test_test[q] = [math.exp(beta * test_test[q, v]) / norm[v] for v in range(test_test.shape[1])]
    return test_test


@pytest.mark.parametrize("k", [1, 2])
def test_querybank_normalize_matches_official(k):
    rng = np.random.default_rng(9 + k)
    test = rng.uniform(-1, 1, size=(10, 6))
    bank = rng.uniform(-1, 1, size=(15, 6))
    bank[:, 5] -= 3.0  # video 5 is never in a bank top-k: queries whose top-1 is 5 stay raw
    test[0, 5] = 5.0
    got = querybank_normalize(test, bank, beta=20.0, k=k)
    want = _qbnorm_official(bank, test, 20.0, k)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.array_equal(got[0], test[0])
    got_t = querybank_normalize(torch.from_numpy(test), torch.from_numpy(bank), beta=20.0, k=k)
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="columns"):
        querybank_normalize(test, bank[:, :5])
    with pytest.raises(ValueError, match="k must be"):
        querybank_normalize(test, bank, k=7)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_writes_json(tmp_path, capsys):
    rng = np.random.default_rng(10)
    sim, t2v = _multi_caption(6, 3, rng)
    np.save(tmp_path / "s.npy", sim.astype(np.float32))
    np.save(tmp_path / "m.npy", t2v)
    np.save(tmp_path / "bank.npy", rng.standard_normal((12, 6)))
    parser = argparse.ArgumentParser()
    retrieval_cli.add_arguments(parser)
    out = tmp_path / "res" / "metrics.json"
    args = parser.parse_args(["--sims", str(tmp_path / "s.npy"), "--text-to-video", str(tmp_path / "m.npy"),
                              "--v2t", "maxpool", "--ties", "optimistic", "--chunk-size", "4",
                              "--dual-softmax", "1.0", "--querybank", str(tmp_path / "bank.npy"),
                              "--out", str(out)])
    assert retrieval_cli.run(args) == 0
    table = capsys.readouterr().out
    assert "| t2v |" in table and "| v2t +DSL |" in table and "| t2v +QB-Norm |" in table
    report = json.loads(out.read_text())
    assert report["metrics"] == retrieval_metrics(sim.astype(np.float32), t2v, ties="optimistic", v2t="maxpool")
    assert report["shapes"] == {"num_texts": 18, "num_videos": 6, "captions_per_video": 3.0}
    assert report["settings"]["ties"] == "optimistic" and report["settings"]["v2t"] == "maxpool"
    assert set(report) == {"metrics", "metrics_dual_softmax", "metrics_qb_norm", "settings", "shapes"}

    bad = parser.parse_args(["--sims", str(tmp_path / "s.npy")])  # non-square without a mapping
    assert retrieval_cli.run(bad) == 2
    assert "text_to_video" in capsys.readouterr().err


def test_cmgen_eval_retrieval_end_to_end(tmp_path, capsys):
    from cmgen.cli import main

    rng = np.random.default_rng(11)
    sim = rng.standard_normal((8, 8))
    np.save(tmp_path / "s.npy", sim)
    out = tmp_path / "m.json"
    assert main(["eval", "retrieval", "--sims", str(tmp_path / "s.npy"), "--mmap", "--out", str(out)]) == 0
    assert "| v2t |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["metrics"] == retrieval_metrics(sim)
    assert report["settings"]["ties"] == "average" and report["settings"]["v2t"] == "best"
    assert report["shapes"]["num_texts"] == report["shapes"]["num_videos"] == 8


# ------------------------------------------------------------------------- from embeddings (at scale)

from evaluation import retrieval as retrieval_module  # noqa: E402
from evaluation.retrieval import retrieval_metrics_from_embeddings  # noqa: E402
from tests.test_losses_core import _MaxNumel  # noqa: E402  (the largest tensor any op returns)


def _embeddings(num_videos, counts, rng, dim=6, levels=None):
    t2v = np.repeat(np.arange(num_videos), counts)
    rng.shuffle(t2v)
    if levels:  # small integers: every product is exact, so ties are real ties
        text = rng.integers(-1, levels, size=(len(t2v), dim)).astype(np.float32)
        video = rng.integers(-1, levels, size=(num_videos, dim)).astype(np.float32)
    else:
        text, video = rng.standard_normal((len(t2v), dim)), rng.standard_normal((num_videos, dim))
    return text, video, t2v


@pytest.mark.parametrize("v2t", ["best", "maxpool"])
@pytest.mark.parametrize("ties", ["average", "optimistic", "pessimistic"])
@pytest.mark.parametrize("levels", [None, 2])
def test_from_embeddings_equals_matrix_path(v2t, ties, levels):
    rng = np.random.default_rng(zlib.crc32(f"emb/{v2t}/{ties}/{levels}".encode()))
    for counts in (1, rng.integers(1, 6, size=14)):
        text, video, t2v = _embeddings(14, counts, rng, levels=levels)
        sim = text.astype(np.float64) @ video.T.astype(np.float64)
        want = retrieval_metrics(sim, t2v, ties=ties, v2t=v2t)
        assert_metrics_close(want, reference_metrics(sim, t2v, ties=ties, v2t=v2t))
        for chunk in (None, 1, 4, 1000):
            got = retrieval_metrics_from_embeddings(text, video, t2v, ties=ties, v2t=v2t, chunk_size=chunk)
            assert_metrics_close(got, want, tol=1e-9)


def test_from_embeddings_square_torch_and_heavy_ties():
    rng = np.random.default_rng(12)
    text = rng.integers(0, 2, size=(30, 2)).astype(np.float32)  # 4 distinct rows: huge tie groups
    video = rng.integers(0, 2, size=(30, 2)).astype(np.float32)
    want = retrieval_metrics(text @ video.T)
    assert retrieval_metrics_from_embeddings(torch.from_numpy(text), torch.from_numpy(video), chunk_size=7) == want
    assert retrieval_metrics_from_embeddings(text.astype(np.int64), video.astype(np.int64)) == want
    constant = retrieval_metrics_from_embeddings(np.ones((20, 3)), np.ones((20, 3)))
    assert constant["t2v"]["R@1"] == pytest.approx(5.0) and constant["v2t"]["MnR"] == pytest.approx(10.5)


@pytest.mark.parametrize("v2t", ["best", "maxpool"])
def test_from_embeddings_never_allocates_the_matrix(v2t, monkeypatch):
    rng = np.random.default_rng(13)
    text, video, t2v = _embeddings(150, rng.integers(1, 4, size=150), rng, dim=8)
    num_texts = len(t2v)
    text, video = torch.from_numpy(text), torch.from_numpy(video)
    want = retrieval_metrics(text @ video.T, t2v, v2t=v2t)
    with _MaxNumel() as mode:
        got = retrieval_metrics_from_embeddings(text, video, t2v, v2t=v2t, chunk_size=8)
    assert_metrics_close(got, want)
    assert mode.max_numel <= 8 * (num_texts + 150), mode.max_numel  # one block of queries, never T x V
    # the default chunk follows the element budget
    monkeypatch.setitem(retrieval_module._BLOCK_ELEMENTS, "cpu", 4096)
    with _MaxNumel() as mode:
        got = retrieval_metrics_from_embeddings(text, video, t2v, v2t=v2t)
    assert_metrics_close(got, want)
    assert mode.max_numel <= 4096 < num_texts * 150


def test_from_embeddings_validation():
    with pytest.raises(ValueError, match="dimension 3 but video_emb has 4"):
        retrieval_metrics_from_embeddings(np.zeros((5, 3)), np.zeros((5, 4)))
    bad = np.zeros((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"text_emb has 1 non-finite.*row 2, column 1"):
        retrieval_metrics_from_embeddings(bad, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics_from_embeddings(np.zeros(5), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-square"):
        retrieval_metrics_from_embeddings(np.zeros((6, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="1 of 3 videos have no caption"):
        retrieval_metrics_from_embeddings(np.zeros((4, 3)), np.zeros((3, 3)), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics_from_embeddings(np.zeros((3, 3)), np.zeros((3, 3)), chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_from_embeddings_on_cuda_matches_cpu():
    rng = np.random.default_rng(14)
    text, video, t2v = _embeddings(40, rng.integers(1, 4, size=40), rng, levels=3)
    for v2t in ("best", "maxpool"):
        want = retrieval_metrics_from_embeddings(text, video, t2v, v2t=v2t)
        got = retrieval_metrics_from_embeddings(torch.from_numpy(text).cuda(), torch.from_numpy(video).cuda(),
                                                t2v, v2t=v2t, chunk_size=16)
        assert got == want


def test_custom_recall_ks_r50():
    rng = np.random.default_rng(15)
    sim = rng.standard_normal((80, 80))
    m = retrieval_metrics(sim, ks=(1, 5, 50))
    assert set(m["t2v"]) == {"R@1", "R@5", "R@50", "MdR", "MnR"}
    ranks = [1 + int((sim[i] > sim[i, i]).sum()) for i in range(80)]
    assert m["t2v"]["R@50"] == pytest.approx(100 * np.mean([r <= 50 for r in ranks]))
    assert m["t2v"]["R@5"] == retrieval_metrics(sim)["t2v"]["R@5"]
    text, video = rng.standard_normal((80, 4)), rng.standard_normal((80, 4))
    assert retrieval_metrics_from_embeddings(text, video, ks=(1, 50)) == retrieval_metrics(text @ video.T, ks=(1, 50))
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(sim, ks=(0,))

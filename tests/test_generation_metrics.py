"""FID / KID / IS / R-precision against independent float64 references and closed forms."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

import evaluation
from evaluation import generation as gen
from evaluation import generation_cli


def _rng(seed=0):
    return np.random.default_rng(seed)


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ----------------------------------------------------------------------------------- references


def _denman_beavers_sqrtm(a, iters=100):
    """Matrix square root of a (non-symmetric, positive-spectrum) matrix by Denman-Beavers iteration."""
    y, z = a.copy(), np.eye(a.shape[0])
    for _ in range(iters):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    return y


def _ref_frechet(mu1, s1, mu2, s2):
    root = _denman_beavers_sqrtm(s1 @ s2)
    np.testing.assert_allclose(root @ root, s1 @ s2, rtol=1e-8, atol=1e-10)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def _ref_cov(x):
    n = x.shape[0]
    mu = [sum(x[i, j] for i in range(n)) / n for j in range(x.shape[1])]
    return np.array([[sum((x[i, j] - mu[j]) * (x[i, k] - mu[k]) for i in range(n)) / (n - 1)
                      for k in range(x.shape[1])] for j in range(x.shape[1])]), np.array(mu)


def _ref_mmd2_unbiased(x, y, degree, gamma, coef0):
    m, d = x.shape
    gamma = 1.0 / d if gamma is None else gamma

    def k(u, v):
        return (gamma * sum(u[t] * v[t] for t in range(d)) + coef0) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def _ref_inception_score(p, splits):
    n, c = p.shape
    scores = []
    for s in range(splits):
        rows = range(s * n // splits, (s + 1) * n // splits)
        py = [sum(p[i, j] for i in rows) / len(rows) for j in range(c)]
        kl = [sum(p[i, j] * math.log(p[i, j] / py[j]) for j in range(c) if p[i, j] > 0) for i in rows]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


# ----------------------------------------------------------------------------------------- FID


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_denman_beavers_reference(method):
    rng = _rng(1)
    for d in (1, 3, 12):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _spd(rng, d), _spd(rng, d, scale=2.0)
        got = gen.frechet_distance(mu1, s1, mu2, s2, method=method)
        assert got == pytest.approx(_ref_frechet(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method):
    # diagonal covariances: sum (sqrt a - sqrt b)^2 + ||mu1 - mu2||^2
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 0.25, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + 1.0 + 4.0
    assert gen.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-12)
    # scalars are promoted like pytorch-fid (atleast_1d / atleast_2d): N(0, 4) vs N(3, 1) -> 9 + (2 - 1)^2
    assert gen.frechet_distance(0.0, 4.0, 3.0, 1.0, method=method) == pytest.approx(10.0)


def test_frechet_distance_accepts_tensors():
    rng = _rng(2)
    mu1, mu2, s1, s2 = rng.standard_normal(5), rng.standard_normal(5), _spd(rng, 5), _spd(rng, 5)
    as_t = [torch.tensor(v, dtype=torch.float32) for v in (mu1, s1, mu2, s2)]
    assert gen.frechet_distance(*as_t) == pytest.approx(gen.frechet_distance(mu1, s1, mu2, s2), rel=1e-5)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_from_features_statistics_and_analytic_cases(method):
    rng = _rng(3)
    a = rng.standard_normal((9, 3)) @ rng.standard_normal((3, 3))
    b = rng.standard_normal((7, 3)) + 0.5
    s_a, mu_a = _ref_cov(a)
    s_b, mu_b = _ref_cov(b)
    assert gen.fid_from_features(a, b, method=method) == pytest.approx(_ref_frechet(mu_a, s_a, mu_b, s_b), rel=1e-9)
    mu, sigma = gen.feature_statistics(a)
    np.testing.assert_allclose(mu, mu_a, rtol=1e-12)
    np.testing.assert_allclose(sigma, s_a, rtol=1e-12)

    x = rng.standard_normal((200, 8))
    assert abs(gen.fid_from_features(x, x, method=method)) < 1e-8
    # a translation keeps the covariance: FID = ||c||^2 exactly
    c = rng.standard_normal(8)
    assert gen.fid_from_features(x, x + c, method=method) == pytest.approx(c @ c, rel=1e-9)
    # a scaling s x: covariance s^2 S, so FID = (1-s)^2 (||mu||^2 + Tr S)
    s = 1.7
    sx, mux = _ref_cov(x[:30])
    expected = (1 - s) ** 2 * (mux @ mux + np.trace(sx))
    assert gen.fid_from_features(x[:30], s * x[:30], method=method) == pytest.approx(expected, rel=1e-9)


def test_fid_methods_agree_including_singular_covariances():
    rng = _rng(4)
    for n, m, d in ((300, 250, 16), (20, 30, 64), (10, 10, 40)):
        a = rng.standard_normal((n, d))
        b = 1.3 * rng.standard_normal((m, d)) + 0.2
        exact = gen.fid_from_features(a, b, method="eigh")
        robust = gen.fid_from_features(a, b, method="sqrtm")
        assert np.isfinite(exact) and np.isfinite(robust)
        assert robust == pytest.approx(exact, rel=1e-6)
        assert exact > 0


def test_sqrtm_retries_with_eps_when_product_is_not_finite(monkeypatch):
    rng = _rng(5)
    a, b = rng.standard_normal((6, 10)), rng.standard_normal((7, 10)) + 1.0
    calls = []
    real_sqrtm = gen._sqrtm

    def flaky(x):
        calls.append(x.copy())
        return np.full_like(x, np.nan) if len(calls) == 1 else real_sqrtm(x)

    monkeypatch.setattr(gen, "_sqrtm", flaky)
    with pytest.warns(RuntimeWarning, match="adding 0.001"):
        got = gen.fid_from_features(a, b, eps=1e-3)
    mu1, s1 = gen.feature_statistics(a)
    mu2, s2 = gen.feature_statistics(b)
    offset = 1e-3 * np.eye(10)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    # the retry changes only the square-root term, so it sits close to the exact value
    assert got == pytest.approx(gen.fid_from_features(a, b, method="eigh"), rel=1e-2)


def test_sqrtm_imaginary_component(monkeypatch):
    mu, s = np.zeros(2), np.eye(2)
    monkeypatch.setattr(gen, "_sqrtm", lambda x: x.astype(complex) + 1e-6j)
    assert gen.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(gen, "_sqrtm", lambda x: x.astype(complex) + 0.5j)
    with pytest.raises(ValueError, match="imaginary component of magnitude 0.5"):
        gen.frechet_distance(mu, s, mu, s)


def test_fid_bad_inputs():
    rng = _rng(6)
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(5, 4\)"):
        gen.fid_from_features(rng.standard_normal((5, 3)), rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match=r"at least 2 .*\(1, 3\)"):
        gen.fid_from_features(rng.standard_normal((1, 3)), rng.standard_normal((5, 3)))
    with pytest.raises(ValueError, match="'cholesky'"):
        gen.fid_from_features(rng.standard_normal((5, 3)), rng.standard_normal((5, 3)), method="cholesky")
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        gen.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 2\)"):
        gen.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    bad = rng.standard_normal((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        gen.fid_from_features(bad, rng.standard_normal((5, 3)))


# ----------------------------------------------------------------------------------------- KID


@pytest.mark.parametrize("degree,gamma,coef0", [(3, None, 1.0), (1, 1.0, 0.0), (2, 0.5, 2.0)])
def test_kid_matches_double_loop_reference(degree, gamma, coef0):
    rng = _rng(7)
    a, b = rng.standard_normal((12, 4)), rng.standard_normal((10, 4)) + 0.3
    got_mean, got_std = gen.kid_from_features(a, b, num_subsets=3, subset_size=6, degree=degree, gamma=gamma,
                                              coef0=coef0, seed=11)
    # same subset draws as torch-fidelity: one RandomState, a's rows then b's per subset
    state = np.random.RandomState(11)
    values = []
    for _ in range(3):
        ia = state.choice(12, 6, replace=False)
        ib = state.choice(10, 6, replace=False)
        values.append(_ref_mmd2_unbiased(a[ia], b[ib], degree, gamma, coef0))
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert got_mean == pytest.approx(mean, rel=1e-10)
    assert got_std == pytest.approx(std, rel=1e-8)


def test_kid_linear_kernel_full_set_closed_form():
    # linear kernel x.y on the full sets: MMD^2_u = (|S_x|^2 - sum|x_i|^2)/(m(m-1)) + (same for y) - 2 S_x.S_y/m^2
    rng = _rng(8)
    x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
    sx, sy = x.sum(0), y.sum(0)
    expected = ((sx @ sx - (x * x).sum()) + (sy @ sy - (y * y).sum())) / 56 - 2 * (sx @ sy) / 64
    mean, std = gen.kid_from_features(x, y, num_subsets=2, subset_size=8, degree=1, gamma=1.0, coef0=0.0)
    assert mean == pytest.approx(expected, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_kid_same_distribution_near_zero_and_shift_detected():
    rng = _rng(9)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same_mean, same_std = gen.kid_from_features(a, b, num_subsets=20, subset_size=200)
    shift_mean, _ = gen.kid_from_features(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 0.01 and same_std < 0.01
    assert shift_mean > 0.1
    # identical sets: ~0 while the two subsets rarely share rows (a shared row puts its large k(x, x)
    # into the cross term and biases the estimate down)
    big = rng.standard_normal((4000, 16))
    assert abs(gen.kid_from_features(big, big, num_subsets=20, subset_size=100)[0]) < 0.01


def test_kid_bad_inputs():
    rng = _rng(10)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((40, 4))
    with pytest.raises(ValueError, match=r"\[2, 40\].*N=50, M=40.*got 1000"):
        gen.kid_from_features(a, b)
    with pytest.raises(ValueError, match="num_subsets must be >= 1, got 0"):
        gen.kid_from_features(a, b, num_subsets=0, subset_size=10)
    with pytest.raises(ValueError, match=r"\(50, 4\).*\(40, 3\)"):
        gen.kid_from_features(a, b[:, :3], subset_size=10)


# ------------------------------------------------------------------------------------------ IS


def test_inception_score_analytic_values():
    c = 7
    one_hot = np.eye(c)[np.arange(5 * c) % c]
    assert gen.inception_score(one_hot) == pytest.approx((c, 0.0))
    # 5 splits of one row per class each: every split is also uniform one-hot
    assert gen.inception_score(one_hot, splits=5) == pytest.approx((c, 0.0))
    rng = _rng(11)
    row = rng.dirichlet(np.ones(c))
    assert gen.inception_score(np.tile(row, (20, 1)), splits=4) == pytest.approx((1.0, 0.0))


def test_inception_score_matches_loop_reference():
    rng = _rng(12)
    p = rng.dirichlet(0.3 * np.ones(6), size=23)
    p[3] = np.eye(6)[2]  # exact zeros: 0 log 0 = 0
    for splits in (1, 3, 10):
        mean, std = gen.inception_score(p, splits=splits)
        ref_mean, ref_std = _ref_inception_score(p, splits)
        assert mean == pytest.approx(ref_mean, rel=1e-12)
        assert std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
    perm = np.random.RandomState(2020).permutation(23)
    assert gen.inception_score(p, splits=3, shuffle_seed=2020) == pytest.approx(_ref_inception_score(p[perm], 3))
    assert gen.inception_score(torch.tensor(p), splits=3) == pytest.approx(_ref_inception_score(p, 3))


def test_inception_score_bad_inputs():
    rng = _rng(13)
    logits = rng.standard_normal((10, 4))
    with pytest.raises(ValueError, match="non-negative"):
        gen.inception_score(logits)
    p = rng.dirichlet(np.ones(4), size=10)
    p[6] *= 1.5
    with pytest.raises(ValueError, match="row 6 sums to 1.5"):
        gen.inception_score(p)
    with pytest.raises(ValueError, match=r"\[1, 10\], got 11"):
        gen.inception_score(rng.dirichlet(np.ones(4), size=10), splits=11)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        gen.inception_score(np.ones(10) / 10)


# --------------------------------------------------------------------------------- R-precision


def test_mismatched_indices_exclude_own_label_and_cover_the_rest():
    labels = np.array([3, 1, 3, 2, 1, 3, 0, 2])
    idx = gen._mismatched_indices(labels, 4000, np.random.default_rng(0))
    assert idx.shape == (8, 4000)
    for i in range(8):
        allowed = [j for j in range(8) if labels[j] != labels[i]]
        counts = np.bincount(idx[i], minlength=8)
        assert set(np.flatnonzero(counts)) == set(allowed)
        # uniform over the allowed rows
        np.testing.assert_allclose(counts[allowed] / 4000, 1 / len(allowed), atol=0.03)
    with pytest.raises(ValueError, match="all 3 rows share label 5"):
        gen._mismatched_indices(np.array([5, 5, 5]), 2, np.random.default_rng(0))


@pytest.mark.parametrize("ties", ["average", "optimistic", "pessimistic"])
def test_r_precision_matches_loop_reference(ties):
    rng = _rng(14)
    n, d, k = 37, 5, 8
    text = rng.standard_normal((n, d))
    image = text + 1.2 * rng.standard_normal((n, d))
    # quantize so that exact ties occur and the tie rules matter
    image, text = np.round(image), np.round(text)
    labels = rng.integers(0, 6, n)
    got = gen.r_precision(image, text, num_candidates=k, splits=4, labels=labels, seed=3, ties=ties, chunk_size=5)

    ref_rng = np.random.default_rng(3)
    cand = gen._mismatched_indices(labels, k - 1, ref_rng)

    def cos(u, v):
        return sum(u * v) / max(math.sqrt(sum(u * u)) * math.sqrt(sum(v * v)), 1e-8)

    hits = []
    for i in range(n):
        true = cos(image[i], text[i])
        others = [cos(image[i], text[j]) for j in cand[i]]
        assert all(labels[j] != labels[i] for j in cand[i])
        better = sum(o > true + 1e-12 for o in others)
        tied = sum(abs(o - true) <= 1e-12 for o in others)
        if better:
            hits.append(0.0)
        elif ties == "optimistic":
            hits.append(1.0)
        elif ties == "pessimistic":
            hits.append(0.0 if tied else 1.0)
        else:
            hits.append(1.0 / (1 + tied))
    hits = np.array(hits)[ref_rng.permutation(n)]
    parts = [hits[s * n // 4:(s + 1) * n // 4].mean() for s in range(4)]
    assert got[0] == pytest.approx(float(np.mean(parts)), abs=1e-12)
    assert got[1] == pytest.approx(float(np.std(parts)), abs=1e-12)


def test_r_precision_analytic_cases():
    rng = _rng(15)
    x = rng.standard_normal((300, 32))
    assert gen.r_precision(x, 3.0 * x) == (1.0, 0.0)  # cosine ignores scale
    const = np.ones((50, 4))
    assert gen.r_precision(const, const, num_candidates=10, splits=5) == pytest.approx((0.1, 0.0))
    assert gen.r_precision(const, const, num_candidates=10, ties="optimistic") == (1.0, 0.0)
    assert gen.r_precision(const, const, num_candidates=10, ties="pessimistic") == (0.0, 0.0)
    # unrelated embeddings: chance level 1 / num_candidates
    mean, std = gen.r_precision(rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16)), num_candidates=10)
    assert mean == pytest.approx(0.1, abs=0.025)
    assert 0 < std < 0.05


def test_r_precision_bad_inputs():
    rng = _rng(16)
    x = rng.standard_normal((20, 4))
    with pytest.raises(ValueError, match=r"\(20, 4\) and \(19, 4\)"):
        gen.r_precision(x, x[:19])
    with pytest.raises(ValueError, match=r"num_candidates must be >= 2 .*got 1"):
        gen.r_precision(x, x, num_candidates=1)
    with pytest.raises(ValueError, match=r"\[1, 20\], got 21"):
        gen.r_precision(x, x, splits=21)
    with pytest.raises(ValueError, match="'best'"):
        gen.r_precision(x, x, ties="best")
    with pytest.raises(ValueError, match=r"labels must have shape \(20,\), got \(3,\)"):
        gen.r_precision(x, x, labels=[0, 1, 2])


def test_package_exports():
    for name in ("frechet_distance", "fid_from_features", "kid_from_features", "inception_score", "r_precision"):
        assert getattr(evaluation, name) is getattr(gen, name)


# ----------------------------------------------------------------------------------------- CLI


def _cli(argv):
    parser = argparse.ArgumentParser()
    generation_cli.add_arguments(parser)
    return generation_cli.run(parser.parse_args(argv))


def test_cli_end_to_end(tmp_path, capsys):
    rng = _rng(17)
    real, fake = rng.standard_normal((60, 6)), rng.standard_normal((50, 6)) + 0.2
    probs = rng.dirichlet(np.ones(5), size=50)
    img, txt = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    for name, arr in dict(real=real, fake=fake, probs=probs, img=img, txt=txt).items():
        np.save(tmp_path / f"{name}.npy", arr)
    out = tmp_path / "m" / "metrics.json"
    rc = _cli(["--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "fake.npy"),
               "--probs", str(tmp_path / "probs.npy"), "--image-emb", str(tmp_path / "img.npy"),
               "--text-emb", str(tmp_path / "txt.npy"), "--kid-subsets", "5", "--kid-subset-size", "30",
               "--is-splits", "5", "--rp-candidates", "10", "--rp-splits", "4", "--seed", "1", "--out", str(out)])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["fid"] == pytest.approx(gen.fid_from_features(real, fake))
    assert (metrics["kid_mean"], metrics["kid_std"]) == pytest.approx(
        gen.kid_from_features(real, fake, num_subsets=5, subset_size=30, seed=1))
    assert (metrics["is_mean"], metrics["is_std"]) == pytest.approx(gen.inception_score(probs, splits=5))
    assert (metrics["r_precision_mean"], metrics["r_precision_std"]) == pytest.approx(
        gen.r_precision(img, txt, num_candidates=10, splits=4, seed=1))
    assert (metrics["num_real"], metrics["num_fake"]) == (60, 50)
    table = capsys.readouterr().out
    assert table.startswith("| metric | value | std |")
    assert f"| FID | {metrics['fid']:.4f} |" in table

    # precomputed pytorch-fid statistics for the real side: FID only
    mu, sigma = gen.feature_statistics(real)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    out2 = tmp_path / "fid.json"
    assert _cli(["--real", str(tmp_path / "stats.npz"), "--fake", str(tmp_path / "fake.npy"),
                 "--fid-method", "eigh", "--out", str(out2)]) == 0
    only_fid = json.loads(out2.read_text())
    assert set(only_fid) == {"fid", "num_fake", "warnings"}
    assert "KID and precision/recall skipped" in only_fid["warnings"][0]
    assert only_fid["fid"] == pytest.approx(metrics["fid"], rel=1e-9)

    with pytest.raises(ValueError, match="nothing to evaluate"):
        _cli([])


def test_cli_fewer_samples_than_the_protocols_keeps_every_metric(tmp_path):
    """50 features < KID's 1000 and 5 probs < IS's 10 splits: FID, KID, IS, P/R all there, with warnings."""
    rng = _rng(3)
    real, fake = rng.standard_normal((60, 6)), rng.standard_normal((50, 6)) + 0.2
    probs = rng.dirichlet(np.ones(4), size=5)
    for name, arr in dict(real=real, fake=fake, probs=probs).items():
        np.save(tmp_path / f"{name}.npy", arr)
    out = tmp_path / "m.json"
    with pytest.warns(RuntimeWarning, match="subset size 1000 exceeds"):
        _cli(["--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "fake.npy"), "--probs",
              str(tmp_path / "probs.npy"), "--kid-subsets", "3", "--out", str(out)])
    m = json.loads(out.read_text())
    assert m["fid"] == pytest.approx(gen.fid_from_features(real, fake))
    assert m["kid_subset_size"] == 50
    assert (m["kid_mean"], m["kid_std"]) == pytest.approx(gen.kid_from_features(real, fake, 3, 50, seed=0))
    assert m["is_splits"] == 5 and m["is_mean"] == pytest.approx(gen.inception_score(probs, 5)[0])
    assert (m["precision"], m["recall"]) == pytest.approx(gen.precision_recall(real, fake))
    assert len(m["warnings"]) == 2 and "IS: 10 splits" in m["warnings"][1]


# ------------------------------------------------------------------------------ precision / recall


def _pr_loop(real, fake, k):
    """Kynkaenniemi et al. 2019 Eq. 1-3 with explicit loops in float64."""
    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return out

    def covered(q, ref, rad):
        return np.mean([any(np.sqrt(((p - ref[j]) ** 2).sum()) <= rad[j] for j in range(len(ref))) for p in q])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_loop_reference(k):
    rng = _rng(5)
    real = rng.standard_normal((30, 4))
    fake = rng.standard_normal((25, 4)) * 0.6 + 1.5
    p, r = gen.precision_recall(real, fake, k=k, chunk_size=7)
    assert (p, r) == pytest.approx(_pr_loop(real, fake, k), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_analytic_cases():
    rng = _rng(6)
    real = rng.standard_normal((40, 3))
    assert gen.precision_recall(real, real) == (1.0, 1.0)
    assert gen.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # mode collapse: fakes are copies of a few reals -> every fake is on the real manifold, few reals covered
    collapsed = np.repeat(real[:2], 10, axis=0) + 1e-9 * rng.standard_normal((20, 3))
    p, r = gen.precision_recall(real, collapsed)
    assert p == 1.0 and r <= 0.2
    with pytest.raises(ValueError, match="more than k rows"):
        gen.precision_recall(real[:3], real[:3], k=3)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        gen.precision_recall(real, real[:, :2])


def test_cmgen_eval_generation_dispatch(tmp_path):
    from cmgen.cli import main

    np.save(tmp_path / "probs.npy", np.eye(4)[np.arange(40) % 4])
    out = tmp_path / "is.json"
    assert main(["eval", "generation", "--probs", str(tmp_path / "probs.npy"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["is_mean"] == pytest.approx(4.0)


# ------------------------------------------------------------ R-precision with the shapes dual encoder


@pytest.mark.slow
def test_shapes_dual_encoder_rprecision_real_high_shuffled_chance(tmp_path, monkeypatch):
    """Real val images with their own captions rank their caption first far above chance (1/100);
    with the captions shuffled they fall to about chance. One-off training shrunk for the test."""
    from cmgen.data import write_shapes
    from evaluation import rprecision

    root = tmp_path / "shapes"
    write_shapes(root, num_images=256, image_size=32, seed=0, progress=False)
    enc = rprecision.load_or_train_shapes_encoder(root, train_images=1000, epochs=6)
    assert enc.info["note"] == rprecision.NOT_COMPARABLE and enc.info["file"].endswith("dual_encoder_32px.pt")
    images, captions, index = rprecision._load_pairs(root, "val", 32)      # 32 images x 5 captions
    real = rprecision.rprecision_of_pairs(enc, images[index], captions, index, splits=1)
    perm = np.random.default_rng(0).permutation(len(captions))
    shuffled = rprecision.rprecision_of_pairs(enc, images[index], [captions[i] for i in perm], index[perm], splits=1)
    assert real["r_precision_mean"] > 0.3 and real["r_precision_candidates"] == 100
    assert shuffled["r_precision_mean"] < 0.06
    assert enc.info["real_val_r_precision"] == pytest.approx(real["r_precision_mean"], abs=0.1)
    # cached: a second call loads the same file without training
    again = rprecision.load_or_train_shapes_encoder(root, train_images=1000, epochs=6)
    assert again.info["sha256"] == enc.info["sha256"]
    np.testing.assert_allclose(again.embed_texts(captions[:3]), enc.embed_texts(captions[:3]), atol=1e-6)


def test_word_vocab_pads_and_marks_unknown_words():
    from evaluation.rprecision import WordVocab

    v = WordVocab.from_captions(["a red circle", "a blue square in the top left"])
    ids, lengths = v.encode(["a red circle", "a pink circle in the top left"])
    assert ids.shape == (2, 7) and lengths.tolist() == [3, 7]
    assert ids[0, 3:].eq(0).all() and ids[1, 1] == 1          # padding 0, unknown "pink" 1
    assert ids[0, 2] == ids[1, 2] == v.index["circle"]


def write_tiny_clip(folder) -> None:
    """A tiny random CLIP saved with save_pretrained into ``folder`` (tokenizer: the packaged MiniLM's)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from text2image.text_encoder import default_text_encoder_path

    tok = AutoTokenizer.from_pretrained(str(default_text_encoder_path()), local_files_only=True)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=tok.vocab_size, max_position_embeddings=40,
                                      eos_token_id=tok.sep_token_id, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_clip_dual_encoder_from_a_local_folder(tmp_path):
    """A tiny random CLIP loads offline and embeds images and captions into one unit-norm space, as the
    model's own get_*_features do."""
    from evaluation import rprecision

    write_tiny_clip(tmp_path)
    enc = rprecision.load_dual_encoder(str(tmp_path))
    assert isinstance(enc, rprecision.CLIPDualEncoder) and enc.info["sha256"]
    images = torch.rand(3, 3, 64, 64)
    captions = ["a red circle", "a large blue square in the top left", "a star"]
    ie, te = enc.embed_images(images), enc.embed_texts(captions)
    assert ie.shape == te.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(ie, axis=1), 1.0, rtol=1e-5)
    x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - enc.mean) / enc.std
    with torch.no_grad():
        ref = enc.model.visual_projection(enc.model.vision_model(pixel_values=x).pooler_output)
        ref = torch.nn.functional.normalize(ref, dim=-1)
    np.testing.assert_allclose(ie, ref.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="no config.json"):
        rprecision.load_dual_encoder(str(tmp_path / "missing"))

"""Generation metrics from saved features: FID, KID, Inception Score and R-precision.

Everything is computed in numpy float64 from features someone else extracted (Inception-v3 pool3
activations for FID/KID, Inception softmax outputs for IS, DAMSM-style image/sentence embeddings for
R-precision); the feature extractors are not part of this module. Tensors are accepted and copied to
float64 numpy arrays.

References followed (behaviour, not code):

- FID: Heusel et al. 2017, Eq. (6); ``pytorch-fid`` ``calculate_frechet_distance`` and
  ``calculate_activation_statistics`` (mean, ``np.cov(rowvar=False)``, scipy ``sqrtm`` with an eps*I
  retry and a tolerated small imaginary part).
- KID: Binkowski et al. 2018 (Demystifying MMD GANs), unbiased MMD^2 with the cubic polynomial kernel
  over random subsets; ``torch-fidelity`` ``metric_kid.py`` (defaults 100 subsets of 1000, error when a
  subset is larger than a feature set, mean and population std over subsets).
- IS: Salimans et al. 2016; openai ``improved-gan`` ``inception_score/model.py`` (contiguous splits,
  exp of the mean KL per split, mean and population std over splits); ``torch-fidelity``
  ``metric_isc.py`` additionally shuffles the rows first (``shuffle_seed``).
- Precision / recall: Kynkäänniemi et al. 2019 (Improved Precision and Recall Metric), Sec. 3 with
  k = 3; NVlabs ``stylegan2-ada-pytorch`` ``metrics/precision_recall.py`` (k-th nearest-neighbour radius
  within a set, the point itself excluded; a sample is covered when it lies within the radius of ANY
  sample of the other set, ``dist <= radius``).
- R-precision: Xu et al. 2018 (AttnGAN) Sec. 4; the DM-GAN evaluation code (one true caption against
  99 mismatched captions of other classes, cosine similarity, hits shuffled and split into 10 parts).
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "polynomial_kernel",
    "mmd2_unbiased",
    "kid_from_features",
    "inception_score",
    "precision_recall",
    "r_precision",
]


def _as_float64(x, name: str, ndim: int | None) -> np.ndarray:
    """Copy a numpy array / torch tensor / nested list to a finite float64 array (``ndim`` None: any)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return arr


def _split_bounds(n: int, splits: int) -> list[tuple[int, int]]:
    """Contiguous parts ``[i n // splits, (i + 1) n // splits)`` as in improved-gan / torch-fidelity."""
    return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]


# --------------------------------------------------------------------------------------------- FID


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features (pytorch-fid ``calculate_activation_statistics``).

    Args:
        features: (N, D), N >= 2.

    Returns:
        ``(mu (D,), sigma (D, D))`` in float64; sigma = ``np.cov(features, rowvar=False)`` (divides by N-1).
    """
    f = _as_float64(features, "features", 2)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # pytorch-fid called sqrtm(..., disp=False), which kept scipy quiet about (near-)singular products;
    # that argument is deprecated since scipy 1.16, so silence the same warning here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues are clipped to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "sqrtm", eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID, Heusel et al. 2017, Eq. 6).

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})

    ``method="sqrtm"`` (default, reproduces pytorch-fid): ``scipy.linalg.sqrtm(sigma1 @ sigma2)``; if
    that is not finite, retry on ``(sigma1 + eps I)(sigma2 + eps I)``; an imaginary part from round-off
    is dropped when the diagonal's imaginary part is within 1e-3 of 0, otherwise ``ValueError``.

    ``method="eigh"``: exact and faster for symmetric PSD inputs. sigma1 sigma2 is similar to the
    symmetric PSD matrix M = sigma1^{1/2} sigma2 sigma1^{1/2}, so Tr (sigma1 sigma2)^{1/2} =
    sum_i sqrt(lambda_i(M)), with round-off negative eigenvalues clipped to 0. Never complex, needs
    no eps for singular covariances (N < D).

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
        method: "sqrtm" or "eigh".
        eps: diagonal offset of the "sqrtm" retry.

    Returns:
        The squared Fréchet distance as a Python float (what papers report as FID).
    """
    mu1 = np.atleast_1d(_as_float64(mu1, "mu1", None))
    mu2 = np.atleast_1d(_as_float64(mu2, "mu2", None))
    sigma1 = np.atleast_2d(_as_float64(sigma1, "sigma1", None))
    sigma2 = np.atleast_2d(_as_float64(sigma2, "sigma2", None))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}) for means of length {d}, "
                         f"got {sigma1.shape} and {sigma2.shape}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    diff = mu1 - mu2
    if method == "sqrtm":
        covmean = _sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            warnings.warn(f"frechet_distance: singular product sigma1 @ sigma2; adding {eps} to the "
                          "diagonal of both covariances (as pytorch-fid)", RuntimeWarning, stacklevel=2)
            covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of magnitude "
                                 f"{np.max(np.abs(covmean.imag)):.3g}; try method='eigh'")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    elif method == "eigh":
        root1 = _psd_sqrt(sigma1)
        m = root1 @ sigma2 @ root1
        tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(a, b, *, method: str = "sqrtm", eps: float = 1e-6) -> float:
    """FID between two feature sets: Fréchet distance of their means and unbiased covariances.

    Args:
        a: (N, D) features of one set (e.g. real images), N >= 2.
        b: (M, D) features of the other set, M >= 2.
        method, eps: see :func:`frechet_distance`.

    Returns:
        FID as a float. Symmetric in (a, b) up to round-off.
    """
    a = _as_float64(a, "a", 2)
    b = _as_float64(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: a {a.shape}, b {b.shape}")
    mu1, sigma1 = feature_statistics(a)
    mu2, sigma2 = feature_statistics(b)
    return frechet_distance(mu1, sigma1, mu2, sigma2, method=method, eps=eps)


# --------------------------------------------------------------------------------------------- KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef0)^degree with gamma = 1/D by default (Binkowski et al. 2018, KID).

    Shape: x (N, D), y (M, D) -> (N, M).
    """
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 estimate from kernel matrices of two samples of equal size m.

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2

    (Binkowski et al. 2018, Eq. 4 with the cross term over all pairs, as torch-fidelity
    ``mmd2(mmd_est="unbiased")``.) Shapes: all (m, m), m >= 2.
    """
    m = k_xx.shape[0]
    if m < 2 or k_xx.shape != (m, m) or k_xy.shape != (m, m) or k_yy.shape != (m, m):
        raise ValueError(f"kernel matrices must all be (m, m) with m >= 2, got {k_xx.shape}, "
                         f"{k_xy.shape}, {k_yy.shape}")
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid_from_features(a, b, num_subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                      gamma: float | None = None, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a polynomial kernel over random subsets.

    For each of ``num_subsets`` subsets, ``subset_size`` rows of a and of b are drawn without replacement
    (``np.random.RandomState(seed).choice``, a's rows then b's, as torch-fidelity — ``seed=2020``
    reproduces torch-fidelity's default subsets) and :func:`mmd2_unbiased` of the kernel
    (x.y / D + 1)^3 is computed. Like torch-fidelity, a ``subset_size`` larger than either set is an
    error (clean-fid silently shrinks it instead); pass ``subset_size=min(N, M)`` for small sets.

    Args:
        a: (N, D) features, b: (M, D) features.
        num_subsets: number of subsets (>= 1).
        subset_size: rows per subset, 2 <= subset_size <= min(N, M).
        degree, gamma, coef0: polynomial kernel (gamma None = 1/D).
        seed: subset sampling seed.

    Returns:
        ``(mean, std)`` over subsets, std with ddof=0 (torch-fidelity). The estimate is unbiased, so it
        can be slightly negative when the sets come from the same distribution.
    """
    a = _as_float64(a, "a", 2)
    b = _as_float64(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: a {a.shape}, b {b.shape}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    n, m = a.shape[0], b.shape[0]
    if subset_size < 2 or subset_size > min(n, m):
        raise ValueError(f"subset_size must be in [2, min(N, M)] = [2, {min(n, m)}] "
                         f"(N={n}, M={m}), got {subset_size}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(num_subsets)
    for s in range(num_subsets):
        x = a[rng.choice(n, subset_size, replace=False)]
        y = b[rng.choice(m, subset_size, replace=False)]
        mmds[s] = mmd2_unbiased(polynomial_kernel(x, x, degree, gamma, coef0),
                                polynomial_kernel(x, y, degree, gamma, coef0),
                                polynomial_kernel(y, y, degree, gamma, coef0))
    return float(mmds.mean()), float(mmds.std())


# ---------------------------------------------------------------------------------------------- IS


def inception_score(probs, splits: int = 1, *, shuffle_seed: int | None = None,
                    atol: float = 1e-3) -> tuple[float, float]:
    """Inception Score IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), per split.

    The N rows are cut into ``splits`` contiguous parts (improved-gan); in each part p(y) is the mean of
    its rows and IS_part = exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))), with 0 log 0 = 0. The
    published protocol is 50k samples in 10 splits; torch-fidelity also shuffles the rows first with
    seed 2020 — ``shuffle_seed=2020`` reproduces that, ``None`` keeps the given order (improved-gan).

    Args:
        probs: (N, C) class probabilities (softmax outputs), rows summing to 1 within ``atol``.
        splits: number of parts, 1 <= splits <= N.
        shuffle_seed: permute rows with ``np.random.RandomState(shuffle_seed)`` first, or ``None``.
        atol: tolerance of the row-sum check.

    Returns:
        ``(mean, std)`` over splits, std with ddof=0 (0.0 for one split).
    """
    p = _as_float64(probs, "probs", 2)
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N] = [1, {n}], got {splits}")
    if (p < 0).any():
        raise ValueError(f"probs must be non-negative, min is {p.min():.3g}")
    row_sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > atol:
        raise ValueError(f"probs rows must sum to 1 (softmax outputs, not logits); row {worst} sums to "
                         f"{row_sums[worst]:.6g}")
    if shuffle_seed is not None:
        p = p[np.random.RandomState(shuffle_seed).permutation(n)]
    scores = []
    for lo, hi in _split_bounds(n, splits):
        part = p[lo:hi]
        py = part.mean(axis=0, keepdims=True)
        # p log(p / p(y)) with 0 log 0 = 0; p(y) > 0 wherever p(y|x) > 0
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0)) -
                                        np.log(np.where(part > 0, py, 1.0))), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())


# ------------------------------------------------------------------------------ precision / recall


def _kth_radius(x: "torch.Tensor", k: int, chunk: int) -> "torch.Tensor":
    """Squared distance of every row of x to its k-th nearest other row: (N,)."""
    import torch

    out = []
    for lo in range(0, x.shape[0], chunk):
        d = torch.cdist(x[lo:lo + chunk], x).square()
        # column 0 of the sorted row is the point itself (distance 0): index k is the k-th neighbour
        out.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(out)


def _coverage(query: "torch.Tensor", ref: "torch.Tensor", radii: "torch.Tensor", chunk: int) -> float:
    """Fraction of query rows within the (squared) radius of at least one ref row."""
    import torch

    hits = []
    for lo in range(0, query.shape[0], chunk):
        d = torch.cdist(query[lo:lo + chunk], ref).square()
        hits.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(hits).double().mean())


def precision_recall(real, fake, k: int = 3, *, chunk_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-3) with k-NN manifolds.

        f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)|| for some phi' in Phi, else 0
        precision = mean_{fake g} f(g, Phi_real)        recall = mean_{real r} f(r, Phi_fake)

    ``NN_k`` is the k-th nearest neighbour within the set, the point itself excluded. Distances are
    computed in float64, ``chunk_size`` rows at a time (memory chunk_size x N).

    Args:
        real: (N, D) features of real images (the paper: VGG-16 fc2; StyleGAN2-ADA uses the same, 50k).
        fake: (M, D) features of generated images; N, M > k.
        k: neighbourhood size (paper: 3).

    Returns:
        ``(precision, recall)`` in [0, 1].
    """
    import torch

    r = torch.from_numpy(_as_float64(real, "real", 2))
    f = torch.from_numpy(_as_float64(fake, "fake", 2))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {tuple(r.shape)}, fake {tuple(f.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} need more than k rows in each set, got "
                         f"{r.shape[0]} real and {f.shape[0]} fake")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    precision = _coverage(f, r, _kth_radius(r, k, chunk_size), chunk_size)
    recall = _coverage(r, f, _kth_radius(f, k, chunk_size), chunk_size)
    return precision, recall


# ------------------------------------------------------------------------------------- R-precision


def _mismatched_indices(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """For every row i, ``count`` indices drawn uniformly WITH replacement from rows j with
    labels[j] != labels[i]. Rows sorted by label make each row's excluded set one contiguous block,
    so a uniform draw over the N - block_size allowed positions just skips that block.

    Shape: labels (N,) -> (N, count).
    """
    n = labels.shape[0]
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    start = np.searchsorted(sorted_labels, labels, side="left")
    size = np.searchsorted(sorted_labels, labels, side="right") - start
    allowed = n - size
    if (allowed < 1).any():
        raise ValueError(f"every caption needs at least one mismatched caption (another label), but all "
                         f"{n} rows share label {labels[0]}")
    u = np.floor(rng.random((n, count)) * allowed[:, None]).astype(np.int64)
    u = np.minimum(u, allowed[:, None] - 1)
    pos = u + (u >= start[:, None]) * size[:, None]
    return order[pos]


def r_precision(image_emb, text_emb, num_candidates: int = 100, splits: int = 10, *,
                labels=None, seed: int = 0, ties: str = "average",
                chunk_size: int = 256) -> tuple[float, float]:
    """R-precision with r = 1 (AttnGAN, Xu et al. 2018, Sec. 4; DM-GAN evaluation code).

    For each generated image i (row i of ``image_emb``, generated from caption i = row i of
    ``text_emb``), the candidates are caption i and ``num_candidates - 1`` mismatched captions drawn
    uniformly with replacement from the rows whose label differs from label i (DM-GAN
    ``get_mis_caption``: captions of other classes; ``labels=None`` gives every row its own label, i.e.
    any other caption). Candidates are ranked by cosine similarity to the image embedding; the image
    scores a hit when caption i is ranked first. The N hits are shuffled and cut into ``splits``
    contiguous parts (DM-GAN: 30,000 images, 10 parts); the result is the mean and the ddof=0 std of the
    part means. (DM-GAN's slices ``R[i*3000:(i+1)*3000-1]`` drop one image per part; not reproduced.)

    ``ties`` decides an exact similarity tie between caption i and the best mismatched caption, which
    only degenerate embeddings produce: "average" (default) scores 1/(1 + number of tied mismatched
    captions), the expected hit under a random tie-break, so constant embeddings score 1/num_candidates,
    not 1; "optimistic" counts a tie as a hit (DM-GAN's ``argmax == 0``); "pessimistic" as a miss.

    Args:
        image_emb: (N, D) image embeddings (e.g. DAMSM CNN codes of generated images).
        text_emb: (N, D) sentence embeddings of the captions the images were generated from.
        num_candidates: candidate captions per image including the true one (AttnGAN: 100).
        splits: number of parts for the mean and std, 1 <= splits <= N.
        labels: (N,) optional class id of each caption; mismatched captions come from other classes.
        seed: seeds both the candidate draw and the shuffle (``np.random.default_rng``).
        ties: "average", "optimistic" or "pessimistic".
        chunk_size: images scored at once, bounding memory to chunk_size * num_candidates * D.

    Returns:
        ``(mean, std)`` of R-precision in [0, 1] (papers print it in percent).
    """
    img = _as_float64(image_emb, "image_emb", 2)
    txt = _as_float64(text_emb, "text_emb", 2)
    if img.shape != txt.shape:
        raise ValueError(f"image_emb and text_emb must have the same (N, D) shape, got {img.shape} "
                         f"and {txt.shape}")
    n = img.shape[0]
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2 (the true caption and a mismatched one), "
                         f"got {num_candidates}")
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N] = [1, {n}], got {splits}")
    if ties not in ("average", "optimistic", "pessimistic"):
        raise ValueError(f"ties must be 'average', 'optimistic' or 'pessimistic', got {ties!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if labels is None:
        labels = np.arange(n)
    else:
        labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")

    rng = np.random.default_rng(seed)
    mismatched = _mismatched_indices(labels, num_candidates - 1, rng)
    # cosine similarity with DM-GAN's clamp of the norm product at 1e-8
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-8)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-8)
    hits = np.empty(n)
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        true_sim = np.einsum("nd,nd->n", img[lo:hi], txt[lo:hi])
        other_sim = np.einsum("nd,nkd->nk", img[lo:hi], txt[mismatched[lo:hi]])
        best_other = other_sim.max(axis=1)
        if ties == "optimistic":
            hits[lo:hi] = true_sim >= best_other
        elif ties == "pessimistic":
            hits[lo:hi] = true_sim > best_other
        else:
            tied = (other_sim == true_sim[:, None]).sum(axis=1)
            hits[lo:hi] = np.where(true_sim >= best_other, 1.0 / (1.0 + tied), 0.0)
    hits = hits[rng.permutation(n)]
    parts = np.asarray([hits[lo:hi].mean() for lo, hi in _split_bounds(n, splits)])
    return float(parts.mean()), float(parts.std())

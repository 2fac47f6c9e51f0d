"""Slow loop-by-loop float64 references for the non-InfoNCE losses (tests only).

Written independently of the library code: explicit Python loops over samples, words, regions and
features, using only scalar-level torch ops so autograd gives reference gradients.
"""
from __future__ import annotations

import torch


def _norm(v):
    return torch.sqrt((v * v).sum())


def _unit(v):
    return v / _norm(v)


def _log_sum_exp(values):
    m = max(float(x.detach()) for x in values)
    return m + torch.log(sum(torch.exp(x - m) for x in values))


def word_region_ref(regions, words, word_mask, gamma1=5.0, gamma2=5.0, gamma3=50.0):
    """XMC-GAN word_loss with loops. regions (N, R, D), words (N, T, D), word_mask (N, T) bool."""
    n, num_r, _ = regions.shape
    num_t = words.shape[1]
    r = [[_unit(regions[b, k]) for k in range(num_r)] for b in range(n)]
    logits = [[None] * n for _ in range(n)]  # logits[image][caption]
    for i in range(n):
        valid = [t for t in range(num_t) if bool(word_mask[i, t])]
        for b in range(n):
            terms = []
            for t in valid:
                w = _unit(words[i, t])
                e = [torch.exp(gamma1 * (r[b][k] * w).sum()) for k in range(num_r)]
                z = sum(e)
                c = sum((e[k] / z) * r[b][k] for k in range(num_r))
                cos = (w * c).sum() / _norm(c)
                terms.append(gamma2 * cos)
            logits[b][i] = gamma3 * _log_sum_exp(terms) / gamma2
    loss_img = sum(_log_sum_exp([logits[b][i] for i in range(n)]) - logits[b][b] for b in range(n)) / n
    loss_cap = sum(_log_sum_exp([logits[b][i] for b in range(n)]) - logits[i][i] for i in range(n)) / n
    return loss_img + loss_cap


def max_margin_ref(a, b, margin=0.2, hardest=False, reduction="sum", normalize=True):
    """Bidirectional hinge with loops over anchors and negatives. a, b (N, D)."""
    n = a.shape[0]
    if normalize:
        a = torch.stack([_unit(a[i]) for i in range(n)])
        b = torch.stack([_unit(b[i]) for i in range(n)])
    s = [[(a[i] * b[j]).sum() for j in range(n)] for i in range(n)]
    zero = torch.zeros((), dtype=a.dtype)
    terms = []
    for i in range(n):
        # anchor a_i against negatives b_j
        hinges = [torch.maximum(zero, margin - s[i][i] + s[i][j]) for j in range(n) if j != i]
        terms += [max(hinges, key=lambda h: float(h.detach()))] if hardest else hinges
    for j in range(n):
        # anchor b_j against negatives a_i
        hinges = [torch.maximum(zero, margin - s[j][j] + s[i][j]) for i in range(n) if i != j]
        terms += [max(hinges, key=lambda h: float(h.detach()))] if hardest else hinges
    total = sum(terms)
    return total if reduction == "sum" else total / len(terms)


def barlow_twins_ref(z1, z2, lambd=0.0051, eps=1e-5):
    """Barlow Twins with loops over features and samples. z1, z2 (N, D)."""
    n, d = z1.shape

    def standardize(z):
        cols = []
        for k in range(d):
            mu = sum(z[m, k] for m in range(n)) / n
            var = sum((z[m, k] - mu) ** 2 for m in range(n)) / n
            cols.append([(z[m, k] - mu) / torch.sqrt(var + eps) for m in range(n)])
        return cols

    s1, s2 = standardize(z1), standardize(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(s1[i][m] * s2[j][m] for m in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return loss


def negative_cosine_ref(p, z):
    """−mean_i cos(p_i, z_i) with z treated as a constant."""
    n = p.shape[0]
    z = z.detach()
    return -sum((p[i] * z[i]).sum() / (_norm(p[i]) * _norm(z[i])) for i in range(n)) / n


def mochi_ref(q, k, queue, synthetic, temperature, weights=None, mode="exp"):
    """MoCo InfoNCE with per-query extra negatives, loops. q, k (N, D), queue (K, D), synthetic (N, S, D).

    q, k and the queue rows are L2-normalized; row i's logits are [q_i·k_i, q_i·n_j + weight term,
    q_i·synthetic_i,s] / T with target 0, mean over i. Weight w_j: mode "exp" adds log w_j to the
    logit (w_j exp(.)), mode "logit" uses the key w_j n_j. The synthetic points are constants.
    """
    n = q.shape[0]
    synthetic = synthetic.detach()
    total = 0.0
    for i in range(n):
        qi, ki = _unit(q[i]), _unit(k[i])
        logits = [(qi * ki).sum() / temperature]
        for j in range(queue.shape[0]):
            nj = _unit(queue[j])
            if weights is not None and mode == "logit":
                logits.append((qi * (weights[j] * nj)).sum() / temperature)
            elif weights is not None:
                logits.append((qi * nj).sum() / temperature + torch.log(weights[j]))
            else:
                logits.append((qi * nj).sum() / temperature)
        logits += [(qi * synthetic[i, s]).sum() / temperature for s in range(synthetic.shape[1])]
        total = total + _log_sum_exp(logits) - logits[0]
    return total / n

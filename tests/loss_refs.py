"""Naive float64 loop references for the contrastive losses (no code shared with cmgen.losses).

Each function takes float64 tensors and builds the loss one anchor at a time with Python loops, so
autograd through it gives the reference gradients.
"""
from __future__ import annotations

import math

import torch


def _unit(x):
    return x / x.norm()


def _lse(values):
    values = torch.stack(values)
    m = values.max().detach()
    return m + torch.log(torch.exp(values - m).sum())


def ntxent_ref(z0, z1, t, normalize=True):
    n = z0.shape[0]
    z = [(_unit(r) if normalize else r) for r in list(z0) + list(z1)]
    total = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        denom = [z[i] @ z[j] / t for j in range(2 * n) if j != i]
        total = total - (z[i] @ z[p] / t - _lse(denom))
    return total / (2 * n)


def infonce_ref(q, k, t, symmetric=False, normalize=True, negatives=None, weights=None, mode="exp"):
    n = q.shape[0]
    qs = [(_unit(r) if normalize else r) for r in q]
    ks = [(_unit(r) if normalize else r) for r in k]
    if negatives is None:
        def one_direction(a, b):
            tot = 0.0
            for i in range(n):
                logits = [a[i] @ b[j] / t for j in range(n)]
                tot = tot - (logits[i] - _lse(logits))
            return tot / n
        loss = one_direction(qs, ks)
        if symmetric:
            loss = 0.5 * (loss + one_direction(ks, qs))
        return loss
    negs = [(_unit(r) if normalize else r) for r in negatives]
    tot = 0.0
    for i in range(n):
        pos = qs[i] @ ks[i] / t
        terms = [torch.exp(pos)]
        for j, nj in enumerate(negs):
            w = 1.0 if weights is None else weights[j]
            if mode == "exp":
                terms.append(w * torch.exp(qs[i] @ nj / t))
            else:
                terms.append(torch.exp(qs[i] @ (w * nj) / t))
        tot = tot - torch.log(terms[0] / sum(terms))
    return tot / n


def supcon_ref(features, t, base_t, labels=None, mask=None, anchor_mask=None):
    """SupContrast L_out, contrast_mode='all', written per anchor."""
    n, v, _ = features.shape
    rows = [features[i, vv] for vv in range(v) for i in range(n)]      # view-major
    sample = [i for vv in range(v) for i in range(n)]
    view = [vv for vv in range(v) for i in range(n)]
    if mask is None:
        lab = list(range(n)) if labels is None else [int(x) for x in labels]
        weight = lambda i, j: 1.0 if lab[i] == lab[j] else 0.0
    else:
        weight = lambda i, j: mask[i, j]
    losses, chosen = [], []
    for a in range(n * v):
        denom = [rows[a] @ rows[b] / t for b in range(n * v) if b != a]
        lse = _lse(denom)
        num, cnt = 0.0, 0.0
        for b in range(n * v):
            if b == a:
                continue
            w = weight(sample[a], sample[b])
            num = num + w * (rows[a] @ rows[b] / t - lse)
            cnt = cnt + float(w)
        term = -(t / base_t) * (num / cnt) if cnt > 1e-6 else torch.zeros((), dtype=features.dtype)
        losses.append(term)
        if anchor_mask is None:
            chosen.append(True)
        elif anchor_mask.dim() == 1:
            chosen.append(bool(anchor_mask[sample[a]]))
        else:
            chosen.append(bool(anchor_mask[sample[a], view[a]]))
    sel = [l for l, c in zip(losses, chosen) if c]
    return sum(sel) / len(sel)


def selfcon_ref(features, t, base_t, labels=None, backbone_anchors=True):
    """Bae et al. Eq. 2 written directly: every exit output of every (view, sample) is an anchor."""
    if features.dim() == 3:
        features = features[:, None]
    b, v, e, _ = features.shape
    outs, ident, lab, is_backbone = [], [], [], []
    for vv in range(v):
        for i in range(b):
            for x in range(e):
                outs.append(features[i, vv, x])
                ident.append((vv, i))
                # official selfcon_m_FG (backbone not an anchor) tiles eye(B) over the views: without
                # labels the views of one image are positives; otherwise each (view, sample) is its own class
                lab.append(int(labels[i]) if labels is not None else (i if not backbone_anchors else (vv, i)))
                is_backbone.append(x == e - 1)
    total, count = 0.0, 0
    for a in range(len(outs)):
        if not backbone_anchors and is_backbone[a]:
            continue
        others = [c for c in range(len(outs)) if c != a]
        lse = _lse([outs[a] @ outs[c] / t for c in others])
        pos = [c for c in others if lab[c] == lab[a]]
        if pos:
            total = total - (t / base_t) * sum(outs[a] @ outs[c] / t - lse for c in pos) / len(pos)
        count += 1
    return total / count


def twoc_ref(emb, proxies, labels, t, margin=0.0, pos_collected_numerator=True):
    n = emb.shape[0]
    e = [_unit(r) for r in emb]
    p = [_unit(r) for r in proxies]
    tot = 0.0
    for i in range(n):
        prox = torch.exp((e[i] @ p[i] - margin) / t)
        others = [torch.exp((e[i] @ e[j] - margin) / t) for j in range(n) if j != i]
        same = [torch.exp((e[i] @ e[j] - margin) / t) for j in range(n) if j != i and labels[j] == labels[i]]
        num = prox + (sum(same) if (pos_collected_numerator and same) else 0.0)
        den = prox + sum(others)
        tot = tot - torch.log(num / den)
    return tot / n


def dcl_ref(z0, z1, t):
    n = z0.shape[0]
    z = [_unit(r) for r in list(z0) + list(z1)]
    tot = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        negs = [z[i] @ z[j] / t for j in range(2 * n) if j not in (i, p)]
        tot = tot + (-(z[i] @ z[p]) / t + _lse(negs))
    return tot / (2 * n)


def hcl_ref(z0, z1, t, tau_plus, beta):
    """Robinson et al.'s official criterion, one anchor at a time."""
    n = z0.shape[0]
    z = [_unit(r) for r in list(z0) + list(z1)]
    m = 2 * n - 2
    tot = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        pos = torch.exp(z[i] @ z[p] / t)
        neg = [torch.exp(z[i] @ z[j] / t) for j in range(2 * n) if j not in (i, p)]
        imp = [x ** beta for x in neg]
        reweight = sum(a * b for a, b in zip(imp, neg)) / (sum(imp) / m)
        ng = (-tau_plus * m * pos + reweight) / (1 - tau_plus)
        ng = torch.clamp(ng, min=m * math.e ** (-1 / t))
        tot = tot - torch.log(pos / (pos + ng))
    return tot / (2 * n)

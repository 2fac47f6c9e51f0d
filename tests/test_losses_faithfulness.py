"""cmgen.losses against the official implementations, transcribed line by line (independent review).

Each ``_official_*`` function below is a float64 transcription of the named file of the official
repository (the logic, with its masks and reductions, not our reading of the paper); the tests compare
values and input gradients with the library. They are deliberately written like the originals (dense
matrices, masks, ``log_softmax``) and share no code with cmgen.losses or tests/loss_refs*.py.

Two discrepancies found by this review were fixed in the library: SelfCon-M FG without labels (views of an
image are positives, as the official eye(B) tiling) and MoCoQueue ages (a written key starts at count 1).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmgen.losses import (DCL, HCL, BarlowTwins, InfoNCE, MaxMarginRanking, MoCoQueue, NegativeCosine, NTXent, SelfCon,
                          SupCon, TwoC, WordRegion)

TOL = dict(rtol=1e-6, atol=1e-8)


def _randn(seed, *shape, unit=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if unit:
        x = F.normalize(x, dim=-1)
    return x.requires_grad_(True)


def _same_value_and_grad(lib, official, inputs):
    out = lib(*inputs)
    ref = official(*inputs)
    torch.testing.assert_close(out, ref, **TOL)
    # allow_unused: a stop-gradient input has no gradient in either (None on both sides)
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, inputs, allow_unused=True)
    for x, g, rg in zip(inputs, grads, ref_grads):
        zero = torch.zeros_like(x)
        torch.testing.assert_close(zero if g is None else g, zero if rg is None else rg, **TOL)


# --------------------------------------------------------------------------------------------------------
# SupCon — HobbitLong/SupContrast losses.py::SupConLoss (current master, contrast_mode='all', with the
# mask_pos_pairs < 1e-6 -> 1 fix for anchors without positives)
# --------------------------------------------------------------------------------------------------------
def _official_supcon(features, labels=None, mask=None, temperature=0.07, base_temperature=0.07):
    batch_size = features.shape[0]
    if labels is None and mask is None:
        mask = torch.eye(batch_size, dtype=torch.float64)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).double()
    else:
        mask = mask.double()
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count = contrast_feature, contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    # the official "+ 1e-9" is left out: it only matters when every other row is ~1/T below the anchor
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, torch.ones_like(mask_pos_pairs), mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


@pytest.mark.parametrize("kind", ["simclr", "labels", "labels_singleton", "mask"])
def test_supcon_equals_supcontrast(kind):
    n, v, d, t, bt = 6, 2, 5, 0.5, 0.3
    feats = _randn(1, n, v, d, unit=True)
    labels = mask = None
    if kind == "labels":
        labels = torch.tensor([0, 1, 0, 2, 1, 0])
    elif kind == "labels_singleton":
        # one view: samples 3 and 5 have no positive at all (SupContrast edge case: term 0, still counted)
        feats = _randn(2, n, 1, d, unit=True)
        labels = torch.tensor([0, 1, 0, 2, 1, 3])
    elif kind == "mask":
        g = torch.Generator().manual_seed(3)
        mask = torch.rand(n, n, generator=g, dtype=torch.float64) * (torch.rand(n, n, generator=g) > 0.4)
    _same_value_and_grad(lambda f: SupCon(t, bt)(f, labels=labels, mask=mask),
                         lambda f: _official_supcon(f, labels, mask, t, bt), [feats])


# --------------------------------------------------------------------------------------------------------
# ContraD — jh-jeong/ContraD training/gan/contrad.py::supcon_fake and training/criterion.py::nt_xent
# --------------------------------------------------------------------------------------------------------
def _official_supcon_fake(out1, out2, others, temperature):
    n = out1.size(0)
    outputs = torch.cat([out1, out2, others], dim=0)
    sim_matrix = outputs @ outputs.t() / temperature
    sim_matrix = sim_matrix.clone()
    sim_matrix.fill_diagonal_(-5e4)
    mask = torch.zeros_like(sim_matrix)
    mask[2 * n:, 2 * n:] = 1
    mask.fill_diagonal_(0)
    sim_matrix = sim_matrix[2 * n:]
    mask = mask[2 * n:]
    mask = mask / mask.sum(1, keepdim=True)
    lsm = F.log_softmax(sim_matrix, dim=1) * mask
    return -lsm.sum(1).mean()


def _official_nt_xent(out1, out2, temperature):
    n = out1.size(0)
    outputs = torch.cat([out1, out2], dim=0)
    sim_matrix = (outputs @ outputs.t() / temperature).clone()
    sim_matrix.fill_diagonal_(-5e4)
    sim_matrix = F.log_softmax(sim_matrix, dim=1)
    return -torch.sum(sim_matrix[:n, n:].diag() + sim_matrix[n:, :n].diag()) / (2 * n)


def test_supcon_anchor_mask_equals_contrad_supcon_fake():
    n, d, t = 4, 6, 0.1
    r1, r2, fake = _randn(4, n, d, unit=True), _randn(5, n, d, unit=True), _randn(6, n, d, unit=True)

    def lib(a, b, c):
        feats = torch.cat([a, b, c])[:, None]                        # (3N, 1, D)
        labels = torch.cat([torch.arange(2 * n), torch.full((n,), 2 * n)])  # fakes share one label
        anchors = torch.arange(3 * n) >= 2 * n
        # ContraD has no T / base_T factor: base_temperature = temperature
        return SupCon(t, base_temperature=t)(feats, labels=labels, anchor_mask=anchors)

    _same_value_and_grad(lib, lambda a, b, c: _official_supcon_fake(a, b, c, t), [r1, r2, fake])


def test_ntxent_equals_contrad_nt_xent():
    z0, z1 = _randn(7, 5, 4, unit=True), _randn(8, 5, 4, unit=True)
    _same_value_and_grad(lambda a, b: NTXent(0.1, normalize=False)(a, b),
                         lambda a, b: _official_nt_xent(a, b, 0.1), [z0, z1])


# --------------------------------------------------------------------------------------------------------
# 2C — POSTECH-CVLab/PyTorch-StudioGAN src/utils/losses.py::ConditionalContrastiveLoss (current) and the
# paper-era Conditional_Contrastive_loss (pos_collected_numerator flag, margin)
# --------------------------------------------------------------------------------------------------------
def _official_2c(embed, proxy, label, num_classes, temperature, pos_collected_numerator=True, margin=0.0):
    cos = torch.nn.CosineSimilarity(dim=-1)
    n = label.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)

    def remove_diag(m):
        return m[off].view(n, -1)

    mask_multi = torch.zeros(num_classes, n, dtype=torch.long)
    for c in range(num_classes):
        mask_multi[c, label == c] = 1
    sim_matrix = torch.exp((remove_diag(cos(embed.unsqueeze(1), embed.unsqueeze(0))) - margin) / temperature)
    emb2proxy = torch.exp((cos(embed, proxy) - margin) / temperature)
    if pos_collected_numerator:
        numerator = emb2proxy + (remove_diag(mask_multi[label]) * sim_matrix).sum(dim=1)
    else:
        numerator = emb2proxy
    denominator = torch.cat([emb2proxy.unsqueeze(1), sim_matrix], dim=1).sum(dim=1)
    return -torch.log(numerator / denominator).mean()


@pytest.mark.parametrize("t,collected,margin", [(1.0, True, 0.0), (0.5, True, 0.3), (0.5, False, 0.0),
                                                (0.25, False, 0.2)])
def test_twoc_equals_studiogan(t, collected, margin):
    labels = torch.tensor([0, 1, 2, 1, 0, 0, 3])
    e, p = _randn(9, 7, 5), _randn(10, 7, 5)
    _same_value_and_grad(lambda a, b: TwoC(t, margin=margin, pos_collected_numerator=collected)(a, b, labels),
                         lambda a, b: _official_2c(a, b, labels, 4, t, collected, margin), [e, p])


# --------------------------------------------------------------------------------------------------------
# Word-region — google-research/xmcgan_image_generation xmcgan/libml/attention_lib.py::word_loss
# --------------------------------------------------------------------------------------------------------
def _xmc_l2_normalize(x, epsilon=1e-12):
    return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=epsilon))


def _xmc_attention(region_feat, word_feat, gamma, mask):
    region_feat, word_feat = _xmc_l2_normalize(region_feat), _xmc_l2_normalize(word_feat)
    attn_matrix = torch.matmul(region_feat, word_feat.transpose(1, 2)) * gamma + mask * (-1e9)
    alpha = torch.softmax(attn_matrix, dim=-2)
    return torch.matmul(alpha.transpose(1, 2), region_feat)


def _official_word_loss(image_feat, word_feat, max_len, gamma1=5.0, gamma2=5.0, gamma3=50.0):
    batch_size, region_num, _ = image_feat.shape
    total_len = word_feat.shape[1]
    rows = []
    for max_len_i, word_feat_i in zip(max_len, word_feat):  # jax.vmap over captions
        word_feat_i = word_feat_i[None].expand(batch_size, -1, -1)
        mask = (torch.arange(total_len)[None, :] >= max_len_i.repeat(region_num)[:, None]).double()
        mask = mask[None].expand(batch_size, -1, -1)
        mask_2 = mask[:, 0, :]
        region_context = _xmc_attention(image_feat, word_feat_i, gamma1, mask)
        row_sim = (word_feat_i * region_context).sum(-1) / (word_feat_i.norm(dim=-1) * region_context.norm(dim=-1))
        row_sim = row_sim * gamma2 + mask_2 * (-1e9)
        rows.append(torch.logsumexp(row_sim, dim=-1, keepdim=True) / gamma2)
    similarities_transpose = torch.stack(rows).squeeze(-1) * gamma3     # (captions, images)
    similarities = similarities_transpose.t()                           # (images, captions)
    target = torch.arange(batch_size)
    return F.cross_entropy(similarities, target) + F.cross_entropy(similarities_transpose, target)


@pytest.mark.parametrize("gammas", [(5.0, 5.0, 50.0), (4.0, 2.0, 10.0)])
def test_word_region_equals_xmcgan_word_loss(gammas):
    n, r, t, d = 3, 5, 6, 4
    lengths = torch.tensor([6, 2, 4])
    regions, words = _randn(11, n, r, d), _randn(12, n, t, d)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    _same_value_and_grad(lambda a, b: WordRegion(*gammas)(a, b, mask),
                         lambda a, b: _official_word_loss(a, b, lengths, *gammas), [regions, words])


# --------------------------------------------------------------------------------------------------------
# HCL — joshr17/HCL image/main.py::criterion (estimator='hard'; 'easy' is NT-Xent)
# --------------------------------------------------------------------------------------------------------
def _official_hcl(out_1, out_2, tau_plus, batch_size, beta, temperature, estimator="hard"):
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t()) / temperature)
    mask = torch.ones((batch_size, 2 * batch_size), dtype=torch.bool)
    for i in range(batch_size):
        mask[i, i] = 0
        mask[i, i + batch_size] = 0
    mask = torch.cat((mask, mask), 0)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    if estimator == "hard":
        n = batch_size * 2 - 2
        imp = (beta * neg.log()).exp()
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
        ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n * math.e ** (-1 / temperature))
    else:
        ng = neg.sum(dim=-1)
    return (-torch.log(pos / (pos + ng))).mean()


@pytest.mark.parametrize("t,tau_plus,beta", [(0.5, 0.1, 1.0), (0.2, 0.05, 0.5), (0.5, 0.1, 0.0)])
def test_hcl_equals_official_criterion(t, tau_plus, beta):
    n = 5
    z0, z1 = _randn(13, n, 6, unit=True), _randn(14, n, 6, unit=True)
    _same_value_and_grad(lambda a, b: HCL(t, tau_plus, beta, normalize=False)(a, b),
                         lambda a, b: _official_hcl(a, b, tau_plus, n, beta, t), [z0, z1])


def test_hcl_without_tau_plus_and_beta_equals_official_easy_estimator():
    z0, z1 = _randn(15, 4, 3, unit=True), _randn(16, 4, 3, unit=True)
    _same_value_and_grad(lambda a, b: HCL(0.5, 0.0, 0.0, normalize=False)(a, b),
                         lambda a, b: _official_hcl(a, b, 0.0, 4, 0.0, 0.5, estimator="easy"), [z0, z1])


def test_hcl_clamp_branch_equals_official():
    # tau_plus close to 1 drives Ng below N e^{-1/t} for every anchor: the official clamp takes over
    z0 = _randn(17, 4, 3, unit=True)
    z1 = (z0.detach() + 0.05 * _randn(18, 4, 3).detach()).requires_grad_(True)
    _same_value_and_grad(lambda a, b: HCL(0.5, 0.9, 1.0, normalize=False)(a, b),
                         lambda a, b: _official_hcl(a, b, 0.9, 4, 1.0, 0.5), [z0, z1])


# --------------------------------------------------------------------------------------------------------
# SelfCon — raymin0223/self-contrastive-learning losses/losses.py::ConLoss, called as main_represent.py
# --------------------------------------------------------------------------------------------------------
def _official_conloss(features, labels=None, selfcon_s_fg=False, selfcon_m_fg=False, temperature=0.07,
                      base_temperature=0.07):
    batch_size = features.shape[0] if not selfcon_m_fg else int(features.shape[0] / 2)
    if labels is None:
        mask = torch.eye(batch_size, dtype=torch.float64)
    else:
        labels = labels.contiguous().view(-1, 1)
        if labels.shape[0] != batch_size:
            raise ValueError("Num of labels does not match num of features")
        mask = torch.eq(labels, labels.T).double()
    if not selfcon_s_fg and not selfcon_m_fg:
        contrast_count = features.shape[1]
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchor_feature, anchor_count = contrast_feature, contrast_count
    else:
        contrast_count = features.shape[1] * (2 if selfcon_m_fg else 1)
        anchor_count = (features.shape[1] - 1) * (2 if selfcon_m_fg else 1)
        anchor_feature = torch.cat(torch.unbind(features, dim=1)[:-1], dim=0)
        contrast_feature = torch.cat([anchor_feature, torch.unbind(features, dim=1)[-1]], dim=0)
    anchor_dot_contrast = torch.matmul(anchor_feature, contrast_feature.T) / temperature
    logits = anchor_dot_contrast - anchor_dot_contrast.max(dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def _exits(f1_list, f2):
    """main_represent.py: torch.cat([f.unsqueeze(1) for f in f1] + [f2.unsqueeze(1)], dim=1)."""
    return torch.cat([f.unsqueeze(1) for f in f1_list] + [f2.unsqueeze(1)], dim=1)


@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("variant", ["S", "S_FG"])
def test_selfcon_single_view_equals_official(use_labels, variant):
    b, d, t = 6, 5, 0.2
    labels = torch.tensor([0, 1, 0, 2, 1, 2]) if use_labels else None
    g1, g2, f = (_randn(s, b, d, unit=True) for s in (19, 20, 21))    # two sub-network exits + backbone
    fg = variant == "S_FG"
    _same_value_and_grad(
        lambda x, y, z: SelfCon(t, t, backbone_anchors=not fg)(torch.stack([x, y, z], dim=1), labels),
        lambda x, y, z: _official_conloss(_exits([x, y], z), labels, selfcon_s_fg=fg, temperature=t,
                                          base_temperature=t),
        [g1, g2, f])


def _multiview_inputs(b, d):
    # the model runs on images = cat([view 1, view 2]) (2B rows); each exit's output is (2B, D)
    return [_randn(s, 2 * b, d, unit=True) for s in (22, 23)]


def _to_lib_multiview(g, f, b):
    """(2B, E, D) official layout -> (B, 2, E, D) for cmgen.SelfCon."""
    exits = torch.stack([g, f], dim=1)
    return exits.view(2, b, *exits.shape[1:]).transpose(0, 1)


@pytest.mark.parametrize("use_labels", [False, True])
def test_selfcon_multi_view_equals_official(use_labels):
    b, d, t = 4, 5, 0.3
    labels = torch.tensor([0, 1, 0, 1]) if use_labels else None
    g, f = _multiview_inputs(b, d)
    _same_value_and_grad(
        lambda x, y: SelfCon(t, t)(_to_lib_multiview(x, y, b), labels),
        lambda x, y: _official_conloss(_exits([x], y), None if labels is None else torch.cat([labels, labels]),
                                       temperature=t, base_temperature=t),
        [g, f])


def test_selfcon_m_fg_with_labels_equals_official():
    b, d, t = 4, 5, 0.3
    labels = torch.tensor([0, 1, 0, 2])
    g, f = _multiview_inputs(b, d)
    _same_value_and_grad(
        lambda x, y: SelfCon(t, t, backbone_anchors=False)(_to_lib_multiview(x, y, b), labels),
        lambda x, y: _official_conloss(_exits([x], y), labels, selfcon_m_fg=True, temperature=t, base_temperature=t),
        [g, f])


def test_selfcon_m_fg_without_labels_equals_official():
    b, d, t = 4, 5, 0.3
    g, f = _multiview_inputs(b, d)
    _same_value_and_grad(
        lambda x, y: SelfCon(t, t, backbone_anchors=False)(_to_lib_multiview(x, y, b)),
        lambda x, y: _official_conloss(_exits([x], y), None, selfcon_m_fg=True, temperature=t, base_temperature=t),
        [g, f])


# --------------------------------------------------------------------------------------------------------
# MoCo — facebookresearch/moco moco/builder.py (logits Nx(1+K), target 0, CrossEntropyLoss in main_moco.py)
# VideoMoCo — tinapan-pt/VideoMoCo moco/builder.py (count buffer, weight = 0.99999 ** count on the queue)
# --------------------------------------------------------------------------------------------------------
def _official_moco_logits(q, k, queue_ck, t):
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue_ck)
    return torch.cat([l_pos, l_neg], dim=1) / t


def test_infonce_with_queue_equals_moco_builder():
    n, k_size, d, t = 5, 9, 4, 0.07
    q, k = _randn(24, n, d, unit=True), _randn(25, n, d, unit=True)
    queue = F.normalize(torch.randn(d, k_size, generator=torch.Generator().manual_seed(26), dtype=torch.float64), dim=0)

    def official(a, b):
        # builder.py normalizes q (and k, under no_grad) right after the encoders
        logits = _official_moco_logits(F.normalize(a, dim=1), F.normalize(b, dim=1).detach(), queue, t)
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))

    _same_value_and_grad(lambda a, b: InfoNCE(t)(a, b.detach(), queue.t()), official, [q, k])


class _OfficialVideoMoCoQueue:
    """The queue bookkeeping of VideoMoCo's MoCo: ``count`` +1 for every slot, written slots set to 1."""

    def __init__(self, queue_dk):
        self.queue = queue_dk.clone()
        self.count = torch.zeros(queue_dk.shape[1], dtype=torch.int16)
        self.ptr = 0

    def weight(self, t=0.99999):
        return t ** (1.0 * self.count.double())

    def dequeue_and_enqueue(self, keys):
        self.count += 1
        b = keys.shape[0]
        self.queue[:, self.ptr:self.ptr + b] = keys.T
        self.count[self.ptr:self.ptr + b] = 1
        self.ptr = (self.ptr + b) % self.queue.shape[1]


def test_infonce_logit_mode_equals_videomoco_builder():
    n, k_size, d, t, decay = 4, 8, 5, 0.07, 0.9
    q, k = _randn(27, n, d, unit=True), _randn(28, n, d, unit=True)
    queue = F.normalize(torch.randn(d, k_size, generator=torch.Generator().manual_seed(29), dtype=torch.float64), dim=0)
    count = torch.tensor([3, 1, 1, 2, 2, 5, 4, 4])
    w = decay ** count.double()

    def official(a, b):
        weighted = torch.mul(queue, w).clone().detach()
        logits = _official_moco_logits(F.normalize(a, dim=1), F.normalize(b, dim=1).detach(), weighted, t)
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))

    _same_value_and_grad(lambda a, b: InfoNCE(t, negative_weight_mode="logit")(a, b.detach(), queue.t(), w),
                         official, [q, k])


def test_moco_queue_weights_equal_videomoco_count():
    d, size, decay = 3, 6, 0.5
    ours = MoCoQueue(d, size, temporal_decay=decay).double()
    official = _OfficialVideoMoCoQueue(ours.keys.t())
    g = torch.Generator().manual_seed(30)
    for _ in range(4):   # batch 2 divides K = 6, as the official code asserts
        torch.testing.assert_close(ours.weights(), official.weight(decay))
        keys = F.normalize(torch.randn(2, d, generator=g, dtype=torch.float64), dim=1)
        ours.enqueue(keys)
        official.dequeue_and_enqueue(keys)
    torch.testing.assert_close(ours.weights(), official.weight(decay))


# --------------------------------------------------------------------------------------------------------
# Barlow Twins — facebookresearch/barlowtwins main.py::BarlowTwins.forward (single process)
# SimSiam — facebookresearch/simsiam main_simsiam.py: -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
# VSE++ — fartashf/vsepp model.py::ContrastiveLoss; collaborative experts model/loss.py::MaxMarginRankingLoss
# --------------------------------------------------------------------------------------------------------
def _official_barlow(z1, z2, lambd):
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False).double()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    n = c.shape[0]
    off_diag = c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten().pow(2).sum()
    return on_diag + lambd * off_diag


def test_barlow_twins_equals_official():
    z1, z2 = _randn(31, 8, 5), _randn(32, 8, 5)
    _same_value_and_grad(lambda a, b: BarlowTwins(0.0051)(a, b), lambda a, b: _official_barlow(a, b, 0.0051), [z1, z2])


def test_negative_cosine_symmetric_equals_simsiam():
    p1, p2, z1, z2 = (_randn(s, 4, 6) for s in (33, 34, 35, 36))
    cos = torch.nn.CosineSimilarity(dim=1)

    def official(a, b, c, e):
        return -(cos(a, e.detach()).mean() + cos(b, c.detach()).mean()) * 0.5

    _same_value_and_grad(lambda a, b, c, e: NegativeCosine().symmetric(a, b, c, e), official, [p1, p2, z1, z2])


def _official_vsepp(im, s, margin, max_violation):
    scores = im @ s.t()
    diagonal = scores.diag().view(im.size(0), 1)
    cost_s = (margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    eye = torch.eye(scores.size(0)) > 0.5
    cost_s, cost_im = cost_s.masked_fill(eye, 0), cost_im.masked_fill(eye, 0)
    if max_violation:
        cost_s, cost_im = cost_s.max(1)[0], cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


def _official_ce_max_margin(x, margin):
    n = x.size(0)
    x1 = torch.diag(x).unsqueeze(1).expand(n, n).contiguous().view(-1, 1)
    x1 = torch.cat((x1, x1), 0)
    x2 = torch.cat((x.view(-1, 1), x.transpose(0, 1).contiguous().view(-1, 1)), 0)
    keep = torch.ones(x.shape) - torch.eye(n)
    keep_both = torch.cat((keep.view(-1, 1), keep.transpose(0, 1).contiguous().view(-1, 1)), 0)
    keep_idx = torch.nonzero(keep_both.flatten()).flatten()
    x1_, x2_ = torch.index_select(x1, 0, keep_idx), torch.index_select(x2, 0, keep_idx)
    return F.relu(margin - (x1_ - x2_)).mean()


@pytest.mark.parametrize("hardest", [False, True])
def test_max_margin_equals_vsepp(hardest):
    a, b = _randn(37, 5, 4, unit=True), _randn(38, 5, 4, unit=True)
    _same_value_and_grad(lambda x, y: MaxMarginRanking(0.2, hardest=hardest, normalize=False)(x, y),
                         lambda x, y: _official_vsepp(x, y, 0.2, hardest), [a, b])


def test_max_margin_mean_equals_collaborative_experts():
    a, b = _randn(39, 5, 4, unit=True), _randn(40, 5, 4, unit=True)
    _same_value_and_grad(lambda x, y: MaxMarginRanking(0.5, reduction="mean", normalize=False)(x, y),
                         lambda x, y: _official_ce_max_margin(x @ y.t(), 0.5), [a, b])


# --------------------------------------------------------------------------------------------------------
# XMC-GAN sentence-image / image-image loss — attention_lib.py::contrastive_loss: a SUM of both directions,
# so it is 2 x InfoNCE(symmetric=True) (which averages them, as open_clip's ClipLoss)
# --------------------------------------------------------------------------------------------------------
def _official_xmc_contrastive(image_feat, cond_feat, temperature=0.1):
    image_feat, cond_feat = _xmc_l2_normalize(image_feat), _xmc_l2_normalize(cond_feat)
    target = torch.arange(image_feat.shape[0])
    loss_img2cond = F.cross_entropy(image_feat @ cond_feat.t() / temperature, target)
    loss_cond2img = F.cross_entropy(cond_feat @ image_feat.t() / temperature, target)
    return loss_img2cond + loss_cond2img


def test_twice_symmetric_infonce_equals_xmcgan_contrastive_loss():
    img, txt = _randn(41, 5, 6), _randn(42, 5, 6)
    _same_value_and_grad(lambda a, b: 2.0 * InfoNCE(0.1, symmetric=True)(a, b),
                         lambda a, b: _official_xmc_contrastive(a, b, 0.1), [img, txt])


# --------------------------------------------------------------------------------------------------------
# DCL (Yeh et al.) — raminnakhli/Decoupled-Contrastive-Learning loss/dcl.py::DCL.__call__ (one direction; a
# third-party implementation, the paper has no official code): cmgen averages the two directions
# --------------------------------------------------------------------------------------------------------
def _one_way_dcl(z1, z2, temperature):
    small_num = math.log(1e-45)
    cross_view_distance = torch.mm(z1, z2.t())
    positive_loss = -torch.diag(cross_view_distance) / temperature
    neg_similarity = torch.cat((torch.mm(z1, z1.t()), cross_view_distance), dim=1) / temperature
    neg_mask = torch.eye(z1.size(0), dtype=torch.float64).repeat(1, 2)
    negative_loss = torch.logsumexp(neg_similarity + neg_mask * small_num, dim=1, keepdim=False)
    return (positive_loss + negative_loss).mean()


def test_dcl_equals_mean_of_both_directions_of_reference_dcl():
    z0, z1 = _randn(43, 5, 4, unit=True), _randn(44, 5, 4, unit=True)
    _same_value_and_grad(lambda a, b: DCL(0.1, normalize=False)(a, b),
                         lambda a, b: 0.5 * (_one_way_dcl(a, b, 0.1) + _one_way_dcl(b, a, 0.1)), [z0, z1])

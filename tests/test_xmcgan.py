"""XMC-GAN: layouts transcribed from xmc_net.py, init, word attention (softmax over words, padding masked),
D head, the loss composition, the joint step's gradient routing, one-step decreases, grid, save/load."""
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from cmgen.config import apply_overrides
from cmgen.losses import InfoNCE, WordRegion
from text2image.gan import GANStep
from text2image.layers import is_spectral_normed
from text2image.xmcgan import (GenBlock, SpatialBatchNorm, TextCondition, XMCDiscriminator, XMCGANConfig,
                               XMCGANMethod, XMCGenerator, glorot_normal_, word_attention)

# --- layouts: (in, out, output side) per block in units of gf / df, from xmc_net.py + common.py ------------
# Generator: Dense(z) -> 4x4x16gf; channel_dims [16, 8, 4, 2, 1] (128) / [16, 8, 8, 4, 2, 1] (256); the
# first two are GenBlock (global condition), the rest GenSpatialBlock; attention on the 16x16 map.
G_TABLE = {
    128: [(16, 16, 8, False), (16, 8, 16, False), (8, 4, 32, True), (4, 2, 64, True), (2, 1, 128, True)],
    256: [(16, 16, 8, False), (16, 8, 16, False), (8, 8, 32, True), (8, 4, 64, True), (4, 2, 128, True),
          (2, 1, 256, True)],
}
# Discriminator: DiscOptimizedBlock(df) then DiscBlock(df * c) for channel_dims [2, 4, 8, 16, 16] with
# downsamples [T, T, T, T, F] (128) / [2, 4, 8, 8, 16, 16] with [T, T, T, T, T, F] (256); x_cond = the block
# whose output is cond_size = 16.
D_TABLE = {
    128: [(None, 1, 64), (1, 2, 32), (2, 4, 16), (4, 8, 8), (8, 16, 4), (16, 16, 4)],
    256: [(None, 1, 128), (1, 2, 64), (2, 4, 32), (4, 8, 16), (8, 8, 8), (8, 16, 4), (16, 16, 4)],
}
D_REGION_BLOCK = {128: 2, 256: 3}


@pytest.mark.parametrize("size", [128, 256])
def test_generator_layout_matches_xmc_net(size):
    gf, z_dim, dim = 2, 4, 8
    g = XMCGenerator(image_size=size, gf_dim=gf, z_dim=z_dim, word_dim=dim, sentence_dim=dim)
    assert g.fc.out_features == gf * 16 * 4 * 4 and g.sentence_fc.out_features == z_dim
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1], o.shape[-1], m.spatial)))
             for b in g.blocks]
    x = g(torch.randn(2, z_dim), torch.randn(2, 5, dim), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, dim))
    for h in hooks:
        h.remove()
    assert seen == [(gf * i, gf * o, r, sp) for i, o, r, sp in G_TABLE[size]]
    assert x.shape == (2, 3, size, size) and 0 <= x.min() and x.max() <= 1
    assert g.region_conv.in_channels == gf * 8 and g.region_conv.out_channels == dim   # 1x1 conv to 768 at 16x16
    # spatial condition = [word context (dim), tiled global condition (2 z)]
    assert g.norm_out.gamma.in_channels == dim + 2 * z_dim
    assert not any(is_spectral_normed(m) for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    bns = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 and m.eps == 1e-5 and not m.affine for m in bns)


@pytest.mark.parametrize("size", [128, 256])
def test_discriminator_layout_matches_xmc_net(size):
    df, dim = 2, 6
    d = XMCDiscriminator(image_size=size, df_dim=df, word_dim=dim, sentence_dim=dim)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1], o.shape[-1])))
             for b in d.blocks]
    out = d(torch.rand(2, 3, size, size), torch.randn(2, dim))
    for h in hooks:
        h.remove()
    assert seen == [(3 if i is None else df * i, df * o, r) for i, o, r in D_TABLE[size]]
    assert d.region_index == D_REGION_BLOCK[size] and d.region_conv.in_channels == seen[d.region_index][1]
    assert out.regions.shape == (2, 16 * 16, dim) and out.features.shape == (2, 16 * df)
    weighted = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(is_spectral_normed(m) for m in weighted)


def test_glorot_normal_is_jax_truncated_variance_scaling():
    torch.manual_seed(0)
    w = torch.empty(64, 32, 3, 3)
    glorot_normal_(w)
    var = 2.0 / (32 * 9 + 64 * 9)
    assert w.var().item() == pytest.approx(var, rel=0.05)           # exact variance after the 1/0.8796 rescale
    assert w.abs().max().item() <= 2 * math.sqrt(var) / 0.87962566103423978 + 1e-7
    g = XMCGenerator(image_size=32, gf_dim=2, z_dim=4, word_dim=8, sentence_dim=8)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in g.modules() if isinstance(m, torch.nn.Conv2d))


def _attention_reference(regions, words, mask, gamma):
    """attention_lib.attention_for_g as written (float64 loops): l2-normalise, gamma * dots, -1e9 on padding,
    softmax over words, context = attention x NORMALISED words."""
    b, r, _ = regions.shape
    out = torch.zeros(b, r, words.shape[-1], dtype=torch.float64)
    for i in range(b):
        w = words[i] / words[i].norm(dim=-1, keepdim=True).clamp_min(1e-6)
        for j in range(r):
            rj = regions[i, j] / regions[i, j].norm().clamp_min(1e-6)
            logits = gamma * (w @ rj) + (~mask[i]).double() * -1e9
            out[i, j] = torch.softmax(logits, 0) @ w
    return out


def test_word_attention_softmax_over_words_and_padding_masked():
    torch.manual_seed(0)
    regions, words = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 6, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    ctx = word_attention(regions, words, mask, 15.0)
    torch.testing.assert_close(ctx, _attention_reference(regions, words, mask, 15.0))
    # one valid word: every region's context is that (normalised) word
    torch.testing.assert_close(ctx[2], (words[2, 0] / words[2, 0].norm()).expand(5, 7))
    with pytest.raises(ValueError, match="at least one valid word"):
        word_attention(regions, words, torch.zeros(3, 6, dtype=torch.bool), 15.0)


def test_padded_words_change_nothing_in_g():
    torch.manual_seed(0)
    g = XMCGenerator(image_size=32, gf_dim=2, z_dim=4, word_dim=8, sentence_dim=8, cond_size=8)
    z, s = torch.randn(3, 4), torch.randn(3, 8)
    words = torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    a = g(z, words, mask, s)
    words2 = words.clone()
    words2[:, 4:] = 100 * torch.randn(3, 2, 8)
    torch.testing.assert_close(g(z, words2, mask, s), a, rtol=0, atol=0)
    words3 = words.clone()
    words3[:, 1] += 3.0
    assert not torch.allclose(g(z, words3, mask, s), a)                  # valid words do matter
    assert not torch.allclose(g(z, words2, torch.ones_like(mask), s), a)  # and unmasking does too


def test_spatial_bn_low_resolution_condition_equals_official_upsample_first():
    torch.manual_seed(0)
    bn = SpatialBatchNorm(4, 6)
    torch.nn.init.normal_(bn.gamma.weight)
    x, s = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 4, 4)
    official = bn(x, F.interpolate(s, scale_factor=4, mode="nearest"))
    torch.testing.assert_close(bn(x, s), official)
    block = GenBlock(4, 3, 6, spatial=True)
    s8 = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(block(torch.randn(2, 4, 8, 8), s8, s8).shape, torch.Size([2, 3, 16, 16]))


def test_discriminator_head_is_projection_with_tiled_sentence():
    torch.manual_seed(0)
    d = XMCDiscriminator(image_size=32, df_dim=2, word_dim=5, sentence_dim=6, cond_size=8).eval()
    x, s = torch.rand(4, 3, 32, 32), torch.randn(2, 6)
    out = d(x, s)
    proj = d.sentence_proj(s)
    torch.testing.assert_close(out.sentence, torch.cat([proj, proj]))           # jnp.tile(embedding, (2, 1))
    torch.testing.assert_close(out.logits, d.linear(out.features).squeeze(1) + (out.features * out.sentence).sum(1))
    assert (out.features >= 0).all() and out.regions.shape == (4, 64, 5)
    with pytest.raises(ValueError, match="multiple"):
        d(torch.rand(3, 3, 32, 32), s)


# --- the method --------------------------------------------------------------------------------------------
def _cfg(tmp_path, *overrides):
    cfg = XMCGANConfig()
    return apply_overrides(cfg, [
        f"run.output_dir={tmp_path}", "data.num_images=40", "model.image_size=32", "model.gf_dim=2",
        "model.df_dim=2", "model.z_dim=8", "model.cond_size=8", "text.random_init=true", "text.max_tokens=12",
        "gan.n_dis=2", "gan.g_step=joint", "gan.samples_per_class=4", "model.image_encoder.random_init=true",
        "model.image_encoder.input_size=32", *overrides])


class _Ctx:
    """The StepContext surface GANMethod.train_step uses, recording gradients at every optimizer step."""

    def __init__(self, models, opts):
        self.models, self.optimizers, self.ema = models, opts, {}
        self.device, self.grad_accum, self.world_size = torch.device("cpu"), 1, 1
        self.grads = []

    def unwrap(self, name):
        return self.models[name]

    def backward(self, loss, **kwargs):
        loss.backward(**kwargs)

    def step(self, name):
        self.grads.append((name, {k: None if p.grad is None else p.grad.clone()
                                  for k, p in self.models[name].named_parameters()}))
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def frozen(self, *names):
        from cmgen.engine.method import StepContext
        return StepContext.frozen(self, *names)


def _setup(tmp_path, *overrides):
    torch.manual_seed(0)
    random.seed(0)  # CocoCaptions draws the caption of an item with Python's random
    method = XMCGANMethod(_cfg(tmp_path, *overrides))
    models = method.build_models(method.cfg)
    ds = method.build_dataset(method.cfg)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    return method, models, batch


def _joint_step_grads(tmp_path, scale_d=1.0, scale_g=1.0):
    method, models, batch = _setup(tmp_path)
    d_loss, g_loss = method.d_loss, method.g_loss
    method.d_loss = lambda s: {k: scale_d * v for k, v in d_loss(s).items()}
    method.g_loss = lambda s: {k: scale_g * v for k, v in g_loss(s).items()}
    # lr 0: the weights stay put, so the three runs see the same models in every update
    ctx = _Ctx(models, {n: torch.optim.SGD(m.parameters(), lr=0.0) for n, m in models.items()})
    torch.manual_seed(1)
    logs = method.train_step(batch, 0, ctx)
    return ctx.grads, logs


def test_joint_step_routes_gradients_like_train_g_d(tmp_path):
    base, logs = _joint_step_grads(tmp_path)
    assert [n for n, _ in base] == ["d", "d", "g"]     # train_d, then train_g_d's D and G updates
    assert set(logs) >= {"d_adv", "d_word", "d_sentence", "g_adv", "g_word", "g_sentence", "g_image",
                         "g_image_pretrained"}
    assert all(torch.isfinite(v) for v in logs.values())
    # a power of two: scaling a loss by it scales every backward product exactly (no rounding), so D's
    # gradients under the scaled D loss are exactly 1024x (a scale of 1000 left 1.6e-3 relative error
    # on a cancelling element on one machine)
    heavy = 1024.0
    g_heavy, _ = _joint_step_grads(tmp_path, scale_g=heavy)
    d_heavy, _ = _joint_step_grads(tmp_path, scale_d=heavy)
    for (name, a), (_, b), (_, c) in zip(base, g_heavy, d_heavy):
        for k in a:
            if name == "d":   # G's terms (fake side, image-image) never reach D
                torch.testing.assert_close(b[k], a[k], msg=f"D grad {k} moved with G's loss")
                torch.testing.assert_close(c[k] / heavy, a[k], msg=f"D grad {k} is not linear in D's loss")
            else:             # D's terms never reach G
                torch.testing.assert_close(c[k], a[k], msg=f"G grad {k} moved with D's loss")
    assert all(v is not None for v in base[2][1].values())


def test_loss_terms_are_the_official_sums(tmp_path):
    method, models, batch = _setup(tmp_path)
    images, cond = method.real_batch(batch)
    real, c = images[:4], cond[:4]
    fake = method.generate(models["g"], torch.randn(4, 8), c)
    s = GANStep(0, "joint", real, c, cond_fake=c, fake=fake)
    s.out_real, s.out_fake = method.d_forward(models["d"], s)
    d, g = method.d_loss(s), method.g_loss(s)
    wr, nce = WordRegion(5.0, 5.0, 50.0, eps=1e-6), InfoNCE(0.1, symmetric=True)
    r, f = s.out_real, s.out_fake
    torch.testing.assert_close(d["d_adv"], F.relu(1 - r.logits).mean() + F.relu(1 + f.logits).mean())
    torch.testing.assert_close(d["d_word"], wr(r.regions, c.words, c.word_mask))
    torch.testing.assert_close(d["d_sentence"], 2 * nce(r.features, method_proj := models["d"].sentence_proj(c.sentence)))
    torch.testing.assert_close(g["g_adv"], -f.logits.mean())
    torch.testing.assert_close(g["g_word"], wr(f.regions, c.words, c.word_mask))
    torch.testing.assert_close(g["g_sentence"], 2 * nce(f.features, method_proj))
    torch.testing.assert_close(g["g_image"], 2 * nce(f.features, r.features))
    enc = method.image_encoder
    torch.testing.assert_close(g["g_image_pretrained"], 2 * nce(enc(real), enc(fake)))
    # the ablation switches drop terms
    off, _, _ = _setup(tmp_path, "model.word_contrastive=false", "model.sentence_contrastive=false",
                       "model.image_contrastive=false", "model.pretrained_image_contrastive=false")
    assert set(off.d_loss(s)) == {"d_adv"} and set(off.g_loss(s)) == {"g_adv"}


def test_one_step_lowers_d_and_g_losses_on_a_fixed_batch(tmp_path):
    method, models, batch = _setup(tmp_path)
    g, d = models["g"], models["d"]
    images, cond = method.real_batch(batch)
    # Off exact black: an all-zero region through a zero-bias D at init normalises a zero vector, where the
    # word loss is not smooth (gradients of order 1/eps) and no step size is safe.
    real, c, z = 0.05 + 0.9 * images[:4], cond[:4], torch.randn(4, 8)
    d.eval()   # freeze the SN power iteration: the loss is a fixed function of the weights

    def losses():
        s = GANStep(0, "joint", real, c, cond_fake=c, fake=method.generate(g, z, c))
        s.out_real, s.out_fake = method.d_forward(d, s)
        return sum(method.d_loss(s).values()), sum(method.g_loss(s).values())

    for which, model, lr in (("d", d, 1e-4), ("g", g, 1e-4)):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        before = losses()[0 if which == "d" else 1]
        before.backward()
        opt.step()
        after = losses()[0 if which == "d" else 1]
        assert float(after.detach()) < float(before.detach()), which
        for p in list(g.parameters()) + list(d.parameters()):
            p.grad = None


def test_sample_grid_uses_fixed_captions_and_ema(tmp_path):
    method, models, _ = _setup(tmp_path)
    ctx = _Ctx(models, {})
    ctx.ema = {"g": copy.deepcopy(models["g"]).eval()}
    imgs = method.sample(ctx)
    assert imgs.shape == (4, 3, 32, 32) and imgs.min() >= 0 and imgs.max() <= 1
    torch.testing.assert_close(method.sample(ctx), imgs)
    assert method.grid_captions() == [method.dataset.captions[i][0] for i in range(4)]
    with pytest.raises(ValueError, match="captions of the real batch"):
        method.sample_latents(4, torch.device("cpu"))


def test_text_condition_slices_and_cache(tmp_path):
    method, _, batch = _setup(tmp_path, "text.cache=auto")
    assert method.cache is not None and method.cache.path.parent.name == "text_features"
    images, cond = method.real_batch(batch)
    ref = method._text_encoder().encode(list(batch["caption"]))
    torch.testing.assert_close(cond.words, ref[0].to(cond.words.dtype), atol=2e-3, rtol=2e-3)  # float16 storage
    assert torch.equal(cond.word_mask, ref[1])
    part = cond[2:5]
    assert isinstance(part, TextCondition) and len(part) == 3 and torch.equal(part.sentence, cond.sentence[2:5])


def test_bad_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="pretrained weights"):
        method = XMCGANMethod(_cfg(tmp_path, "model.image_encoder.random_init=false"))
        method.build_models(method.cfg)
    with pytest.raises(ValueError, match="log2"):
        XMCGenerator(image_size=48, channel_multipliers=[4, 2, 1])
    with pytest.raises(ValueError, match="must be >= 0"):
        XMCGANMethod(_cfg(tmp_path, "model.word_weight=-1"))

"""ContraD: the D loss against a transcription of the official loss_D_fn (values and gradients), the
architecture (heads, spectral norm, stop-gradient), G range / latents / save-load, and the GAN step."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tests.test_gan_base import Ctx
from text2image.contrad import (ContraDConfig, ContraDiscriminator, ContraDMethod, SNDCGANGenerator,
                                SNResNet18Backbone, supcon_fake)
from text2image.gan import GANStep
from text2image.layers import is_spectral_normed


# --- official training/criterion.py nt_xent and training/gan/contrad.py (commit 4ac8ce5), written out --
def _nt_xent_official(out1, out2, temperature):
    n = out1.size(0)
    outputs = torch.cat([out1, out2], dim=0)
    sim = outputs @ outputs.t() / temperature
    sim.fill_diagonal_(-5e4)
    sim = F.log_softmax(sim, dim=1)
    return -torch.sum(sim[:n, n:].diag() + sim[n:, :n].diag()) / (2 * n)


def _supcon_fake_official(out1, out2, others, temperature):
    n = out1.size(0)
    outputs = torch.cat([out1, out2, others], dim=0)
    sim = outputs @ outputs.t() / temperature
    sim.fill_diagonal_(-5e4)
    mask = torch.zeros_like(sim)
    mask[2 * n:, 2 * n:] = 1
    mask.fill_diagonal_(0)
    sim, mask = sim[2 * n:], mask[2 * n:]
    mask = mask / mask.sum(1, keepdim=True)
    return -(F.log_softmax(sim, dim=1) * mask).sum(1).mean()


def _loss_d_official(d, augment_fn, images, gen_images, temp, lbd_a, loss):
    gen_images = gen_images.detach()
    n = images.size(0)
    out = d(augment_fn(torch.cat([images, images, gen_images], dim=0)), sg_linear=True)
    d_all, views, reals = out.logits, F.normalize(out.proj1), F.normalize(out.proj2)
    simclr = _nt_xent_official(views[:n], views[n:2 * n], temp)
    sup = _supcon_fake_official(reals[:n], reals[n:2 * n], reals[2 * n:], temp)
    d_real, d_gen = d_all[:n], d_all[2 * n:3 * n]
    if loss == "nonsat":
        pen = F.softplus(d_gen).mean() + F.softplus(-d_real).mean()
    else:
        pen = F.relu(1. + d_gen).mean() + F.relu(1. - d_real).mean()
    return simclr + lbd_a * sup + pen


def _method(tmp_path, **model):
    cfg = ContraDConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    cfg.gan.samples_per_class = 4
    for k, v in dict(arch="tiny", g_channels=4, d_channels=4, d_hidden=16, proj_dim=8, **model).items():
        setattr(cfg.model, k, v)
    return ContraDMethod(cfg)


def _fixed_aug(x):
    """A deterministic stand-in for the random augmentation, shared by both sides."""
    return torch.cat([x[: len(x) // 2].flip(-1), x[len(x) // 2:].roll(3, dims=-2)]) * 0.9 + 0.05


@pytest.mark.parametrize("loss", ["nonsat", "hinge"])
def test_d_loss_equals_official_loss_d_fn(tmp_path, loss):
    torch.manual_seed(0)
    m = _method(tmp_path, loss=loss, lambda_a=0.7)
    m.aug = _fixed_aug
    d = m.build_models(m.cfg)["d"].double().eval()
    real, fake = torch.rand(5, 3, 32, 32, dtype=torch.float64), torch.rand(5, 3, 32, 32, dtype=torch.float64)
    s = GANStep(0, "d", real, None, fake=fake)
    s.out_real, s.out_fake = m.d_forward(d, s)
    ours = sum(m.d_loss(s).values())
    g_ours = torch.autograd.grad(ours, list(d.parameters()))
    ref = _loss_d_official(d, _fixed_aug, real, fake, 0.1, 0.7, loss)
    g_ref = torch.autograd.grad(ref, list(d.parameters()))
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_supcon_fake_helper_matches_official():
    torch.manual_seed(1)
    r1, r2, f = (F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=1) for _ in range(3))
    torch.testing.assert_close(supcon_fake(r1, r2, f, 0.2), _supcon_fake_official(r1, r2, f, 0.2))


def test_discriminator_heads_sn_and_stop_gradient():
    torch.manual_seed(0)
    d = ContraDiscriminator("sndcgan", 32, channels=2)
    assert d.backbone.out_features == 2 * 8 * 4 * 4
    shapes = [tuple(l.weight.shape) for h in (d.projection, d.projection2, d.linear) for l in h if hasattr(l, "weight")]
    assert shapes == [(512, 256), (128, 512), (512, 256), (128, 512), (512, 256), (1, 512)]
    layers = [mod for mod in d.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 7 + 6 and all(is_spectral_normed(mod) for mod in layers)
    assert isinstance(d.projection[1], torch.nn.LeakyReLU) and d.projection[1].negative_slope == 0.1
    out = d(torch.rand(2, 3, 32, 32), sg_linear=True)
    out.logits.sum().backward()
    assert all(p.grad is None for p in d.backbone.parameters())        # stop-gradient under the D head
    assert d.linear[0].parametrizations.weight.original.grad is not None
    d.zero_grad()
    d(torch.rand(2, 3, 32, 32)).logits.sum().backward()                 # the G step goes through everything
    assert all(p.grad is not None for p in d.backbone.parameters())
    r18 = SNResNet18Backbone()
    assert r18(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    assert ContraDiscriminator("snresnet18").linear[0].in_features == 512
    assert ContraDiscriminator("snresnet18").projection[0].out_features == 1024
    with pytest.raises(ValueError, match="32 px"):
        SNResNet18Backbone(64)


def test_generator_range_latents_and_save_load(tmp_path):
    torch.manual_seed(0)
    g = SNDCGANGenerator(32, channels=4)
    z = g.sample_latents(6, torch.Generator().manual_seed(0))
    assert z.shape == (6, 128) and z.min() >= -1 and z.max() <= 1 and z.min() < -0.5
    x = g(z)
    assert x.shape == (6, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    g.save_pretrained(tmp_path / "g")
    g2 = SNDCGANGenerator.from_pretrained(tmp_path / "g")
    assert g2.config.num_classes == 0 and g2.config.latent == "uniform" and list(g2.config.output_range) == [0, 1]
    torch.testing.assert_close(g2.eval()(z, None), g.eval()(z, None))
    with pytest.raises(ValueError, match="unconditional"):
        g(z, torch.zeros(6, dtype=torch.long))


def test_train_step_and_g_loss(tmp_path):
    torch.manual_seed(0)
    m = _method(tmp_path)
    models = m.build_models(m.cfg)
    ctx = Ctx(models, m.build_optimizers(m.cfg, models))
    bn = models["g"].norm_init
    logs = m.train_step((torch.rand(6, 3, 32, 32), torch.zeros(6, dtype=torch.long)), 0, ctx)
    assert ctx.calls == ["d", "g"]
    assert set(logs) == {"d_loss", "g_loss", "d_simclr", "d_supcon_fake", "d_adv", "g_adv"}
    assert int(bn.num_batches_tracked) == 2          # G in train mode in the D step too (official)
    # G loss = softplus(-D(aug(G(z)))) with gradients into G
    m.aug = _fixed_aug
    g, d = models["g"], models["d"].eval()
    z = torch.rand(4, 128) * 2 - 1
    s = GANStep(0, "g", torch.rand(4, 3, 32, 32), None, z=z, fake=g(z))
    s.out_real, s.out_fake = m.g_forward(d, s)
    loss = m.g_loss(s)["g_adv"]
    torch.testing.assert_close(loss, F.softplus(-d(_fixed_aug(s.fake)).logits).mean())
    loss.backward()
    assert g.linear.weight.grad is not None


def test_one_d_step_lowers_d_loss(tmp_path):
    torch.manual_seed(0)
    m = _method(tmp_path)
    m.aug = _fixed_aug
    d = m.build_models(m.cfg)["d"].eval()
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    real, fake = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32)

    def loss():
        s = GANStep(0, "d", real, None, fake=fake)
        s.out_real, s.out_fake = m.d_forward(d, s)
        return sum(m.d_loss(s).values())

    before = loss()
    before.backward()
    opt.step()
    assert float(loss().detach()) < float(before.detach())


def test_unconditional_shapes_scores_against_hand_counts():
    from text2image.contrad import unconditional_shapes_scores

    class Stub:                      # the two ShapesEvaluator methods the scores use
        def __init__(self, logits):
            self.logits = logits

        def features(self, images):
            return None, {"shape": self.logits}

        def evaluate(self, images):
            return {"shapes_fd": 7.0}

    # probabilities (max): 0.97 class 0, 0.97 class 0, ~0.45 class 1, 0.97 class 4
    logits = torch.tensor([[4.0, 0, 0, 0, 0], [4.0, 0, 0, 0, 0], [0, 1.0, 0.9, 0, 0], [0, 0, 0, 0, 4.0]])
    s = unconditional_shapes_scores(Stub(logits), torch.zeros(4, 3, 8, 8), threshold=0.5)
    assert s["confident"] == 0.75 and s["classes_covered"] == 3 and s["shapes_fd"] == 7.0
    assert s["class_histogram"] == [0.5, 0.25, 0.0, 0.0, 0.25]
    import math
    assert s["class_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(5))
    one = unconditional_shapes_scores(Stub(logits[:2]), torch.zeros(2, 3, 8, 8))
    assert one["class_entropy"] == 0.0 and one["confident"] == 1.0
    uniform = unconditional_shapes_scores(Stub(torch.eye(5) * 5), torch.zeros(5, 3, 8, 8))
    assert uniform["class_entropy"] == pytest.approx(1.0)


def test_model_augment_modes_get_their_config_keywords(tmp_path):
    from text2image.augment import ColorJitter, HorizontalFlipRandomCrop, RandomResizedCrop
    jit = (0.2, 0.3, 0.1, 0.05)
    crop = _method(tmp_path, augment="simclr", aug_scale=(0.5, 1.0), aug_jitter=jit).aug.ops
    assert isinstance(crop[0], RandomResizedCrop) and crop[0].scale == (0.5, 1.0)
    assert isinstance(crop[2], ColorJitter) and crop[2].contrast == (0.7, 1.3) and crop[2].hue == (-0.05, 0.05)
    # simclr_hfrt: the integer flip-translate in place of crop + flip, then simclr's colour ops (aug_scale unused)
    hf = _method(tmp_path, augment="simclr_hfrt", aug_scale=(0.5, 1.0), aug_jitter=jit, aug_max_pixels=2,
                 aug_padding="zeros").aug.ops
    assert [type(op).__name__ for op in hf] == ["HorizontalFlipRandomCrop", "ColorJitter", "RandomGrayscale"]
    assert (hf[0].max_pixels, hf[0].padding_mode, hf[0].flip_p) == (2, "zeros", 0.5)
    assert hf[1].contrast == (0.7, 1.3) and hf[1].p == 0.8 and hf[2].p == 0.2
    plain = _method(tmp_path, augment="hfrt").aug
    assert isinstance(plain, HorizontalFlipRandomCrop) and (plain.max_pixels, plain.padding_mode) == (4, "reflection")

"""StyleGAN2 + ContraD (text2image.stylegan2, ContraD ``model.arch: stylegan2``): the official values
transcribed with their sources, every block's shapes at 32 and 64 px, the ops against slow independent
references (modulated conv, upfirdn2d, fused leaky ReLU, minibatch stddev), R1 against autograd, the D
step with and without R1, and gradients into G in the G step."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cmgen.engine.registry import load_config
from tests.test_gan_base import Ctx
from text2image.contrad import ContraDConfig, ContraDiscriminator, ContraDMethod
from text2image.gan import GANStep
from text2image.stylegan2 import (ModulatedConv2d, ResBlock, StyleGAN2Backbone, StyleGAN2Generator, Upsample,
                                  fused_leaky_relu, lazy_r1, make_kernel, minibatch_stddev, r1_due, r1_penalty,
                                  stylegan2_channels, upfirdn2d)

ROOT = Path(__file__).resolve().parents[1]

# --- the official values, github.com/jh-jeong/ContraD at 4ac8ce538cfc5d068da52b960afe5227862162ff ---------
# name: (value, "file:line(s)")
OFFICIAL = {
    "channels_small32": ({4: 512, 8: 512, 16: 256, 32: 128}, "models/gan/stylegan2/generator.py:161-167, "
                                                             "discriminator.py:193-199"),
    "channels_full_cm1": ({4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16},
                          "generator.py:169-179 (256/128/64/32/16 x channel_multiplier), "
                          "models/gan/__init__.py:25-27 (stylegan2_512: channel_multiplier=1.0)"),
    "style_dim": (512, "generator.py:148"),
    "n_mlp": (8, "models/gan/__init__.py:18,25 (n_mlp=8)"),
    "lr_mlp": (0.01, "generator.py:149"),
    "blur_kernel": ((1, 3, 3, 1), "generator.py:149, discriminator.py:192"),
    "modulation_bias_init": (1.0, "generator.py:43"),
    "noise_weight_init": (0.0, "generator.py:88"),
    "latent": ("normal", "generator.py:233-234 (sample_latent: randn)"),
    "output": ("0.5 * rgb + 0.5, clamp in eval", "generator.py:283-286"),
    "style_mix": (0.9, "train_stylegan2_contraD.py:67, train_stylegan2.py:59"),
    "lrelu": ((0.2, math.sqrt(2)), "op/fused_act.py:75"),
    "mbstd_group_features": ((4, 1), "discriminator.py:22"),
    "d_features": ("channels[4] * 4 * 4 = 8192", "discriminator.py:212, 227-235"),
    "d_hidden": (512, "models/gan/__init__.py:20,27 (d_hidden=512)"),
    "d_project": (128, "models/gan/base.py:80"),
    "head_slope": (0.1, "models/gan/base.py:29,94,99"),
    "lr_cifar": (0.002, "configs/gan/stylegan2/c10_style64.gin:6"),
    "lr_afhq": (0.0025, "configs/gan/stylegan2/afhq_dog_style64.gin:6"),
    "betas": ((0.0, 0.99), "c10_style64.gin:7, afhq_dog_style64.gin:7"),
    "batch": (64, "c10_style64.gin:2, afhq_dog_style64.gin:2"),
    "max_steps_cifar": (800000, "c10_style64.gin:4"),
    "max_steps_afhq": (400000, "afhq_dog_style64.gin:4"),
    "n_critic": (1, "c10_style64.gin:5, afhq_dog_style64.gin:5"),
    "loss": ("nonsat", "c10_style64.gin:3, afhq_dog_style64.gin:3"),
    "warmup": (3000, "configs/defaults/gan.gin:6 (--use_warmup: train_stylegan2.py:87-92)"),
    "r1_gamma_cifar": (0.1, "EXPERIMENTS.md:27-28 (--lbd_r1=0.1)"),
    "r1_every_cifar": (1, "EXPERIMENTS.md:28 (--no_lazy), train_stylegan2.py:293-294"),
    "r1_gamma_afhq": (0.5, "EXPERIMENTS.md:79-81 (--lbd_r1=0.5)"),
    "r1_every_afhq": (16, "train_stylegan2_contraD.py:64 (--d_reg_every default 16, lazy)"),
    "r1_argparse_default": (10.0, "train_stylegan2_contraD.py:66 (--lbd_r1 default; every run overrides it)"),
    "lazy_r1": ("0.5 * lbd_r1 * mean_i ||grad_i||^2 * d_reg_every", "train_stylegan2_contraD.py:133-135, 224"),
    "r1_steps": ("step % d_reg_every == 0, steps from 1", "train_stylegan2_contraD.py:182-183"),
    "halflife_k_cifar": (1000, "EXPERIMENTS.md:28 (--halflife_k=1000)"),
    "halflife_k_afhq": (20, "EXPERIMENTS.md:80 (--halflife_k=20), train_stylegan2_contraD.py:68"),
    "ema": ("accum = 0.5 ** (B / (halflife_k 1000)), copy while step B <= ema_start_k 1000 (= halflife_k)",
            "train_stylegan2_contraD.py:194-196, 312-315; utils.py:130-143 (buffers copied)"),
    "aug_cifar": ("simclr", "EXPERIMENTS.md:27"),
    "aug_afhq_dog": ("simclr_hq", "EXPERIMENTS.md:80"),
    "aug_afhq_scale_jitter": (((0.08, 1.0), (0.8, 0.8, 0.8, 0.2)), "afhq_dog_style64.gin:16-20"),
    "temperature_lambda": ((0.1, 1.0), "train_stylegan2_contraD.py:56-59"),
    "image_size_afhq": (512, "datasets.py:84 (afhq_*: 512 px)"),
    "path_length_reg": (None, "none: the G step is only softplus(-D(aug(G(z)))), "
                              "train_stylegan2_contraD.py:204-213, 112-114; train_stylegan2.py:184-194"),
}


def _cfg(name):
    return load_config(ROOT / "configs" / "contrad" / f"{name}.yaml", [])


# --- transcribed table ---------------------------------------------------------------------------------
def test_width_tables_equal_official():
    assert stylegan2_channels(32, small32=True) == OFFICIAL["channels_small32"][0]
    assert stylegan2_channels(1024, small32=False, channel_multiplier=1.0) == OFFICIAL["channels_full_cm1"][0]
    assert stylegan2_channels(64, small32=False, channel_multiplier=2.0)[64] == 512
    assert stylegan2_channels(32, base=16) == {4: 16, 8: 16, 16: 8, 32: 4}
    with pytest.raises(ValueError, match="small32"):
        stylegan2_channels(64, small32=True)


def test_full_width_networks_match_the_official_layout():
    """The official 'stylegan2' arch at 32 px (full widths): every layer's weight shape."""
    torch.manual_seed(0)
    g = StyleGAN2Generator(32)
    assert g.style_dim == OFFICIAL["style_dim"][0] and g.n_latent == 8 and g.num_layers == 7
    mapping = [m for m in g.style if hasattr(m, "weight")]
    assert len(mapping) == OFFICIAL["n_mlp"][0]
    assert all(m.lr_mul == OFFICIAL["lr_mlp"][0] and m.weight.shape == (512, 512) for m in mapping)
    assert g.input.const.shape == (1, 512, 4, 4)
    convs = [(c.conv.in_channels, c.conv.out_channels, c.conv.upsample) for c in [g.conv1, *g.convs]]
    assert convs == [(512, 512, False), (512, 512, True), (512, 512, False), (512, 256, True), (256, 256, False),
                     (256, 128, True), (128, 128, False)]
    assert [r.conv.in_channels for r in [g.to_rgb1, *g.to_rgbs]] == [512, 512, 256, 128]
    assert all(c.conv.modulation.bias_init == OFFICIAL["modulation_bias_init"][0] for c in [g.conv1, *g.convs])
    assert all(float(c.noise.weight.detach()) == OFFICIAL["noise_weight_init"][0] for c in [g.conv1, *g.convs])
    assert g.to_rgb1.conv.demodulate is False and g.conv1.conv.demodulate is True
    d = ContraDiscriminator("stylegan2", 32, 512, sn=False)
    bb = d.backbone
    assert bb.blocks[0][0].weight.shape == (128, 3, 1, 1)                       # FromRGB
    res = [(b.conv1[0].weight.shape[1], b.conv2[-2].weight.shape[0]) for b in bb.blocks[1:]]
    assert res == [(128, 256), (256, 512), (512, 512)]
    assert bb.last_conv[0].weight.shape == (512, 513, 3, 3)
    assert bb.out_features == 8192
    lin = [(l.in_features, l.out_features) for h in (d.projection, d.projection2, d.linear)
           for l in h if isinstance(l, torch.nn.Linear)]
    assert lin == [(8192, 512), (512, 128), (8192, 512), (512, 128), (8192, 512), (512, 1)]
    assert d.projection[1].negative_slope == OFFICIAL["head_slope"][0]


@pytest.mark.parametrize("name,lr,steps,gamma,every,k,aug,size,passes", [
    ("cifar10_stylegan2", "lr_cifar", "max_steps_cifar", "r1_gamma_cifar", "r1_every_cifar", "halflife_k_cifar",
     "aug_cifar", 32, "joint"),
    ("cifar100_stylegan2", "lr_cifar", "max_steps_cifar", "r1_gamma_cifar", "r1_every_cifar", "halflife_k_cifar",
     "aug_cifar", 32, "joint"),
    ("afhq_stylegan2", "lr_afhq", "max_steps_afhq", "r1_gamma_afhq", "r1_every_afhq", "halflife_k_afhq",
     "aug_afhq_dog", 512, "separate"),
])
def test_configs_hold_the_official_values(name, lr, steps, gamma, every, k, aug, size, passes):
    cfg = _cfg(name)
    m, b = cfg.model, OFFICIAL["batch"][0]
    assert cfg.method == "contrad" and m.arch == "stylegan2" and not m.sn
    assert cfg.optim.name == "adam" and cfg.optim.lr == OFFICIAL[lr][0] and cfg.gan.d_optim is None
    assert tuple(cfg.optim.betas) == OFFICIAL["betas"][0]
    assert cfg.train.batch_size == b and cfg.train.max_steps == OFFICIAL[steps][0]
    assert cfg.gan.n_dis == OFFICIAL["n_critic"][0] and m.loss == OFFICIAL["loss"][0]
    assert cfg.schedule.kind == "constant" and cfg.schedule.warmup_steps == OFFICIAL["warmup"][0]
    assert m.r1_gamma == OFFICIAL[gamma][0] and m.r1_every == OFFICIAL[every][0]
    assert m.z_dim == OFFICIAL["style_dim"][0] and m.sg_n_mlp == OFFICIAL["n_mlp"][0] and m.latent == "normal"
    assert m.sg_lr_mlp == OFFICIAL["lr_mlp"][0] and m.style_mix == OFFICIAL["style_mix"][0]
    assert m.g_channels == m.d_channels == 512 and m.d_hidden == OFFICIAL["d_hidden"][0]
    assert m.proj_dim == OFFICIAL["d_project"][0] and (m.temperature, m.lambda_a) == OFFICIAL["temperature_lambda"][0]
    assert m.augment == OFFICIAL[aug][0] and m.image_size == size and m.d_passes == passes
    assert m.sg_small32 == (size == 32) and (size == 32 or m.sg_channel_multiplier == 1.0)
    if size == 512:
        assert (tuple(m.aug_scale), tuple(m.aug_jitter)) == OFFICIAL["aug_afhq_scale_jitter"][0]
    # EMA: decay 0.5 ** (B / (halflife_k * 1000)); the official copies G into G-EMA at its step s (before
    # the s-th update) while s B <= halflife_k 1000, the engine after `done` updates while done <= start_step
    kimg = OFFICIAL[k][0] * 1000
    assert cfg.ema.models == ["g"] and cfg.ema.buffers == "copy"
    assert cfg.ema.decay == pytest.approx(0.5 ** (b / kimg), rel=0, abs=1e-15)
    assert cfg.ema.start_step == max(done for done in range(kimg) if (done + 1) * b <= kimg)
    assert cfg.data.hflip


# --- shapes of every block ------------------------------------------------------------------------------
@pytest.mark.parametrize("size,small32", [(32, True), (64, False)])
def test_block_shapes(size, small32):
    torch.manual_seed(0)
    base, b = 16, 4
    chan = stylegan2_channels(size, small32, 1.0, base)
    g = StyleGAN2Generator(size, style_dim=8, n_mlp=2, channels=base, small32=small32, channel_multiplier=1.0)
    seen = []
    for mod in [g.conv1, g.to_rgb1, *g.convs, *g.to_rgbs]:
        mod.register_forward_hook(lambda m, i, o: seen.append((m, tuple(o.shape))))
    x = g(g.sample_latents(b))
    assert x.shape == (b, 3, size, size)
    want = {g.conv1: (b, chan[4], 4, 4), g.to_rgb1: (b, 3, 4, 4)}
    for j, r in enumerate(range(3, int(math.log2(size)) + 1)):
        res = 2 ** r
        want[g.convs[2 * j]] = want[g.convs[2 * j + 1]] = (b, chan[res], res, res)
        want[g.to_rgbs[j]] = (b, 3, res, res)
    assert len(seen) == len(want) and all(shape == want[m] for m, shape in seen)

    bb = StyleGAN2Backbone(size, base, small32, 1.0)
    shapes, h = [], torch.rand(b, 3, size, size) * 2 - 1
    for blk in bb.blocks:
        h = blk(h)
        shapes.append(tuple(h.shape))
    want_d = [(b, chan[size], size, size)] + [(b, chan[2 ** (r - 1)], 2 ** (r - 1), 2 ** (r - 1))
                                              for r in range(int(math.log2(size)), 2, -1)]
    assert shapes == want_d
    assert tuple(minibatch_stddev(h).shape) == (b, chan[4] + 1, 4, 4)
    assert bb(torch.rand(b, 3, size, size)).shape == (b, chan[4] * 16) == (b, bb.out_features)


def test_generator_range_style_mixing_and_save_load(tmp_path):
    torch.manual_seed(0)
    g = StyleGAN2Generator(16, style_dim=8, n_mlp=2, channels=8, small32=False)
    z = g.sample_latents(64, torch.Generator().manual_seed(0))
    assert z.shape == (64, 8) and z.min() < -1.5 and z.max() > 1.5                   # N(0, I), not U(-1, 1)
    # style mixing: with p = 0.9 a sample switches to the second w from a random layer on
    w, w2 = torch.zeros(4000, 8), torch.ones(4000, 8)
    lat = g.mix_styles(w, w2, 0.9)
    switched = lat[:, :, 0]                                  # 0 = own w, 1 = mixing w, per layer
    assert torch.all(switched[:, 1:] >= switched[:, :-1])    # once switched, for every later layer
    unmixed = (switched.sum(1) == 0).double().mean()
    assert abs(unmixed - 0.1) < 0.03                         # P(no switch) = 1 - 0.9
    first = switched.argmax(1)[switched.sum(1) > 0]          # uniform switch index over the 6 styles
    assert first.bincount(minlength=g.n_latent).min() > 0
    assert torch.equal(g.mix_styles(w, w2, 0.0), torch.zeros(4000, g.n_latent, 8))
    g.eval()
    x = g(z[:4])
    assert x.min() >= 0 and x.max() <= 1                     # clamped in eval mode only
    g.save_pretrained(tmp_path / "g")
    g2 = StyleGAN2Generator.from_pretrained(tmp_path / "g").eval()
    noise = [torch.randn(1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2)) for i in range(g.num_layers)]
    torch.testing.assert_close(g2(z[:4], noise=noise), g(z[:4], noise=noise))
    with pytest.raises(ValueError, match="unconditional"):
        g(z, torch.zeros(64, dtype=torch.long))


# --- ops against slow references ------------------------------------------------------------------------
def _upfirdn_ref(x, k, up, down, px0, px1, py0, py1):
    """Loop definition: out[o] = sum_t u_pad[o down + t] k[kh - 1 - t], u = zero-inserted input."""
    b, c, h, w = x.shape
    kh, kw = k.shape
    oh = (h * up + py0 + py1 - kh) // down + 1
    ow = (w * up + px0 + px1 - kw) // down + 1
    out = torch.zeros(b, c, oh, ow, dtype=torch.float64)
    for oy in range(oh):
        for ox in range(ow):
            for ty in range(kh):
                qy = oy * down + ty - py0
                if not (0 <= qy < h * up) or qy % up:
                    continue
                for tx in range(kw):
                    qx = ox * down + tx - px0
                    if 0 <= qx < w * up and qx % up == 0:
                        out[:, :, oy, ox] += x[:, :, qy // up, qx // up] * k[kh - 1 - ty, kw - 1 - tx]
    return out


@pytest.mark.parametrize("up,down,pad", [
    (2, 1, (2, 1)),            # Upsample (ToRGB skip): kernel x 4, pad ((p + 1) // 2 + 1, p // 2)
    (1, 1, (1, 1)),            # Blur after the modulated transposed conv
    (1, 1, (2, 2)),            # Blur before the stride-2 3x3 conv (D)
    (1, 2, (1, 1)),            # a Downsample-style filter
    (2, 2, (1, 0, -1, 2)),     # per-axis and negative (cropping) pads
    (3, 1, (0, 0)),
])
def test_upfirdn2d_equals_loop_reference(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    k = torch.rand(4, 3, dtype=torch.float64)               # asymmetric: the flip matters
    p4 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else pad
    torch.testing.assert_close(upfirdn2d(x, k, up, down, pad), _upfirdn_ref(x, k, up, down, *p4))
    kk = make_kernel([1, 3, 3, 1]).double()
    torch.testing.assert_close(upfirdn2d(x, kk, up, down, pad), _upfirdn_ref(x, kk, up, down, *p4))


def test_upfirdn2d_twice_differentiable_and_resampling_sizes():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    k = torch.rand(4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: upfirdn2d(t, k, 2, 1, (2, 1)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: upfirdn2d(t, k, 1, 2, (1, 1)), (x,))
    assert Upsample([1, 3, 3, 1])(torch.rand(1, 1, 8, 8)).shape == (1, 1, 16, 16)
    # the upsampling FIR keeps a constant image constant (kernel x factor^2 away from the borders)
    const = Upsample([1, 3, 3, 1])(torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(const[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))


def test_fused_leaky_relu_and_minibatch_stddev_references():
    torch.manual_seed(0)
    x, bias = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = x + bias[None, :, None, None]
    torch.testing.assert_close(fused_leaky_relu(x, bias), torch.where(y >= 0, y, 0.2 * y) * math.sqrt(2))
    h = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    out = minibatch_stddev(h)
    assert out.shape == (8, 6, 3, 3) and torch.equal(out[:, :5], h)
    for i in range(8):                           # groups by stride: {i mod 2, i mod 2 + 2, + 4, + 6}
        grp = h[i % 2::2]
        ref = torch.sqrt(grp.var(0, unbiased=False) + 1e-8).mean()
        torch.testing.assert_close(out[i, 5], torch.full((3, 3), float(ref), dtype=torch.float64))
    assert minibatch_stddev(h[:3]).shape == (3, 6, 3, 3)       # batch < 4: one group of the whole batch
    with pytest.raises(ValueError, match="divisible"):
        minibatch_stddev(h[:6])


@pytest.mark.parametrize("upsample,demodulate,k", [(False, True, 3), (True, True, 3), (False, False, 1)])
def test_modulated_conv_equals_per_sample_reference(upsample, demodulate, k):
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 4, k, style_dim=5, demodulate=demodulate, upsample=upsample).double()
    with torch.no_grad():
        conv.modulation.bias.normal_()
    x, style = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    out = conv(x, style)
    w0 = conv.weight[0].detach()                                            # (out, in, k, k), N(0, 1)
    a = conv.modulation
    for b in range(3):
        s = style[b] @ (a.weight * a.lr_mul / math.sqrt(5)).T + a.bias * a.lr_mul + 1.0   # bias_init 1
        w = w0 / math.sqrt(3 * k * k) * s[None, :, None, None]
        if demodulate:
            w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if upsample:
            y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)            # 6 -> 13
            kk = make_kernel([1, 3, 3, 1]).double() * 4
            y = _upfirdn_ref(y, kk, 1, 1, 1, 1, 1, 1)                                 # 13 -> 12
        else:
            y = F.conv2d(x[b:b + 1], w, padding=k // 2)
        torch.testing.assert_close(out[b:b + 1], y)
    assert out.shape == (3, 4, 12 if upsample else 6, 12 if upsample else 6)


# --- R1 --------------------------------------------------------------------------------------------------
def test_r1_equals_autograd_reference_on_a_tiny_d():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Softplus(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 1)).double()
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    r1 = r1_penalty(net, x)
    grads = []
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_(True)
        grads.append(torch.autograd.grad(net(xi).sum(), xi)[0].pow(2).sum())
    ref = torch.stack(grads)
    torch.testing.assert_close(r1, ref)
    gamma, every = 0.1, 16
    loss = lazy_r1(r1, gamma, every)
    torch.testing.assert_close(loss, gamma / 2 * ref.mean() * every)
    # the penalty trains D: its parameter gradient equals a central finite difference
    loss.backward()
    p = net[0].weight
    eps, idx = 1e-6, (1, 2, 0, 1)
    with torch.no_grad():
        p[idx] += eps
        up = lazy_r1(r1_penalty(net, x), gamma, every).detach()
        p[idx] -= 2 * eps
        dn = lazy_r1(r1_penalty(net, x), gamma, every).detach()
        p[idx] += eps
    torch.testing.assert_close(p.grad[idx], (up - dn) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_r1_on_the_stylegan2_d_couples_the_batch_through_minibatch_stddev():
    """R1 = ||d sum_j D(x)_j / d x_i||^2 (the official ``d_real.sum()``), which through the minibatch
    stddev includes other samples' logits: compared with the full Jacobian."""
    torch.manual_seed(0)
    d = ContraDiscriminator("stylegan2", 8, channels=4, hidden=8, proj_dim=4, sn=False, small32=False).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: d(t).logits, x)           # (4, 4, 3, 8, 8)
    ref = jac.sum(0).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(r1_penalty(lambda t: d(t).logits, x), ref)


def test_r1_steps():
    assert [s for s in range(40) if r1_due(s, 16)] == [15, 31]          # official steps 16, 32 (from 1)
    assert all(r1_due(s, 1) for s in range(5))
    with pytest.raises(ValueError):
        r1_due(0, 0)


def _method(tmp_path, **model):
    cfg = ContraDConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    cfg.gan.samples_per_class = 4
    cfg.optim.lr, cfg.optim.betas = 0.002, (0.0, 0.99)
    for k, v in dict(arch="stylegan2", image_size=16, sn=False, z_dim=8, latent="normal", g_channels=8,
                     d_channels=8, sg_small32=False, sg_n_mlp=2, d_hidden=16, proj_dim=8, **model).items():
        setattr(cfg.model, k, v)
    return ContraDMethod(cfg)


def test_r1_gamma_defaults_and_checks(tmp_path):
    assert ContraDMethod(ContraDConfig()).r1_gamma == 0.0                   # SNDCGAN: no R1 (train_gan.py)
    assert _method(tmp_path).r1_gamma == OFFICIAL["r1_gamma_cifar"][0]       # stylegan2: 0.1 unless set
    assert _method(tmp_path, r1_gamma=0.5).r1_gamma == 0.5
    with pytest.raises(ValueError, match="r1_every"):
        _method(tmp_path, r1_every=0)
    with pytest.raises(ValueError, match="spectral norm"):
        ContraDiscriminator("stylegan2", 16, 8, sn=True, small32=False)


@pytest.mark.parametrize("passes", ["joint", "separate"])
def test_d_step_on_and_off_the_r1_interval(tmp_path, passes):
    """Same seed, same reals and fakes: the D terms on an R1 step (engine step 3, interval 4) equal the
    off-step's (step 2) plus d_r1 = gamma / 2 * mean R1(aug(x)) * 4; so do the D gradients."""
    gamma, every = 0.3, 4
    m = _method(tmp_path, r1_gamma=gamma, r1_every=every, d_passes=passes)
    torch.manual_seed(0)
    models = m.build_models(m.cfg)
    d = models["d"].double()
    real, fake = torch.rand(4, 3, 16, 16, dtype=torch.float64), torch.rand(4, 3, 16, 16, dtype=torch.float64)
    ctx = Ctx({"d": d}, {})
    terms, grads = {}, {}
    for step in (2, 3):
        torch.manual_seed(1)
        s = GANStep(step, "d", real, None, fake=fake, ctx=ctx)
        s.out_real, s.out_fake = m.d_forward(d, s)
        terms[step] = m.d_loss(s)
        grads[step] = torch.autograd.grad(sum(terms[step].values()), list(d.parameters()), allow_unused=True,
                                          retain_graph=True)
    assert set(terms[2]) == {"d_simclr", "d_supcon_fake", "d_adv"}
    assert set(terms[3]) == set(terms[2]) | {"d_r1"}
    for k in terms[2]:
        torch.testing.assert_close(terms[3][k], terms[2][k])
    # the R1 term on its own: R1's aug(x) is the draw right after the D pass's augmentations
    torch.manual_seed(1)
    s = GANStep(3, "d", real, None, fake=fake, ctx=ctx)
    m.d_forward(d, s)
    r1 = s.extras["r1"]
    torch.manual_seed(1)
    m.d_forward(d, GANStep(2, "d", real, None, fake=fake, ctx=ctx))                # the D pass alone
    x_aug = m.aug(real)
    torch.testing.assert_close(r1, r1_penalty(lambda t: d(t).logits, x_aug))
    torch.testing.assert_close(terms[3]["d_r1"], gamma / 2 * r1.mean() * every)
    g_r1 = torch.autograd.grad(terms[3]["d_r1"], list(d.parameters()), allow_unused=True)
    for on, off, extra in zip(grads[3], grads[2], g_r1):
        off = torch.zeros_like(on) if off is None else off
        extra = torch.zeros_like(on) if extra is None else extra
        torch.testing.assert_close(on, off + extra)
    assert any(e is not None and e.abs().sum() > 0 for e in g_r1)


def test_separate_passes_see_fakes_alone(tmp_path):
    m = _method(tmp_path, d_passes="separate", augment="none", r1_gamma=0.0)
    torch.manual_seed(0)
    d = m.build_models(m.cfg)["d"]
    real, fake = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    out_r, out_f = m.d_forward(d, GANStep(0, "d", real, None, fake=fake))
    assert out_r.logits.shape == (8,) and out_f.logits.shape == (4,)
    torch.testing.assert_close(out_f.logits, d(fake).logits)
    torch.testing.assert_close(out_r.logits, d(torch.cat([real, real])).logits)
    joint = _method(tmp_path, augment="none", r1_gamma=0.0)
    _, out_fj = joint.d_forward(d, GANStep(0, "d", real, None, fake=fake))
    assert not torch.allclose(out_fj.logits, out_f.logits)      # minibatch stddev groups mix reals and fakes


def test_g_step_reaches_every_generator_parameter_and_train_step_runs(tmp_path):
    m = _method(tmp_path)
    torch.manual_seed(0)
    models = m.build_models(m.cfg)
    g, d = models["g"], models["d"]
    assert isinstance(g, StyleGAN2Generator) and isinstance(d.backbone, StyleGAN2Backbone)
    assert all(isinstance(b, ResBlock) for b in d.backbone.blocks[1:])
    ctx = Ctx(models, m.build_optimizers(m.cfg, models))
    real = torch.rand(4, 3, 16, 16)
    s = m.new_step(0, "g", real, None, ctx)
    s.fake = m.generate(g, s.z, s.cond_fake)
    with ctx.frozen("d"):
        s.out_real, s.out_fake = m.g_forward(d, s)
        loss = m.g_loss(s)["g_adv"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())
    assert all(p.grad is None for p in d.parameters())
    g.zero_grad()
    before = [p.detach().clone() for p in g.parameters()]
    logs = m.train_step((real, torch.zeros(4, dtype=torch.long)), 0, ctx)       # r1_every 1: R1 every step
    assert ctx.calls == ["d", "g"] and "d_r1" in logs and torch.isfinite(logs["d_r1"])
    assert all(not torch.equal(a, p) for a, p in zip(before, g.parameters()))

"""text2image.augment: range, gradients, identity at p = 0, determinism, shapes, and per-op statistics
against the definitions transcribed from ContraD (augment/*.py) and DiffAugment (DiffAugment_pytorch.py)."""
import math

import pytest
import torch

from text2image.augment import AUGMENT_NAMES, build_augment

NAMES_KW = [("none", {}), ("simclr", {}), ("simclr_hq", {}), ("simclr_hq_cutout", {}), ("cutout", {}),
            ("diffaug", {"clamp": True}), ("hfrt", {}), ("hfrt", {"padding_mode": "zeros"}), ("simclr_hfrt", {})]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(*shape, seed: int = 0) -> torch.Tensor:
    x = torch.rand(*shape, generator=gen(seed))
    x[:, :, 0, 0], x[:, :, -1, -1] = 0.0, 1.0                  # include the range ends
    return x


@pytest.mark.parametrize("name,kw", NAMES_KW)
@pytest.mark.parametrize("shape", [(16, 3, 32, 32), (1, 3, 21, 37), (4, 3, 40, 24)])
def test_range_shape_and_gradient(name, kw, shape):
    x = images(*shape).requires_grad_(True)
    y = build_augment(name, **kw)(x, gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.detach().min()) >= 0.0 and float(y.detach().max()) <= 1.0
    y.mul(torch.rand(y.shape, generator=gen(2))).sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0.0


@pytest.mark.parametrize("name", ["simclr", "simclr_hq", "diffaug", "hfrt", "simclr_hfrt"])
def test_deterministic_under_seeded_generator(name):
    x = images(8, 3, 32, 32)
    aug = build_augment(name)
    a, b, c = aug(x, gen(5)), aug(x, gen(5)), aug(x, gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_p_zero_and_none_are_identity():
    x = images(6, 3, 24, 32)
    zero = {"crop_p": 0.0, "flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0}
    for aug in [build_augment("none"), build_augment("simclr", **zero),
                build_augment("simclr_hq", blur_p=0.0, **zero), build_augment("cutout", p=0.0),
                build_augment("diffaug", p=0.0), build_augment("diffaug", p=0.0, input_range=(-1, 1)),
                build_augment("hfrt", p=0.0), build_augment("hfrt", max_pixels=0, flip_p=0.0),
                build_augment("simclr_hfrt", hfrt_p=0.0, jitter_p=0.0, gray_p=0.0)]:
        assert torch.equal(aug(x, gen()), x)


@pytest.mark.parametrize("name,kw,shown", [
    ("simclr2", {}, "simclr2"), ("simclr", {"gray_p": 1.5}, "1.5"), ("cutout", {"p": -0.1}, "-0.1"),
    ("diffaug", {"policy": "color,zoom"}, "zoom"), ("simclr", {"flip": 0.5}, "flip"),
    ("cutout", {"length": 0}, "0"), ("simclr", {"scale": (0.0, 1.0)}, "(0.0, 1.0)"),
    ("simclr", {"hue": 0.7}, "0.7"), ("diffaug", {"input_range": (1, 0)}, "(1, 0)"),
    ("hfrt", {"max_pixels": -1}, "-1"), ("hfrt", {"padding_mode": "wrap"}, "wrap"),
    ("hfrt", {"flip_p": 2.0}, "2.0"), ("simclr_hfrt", {"scale": (0.5, 1.0)}, "scale")])
def test_bad_arguments_raise_value_error_naming_value(name, kw, shown):
    with pytest.raises(ValueError) as e:
        build_augment(name, **kw)
    assert shown in str(e.value)
    assert set(AUGMENT_NAMES) >= {"none", "simclr", "simclr_hq", "cutout", "diffaug", "hfrt", "simclr_hfrt"}


# --------------------------------------------------------------------------------------------------
# helpers for the statistics tests

from scipy import stats  # noqa: E402

from text2image.augment import (ColorJitter, Cutout, DiffAugment, HorizontalFlipRandomCrop,  # noqa: E402
                                RandomGaussianBlur, RandomGrayscale, RandomHorizontalFlip, RandomResizedCrop,
                                hsv_to_rgb, rgb_to_hsv)


def ks_uniform(v: torch.Tensor, lo: float, hi: float) -> float:
    """p-value of the KS test of ``v`` against U(lo, hi)."""
    return stats.kstest(v.double().flatten().numpy(), stats.uniform(loc=lo, scale=hi - lo).cdf).pvalue


def binomial_ok(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


def changed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x != y).flatten(1).any(1)


def constant_colours(n: int, seed: int, vmax: float = 0.7, smax: float = 0.7) -> torch.Tensor:
    """``(n, 3, 4, 4)`` images of one random colour each, value <= vmax and saturation <= smax."""
    g = gen(seed)
    hsv = torch.stack([torch.rand(n, generator=g), 0.1 + (smax - 0.1) * torch.rand(n, generator=g),
                       0.1 + (vmax - 0.1) * torch.rand(n, generator=g)], 1).double()
    return hsv_to_rgb(hsv.view(n, 3, 1, 1)).expand(n, 3, 4, 4).contiguous()


# --------------------------------------------------------------------------------------------------
# spatial ops

def test_flip_frequency_and_exactness():
    x = images(4000, 3, 6, 10)
    y = RandomHorizontalFlip(p=0.5)(x, gen(1))
    flipped = changed(x, y)
    assert binomial_ok(int(flipped.sum()), 4000, 0.5)
    assert torch.equal(y[flipped], x[flipped].flip(-1)) and torch.equal(y[~flipped], x[~flipped])


def crop_area_cdf(a, lo=0.2, r=4 / 3):
    """CDF of the accepted area fraction: a ~ U(lo, 1), log ratio ~ U(-log r, log r), kept if the box fits
    (a r' <= 1 and a / r' <= 1), i.e. with probability min(1, -log(a) / log(r))."""
    L, a0 = math.log(r), 1 / r
    a = torch.as_tensor(a, dtype=torch.float64).clamp(lo, 1.0)

    def mass(t):                                      # integral from lo to t of the acceptance probability
        tail = (torch.clamp(t, min=a0) * (1 - torch.log(torch.clamp(t, min=a0))) - a0 * (1 - math.log(a0))) / L
        return torch.clamp(t, max=a0) - lo + tail
    return (mass(a) / mass(torch.tensor(1.0, dtype=torch.float64))).numpy()


def test_crop_area_and_ratio_distribution():
    H = W = 256
    theta = RandomResizedCrop().sample_params(torch.zeros(1, 1, 1, 1).expand(20000, 3, H, W), gen(3))["theta"]
    sx, sy, bx, by = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    area = sx * sy
    assert float(area.min()) >= 0.2 - 2 / H and float(area.max()) <= 1.0
    assert stats.kstest(area.numpy(), crop_area_cdf).pvalue > 1e-3
    # a uniform area (no rejection of boxes that do not fit) is rejected by the same test
    assert stats.kstest(area.numpy(), stats.uniform(0.2, 0.8).cdf).pvalue < 1e-6
    log_ratio = torch.log((sx * W) / (sy * H))
    assert float(log_ratio.abs().max()) <= math.log(4 / 3) + 2 / (0.2 ** 0.5 * H)
    assert abs(float(log_ratio.mean())) < 0.01
    # the box stays inside the image, its offset in half-pixel steps k / W
    assert bool(((bx.abs() + sx) <= 1 + 1e-12).all() and ((by.abs() + sy) <= 1 + 1e-12).all())
    assert torch.allclose(bx * W, torch.round(bx * W), atol=1e-9)
    k = torch.round(bx * W) - (sx * W - W)                 # k - (w - W) is uniform on [0, 2 (W - w)]
    u = (k + torch.rand(k.shape, generator=gen(4), dtype=torch.float64)) / (2 * (W - sx * W) + 1)
    assert ks_uniform(u, 0.0, 1.0) > 1e-3


def test_crop_output_follows_theta_on_a_ramp_non_square():
    B, H, W = 64, 32, 48
    ramp_x = ((torch.arange(W) + 0.5) / W).view(1, 1, 1, W).expand(B, 1, H, W)
    ramp_y = ((torch.arange(H) + 0.5) / H).view(1, 1, H, 1).expand(B, 1, H, W)
    x = torch.cat([ramp_x, ramp_y, torch.full((B, 1, H, W), 0.5)], 1).double()
    crop = RandomResizedCrop()
    theta = crop.sample_params(x, gen(7))["theta"]
    y = crop.apply(x, {"theta": theta})
    j, i = W // 2, H // 2
    sx = (y[:, 0, i, j] - y[:, 0, i, j - 1]) * W          # slope of the ramp = crop width fraction
    sy = (y[:, 1, i, j] - y[:, 1, i - 1, j]) * H
    bx = y[:, 0, i, j - 1: j + 1].mean(1) * 2 - 1          # centre of the crop in normalised coordinates
    by = y[:, 1, i - 1: i + 1, j].mean(1) * 2 - 1
    for got, want in [(sx, theta[:, 0, 0]), (sy, theta[:, 1, 1]), (bx, theta[:, 0, 2]), (by, theta[:, 1, 2])]:
        assert torch.allclose(got, want, atol=1e-9)
    assert torch.equal(crop(x, gen(7)), y)                 # forward = apply(sample_params)


def contrad_hfrt_reference(x, flip, dx, dy, max_pixels, width, padding_mode):
    """Loop over every output pixel of ContraD HorizontalFlipRandomCrop.forward (augment/spatial.py,
    4ac8ce5) for given draws: theta = [[s, 0, dx / (width / 2)], [0, 1, dy / (width / 2)]], the
    affine_grid point of pixel (i, j) at align_corners=False, unnormalised, reflected or clipped as
    grid_sample pads, then rounded to the nearest pixel (mode='nearest')."""
    B, C, H, W = x.shape
    out = torch.zeros_like(x)

    def pad(coord, n):                        # grid_sample's padding at align_corners=False, in pixels
        if padding_mode == "border":
            return min(max(coord, 0.0), n - 1.0), True
        if padding_mode == "reflection":
            span = 2.0 * n                    # reflect about -0.5 and n - 0.5, then clip
            c = abs(coord + 0.5) % span
            c = (c if c <= n else span - c) - 0.5
            return min(max(c, 0.0), n - 1.0), True
        return coord, -0.5 <= coord < n - 0.5
    for b in range(B):
        s = -1.0 if bool(flip[b]) else 1.0
        tx, ty = int(dx[b]) / (width / 2), int(dy[b]) / (width / 2)
        for i in range(H):
            for j in range(W):
                gx = s * ((2 * j + 1) / W - 1) + tx           # theta row 0 times (x, y, 1)
                gy = ((2 * i + 1) / H - 1) + ty               # theta row 1
                px, okx = pad(((gx + 1) * W - 1) / 2, W)
                py, oky = pad(((gy + 1) * H - 1) / 2, H)
                if okx and oky:
                    out[b, :, i, j] = x[b, :, int(round(py)), int(round(px))]
    return out


@pytest.mark.parametrize("padding_mode", ["reflection", "zeros", "border"])
def test_hfrt_matches_official_loop_and_grid_sample(padding_mode):
    from torch.nn.functional import affine_grid, grid_sample
    B, H, W = 24, 12, 12
    x = images(B, 3, H, W)
    op = HorizontalFlipRandomCrop(max_pixels=7, padding_mode=padding_mode)    # 7 of 12 px: reflections
    params = op.sample_params(x, gen(40))
    params["dx"][:2], params["dy"][:2], params["flip"][:2] = torch.tensor([-7, 7]), torch.tensor([7, -7]), True
    y = op.apply(x, params)
    assert torch.equal(y, contrad_hfrt_reference(x, params["flip"], params["dx"], params["dy"], 7, W, padding_mode))
    # the official op's own calls with the same draws (theta, affine_grid, grid_sample nearest)
    theta = torch.eye(2, 3).repeat(B, 1, 1)
    theta[:, 0, 0] = torch.where(params["flip"], -1.0, 1.0)
    theta[:, :, 2] = torch.stack([params["dx"], params["dy"]], 1).float() / (W / 2)
    want = grid_sample(x, affine_grid(theta, list(x.shape), align_corners=False), mode="nearest",
                       padding_mode=padding_mode, align_corners=False)
    assert torch.equal(y, want)
    assert torch.equal(op(x, gen(40))[2:], y[2:])             # forward = apply(sample_params)
    # at 32 px with the official max_pixels = 4 as well
    x32 = images(16, 3, 32, 32)
    op4 = HorizontalFlipRandomCrop(padding_mode=padding_mode)
    p4 = op4.sample_params(x32, gen(41))
    assert torch.equal(op4.apply(x32, p4), contrad_hfrt_reference(x32, p4["flip"], p4["dx"], p4["dy"], 4, 32,
                                                                 padding_mode))


def test_hfrt_flip_only_and_probability():
    x = images(8, 3, 10, 14)
    assert torch.equal(HorizontalFlipRandomCrop(max_pixels=0, flip_p=1.0)(x, gen(42)), x.flip(-1))
    assert torch.equal(HorizontalFlipRandomCrop(max_pixels=0, flip_p=0.0)(x, gen(42)), x)
    z = images(4000, 3, 8, 8)
    y = HorizontalFlipRandomCrop(p=0.5)(z, gen(43))
    # a sample is unchanged when its coin fails or its draw is the identity (no flip, dx = dy = 0)
    assert binomial_ok(int(changed(z, y).sum()), 4000, 0.5 * (1 - 0.5 / 81))


def test_hfrt_translation_and_flip_statistics():
    B, H, W = 8100, 32, 32
    rows = ((torch.arange(H) + 1.0) / (H + 1)).view(1, 1, H, 1).expand(B, 1, H, W)
    cols = ((torch.arange(W) + 1.0) / (W + 1)).view(1, 1, 1, W).expand(B, 1, H, W)
    x = torch.cat([rows, cols, torch.zeros(B, 1, H, W)], 1).double()
    y = build_augment("hfrt")(x, gen(44))                       # official: max_pixels 4, flip 1/2
    dy = torch.round(y[:, 0, H // 2, W // 2] * (H + 1)).long() - (H // 2 + 1)
    src = torch.round(y[:, 1, H // 2, :] * (W + 1)).long() - 1   # (B, W) source column of each output column
    flip = src[:, W // 2 + 1] < src[:, W // 2]                   # columns that read inside the image
    dx = torch.where(flip, src[:, W // 2] - (W - 1 - W // 2), src[:, W // 2] - W // 2)
    assert binomial_ok(int(flip.sum()), B, 0.5)
    for d in (dx, dy):
        assert int(d.min()) == -4 and int(d.max()) == 4
        assert stats.chisquare(torch.bincount(d + 4, minlength=9).numpy()).pvalue > 1e-3
    # dx, dy and the flip are independent: the 9 x 9 x 2 joint histogram is uniform
    joint = torch.bincount((dx + 4) * 18 + (dy + 4) * 2 + flip.long(), minlength=162)
    assert stats.chisquare(joint.numpy()).pvalue > 1e-3
    # a wrong range (e.g. randint's exclusive high: [-4, 3]) fails the same check
    assert stats.chisquare(torch.bincount((dx + 4).clamp(max=7), minlength=9).numpy()).pvalue < 1e-6


@pytest.mark.parametrize("padding_mode", ["reflection", "zeros", "border"])
def test_hfrt_gradient_is_the_read_count(padding_mode):
    x = images(6, 3, 16, 16).requires_grad_(True)
    op = HorizontalFlipRandomCrop(padding_mode=padding_mode)
    params = op.sample_params(x, gen(45))
    w = torch.rand(x.shape, generator=gen(46))
    (op.apply(x, params) * w).sum().backward()
    # d/dx of sum(w * y) = the weights scattered back to the pixels each output read; the reference on
    # 1-based pixel numbers says which pixel each output reads (0: the zeros fill, no pixel)
    ids = torch.arange(1, x.numel() + 1, dtype=torch.float64).view(x.shape)
    read = contrad_hfrt_reference(ids, params["flip"], params["dx"], params["dy"], 4, 16, padding_mode).long()
    assert (padding_mode == "zeros") == bool((read == 0).any())
    want = torch.zeros(x.numel() + 1).index_add_(0, read.flatten(), w.flatten())[1:].view(x.shape)
    assert torch.allclose(x.grad, want, atol=1e-6)
    assert float(x.grad.abs().sum()) > 0


def contrad_cutout_reference(x, top, left, length):
    """Loop transcription of ContraD CutOut: ones of length `length` centred at the drawn pixel."""
    out = x.clone()
    for n in range(x.shape[0]):
        ch, cw = int(top[n]) + length // 2, int(left[n]) + length // 2
        out[n, :, max(ch - length // 2, 0): ch + length // 2 + 1, max(cw - length // 2, 0): cw + length // 2 + 1] = 0
    return out


def test_contrad_cutout_centre_uniform_and_box():
    B, H, W = 6400, 32, 32
    x = torch.ones(B, 3, H, W)
    cut = Cutout(length=15)
    params = cut.sample_params(x, gen(8))
    y = cut.apply(x, params)
    centre = params["top"] + 7
    assert int(centre.min()) == 0 and int(centre.max()) == H - 1
    assert stats.chisquare(torch.bincount(centre, minlength=H).numpy()).pvalue > 1e-3
    assert torch.equal(y[:200], contrad_cutout_reference(x[:200], params["top"], params["left"], 15))
    inside = (centre >= 7) & (centre <= H - 8) & (params["left"] + 7 >= 7) & (params["left"] + 7 <= W - 8)
    assert bool(((1 - y[inside, 0]).sum((1, 2)) == 15 * 15).all())


# --------------------------------------------------------------------------------------------------
# colour ops

def test_hsv_round_trip_and_torchvision_hue():
    import torchvision.transforms.functional as TF
    x = images(8, 3, 9, 7).double()
    x[0] = x[0, :1]                                         # grey image
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-12)
    xf = x.float()
    for h in (-0.1, 0.05, 0.3):
        jit = ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.5, hue_units="turns")
        params = jit.sample_params(xf, gen())
        params["hue"] = torch.full((8,), h, dtype=torch.float64)
        assert torch.allclose(jit.apply(xf, params), TF.adjust_hue(xf, h), atol=1e-5)


def jitter_only(**kw):
    base = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    base.update(kw)
    return ColorJitter(**base)


def test_jitter_brightness_saturation_hue_factors_are_uniform():
    x = constant_colours(3000, seed=1)
    hsv_in = rgb_to_hsv(x)[:, :, 0, 0]
    v = rgb_to_hsv(jitter_only(brightness=0.4)(x, gen(2)))[:, :, 0, 0]
    assert ks_uniform(v[:, 2] / hsv_in[:, 2], 0.6, 1.4) > 1e-3
    assert torch.allclose(v[:, :2], hsv_in[:, :2], atol=1e-9)
    s = rgb_to_hsv(jitter_only(saturation=0.4)(x, gen(3)))[:, :, 0, 0]
    assert ks_uniform(s[:, 1] / hsv_in[:, 1], 0.6, 1.4) > 1e-3
    for units, span in [("contrad", 0.1 * 255 / 360), ("turns", 0.1)]:
        h = rgb_to_hsv(jitter_only(hue=0.1, hue_units=units)(x, gen(4)))[:, 0, 0, 0]
        shift = torch.remainder(h - hsv_in[:, 0] + 0.5, 1.0) - 0.5
        assert ks_uniform(shift, -span, span) > 1e-3


def test_jitter_contrast_factor_uniform_and_per_channel_mean():
    n = 3000
    g = gen(5)
    mean = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    dev = 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(1, 1, 2, 2)
    x = mean + dev                                          # per-channel mean `mean`, deviation +-0.1
    y = jitter_only(contrast=0.4)(x, gen(6))
    factor = (y - mean) / dev
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-9)
    assert ks_uniform(factor[:, 0, 0, 0], 0.6, 1.4) > 1e-3


def test_jitter_order_per_sample_and_batch():
    x = images(64, 3, 8, 8).double()
    jit = ColorJitter()
    params = jit.sample_params(x, gen(9))
    first = params["contrast_first"]
    assert 0 < int(first.sum()) < 64
    assert ColorJitter(order="batch").sample_params(x, gen(9))["contrast_first"].unique().numel() == 1

    def contrast(z, c):
        m = z.mean((2, 3), keepdim=True)
        return ((z - m) * c.view(-1, 1, 1, 1) + m).clamp(0, 1)

    def hsv(z):
        h, s, v = rgb_to_hsv(z).unbind(1)
        h = (h + params["hue"].view(-1, 1, 1) * 255 / 360) % 1
        s = (s * params["saturation"].view(-1, 1, 1)).clamp(0, 1)
        v = (v * params["brightness"].view(-1, 1, 1)).clamp(0, 1)
        return hsv_to_rgb(torch.stack([h, s, v], 1))
    c = params["contrast"]
    want = torch.where(first.view(-1, 1, 1, 1), hsv(contrast(x, c)), contrast(hsv(x), c))
    assert torch.allclose(jit.apply(x, params), want, atol=1e-12)


def test_jitter_probability_and_gradients():
    x = images(4000, 3, 4, 4)
    y = ColorJitter(p=0.8)(x, gen(10))
    assert binomial_ok(int(changed(x, y).sum()), 4000, 0.8)
    # straight-through (official): with contrast off the Jacobian is the identity
    x = images(4, 3, 6, 6).requires_grad_(True)
    w = torch.rand(x.shape, generator=gen(11))
    (ColorJitter(contrast=0.0)(x, gen(12)) * w).sum().backward()
    assert torch.allclose(x.grad, w)
    # autograd: the exact derivative (float64 finite differences, fixed draws)
    xd = (0.1 + 0.8 * torch.rand(2, 3, 3, 3, generator=gen(13), dtype=torch.float64)).requires_grad_(True)
    jit = ColorJitter(hsv_grad="autograd")
    assert torch.autograd.gradcheck(lambda z: jit(z, gen(14)), (xd,), eps=1e-7, atol=1e-5)


def test_grayscale_frequency_and_formula():
    x = images(4000, 3, 3, 5)
    y = RandomGrayscale(p=0.2)(x, gen(15))
    grey = changed(x, y)
    assert binomial_ok(int(grey.sum()), 4000, 0.2)
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(y[grey], lum[grey].unsqueeze(1).expand(-1, 3, -1, -1), atol=1e-6)


def blur_reference(x, sigma):
    """float64 numpy: reflect pad, then the normalised separable Gaussian (kornia get_gaussian_kernel2d)."""
    import numpy as np
    B, C, H, W = x.shape
    k = 2 * int((H // 10) / 2) + 1
    r = k // 2
    out = np.zeros((B, C, H, W))
    for n in range(B):
        g1 = np.exp(-(np.arange(k) - r) ** 2 / (2 * float(sigma[n]) ** 2))
        g2 = np.outer(g1, g1) / np.outer(g1, g1).sum()
        pad = np.pad(x[n].double().numpy(), ((0, 0), (r, r), (r, r)), mode="reflect")
        for a in range(k):
            for b in range(k):
                out[n] += g2[a, b] * pad[:, a: a + H, b: b + W]
    return torch.from_numpy(out)


def test_gaussian_blur_sigma_kernel_and_frequency():
    x = images(3, 3, 40, 24).double()
    blur = RandomGaussianBlur(p=1.0)
    params = blur.sample_params(x, gen(16))
    assert RandomGaussianBlur.kernel_size(40) == 5 and RandomGaussianBlur.kernel_size(19) == 1
    assert torch.allclose(blur.apply(x, params), blur_reference(x, params["sigma"]), atol=1e-12)
    sig = blur.sample_params(torch.zeros(1, 1, 1, 1).expand(5000, 3, 1, 1), gen(17))["sigma"]
    assert ks_uniform(sig, 0.1, 2.0) > 1e-3
    z = images(2000, 3, 20, 20)
    assert binomial_ok(int(changed(z, RandomGaussianBlur(p=0.5)(z, gen(18))).sum()), 2000, 0.5)


# --------------------------------------------------------------------------------------------------
# DiffAugment against a transcription of DiffAugment_pytorch.py (random draws passed in)

def official_translation(x, tx, ty, ratio=0.125):
    """rand_translation with translation_x / translation_y given ((B,) ints)."""
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(x.size(2)),
                                                torch.arange(x.size(3)), indexing="ij")
    grid_x = torch.clamp(grid_x + tx.view(-1, 1, 1) + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + ty.view(-1, 1, 1) + 1, 0, x.size(3) + 1)
    x_pad = torch.nn.functional.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def official_cutout(x, offset_x, offset_y, ratio=0.5):
    """rand_cutout with offset_x / offset_y given ((B,) ints)."""
    cutout_size = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(cutout_size[0]),
                                                torch.arange(cutout_size[1]), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x.view(-1, 1, 1) - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y.view(-1, 1, 1) - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def test_diffaug_matches_official_transcription():
    x = images(32, 3, 24, 40) * 2 - 1
    aug = DiffAugment("color,translation,cutout", input_range=(-1, 1))
    params = aug.sample_params(x, gen(19))
    (kb, b), (ks, s), (kc, c), (kt, t), (kk, cut) = params.items()
    assert [k.split(":")[1] for k in (kb, ks, kc, kt, kk)] == ["brightness", "saturation", "contrast",
                                                              "translation", "cutout"]
    want = x + (b - 0.5).float().view(-1, 1, 1, 1)
    m = want.mean(dim=1, keepdim=True)
    want = (want - m) * (s * 2).float().view(-1, 1, 1, 1) + m
    m = want.mean(dim=[1, 2, 3], keepdim=True)
    want = (want - m) * (c + 0.5).float().view(-1, 1, 1, 1) + m
    want = official_translation(want, t[:, 0], t[:, 1])
    want = official_cutout(want, cut[:, 0] + 12 // 2, cut[:, 1] + 20 // 2)
    assert torch.allclose(aug.apply(x, params), want, atol=1e-6)
    assert torch.allclose(aug(x, gen(19)), want, atol=1e-6)
    # ContraD third_party/diffaug.py: the same in [0, 1] via 2x - 1 and 0.5x + 0.5
    assert torch.allclose(DiffAugment("color,translation,cutout")((x + 1) / 2, gen(19)), (want + 1) / 2, atol=1e-6)


def test_diffaug_colour_factors_uniform():
    x = torch.full((4000, 3, 2, 2), 0.5)
    shift = DiffAugment("brightness")(x, gen(20)) - 0.5
    assert ks_uniform(shift[:, 0, 0, 0], -0.25, 0.25) > 1e-3                 # [0, 1] units
    shift = DiffAugment("brightness", input_range=(-1, 1))(x - 0.5, gen(21)) - (x - 0.5)
    assert ks_uniform(shift[:, 0, 0, 0], -0.5, 0.5) > 1e-3                   # paper units, [-1, 1]
    assert torch.equal(shift, shift[:, :1, :1, :1].expand_as(shift))
    dev = torch.tensor([0.1, -0.05, -0.05], dtype=torch.float64).view(1, 3, 1, 1)
    xs = (0.5 + dev).expand(4000, 3, 2, 2)
    f = (DiffAugment("saturation")(xs, gen(22)) - 0.5) / dev
    assert ks_uniform(f[:, 0, 0, 0], 0.0, 2.0) > 1e-3
    devc = 0.1 * torch.tensor([1.0, -1.0], dtype=torch.float64).view(1, 1, 1, 2)
    xc = (0.5 + devc).expand(4000, 3, 2, 2)
    f = (DiffAugment("contrast")(xc, gen(23)) - 0.5) / devc
    assert ks_uniform(f[:, 0, 0, 0], 0.5, 1.5) > 1e-3


def test_diffaug_translation_bounded_and_uniform_non_square():
    B, H, W = 6000, 20, 44                        # shifts int(20/8 + .5) = 3, int(44/8 + .5) = 6 (not 2, 5)
    rows = ((torch.arange(H) + 1.0) / (H + 1)).view(1, 1, H, 1).expand(B, 1, H, W)
    cols = ((torch.arange(W) + 1.0) / (W + 1)).view(1, 1, 1, W).expand(B, 1, H, W)
    x = torch.cat([rows, cols, torch.zeros(B, 1, H, W)], 1).double()
    y = DiffAugment("translation", input_range=(-1, 1))(x, gen(24))   # fill 0 = outside the image
    th = torch.round(y[:, 0, H // 2, W // 2] * (H + 1)).long() - (H // 2 + 1)
    tw = torch.round(y[:, 1, H // 2, W // 2] * (W + 1)).long() - (W // 2 + 1)
    for t, s in [(th, 3), (tw, 6)]:
        assert int(t.min()) == -s and int(t.max()) == s
        assert stats.chisquare(torch.bincount(t + s, minlength=2 * s + 1).numpy()).pvalue > 1e-3
    assert torch.equal(y[:100], official_translation(x[:100], th[:100], tw[:100]))


def test_diffaug_cutout_area_quarter_and_mean():
    B, H, W = 6000, 24, 40
    x = torch.ones(B, 3, H, W)
    y = DiffAugment("cutout", input_range=(-1, 1))(x, gen(25))
    area = (y[:, 0] == 0).sum((1, 2)).double()
    assert int(area.max()) == (H // 2) * (W // 2)          # (1/2)^2 of the image when fully inside
    assert abs(int(area.max()) / (H * W) - 0.25) < 1e-12

    def mean_len(n, size):                                  # exact mean clipped length over the offsets
        offs = range(0, n + (1 - size % 2))
        return sum(min(o - size // 2 + size, n) - max(o - size // 2, 0) for o in offs) / len(offs)
    want = mean_len(H, 12) * mean_len(W, 20)
    assert abs(float(area.mean()) - want) < 5 * float(area.std()) / math.sqrt(B)


# --------------------------------------------------------------------------------------------------
# ranges, generators, devices

@pytest.mark.parametrize("name", ["simclr", "simclr_hq", "diffaug", "cutout", "hfrt", "simclr_hfrt"])
def test_input_range_minus_one_one_is_the_same_op(name):
    x = images(8, 3, 32, 32)
    a = build_augment(name)(x, gen(26))
    b = build_augment(name, input_range=(-1, 1))(x * 2 - 1, gen(26))
    assert torch.allclose(b, a * 2 - 1, atol=1e-5)


def test_generator_isolates_global_rng():
    x = images(8, 3, 16, 16)
    aug = build_augment("simclr_hq")
    torch.manual_seed(1)
    a = aug(x, gen(27))
    torch.manual_seed(2)
    assert torch.equal(aug(x, gen(27)), a)
    torch.manual_seed(3)
    c = aug(x)
    torch.manual_seed(3)
    assert torch.equal(aug(x), c)                           # no generator: the global RNG


@pytest.mark.cuda
def test_cuda_matches_cpu_with_a_cpu_generator():
    x = images(16, 3, 32, 48)
    for name, kw in NAMES_KW:
        aug = build_augment(name, **kw)
        want = aug.cpu()(x, gen(28))
        xc = x.cuda().requires_grad_(True)
        got = aug.cuda()(xc, gen(28))                       # CPU generator: same draws on the GPU
        assert got.is_cuda and torch.allclose(got.detach().cpu(), want, atol=1e-4)
        got.sum().backward()
        assert torch.isfinite(xc.grad).all()
        assert torch.equal(aug(x.cuda(), torch.Generator("cuda").manual_seed(1)),
                           aug(x.cuda(), torch.Generator("cuda").manual_seed(1)))

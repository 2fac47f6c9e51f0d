"""text2image.augment: range, gradients, identity at p = 0, determinism, shapes, and per-op statistics
against the definitions transcribed from ContraD (augment/*.py) and DiffAugment (DiffAugment_pytorch.py)."""
import math

import pytest
import torch

from text2image.augment import AUGMENT_NAMES, build_augment

NAMES_KW = [("none", {}), ("simclr", {}), ("simclr_hq", {}), ("simclr_hq_cutout", {}), ("cutout", {}),
            ("diffaug", {"clamp": True})]


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


@pytest.mark.parametrize("name", ["simclr", "simclr_hq", "diffaug"])
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
                build_augment("diffaug", p=0.0), build_augment("diffaug", p=0.0, input_range=(-1, 1))]:
        assert torch.equal(aug(x, gen()), x)


@pytest.mark.parametrize("name,kw,shown", [
    ("simclr2", {}, "simclr2"), ("simclr", {"gray_p": 1.5}, "1.5"), ("cutout", {"p": -0.1}, "-0.1"),
    ("diffaug", {"policy": "color,zoom"}, "zoom"), ("simclr", {"flip": 0.5}, "flip"),
    ("cutout", {"length": 0}, "0"), ("simclr", {"scale": (0.0, 1.0)}, "(0.0, 1.0)"),
    ("simclr", {"hue": 0.7}, "0.7"), ("diffaug", {"input_range": (1, 0)}, "(1, 0)")])
def test_bad_arguments_raise_value_error_naming_value(name, kw, shown):
    with pytest.raises(ValueError) as e:
        build_augment(name, **kw)
    assert shown in str(e.value)
    assert set(AUGMENT_NAMES) >= {"none", "simclr", "simclr_hq", "cutout", "diffaug"}

"""FID Inception-v3: parity with pytorch-fid's own network on the same random weights, local weights only,
and the batched extraction loop (folder pipeline == pytorch-fid's get_activations + FID)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import pytorch_fid.fid_score as pfid
import pytorch_fid.inception as pfi
from evaluation import generation as gen
from evaluation.extractors import (CLIPEncoder, InceptionExtractor, RunningStatistics, TorchvisionEncoder, clip_score,
                                   extract, fuse_conv_bn)
from evaluation.inception import (FID_WEIGHTS_URL, WEIGHTS_ENV, InceptionWeightsError, file_sha256,
                                  load_fid_inception, random_state_dict)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(0)


@pytest.fixture(scope="module")
def reference(state):
    """pytorch-fid's InceptionV3 (pool3 block), its weight download answered with our random state dict."""
    mp = pytest.MonkeyPatch()
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: {n: t.clone() for n, t in state.items()})
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    mp.undo()
    return model


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x[3:] = x[3:] * 0.5 + 0.5 * (torch.arange(32) / 31.0)        # brighter, with a gradient: a shifted set
    return x


def test_pool3_parity_with_pytorch_fid(reference, images, tmp_path, state):
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)                                       # loads as is, strict
    ours, info = load_fid_inception(path)
    assert info["sha256"] == file_sha256(path) and info["random_init"] is False and str(path.name) in info["weights"]
    with torch.no_grad():
        ref = reference(images)[0].flatten(1)
        mine = ours(images)
    assert ref.shape == (6, 2048)
    assert ref.std(0).mean() > 1e-3                               # features depend on the input
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    fused = InceptionExtractor(path, device="cpu")
    with torch.no_grad():
        out = fused(images)
    torch.testing.assert_close(out["features"], ref, rtol=1e-4, atol=1e-5)
    assert out["probs"].shape == (6, 1008)
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(6))
    # IS logits are pool3 @ W^T without the bias (improved-gan, torch-fidelity logits_unbiased)
    torch.testing.assert_close(out["probs"], torch.softmax(ref @ state["fc.weight"].T, 1), rtol=1e-4, atol=1e-6)


def test_no_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError, match="pt_inception-2015-12-05") as e:
        load_fid_inception()
    assert FID_WEIGHTS_URL in str(e.value) and WEIGHTS_ENV in str(e.value)
    with pytest.raises(InceptionWeightsError, match="not found"):
        load_fid_inception(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    monkeypatch.setenv(WEIGHTS_ENV, str(bad))
    with pytest.raises(InceptionWeightsError, match="do not fit"):
        load_fid_inception()
    with pytest.raises(ValueError, match="either weights or"):
        load_fid_inception(bad, random_init_for_tests=True)
    _, info = load_fid_inception(random_init_for_tests=True)
    assert info["random_init"] and "TEST ONLY" in info["weights"]


def test_fused_bn_equals_unfused(state, images):
    model, _ = load_fid_inception(random_init_for_tests=True)
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(images[:2]), model(images[:2]), rtol=1e-4, atol=1e-5)


def test_folder_fid_matches_pytorch_fid(reference, images, tmp_path, state):
    """Same PNGs through pytorch-fid's get_activations + calculate_frechet_distance and through ours."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, part in ((a, images[:3]), (b, images[3:])):
        d.mkdir()
        for i, im in enumerate(part):
            arr = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    ext = InceptionExtractor(random_init_for_tests=True, device="cpu")
    fa = extract(ext, a, batch_size=2, statistics=True, progress=False)
    fb = extract(ext, b, batch_size=2, progress=False)
    ref_a = pfid.get_activations(sorted(a.glob("*.png")), reference, batch_size=2, device="cpu", num_workers=0)
    ref_b = pfid.get_activations(sorted(b.glob("*.png")), reference, batch_size=2, device="cpu", num_workers=0)
    np.testing.assert_allclose(fa["features"], ref_a, rtol=1e-4, atol=1e-5)
    mu, sigma = gen.feature_statistics(fa["features"])
    np.testing.assert_allclose(fa["mu"], mu, atol=1e-12)
    np.testing.assert_allclose(fa["sigma"], sigma, atol=1e-12)
    assert gen.fid_from_features(fa["features"], fa["features"], method="eigh") == pytest.approx(0.0, abs=1e-4)
    ours = gen.fid_from_features(fa["features"], fb["features"], method="eigh")
    mr, sr = np.mean(ref_a, 0), np.cov(ref_a, rowvar=False)
    theirs = pfid.calculate_frechet_distance(mr, sr, np.mean(ref_b, 0), np.cov(ref_b, rowvar=False))
    assert theirs > 1e-3
    assert ours == pytest.approx(theirs, rel=1e-3, abs=1e-4)


def test_running_statistics_equal_two_pass():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(103, 7, generator=g, dtype=torch.float64) * 3 + 100.0       # large offset: no cancellation
    rs = RunningStatistics()
    for lo in range(0, 103, 10):
        rs.update(x[lo:lo + 10])
    mu, sigma = rs.result()
    np.testing.assert_allclose(mu, x.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_torchvision_and_clip_encoders_random_init():
    x = torch.rand(2, 3, 32, 32)
    r = TorchvisionEncoder("resnet50", random_init_for_tests=True, device="cpu")(x)
    assert r["features"].shape == (2, 2048) and r["logits"].shape == (2, 1000)
    with pytest.raises(ValueError, match="local torchvision weight file"):
        TorchvisionEncoder("vgg16", None)
    from transformers import CLIPConfig
    cfg = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 99},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=8)
    clip = CLIPEncoder(random_init_for_tests=True, config=cfg, device="cpu")
    img = clip(x)["features"]
    txt = clip.encode_text(input_ids=torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]]))
    assert img.shape == (2, 8) and txt.shape == (2, 8)
    assert clip_score(img, img) == pytest.approx(100.0)
    assert clip_score(img, -img) == 0.0
    assert clip_score(img, txt, w=2.5) <= 2.5

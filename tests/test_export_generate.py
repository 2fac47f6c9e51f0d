"""cmgen export / cmgen generate: a tiny ContraGAN run -> diffusers folder -> the same images from both."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmgen import export_cli, generate_cli
from cmgen.cli import main
from cmgen.generate_cli import EXPORT_META, load_generator, resolve_checkpoint, sample_images

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "contragan" / "shapes.yaml"


@pytest.fixture(scope="session")
def tiny_gan_run(tmp_path_factory):
    """2 steps of the ContraGAN shapes config (EMA on from step 0), one checkpoint."""
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    out = tmp_path_factory.mktemp("gan")
    cfg = load_config(CONFIG, [f"run.output_dir={out}", "run.name=tiny", "train.max_steps=2", "train.sample_every=0",
                               "train.checkpoint_every=2", "train.log_every=1", "train.progress_bar=false",
                               "train.trackers=[]", "data.num_images=64", "gan.n_dis=1", "train.batch_size=8",
                               "ema.start_step=0"])
    return train(cfg).run_dir


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


def test_export_then_generate_gives_the_run_images(tiny_gan_run, tmp_path):
    exported = tmp_path / "exported"
    assert main(["export", str(tiny_gan_run), "--out", str(exported)]) == 0
    meta = json.loads((exported / EXPORT_META).read_text())
    assert meta["class"] == "text2image.contragan:Generator" and meta["source"]["weights"] == "ema"
    assert (exported / "config.json").is_file() and any(exported.glob("*.safetensors"))
    from text2image.contragan import Generator
    assert isinstance(Generator.from_pretrained(str(exported)), Generator)
    with pytest.raises(ValueError, match="not empty"):
        _run(export_cli, [str(tiny_gan_run), "--out", str(exported)])

    from_run = _images(load_generator(tiny_gan_run), 5, 7, class_id=2)
    from_export = _images(load_generator(exported), 5, 7, class_id=2)
    torch.testing.assert_close(from_export, from_run, rtol=1e-5, atol=1e-6)

    grid, grid2, single = tmp_path / "g.png", tmp_path / "g2.png", tmp_path / "single"
    assert main(["generate", str(exported), "--n", "4", "--class", "square", "--seed", "3", "--out", str(grid),
                 "--out-dir", str(single), "--device", "cpu"]) == 0
    assert main(["generate", str(resolve_checkpoint(tiny_gan_run)), "--n", "4", "--class", "1", "--seed", "3",
                 "--out", str(grid2), "--device", "cpu"]) == 0
    a, b = np.asarray(Image.open(grid)), np.asarray(Image.open(grid2))
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert sorted(p.name for p in single.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    with pytest.raises(ValueError, match="neither an index nor one of the class names"):
        _run(generate_cli, [str(exported), "--class", "hexagon", "--out", str(grid)])
    with pytest.raises(ValueError, match="no 'best' checkpoint"):
        resolve_checkpoint(tiny_gan_run, "best")


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

"""Frozen-feature probes: weighted kNN against a loop, linear probe, safetensors cache, `cmgen eval probe`."""
from __future__ import annotations

import json
import math

import pytest
import torch.nn.functional as F
import torch

from evaluation.probe import (chance_accuracy, clip_features, knn_accuracy, linear_probe, load_features,
                              save_features)
from tests.test_engine import ROOT

CONFIG = str(ROOT / "configs" / "finetune" / "moving_digits.yaml")


def reference_knn(train_f, train_y, test_f, test_y, k, temperature):
    """Loop version: cosine similarities, k largest, votes exp(s / T) per class, argmax (lowest class on ties)."""
    correct = 0
    for i in range(test_f.shape[0]):
        q = test_f[i].double() / test_f[i].double().norm()
        sims = [(float(q @ (t.double() / t.double().norm())), j) for j, t in enumerate(train_f)]
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for s, j in sims[:k]:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + math.exp(s / temperature)
        best = max(sorted(votes), key=lambda c: votes[c])
        correct += best == int(test_y[i])
    return 100.0 * correct / test_f.shape[0]


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (50, 1.0)])
def test_knn_matches_loop(k, temperature):
    g = torch.Generator().manual_seed(k)
    train_f, test_f = torch.randn(40, 6, generator=g), torch.randn(15, 6, generator=g)
    train_y, test_y = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (15,), generator=g)
    assert knn_accuracy(train_f, train_y, test_f, test_y, k, temperature, chunk_size=4) == pytest.approx(
        reference_knn(train_f, train_y, test_f, test_y, min(k, 40), temperature))


def test_knn_and_linear_probe_on_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(60) % 3
    f = centres[y] + 0.3 * torch.randn(60, 8, generator=g)
    assert knn_accuracy(f[:45], y[:45], f[45:], y[45:], k=1) == 100.0
    res = linear_probe(f[:45], y[:45], f[45:], y[45:], weight_decay=1e-3)
    assert res["top1"] == 100.0 and res["train_top1"] == 100.0
    assert chance_accuracy(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1, 1])) == 25.0
    with pytest.raises(ValueError, match="features must be"):
        knn_accuracy(f, y, f[:, :3], y)


def test_feature_cache_round_trip(tmp_path):
    tensors = {"train_features": torch.randn(3, 4), "test_features": torch.randn(2, 4)}
    save_features(tmp_path / "f.safetensors", tensors, {"checkpoint": "x", "videos": {"train": ["a"]}})
    back, meta = load_features(tmp_path / "f.safetensors")
    assert meta == {"checkpoint": "x", "videos": {"train": ["a"]}}
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_clip_features_average_the_clips():
    class Mean(torch.nn.Module):
        def forward_features(self, x):          # (B, 3, T, H, W) -> (B, 3)
            return x.mean(dim=(2, 3, 4))
    clips = [torch.rand(4, 3, 2, 5, 5) for _ in range(3)]
    feats, labels = clip_features(Mean(), [(c, i) for i, c in enumerate(clips)], batch_size=2)
    torch.testing.assert_close(feats, torch.stack([c.mean(dim=(2, 3, 4)).mean(0) for c in clips]))
    assert labels.tolist() == [0, 1, 2]


@pytest.mark.slow
def test_cli_probe_with_cache(tmp_path, capsys):
    from cmgen.cli import main
    from cmgen.data import write_moving_digits
    write_moving_digits(tmp_path / "md", num_videos=32, num_frames=16, size=32, digit_size=16, speed=1,
                        clips_per_group=2, progress=False)
    args = ["eval", "probe", CONFIG, f"data.root={tmp_path / 'md' / 'ucf101'}", "data.test_clips_per_video=2",
            "model.backbone_width=2", "--random-init", "--cache", str(tmp_path / "f.safetensors"),
            "--out", str(tmp_path / "p.json")]
    assert main(args) == 0
    out = json.loads((tmp_path / "p.json").read_text())
    assert set(out["metrics"]) == {"knn1_top1", "knn20_top1", "linear_wd0.0001_top1", "chance"}
    assert out["shapes"] == {"train": [16, 8], "test": [16, 8]} and out["metrics"]["chance"] == 12.5
    capsys.readouterr()
    assert main(args[:4] + ["data.label_field=digit"] + args[4:-2]) == 0                    # same videos: cache reused
    assert "features read from" in capsys.readouterr().err
    assert main(args[:3] + ["model.backbone=nope"]) == 2


# --- GAN discriminator probe (ContraD's linear evaluation of D) ------------------------------------
CONTRAD = str(ROOT / "configs" / "contrad" / "shapes.yaml")


def _toy_images(n: int, g: torch.Generator):
    """Class 0: a bright 4x4 square in the top half, class 1: in the bottom half; noisy dark background."""
    y = torch.arange(n) % 2
    x = 0.1 * torch.rand(n, 3, 16, 16, generator=g)
    cols = torch.randint(0, 12, (n,), generator=g)
    rows = torch.randint(0, 4, (n,), generator=g) + 8 * y
    for i in range(n):
        x[i, :, rows[i]:rows[i] + 4, cols[i]:cols[i] + 4] = 1.0
    return x, y


def test_trained_tiny_discriminator_features_beat_chance():
    """A tiny ContraD D trained for a few steps on a fixed toy task (its backbone + a linear head, cross-
    entropy) gives backbone features on held-out images that the probe separates far above chance."""
    from evaluation.probe import image_features
    from text2image.contrad import ContraDiscriminator
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_tr, y_tr = _toy_images(64, g)
    x_te, y_te = _toy_images(64, g)
    d = ContraDiscriminator("tiny", image_size=16, channels=4, hidden=16, proj_dim=8)
    head = torch.nn.Linear(d.backbone.out_features, 2)
    opt = torch.optim.Adam([*d.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(40):
        loss = F.cross_entropy(head(d(x_tr).features), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    d.eval()
    f_tr = image_features(lambda x: d(x).features, x_tr, batch_size=24)
    f_te = image_features(lambda x: d(x).features, x_te, batch_size=24)
    assert f_tr.shape == (64, d.backbone.out_features)
    chance = chance_accuracy(y_tr, y_te)
    assert chance == 50.0
    assert linear_probe(f_tr, y_tr, f_te, y_te, weight_decay=1e-3)["top1"] >= 85.0
    assert knn_accuracy(f_tr, y_tr, f_te, y_te, k=5) >= 85.0


def test_image_features_keeps_order_and_checks_input():
    from evaluation.probe import image_features
    x = torch.rand(10, 3, 4, 4)
    torch.testing.assert_close(image_features(lambda b: b.mean(dim=(2, 3)), x, batch_size=3), x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="batch_size"):
        image_features(lambda b: b, x, batch_size=0)


@pytest.mark.slow
def test_cli_gan_checkpoint_probe(tmp_path, capsys):
    """A 2-step ContraD run: the random-init and the trained D both give numbers with chance beside them
    (markdown on stdout, JSON + .md files), their features differ (the checkpoint is loaded), and
    config arguments next to --gan-checkpoint are refused."""
    from cmgen.cli import main
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train
    from evaluation.probe_cli import discriminator_features
    cfg = load_config(CONTRAD, [f"run.output_dir={tmp_path}", "run.name=c", "train.max_steps=2", "train.batch_size=8",
                                "data.num_images=48", "model.g_channels=4", "model.d_channels=4",
                                "model.d_hidden=16", "model.proj_dim=8", "gan.samples_per_class=2",
                                "train.sample_every=0", "train.progress_bar=false"])
    train(cfg)
    run = str(tmp_path / "c")
    for extra in (["--random-init"], []):
        out = tmp_path / f"p{len(extra)}.json"
        assert main(["eval", "probe", "--gan-checkpoint", run, *extra, "--out", str(out)]) == 0
        rep = json.loads(out.read_text())
        assert set(rep["metrics"]) == {"knn1_top1", "knn20_top1", "linear_wd0.0001_top1", "chance"}
        assert all(0.0 <= v <= 100.0 for v in rep["metrics"].values())
        assert rep["settings"]["random_init"] == bool(extra) and rep["settings"]["label"] == "shape"
        assert rep["shapes"]["train"][0] + rep["shapes"]["test"][0] == 48
        assert "| chance |" in capsys.readouterr().out and out.with_suffix(".md").is_file()
    trained, _ = discriminator_features(run, log=lambda s: None)
    random, _ = discriminator_features(run, random_init=True, log=lambda s: None)
    assert torch.equal(trained["train_labels"], random["train_labels"])
    assert not torch.allclose(trained["train_features"], random["train_features"])
    assert main(["eval", "probe", CONFIG, "--gan-checkpoint", run]) == 2
    assert "no config" in capsys.readouterr().err

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
    (markdown on stdout, JSON + .md files), --protocol official gives the SGD linear evaluation, their
    features differ (the checkpoint is loaded), and
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
    out = tmp_path / "official.json"
    assert main(["eval", "probe", "--gan-checkpoint", run, "--protocol", "official", "--lineval-epochs", "2",
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["metrics"]) == {"linear_official_top1", "linear_official_train_top1", "chance"}
    assert all(0.0 <= v <= 100.0 for v in rep["metrics"].values())
    assert rep["settings"]["protocol"] == "official" and rep["settings"]["lineval"]["epochs"] == 2
    assert len(rep["settings"]["lineval"]["test_top1_per_epoch"]) == 2
    assert rep["shapes"]["train"][0] + rep["shapes"]["test"][0] == 48
    assert "official linear evaluation" in capsys.readouterr().out
    trained, _ = discriminator_features(run, log=lambda s: None)
    random, _ = discriminator_features(run, random_init=True, log=lambda s: None)
    assert torch.equal(trained["train_labels"], random["train_labels"])
    assert not torch.allclose(trained["train_features"], random["train_features"])
    assert main(["eval", "probe", CONFIG, "--gan-checkpoint", run]) == 2
    assert "no config" in capsys.readouterr().err


# --- ContraD's official linear evaluation (evaluation.probe.official_lineval) ----------------------------
def test_lineval_crop_params_follow_torchvision_get_params():
    """Same algorithm as torchvision RandomResizedCrop.get_params: every crop inside the image, and over
    many draws the side and position statistics agree with torchvision's own (global-RNG) sampler."""
    from torchvision.transforms import RandomResizedCrop
    from evaluation.probe import lineval_crop_params
    gen = torch.Generator().manual_seed(0)
    ours = torch.tensor([lineval_crop_params(32, 32, (0.2, 1.0), (3 / 4, 4 / 3), gen) for _ in range(4000)],
                        dtype=torch.float64)
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)],
                       dtype=torch.float64)
    top, left, h, w = ours.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32) & (h >= 1) & (w >= 1)).all())
    area = h * w / 1024
    assert 0.18 <= float(area.min()) and float(area.max()) <= 1.0
    for a, b in zip(ours.unbind(1), ref.unbind(1)):       # means of top, left, h, w: within 0.5 px
        assert abs(float(a.mean() - b.mean())) < 0.5
    assert abs(float(area.mean()) - float((ref[:, 2] * ref[:, 3] / 1024).mean())) < 0.02
    # a ratio no crop can meet falls back to the central crop with the ratio clamped (torchvision's rule)
    fallback = tuple(RandomResizedCrop.get_params(torch.zeros(3, 32, 16), [0.999, 1.0], [3.0, 4.0]))
    assert lineval_crop_params(32, 16, (0.999, 1.0), (3.0, 4.0), gen) == fallback == (13, 0, 5, 16)


def test_lineval_crop_params_follow_the_generator_and_leave_the_global_rng_alone():
    from evaluation.probe import lineval_crop_params

    def crops(seed):
        gen = torch.Generator().manual_seed(seed)
        return [lineval_crop_params(32, 32, (0.2, 1.0), (3 / 4, 4 / 3), gen) for _ in range(20)]

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = crops(5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert crops(5) == first and crops(6) != first
    assert len(set(first)) > 10                         # successive calls draw new crops


def test_official_lineval_is_plain_sgd_with_the_official_defaults():
    """One epoch, one full batch, no augmentation: exactly one SGD step (lr 0.1, no momentum, no weight
    decay) on the mean cross-entropy from nn.Linear's default init under the seed; default milestones
    are the official 60/75/90 at 100 epochs and scale with the epoch count."""
    from torch import nn
    from evaluation.probe import LINEVAL_DEFAULTS, official_lineval
    gen = torch.Generator().manual_seed(1)
    x_tr, y_tr = torch.rand(12, 3, 4, 4, generator=gen), torch.arange(12) % 3
    x_te, y_te = torch.rand(6, 3, 4, 4, generator=gen), torch.arange(6) % 3
    extract = lambda b: b.mean(dim=(2, 3))                             # (B, 3) features
    res = official_lineval(extract, x_tr, y_tr, x_te, y_te, epochs=1, batch_size=12, augment=False, seed=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        lin = nn.Linear(3, 3)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    loss = F.cross_entropy(lin(extract(x_tr[perm])), y_tr[perm])
    gw, gb = torch.autograd.grad(loss, [lin.weight, lin.bias])
    with torch.no_grad():
        w, b = lin.weight - 0.1 * gw, lin.bias - 0.1 * gb
        expect = 100.0 * float(((extract(x_te) @ w.T + b).argmax(1) == y_te).double().mean())
    assert res["top1"] == expect and res["test_top1_per_epoch"] == [expect]
    assert LINEVAL_DEFAULTS["milestones"] == (60, 75, 90) and LINEVAL_DEFAULTS["lr"] == 0.1
    assert LINEVAL_DEFAULTS["epochs"] == 100 and LINEVAL_DEFAULTS["batch_size"] == 256
    assert official_lineval(extract, x_tr, y_tr, x_te, y_te, epochs=10, augment=False)["milestones"] == [6, 8, 9]


def test_official_lineval_learns_a_separable_task_and_is_seeded():
    """Class = which colour channel is bright (crop- and flip-invariant): the SGD probe on mean-colour
    features learns it through the augmentation; the same seed gives the same curve, another seed
    another order."""
    from evaluation.probe import official_lineval
    gen = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 3
        x = 0.2 * torch.rand(n, 3, 8, 8, generator=gen)
        x[torch.arange(n), y] += 0.6
        return x, y
    (x_tr, y_tr), (x_te, y_te) = make(60), make(30)
    extract = lambda b: b.mean(dim=(2, 3)) * 10.0
    a = official_lineval(extract, x_tr, y_tr, x_te, y_te, epochs=30, batch_size=16, seed=3)
    b = official_lineval(extract, x_tr, y_tr, x_te, y_te, epochs=30, batch_size=16, seed=3)
    assert a["top1"] >= 90.0 and a["test_top1_per_epoch"] == b["test_top1_per_epoch"]
    assert a["augment"] and a["train_top1"] >= 80.0
    from evaluation.probe import _lineval_augment
    aug = [_lineval_augment(x_tr[:8], (0.2, 1.0), (3 / 4, 4 / 3), 0.5, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(aug[0], aug[1]) and not torch.equal(aug[0], aug[2]) and aug[0].shape == x_tr[:8].shape
    with pytest.raises(ValueError, match="epochs"):
        official_lineval(extract, x_tr, y_tr, x_te, y_te, epochs=0)

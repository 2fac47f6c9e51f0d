"""Frozen-feature probes: weighted kNN against a loop, linear probe, safetensors cache, `cmgen eval probe`."""
from __future__ import annotations

import json
import math

import pytest
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

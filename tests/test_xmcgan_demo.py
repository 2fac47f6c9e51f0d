"""XMC-GAN demo: caption-conditioned attribute accuracy (given vs shuffled captions), the caption grid,
and demo_stage end to end on tiny sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import shapes_eval
from evaluation.shapes_eval import ATTRIBUTES
from text2image import xmcgan_demo


class _OracleEvaluator:
    """Predicts exactly the given attributes (a perfect, caption-following generator)."""

    def __init__(self, targets):
        self.targets = targets

    def features(self, images01):
        logits = {}
        for name, values in ATTRIBUTES.items():
            idx = torch.tensor([t[name] for t in self.targets])
            logits[name] = torch.nn.functional.one_hot(idx, len(values)).float()
        return torch.zeros(len(self.targets), 4), logits


def test_attribute_accuracy_given_vs_shuffled_captions(tmp_path):
    from cmgen.data import write_shapes

    root = tmp_path / "shapes"
    write_shapes(root, num_images=160, image_size=32, seed=0, progress=False)
    captions, targets, index = xmcgan_demo.caption_targets(root, "val")
    assert len(captions) == 5 * 20 and index.tolist() == [i // 5 for i in range(100)]
    # every caption names its primary object's attributes
    for c, t in zip(captions, targets):
        assert ATTRIBUTES["colour"][t["colour"]] in c and ATTRIBUTES["position"][t["position"]] in c
    acc = xmcgan_demo.attribute_accuracy(_OracleEvaluator(targets), torch.zeros(100, 3, 32, 32), targets)
    assert all(v == 1.0 for v in acc["caption"].values())
    assert acc["shuffled"]["colour"] < 0.5 and acc["shuffled"]["position"] < 0.5
    assert acc["chance"] == {k: 1.0 / len(v) for k, v in ATTRIBUTES.items()}
    # a caption-blind generator (always the same prediction) is no better on given than on shuffled captions
    blind = xmcgan_demo.attribute_accuracy(_OracleEvaluator([targets[0]] * 100), torch.zeros(100, 3, 32, 32), targets)
    assert blind["caption"] == blind["shuffled"]


def test_caption_grid_draws_text_above_enlarged_images(tmp_path):
    fakes = torch.rand(2, 3, 3, 32, 32)
    path = xmcgan_demo.caption_grid(["a large red circle in the top left", "a small blue star in the center"],
                                    torch.rand(2, 3, 32, 32), fakes, tmp_path / "g.png", zoom=4)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] >= 4 * (4 * 32)                      # real + 3 fakes, 4x enlarged
    assert img.shape[0] > 2 * 4 * 32                         # plus a text band per row
    band = img[:20]                                          # the first caption's text: dark pixels on white
    assert (band.min(axis=2) < 100).sum() > 50


@pytest.mark.slow
def test_demo_stage_reports_grid_and_accuracy_table(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 400)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    monkeypatch.setattr(xmcgan_demo, "DATA_SETTINGS", {**xmcgan_demo.DATA_SETTINGS, "num_images": 64})
    monkeypatch.setattr(xmcgan_demo, "PROBE_STEPS", 2)
    monkeypatch.setattr(xmcgan_demo, "MIN_STEPS", 2)
    monkeypatch.setattr(xmcgan_demo, "RUN_OVERRIDES", ["train.batch_size=8"])
    report, summary = [], {}
    xmcgan_demo.demo_stage(tmp_path, report, summary, budget_s=1.0)
    text = "\n".join(report)
    assert "## XMC-GAN text-to-image on shapes" in text and "![xmcgan captions](xmcgan_captions.png)" in text
    assert "XMC-GAN: given caption" in text and "chance (1/K)" in text and "real val images" in text
    s = summary["xmcgan_demo"]
    assert s["steps"] == 2 and s["num_captions"] == 8 * 5
    assert set(s["attr_accuracy"]) == set(ATTRIBUTES) and all(0 <= v <= 1 for v in s["attr_accuracy"].values())
    assert (tmp_path / "xmcgan_captions.png").is_file()
    json.dumps(summary)                                      # the demo writes it to report.json

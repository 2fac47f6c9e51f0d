"""The offline shapes evaluator: trains once, caches, scores real images above noise, labels its output."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cmgen.data import write_shapes
from evaluation.generation import feature_statistics, frechet_distance
from evaluation.shapes_eval import ATTRIBUTES, NOT_COMPARABLE, ShapesEvaluator, load_split

RECIPE = {"train_images": 800, "epochs": 4}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "shapes_32px"
    write_shapes(root, num_images=160, image_size=32, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def evaluator(shapes_root):
    return ShapesEvaluator.load_or_train(shapes_root, 32, **RECIPE)


def test_cached_and_not_retrained(shapes_root, evaluator):
    ckpt = shapes_root / "evaluator" / "shapes_cnn_32px.pt"
    assert ckpt.is_file() and evaluator.info["file"] == str(ckpt)
    mtime = os.stat(ckpt).st_mtime_ns
    again = ShapesEvaluator.load_or_train(shapes_root, 32, **RECIPE)
    assert os.stat(ckpt).st_mtime_ns == mtime
    assert again.info["sha256"] == evaluator.info["sha256"]
    np.testing.assert_array_equal(again.ref_mu, evaluator.ref_mu)


def test_real_images_beat_noise_and_output_is_labelled(shapes_root, evaluator):
    x, y, _ = load_split(shapes_root, "val", 32)
    attrs = [{k: int(y[k][i]) for k in ATTRIBUTES} for i in range(len(x))]
    real = evaluator.evaluate(x, labels=y["shape"], captions_attrs=attrs)
    g = torch.Generator().manual_seed(0)
    noise = evaluator.evaluate(torch.rand(len(x), 3, 32, 32, generator=g), labels=y["shape"], captions_attrs=attrs)
    assert real["note"] == NOT_COMPARABLE and "not comparable with published FID" in real["note"]
    assert real["evaluator_sha256"] == evaluator.info["sha256"]
    assert real["shapes_fd"] < 0.5 * noise["shapes_fd"]
    # position is learnt within a few epochs (chance 1/9)
    assert real["attr_accuracy/position"] > 0.5
    assert real["attr_accuracy/position"] > noise["attr_accuracy/position"] + 0.3
    assert real["class_accuracy"] == real["attr_accuracy/shape"]
    assert abs(sum(real[f"pred_class_fraction/{s}"] for s in ATTRIBUTES["shape"]) - 1.0) < 1e-6
    assert real["chance/position"] == pytest.approx(1 / 9)


def test_matches_a_direct_computation(shapes_root, evaluator):
    """Accuracy by a per-image loop over names, FD from the features by hand."""
    x, y, _ = load_split(shapes_root, "val", 32)
    feats, logits = evaluator.features(x)
    names = [{"colour": ATTRIBUTES["colour"][int(y["colour"][i])]} if i % 2 else {} for i in range(len(x))]
    out = evaluator.evaluate(x, captions_attrs=names)
    hits = [int(logits["colour"][i].argmax()) == int(y["colour"][i]) for i in range(len(x)) if i % 2]
    assert out["attr_accuracy/colour"] == pytest.approx(sum(hits) / len(hits))
    assert "attr_accuracy/size" not in out and "class_accuracy" not in out
    mu, sigma = feature_statistics(feats.numpy())
    assert out["shapes_fd"] == pytest.approx(frechet_distance(mu, sigma, evaluator.ref_mu, evaluator.ref_sigma,
                                                              method="eigh"), rel=1e-9)
    # a 64 px input is resized to the classifier's 32 px
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert evaluator.evaluate(up)["shapes_fd"] < 2 * out["shapes_fd"] + 50


def test_bad_input(shapes_root, evaluator, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="labels must have shape"):
        evaluator.evaluate(x, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape classes"):
        evaluator.evaluate(x, labels=torch.full((4,), 7))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        evaluator.evaluate(torch.rand(4, 32, 32))
    with pytest.raises(ValueError, match="not a shapes dataset root"):
        ShapesEvaluator.load_or_train(tmp_path, 32)


def test_demo_stage_reports_real_references(tmp_path, monkeypatch):
    from evaluation import shapes_eval

    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 400)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    report, summary = [], {}
    shapes_eval.demo_stage(tmp_path, report, summary, budget_s=60)
    text = "\n".join(report)
    assert "not comparable with published FID" in text and "| chance |" in text
    assert 0.0 <= summary["shapes_evaluator"]["class_accuracy"] <= 1.0


def test_evaluator_learns_the_data_variant(tmp_path, evaluator):
    """A root of huge shapes gets an evaluator trained on huge shapes (one of small shapes misreads them):
    the recipe and training data record the variant, the size chance is 1/1, and huge val images are
    read far better than the default data's evaluator reads them."""
    root = tmp_path / "shapes_32px_huge"
    write_shapes(root, num_images=160, image_size=32, seed=0, max_shapes=1, primary_size="huge", progress=False)
    ev = ShapesEvaluator.load_or_train(root, 32, **RECIPE)
    assert ev.info["recipe"] == {**RECIPE, "primary_size": "huge"}
    assert ev.info["train_data"]["primary_size"] == "huge"
    assert "primary_size" not in evaluator.info["recipe"]          # default data: the recipe of before
    x, y, _ = load_split(root, "val", 32)
    own, default = ev.evaluate(x, labels=y["shape"]), evaluator.evaluate(x, labels=y["shape"])
    assert own["chance/size"] == 1.0 and default["chance/size"] == 0.5
    assert own["class_accuracy"] >= 0.9 and own["class_accuracy"] > default["class_accuracy"] + 0.2

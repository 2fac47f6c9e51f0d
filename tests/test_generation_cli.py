"""cmgen eval generation on images: sample a checkpoint, extract, cache real statistics, report provenance."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmgen.cli import main
from evaluation import generation_cli, shapes_eval
from evaluation.inception import WEIGHTS_ENV, InceptionWeightsError


@pytest.fixture()
def real_dir(tmp_path):
    d = tmp_path / "real"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"{i:02d}.png")
    return d


def test_checkpoint_inception_random_weights(tiny_gan_run, real_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["eval", "generation", "--checkpoint", str(tiny_gan_run), "--real", str(real_dir), "--n", "5",
            "--batch-size", "3", "--random-weights-for-tests", "--stats-cache", str(tmp_path / "cache"),
            "--kid-subsets", "4", "--seed", "5", "--fid-method", "eigh", "--no-progress", "--device", "cpu", "--out", str(out),
            "--markdown", str(md)]
    with pytest.warns(RuntimeWarning, match="KID: subset size 1000"):
        assert main(argv) == 0
    r = json.loads(out.read_text())
    m = r["metrics"]
    assert {"fid", "kid_mean", "is_mean", "precision", "recall"} <= set(m)       # nothing lost to the small n
    assert m["kid_subset_size"] == 5 and m["is_splits"] == 5 and m["num_real"] == 5
    assert r["num_fake"] == 5 and r["seed"] == 5
    assert r["extractor"]["random_init"] is True and "RANDOM" in r["note"]
    assert r["generator"]["weights"] == "ema" and r["generator"]["step"] == 2
    assert r["real"]["cached"] is False and len(list((tmp_path / "cache").glob("inception-*.npz"))) == 1
    assert "| FID |" in md.read_text() and "sha256" in md.read_text()
    with pytest.warns(RuntimeWarning):
        assert main(argv) == 0
    r2 = json.loads(out.read_text())
    assert r2["real"]["cached"] is True and r2["real"]["key"] == r["real"]["key"]
    assert r2["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-6)
    # one more file -> another key (the cache is keyed by the folder's file list and the extractor)
    files = sorted(real_dir.glob("*.png"))
    key = generation_cli.real_set_key(files, real_dir, r["extractor"])
    assert key == r["real"]["key"]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(real_dir / "extra.png")
    assert generation_cli.real_set_key(sorted(real_dir.glob("*.png")), real_dir, r["extractor"]) != key
    assert generation_cli.real_set_key(files, real_dir, {**r["extractor"], "sha256": "other"}) != key


def _run(argv):
    parser = argparse.ArgumentParser()
    generation_cli.add_arguments(parser)
    return generation_cli.run(parser.parse_args(argv))


def test_inception_without_weights_fails_before_sampling(tiny_gan_run, real_dir, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError, match="pt_inception-2015-12-05"):
        _run(["--checkpoint", str(tiny_gan_run), "--real", str(real_dir), "--n", "4", "--device", "cpu"])


def test_checkpoint_shapes_extractor_offline(tiny_gan_run, tmp_path, monkeypatch):
    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 400)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    out = tmp_path / "s.json"
    with pytest.warns(RuntimeWarning):
        assert main(["eval", "generation", "--checkpoint", str(tiny_gan_run), "--extractor", "shapes", "--n", "10",
                     "--fid-method", "eigh", "--no-progress", "--device", "cpu", "--stats-cache", str(tmp_path / "c"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["note"] == shapes_eval.NOT_COMPARABLE
    assert r["extractor"]["extractor"] == "shapes" and r["real"]["source"].endswith("train")
    assert 0.0 <= r["metrics"]["class_accuracy"] <= 1.0 and r["metrics"]["fid"] > 0


def test_shapes_evaluate_generator(tiny_gan_run, monkeypatch):
    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 400)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    m = shapes_eval.evaluate_generator(tiny_gan_run, n=12, seed=1, batch_size=5)
    assert m["num_images"] == 12 and m["note"] == shapes_eval.NOT_COMPARABLE
    assert 0.0 <= m["class_accuracy"] <= 1.0 and m["shapes_fd"] > 0 and m["generator"]["weights"] == "ema"
    assert m["chance/shape"] == pytest.approx(0.2)


def test_fid_hook_during_training_and_best_checkpoint(tmp_path, monkeypatch):
    """eval.fid_every with the shapes extractor: eval/shapes_fd in metrics.jsonl, checkpoints/best kept."""
    from cmgen.engine.best import BEST_FILE
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train
    from cmgen.generate_cli import resolve_checkpoint
    from tests.conftest import GAN_CONFIG as CONFIG

    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 400)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    base = [f"run.output_dir={tmp_path}", "train.sample_every=0", "train.log_every=1", "train.progress_bar=false",
            "train.trackers=[]", "data.num_images=64", "gan.n_dis=1", "train.batch_size=8", "ema.start_step=0",
            "train.eval_every=1", "eval.fid_samples=12", "eval.batch_size=5", "train.checkpoint_every=0",
            "train.keep_last=1"]
    with pytest.raises(ValueError, match="train.eval_every to a divisor"):
        train(load_config(CONFIG, base + ["run.name=bad", "eval.fid_every=3", "train.eval_every=2",
                                          "train.max_steps=1"]))
    result = train(load_config(CONFIG, base + ["run.name=fid", "eval.fid_every=2", "train.max_steps=4"]))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    fids = {r["step"]: r["eval/shapes_fd"] for r in records if "eval/shapes_fd" in r}
    assert sorted(fids) == [2, 4] and all(v > 0 for v in fids.values())
    assert all("eval/class_accuracy" in r for r in records if "eval/shapes_fd" in r)
    best = json.loads((result.run_dir / "checkpoints" / BEST_FILE).read_text())
    best_step = min(fids, key=fids.get)
    assert best["step"] == best_step and best["value"] == pytest.approx(fids[best_step])
    assert best["metric"] == "eval/shapes_fd"
    ckpt = resolve_checkpoint(result.run_dir, "best")
    assert ckpt.name == f"step_{best_step:06d}" and (ckpt / "engine_state.json").is_file()
    assert (result.run_dir / "checkpoints" / "best").resolve() == ckpt.resolve()
    # keep_last=1 keeps the newest checkpoint and the best one (the one best when the newest was written)
    kept = {p.name for p in (result.run_dir / "checkpoints").glob("step_*")}
    assert {ckpt.name, "step_000004"} <= kept <= {"step_000002", "step_000004"}


@pytest.mark.slow
def test_checkpoint_text_generator_reports_r_precision(tiny_xmcgan_run, tmp_path, monkeypatch):
    from evaluation import rprecision

    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 400)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    monkeypatch.setattr(rprecision, "_TRAIN_IMAGES", 200)
    monkeypatch.setattr(rprecision, "_EPOCHS", 1)
    out, md = tmp_path / "x.json", tmp_path / "x.md"
    with pytest.warns(RuntimeWarning):
        assert main(["eval", "generation", "--checkpoint", str(tiny_xmcgan_run), "--extractor", "shapes", "--n", "12",
                     "--batch-size", "5", "--fid-method", "eigh", "--no-progress", "--device", "cpu", "--stats-cache",
                     str(tmp_path / "c"), "--out", str(out), "--markdown", str(md)]) == 0
    r = json.loads(out.read_text())
    m = r["metrics"]
    assert r["num_fake"] == 12 and "fid" in m
    assert 0.0 <= m["r_precision_mean"] <= 1.0 and m["r_precision_std"] >= 0.0
    rp = r["r_precision"]
    assert rp["note"] == rprecision.NOT_COMPARABLE and rp["num_candidates"] == 100 and "val split" in rp["captions"]
    assert rp["file"].endswith("dual_encoder_32px.pt")
    assert "R-precision (%)" in md.read_text() and "not comparable with published R-precision" in md.read_text()
    with pytest.warns(RuntimeWarning):
        assert main(["eval", "generation", "--checkpoint", str(tiny_xmcgan_run), "--extractor", "shapes", "--n", "6",
                     "--no-rp", "--fid-method", "eigh", "--no-progress", "--device", "cpu", "--stats-cache",
                     str(tmp_path / "c"), "--out", str(out)]) == 0
    assert "r_precision_mean" not in json.loads(out.read_text())["metrics"]


def test_text_generator_images_follow_caption_order_not_batches(tiny_xmcgan_run):
    """Image i comes from caption i and z_i whatever the batch size; the captions are the val split's."""
    from cmgen.generate_cli import load_generator
    from evaluation.rprecision import evaluation_captions, generate_from_captions

    lg = load_generator(tiny_xmcgan_run)
    captions, index = evaluation_captions(lg.method, 9, seed=1)
    val = lg.method.data_root() / "annotations" / "captions_val.json"
    val_captions = {a["caption"] for a in json.loads(val.read_text())["annotations"]}
    assert set(captions) <= val_captions and index.tolist() == [i % 6 for i in range(9)]
    a = torch.cat(list(generate_from_captions(lg, captions, seed=3, batch_size=4)))
    b = torch.cat(list(generate_from_captions(lg, captions, seed=3, batch_size=9)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    swapped = torch.cat(list(generate_from_captions(lg, [captions[1], captions[0], *captions[2:]], seed=3)))
    assert not torch.allclose(swapped[0], a[0]) and torch.allclose(swapped[2:], a[2:], atol=1e-5)


@pytest.mark.slow
def test_text_generator_with_a_clip_folder_reports_clip_score(tiny_xmcgan_run, tmp_path, monkeypatch):
    """--rp-encoder CLIP_FOLDER: R-precision and CLIP score of each image with its own caption, equal to
    100 * mean(max(cos, 0)) recomputed here from the same images and captions."""
    from cmgen.generate_cli import load_generator
    from evaluation.rprecision import CLIPDualEncoder, evaluation_captions, generate_from_captions
    from tests.test_generation_metrics import write_tiny_clip

    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 400)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    clip = tmp_path / "clip"
    write_tiny_clip(clip)
    out, md = tmp_path / "x.json", tmp_path / "x.md"
    with pytest.warns(RuntimeWarning):
        assert main(["eval", "generation", "--checkpoint", str(tiny_xmcgan_run), "--extractor", "shapes", "--n", "10",
                     "--batch-size", "4", "--rp-encoder", str(clip), "--seed", "2", "--fid-method", "eigh",
                     "--no-progress", "--device", "cpu", "--stats-cache", str(tmp_path / "c"), "--out", str(out),
                     "--markdown", str(md)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert "r_precision_mean" in m and "CLIP score" in md.read_text()
    lg = load_generator(tiny_xmcgan_run)
    captions, _ = evaluation_captions(lg.method, 10, seed=2)
    images = torch.cat(list(generate_from_captions(lg, captions, seed=2, batch_size=10)))
    enc = CLIPDualEncoder(clip)
    ie = torch.as_tensor(enc.embed_images(images), dtype=torch.float64)
    te = torch.as_tensor(enc.embed_texts(captions), dtype=torch.float64)
    cos = [float(ie[i] @ te[i] / (ie[i].norm() * te[i].norm())) for i in range(10)]
    assert m["clip_score"] == pytest.approx(100.0 * sum(max(c, 0.0) for c in cos) / 10, abs=1e-3)

"""`cmgen eval retrieval --benchmark ...` from a similarity matrix and from embeddings."""
from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest

from cmgen.cli import main
from evaluation.retrieval import dual_softmax, retrieval_metrics


def _close(got, want):
    assert set(got) == set(want)
    for d in want:
        assert got[d] == pytest.approx(want[d], abs=1e-9), d


def _msrvtt_1ka(root, n=12):
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for i in range(n):
            w.writerow([f"ret{i}", f"msr{i}", f"video{i}", f"caption {i}"])
    return [f"video{i}" for i in range(n)]


def _msvd(root, num_videos=6, per_video=3):
    ids = [f"vid{i}" for i in range(num_videos)]
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({v: [[v, "cap", str(k)] for k in range(per_video)]
                                                          for v in ids}))
    (root / "test_list.txt").write_text("\n".join(ids) + "\n")
    return ids


def test_benchmark_from_sims_table_and_json(tmp_path, capsys):
    _msrvtt_1ka(tmp_path)
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((12, 12)) + 3 * np.eye(12)
    np.save(tmp_path / "s.npy", sims)
    out = tmp_path / "res" / "m.json"
    assert main(["eval", "retrieval", "--benchmark", "msrvtt-1ka", "--data-root", str(tmp_path), "--sims",
                 str(tmp_path / "s.npy"), "--dual-softmax", "1.0", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "**MSR-VTT 1k-A** — test: 12 videos, 12 queries" in table
    assert "| direction | R@1 | R@5 | R@10 | MdR | MnR | R@1 +DSL |" in table and "| text → video |" in table
    report = json.loads(out.read_text())
    assert report["metrics"] == retrieval_metrics(sims)
    assert report["metrics_postprocessed"]["+DSL"]["t2v"] == retrieval_metrics(dual_softmax(sims, 1.0))["t2v"]
    assert report["benchmark"]["num_videos"] == 12 and report["benchmark"]["num_missing"] == 0
    assert out.with_suffix(".md").read_text().strip() == table.strip()


def test_shape_mismatch_is_one_clear_line(tmp_path, capsys):
    _msrvtt_1ka(tmp_path)
    np.save(tmp_path / "s.npy", np.zeros((12, 11)))
    assert main(["eval", "retrieval", "--benchmark", "msrvtt-1ka", "--data-root", str(tmp_path), "--sims",
                 str(tmp_path / "s.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s.npy: sims has shape (12, 11), expected (12 x 12)" in err[0]


def test_multi_caption_from_embeddings_with_ids_and_missing(tmp_path, capsys):
    ids = _msvd(tmp_path)  # 6 videos x 3 captions
    rng = np.random.default_rng(1)
    video = rng.standard_normal((6, 8))
    text = np.repeat(video, 3, axis=0) + 0.5 * rng.standard_normal((18, 8))
    t2v = np.repeat(np.arange(6), 3)
    order = rng.permutation(6)  # the file's video rows in another order, matched by id
    np.savez(tmp_path / "e.npz", text=text, video=video[order], video_ids=np.array(ids)[order])
    out = tmp_path / "m.json"
    args = ["eval", "retrieval", "--benchmark", "msvd", "--data-root", str(tmp_path), "--embeddings",
            str(tmp_path / "e.npz"), "--v2t", "maxpool", "--querybank", str(tmp_path / "bank.npy"), "--out", str(out)]
    np.save(tmp_path / "bank.npy", rng.standard_normal((10, 8)))
    assert main(args) == 0
    report = json.loads(out.read_text())
    _close(report["metrics"], retrieval_metrics(text @ video.T, t2v, v2t="maxpool"))
    assert "v2t" not in report["metrics_postprocessed"]["+QB-Norm"]
    assert "| video → text |" in capsys.readouterr().out
    # two videos missing from the embeddings: refused, then evaluated on the rest with a note
    keep = [0, 2, 3, 5]
    np.savez(tmp_path / "e.npz", text=text, video=video[keep], video_ids=np.array(ids)[keep])
    args = args[:-4] + ["--out", str(out)]
    assert main(args) == 2
    assert "2 of 6 videos are missing" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="vid1, vid4"):
        assert main(args + ["--allow-missing"]) == 0
    table = capsys.readouterr().out
    assert "Incomplete test set: 2 of 6 videos missing" in table
    rows = [t for t in range(18) if t2v[t] in keep]
    remap = {v: i for i, v in enumerate(keep)}
    want = retrieval_metrics(text[rows] @ video[keep].T, [remap[t2v[t]] for t in rows], v2t="maxpool")
    report = json.loads(out.read_text())
    _close(report["metrics"], want)
    assert report["missing_videos"] == ["vid1", "vid4"]


def test_feature_folder_completeness_and_input_errors(tmp_path, capsys):
    _msrvtt_1ka(tmp_path, n=4)
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(3):
        np.save(feats / f"video{i}.npy", np.ones((2, 3)))
    np.save(tmp_path / "s.npy", np.eye(4))
    base = ["eval", "retrieval", "--benchmark", "msrvtt-1ka", "--data-root", str(tmp_path)]
    assert main(base + ["--sims", str(tmp_path / "s.npy"), "--features", str(feats)]) == 2
    assert "1 of 4 videos are missing from" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning):
        assert main(base + ["--sims", str(tmp_path / "s.npy"), "--features", str(feats), "--allow-missing"]) == 0
    assert "3 videos, 3 queries" in capsys.readouterr().out
    assert main(base) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--benchmark", "msvd", "--data-root", str(tmp_path), "--sims", "x.npy"]) == 2
    assert "raw-captions.pkl: file not found" in capsys.readouterr().err
    np.save(tmp_path / "t.npy", np.zeros((4, 3)))
    np.save(tmp_path / "v.npy", np.zeros((5, 3)))
    assert main(base + ["--text-emb", str(tmp_path / "t.npy"), "--video-emb", str(tmp_path / "v.npy")]) == 2
    assert "video embeddings has shape (5, 3), expected (4, D)" in capsys.readouterr().err


def test_plain_embeddings_without_benchmark(tmp_path, capsys):
    rng = np.random.default_rng(2)
    text, video = rng.standard_normal((9, 4)), rng.standard_normal((9, 4))
    np.save(tmp_path / "t.npy", text)
    np.save(tmp_path / "v.npy", video)
    out = tmp_path / "m.json"
    assert main(["eval", "retrieval", "--text-emb", str(tmp_path / "t.npy"), "--video-emb", str(tmp_path / "v.npy"),
                 "--out", str(out)]) == 0
    _close(json.loads(out.read_text())["metrics"], retrieval_metrics(text @ video.T))

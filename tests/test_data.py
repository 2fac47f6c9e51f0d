"""Embedded synthetic datasets: real-format files parse, content matches the labels, same seed -> same bytes."""
from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmgen.cli import main as cmgen_main
from cmgen.data import COLOURS, POSITIONS, SHAPES, write_moving_digits, write_shapes
from cmgen.data.moving_digits import DIGIT_WORDS, DIRECTIONS

SHAPES_KW = dict(num_images=40, image_size=64, max_shapes=3, val_fraction=0.25, captions_per_image=3,
                 progress=False)
# 8 classes x 3 groups of 1 clip: group 1 (8 videos) is test, groups 2-3 (16 videos) train
DIGITS_KW = dict(num_videos=24, num_frames=8, clips_per_group=1, test_groups=1, captions_per_video=4,
                 progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _not_imagefolder(hashes: dict[str, str]) -> set[str]:
    """File names that do not depend on the seed (ImageFolder class folders do)."""
    return {k for k in hashes if not k.startswith("imagefolder")}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, seed=3, **SHAPES_KW)
    return root


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_moving_digits(root, seed=5, **DIGITS_KW)
    return root


# ----------------------------------------------------------------------------------------------- shapes

def test_shapes_coco_captions_format(shapes_dir):
    seen_image_ids, seen_ann_ids = set(), set()
    for split, n in (("train", 30), ("val", 10)):
        coco = json.loads((shapes_dir / f"annotations/captions_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations"} <= set(coco)
        assert len(coco["images"]) == n
        ids = {im["id"] for im in coco["images"]}
        assert len(ids) == n and not ids & seen_image_ids
        seen_image_ids |= ids
        for im in coco["images"]:
            with Image.open(shapes_dir / split / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) == (64, 64) and img.mode == "RGB"
        per_image = {}
        for ann in coco["annotations"]:
            assert ann["id"] not in seen_ann_ids and isinstance(ann["caption"], str) and ann["caption"]
            seen_ann_ids.add(ann["id"])
            per_image.setdefault(ann["image_id"], []).append(ann["caption"])
        assert set(per_image) == ids
        assert all(len(c) == 3 and len(set(c)) == 3 for c in per_image.values())


def test_shapes_imagefolder_loads(shapes_dir):
    from torchvision.datasets import ImageFolder

    for split, n in (("train", 30), ("val", 10)):
        ds = ImageFolder(str(shapes_dir / "imagefolder" / split))
        assert ds.classes == sorted(SHAPES) and len(ds) == n
        attrs = json.loads((shapes_dir / f"annotations/attributes_{split}.json").read_text())
        by_name = {r["file_name"]: r for r in attrs["images"]}
        counts = np.bincount([t for _, t in ds.samples], minlength=len(SHAPES))
        assert counts.max() - counts.min() <= 1  # primary shapes are balanced
        for path, target in ds.samples:
            record = by_name[Path(path).name]
            assert ds.classes[target] == record["label_name"] == record["objects"][0]["shape"]
            assert SHAPES[record["label"]] == record["label_name"]
            # the ImageFolder copy is the COCO image, byte for byte
            assert Path(path).read_bytes() == (shapes_dir / split / record["file_name"]).read_bytes()


def test_shapes_attributes_match_pixels_and_captions(shapes_dir):
    attrs = json.loads((shapes_dir / "annotations/attributes_train.json").read_text())
    n_objects = []
    for record in attrs["images"]:
        img = np.asarray(Image.open(shapes_dir / "train" / record["file_name"])).astype(int)
        objects = record["objects"]
        n_objects.append(len(objects))
        outside = np.ones(img.shape[:2], dtype=bool)
        for obj in objects:
            # centre pixel carries the exact named colour
            cx, cy = obj["center"]
            assert np.abs(img[int(cy), int(cx)] - COLOURS[obj["colour"]]).max() <= 1, (record["id"], obj)
            # named grid cell contains the whole shape
            row, col = divmod(POSITIONS.index(obj["position"]), 3)
            x, y, w, h = obj["bbox"]
            cell = 64 / 3
            assert col * cell <= x and x + w <= (col + 1) * cell and row * cell <= y and y + h <= (row + 1) * cell
            outside[max(0, int(y) - 1):int(np.ceil(y + h)) + 1, max(0, int(x) - 1):int(np.ceil(x + w)) + 1] = False
            # every caption names every attribute of every object
            for caption in record["captions"]:
                assert obj["colour"] in caption and obj["shape"] in caption and obj["position"] in caption
        assert img[outside].max() == 0  # nothing drawn outside the bboxes
        if len(objects) > 1:  # the primary is the unique large object
            assert [o["size"] for o in objects] == ["large"] + ["small"] * (len(objects) - 1)
        # large shapes cover more pixels than small ones
        assert len(set(o["position"] for o in objects)) == len(objects)
    assert set(n_objects) == {1, 2, 3}
    areas = {"small": [], "large": []}
    for record in attrs["images"]:
        for obj in record["objects"]:
            areas[obj["size"]].append(obj["bbox"][2] * obj["bbox"][3])
    assert min(areas["large"]) > max(areas["small"])


@pytest.mark.parametrize("size", [32, 128])
def test_shapes_image_sizes(tmp_path, size):
    write_shapes(tmp_path, num_images=5, image_size=size, val_fraction=0.0, progress=False)
    assert not (tmp_path / "val").exists()
    files = sorted((tmp_path / "train").glob("*.png"))
    assert len(files) == 5 and all(Image.open(f).size == (size, size) for f in files)
    assert np.asarray(Image.open(files[0])).max() > 0


def test_shapes_deterministic(shapes_dir, tmp_path):
    write_shapes(tmp_path / "again", seed=3, **SHAPES_KW)
    write_shapes(tmp_path / "other", seed=4, **SHAPES_KW)
    reference = _hashes(shapes_dir)
    assert _hashes(tmp_path / "again") == reference
    other = _hashes(tmp_path / "other")
    assert _not_imagefolder(other) == _not_imagefolder(reference) and other != reference


def test_shapes_bad_arguments(tmp_path):
    for kwargs in (dict(image_size=48), dict(max_shapes=10), dict(max_shapes=0), dict(val_fraction=1.0),
                   dict(captions_per_image=9), dict(num_images=8, val_fraction=0.25)):
        with pytest.raises(ValueError):
            write_shapes(tmp_path, progress=False, **kwargs)


# attributes_{train,val}.json of write_shapes(num_images=40, image_size=32, seed=11, max_shapes=1,
# val_fraction=0.25, captions_per_image=2), written by the writer before primary_size existed (every file
# of that dataset was byte-identical after the option was added)
_GOLDEN_MIXED_ATTRIBUTES = {
    "train": "112fb7baf649d8c9199d1dbe6dedf10dee0909627f7b15a9b3ede81e9832d09d",
    "val": "cd0bd41532536d495481f0e6849379f2080054e9be89349e3d82f25921153cc9"}
_GOLDEN_KW = dict(num_images=40, image_size=32, seed=11, max_shapes=1, val_fraction=0.25, captions_per_image=2,
                  progress=False)


def _records(root: Path) -> list[dict]:
    return [r for split in ("train", "val")
            for r in json.loads((root / f"annotations/attributes_{split}.json").read_text())["images"]]


def test_shapes_primary_size_default_is_the_old_data(tmp_path):
    write_shapes(tmp_path / "d", **_GOLDEN_KW)
    write_shapes(tmp_path / "m", primary_size="mixed", **_GOLDEN_KW)
    for split, digest in _GOLDEN_MIXED_ATTRIBUTES.items():
        data = (tmp_path / "d" / f"annotations/attributes_{split}.json").read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
    assert _hashes(tmp_path / "d") == _hashes(tmp_path / "m")
    info = json.loads((tmp_path / "d" / "dataset_info.json").read_text())
    assert "primary_size" not in info["config"]           # data written before the option: same config
    sizes = [r["objects"][0]["size"] for r in _records(tmp_path / "d")]
    assert {"small", "large"} <= set(sizes)               # the default mixes the two


@pytest.mark.parametrize("max_shapes", [1, 3])
def test_shapes_primary_size_large(tmp_path, max_shapes):
    kw = {**_GOLDEN_KW, "max_shapes": max_shapes}
    write_shapes(tmp_path / "mixed", **kw)
    info = write_shapes(tmp_path / "large", primary_size="large", **kw)
    assert info["config"]["primary_size"] == "large"
    assert json.loads((tmp_path / "large" / "dataset_info.json").read_text())["config"]["primary_size"] == "large"
    mixed, large = _records(tmp_path / "mixed"), _records(tmp_path / "large")
    assert all(r["objects"][0]["size"] == "large" for r in large)
    assert all(o["size"] == "small" for r in large for o in r["objects"][1:])   # still the unique largest
    assert any(r["objects"][0]["size"] == "small" for r in mixed)
    # the same random draws: only the sizes (and boxes) of the lone objects differ
    assert len(mixed) == len(large)
    for a, b in zip(mixed, large):
        assert a["label"] == b["label"]
        grown = a["objects"][0]["size"] == "small"
        assert [c.replace("small", "large") if grown else c for c in a["captions"]] == b["captions"]
        assert [(o["shape"], o["colour"], o["cell"]) for o in a["objects"]] == \
            [(o["shape"], o["colour"], o["cell"]) for o in b["objects"]]
    # the pixels show it: a large primary covers more of the image than a small one did
    for a, b in zip(mixed, large):
        if a["objects"][0]["size"] == "small" and len(a["objects"]) == 1:
            split = a["file_name"].split("_")[0]
            lit = [np.asarray(Image.open(root / split / a["file_name"])).max(axis=2) > 60
                   for root in (tmp_path / "mixed", tmp_path / "large")]
            assert lit[1].sum() > 1.8 * lit[0].sum()


@pytest.mark.parametrize("max_shapes", [1, 3])
def test_shapes_primary_size_huge(tmp_path, max_shapes):
    kw = {**_GOLDEN_KW, "max_shapes": max_shapes}
    write_shapes(tmp_path / "mixed", **kw)
    info = write_shapes(tmp_path / "huge", primary_size="huge", **kw)
    assert info["config"]["primary_size"] == "huge"
    mixed, huge = _records(tmp_path / "mixed"), _records(tmp_path / "huge")
    assert sorted(r["label"] for r in mixed) == sorted(r["label"] for r in huge)   # balanced the same way
    for a, b in zip(mixed, huge):
        # the class object alone, huge and centred; with one object per image from the same draws as
        # the default data (same class, shape and colour)
        p = b["objects"][0]
        assert len(b["objects"]) == 1 and (p["size"], p["cell"], p["position"]) == ("huge", 4, "center")
        assert p["shape"] == b["label_name"]
        if max_shapes == 1:
            assert (b["label"], p["colour"]) == (a["label"], a["objects"][0]["colour"])
        assert all("huge" in c and "center" in c for c in b["captions"])
        # its box spans more than half the image and stays inside it
        size = kw["image_size"]
        x, y, w, h = p["bbox"]
        assert w > 0.5 * size and h > 0.5 * size
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
        # the pixels: only the object's colour is lit, and it fills much of the image
        split = b["file_name"].split("_")[0]
        img = np.asarray(Image.open(tmp_path / "huge" / split / b["file_name"])).astype(np.float64)
        lit = img.max(axis=2) > 60
        assert lit.mean() > 0.15            # a lone large object: < 0.07
        cx, cy = (int(round(v)) for v in p["center"])
        rgb = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)   # inside every shape
        assert np.abs(rgb - np.asarray(COLOURS[p["colour"]])).max() < 30


def test_shapes_primary_size_bad_value_and_reuse(tmp_path):
    with pytest.raises(ValueError, match="primary_size.*'giant'"):
        write_shapes(tmp_path / "bad", primary_size="giant", progress=False)
    kw = dict(num_images=6, val_fraction=0.0, progress=False)
    write_shapes(tmp_path / "d", **kw)
    write_shapes(tmp_path / "d", primary_size="mixed", **kw)           # the same dataset: rewritten
    with pytest.raises(FileExistsError, match="primary_size"):          # another one: refused, named
        write_shapes(tmp_path / "d", primary_size="large", **kw)


def test_overwrite_rules(tmp_path):
    kw = dict(num_images=6, val_fraction=0.0, progress=False)
    write_shapes(tmp_path, **kw)
    before = _hashes(tmp_path)
    write_shapes(tmp_path, **kw)  # same dataset, same config: rewritten, identical
    assert _hashes(tmp_path) == before
    with pytest.raises(FileExistsError):
        write_shapes(tmp_path, seed=1, **kw)
    (tmp_path / "notes.txt").write_text("mine")
    write_shapes(tmp_path, seed=1, overwrite=True, **kw)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # entries the writer does not own survive
    assert _not_imagefolder(_hashes(tmp_path)) == _not_imagefolder(before) | {"notes.txt"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError) as err:
        write_moving_digits(other, **DIGITS_KW)
    assert "not written by cmgen" in str(err.value) and "--overwrite" not in str(err.value)
    real = tmp_path / "real"                   # a real UCF101 folder: never emptied, even with overwrite
    (real / "ucf101" / "UCF-101").mkdir(parents=True)
    (real / "ucf101" / "UCF-101" / "v.avi").write_bytes(b"video")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="left alone"):
            write_moving_digits(real, overwrite=overwrite, **DIGITS_KW)
    assert (real / "ucf101" / "UCF-101" / "v.avi").read_bytes() == b"video"


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert cmgen_main(["data", "shapes", "--out", out, "--num-images", "6", "--val-fraction", "0",
                       "--no-progress"]) == 0
    assert cmgen_main(["data", "shapes", "--out", out, "--num-images", "7", "--val-fraction", "0",
                       "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cmgen_main(["data", "shapes", "--out", out, "--num-images", "7", "--val-fraction", "0",
                       "--no-progress", "--overwrite"]) == 0
    assert len(list((tmp_path / "d" / "train").iterdir())) == 7
    out = str(tmp_path / "l")
    assert cmgen_main(["data", "shapes", "--out", out, "--num-images", "6", "--val-fraction", "0",
                       "--max-shapes", "1", "--primary-size", "large", "--no-progress"]) == 0
    assert json.loads((tmp_path / "l" / "dataset_info.json").read_text())["config"]["primary_size"] == "large"
    assert all(r["objects"][0]["size"] == "large" for r in json.loads(
        (tmp_path / "l" / "annotations" / "attributes_train.json").read_text())["images"])
    out = str(tmp_path / "v")
    assert cmgen_main(["data", "moving-digits", "--out", out, "--num-videos", "16", "--num-frames", "4",
                       "--clips-per-group", "1", "--label", "direction", "--no-progress"]) == 0
    info = json.loads((tmp_path / "v" / "dataset_info.json").read_text())
    assert info["num_videos"] == {"train": 8, "test": 8} and info["config"]["num_frames"] == 4


# ---------------------------------------------------------------------------------------- moving digits

def _read_video(path: Path) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def _expected_step(name: str) -> np.ndarray:
    """Unit velocity (dx, dy) read off a class name like ``MoveUpLeft``; image y grows downward."""
    words = re.findall(r"[A-Z][a-z]+", name)[1:]
    return np.array([("Right" in words) - ("Left" in words), ("Down" in words) - ("Up" in words)])


def _centroid(frame: np.ndarray) -> np.ndarray:
    gray = frame.astype(np.float64).mean(-1)
    ys, xs = np.indices(gray.shape)
    return np.array([(xs * gray).sum(), (ys * gray).sum()]) / gray.sum()


def test_moving_digits_videos_decode_and_move(digits_dir):
    from sklearn.datasets import load_digits

    sk = load_digits()
    labels = json.loads((digits_dir / "labels.json").read_text())
    videos = labels["videos"]
    assert len(videos) == 24
    for v in videos:
        ucf = digits_dir / "ucf101" / "UCF-101" / v["ucf101_path"]
        msr = digits_dir / "msrvtt" / v["msrvtt_path"]
        assert ucf.read_bytes() == msr.read_bytes()
        frames = _read_video(ucf)
        assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
        assert np.abs(frames[..., 0].astype(int) - frames[..., 2]).max() <= 8  # gray replicated to RGB
        # the brightness centroid moves (T - 1) * speed px along the stated direction
        step = _expected_step(v["direction"]) * 2
        assert v["velocity"] == step.tolist()
        moved = _centroid(frames[-1]) - _centroid(frames[0])
        np.testing.assert_allclose(moved, 7 * step, atol=0.75)
        for t in range(1, 8):
            np.testing.assert_allclose(_centroid(frames[t]) - _centroid(frames[t - 1]), step, atol=0.75)
        # frame 0 around the start position is the sklearn digit, upscaled 3x (24 px)
        x, y = v["start"]
        crop = frames[0, y:y + 24, x:x + 24, 0].astype(np.float64)
        assert frames[0, ..., 0].astype(np.float64).sum() - crop.sum() < 0.02 * crop.sum()
        pooled = crop.reshape(8, 3, 8, 3).mean(axis=(1, 3))
        source = sk.images[v["digit_index"]]
        assert sk.target[v["digit_index"]] == v["digit"]
        assert np.corrcoef(pooled.ravel(), source.ravel())[0, 1] > 0.9


def test_moving_digits_ucf101_split_files(digits_dir):
    split_dir = digits_dir / "ucf101" / "ucfTrainTestlist"
    class_ind = [line.split() for line in (split_dir / "classInd.txt").read_text().splitlines()]
    assert [int(i) for i, _ in class_ind] == list(range(1, 9))
    names = [n for _, n in class_ind]
    assert names == sorted(d[0] for d in DIRECTIONS)
    pattern = re.compile(r"^(\w+)/v_\1_g(\d{2})_c(\d{2})\.mp4$")
    train = [line.split() for line in (split_dir / "trainlist01.txt").read_text().splitlines()]
    test = (split_dir / "testlist01.txt").read_text().splitlines()
    assert len(train) == 16 and len(test) == 8
    for path, idx in train:
        m = pattern.match(path)
        assert m and names[int(idx) - 1] == m.group(1) and int(m.group(2)) > 1
        assert (digits_dir / "ucf101" / "UCF-101" / path).is_file()
    for path in test:
        m = pattern.match(path)
        assert m and m.group(1) in names and int(m.group(2)) == 1  # test split = group 1, as UCF split 1
        assert (digits_dir / "ucf101" / "UCF-101" / path).is_file()
    on_disk = {str(p.relative_to(digits_dir / "ucf101" / "UCF-101"))
               for p in (digits_dir / "ucf101" / "UCF-101").rglob("*.mp4")}
    assert on_disk == {p for p, _ in train} | set(test)
    # held-out handwriting: test digits come from the last quarter of load_digits
    labels = json.loads((digits_dir / "labels.json").read_text())
    for v in labels["videos"]:
        assert (v["digit_index"] >= int(1797 * 0.75)) == (v["split"] == "test")


def test_moving_digits_msrvtt_files(digits_dir):
    msr = digits_dir / "msrvtt"
    data = json.loads((msr / "MSRVTT_data.json").read_text())
    videos = {v["video_id"]: v for v in data["videos"]}
    assert len(videos) == 24
    for v in data["videos"]:
        assert {"video_id", "category", "url", "start time", "end time", "split", "id"} <= set(v)
        assert v["video_id"] == f"video{v['id']}" and (msr / v["url"]).is_file()
        assert v["split"] in ("train", "test") and v["end time"] == pytest.approx(1.0)
    sen_ids = [s["sen_id"] for s in data["sentences"]]
    assert len(set(sen_ids)) == len(sen_ids) == 24 * 4
    labels = {v["video_id"]: v for v in json.loads((digits_dir / "labels.json").read_text())["videos"]}
    captions: dict[str, list[str]] = {}
    for s in data["sentences"]:
        assert set(s) == {"video_id", "caption", "sen_id"}
        captions.setdefault(s["video_id"], []).append(s["caption"])
        v = labels[s["video_id"]]
        assert str(v["digit"]) in s["caption"].split() or DIGIT_WORDS[v["digit"]] in s["caption"].split()
        compass = {"Up": "north", "Down": "south", "Left": "west", "Right": "east"}
        for word in re.findall(r"[A-Z][a-z]+", v["direction"])[1:]:
            assert word.lower() in s["caption"].split() or compass[word] in s["caption"], (v["direction"], s)
    assert all(len(set(c)) == 4 for c in captions.values())

    with open(msr / "MSRVTT_train.9k.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["video_id"]
    train_ids = [r["video_id"] for r in rows]
    assert sorted(train_ids) == sorted(k for k, v in videos.items() if v["split"] == "train")
    with open(msr / "MSRVTT_JSFUSION_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["key", "vid_key", "video_id", "sentence"]
    assert sorted(r["video_id"] for r in rows) == sorted(k for k, v in videos.items() if v["split"] == "test")
    for i, r in enumerate(rows):
        assert r["key"] == f"ret{i}" and r["vid_key"] == "msr" + r["video_id"][len("video"):]
        assert r["sentence"] in captions[r["video_id"]]
    # MSR-VTT convention: train ids come before test ids
    assert max(videos[i]["id"] for i in train_ids) < min(videos[r["video_id"]]["id"] for r in rows)


def _dirty_heap(seed: int) -> None:
    """Leave freed, non-zero memory on the heap, where an encoder that reads memory it never wrote picks
    it up (libx264's assembly did: the bytes of a clip changed with what ran before, see video_io.py)."""
    rng = np.random.default_rng(seed)
    junk = [rng.integers(1, 256, size=int(n), dtype=np.uint8) for n in rng.integers(1_000, 400_000, size=30)]
    del junk


def test_moving_digits_deterministic(digits_dir, tmp_path):
    """The promise of cmgen.data.video_io: same seed -> same annotation files and same decoded frames on
    any machine, and same mp4 bytes for one PyAV build on one architecture (checked here on this one)."""
    from cmgen.data import h264_encoder

    _dirty_heap(0)
    write_moving_digits(tmp_path / "again", seed=5, **DIGITS_KW)
    _dirty_heap(1)
    write_moving_digits(tmp_path / "other", seed=6, **DIGITS_KW)
    reference, again, other = _hashes(digits_dir), _hashes(tmp_path / "again"), _hashes(tmp_path / "other")
    assert set(again) == set(other) == set(reference)
    videos = sorted(k for k in reference if k.endswith(".mp4"))
    assert len(videos) == 48
    annotations = [k for k in reference if not k.endswith(".mp4")]
    assert {k: again[k] for k in annotations} == {k: reference[k] for k in annotations}
    assert any(other[k] != reference[k] for k in annotations)
    n_changed = 0
    for k in videos:
        frames = _read_video(digits_dir / k)
        np.testing.assert_array_equal(_read_video(tmp_path / "again" / k), frames, err_msg=k)
        n_changed += not np.array_equal(_read_video(tmp_path / "other" / k), frames)
    assert n_changed >= len(videos) // 2  # another seed moves other digits from other places
    if h264_encoder() == "libx264":
        assert {k: again[k] for k in videos} == {k: reference[k] for k in videos}


def test_rgb_to_yuv420p():
    from cmgen.data.video_io import rgb_to_yuv420p

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    yuv = rgb_to_yuv420p(rgb).astype(np.int64)
    assert yuv.shape == (6, 6)
    y, cb, cr = yuv[:4].ravel(), yuv[4:].ravel()[:6], yuv[4:].ravel()[6:]
    # slow reference: BT.601 limited range, float, then 2x2 means of full-resolution chroma
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    y_ref = 16 + (65.738 * r + 129.057 * g + 25.064 * b) / 256
    cb_ref = 128 + (-37.945 * r - 74.494 * g + 112.439 * b) / 256
    cr_ref = 128 + (112.439 * r - 94.154 * g - 18.285 * b) / 256
    assert np.abs(y - y_ref.ravel()).max() <= 1.0
    for got, ref in ((cb, cb_ref), (cr, cr_ref)):
        pooled = ref.reshape(2, 2, 3, 2).mean(axis=(1, 3)).ravel()
        assert np.abs(got - pooled).max() <= 1.5
    gray = np.repeat(np.arange(0, 256, 8, dtype=np.uint8).reshape(4, 8, 1), 3, axis=-1)
    yuv = rgb_to_yuv420p(gray)
    assert (yuv[4:] == 128).all() and yuv[0, 0] == 16 and yuv[3, 7] == 16 + (248 * 220 + 128) // 256


def test_moving_digits_digit_label(tmp_path):
    write_moving_digits(tmp_path, label="digit", num_videos=20, num_frames=4, clips_per_group=1, progress=False)
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert labels["classes"] == [f"Digit{d}" for d in range(10)]
    for v in labels["videos"]:
        assert v["class_name"] == f"Digit{v['digit']}" and v["class_index"] == v["digit"]
    assert len({v["direction"] for v in labels["videos"]}) > 1


def test_moving_digits_bad_arguments(tmp_path):
    for kwargs in (dict(label="colour"), dict(num_frames=1), dict(size=63), dict(digit_size=70),
                   dict(speed=3, num_frames=16), dict(num_videos=8), dict(captions_per_video=0)):
        with pytest.raises(ValueError):
            write_moving_digits(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())  # arguments are checked before anything is written


# ------------------------------------------------------------------------ embedded data of the methods

SMALL_SHAPES = dict(num_images=8, image_size=32, max_shapes=1, val_fraction=0.0, captions_per_image=1)


def test_writer_config_matches_dataset_info(shapes_dir, digits_dir):
    from cmgen.data import writer_config

    info = json.loads((shapes_dir / "dataset_info.json").read_text())
    assert writer_config("shapes", {k: v for k, v in {**SHAPES_KW, "seed": 3}.items()
                                    if k != "progress"}) == info["config"]
    info = json.loads((digits_dir / "dataset_info.json").read_text())
    assert writer_config("moving-digits", {k: v for k, v in {**DIGITS_KW, "seed": 5}.items()
                                           if k != "progress"}) == info["config"]
    with pytest.raises(ValueError, match="frame_size"):
        writer_config("moving-digits", {"frame_size": 32})
    # primary_size is recorded only when not the default, as the writer records it: the default data's
    # config (and so its embedded_data_dir digest) is what it was before the option existed
    assert "primary_size" not in writer_config("shapes", {}) and \
        "primary_size" not in writer_config("shapes", {"primary_size": "mixed"})
    assert writer_config("shapes", {"primary_size": "large"})["primary_size"] == "large"


def test_embedded_data_default_location_and_generate_modes(tmp_path, monkeypatch, capsys):
    from cmgen.data import embedded_data_dir, prepare_embedded_data
    from cmgen.errors import DataError, DataNotFoundError

    monkeypatch.setenv("CMGEN_DATA", str(tmp_path / "store"))
    need = ("imagefolder/train", "annotations/attributes_train.json")
    with pytest.raises(DataNotFoundError, match="generate=never"):   # never: nothing is written
        prepare_embedded_data(None, "shapes", SMALL_SHAPES, "never", need)
    root = prepare_embedded_data(None, "shapes", SMALL_SHAPES, "auto", need)
    assert root == embedded_data_dir("shapes", SMALL_SHAPES) and root.parent == tmp_path / "store"
    assert root.name.startswith("shapes-") and (root / "imagefolder" / "train").is_dir()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]   # the partial copy was renamed
    stamp = (root / "dataset_info.json").stat().st_mtime_ns
    assert prepare_embedded_data(None, "shapes", SMALL_SHAPES, "auto", need) == root   # reused, not rewritten
    assert prepare_embedded_data(None, "shapes", SMALL_SHAPES, "never", need) == root
    assert (root / "dataset_info.json").stat().st_mtime_ns == stamp
    other = prepare_embedded_data(None, "shapes", {**SMALL_SHAPES, "seed": 1}, "auto", need)
    assert other != root                   # other settings, other folder: data is never silently reused
    # data written by an older cmgen at the default location is rewritten by auto, refused by never
    info = json.loads((root / "dataset_info.json").read_text())
    (root / "dataset_info.json").write_text(json.dumps({**info, "format_version": 0}))
    with pytest.raises(DataNotFoundError, match="format 0"):
        prepare_embedded_data(None, "shapes", SMALL_SHAPES, "never", need)
    prepare_embedded_data(None, "shapes", SMALL_SHAPES, "auto", need)
    assert json.loads((root / "dataset_info.json").read_text()) == info
    with pytest.raises(DataError, match="data.generate"):
        prepare_embedded_data(None, "shapes", SMALL_SHAPES, "sometimes", need)


def test_embedded_data_default_is_data_under_the_current_directory(default_data_location):
    """Without $CMGEN_DATA the embedded data goes to ./data (here a temporary cwd, not the checkout)."""
    from cmgen.data import embedded_data_dir, prepare_embedded_data

    expected = embedded_data_dir("shapes", SMALL_SHAPES)
    assert expected.parent == Path("data") and expected.name.startswith("shapes-")
    root = prepare_embedded_data(None, "shapes", SMALL_SHAPES, "auto", ("imagefolder/train",))
    assert root.resolve() == (default_data_location / expected.name).resolve()
    assert (default_data_location / expected.name / "dataset_info.json").is_file()


def test_the_suite_keeps_embedded_data_out_of_the_checkout():
    """tests/conftest.py points $CMGEN_DATA at a session temporary directory outside the repository."""
    import os

    from cmgen.data import embedded_data_dir

    store = Path(os.environ["CMGEN_DATA"]).resolve()
    repo = Path(__file__).resolve().parents[1]
    assert store.is_dir() and repo not in store.parents and store != repo
    assert embedded_data_dir("shapes", SMALL_SHAPES).resolve().parent == store


def test_embedded_data_user_root_is_never_replaced(tmp_path, monkeypatch, capsys):
    from cmgen.data import prepare_embedded_data
    from cmgen.errors import DataNotFoundError

    monkeypatch.setenv("CMGEN_DATA", str(tmp_path / "store"))
    need = ("ucf101/UCF-101", "ucf101/ucfTrainTestlist/classInd.txt")
    real = tmp_path / "UCF"                       # a real-data folder with a mistyped layout
    (real / "ucf101" / "UCF-101" / "ApplyEyeMakeup").mkdir(parents=True)
    (real / "ucf101" / "UCF-101" / "ApplyEyeMakeup" / "v.avi").write_bytes(b"x")
    for generate in ("auto", "never"):
        with pytest.raises(DataNotFoundError) as err:
            prepare_embedded_data(real, "moving-digits", {}, generate, need, key="data")
        message = str(err.value)
        assert str(real / "ucf101/ucfTrainTestlist/classInd.txt") in message and "data.root" in message
        assert "--overwrite" not in message and "generate=always" not in message
    with pytest.raises(FileExistsError, match="not written by cmgen") as err:   # always: still left alone
        prepare_embedded_data(real, "moving-digits", {}, "always", need)
    assert "--overwrite" not in str(err.value)
    assert (real / "ucf101" / "UCF-101" / "ApplyEyeMakeup" / "v.avi").read_bytes() == b"x"
    assert not (tmp_path / "store").exists()     # nothing synthetic was written anywhere
    missing = tmp_path / "typo"
    with pytest.raises(DataNotFoundError, match="generate=always writes it here"):
        prepare_embedded_data(missing, "shapes", SMALL_SHAPES, "auto", ("imagefolder/train",))
    assert not missing.exists()
    # a root cmgen wrote with other settings than the config's: used, and the difference is reported
    written = tmp_path / "mine"
    write_shapes(written, **SMALL_SHAPES, progress=False)
    capsys.readouterr()
    assert prepare_embedded_data(written, "shapes", {**SMALL_SHAPES, "num_images": 16}, "auto",
                                 ("imagefolder/train",)) == written
    note = capsys.readouterr().err
    assert "num_images: 8 there, 16 asked" in note and "other settings" in note
    prepare_embedded_data(written, "shapes", {**SMALL_SHAPES, "num_images": 16}, "always", ("imagefolder/train",))
    assert json.loads((written / "dataset_info.json").read_text())["config"]["num_images"] == 16

"""``moving-digits``: real handwritten digits moving in 8 directions, as H.264 mp4 in UCF101/MSR-VTT formats.

The digits are scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``, shipped
inside the wheel), upscaled bilinearly to ``digit_size`` px and pasted on a black ``size`` x ``size``
canvas. A digit moves in a straight line at ``speed`` px per frame along each moving axis (so a diagonal
step is ``speed`` px in x AND in y) for ``num_frames`` frames. Start positions are drawn so the digit stays
fully inside the canvas for the whole clip: no bouncing or wrapping, the direction label holds for every
frame. Grayscale is replicated to RGB and encoded yuv420p H.264 (libx264 with the reproducible settings of
:mod:`cmgen.data.video_io`: the same seed gives the same annotation files and decoded frames on any
machine, and the same mp4 bytes for one PyAV build on one architecture).

Class (``label``): ``"direction"`` (default; 8 action-like classes ``MoveDown`` ... ``MoveUpRight``, the
UCF101 use: recognise the motion whatever the digit) or ``"digit"`` (10 classes ``Digit0`` ...). Class
indices follow the alphabetical order of the names, as UCF101's ``classInd.txt`` does.

UCF101 grouping: within a class, videos come in groups (``gXX``) of ``clips_per_group`` clips (``cYY``)
sharing one handwritten digit image (as a UCF101 group shares an actor); clips differ in start position
(and, with ``label="digit"``, direction). As in UCF101 split 1, the test split is groups
``1..test_groups`` of every class. Test groups draw their digit images from the last quarter of
``load_digits`` and train groups from the first three quarters, so test digits are unseen handwriting.

Layout written under ``out_dir``::

    ucf101/UCF-101/<Class>/v_<Class>_g01_c01.mp4   videos, UCF101 naming
    ucf101/ucfTrainTestlist/classInd.txt           "1 MoveDown" (1-based, alphabetical)
    ucf101/ucfTrainTestlist/trainlist01.txt        "MoveDown/v_MoveDown_g02_c01.mp4 1"
    ucf101/ucfTrainTestlist/testlist01.txt         "MoveDown/v_MoveDown_g01_c01.mp4"
    msrvtt/videos/all/video0.mp4 ...               the same videos, MSR-VTT naming (train ids first)
    msrvtt/MSRVTT_data.json                        videos[{video_id, category, url, start time, end time,
                                                     split, id}], sentences[{video_id, caption, sen_id}]
    msrvtt/MSRVTT_train.9k.csv                     column video_id: the train videos
    msrvtt/MSRVTT_JSFUSION_test.csv                key,vid_key,video_id,sentence: test videos, 1 caption
    labels.json                                    per video: digit, direction, velocity, start, split ...
    README.md, dataset_info.json
"""
from __future__ import annotations

import csv
import io
import os
import textwrap
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .common import FORMAT_VERSION, INFO_FILE, prepare_out_dir, write_json, write_text
from .video_io import h264_encoder, write_mp4

__all__ = ["DIRECTIONS", "DIGIT_WORDS", "CAPTION_TEMPLATES", "class_names", "load_digit_images", "render_clip",
           "write_moving_digits"]

# name, velocity (dx, dy) in image coordinates (y grows downward), caption phrase, compass heading
DIRECTIONS = (
    ("MoveUp", (0, -1), "up", "north"),
    ("MoveUpRight", (1, -1), "up and to the right", "north-east"),
    ("MoveRight", (1, 0), "to the right", "east"),
    ("MoveDownRight", (1, 1), "down and to the right", "south-east"),
    ("MoveDown", (0, 1), "down", "south"),
    ("MoveDownLeft", (-1, 1), "down and to the left", "south-west"),
    ("MoveLeft", (-1, 0), "to the left", "west"),
    ("MoveUpLeft", (-1, -1), "up and to the left", "north-west"),
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d}: numeral, {word}: digit word, {phrase}/{compass}: direction; no commas (the JSFusion csv is plain)
CAPTION_TEMPLATES = (
    "the digit {d} moves {phrase}",
    "a handwritten {word} moving {phrase}",
    "the number {word} slides {phrase}",
    "a white digit {d} drifts {phrase} across a black background",
    "the digit {d} heads {compass}",
    "a {word} written by hand travels {phrase}",
)
LABELS = ("direction", "digit")
_TEST_POOL_START = 0.75  # share of load_digits used for train groups; the rest is held out for test


def load_digit_images(digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 handwritten digits upscaled to ``(N, digit_size, digit_size)`` uint8, and targets (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray((img / 16.0).astype(np.float32))
                   .resize((digit_size, digit_size), Image.Resampling.BILINEAR))
        for img in digits.images])
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8), digits.target.astype(np.int64)


def render_clip(digit: np.ndarray, start: tuple[int, int], velocity: tuple[int, int], num_frames: int,
                size: int) -> np.ndarray:
    """Frames ``(T, size, size, 3)`` uint8 of ``digit`` ``(s, s)`` with top-left corner at
    ``start + t * velocity`` (x, y) in frame t; the path must stay inside the canvas."""
    s = digit.shape[0]
    frames = np.zeros((num_frames, size, size), dtype=np.uint8)
    for t in range(num_frames):
        x, y = start[0] + t * velocity[0], start[1] + t * velocity[1]
        if not (0 <= x <= size - s and 0 <= y <= size - s):
            raise ValueError(f"frame {t}: digit at ({x}, {y}) leaves the {size}px canvas (digit {s}px)")
        frames[t, y:y + s, x:x + s] = digit
    return np.repeat(frames[..., None], 3, axis=-1)


def class_names(label: str) -> list[str]:
    """UCF101 class names for ``label``, sorted like UCF101's ``classInd.txt`` (and torchvision's
    ``find_classes``), so index i is class ``i + 1`` of classInd.txt."""
    if label == "direction":
        return sorted(d[0] for d in DIRECTIONS)
    if label == "digit":
        return [f"Digit{d}" for d in range(10)]
    raise ValueError(f"label must be one of {LABELS}, got {label!r}")


def _plan(rng: np.random.Generator, targets: np.ndarray, num_videos: int, label: str, clips_per_group: int,
          test_groups: int) -> list[dict[str, Any]]:
    """Class, group, clip, split and digit image of every video, in MSR-VTT order (train first)."""
    classes = class_names(label)
    n = len(classes)
    per_class = [num_videos // n + (c < num_videos % n) for c in range(n)]
    n_split = int(len(targets) * _TEST_POOL_START)
    pools = {"train": np.arange(n_split), "test": np.arange(n_split, len(targets))}
    videos = []
    for c, count in enumerate(per_class):
        groups = -(-count // clips_per_group)
        if groups <= test_groups:
            raise ValueError(f"class {classes[c]} gets {count} videos = {groups} groups of {clips_per_group}; "
                             f"needs more than test_groups={test_groups} so its train split is not empty "
                             f"(num_videos={num_videos})")
        for g in range(groups):
            split = "test" if g < test_groups else "train"
            pool = pools[split]
            if label == "digit":
                pool = pool[targets[pool] == c]
            digit_index = int(rng.choice(pool))
            for k in range(min(clips_per_group, count - g * clips_per_group)):
                videos.append({"class_index": c, "class_name": classes[c], "group": g + 1, "clip": k + 1,
                               "split": split, "digit_index": digit_index, "digit": int(targets[digit_index])})
    videos.sort(key=lambda v: (v["split"] == "test", v["class_index"], v["group"], v["clip"]))
    return videos


def write_moving_digits(out_dir: str | os.PathLike, num_videos: int = 160, num_frames: int = 16, size: int = 64,
                        fps: int = 8, seed: int = 0, label: str = "direction", digit_size: int = 24,
                        speed: int = 2, clips_per_group: int = 4, test_groups: int = 1,
                        captions_per_video: int = 5, crf: int = 18, overwrite: bool = False,
                        progress: bool = True) -> dict[str, Any]:
    """Write the ``moving-digits`` dataset (layout in the module docstring); deterministic in ``seed``.

    Args:
        out_dir: dataset root; created if missing (see :func:`cmgen.data.common.prepare_out_dir`).
        num_videos: total videos, spread evenly over the classes.
        num_frames: frames per video (T).
        size: canvas side in pixels (even, for yuv420p).
        fps: container frame rate.
        label: ``"direction"`` (8 classes) or ``"digit"`` (10 classes) for the UCF101 class folders.
        digit_size: side of the upscaled digit in pixels.
        speed: pixels per frame along each moving axis; needs ``(T - 1) * speed <= size - digit_size``.
        clips_per_group: clips per UCF101 group (one handwritten digit image per group).
        test_groups: groups ``1..test_groups`` of every class form the test split.
        captions_per_video: distinct caption templates per video, 1..len(CAPTION_TEMPLATES).
        crf: x264 constant rate factor.
        overwrite: replace a different dataset already in ``out_dir``.
        progress: show a tqdm bar.

    Returns:
        ``dataset_info.json``'s content plus ``"root"`` (absolute path).
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 so the digit moves, got {num_frames}")
    if size % 2 or size < 8:
        raise ValueError(f"size must be even and >= 8, got {size}")
    if not 8 <= digit_size <= size:
        raise ValueError(f"digit_size must be in [8, size={size}], got {digit_size}")
    if speed < 1 or (num_frames - 1) * speed > size - digit_size:
        raise ValueError(f"a digit of {digit_size}px moving {speed}px/frame for {num_frames} frames leaves the "
                         f"{size}px canvas: need 1 <= speed and (num_frames - 1) * speed <= size - digit_size")
    if clips_per_group < 1 or test_groups < 1:
        raise ValueError(f"clips_per_group and test_groups must be >= 1, got {clips_per_group}, {test_groups}")
    if not 1 <= captions_per_video <= len(CAPTION_TEMPLATES):
        raise ValueError(f"captions_per_video must be in [1, {len(CAPTION_TEMPLATES)}], got {captions_per_video}")
    config = {"num_videos": num_videos, "num_frames": num_frames, "size": size, "fps": fps, "seed": seed,
              "label": label, "digit_size": digit_size, "speed": speed, "clips_per_group": clips_per_group,
              "test_groups": test_groups, "captions_per_video": captions_per_video, "crf": crf}
    digits, targets = load_digit_images(digit_size)
    rng = np.random.default_rng(seed)
    plan = _plan(rng, targets, num_videos, label, clips_per_group, test_groups)
    root = prepare_out_dir(out_dir, "moving-digits", config, overwrite)

    travel = (num_frames - 1) * speed
    records, sentences = [], []
    sen_id = 0
    for vid, video in enumerate(tqdm(plan, desc="moving-digits", unit="video", disable=not progress)):
        if label == "direction":
            direction = [d[0] for d in DIRECTIONS].index(video["class_name"])
        else:
            direction = int(rng.integers(len(DIRECTIONS)))
        name, (dx, dy), phrase, compass = DIRECTIONS[direction]
        velocity = (dx * speed, dy * speed)
        # start anywhere the whole straight path stays on the canvas
        lo = [travel if v < 0 else 0 for v in (dx, dy)]
        hi = [size - digit_size - (travel if v > 0 else 0) for v in (dx, dy)]
        start = (int(rng.integers(lo[0], hi[0] + 1)), int(rng.integers(lo[1], hi[1] + 1)))
        frames = render_clip(digits[video["digit_index"]], start, velocity, num_frames, size)

        cls = video["class_name"]
        ucf_rel = f"{cls}/v_{cls}_g{video['group']:02d}_c{video['clip']:02d}.mp4"
        video_id = f"video{vid}"
        ucf_path = root / "ucf101" / "UCF-101" / ucf_rel
        msr_path = root / "msrvtt" / "videos" / "all" / f"{video_id}.mp4"
        ucf_path.parent.mkdir(parents=True, exist_ok=True)
        msr_path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(ucf_path, frames, fps=fps, crf=crf)
        shutil.copyfile(ucf_path, msr_path)

        d = video["digit"]
        fields = {"d": d, "word": DIGIT_WORDS[d], "phrase": phrase, "compass": compass}
        captions = [CAPTION_TEMPLATES[int(t)].format(**fields)
                    for t in rng.permutation(len(CAPTION_TEMPLATES))[:captions_per_video]]
        for caption in captions:
            sentences.append({"caption": caption, "video_id": video_id, "sen_id": sen_id})
            sen_id += 1
        records.append({**video, "video_id": video_id, "id": vid, "ucf101_path": ucf_rel,
                        "msrvtt_path": f"videos/all/{video_id}.mp4", "direction": name,
                        "direction_index": direction, "velocity": list(velocity), "start": list(start),
                        "num_frames": num_frames, "captions": captions})

    classes = class_names(label)
    _write_ucf101(root / "ucf101" / "ucfTrainTestlist", classes, records)
    _write_msrvtt(root / "msrvtt", records, sentences, num_frames / fps)
    write_json(root / "labels.json", {"label": label, "classes": classes, "directions": [d[0] for d in DIRECTIONS],
                                      "videos": records})
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "test")}
    info = {
        "dataset": "moving-digits", "format_version": FORMAT_VERSION, "config": config, "classes": classes,
        "encoder": h264_encoder(), "num_videos": counts, "num_captions": len(sentences),
        "files": {
            "ucf101_videos": "ucf101/UCF-101",
            "ucf101_splits": "ucf101/ucfTrainTestlist",
            "msrvtt_videos": "msrvtt/videos/all",
            "msrvtt_data": "msrvtt/MSRVTT_data.json",
            "msrvtt_train": "msrvtt/MSRVTT_train.9k.csv",
            "msrvtt_test": "msrvtt/MSRVTT_JSFUSION_test.csv",
            "labels": "labels.json",
        },
    }
    write_text(root / "README.md", _readme(config, counts))
    write_json(root / INFO_FILE, info)
    return {**info, "root": str(root.resolve())}


def _write_ucf101(split_dir: Path, classes: list[str], records: list[dict[str, Any]]) -> None:
    write_text(split_dir / "classInd.txt", "".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    ordered = sorted(records, key=lambda r: r["ucf101_path"])
    write_text(split_dir / "trainlist01.txt", "".join(
        f"{r['ucf101_path']} {r['class_index'] + 1}\n" for r in ordered if r["split"] == "train"))
    write_text(split_dir / "testlist01.txt", "".join(
        f"{r['ucf101_path']}\n" for r in ordered if r["split"] == "test"))


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _write_msrvtt(msr_dir: Path, records: list[dict[str, Any]], sentences: list[dict[str, Any]],
                  duration: float) -> None:
    videos = [{"video_id": r["video_id"], "category": r["class_index"], "url": r["msrvtt_path"],
               "start time": 0.0, "end time": round(duration, 3), "split": r["split"], "id": r["id"]}
              for r in records]
    write_json(msr_dir / "MSRVTT_data.json", {
        "info": {"contributor": "cmgen", "description": "cmgen moving-digits captions (MSR-VTT format)",
                 "version": str(FORMAT_VERSION)},
        "videos": videos, "sentences": sentences})
    write_text(msr_dir / "MSRVTT_train.9k.csv",
               _csv([["video_id"]] + [[r["video_id"]] for r in records if r["split"] == "train"]))
    # JSFusion 1k-A convention: one caption per test video (its first)
    test = [r for r in records if r["split"] == "test"]
    write_text(msr_dir / "MSRVTT_JSFUSION_test.csv", _csv(
        [["key", "vid_key", "video_id", "sentence"]]
        + [[f"ret{i}", f"msr{r['id']}", r["video_id"], r["captions"][0]] for i, r in enumerate(test)]))


def _readme(config: dict[str, Any], counts: dict[str, int]) -> str:
    doc = __doc__.split("Layout written under ``out_dir``::", 1)[1]
    return (
        "# cmgen moving-digits\n\n"
        "Handwritten digits (scikit-learn's `load_digits`) moving in 8 directions, written by "
        f"`cmgen data moving-digits` (config: `{config}`; videos: {counts}).\n\n"
        f"Classes (`label={config['label']}`): see `ucf101/ucfTrainTestlist/classInd.txt`. A digit moves "
        f"{config['speed']} px/frame along each moving axis and stays inside the canvas for all "
        f"{config['num_frames']} frames (no bounce, no wrap). Videos are H.264 yuv420p mp4 at "
        f"{config['fps']} fps.\n\nReproducibility: the same config gives the same annotation files and the same "
        "decoded frames on any machine, and the same mp4 bytes with the same PyAV/libx264 build on the same "
        "CPU architecture (libx264 runs without assembly, in one thread).\n\nLayout:\n\n```\n"
        + textwrap.dedent(doc).strip("\n") + "\n```\n"
    )

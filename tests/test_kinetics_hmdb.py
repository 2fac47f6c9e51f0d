"""HMDB51 official split files and the Kinetics-400 loader, on small files written in their real formats."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from video.datasets import HMDB51, read_hmdb51_splits, stratified_subset


@pytest.fixture(scope="module")
def mp4s(tmp_path_factory):
    """Four short real mp4 files (moving digits, 12 frames of 32 px)."""
    from cmgen.data import write_moving_digits
    root = tmp_path_factory.mktemp("md")
    write_moving_digits(root, num_videos=16, num_frames=12, size=32, digit_size=16, speed=1, clips_per_group=1,
                        progress=False)
    return sorted((root / "ucf101" / "UCF-101").rglob("*.mp4"))[:4]


def write_hmdb(tmp_path: Path, mp4s) -> tuple[Path, Path]:
    """hmdb51_org/<class>/<video>.avi and testTrainMulti_7030_splits/<class>_test_split<k>.txt."""
    videos, splits = tmp_path / "hmdb51_org", tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    names = {"brush_hair": ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "Atempting_to_comb_my_hair_brush_hair_h_nm_np1_ba_goo_1.avi"],
             "shoot_ball": ["AMADEUS_shoot_ball_f_nm_np1_ba_med_1.avi", "Basketball_shoot_ball_u_cm_np1_ba_med_4.avi"]}
    i = 0
    for cls, files in names.items():
        (videos / cls).mkdir(parents=True)
        for f in files:
            shutil.copyfile(mp4s[i], videos / cls / f)
            i += 1
        # split 1: first video train, second test; split 2: the reverse; a third, unused (tag 0) entry
        (splits / f"{cls}_test_split1.txt").write_text(f"{files[0]} 1 \n{files[1]} 2 \nunused_{cls}.avi 0 \n")
        (splits / f"{cls}_test_split2.txt").write_text(f"{files[0]} 2 \n{files[1]} 1 \n")
    return videos, splits


def test_hmdb51_official_split_files(tmp_path, mp4s):
    videos, splits = write_hmdb(tmp_path, mp4s)
    classes, s1 = read_hmdb51_splits(splits, 1)
    assert classes == ["brush_hair", "shoot_ball"]
    assert s1["train"] == [("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0),
                           ("shoot_ball/AMADEUS_shoot_ball_f_nm_np1_ba_med_1.avi", 1)]
    assert [label for _, label in s1["test"]] == [0, 1] and all("unused" not in p for p, _ in s1["test"])
    _, s2 = read_hmdb51_splits(splits, 2)
    assert s2["train"] == s1["test"] and s2["test"] == s1["train"]
    ds = HMDB51(videos, splits, split=1, train=False, clip_len=4, clips_per_video=3)
    clips, label = ds[1]
    assert clips.shape == (3, 3, 4, 32, 32) and label == 1 and ds.classes == classes
    with pytest.raises(ValueError, match="test_split3"):
        read_hmdb51_splits(splits, 3)
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 3\n")
    with pytest.raises(ValueError, match=r"brush_hair_test_split1.txt:1"):
        read_hmdb51_splits(splits, 1)


def test_finetune_reads_hmdb51(tmp_path, mp4s):
    from cmgen.engine import load_config
    from tests.test_engine import ROOT
    from video.finetune import FinetuneMethod
    write_hmdb(tmp_path, mp4s)
    cfg = load_config(ROOT / "configs" / "finetune" / "hmdb51.yaml",
                      [f"data.root={tmp_path}", "model.backbone=tiny", "train.batch_size=4", "data.clip_len=4",
                       "data.crop_size=16"])
    method = FinetuneMethod(cfg)
    assert method.num_classes == 2 and len(method.build_dataset(cfg)) == 20     # 2 train videos x 10 clips
    clip, label = method.build_dataset(cfg)[3]
    assert clip.shape == (3, 4, 16, 16) and label == 1
    assert cfg.train.max_steps == 10 * 5 and cfg.schedule.milestones == [30, 40]


def test_stratified_subset_covers_classes_and_is_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 5                    # a class-sorted split file
    sub = stratified_subset(labels, 12, seed=3)
    counts = torch.bincount(torch.tensor([labels[i] for i in sub]), minlength=3).tolist()
    assert len(sub) == 12 and counts == [4, 4, 4] and sub == sorted(sub)
    assert stratified_subset(labels, 12, seed=3) == sub and stratified_subset(labels, 12, seed=4) != sub
    assert sorted(torch.bincount(torch.tensor([labels[i] for i in stratified_subset(labels, 20)])).tolist()) == [5, 7, 8]
    assert stratified_subset(labels, 100) == list(range(85))

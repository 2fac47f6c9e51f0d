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


def write_kinetics(tmp_path: Path, mp4s) -> Path:
    """train/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4 and the official CSV (one row missing)."""
    root = tmp_path / "kinetics400"
    (root / "train" / "abseiling").mkdir(parents=True)
    (root / "train" / "air_drumming").mkdir(parents=True)          # underscores for spaces, as some downloaders
    shutil.copyfile(mp4s[0], root / "train" / "abseiling" / "--07WQ2iBlw_000001_000011.mp4")
    shutil.copyfile(mp4s[1], root / "train" / "abseiling" / "-3B32lodo2M_000059_000069.mp4")
    shutil.copyfile(mp4s[2], root / "train" / "air_drumming" / "-VtLx-mcPds_000012_000022.mp4")
    (root / "kinetics_400_train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "abseiling,--07WQ2iBlw,1,11,train,0\n"
        "abseiling,-3B32lodo2M,59,69,train,0\n"
        "air drumming,-VtLx-mcPds,12,22,train,0\n"
        "air drumming,-absent0000,3,13,train,0\n"
        "air drumming,-validrow00,5,15,validate,0\n")
    return root


def test_kinetics_csv_layout_lists_missing_files_once(tmp_path, mp4s):
    from video.datasets import Kinetics400
    root = write_kinetics(tmp_path, mp4s)
    with pytest.warns(RuntimeWarning, match="1 of 4 videos") as record:
        ds = Kinetics400(root / "train", root / "kinetics_400_train.csv", split="train", clip_len=4)
    assert len(record) == 1
    assert ds.classes == ["abseiling", "air drumming"] and ds.targets == [0, 0, 1]
    assert [rel for rel, _ in ds.samples][2] == "air_drumming/-VtLx-mcPds_000012_000022.mp4"
    assert [Path(m).name for m in ds.missing] == ["-absent0000_000003_000013.mp4"]
    clip, label = ds[2]
    assert clip.shape == (3, 4, 32, 32) and label == 1
    with pytest.raises(ValueError, match="missing"):
        Kinetics400(root / "train", root / "kinetics_400_train.csv", split="train", missing="error")
    (root / "bad.csv").write_text("label,youtube_id\nabseiling,x\n")
    with pytest.raises(ValueError, match="expected the columns"):
        Kinetics400(root / "train", root / "bad.csv")


def test_kinetics_folder_layout(tmp_path, mp4s):
    from video.datasets import Kinetics400
    root = write_kinetics(tmp_path, mp4s)
    (root / "train" / "abseiling" / "notes.txt").write_text("not a video")
    ds = Kinetics400(root / "train", clip_len=4)
    assert ds.classes == ["abseiling", "air_drumming"] and ds.targets == [0, 0, 1] and ds.missing == []


def test_videomoco_pretrains_on_kinetics_with_official_augment(tmp_path, mp4s):
    from cmgen.engine import load_config, train
    from tests.test_engine import ROOT
    root = write_kinetics(tmp_path, mp4s)
    cfg = load_config(ROOT / "configs" / "videomoco" / "kinetics400.yaml", [
        f"data.root={root}", "protocol.epochs=2", "protocol.lr_drop_epochs=[1]", "protocol.adversarial_start_epoch=1",
        "model.backbone=tiny", "model.backbone_width=2", "model.K=6", "model.dim=8", "model.g_width=2",
        "model.g_hidden=4", "data.clip_len=8", "data.size=16", "train.batch_size=3", "train.num_workers=0",
        f"run.output_dir={tmp_path}", "run.name=k", "train.progress_bar=false", "train.trackers=[]",
        "train.log_every=1", "train.checkpoint_every=0"])
    with pytest.warns(RuntimeWarning, match="missing"):
        result = train(cfg)
    assert result.step == 2 and cfg.schedule.milestones == [1] and cfg.model.adversarial_start_step == 1
    assert result.metrics["data/skipped"] == 0.0 and result.metrics["loss_g"] != 0.0
    assert (tmp_path / "k" / "logs" / "missing_videos.txt").read_text().count("\n") == 1

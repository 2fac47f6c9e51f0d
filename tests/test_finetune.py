"""Fine-tuning (VideoMoCo eval.py protocol): transforms, checkpoint key mapping, BN mode, the 10-clip test."""
from __future__ import annotations

import json

import pytest
import torch

from cmgen.engine import load_config
from tests.test_engine import ROOT
from video.backbones import build_backbone
from video.finetune import (ActionClassifier, ClipTransform, FinetuneMethod, RepeatVideos, _strip_projection,
                            load_pretrained_encoder)
from video.videomoco import VideoMoCo

CONFIG = str(ROOT / "configs" / "finetune" / "moving_digits.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from cmgen.data import write_moving_digits
    root = tmp_path_factory.mktemp("md")
    write_moving_digits(root, num_videos=32, num_frames=16, size=32, digit_size=16, speed=1, clips_per_group=2,
                        progress=False)
    return root


def tiny_encoder(width=2):
    return _strip_projection(build_backbone("tiny", 8, width))


# ---------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------
def test_clip_transform_keeps_aspect_ratio_and_centre_crops():
    x = torch.rand(3, 4, 40, 80)
    y = ClipTransform(16, train=False, short_side=20, normalize=False)(x)      # 40x80 -> 20x40 -> centre 16
    assert y.shape == (3, 4, 16, 16)
    ref = torch.nn.functional.interpolate(x.transpose(0, 1), size=(20, 40), mode="bilinear", antialias=True,
                                          align_corners=False)[..., 2:18, 12:28].transpose(0, 1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    z = ClipTransform(8, train=False, normalize=True)(torch.full((3, 2, 8, 8), 0.5))
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(z[:, 0, 0, 0], expected)
    torch.manual_seed(0)
    w = ClipTransform(6, train=True, normalize=False)(torch.rand(3, 1, 12, 12).repeat(1, 3, 1, 1))
    assert w.shape == (3, 3, 6, 6) and torch.equal(w[:, 0], w[:, 2])               # one box for all frames
    with pytest.raises(ValueError, match="crop"):
        ClipTransform(0, train=True)


def test_repeat_videos_visits_each_video_repeats_times():
    ds = RepeatVideos(list(range(3)), 10)
    assert len(ds) == 30 and sorted(ds[i] for i in range(30)) == sorted(list(range(3)) * 10)


# ---------------------------------------------------------------------------------------------------
# model and checkpoint loading
# ---------------------------------------------------------------------------------------------------
def test_bn_stays_in_eval_mode_and_head_is_new():
    torch.manual_seed(0)
    model = ActionClassifier(tiny_encoder(), 5, bn_mode="eval").train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bns and not any(m.training for m in bns) and model.fc.training
    before = [m.running_mean.clone() for m in bns]
    model(torch.rand(2, 3, 4, 8, 8)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))       # statistics untouched
    assert model.fc.bias.abs().sum() == 0 and 0.004 < model.fc.weight.std() < 0.02
    assert all(m.training for m in ActionClassifier(tiny_encoder(), 5, bn_mode="train").train().modules())


def test_load_from_videomoco_d_maps_encoder_q_and_drops_projection(tmp_path):
    torch.manual_seed(0)
    d = VideoMoCo(build_backbone("tiny", 8, 2), dim=8, K=4)
    with torch.no_grad():
        for p in d.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    # an engine checkpoint directory as the trainer writes it (models g, d)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "engine_state.json").write_text(json.dumps({"models": ["g", "d"], "optimizers": [], "custom": []}))
    torch.save({}, ckpt / "pytorch_model.bin")
    torch.save(d.state_dict(), ckpt / "pytorch_model_1.bin")
    enc = tiny_encoder()
    report = load_pretrained_encoder(enc, tmp_path / "run")                        # run dir -> newest checkpoint
    assert report["missing"] == [] and report["unexpected"] == []
    assert "fc.weight" in report["dropped"] and any(k.startswith("encoder_k.") for k in report["dropped"])
    for name, value in enc.state_dict().items():
        assert torch.equal(value, d.encoder_q.state_dict()[name]), name

    # missing and unexpected keys are listed and refused unless allowed
    state = {f"module.encoder_q.{k}": v for k, v in d.encoder_q.state_dict().items()}
    state.pop("module.encoder_q.features.0.weight")
    state["module.encoder_q.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "official.pth.tar")
    with pytest.raises(ValueError, match=r"1 missing keys \['features.0.weight'\].*1 unexpected keys \['extra.weight'\]"):
        load_pretrained_encoder(tiny_encoder(), tmp_path / "official.pth.tar")
    report = load_pretrained_encoder(tiny_encoder(), tmp_path / "official.pth.tar", allow_missing=True,
                                     allow_unexpected=True)
    assert report["missing"] == ["features.0.weight"] and report["unexpected"] == ["extra.weight"]
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained_encoder(tiny_encoder(), tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="shape"):
        load_pretrained_encoder(tiny_encoder(width=3), tmp_path / "run")


def test_official_torchvision_keys_get_the_net_prefix(tmp_path):
    """Official netD checkpoints hold torchvision keys (module.encoder_q.stem.0.weight, ...)."""
    from torchvision.models.video import r3d_18
    torch.manual_seed(0)
    official_q = r3d_18(num_classes=128)                                           # base_encoder(num_classes=dim)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in official_q.state_dict().items()}},
               tmp_path / "checkpoint_0199.pth.tar")
    enc = _strip_projection(build_backbone("r3d_18", 128))
    report = load_pretrained_encoder(enc, tmp_path / "checkpoint_0199.pth.tar")
    assert report["missing"] == [] and sorted(report["dropped"]) == ["fc.bias", "fc.weight"]
    assert torch.equal(enc.net.layer4[1].conv2[0].weight, official_q.layer4[1].conv2[0].weight)


# ---------------------------------------------------------------------------------------------------
# the method: epochs -> steps, the 10-clip test protocol
# ---------------------------------------------------------------------------------------------------
class EvalCtx:
    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, models):
        self.models = models

    def unwrap(self, name):
        return self.models[name]


def test_epochs_set_steps_and_lr_drops(digits, tmp_path):
    cfg = load_config(CONFIG, [f"data.root={digits}/ucf101", "train.batch_size=8"])
    method = FinetuneMethod(cfg)
    # 16 train videos x 10 clips per epoch / batch 8 = 20 steps per epoch
    assert len(method.build_dataset(cfg)) == 160 and cfg.train.max_steps == 200
    assert cfg.schedule.kind == "step" and cfg.schedule.milestones == [120, 160] and cfg.train.eval_every == 20
    with pytest.raises(ValueError, match="num_classes=5"):
        FinetuneMethod(load_config(CONFIG, [f"data.root={digits}/ucf101", "model.num_classes=5"]))


def test_evaluate_averages_the_logits_of_ten_uniform_clips(digits):
    cfg = load_config(CONFIG, [f"data.root={digits}/ucf101", "model.backbone_width=2", "data.test_clips_per_video=3"])
    method = FinetuneMethod(cfg)
    torch.manual_seed(0)
    model = method.build_models(cfg)["model"]
    metrics = method.evaluate(EvalCtx({"model": model}))
    test = method._test_set()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(len(test)):
            clips, label = test[i]                                                 # (3, 3, T, 32, 32)
            assert clips.shape[:2] == (3, 3)
            correct += int(model(clips).mean(0).argmax() == label)
    assert metrics["test_videos"] == len(test) == 16
    assert metrics["top1"] == pytest.approx(100 * correct / 16)
    assert metrics["chance"] == pytest.approx(100 * 2 / 16)                        # 2 test videos per class
    sub = FinetuneMethod(load_config(CONFIG, [f"data.root={digits}/ucf101", "model.backbone_width=2",
                                              "data.test_clips_per_video=1", "data.eval_videos=8"]))
    assert sub.evaluate(EvalCtx({"model": model}))["test_videos"] == 8


def test_digit_labels_from_labels_json(digits):
    cfg = load_config(CONFIG, [f"data.root={digits}/ucf101", "data.label_field=digit"])
    method = FinetuneMethod(cfg)
    info = json.loads((digits / "labels.json").read_text())
    by_path = {v["ucf101_path"]: v["digit"] for v in info["videos"]}
    assert method.num_classes == 10
    assert [y for _, y in method.videos.samples] == [by_path[rel] for rel, _ in method.videos.samples]
    with pytest.raises(ValueError, match="label_field"):
        FinetuneMethod(load_config(CONFIG, [f"data.root={digits}/ucf101", "data.label_field=colour"]))

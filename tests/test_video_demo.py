"""The VideoMoCo demo stage: its report section, images and summary keys, and the plain-MoCo switches."""
from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from video.video_demo import ENCODERS, LABELS, METRICS, _verdict


def _results(videomoco: float, moco: float) -> dict:
    return {"VideoMoCo": {lab: {m: videomoco for m, _ in METRICS} for lab in LABELS},
            "plain MoCo": {lab: {m: moco for m, _ in METRICS} for lab in LABELS}}


def test_verdict_needs_a_margin_and_a_majority():
    assert "VideoMoCo beats plain MoCo" in _verdict(_results(50.0, 40.0), 64)[0]
    assert "behind" in _verdict(_results(40.0, 50.0), 64)[0]
    assert "does not clearly beat" in _verdict(_results(41.0, 40.0), 64)[0]
    one_big_win = _results(40.0, 40.0)
    one_big_win["VideoMoCo"]["direction"]["finetune"] = 80.0         # +5 on average, but 1 win of 8
    sentence, mean, wins = _verdict(one_big_win, 64)
    assert "does not clearly beat" in sentence and mean == pytest.approx(5.0) and wins == 1


@pytest.mark.slow
def test_demo_stage_with_a_tiny_budget_writes_its_section(tmp_path, monkeypatch):
    monkeypatch.setenv("CMGEN_DATA", str(tmp_path / "data"))
    from video.finetune import demo_stage

    report, summary = [], {}
    demo_stage(tmp_path / "demo", report, summary, budget_s=1.0)      # the minimum: 10 + 5 steps per run
    text = "\n".join(report)
    assert text.startswith("## VideoMoCo")
    assert "| random init |" in text and "| chance |" in text and "As measured here, VideoMoCo" in text
    s = summary["videomoco_demo"]
    assert s["pretrain_steps"] == 10 and s["finetune_steps"] == 5
    assert (s["train_videos"], s["test_videos"]) == (256, 64)
    for enc in ENCODERS:
        for lab in LABELS:
            assert set(s["results"][enc][lab]) == {m for m, _ in METRICS}
            assert all(0.0 <= v <= 100.0 for v in s["results"][enc][lab].values())
    assert s["chance"]["direction"] == pytest.approx(12.5)               # 8 balanced direction classes
    assert 0.0 < s["chance"]["digit"] < 50.0
    for key in ("chart", "samples"):
        with Image.open(s[key]) as img:
            assert img.format == "PNG" and min(img.size) > 50
        assert f"]({(tmp_path / 'demo' / s[key]).name})" in text
    assert json.loads((tmp_path / "demo" / "videomoco_demo.json").read_text())["verdict"] == s["verdict"]

    # plain MoCo: no temporal decay, G never runs; VideoMoCo: decay on, G trained after a third of the steps
    runs = {e: tmp_path / "demo" / "runs" / name for e, name in (("VideoMoCo", "videomoco-demo"),
                                                                 ("plain MoCo", "moco-demo"))}
    cfgs = {e: yaml.safe_load((d / "config.yaml").read_text()) for e, d in runs.items()}
    assert cfgs["plain MoCo"]["model"]["temporal_decay"] is None
    assert cfgs["plain MoCo"]["model"]["adversarial_start_step"] > 10
    assert cfgs["VideoMoCo"]["model"]["temporal_decay"] == pytest.approx(0.99999)
    assert cfgs["VideoMoCo"]["model"]["adversarial_start_step"] == 3
    loss_g = {e: [json.loads(line).get("loss_g", 0.0) for line in (d / "metrics.jsonl").read_text().splitlines()]
              for e, d in runs.items()}
    assert all(v == 0.0 for v in loss_g["plain MoCo"]) and any(v != 0.0 for v in loss_g["VideoMoCo"])

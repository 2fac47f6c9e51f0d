"""A 2-step smoke run of every config under configs/ (new methods are picked up automatically).

A paper-scale config (real data, full widths) names the overrides that make its smoke run tiny in
comment lines of its own: ``# smoke: data.root=... model.channels=8``. Every other key, the method, the
optimiser, the schedule and the loss settings, is the config's own, so the smoke run still checks them.
"""
import shlex
from pathlib import Path

import pytest
import torch

from cmgen.engine.registry import load_config
from cmgen.engine.trainer import train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


def smoke_overrides(config: Path) -> list[str]:
    """The ``key=value`` items of every ``# smoke:`` comment line in ``config``."""
    items = []
    for line in config.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# smoke:"):
            items += shlex.split(stripped[len("# smoke:"):])
    return items


def test_there_are_configs():
    assert CONFIGS, "no configs found under configs/"


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_two_steps(config, tmp_path):
    cfg = load_config(config, smoke_overrides(config) + [
        f"run.output_dir={tmp_path}", "run.name=smoke", "train.max_steps=2", "train.checkpoint_every=2",
        "train.sample_every=2", "train.eval_every=2", "train.log_every=1"])
    result = train(cfg)
    assert result.step == 2
    assert (result.run_dir / "config.yaml").exists() and (result.run_dir / "metrics.jsonl").exists()
    ckpts = list((result.run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_000002"]
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values() if isinstance(v, float))


@pytest.mark.slow
def test_demo_runs(tmp_path):
    """`cmgen demo` end to end on a tiny budget: data, quick loss benchmark, engine run, every method stage,
    a report with pictures in markdown, JSON and one self-contained HTML page."""
    import json
    import re

    from cmgen.cli import main
    from cmgen.demo import METHOD_STAGES

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--budget", "4"]) == 0
    report = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    for png in ("shapes.png", "moving_digits.png", "toy_losses.png"):
        assert png in images
    for png in images:
        assert (out / png).stat().st_size > 0, png
    assert "MoveUpLeft" in report
    assert "## Loss benchmark" in report and "NTXent" in report
    summary = json.loads((out / "report.json").read_text())
    for title, *_ in METHOD_STAGES:          # every subsystem has run its stage, or is listed as missing
        assert title in summary["stages"] or title in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(images) and "<table>" in html

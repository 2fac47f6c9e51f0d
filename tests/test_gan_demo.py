"""The demo's GAN stage (text2image/gan_demo.py): four short runs, scored, gridded and reported."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from text2image.gan_demo import RUNS, attribute_overlap, demo_stage


def test_attribute_overlap_analytic():
    a = torch.tensor([0, 0, 1, 1])
    assert attribute_overlap(a, a.flip(0), 3) == pytest.approx(1.0)
    assert attribute_overlap(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), 2) == pytest.approx(0.0)
    # hist (1, 0) vs (0.5, 0.5): TV 0.5
    assert attribute_overlap(torch.zeros(4, dtype=torch.long), a, 2) == pytest.approx(0.5)


@pytest.mark.slow
def test_demo_stage_tiny_budget(tmp_path):
    report, summary = [], {}
    demo_stage(tmp_path, report, summary, budget_s=1.0, eval_samples=20, probe_steps=1,
               evaluator_recipe={"train_images": 200, "epochs": 1})
    text = "\n".join(report)
    assert text.startswith("## Contrastive GAN discriminators on shapes")
    assert "not comparable with published FID" in text and "As measured here:" in text
    g = summary["gan_demo"]
    assert set(g["runs"]) == {name for name, *_ in RUNS}
    for name, label, rel, overrides, conditional in RUNS:
        r = g["runs"][name]
        assert f"| {label} | {r['steps']} |" in text
        assert r["steps"] >= 2 and r["config"] == f"configs/{rel}" and r["overrides"] == overrides
        assert ("class_accuracy" in r) == conditional
        for key in ("shapes_fd", "overlap/colour", "overlap/size", "overlap/position", "confident"):
            assert key in r
        assert all(0.0 <= r[k] <= 1.0 for k in r if k.startswith("overlap/") or k in ("class_accuracy", "confident"))
        assert 1 <= r["classes_covered"] <= 5 and f"| {r['confident']:.0%} ({r['classes_covered']}) |" in text
        png = tmp_path / f"gan_{name}.png"
        assert f"![{name} samples](gan_{name}.png)" in text and png.is_file()
        img = Image.open(png)
        # enlarged 4x; one row per class (5 shapes) or 5 rows, 10 samples a row, 32 px + 2 px padding
        assert img.size == (4 * (10 * 34 + 2), 4 * (5 * 34 + 2))
    assert "rows, top to bottom: circle, square, triangle, diamond, star" in text
    # one evaluator and ceiling per data variant: ContraGAN's huge shapes, ContraD's default data
    assert set(g["real"]) == {r["data"] for r in g["runs"].values()}
    assert g["runs"]["contragan"]["data"] != g["runs"]["contrad"]["data"]
    for root_name, real in g["real"].items():
        assert 0.0 <= real["class_accuracy"] <= 1.0 and f"| real val images, `{root_name}` (ceiling" in text
    assert g["chance"]["class_accuracy"] == 0.2
    assert "ContraGAN" in g["verdict"] and "ContraD" in g["verdict"]
    assert (tmp_path / "gan_losses.png").is_file()


def test_verdict_needs_a_margin_beyond_noise():
    from text2image.gan_demo import _verdict

    def runs(acc_a, acc_b, fd_a, fd_b, conf_a=0.5, conf_b=0.5):
        return {"contragan": {"label": "ContraGAN", "class_accuracy": acc_a, "n": 500},
                "biggan": {"label": "BigGAN", "class_accuracy": acc_b, "n": 500},
                "contrad": {"label": "ContraD", "shapes_fd": fd_a, "confident": conf_a, "classes_covered": 5},
                "contrad-std": {"label": "plain", "shapes_fd": fd_b, "confident": conf_b, "classes_covered": 3}}

    level = _verdict(runs(0.25, 0.25, 1350.3, 1387.3))      # the demo's tie and a 3% FD gap
    assert level.count("is within noise of") == 3 and "beats" not in level
    clear = _verdict(runs(0.60, 0.25, 500.0, 1400.0, 0.63, 0.40))
    assert clear.count("beats") == 3 and "confident share (63% with 5 classes vs 40% with 3;" in clear
    worse = _verdict(runs(0.20, 0.30, 1600.0, 1000.0, 0.40, 0.60))
    assert worse.count("is behind") == 3
    # two binomial standard errors of 500 samples: 0.55 vs 0.50 is noise, 0.60 vs 0.50 is not
    assert "within noise of its plain baseline on confident" in _verdict(runs(0.2, 0.2, 1, 1, 0.55, 0.50))
    assert "beats its plain baseline on confident" in _verdict(runs(0.2, 0.2, 1, 1, 0.60, 0.50))
    # a higher share on fewer shapes is a collapse: the criterion (>= 60% with all 5) decides first
    collapsed = runs(0.2, 0.2, 1, 1, 0.87, 1.00)
    collapsed["contrad-std"]["classes_covered"] = 1
    assert "ContraD beats its plain baseline on confident share (87% with 5 classes vs 100% with 1; only the " \
        "first meets" in _verdict(collapsed)
    collapsed["contrad"]["classes_covered"] = 4                    # neither meets it: the shares decide
    assert "ContraD is behind its plain baseline on confident" in _verdict(collapsed)


def test_shapes_data_root_separates_max_shapes_variants(tmp_path):
    """Runs on different shapes data (data.max_shapes) must not share the demo's data folder."""
    from cmgen.engine.registry import load_config
    from text2image.gan_demo import PROJECT_ROOT, shapes_data_root

    path = PROJECT_ROOT / "configs" / "contragan" / "shapes.yaml"
    base = ["data.num_images=512", "data.seed=0", "data.primary_size=mixed", "data.max_shapes=2"]  # config: 1, huge
    assert shapes_data_root(tmp_path, load_config(path, [*base, "data.max_shapes=2"])) == tmp_path / "data" / "shapes_32px"
    one = shapes_data_root(tmp_path, load_config(path, [*base, "data.max_shapes=1"]))
    assert one == tmp_path / "data" / "shapes_32px_n512_s0_m1"
    assert shapes_data_root(tmp_path, load_config(path, ["data.num_images=256", "data.max_shapes=2",
                                                         "data.primary_size=mixed"])).name == "shapes_32px_n256_s0"
    large = ["data.primary_size=large"]               # the large-object variant: its own folder
    assert shapes_data_root(tmp_path, load_config(path, [*base, *large])) == tmp_path / "data" / "shapes_32px_n512_s0_large"
    assert shapes_data_root(tmp_path, load_config(path, [*base, *large, "data.max_shapes=1"])).name == \
        "shapes_32px_n512_s0_m1_large"
    assert shapes_data_root(tmp_path, load_config(path, [*base, "data.primary_size=mixed"])) == \
        tmp_path / "data" / "shapes_32px"
    assert shapes_data_root(tmp_path, load_config(path, [])).name == "shapes_32px_n256_s0_m1_huge"   # the config's


@pytest.mark.slow
def test_parallel_runs_match_their_configs_and_a_failure_names_its_log(tmp_path):
    """Two `cmgen train` processes at a time: each run lands in its own directory with the asked steps; a
    run that fails inside its process raises with its log's path and tail."""
    import json

    from text2image.gan_demo import _run_overrides, _train_all

    tiny = ["data.num_images=40", "train.batch_size=4"]
    jobs = [("contragan/shapes.yaml", _run_overrides(n, "contragan/shapes.yaml", tiny, tmp_path, 2, []))
            for n in ("a", "b")]
    done = _train_all(jobs, workers=2)
    assert [Path(d).name for d, _ in done] == ["gan-a", "gan-b"] and all(s > 0 for _, s in done)
    for d, _ in done:
        steps = [json.loads(line)["step"] for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2 and (Path(d).parent / (Path(d).name + ".log")).is_file()
    bad = ("contragan/shapes.yaml", _run_overrides("c", "contragan/shapes.yaml", ["data.num_images=3"], tmp_path, 2, []))
    with pytest.raises(RuntimeError, match=r"gan-c failed \(exit [1-9]\d*\); the end of .*gan-c\.log"):
        _train_all([jobs[0], bad], workers=2)

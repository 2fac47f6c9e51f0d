"""The loss benchmark (bench/losses.py) and its measurement helpers (bench/_measure.py)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import _measure  # noqa: E402


def _load_bench_losses():
    if "bench_losses" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_losses", BENCH / "losses.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_losses"] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["bench_losses"]


def _importable(module: str, attr: str | None = None) -> bool:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return attr is None or hasattr(mod, attr)


def test_peak_memory_sees_a_transient_allocation():
    import numpy as np

    with _measure.PeakMemory("cpu") as peak:
        block = np.ones(64 * _measure.MIB // 8)  # 64 MiB, touched, then freed inside the region
        del block
    assert 60 * _measure.MIB <= peak.extra_bytes <= 80 * _measure.MIB, (peak.extra_bytes, peak.method)


def test_time_repeated_respects_repeat_and_budget():
    assert len(_measure.time_repeated(lambda: None, repeat=4, budget_s=10.0)["wall"]) == 4
    # The budget stops new calls, but one call always happens. Sleeping costs wall time, not CPU time.
    times = _measure.time_repeated(lambda: time.sleep(0.05), repeat=100, budget_s=0.12)
    assert 2 <= len(times["wall"]) <= 4 and min(times["wall"]) >= 0.05 and max(times["cpu"]) < 0.04
    assert len(_measure.time_repeated(lambda: time.sleep(0.05), repeat=5, budget_s=1e-6)["wall"]) == 1
    with pytest.raises(ValueError, match="repeat"):
        _measure.time_repeated(lambda: None, repeat=0, budget_s=1.0)
    summary = _measure.summarize_times({"wall": [3.0, 1.0, 2.0], "cpu": [6.0, 2.0, 4.0]})
    assert summary == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "cpu_median_s": 4.0, "reps": 3}


def test_markdown_table_and_bad_rows():
    table = _measure.markdown_table(["a", "b"], [[1, "x"]], align="lr")
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| 1 | x |"]
    with pytest.raises(ValueError, match="2 columns"):
        _measure.markdown_table(["a", "b"], [[1]])


def test_run_worker_parses_json_and_kills_on_timeout():
    ok = _measure.run_worker(["-c", "print('noise'); print('{\"x\": 1}')"], timeout_s=30)
    assert ok["status"] == "ok" and ok["x"] == 1
    bad = _measure.run_worker(["-c", "import sys; sys.exit(3)"], timeout_s=30)
    assert bad["status"] == "error" and bad["returncode"] == 3
    killed = _measure.run_worker(["-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert killed["status"] == "killed" and "timeout" in killed["reason"] and killed["wall_s"] < 10


def test_prediction_skips_over_budget_configurations(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "losses.py"), "--quick", "--sizes", "4096", "--impls", "lightly",
         "--max-mem-gb", "0.01", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "losses_quick.json").read_text())["results"]
    assert [r["status"] for r in result] == ["skipped"]
    assert "needs ≈" in result[0]["note"] and "skipped: needs" in (tmp_path / "losses_quick.md").read_text()


def _result(impl, loss=1.0, grad_norm=2.0, grad_proj=0.5, times=(1.0,), peak=100):
    return {"impl": impl, "n": 8, "status": "ok", "loss": loss, "grad_norm": grad_norm, "grad_proj": grad_proj,
            "times_s": list(times), "cpu_times_s": [2 * t for t in times], "extra_peak_bytes": peak,
            "median_s": times[0], "min_s": times[0], "max_s": times[0], "cpu_median_s": 2 * times[0], "reps": 1}


def test_agreement_flags_a_wrong_loss_or_gradient():
    bench = _load_bench_losses()
    results = [_result("lightly"), _result("cmgen", loss=1.00001), _result("cmgen-chunked", grad_proj=0.51),
               _result("pml-supcon", loss=1.01)]
    bench.check_agreement(results)
    assert [r["reference"] for r in results] == ["lightly"] * 4
    assert [r["agrees"] for r in results] == [True, True, False, False]
    assert results[2]["grad_rel_diff"] == pytest.approx(0.01 / 2.0)


def test_merge_rounds_pools_timings_and_takes_median_memory():
    bench = _load_bench_losses()
    merged = bench.merge_rounds([_result("cmgen", times=(3.0, 1.0), peak=10), _result("cmgen", times=(2.0,), peak=30),
                                 _result("cmgen", times=(5.0,), peak=20)])
    assert merged["times_s"] == [3.0, 1.0, 2.0, 5.0] and merged["reps"] == 4 and merged["rounds"] == 3
    assert merged["median_s"] == 2.5 and merged["min_s"] == 1.0 and merged["cpu_median_s"] == 5.0
    assert merged["extra_peak_bytes"] == 20


def test_memory_prediction_scales_dense_quadratically_and_chunked_linearly():
    bench = _load_bench_losses()
    dense, chunked = bench.IMPLS["lightly"], bench.IMPLS["cmgen-chunked"]
    assert bench.predict_extra_bytes(dense, 4096, 1024, {1024: 100, 512: 1}) == 1600
    assert bench.predict_extra_bytes(chunked, 4096, 1024, {1024: 100}) == 400
    # nothing measured yet: the prior, per element of the (2N)^2 matrix or the chunk x 2N block
    assert bench.predict_extra_bytes(dense, 1024, 1024, {}) == dense.bytes_per_elem * 2048**2
    assert bench.predict_extra_bytes(chunked, 1024, 256, {}) == chunked.bytes_per_elem * 256 * 2048


@pytest.mark.slow
def test_quick_benchmark_produces_an_agreeing_table(tmp_path):
    impls = [name for name, module, attr in (
        ("cmgen", "cmgen.losses", "NTXent"),
        ("cmgen-chunked", "cmgen.losses", "NTXent"),
        ("lightly", "lightly.loss", None),
        ("pml-supcon", "pytorch_metric_learning.losses", None),
    ) if _importable(module, attr)]
    if len(impls) < 2:
        pytest.skip(f"need two implementations to compare, have {impls}")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "losses.py"), "--quick", "--sizes", "256", "--impls", ",".join(impls),
         "--chunk-size", "100", "--repeat", "2", "--budget", "0.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    markdown = (tmp_path / "losses_quick.md").read_text()
    assert "| N pairs | implementation |" in markdown and f"Machine: {_measure.cpu_model()}" in markdown
    data = json.loads((tmp_path / "losses_quick.json").read_text())
    results = data["results"]
    assert [r["impl"] for r in results] == impls
    assert all(r["status"] == "ok" and r["agrees"] for r in results), results
    # 2N = 512 random rows against each other: the loss is between 0 and log(2N - 1), and every
    # implementation's gradient is nonzero and the same.
    for r in results:
        assert 0 < r["loss"] < 6.24 and r["grad_norm"] > 0 and r["median_s"] > 0 and r["reps"] >= 1
        assert r["loss_rel_diff"] <= 1e-4 and r["grad_rel_diff"] <= 1e-3


def test_retrieval_bench_smoke(tmp_path):
    """bench/retrieval.py --smoke (in-process): cmgen, faiss and CLIP4Clip agree and the table is written."""
    spec = importlib.util.spec_from_file_location("bench_retrieval", BENCH / "retrieval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    impls = "cmgen,faiss,clip4clip" if _importable("faiss") else "cmgen,clip4clip"
    code = bench.main(["--smoke", "--inline", "--n", "600", "--dim", "32", "--impls", impls, "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "retrieval_smoke.json").read_text())
    assert data["problems"] == [] and all(r["status"] == "ok" for r in data["results"])
    assert {(r["impl"], r["n"]) for r in data["results"]} >= {("cmgen", 600), ("clip4clip", data["settings"]["n_full"])}
    assert "| N | implementation |" in (tmp_path / "retrieval_smoke.md").read_text()
    # a wrong number is caught
    results = [dict(r, metrics=json.loads(json.dumps(r["metrics"]))) for r in data["results"]]
    other = next(r for r in results if r["impl"] != "cmgen" and r["n"] == data["settings"]["n_full"])
    other["metrics"]["t2v"]["R@1"] += 1.0
    assert bench.check_agreement(results) and other["agrees_with_cmgen"] is False


@pytest.mark.slow
def test_generation_eval_bench_smoke(tmp_path):
    """bench/generation_eval.py --smoke (in-process): cmgen's and pytorch-fid's FID agree, the table is written."""
    spec = importlib.util.spec_from_file_location("bench_generation_eval", BENCH / "generation_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--smoke", "--inline", "--n", "4", "--num-workers", "0", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "generation_eval_smoke.json").read_text())
    assert code == 0 and data["problems"] == []
    fids = {r["impl"]: r["fid"] for r in data["results"]}
    assert set(fids) == {"pytorch-fid", "cmgen"} and fids["cmgen"] > 0
    assert abs(fids["cmgen"] - fids["pytorch-fid"]) <= 1e-3
    assert "| implementation | FID |" in (tmp_path / "generation_eval_smoke.md").read_text()


def test_gpu_bench_smoke_runs_on_cpu_and_writes_its_report(tmp_path):
    """bench/gpu.py --smoke: the three workloads at tiny sizes through the same code as on a GPU."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["smoke"] and report["contragan"]["finite"] and report["videomoco"]["finite"]
    assert report["contragan"]["images_per_sec"] > 0 and report["videomoco"]["clips_per_sec"] > 0
    cmgen_rows = [r for r in report["ntxent"] if r["impl"].startswith("cmgen")]
    assert len(cmgen_rows) == 2 and all(r["status"] == "ok" and r["median_s"] > 0 for r in cmgen_rows)
    for r in report["ntxent"]:
        if r["impl"] == "lightly" and r["status"] == "ok":
            assert all(abs(c["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"]) for c in cmgen_rows)
    md = (tmp_path / "gpu.md").read_text()
    assert "| contragan |" in md and "| videomoco |" in md and "NT-Xent" in md


@pytest.mark.slow
def test_video_pipeline_bench_smoke(tmp_path):
    """bench/video_pipeline.py --smoke (in-process, 1 worker): every pipeline yields (B, 3, 32, 112, 112) two-view
    batches of the same clips count, the memory checkpoints are read, the table is written."""
    spec = importlib.util.spec_from_file_location("bench_video_pipeline", BENCH / "video_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--smoke", "--inline", "--workers", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "video_pipeline_smoke.json").read_text())
    assert code == 0 and [r["pipeline"] for r in data["results"]] == list(bench.DEFAULT_PIPELINES)
    for r in data["results"]:
        assert r["clips"] == 16 and r["clips_per_s"] > 0 and r["cpu_s_per_clip"] > 0
        assert [m["clips"] for m in r["memory"]] == [0, 8, 16] and all(m["rss_mib"] > 0 for m in r["memory"])
    md = (tmp_path / "video_pipeline_smoke.md").read_text()
    assert "| pipeline | clips | clips/s | vs PyAV | vs decord |" in md and "| cmgen | 16 |" in md
    assert "Machine: " in md
    with pytest.raises(ValueError, match="pipeline"):
        bench.build("opencv", tmp_path, 1)


def test_shapes_gan_quality_bench_smoke(tmp_path, monkeypatch, capsys):
    """bench/shapes_gan_quality.py (in-process, tiny evaluator): a 4-step ContraD run and a 4-step ContraGAN
    run are trained, timed and scored with the scorer of their kind; the table and the JSON lines are written."""
    from evaluation import shapes_eval

    monkeypatch.setattr(shapes_eval, "_TRAIN_IMAGES", 200)
    monkeypatch.setattr(shapes_eval, "_EPOCHS", 1)
    spec = importlib.util.spec_from_file_location("bench_shapes_gan_quality", BENCH / "shapes_gan_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = ["train.max_steps=4", "train.batch_size=4", "ema.start_step=1", "train.checkpoint_every=4",
            "data.num_images=40"]
    jsonl = tmp_path / "q.jsonl"
    for config, key in (("configs/contrad/shapes.yaml", "confident"), ("configs/contragan/shapes.yaml", "class_accuracy")):
        code = bench.main([str(BENCH.parent / config), "--seeds", "3", "--samples", "8", "--out", str(tmp_path / "o"),
                           "--json", str(jsonl), "--tag", "smoke", *tiny])
        assert code == 0
        rec = json.loads(jsonl.read_text().splitlines()[-1])
        assert rec["seed"] == 3 and rec["steps"] == 4 and rec["samples"] == 8 and rec["weights"] == "ema"
        assert rec["cpu_s"] > 0 and rec["wall_s"] > 0 and 0 <= rec[key] <= 1 and rec["shapes_fd"] > 0
        assert rec["overrides"] == tiny and isinstance(rec["meets"], bool)
        assert (tmp_path / "o" / "runs" / "smoke-s3").is_dir()
    out = capsys.readouterr().out
    assert "| seed | steps | CPU-s | wall-s | confident | classes_covered |" in out and "| class acc |" in out
    assert out.count("| mean |") == 2 and len(jsonl.read_text().splitlines()) == 2
    # 40 images under the GAN demo's folder for their settings, not the default shapes_32px of another size
    assert (tmp_path / "o" / "data" / "shapes_32px_n40_s0").is_dir()              # ContraD: default data
    assert (tmp_path / "o" / "data" / "shapes_32px_n40_s0_m1_huge").is_dir()      # ContraGAN: huge shapes
    assert not (tmp_path / "o" / "data" / "shapes_32px").exists()
    # --curve scores every kept checkpoint (steps 2 and 4), --plot draws them
    png = tmp_path / "curve.png"
    code = bench.main([str(BENCH.parent / "configs/contragan/shapes.yaml"), "--seeds", "3", "--samples", "8",
                       "--out", str(tmp_path / "o"), "--json", str(jsonl), "--tag", "curve", "--curve", "--plot",
                       str(png), *tiny, "train.checkpoint_every=2", "train.keep_last=3"])
    assert code == 0
    rec = json.loads(jsonl.read_text().splitlines()[-1])
    assert [p["step"] for p in rec["curve"]] == [2, 4]
    assert all(0 <= p["class_accuracy"] <= 1 and p["weights"] == "ema" for p in rec["curve"])
    assert rec["curve"][-1]["class_accuracy"] == rec["class_accuracy"]      # the last checkpoint is the final G
    assert 0 <= rec["d_real_acc"] <= 1 and 0 <= rec["d_fake_acc"] <= 1     # the 2C head read as a classifier
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "| step | seed 3 |" in capsys.readouterr().out


def test_shapes_d_probe_smoke(tmp_path, capsys):
    """bench/shapes_d_probe.py: a ContraGAN config's D (2C only) and the anchor network trained a few steps
    on real shapes; held-out accuracies at the asked steps, the table and the JSON line; a config without
    a 2C head is refused by name."""
    spec = importlib.util.spec_from_file_location("bench_shapes_d_probe", BENCH / "shapes_d_probe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = str(BENCH.parent / "configs/contragan/shapes.yaml")
    jsonl = tmp_path / "p.jsonl"
    tiny = ["data.num_images=40", "model.backbone=deep_conv", "model.attention_at=null"]
    assert bench.main([config, *tiny, "--steps", "4", "--every", "2", "--out", str(tmp_path / "o"),
                       "--json", str(jsonl)]) == 0
    rec = json.loads(jsonl.read_text())
    assert [r["step"] for r in rec["curve"]] == [2, 4] and rec["train_images"] == 35 and rec["test_images"] == 448
    assert all(0 <= r["d_head_acc"] <= 1 and 0 <= r["anchor_acc"] <= 1 and r["d_2c"] > 0 for r in rec["curve"])
    assert rec["cpu_s_d"] > 0 and rec["cpu_s_anchor"] > 0
    assert "| step | D head (2C only) | anchor (evaluator net, CE) | D 2C loss |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="d_cond_mtd=2C"):
        bench.probe(config, ["model.d_cond_mtd=PD", *tiny], 1, 1, tmp_path / "o")

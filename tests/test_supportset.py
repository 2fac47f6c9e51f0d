"""Support-set bottlenecks: the attention over support sets, tiny-config models, training, checkpoint -> CLI."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from video.supportset import (CaptionDecoder, PairDataset, SupportSetModel, SupportSetModelConfig, support_attention)


def _loop_attention(q, k, v, variant, t, index=None, mem_k=None, mem_v=None, mem_index=None):
    """Plain loops in float64: the support set of every i, softmax over it, weighted sum."""
    out = []
    b = q.shape[0]
    keys = list(k) + ([] if mem_k is None else list(mem_k))
    vals = list(v) + ([] if mem_v is None else list(mem_v))
    ids = (list(index) if index is not None else list(range(b))) + ([] if mem_index is None else list(mem_index))
    for i in range(b):
        if variant == "identity":
            out.append(v[i].double())
            continue
        support = [j for j in range(len(keys)) if not (variant == "cross" and (j == i or (j >= b and ids[j] == ids[i])))]
        logits = [float(q[i].double() @ keys[j].double()) / t for j in support]
        z = max(logits)
        w = [math.exp(x - z) for x in logits]
        mix = sum(wj / sum(w) * vals[j].double() for wj, j in zip(w, support))
        out.append(0.5 * (v[i].double() + mix) if variant == "hybrid" else mix)
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["identity", "full", "hybrid", "cross"])
def test_support_attention_matches_loops(variant):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 4, generator=g) for _ in range(3))
    got, w = support_attention(q, k, v, variant, 0.3)
    torch.testing.assert_close(got.double(), _loop_attention(q, k, v, variant, 0.3), rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.sum(1), torch.ones(5))
    mk, mv = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    index, mem_index = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([2, 7, 8])
    got, w = support_attention(q, k, v, variant, 0.3, mk, mv, index, mem_index)
    want = _loop_attention(q, k, v, variant, 0.3, index, mk, mv, mem_index)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_cross_variant_excludes_i():
    g = torch.Generator().manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    values = torch.randn(6, 8, generator=g, requires_grad=True)
    mixed, w = support_attention(e, e, values, "cross", 0.1)
    assert torch.all(w.diagonal() == 0) and torch.allclose(w.sum(1), torch.ones(6))
    # e_bar_2 does not depend on v_2 at all (no gradient, no change when v_2 changes) ...
    (grad,) = torch.autograd.grad(mixed[2].sum(), values)
    assert torch.all(grad[2] == 0) and grad.abs().sum() > 0
    moved = values.detach().clone()
    moved[2] += 10.0
    assert torch.allclose(support_attention(e, e, moved, "cross", 0.1)[0][2], mixed[2].detach())
    # ... while "full" does, and with i's own key the most similar it puts the most weight on it
    _, w_full = support_attention(e, e, values, "full", 0.1)
    assert torch.all(w_full.argmax(1) == torch.arange(6))
    # a memory copy of the same video is excluded as well
    _, w_mem = support_attention(e, e, values, "cross", 0.1, e[:2].clone(), values[:2].detach(),
                                 torch.arange(6), torch.tensor([0, 1]))
    assert w_mem[0, 6] == 0 and w_mem[1, 7] == 0 and w_mem[0, 7] > 0
    with pytest.raises(ValueError, match="cross support set"):
        support_attention(e[:1], e[:1], values[:1], "cross", 0.1)
    with pytest.raises(ValueError, match="variant"):
        support_attention(e, e, values, "sideways", 0.1)


def _tiny(**kw) -> SupportSetModelConfig:
    base = SupportSetModelConfig(video_input="features", feature_dim=6, max_chunks=4, dim=16, temporal_width=16,
                                 temporal_layers=1, temporal_heads=2, dropout=0.0, text_encoder="tiny", max_tokens=12,
                                 decoder_d_model=16, decoder_layers=1, decoder_heads=2)
    return replace(base, **kw)


CAPTIONS = ["a red ball", "a blue cube", "two green cones", "one yellow star", "a red cube", "a blue star"]


def test_shapes_frames_and_features_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = SupportSetModel(_tiny())
    feats = torch.randn(6, 4, 6)
    out = model(feats, CAPTIONS, torch.arange(6))
    assert out["video_emb"].shape == (6, 16) and torch.allclose(out["video_emb"].norm(dim=1), torch.ones(6))
    assert set(out) == {"loss", "loss_contrastive", "loss_caption", "video_emb"}
    assert torch.isclose(out["loss"], out["loss_contrastive"] + out["loss_caption"])
    assert model.embed_text(CAPTIONS).shape == (6, 16)
    frames = SupportSetModel(_tiny(video_input="frames", backbone_width=2, clip_frames=4))
    assert frames.embed_video(torch.rand(2, 3, 8, 16, 16)).shape == (2, 16)
    with pytest.raises(ValueError, match="multiple of clip_frames"):
        frames.embed_video(torch.rand(2, 3, 6, 16, 16))
    memory = SupportSetModel(_tiny(support="memory", memory_size=4))
    memory.enqueue(torch.randn(6, 16), torch.arange(6))  # wraps around: the last 4 stay
    assert memory.memory_index.tolist() == [4, 5, 2, 3] and int(memory.memory_ptr) == 2
    copy = SupportSetModel(_tiny(support="memory", memory_size=4))
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.memory_keys, memory.memory_keys) and copy.memory_index.tolist() == [4, 5, 2, 3]
    assert SupportSetModel(_tiny(caption_weight=0.0)).decoder is None


def test_caption_decoder_is_causal_and_teacher_forced():
    torch.manual_seed(0)
    dec = CaptionDecoder(vocab_size=20, in_dim=8, d_model=16, layers=1, heads=2, pad_id=0, dropout=0.0).eval()
    mem = torch.randn(2, 8)
    ids = torch.randint(1, 20, (2, 5))
    other = ids.clone()
    other[:, 3:] = (other[:, 3:] + 1) % 19 + 1
    a, b = dec(mem, ids), dec(mem, other)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6) and not torch.allclose(a[:, 3:], b[:, 3:])
    labels = ids.clone()
    labels[0, 3:] = -100
    loss = dec.loss(mem, labels)
    logits = dec(mem, torch.cat([torch.zeros_like(ids[:, :1]), labels[:, :-1].clamp_min(0)], 1))
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.isclose(loss, want, atol=1e-6)


@pytest.mark.parametrize("variant,support", [("cross", "batch"), ("hybrid", "memory")])
def test_loss_decreases_on_a_fixed_batch(variant, support):
    torch.manual_seed(0)
    model = SupportSetModel(_tiny(variant=variant, support=support, memory_size=8))
    feats, index = torch.randn(6, 4, 6), torch.arange(6)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(feats, CAPTIONS, index)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.enqueue(out["video_emb"].detach(), index)
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------- data, engine, CLI

def _write_feature_benchmark(root, num_videos=12, per_class=3):
    """MSR-VTT-format files (9k-style train csv, JSFusion test csv, MSRVTT_data.json) and npy features
    whose rows carry the class of the caption."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "yellow"]
    ids = [f"video{i}" for i in range(num_videos)]
    cls = [i % len(words) for i in range(num_videos)]
    (root / "feats").mkdir()
    protos = rng.standard_normal((len(words), 6))
    for v, c in zip(ids, cls):
        np.save(root / "feats" / f"{v}.npy", (protos[c] + 0.3 * rng.standard_normal((5, 6))).astype(np.float32))
    train, test = ids[:8], ids[8:]
    sentences = [{"video_id": v, "caption": f"a {words[c]} thing number {k}", "sen_id": 3 * i + k}
                 for i, (v, c) in enumerate(zip(ids, cls)) for k in range(per_class)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [{"video_id": v, "split": "train" if v in train
                                                                   else "test"} for v in ids],
                                                       "sentences": sentences}))
    with open(root / "MSRVTT_train.9k.csv", "w", newline="") as f:
        csv.writer(f).writerows([["video_id"]] + [[v] for v in train])
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["key", "vid_key", "video_id", "sentence"]] +
                                [[f"ret{i}", f"msr{i}", v, f"a {words[cls[ids.index(v)]]} thing"] for i, v in enumerate(test)])
    return ids


def test_pair_dataset_from_features(tmp_path):
    from evaluation.benchmarks import load_benchmark, open_features

    _write_feature_benchmark(tmp_path)
    split = load_benchmark("msrvtt-train", tmp_path)
    data = PairDataset(split, open_features(tmp_path / "feats"), "video", max_chunks=8)
    assert len(data) == 8
    item = data[3]
    assert item["video"].shape == (8, 6) and item["index"] == 3 and item["caption"].endswith(("0", "1", "2"))
    assert len(PairDataset(split, open_features(tmp_path / "feats"), "caption", max_chunks=4)) == 24


def test_train_then_cli_evaluates_the_checkpoint(tmp_path, capsys):
    from cmgen.cli import main
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    _write_feature_benchmark(tmp_path)
    overrides = [f"data.root={tmp_path}", "data.features=feats", "data.videos=null", "model.video_input=features",
                 "model.text_encoder=tiny", "model.dim=16", "model.temporal_width=16", "model.temporal_layers=1",
                 "model.decoder_d_model=16", "model.decoder_layers=1", "model.max_chunks=4", "model.max_tokens=12",
                 "train.batch_size=4", "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=3",
                 f"run.output_dir={tmp_path / 'runs'}", "run.name=ss", "train.progress_bar=false", "train.trackers=[]"]
    from pathlib import Path
    config = Path(__file__).resolve().parents[1] / "configs" / "supportset" / "moving_digits.yaml"
    result = train(load_config(config, overrides))
    assert result.step == 3 and {"eval/t2v_R@1", "eval/v2t_MdR", "loss_caption"} <= set(result.metrics)
    out = tmp_path / "res" / "m.json"
    assert main(["eval", "retrieval", "--benchmark", "msrvtt-1ka", "--data-root", str(tmp_path), "--checkpoint",
                 str(result.run_dir), "--features", str(tmp_path / "feats"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"]["num_videos"] == 4
    assert report["metrics"]["t2v"]["R@1"] == pytest.approx(result.metrics["eval/t2v_R@1"], abs=1e-6)
    emb = tmp_path / "res" / "m_embeddings"
    assert np.load(emb / "text.npy").shape == (4, 16) and json.loads((emb / "video_ids.json").read_text())[0] == "video8"
    # the saved embeddings evaluate to the same table
    assert main(["eval", "retrieval", "--benchmark", "msrvtt-1ka", "--data-root", str(tmp_path), "--embeddings",
                 str(emb), "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == report["metrics"]
    assert "**MSR-VTT 1k-A**" in capsys.readouterr().out


# ------------------------------------------------------------------------- support set across processes
@pytest.mark.parametrize("variant", ["identity", "full", "hybrid", "cross"])
def test_support_attention_over_a_gathered_batch_equals_the_global_batch(variant):
    """Each of W = 2 "processes" attends with its own rows over the gathered batch (its rows at offset
    rank * B): together they give the global batch's result, memory included; a wrong offset does not."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, 4, generator=g) for _ in range(3))
    mk, mv, index, mem_index = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.arange(8), \
        torch.tensor([1, 6, 9])
    want, _ = support_attention(q, k, v, variant, 0.2, mk, mv, index, mem_index)
    halves = [support_attention(q[r * 4:(r + 1) * 4], k, v, variant, 0.2, mk, mv, index[r * 4:(r + 1) * 4], mem_index,
                                offset=r * 4) for r in range(2)]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), want)
    assert halves[1][1].shape == (4, 8 + 3) and torch.allclose(halves[1][1].sum(1), torch.ones(4))
    if variant in ("identity", "hybrid", "cross"):   # these depend on which column is i's own
        wrong, _ = support_attention(q[4:], k, v, variant, 0.2, mk, mv, index[4:], mem_index, offset=0)
        assert not torch.allclose(wrong, want[4:])
    with pytest.raises(ValueError, match="offset"):
        support_attention(q[4:], k, v, variant, 0.2, offset=5)


def _tiny_msrvtt_overrides(out_dir, name):
    return ["data.root=null", "data.tiny_benchmark=msrvtt", "data.eval_benchmark=null", "model.text_encoder=tiny",
            "model.text_trainable=false", "model.dropout=0", "model.max_chunks=4", "model.max_tokens=6",
            "model.dim=16", "model.temporal_width=16", "model.temporal_layers=1", "model.decoder_d_model=16",
            "model.decoder_layers=1", "model.support_gather=true", "train.batch_size=8", "train.num_workers=0",
            "train.max_steps=3", "train.checkpoint_every=0", "schedule.warmup_steps=1", "optim.name=sgd",
            "optim.lr=0.1",
            f"run.output_dir={out_dir}", f"run.name={name}"]


@pytest.mark.slow
@pytest.mark.distributed
def test_support_gather_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """model.support_gather=true: 2 gloo processes x 4 samples train exactly as 1 process x 8 (the cross
    support set of each sample is the other 7 of the global batch, gradient through the gather). Every
    caption is cut to max_tokens, so each process's caption loss averages as many tokens and the
    mean over processes is the global mean. (Checked by hand: support_gather=false fails this.)"""
    import os
    from pathlib import Path

    from cmgen.engine.probe import DUMP_ENV
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train
    from tests.multiproc import QUIET, assert_finite_losses, assert_ranks_agree, assert_states_close, launch, \
        read_dumps

    config = str(Path(__file__).resolve().parents[1] / "configs" / "supportset" / "msrvtt.yaml")
    overrides = _tiny_msrvtt_overrides(tmp_path, "one")[:-2]
    two = launch(config, overrides, out_dir=tmp_path, name="two", dump=True, timeout=300).check()
    saved = os.environ.get(DUMP_ENV)
    os.environ[DUMP_ENV] = str(tmp_path / "one-dump")
    try:
        train(load_config(config, [*QUIET, *_tiny_msrvtt_overrides(tmp_path, "one")]))
    finally:
        if saved is None:
            os.environ.pop(DUMP_ENV)
        else:
            os.environ[DUMP_ENV] = saved
    dumps, one = read_dumps(two.dump_dir), read_dumps(tmp_path / "one-dump")[0]
    assert sorted(dumps[0]) == [1, 2, 3]
    assert_finite_losses(dumps)
    assert_ranks_agree(dumps)
    for step in (1, 2, 3):
        assert one[step]["world_size"] == 1 and dumps[0][step]["world_size"] == 2
        assert_states_close(one[step]["models"], dumps[0][step]["models"], f"step {step}, 1 vs 2 processes",
                            rtol=1e-5, atol=1e-6)
        for term in ("loss_caption", "loss_contrastive"):
            mean = (dumps[0][step]["losses"][term] + dumps[1][step]["losses"][term]) / 2
            assert abs(mean - one[step]["losses"][term]) <= 1e-5 * abs(one[step]["losses"][term]), (step, term)


@pytest.mark.parametrize("config,benchmark,marker", [("msrvtt", "msrvtt-1ka", "MSRVTT_JSFUSION_test.csv"),
                                                     ("msvd", "msvd", "raw-captions.pkl"),
                                                     ("vatex", "vatex", "vatex_data.json"),
                                                     ("activitynet", "anet", "val_1.json")])
def test_paper_config_smoke_runs_read_a_tiny_folder_in_the_real_format(config, benchmark, marker):
    """The ``# smoke:`` lines of the paper configs keep their benchmark readers and feature input: the
    smoke run (tests/test_configs_smoke.py) trains on a tiny folder in that benchmark's own format."""
    from pathlib import Path

    from cmgen.engine.registry import load_config
    from tests.test_configs_smoke import smoke_overrides
    from video.supportset import SupportSetMethod

    path = Path(__file__).resolve().parents[1] / "configs" / "supportset" / f"{config}.yaml"
    cfg = load_config(path, smoke_overrides(path))
    assert cfg.model.video_input == "features" and cfg.data.eval_benchmark == benchmark
    method = SupportSetMethod(cfg)
    root = method._data_root()
    assert (root / marker).is_file() and (root / cfg.data.features).is_dir()
    data = method.build_dataset(cfg)
    assert data.split.benchmark == cfg.data.train_benchmark and len(data) >= cfg.train.batch_size
    item = data[0]
    assert item["video"].shape == (cfg.model.max_chunks, 16) and isinstance(item["caption"], str)
    test = method._eval_data()
    assert test.benchmark == benchmark and test.num_videos == 8


@pytest.mark.slow
def test_demo_stage_on_a_tiny_budget(tmp_path):
    """video.supportset.demo_stage at a budget too small for anything but the 10-step minimum: the probe
    and the five runs train and evaluate, the report gets its section and table, the summary its keys."""
    from video.supportset import DEMO_RUNS, demo_stage

    report, summary = ["# report"], {}
    demo_stage(tmp_path, report, summary, budget_s=1.0)
    s = summary["supportset"]
    assert set(s) == {"steps", "num_test_videos", "results", "chance", "best"} and s["steps"] == 10
    n = s["num_test_videos"]
    assert n == 32 and s["chance"] == {"t2v_R@1": 100 / n, "t2v_R@5": 500 / n, "t2v_MdR": (n + 1) / 2}
    assert list(s["results"]) == [name for name, _ in DEMO_RUNS] and s["best"] in s["results"]
    for metrics in s["results"].values():
        assert set(metrics) == {"t2v_R@1", "t2v_R@5", "t2v_MdR", "v2t_R@1", "v2t_R@5", "v2t_MdR"}
        assert all(0 <= metrics[f"{d}_R@{k}"] <= 100 for d in ("t2v", "v2t") for k in (1, 5))
        assert all(1 <= metrics[f"{d}_MdR"] <= n for d in ("t2v", "v2t"))
    text = "\n".join(report)
    assert report[0] == "# report" and "## Support-set retrieval (moving digits)" in text
    assert "| run | t2v R@1 | t2v R@5 | t2v MdR | v2t R@1 | v2t R@5 | v2t MdR |" in text
    rows = [line for line in report if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split(" | ")[0][2:] for r in rows] == [name for name, _ in DEMO_RUNS] + ["chance"]
    assert f"**{s['best']}**" in text and "10 steps per run" in text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        ["supportset-probe"] + [f"supportset-{name.split()[0]}" for name, _ in DEMO_RUNS])

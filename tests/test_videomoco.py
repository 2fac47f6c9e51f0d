"""VideoMoCo: frame-dropping generator, MoCo discriminator with temporal decay, engine method and resume."""
from __future__ import annotations

import contextlib
import copy
import math
import shutil
import types

import pytest
import torch

from cmgen.engine import list_checkpoints, load_config, train
from tests.test_engine import ROOT, assert_same, checkpoint_contents
from video.backbones import TinyVideoCNN, build_backbone
from video.videomoco import ClipAugment, FrameDropGenerator, VideoMoCo, VideoMoCoConfig, VideoMoCoMethod

CONFIG = str(ROOT / "configs" / "videomoco" / "moving_digits.yaml")
QUIET = ["train.progress_bar=false", "train.trackers=[]", "train.sample_every=0", "train.eval_every=0"]


def clips(b=2, t=8, s=16, seed=0):
    return torch.rand(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t, k", [(8, 2), (16, 4), (10, 2), (32, 8)])
def test_generator_drops_floor_quarter_of_frames_to_their_mean(t, k):
    torch.manual_seed(0)
    g = FrameDropGenerator(width=4, hidden=8)
    x = clips(3, t, 12)
    x_fake, dropped = g(x)
    assert x_fake.shape == x.shape and dropped.shape == (3, t) and dropped.dtype == torch.bool
    assert (dropped.sum(1) == k).all()
    logits = g.logits(x)
    for i in range(3):
        # the dropped frames are the k lowest-scoring ones
        kept_min = logits[i][~dropped[i]].min()
        assert (logits[i][dropped[i]] <= kept_min).all()
        for j in range(t):
            if dropped[i, j]:
                assert torch.allclose(x_fake[i, :, j], torch.full_like(x_fake[i, :, j], float(x[i, :, j].mean())),
                                      atol=0, rtol=1e-6)
            else:
                assert torch.equal(x_fake[i, :, j], x[i, :, j])
    torch.testing.assert_close(g.scores(x).sum(1), torch.ones(3))


def test_generator_straight_through_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    g = FrameDropGenerator(width=4, hidden=8)
    x_fake, _ = g(clips(2, 8, 12))
    (x_fake * torch.randn_like(x_fake)).sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="drops 0 of T=3"):
        FrameDropGenerator(4, 8)(clips(1, 3, 8))
    with pytest.raises(ValueError, match="drop_ratio"):
        FrameDropGenerator(4, 8, drop_ratio=1.0)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        FrameDropGenerator(4, 8)(torch.rand(2, 8, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------
# backbones and augmentation
# ---------------------------------------------------------------------------------------------------
def test_backbones_shapes_and_local_weights(tmp_path):
    assert TinyVideoCNN(dim=5, width=2)(clips(2, 4, 8)).shape == (2, 5)
    net = build_backbone("r3d_18", dim=7).eval()
    assert net(clips(1, 4, 16)).shape == (1, 7)
    path = tmp_path / "w.pt"
    torch.save(net.net.state_dict(), path)
    loaded = build_backbone("r3d_18", dim=7, weights_path=path)
    assert torch.equal(loaded.net.layer1[0].conv1[0].weight, net.net.layer1[0].conv1[0].weight)
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("resnet50")


def test_clip_augment_keeps_one_crop_for_all_frames():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 20, 20).repeat(1, 5, 1, 1)         # identical frames stay identical
    y = ClipAugment(12)(x)
    assert y.shape == (3, 5, 12, 12) and all(torch.equal(y[:, 0], y[:, j]) for j in range(5))


# ---------------------------------------------------------------------------------------------------
# discriminator loss against a float64 loop
# ---------------------------------------------------------------------------------------------------
def reference_loss(q, k, negatives, weights, T, mode):
    q, k, negatives, weights = (v.detach().double() for v in (q, k, negatives, weights))
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / T)
        neg = 0.0
        for j in range(negatives.shape[0]):
            if mode == "logit":   # official code: l_neg = q . (t^age n_j)
                neg += math.exp(float(q[i] @ (weights[j] * negatives[j])) / T)
            else:                 # paper Eq. 6: t^age exp(q . n_j / T)
                neg += float(weights[j]) * math.exp(float(q[i] @ negatives[j]) / T)
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("mode", ["logit", "exp"])
def test_d_loss_equals_hand_infonce_with_decayed_queue(mode):
    torch.manual_seed(0)
    d = VideoMoCo(TinyVideoCNN(dim=6, width=2), dim=6, K=10, m=0.9, T=0.2, temporal_decay=0.8,
                  negative_weight_mode=mode)
    for _ in range(4):                                        # ages 1..4 and never-written slots at 4
        d.queue.enqueue(torch.nn.functional.normalize(torch.randn(2, 6), dim=1))
    negatives, weights = d.queue.snapshot()
    assert sorted(d.queue.ages.tolist()) == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    torch.testing.assert_close(weights, 0.8 ** d.queue.ages.float())
    x_q, x_k = clips(3, 4, 8, 1), clips(3, 4, 8, 2)
    q, k = d(x_q), d.key(x_k)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3))
    loss = d.loss(q, k, negatives, weights)
    assert loss.item() == pytest.approx(reference_loss(q, k, negatives, weights, 0.2, mode), rel=1e-5)
    loss.backward()
    assert d.encoder_q.fc.weight.grad is not None and d.encoder_k.fc.weight.grad is None


# ---------------------------------------------------------------------------------------------------
# the method's step, with a minimal step context
# ---------------------------------------------------------------------------------------------------
class PlainCtx:
    """The part of :class:`cmgen.engine.StepContext` a train_step uses, for one process, no Accelerate."""

    def __init__(self, models, optimizers):
        self.models, self.optimizers = models, optimizers

    def unwrap(self, name):
        return self.models[name]

    def backward(self, loss, **kwargs):
        loss.backward(**kwargs)

    def step(self, name):
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def frozen(self, *names):
        params = [p for n in names for p in self.models[n].parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def tiny_method(*overrides):
    cfg = load_config(CONFIG, ["model.K=16", "model.dim=8", "model.backbone_width=2", "model.g_width=2",
                               "model.g_hidden=4", "model.m=0.9", *overrides])
    method = VideoMoCoMethod(cfg)
    torch.manual_seed(0)
    models = method.build_models(cfg)
    return method, models, PlainCtx(models, method.build_optimizers(cfg, models))


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("objective", ["official", "l1", "maximize_d"])
def test_step_updates_momentum_encoder_queue_and_generator(objective):
    method, models, ctx = tiny_method("model.adversarial_start_step=1", f"model.g_objective={objective}")
    d, g = models["d"], models["g"]
    assert isinstance(method.cfg, VideoMoCoConfig)
    assert method.g_weight == (1.0 if objective == "maximize_d" else 100.0)
    batch = lambda s: {"q": clips(4, 8, 16, s), "k": clips(4, 8, 16, s + 10)}
    q0, g0 = params(d.encoder_q), params(g)

    out = method.train_step(batch(0), 0, ctx)                 # MoCo-only warm-up step: G idle
    assert out["loss_g"].item() == 0.0 and all(torch.equal(a, b) for a, b in zip(g0, params(g)))
    # theta_k = m theta_k + (1 - m) theta_q with theta_k = theta_q at init: still the initial weights
    for a, b in zip(q0, params(d.encoder_k)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(q0, params(d.encoder_q)))
    assert int(d.queue.ptr) == 4 and int(d.queue.num_filled) == 4
    assert d.queue.ages.tolist() == [1] * 16    # never-written slots age from construction too

    k1, q1 = params(d.encoder_k), params(d.encoder_q)
    out = method.train_step(batch(1), 1, ctx)                 # adversarial step
    assert torch.isfinite(out["loss_d"]) and out["loss_g"].item() < 0
    for kk, qq, now in zip(k1, q1, params(d.encoder_k)):
        torch.testing.assert_close(now, 0.9 * kk + 0.1 * qq, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(params(d.encoder_k), params(d.encoder_q)))
    assert any(not torch.equal(a, b) for a, b in zip(g0, params(g)))
    assert int(d.queue.ptr) == 8 and d.queue.ages.tolist() == [2] * 4 + [1] * 4 + [2] * 8
    assert all(p.grad is None for p in d.parameters())        # G's step left no gradient in D


# ---------------------------------------------------------------------------------------------------
# the engine: exact resume, queue state in the checkpoint, outputs
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from cmgen.data import write_moving_digits
    root = tmp_path_factory.mktemp("md")
    write_moving_digits(root, num_videos=32, num_frames=16, size=32, digit_size=16, speed=1, clips_per_group=2,
                        progress=False)
    return root


def engine_cfg(tmp_path, data_root, name, *overrides):
    return load_config(CONFIG, [f"run.output_dir={tmp_path}", f"run.name={name}", f"data.root={data_root}", *QUIET,
                                "train.batch_size=4", "model.K=12", "model.adversarial_start_step=1",
                                "train.checkpoint_every=2", "train.keep_last=null", "train.log_every=1",
                                "data.eval_clips=8", *overrides])


@pytest.mark.slow
def test_resume_is_bitwise_and_restores_queue_ages(tmp_path, data_root):
    full = train(engine_cfg(tmp_path, data_root, "full", "train.max_steps=4"))
    assert [s for s, _ in list_checkpoints(tmp_path / "full" / "checkpoints")] == [2, 4]

    # 2 steps of 4 keys into a queue of 12: pointer 8, ages 1 (step 2), 2 (step 1), 2 (never written)
    state = torch.load(tmp_path / "full" / "checkpoints" / "step_000002" / "pytorch_model_1.bin", map_location="cpu",
                       weights_only=True)
    assert int(state["queue.ptr"]) == 8 and state["queue.ages"].tolist() == [2] * 4 + [1] * 4 + [2] * 4

    # the same run, cut after its step-2 checkpoint, then resumed
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000004")
    resumed = train(engine_cfg(tmp_path, data_root, "cut", "train.max_steps=4", "resume=latest"))
    assert resumed.step == 4
    assert_same(checkpoint_contents(full.checkpoint), checkpoint_contents(resumed.checkpoint))
    d = torch.load(full.checkpoint / "pytorch_model_1.bin", map_location="cpu", weights_only=True)
    assert int(d["queue.ptr"]) == 4 and d["queue.ages"].tolist() == [1] * 4 + [3] * 4 + [2] * 4


@pytest.mark.slow
def test_engine_run_writes_eval_and_dropped_frame_samples(tmp_path, data_root):
    result = train(engine_cfg(tmp_path, data_root, "out", "train.max_steps=2", "train.sample_every=2",
                              "train.eval_every=2", "model.g_objective=maximize_d",
                              "model.negative_weight_mode=exp"))
    assert 0.0 <= result.metrics["eval/knn_top1"] <= 100.0
    assert (result.run_dir / "samples" / "step_000002.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------
# official-code corrections: estimators, queue writes, the official training loop
# (tinapan-pt/VideoMoCo @ 42e069aef6f8952fa67b87ba5269851eedd834c3)
# ---------------------------------------------------------------------------------------------------
def test_soft_mask_gradient_equals_autograd_of_the_soft_formula():
    """d x_fake / d logits must be that of x + k softmax(-logits) (mean - x): a flipped sign of the soft
    mask (softmax(+logits)) or of (mean - x) fails here."""
    g = FrameDropGenerator(4, 8, straight_through="soft_mask")
    x = clips(3, 8, 6, seed=3)
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x_fake, dropped = g.drop(x, logits)
    (grad,) = torch.autograd.grad((x_fake * upstream).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    xd = x.double()
    mean = xd.mean(dim=(1, 3, 4), keepdim=True)
    soft = 2 * torch.softmax(-ref_logits, dim=1)[:, None, :, None, None]
    (ref,) = torch.autograd.grad(((xd + soft * (mean - xd)) * upstream.double()).sum(), ref_logits)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)
    assert dropped.sum(1).tolist() == [2, 2, 2]


class OfficialVideoTopk(torch.autograd.Function):
    """moco/builder.py::VideoTopk, transcribed (the number of dropped frames is an argument, 8 there)."""

    @staticmethod
    def forward(ctx, im_q, list_out, k):
        b = im_q.shape[0]
        _, indices = list_out.topk(k, dim=1, largest=False, sorted=False)
        im_q_fake = im_q.clone().detach()
        for i in range(b):
            for j in indices[i]:
                im_q_fake[i, :, j, :, :] = torch.mean(im_q_fake[i, :, j, :, :])
        return im_q_fake

    @staticmethod
    def backward(ctx, grad_output):
        return None, torch.sum(grad_output, dim=(1, 3, 4)), None


def test_official_straight_through_equals_videotopk():
    g = FrameDropGenerator(4, 8, straight_through="official")
    x = clips(2, 8, 6, seed=6)
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(7), requires_grad=True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    x_fake, _ = g.drop(x, logits)
    (grad,) = torch.autograd.grad((x_fake * upstream).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_fake = OfficialVideoTopk.apply(x, ref_logits.softmax(dim=1), 2)
    (ref,) = torch.autograd.grad((ref_fake * upstream).sum(), ref_logits)
    torch.testing.assert_close(x_fake, ref_fake, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="straight_through"):
        FrameDropGenerator(4, 8, straight_through="hard")


@pytest.mark.parametrize("objective", ["official", "l1"])
def test_new_queue_slots_hold_the_momentum_keys_of_the_batch(objective):
    """Enqueuing the queries (or keys from before the momentum update) instead fails here."""
    method, models, ctx = tiny_method("model.adversarial_start_step=0", f"model.g_objective={objective}")
    d = models["d"]
    batch = {"q": clips(4, 8, 16, 20), "k": clips(4, 8, 16, 30)}
    method.train_step(batch, 0, ctx)
    ptr = int(d.queue.ptr)
    written = d.queue.keys[ptr - 4:ptr].clone()
    keys = d.key(batch["k"])               # momentum encoder after this step's momentum update, train-mode BN
    torch.testing.assert_close(written, keys, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(written, d(batch["q"]).detach(), atol=1e-3)


def test_decay_ages_index_weights_keys_by_queue_position():
    d = VideoMoCo(TinyVideoCNN(dim=4, width=2), dim=4, K=6, temporal_decay=0.5, decay_ages="index")
    d.queue.enqueue(torch.nn.functional.normalize(torch.randn(4, 4), dim=1))   # slots 0..3, ptr 4
    _, w = d.negatives()
    # newest slot 3 -> i = 1, slot 0 -> i = 4, never-written slots 4, 5 -> i = 6, 5 (oldest positions)
    torch.testing.assert_close(w, 0.5 ** torch.tensor([4.0, 3.0, 2.0, 1.0, 6.0, 5.0]))
    d.decay_ages = "enqueue"
    torch.testing.assert_close(d.negatives()[1], torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="decay_ages"):
        VideoMoCo(TinyVideoCNN(dim=4, width=2), dim=4, K=6, decay_ages="per_key")


class OfficialMoCo(torch.nn.Module):
    """moco/builder.py::MoCo.forward for one process (no shuffle/gather), transcribed around our encoders."""

    def __init__(self, encoder_q, encoder_k, queue_keys, count, K, m, T):
        super().__init__()
        self.encoder_q, self.encoder_k = encoder_q, encoder_k
        self.register_buffer("queue", queue_keys.T.clone())                # (dim, K)
        self.count = count.clone()
        self.queue_ptr = 0
        self.K, self.m, self.T = K, m, T

    def forward(self, im_q_fake, im_q, im_k, t):
        q_real = torch.nn.functional.normalize(self.encoder_q(im_q), dim=1)
        q_fake = self.encoder_q(im_q_fake)
        q = torch.nn.functional.normalize(q_fake, dim=1)
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                param_k.data = param_k.data * self.m + param_q.data * (1. - self.m)
            k = torch.nn.functional.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum('nc,nc->n', [q, k]).unsqueeze(-1)
        weight = t ** (1.0 * self.count)
        weight = torch.mul(self.queue, weight)
        l_neg = torch.einsum('nc,ck->nk', [q, weight.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        with torch.no_grad():                                                # _dequeue_and_enqueue
            self.count += 1
            b = k.shape[0]
            self.queue[:, self.queue_ptr:self.queue_ptr + b] = k.T
            self.count[self.queue_ptr:self.queue_ptr + b] = 1
            self.queue_ptr = (self.queue_ptr + b) % self.K
        return q, q_real, logits, labels


def set_requires_grad(nets, requires_grad=False):                         # utils/train_utils.py
    for net in nets:
        for param in net.parameters():
            param.requires_grad = requires_grad


def official_train_step(netG, netD, optimizer_g, optimizer_d, video, t):
    """train.py::train, the body of the loop (GPU augmentation left out: the batch is given)."""
    scores = netG.scores(video[0])                                         # Generator_Mask(...) -> Softmax
    im_q_fake = OfficialVideoTopk.apply(video[0], scores, netG.num_dropped(video[0].shape[2]))
    q_fake, q_real, output, target = netD(im_q_fake, im_q=video[0], im_k=video[1], t=t)
    set_requires_grad([netD], False)
    optimizer_g.zero_grad()
    loss_g = -100 * torch.nn.L1Loss()(q_fake, q_real)
    loss_g.backward(retain_graph=True)
    set_requires_grad([netD], True)
    optimizer_d.zero_grad()
    loss_d = torch.nn.CrossEntropyLoss()(output, target)
    loss_d.backward()
    optimizer_g.step()
    optimizer_d.step()
    return loss_g, loss_d


def test_official_objective_equals_transcribed_official_loop():
    method, models, ctx = tiny_method("model.adversarial_start_step=0", "model.g_objective=official",
                                      "model.g_straight_through=official", "model.temporal_decay=0.9")
    g, d = models["g"], models["d"]
    ref_g = copy.deepcopy(g)
    ref_d = OfficialMoCo(copy.deepcopy(d.encoder_q), copy.deepcopy(d.encoder_k), d.queue.keys, d.queue.ages,
                         d.K, d.m, d.T)
    o = method.cfg.optim
    opt_g = torch.optim.SGD(ref_g.parameters(), o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    opt_d = torch.optim.SGD(ref_d.parameters(), o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    for step in range(3):
        batch = {"q": clips(4, 8, 16, 40 + step), "k": clips(4, 8, 16, 50 + step)}
        out = method.train_step(batch, step, ctx)
        loss_g, loss_d = official_train_step(ref_g, ref_d, opt_g, opt_d, [batch["q"], batch["k"]], 0.9)
        assert out["loss_g"].item() == pytest.approx(loss_g.item(), rel=1e-5)
        assert out["loss_d"].item() == pytest.approx(loss_d.item(), rel=1e-5)
    for (name, a), b in zip(g.state_dict().items(), ref_g.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(d.encoder_q.state_dict().items(), ref_d.encoder_q.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(d.encoder_k.parameters(), ref_d.encoder_k.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d.queue.keys, ref_d.queue.T, rtol=1e-4, atol=1e-6)
    assert d.queue.ages.tolist() == ref_d.count.tolist()


def test_official_objective_differs_from_g_loss_alone():
    """G's official gradient includes L_D's: the 'l1' objective (G loss alone) ends elsewhere."""
    ends = {}
    for objective in ("official", "l1"):
        method, models, ctx = tiny_method("model.adversarial_start_step=0", f"model.g_objective={objective}")
        method.train_step({"q": clips(4, 8, 16, 60), "k": clips(4, 8, 16, 61)}, 0, ctx)
        ends[objective] = params(models["g"])
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(ends["official"], ends["l1"]))


def test_eval_subset_is_stratified_and_reports_chance(data_root):
    """Split files are class-sorted: the first 8 of 16 test videos are 4 classes; the subset has all 8."""
    method, models, _ = tiny_method(f"data.root={data_root}", "data.eval_clips=8")
    cache = method._eval_clips(torch.device("cpu"))
    for split in ("train", "test"):
        assert sorted(cache[split + "_labels"].tolist()) == list(range(8))
    ctx = PlainCtx(models, {})
    ctx.device = torch.device("cpu")
    metrics = method.evaluate(ctx)
    assert metrics["knn_chance"] == 12.5 and 0.0 <= metrics["knn_top1"] <= 100.0


def test_c3d_widths_follow_the_transcribed_table():
    """models/c3d.py of xudejing/video-clip-order-prediction @ 7a1710d: conv widths and pools."""
    from video.backbones import C3D, C3D_LAYERS
    expected = [64, 128, 256, 256, 512, 512, 512, 512]
    net = C3D(dim=16)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == expected == [w for _, w, _ in C3D_LAYERS]
    assert all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) for c in convs)
    pools = [m.kernel_size for m in net.modules() if isinstance(m, torch.nn.MaxPool3d)]
    assert pools == [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert len([m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)]) == 8
    assert net.eval()(clips(1, 8, 16)).shape == (1, 16) and net.feature_dim == 512
    with pytest.raises(ValueError, match="T >= 8"):
        net(clips(1, 4, 16))


def test_official_augment_follows_kornia_050_semantics():
    """moco/loader.py::MoCoAugment with kornia v0.5.0 ColorJitter: additive brightness, contrast without
    a mean, one order per call; per-frame draws by default."""
    from video.augment import VideoMoCoAugment
    aug = VideoMoCoAugment(normalize=False)
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(4)
    p = {"grey": torch.tensor([True, False, False, False]), "flip": torch.tensor([False, True, False, False]),
         "brightness": torch.tensor([1.2, 1.0, 0.7, 1.0]), "contrast": torch.tensor([1.0, 1.3, 0.8, 1.0]),
         "saturation": ones, "hue": torch.zeros(4), "order": torch.tensor([1, 0, 2, 3])}
    y = aug.apply(x, p)
    grey = (0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2]).expand(3, 5, 5)
    torch.testing.assert_close(y[0], (grey + 0.2).clamp(0, 1), atol=2e-6, rtol=0)
    torch.testing.assert_close(y[1], (x[1] * 1.3).clamp(0, 1).flip(-1), atol=2e-6, rtol=0)
    torch.testing.assert_close(y[2], ((x[2] * 0.8).clamp(0, 1) - 0.3).clamp(0, 1), atol=2e-6, rtol=0)
    torch.testing.assert_close(y[3], x[3], atol=2e-6, rtol=0)            # identity factors
    # hue shift of half a turn on a pure red pixel gives cyan
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    half = {**{k: v[:1] for k, v in p.items() if k != "order"}, "grey": torch.tensor([False]),
            "flip": torch.tensor([False]), "brightness": torch.ones(1), "contrast": torch.ones(1),
            "hue": torch.tensor([0.5]), "order": torch.tensor([3, 0, 1, 2])}
    torch.testing.assert_close(aug.apply(red, half).flatten(), torch.tensor([0.0, 1.0, 1.0]), atol=1e-6, rtol=0)
    # per-frame: frames of a clip draw independently (~20% grey, ~50% flipped); per-clip: frames agree
    draws = VideoMoCoAugment().sample_params(200, 16, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert 0.17 < draws["grey"].float().mean() < 0.23 and 0.46 < draws["flip"].float().mean() < 0.54
    assert (draws["brightness"].min() >= 0.6) and (draws["brightness"].max() <= 1.4)
    assert draws["hue"].abs().max() <= 0.4 and sorted(draws["order"].tolist()) == [0, 1, 2, 3]
    per_clip = VideoMoCoAugment(per="clip").sample_params(3, 4, torch.device("cpu"))
    assert all((per_clip[k].view(3, 4) == per_clip[k].view(3, 4)[:, :1]).all() for k in ("grey", "flip", "hue"))
    same = torch.rand(2, 3, 1, 6, 6).repeat(1, 1, 4, 1, 1)
    out = VideoMoCoAugment()(same, generator=torch.Generator().manual_seed(2))
    assert not all(torch.allclose(out[:, :, 0], out[:, :, j]) for j in range(1, 4))
    with pytest.raises(ValueError, match="per"):
        VideoMoCoAugment(per="video")


# ---------------------------------------------------------------------------------------------------
# gradient accumulation and fp16 under the official objective
# ---------------------------------------------------------------------------------------------------
def reset_accelerate():
    """Clear Accelerate's process-wide singletons (as the engine does after a run), so the next
    Accelerator may choose another precision or accumulation."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state()
    GradientState._reset_state()


def engine_ctx(models, optimizers, cfg, accum=1, mixed_precision="no", cpu=True):
    """A real Accelerator and the engine's StepContext around ``models`` (no DDP: one process)."""
    from accelerate import Accelerator
    from cmgen.engine.method import StepContext
    reset_accelerate()
    from accelerate.utils import GradScalerKwargs
    # a small initial loss scale: no overflow-skipped update in a 2-step test (the default 2^16 may skip)
    acc = Accelerator(cpu=cpu, gradient_accumulation_steps=accum, mixed_precision=mixed_precision,
                      kwargs_handlers=[GradScalerKwargs(init_scale=2.0 ** 10)])
    g, d, opt_g, opt_d = acc.prepare(models["g"], models["d"], optimizers["g"], optimizers["d"])
    ctx = StepContext(acc, cfg, {"g": g, "d": d}, {"g": opt_g, "d": opt_d}, {})
    assert ctx.grad_accum == accum
    return acc, ctx


class ScalerAccelerator:
    """The part of an Accelerator that StepContext and ``_as_backward`` use, with a CPU GradScaler and no
    autocast (a CPU Accelerator has no fp16 scaler): the loss scaling of fp16, exactly (powers of 2)."""

    def __init__(self, accum, init_scale):
        from accelerate.utils import DistributedType
        self.distributed_type, self.gradient_accumulation_steps = DistributedType.NO, accum
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        self.sync_gradients, self.calls = True, 0

    def backward(self, loss, **kwargs):
        self.scaler.scale(loss / self.gradient_accumulation_steps).backward(**kwargs)

    def unwrap_model(self, model):
        return model

    @contextlib.contextmanager
    def accumulate(self, *models):
        self.calls += 1
        self.sync_gradients = self.calls % self.gradient_accumulation_steps == 0
        yield


def run_accumulated(accum, steps=3, batch=8, device="cpu", mixed_precision="no", *overrides, scale=None):
    """``steps`` steps (the first MoCo-only, then adversarial) on fixed batches of ``batch`` clips, each
    split into ``accum`` micro-batches; BN in eval mode (running statistics: batch statistics are per
    micro-batch in any accumulation). Returns the models, the per-step mean losses and the updates the
    fp16 grad scaler skipped."""
    method, models, _ = tiny_method("model.adversarial_start_step=1", "model.g_objective=official",
                                    "model.temporal_decay=0.9", f"train.grad_accum={accum}", *overrides)
    for m in models.values():
        m.to(device).eval()
    opts = method.build_optimizers(method.cfg, models)
    if scale is None:
        acc, ctx = engine_ctx(models, opts, method.cfg, accum, mixed_precision, cpu=device == "cpu")
    else:
        from cmgen.engine.method import StepContext
        acc = ScalerAccelerator(accum, scale)
        wrapped = {n: types.SimpleNamespace(optimizer=o, param_groups=o.param_groups) for n, o in opts.items()}
        ctx = StepContext(acc, method.cfg, models, wrapped, {})
    losses = []
    try:
        for step in range(steps):
            q, k = clips(batch, 8, 16, 70 + step).to(device), clips(batch, 8, 16, 80 + step).to(device)
            outs = []
            for i in range(accum):
                part = slice(i * batch // accum, (i + 1) * batch // accum)
                with acc.accumulate(*ctx.models.values()):
                    outs.append(method.train_step({"q": q[part], "k": k[part]}, step, ctx))
            losses.append({n: sum(float(o[n].detach()) for o in outs) / accum for n in ("loss_d", "loss_g")})
    finally:
        reset_accelerate()
    return models, losses, dict(ctx.amp_skipped)


def test_official_objective_grad_accum_equals_one_step_on_the_whole_batch():
    """train.grad_accum=2 on micro-batches of B = one step on the batch of 2B: same G, D, momentum
    encoder, queue keys and ages (momentum update and queue snapshot once per step, keys enqueued
    together after the last micro-batch; G's extra L1 gradient divided by the accumulation too)."""
    (whole, l1, _), (micro, l2, _) = run_accumulated(1), run_accumulated(2)
    for a, b in zip(l1, l2):
        assert a["loss_d"] == pytest.approx(b["loss_d"], rel=1e-5)
        assert a["loss_g"] == pytest.approx(b["loss_g"], rel=1e-5, abs=1e-7)
    assert l1[-1]["loss_g"] < 0                                   # G took part
    for name in ("g", "d"):
        for (key, a), b in zip(whole[name].state_dict().items(), micro[name].state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")
    assert int(micro["d"].queue.ptr) == 8 and micro["d"].queue.ages.tolist() == whole["d"].queue.ages.tolist()


def test_official_objective_under_a_loss_scaler_equals_unscaled():
    """fp16's loss scaling on CPU (GradScaler at 2^10, grad_accum=2): G's L1 gradient, taken with
    autograd.grad beside ctx.backward, must be scaled like loss_d's before the scaler unscales both, so
    the run ends where the unscaled one does (unscaled, G's L1 term would shrink 2^10 times)."""
    (plain, l1, _), (scaled, l2, skipped) = run_accumulated(2), run_accumulated(2, scale=2.0 ** 10)
    assert not skipped and l2[-1]["loss_g"] < 0
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-6)
    for name in ("g", "d"):
        for (key, a), b in zip(plain[name].state_dict().items(), scaled[name].state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")


def g_update_from_l1(device, mixed_precision):
    """G's parameter change over 2 steps (MoCo-only, then adversarial; grad_accum=2) that comes from
    the official objective's L1 term: the run minus the same run with ``model.g_loss_weight=0``."""
    start = torch.cat([p.flatten() for p in params(tiny_method()[1]["g"])])
    ends = []
    for weight in ("100", "0"):
        models, losses, skipped = run_accumulated(2, 2, 8, device, mixed_precision, f"model.g_loss_weight={weight}")
        assert all(math.isfinite(v) for step in losses for v in step.values()) and not skipped
        ends.append(torch.cat([p.flatten().cpu() for p in params(models["g"])]) - start)
    return ends[0] - ends[1]


@pytest.mark.cuda
def test_cuda_fp16_official_objective_with_accumulation_scales_g_loss():
    """fp16 autocast + grad scaler + grad_accum=2 under g_objective=official: G's L1 gradient, taken with
    autograd.grad beside ctx.backward, is scaled and unscaled like loss_d's, so G's L1-driven update
    matches fp32 in direction and size (unscaled it would be 2^10 times too small). The size is checked
    loosely: at init q_fake and q_real differ by ~0.2% of |q|, so low precision rounds part of the
    L1 signal away (bf16 on CPU keeps 0.41 of it, direction cosine 0.9995)."""
    l32, l16 = g_update_from_l1("cuda", "no"), g_update_from_l1("cuda", "fp16")
    assert l32.norm() > 0
    assert torch.nn.functional.cosine_similarity(l16, l32, dim=0) > 0.9
    assert 0.2 < float(l16.norm() / l32.norm()) < 5.0

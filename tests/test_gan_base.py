"""The shared GAN step (text2image/gan.py): ContraGAN's losses pinned across the hook refactor, the
fake-condition / G-sees-reals / joint D+G hooks, and G's BatchNorm statistics frozen during D steps."""
import copy

import pytest
import torch
from torch import nn

from text2image.gan import GANMethod, GANStep, bn_statistics_frozen


class Ctx:
    """The StepContext surface GANMethod.train_step uses, without Accelerate."""

    def __init__(self, models, opts):
        self.models, self.optimizers, self.ema = models, opts, {}
        self.device, self.grad_accum, self.world_size, self.rank = torch.device("cpu"), 1, 1, 0
        self.calls = []

    def unwrap(self, name):
        return self.models[name]

    def backward(self, loss, **kwargs):
        loss.backward(**kwargs)

    def step(self, name):
        self.calls.append(name)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def frozen(self, *names):
        from cmgen.engine.method import StepContext
        return StepContext.frozen(self, *names)


# ContraGAN's logged losses over three train steps (tiny 32 px config below, n_dis=2, torch.manual_seed(0),
# PyTorch default init), recorded with the GAN base as of commit 1dab275, before the hook refactor.
PINNED = [
    {"d_2c": 1.654999, "d_adv": 5.285736, "d_loss": 6.940735, "g_2c": 1.582701, "g_adv": -3.592938, "g_loss": -2.010237},
    {"d_2c": 0.837715, "d_adv": 3.21203, "d_loss": 4.049745, "g_2c": 1.561697, "g_adv": 2.006939, "g_loss": 3.568637},
    {"d_2c": 0.799147, "d_adv": 2.072732, "d_loss": 2.871879, "g_2c": 1.550754, "g_adv": 3.571404, "g_loss": 5.122159},
]


def contragan_method(tmp_path, **model):
    from text2image.contragan import ContraGANConfig, ContraGANMethod
    cfg = ContraGANConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    cfg.gan.n_dis = 2
    cfg.gan.samples_per_class = 2
    for k, v in dict(z_dim=20, shared_dim=4, g_channels=2, d_channels=4, embed_dim=8, **model).items():
        setattr(cfg.model, k, v)
    return ContraGANMethod(cfg)


def test_contragan_losses_pinned_across_refactor(tmp_path):
    torch.manual_seed(0)
    m = contragan_method(tmp_path, init="pytorch")
    models = m.build_models(m.cfg)
    ctx = Ctx(models, m.build_optimizers(m.cfg, models))
    gen = torch.Generator().manual_seed(1)
    for step, pinned in enumerate(PINNED):
        x = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
        y = torch.randint(5, (8,), generator=gen)
        logs = m.train_step((x, y), step, ctx)
        got = {k: float(logs[k]) for k in pinned}
        for k, v in pinned.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-4), (step, k, got)
    assert ctx.calls == ["d", "d", "g"] * 3


# --- a toy variant that uses every hook --------------------------------------------------------------
class _G(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3 * 4 * 4)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, z, cond):
        return torch.tanh(self.bn(self.lin(z + cond).view(-1, 3, 4, 4)))


class _D(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 4 * 4, 1)
        self.emb = nn.Linear(4, 3 * 4 * 4, bias=False)

    def forward(self, x, cond):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.lin(x.flatten(1)).squeeze(1) + (self.emb(cond) * x.flatten(1)).sum(1))


class _Toy(GANMethod):
    """Fakes take the real batch's conditions; G's loss also sees D(real) (an XMC-GAN-like variant)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen = []

    def build_models(self, cfg):
        return {"g": _G(), "d": _D()}

    def build_dataset(self, cfg):
        raise AssertionError("unused")

    def sample_latents(self, n, device, generator=None, cond_real=None):
        z = torch.randn(n, 4, generator=generator)
        return z, (cond_real if cond_real is not None else torch.zeros(n, 4))

    def split_output(self, out, n):
        from types import SimpleNamespace
        return SimpleNamespace(logits=out.logits[:n]), SimpleNamespace(logits=out.logits[n:])

    def g_forward(self, d, s):
        out = self.discriminate(d, torch.cat([s.real, s.fake]), torch.cat([s.cond_real, s.cond_fake]))
        return self.split_output(out, s.real.shape[0])

    def d_loss(self, s):
        self.seen.append((s.phase, s.cond_fake is s.cond_real))
        return super().d_loss(s)

    def g_loss(self, s):
        self.seen.append((s.phase, s.out_real is not None))
        # a "G-only" term on the reals' D output (must never update D)
        return {**super().g_loss(s), "g_real": (s.out_real.logits - s.out_fake.logits).pow(2).mean()}


def _toy(n_dis=2, g_step="separate"):
    from text2image.gan import GANConfig
    cfg = GANConfig()
    cfg.gan.n_dis, cfg.gan.g_step, cfg.gan.d_batches = n_dis, g_step, "split"
    m = _Toy(cfg)
    models = m.build_models(cfg)
    return m, models, Ctx(models, m.build_optimizers(cfg, models))


def test_fakes_take_real_conditions_and_g_loss_sees_reals():
    torch.manual_seed(0)
    m, models, ctx = _toy()
    batch = (torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 4))
    m.train_step(batch, 0, ctx)
    assert ctx.calls == ["d", "d", "g"]
    assert m.seen == [("d", True), ("d", True), ("g", True)]


def test_joint_step_one_forward_and_g_terms_never_update_d():
    """g_step='joint': n_dis - 1 D-only updates, then one update whose D and G losses share a forward."""
    torch.manual_seed(0)
    m, models, ctx = _toy(g_step="joint")
    batch = (torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 4))
    forwards = []
    models["d"].register_forward_hook(lambda mod, inp, out: forwards.append(inp[0].shape[0]))
    grads = {}

    def step(name):
        grads[name] = {k: None if p.grad is None else p.grad.clone() for k, p in models[name].named_parameters()}
        ctx.calls.append(name)
        ctx.optimizers[name].step()
        ctx.optimizers[name].zero_grad(set_to_none=True)

    ctx.step = step
    d_before = copy.deepcopy(models["d"])
    g_before = copy.deepcopy(models["g"])
    torch.manual_seed(5)
    m.train_step(batch, 0, ctx)
    assert ctx.calls == ["d", "d", "g"]
    assert m.seen == [("d", True), ("joint", True), ("joint", True)]
    assert forwards == [8, 8]          # one D forward per update, none extra for G

    # independent recomputation of the joint update's gradients: D's from d_loss alone, G's from g_loss alone
    torch.manual_seed(5)
    d_ref, g_ref = d_before, g_before
    opt_d = torch.optim.Adam(d_ref.parameters(), lr=m.cfg.optim.lr, betas=tuple(m.cfg.optim.betas),
                             eps=m.cfg.optim.eps)
    x, c = batch
    z = torch.randn(4, 4)
    with torch.no_grad():
        fake = g_ref(z, c[:4])
    out = d_ref(torch.cat([x[:4], fake]), torch.cat([c[:4], c[:4]]))
    (torch.relu(1 - out.logits[:4]).mean() + torch.relu(1 + out.logits[4:]).mean()).backward()
    opt_d.step()
    opt_d.zero_grad()
    z = torch.randn(4, 4)
    fake = g_ref(z, c[4:])
    out = d_ref(torch.cat([x[4:], fake]), torch.cat([c[4:], c[4:]]))
    d_l = torch.relu(1 - out.logits[:4]).mean() + torch.relu(1 + out.logits[4:]).mean()
    g_l = -out.logits[4:].mean() + (out.logits[:4] - out.logits[4:]).pow(2).mean()
    gd = torch.autograd.grad(d_l, list(d_ref.parameters()), retain_graph=True)
    gg = torch.autograd.grad(g_l, list(g_ref.parameters()))
    for (k, _), ref in zip(d_ref.named_parameters(), gd):
        torch.testing.assert_close(grads["d"][k], ref)
    for (k, _), ref in zip(g_ref.named_parameters(), gg):
        torch.testing.assert_close(grads["g"][k], ref)


def test_g_batchnorm_statistics_frozen_during_d_steps():
    torch.manual_seed(0)
    m, models, ctx = _toy(n_dis=3)
    bn = models["g"].bn
    seen = []
    orig = m.generate

    def generate(g, z, cond):
        seen.append((torch.is_grad_enabled(), bn.num_batches_tracked.item(), bn.running_mean.clone()))
        return orig(g, z, cond)

    m.generate = generate
    m.train_step((torch.rand(6, 3, 4, 4) * 2 - 1, torch.randn(6, 4)), 0, ctx)
    # three D steps: no graph, BN statistics untouched; the G step updates them once
    assert [s[0] for s in seen] == [False, False, False, True]
    assert bn.num_batches_tracked.item() == 1
    assert all(torch.equal(s[2], torch.zeros(3)) for s in seen)
    x = torch.randn(5, 3, 2, 2)
    b2 = nn.BatchNorm2d(3)
    with bn_statistics_frozen(b2):
        y = b2(x)
    assert b2.num_batches_tracked.item() == 0 and torch.equal(b2.running_mean, torch.zeros(3))
    torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True, eps=b2.eps))
    assert b2.track_running_stats


def test_gan_step_fields():
    s = GANStep(step=3, phase="d", real=torch.zeros(1), cond_real=None)
    assert s.fake is None and s.out_real is None and s.extras == {}

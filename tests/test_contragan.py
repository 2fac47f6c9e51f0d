"""ContraGAN: BigGAN blocks, G/D outputs, the D/G objectives against hand-computed ones, one step of each,
EMA sample grid, save/load, and a 2-step engine run on the embedded shapes data."""
import copy

import pytest
import torch

from cmgen.losses import TwoC
from text2image.contragan import ContraGANConfig, ContraGANMethod, Discriminator, DOutput, Generator
from text2image.gan import GANStep, hinge_d_loss, hinge_g_loss
from text2image.layers import ConditionalBatchNorm2d, is_spectral_normed

Z, C, E, S = 20, 5, 8, 32  # the shapes data has 5 classes


def tiny_g(**kw):
    return Generator(z_dim=Z, shared_dim=4, num_classes=C, channels=2, image_size=S, attention_at=16, **kw)


def tiny_d():
    return Discriminator(num_classes=C, channels=4, embed_dim=E, image_size=S, attention_at=16)


def test_generator_shape_and_range():
    torch.manual_seed(0)
    g = tiny_g()
    x = g(torch.randn(5, Z), torch.tensor([0, 1, 2, 0, 1]))
    assert x.shape == (5, 3, S, S)
    assert x.abs().max() <= 1.0 and x.std() > 0
    with pytest.raises(ValueError, match="divisible"):
        Generator(z_dim=21, num_classes=C, channels=2)


def test_discriminator_outputs_and_spectral_norm():
    torch.manual_seed(0)
    d = tiny_d()
    y = torch.tensor([0, 2, 1, 2])
    out = d(torch.randn(4, 3, S, S), y)
    assert isinstance(out, DOutput)
    assert out.logits.shape == (4,) and out.embeddings.shape == (4, E) and out.proxies.shape == (4, E)
    # proxies are the rows of the class-embedding table
    assert torch.equal(out.proxies[1], out.proxies[3]) and not torch.equal(out.proxies[0], out.proxies[1])
    weighted = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))]
    assert len(weighted) > 10 and all(is_spectral_normed(m) for m in weighted)
    # sum pooling of ReLU features
    assert (out.features >= 0).all()


def test_conditional_bn_uses_label():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(4, 3)
    torch.nn.init.normal_(cbn.gain.parametrizations.weight.original)
    x = torch.randn(2, 4, 5, 5)
    c0, c1 = torch.randn(1, 3).expand(2, 3), torch.randn(1, 3).expand(2, 3)
    assert not torch.allclose(cbn(x, c0), cbn(x, c1))
    g = tiny_g().eval()
    z = torch.randn(1, Z).expand(2, Z)
    a = g(z, torch.tensor([0, 1]))
    assert not torch.allclose(a[0], a[1], atol=1e-6)


def _method(tmp_path, **model):
    cfg = ContraGANConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    cfg.gan.n_dis = 2
    cfg.gan.samples_per_class = 2
    for k, v in dict(z_dim=Z, shared_dim=4, g_channels=2, d_channels=4, embed_dim=E, **model).items():
        setattr(cfg.model, k, v)
    return ContraGANMethod(cfg)


def test_losses_equal_hinge_plus_lambda_two_c(tmp_path):
    torch.manual_seed(0)
    method = _method(tmp_path, cond_lambda=0.7, temperature=0.5, pos_collected_numerator=False)
    models = method.build_models(method.cfg)
    d = models["d"]
    y_r, y_f = torch.tensor([0, 1, 1, 2]), torch.tensor([2, 2, 0, 1])
    out_r, out_f = d(torch.randn(4, 3, S, S), y_r), d(torch.randn(4, 3, S, S), y_f)
    terms = method.d_loss(GANStep(0, "d", None, y_r, cond_fake=y_f, out_real=out_r, out_fake=out_f))
    two_c = TwoC(temperature=0.5, pos_collected_numerator=False)
    hinge = torch.relu(1 - out_r.logits).mean() + torch.relu(1 + out_f.logits).mean()
    torch.testing.assert_close(terms["d_adv"], hinge)
    torch.testing.assert_close(terms["d_2c"], 0.7 * two_c(out_r.embeddings, out_r.proxies, y_r))
    g_terms = method.g_loss(GANStep(0, "g", None, y_r, cond_fake=y_f, out_fake=out_f))
    torch.testing.assert_close(g_terms["g_adv"], -out_f.logits.mean())
    torch.testing.assert_close(g_terms["g_2c"], 0.7 * two_c(out_f.embeddings, out_f.proxies, y_f))
    # analytic hinge values
    assert float(hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0]))) == pytest.approx(0.25 + 0.5)
    assert float(hinge_g_loss(torch.tensor([1.0, 3.0]))) == pytest.approx(-2.0)


class _Ctx:
    """The StepContext surface GANMethod.train_step uses, without Accelerate."""

    def __init__(self, models, opts):
        self.models, self.optimizers, self.ema = models, opts, {}
        self.device, self.grad_accum, self.world_size = torch.device("cpu"), 1, 1
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


def test_d_steps_then_g_step_touch_the_right_model(tmp_path):
    torch.manual_seed(0)
    method = _method(tmp_path)
    models = method.build_models(method.cfg)
    opts = method.build_optimizers(method.cfg, models)
    ctx = _Ctx(models, opts)
    batch = (torch.rand(8, 3, S, S) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    g0, d0 = copy.deepcopy(models["g"].state_dict()), copy.deepcopy(models["d"].state_dict())

    # swap in a G step that records D's parameters right before G's update
    real_step = ctx.step
    d_before_g = {}

    def step(name):
        if name == "g":
            d_before_g.update({k: v.clone() for k, v in models["d"].named_parameters()})
            assert all(p.grad is None for p in models["d"].parameters()), "G step left gradients in D"
            assert all(p.grad is not None for p in models["g"].parameters() if p.requires_grad)
        real_step(name)

    ctx.step = step
    logs = method.train_step(batch, 0, ctx)
    assert ctx.calls == ["d", "d", "g"]
    assert set(logs) >= {"d_loss", "g_loss", "d_adv", "d_2c", "g_adv", "g_2c"}
    assert all(torch.isfinite(v) for v in logs.values())
    # D changed during the D steps, and not by the G step
    assert any(not torch.equal(d0[k], v) for k, v in d_before_g.items())
    for k, v in models["d"].named_parameters():
        assert torch.equal(v, d_before_g[k]), k
    assert all(p.requires_grad for p in models["d"].parameters())
    # G changed only in its own step (D steps sample fakes without a graph into G)
    assert any(not torch.equal(g0[k], v) for k, v in models["g"].state_dict().items() if "bn" not in k)


def test_one_d_step_lowers_d_loss_on_fixed_batch(tmp_path):
    torch.manual_seed(0)
    method = _method(tmp_path)
    d = method.build_models(method.cfg)["d"]
    opt = torch.optim.Adam(d.parameters(), lr=1e-4)
    x, y = torch.randn(8, 3, S, S), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    d.eval()  # freeze the SN power iteration so the loss is a fixed function of the weights

    def loss():
        out = d(x, y)
        out_r, out_f = method.split_output(out, 4)
        return sum(method.d_loss(GANStep(0, "d", x[:4], y[:4], cond_fake=y[4:], out_real=out_r, out_fake=out_f)).values())

    before = loss()
    before.backward()
    opt.step()
    assert float(loss().detach()) < float(before.detach())


def test_sample_grid_and_save_load(tmp_path):
    torch.manual_seed(0)
    method = _method(tmp_path)
    models = method.build_models(method.cfg)
    g = models["g"]
    g(torch.randn(6, Z), torch.tensor([0, 1, 2, 0, 1, 2]))  # move BN running stats off their init
    ctx = _Ctx(models, {})
    ctx.ema = {"g": copy.deepcopy(g).eval()}
    imgs = method.sample(ctx)
    assert imgs.shape == (C * 2, 3, S, S) and imgs.min() >= 0 and imgs.max() <= 1
    torch.testing.assert_close(method.sample(ctx), imgs)  # fixed noise and labels
    g2 = tiny_g()
    g2.load_state_dict(g.state_dict())
    z, y = method.sample_inputs(torch.device("cpu"))
    torch.testing.assert_close(g2.eval()(z, y), g.eval()(z, y))


def test_grad_accum_rejected():
    cfg = ContraGANConfig()
    cfg.train.grad_accum = 2
    with pytest.raises(ValueError, match="grad_accum"):
        ContraGANMethod(cfg)


@pytest.mark.slow
def test_engine_two_steps(tmp_path):
    from pathlib import Path
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    config = Path(__file__).resolve().parents[1] / "configs" / "contragan" / "shapes.yaml"
    cfg = load_config(config, [f"run.output_dir={tmp_path}", "run.name=t", "train.max_steps=2", "train.sample_every=2",
                               "train.checkpoint_every=2", "train.log_every=1", "train.progress_bar=false",
                               "data.num_images=128", "gan.n_dis=1", "train.batch_size=16"])
    result = train(cfg)
    assert result.step == 2
    assert (result.run_dir / "samples" / "step_000002.png").stat().st_size > 0
    assert all(k in result.metrics for k in ("d_2c", "g_2c", "d_adv", "g_adv"))

"""ContraGAN: BigGAN blocks, G/D outputs, the D/G objectives against hand-computed ones, one step of each,
EMA sample grid, save/load, and a 2-step engine run on the embedded shapes data."""
import copy
from pathlib import Path

import pytest
import torch

from cmgen.losses import TwoC
from tests.test_gan_base import Ctx
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


_Ctx = Ctx


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


# --- independent transcriptions of the official code -----------------------------------------------
# StudioGAN src/models/big_resnet.py at 947b35e9835b67860fdce44d337f6d7fee7c8db3, with c = g_conv_dim / d_conv_dim.
def _big_resnet_tables(c):
    g_in = {"32": [c * 4, c * 4, c * 4], "64": [c * 16, c * 8, c * 4, c * 2],
            "128": [c * 16, c * 16, c * 8, c * 4, c * 2]}
    g_out = {"32": [c * 4, c * 4, c * 4], "64": [c * 8, c * 4, c * 2, c],
             "128": [c * 16, c * 8, c * 4, c * 2, c]}
    d_in = {"32": [3] + [c * 2, c * 2, c * 2], "64": [3] + [c, c * 2, c * 4, c * 8],
            "128": [3] + [c, c * 2, c * 4, c * 8, c * 16]}
    d_out = {"32": [c * 2, c * 2, c * 2, c * 2], "64": [c, c * 2, c * 4, c * 8, c * 16],
             "128": [c, c * 2, c * 4, c * 8, c * 16, c * 16]}
    d_down = {"32": [True, True, False, False], "64": [True, True, True, True, False],
              "128": [True, True, True, True, True, False]}
    return g_in, g_out, d_in, d_out, d_down


@pytest.mark.parametrize("size", [32, 64, 128])
def test_layouts_match_big_resnet_tables(size):
    c = 2
    g_in, g_out, d_in, d_out, d_down = _big_resnet_tables(c)
    nb = len(g_in[str(size)])
    g = Generator(z_dim=4 * (nb + 1), shared_dim=4, num_classes=C, channels=c, image_size=size,
                  attention_at=None).eval()
    shapes = []
    for blk in g.blocks:
        blk.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape[1], o.shape[1], o.shape[2])))
    g(torch.randn(2, g.z_dim), torch.tensor([0, 1]))
    assert shapes == [(ci, co, 4 * 2 ** (k + 1)) for k, (ci, co) in enumerate(zip(g_in[str(size)], g_out[str(size)]))]
    d = Discriminator(num_classes=C, channels=c, embed_dim=4, image_size=size, attention_at=None).eval()
    shapes, res, want = [], size, []
    for blk in d.blocks:
        blk.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape[1], o.shape[1], o.shape[2])))
    for ci, co, down in zip(d_in[str(size)], d_out[str(size)], d_down[str(size)]):
        res = res // 2 if down else res
        want.append((ci, co, res))
    d(torch.randn(2, 3, size, size), torch.tensor([0, 1]))
    assert shapes == want


def test_orthogonal_init():
    g = Generator(z_dim=20, shared_dim=4, num_classes=C, channels=4, image_size=32, attention_at=16)
    d = Discriminator(num_classes=C, channels=4, embed_dim=8, image_size=32, attention_at=16)
    from text2image.layers import _raw_weight
    n = 0
    for m in list(g.modules()) + list(d.modules()):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)):
            w = _raw_weight(m).detach().flatten(1)
            rows, cols = w.shape
            gram = w @ w.T if rows <= cols else w.T @ w          # semi-orthogonal: the smaller Gram is I
            torch.testing.assert_close(gram, torch.eye(min(rows, cols)), atol=1e-4, rtol=0)
            if not isinstance(m, torch.nn.Embedding) and m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
            n += 1
    assert n > 20
    with pytest.raises(ValueError, match="init"):
        Generator(z_dim=20, num_classes=C, channels=4, init="kaiming")


def _two_c_studiogan(embed, proxy, label, t):
    """ConditionalContrastiveLoss.forward (src/utils/losses.py) as loops over samples, float64."""
    e, p = embed.double(), proxy.double()
    n, total = e.shape[0], 0.0
    for i in range(n):
        cos = lambda a, b: (a @ b) / (a.norm() * b.norm())
        e2p = torch.exp(cos(e[i], p[i]) / t)
        sims = [torch.exp(cos(e[i], e[j]) / t) for j in range(n) if j != i]
        pos = [torch.exp(cos(e[i], e[j]) / t) for j in range(n) if j != i and label[j] == label[i]]
        num = e2p + (sum(pos) if pos else 0.0)
        den = e2p + sum(sims)
        total = total - torch.log(num / den)
    return total / n


def test_d_and_g_losses_equal_transcribed_studiogan_2c(tmp_path):
    """Default pos_collected_numerator=True, where labels matter: D's 2C must use the real labels."""
    torch.manual_seed(0)
    method = _method(tmp_path, cond_lambda=0.7, temperature=0.5)
    d = method.build_models(method.cfg)["d"].eval()
    y_r, y_f = torch.tensor([0, 1, 1, 2, 0, 2]), torch.tensor([2, 2, 0, 1, 1, 0])
    out_r, out_f = d(torch.randn(6, 3, S, S), y_r), d(torch.randn(6, 3, S, S), y_f)
    s = GANStep(0, "d", None, y_r, cond_fake=y_f, out_real=out_r, out_fake=out_f)
    terms = method.d_loss(s)
    ref = 0.7 * _two_c_studiogan(out_r.embeddings, out_r.proxies, y_r, 0.5)
    torch.testing.assert_close(terms["d_2c"].double(), ref, rtol=1e-5, atol=1e-6)
    wrong = 0.7 * _two_c_studiogan(out_r.embeddings, out_r.proxies, y_f, 0.5)
    assert abs(float(wrong.detach()) - float(ref.detach())) > 1e-3         # the labels change the value here
    hinge = torch.relu(1 - out_r.logits).mean() + torch.relu(1 + out_f.logits).mean()
    torch.testing.assert_close(terms["d_adv"], hinge)
    g_terms = method.g_loss(GANStep(0, "g", None, y_r, cond_fake=y_f, out_fake=out_f))
    torch.testing.assert_close(g_terms["g_adv"], -out_f.logits.mean())
    torch.testing.assert_close(g_terms["g_2c"].double(),
                               0.7 * _two_c_studiogan(out_f.embeddings, out_f.proxies, y_f, 0.5), rtol=1e-5, atol=1e-6)
    assert float(hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0]))) == pytest.approx(0.25 + 0.5)
    assert float(hinge_g_loss(torch.tensor([1.0, 3.0]))) == pytest.approx(-2.0)


def test_adc_maps_labels_and_adds_the_fake_class_terms(tmp_path):
    """aux_cls_type=ADC (StudioGAN worker.py / big_resnet.py, ContraGAN-ADC.yaml): 2K proxies; in D's update
    reals look up row 2y and fakes row 2y+1, and D adds lambda*2C(e_fake, p_{2y+1}); G's 2C uses rows 2y
    and subtracts lambda*2C(e_fake, p_{2y+1}). Values against the loop transcription of the 2C loss."""
    torch.manual_seed(0)
    method = _method(tmp_path, cond_lambda=0.7, temperature=0.5, aux_cls_type="ADC")
    d = method.build_models(method.cfg)["d"].eval()
    assert d.embedding.weight.shape[0] == 2 * C
    x_r, x_f = torch.randn(6, 3, S, S), torch.randn(6, 3, S, S)
    y_r, y_f = torch.tensor([0, 1, 1, 2, 0, 4]), torch.tensor([2, 2, 0, 1, 4, 0])
    s = GANStep(0, "d", x_r, y_r, cond_fake=y_f, fake=x_f)
    s.out_real, s.out_fake = method.d_forward(d, s)
    with torch.no_grad():
        torch.testing.assert_close(s.out_real.proxies, d.embedding(2 * y_r))
        torch.testing.assert_close(s.out_fake.proxies, d.embedding(2 * y_f + 1))
    terms = method.d_loss(s)
    assert set(terms) == {"d_adv", "d_2c", "d_adc"}
    ref = lambda e, p, y: 0.7 * _two_c_studiogan(e, p, y, 0.5)  # noqa: E731
    torch.testing.assert_close(terms["d_2c"].double(), ref(s.out_real.embeddings, d.embedding(2 * y_r), y_r))
    torch.testing.assert_close(terms["d_adc"].double(), ref(s.out_fake.embeddings, d.embedding(2 * y_f + 1), y_f))
    g = GANStep(0, "g", x_r, y_r, cond_fake=y_f, fake=x_f)
    _, g.out_fake = method.g_forward(d, g)
    g_terms = method.g_loss(g)
    assert set(g_terms) == {"g_adv", "g_2c", "g_adc"}
    e = g.out_fake.embeddings
    torch.testing.assert_close(g_terms["g_2c"].double(), ref(e, d.embedding(2 * y_f), y_f))
    torch.testing.assert_close(g_terms["g_adc"].double(), -ref(e, d.embedding(2 * y_f + 1), y_f))
    # classify reads the real-class rows only: nearest of embedding(2c) over c
    x = torch.randn(8, 3, S, S)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(d(x, torch.zeros(8, dtype=torch.long)).embeddings, dim=1)
        table = torch.nn.functional.normalize(d.embedding(2 * torch.arange(C)), dim=1)
    assert d.classify(x).tolist() == (emb @ table.T).argmax(1).tolist()
    with pytest.raises(ValueError, match="aux_cls_type"):
        _method(tmp_path, aux_cls_type="ADC", d_cond_mtd="PD")
    with pytest.raises(ValueError, match="aux_cls_type"):
        _method(tmp_path, aux_cls_type="TAC")


def test_adc_train_step_logs_its_terms(tmp_path):
    torch.manual_seed(0)
    method = _method(tmp_path, aux_cls_type="ADC")
    models = method.build_models(method.cfg)
    ctx = _Ctx(models, method.build_optimizers(method.cfg, models))
    batch = (torch.rand(8, 3, S, S) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 2, 0, 1]))
    logs = method.train_step(batch, 0, ctx)
    assert set(logs) >= {"d_adc", "g_adc", "d_2c", "g_2c"} and all(torch.isfinite(v) for v in logs.values())


def test_studiogan_2c_gradient_is_one_over_world_size(tmp_path):
    torch.manual_seed(0)
    grads, e0, p0 = {}, torch.randn(6, E), torch.randn(6, E)
    for mode in ("exact", "studiogan"):
        method = _method(tmp_path, two_c_grad=mode)
        e = e0.clone().requires_grad_(True)
        out = DOutput(torch.zeros(6), e, p0, torch.zeros(6, 4))
        ctx = Ctx({}, {})
        ctx.world_size = 4
        loss = method._two_c(GANStep(0, "d", None, None, ctx=ctx), out, torch.tensor([0, 1, 1, 2, 0, 2]))
        loss.backward()
        grads[mode] = (float(loss.detach()), e.grad.clone())
    assert grads["exact"][0] == pytest.approx(grads["studiogan"][0])
    torch.testing.assert_close(grads["studiogan"][1], grads["exact"][1] / 4)


def test_temperature_schedules():
    from text2image.contragan import temperature_at
    # paper-era discrete tempering: 2.0 -> 1.0 at half of 100k steps
    assert [temperature_at(s, 2.0, 1.0, "discrete", 1, 100_000) for s in (0, 49_999, 50_000, 99_999)] == [2.0, 2.0, 1.0, 1.0]
    # three levels: interval = T // (k + 1)
    assert temperature_at(70, 1.0, 2.0, "discrete", 2, 90) == pytest.approx(2.0)
    assert temperature_at(35, 1.0, 2.0, "discrete", 2, 90) == pytest.approx(1.5)
    assert temperature_at(25, 1.0, 2.0, "continuous", 1, 100) == pytest.approx(1.25)
    assert temperature_at(10, 0.5, 2.0, "constant", 1, 100) == 0.5
    with pytest.raises(ValueError, match="temperature_schedule"):
        temperature_at(0, 1.0, 1.0, "cosine", 1, 10)


# --- single-point mutations that must not survive -------------------------------------------------
def test_block_i_is_fed_z_chunk_i_plus_1():
    torch.manual_seed(0)
    g = Generator(z_dim=20, shared_dim=4, num_classes=C, channels=2, image_size=32, attention_at=None).eval()
    outs = []
    for blk in g.blocks:
        blk.register_forward_hook(lambda m, i, o: outs.append(o.clone()))
    z, y = torch.randn(3, 20), torch.tensor([0, 1, 2])
    g(z, y)
    base, outs[:] = list(outs), []
    n = len(g.blocks)
    for i in range(n):                       # perturb chunk i + 1: blocks < i unchanged, block i changes
        z2 = z.clone()
        z2[:, (i + 1) * g.chunk:(i + 2) * g.chunk] += 1.0
        g(z2, y)
        for j in range(n):
            same = torch.allclose(outs[j], base[j])
            assert same == (j < i), (i, j)
        outs[:] = []


def test_features_are_relu_sum_of_last_map():
    torch.manual_seed(0)
    d = Discriminator(num_classes=C, channels=4, embed_dim=E, image_size=S, attention_at=16).eval()
    last = []
    d.blocks[-1].register_forward_hook(lambda m, i, o: last.append(o))
    out = d(torch.randn(3, 3, S, S), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out.features, torch.relu(last[0]).sum(dim=(2, 3)))
    torch.testing.assert_close(out.logits, d.linear1(out.features).squeeze(1))


@pytest.mark.parametrize("mtd", ["2C", "PD"])
def test_classify_reads_the_conditional_head(mtd):
    """classify = argmax over classes, per image, of a loop over labels: the 2C cosine of the embedding to
    each label's proxy (from forward(x, c)), or the PD logit's class term (forward(x, c) minus linear1)."""
    torch.manual_seed(0)
    d = Discriminator(num_classes=C, channels=4, embed_dim=E, image_size=S, attention_at=16, cond_mtd=mtd).eval()
    x = torch.randn(6, 3, S, S, dtype=torch.float32)
    pred = d.classify(x)
    with torch.no_grad():
        scores = torch.zeros(6, C, dtype=torch.float64)
        for c in range(C):
            out = d(x, torch.full((6,), c, dtype=torch.long))
            if mtd == "2C":
                e, p = out.embeddings.double(), out.proxies.double()
                scores[:, c] = (e * p).sum(1) / (e.norm(dim=1) * p.norm(dim=1))
            else:
                scores[:, c] = (out.logits - d.linear1(out.features).squeeze(1)).double()
    assert pred.tolist() == scores.argmax(1).tolist()
    assert pred.dtype == torch.long and pred.shape == (6,)
    with pytest.raises(ValueError, match="no class head"):
        Discriminator(num_classes=C, channels=4, embed_dim=E, image_size=S, cond_mtd="W/O").classify(x)


def test_sample_latents_draws_every_class_and_grid_is_class_major(tmp_path):
    method = _method(tmp_path)
    method.build_models(method.cfg)
    _, y = method.sample_latents(500, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert sorted(set(y.tolist())) == list(range(C))
    _, y = method.sample_inputs(torch.device("cpu"))
    k = method.cfg.gan.samples_per_class
    assert y.tolist() == [c for c in range(C) for _ in range(k)]


def test_generator_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    g = tiny_g(latent="uniform")
    g(torch.randn(6, Z), torch.tensor([0, 1, 2, 0, 1, 2]))   # move BN statistics
    g.save_pretrained(tmp_path / "g")
    assert (tmp_path / "g" / "diffusion_pytorch_model.safetensors").exists()
    g2 = Generator.from_pretrained(tmp_path / "g")
    assert g2.config.latent == "uniform" and g2.config.num_classes == C and list(g2.config.output_range) == [-1, 1]
    z = g2.sample_latents(4, torch.Generator().manual_seed(1))
    assert z.min() >= -1 and z.max() <= 1 and z.shape == (4, Z)
    y = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(g2.eval()(z, y), g.eval()(z, y))
    g01 = tiny_g(output_range=(0.0, 1.0)).eval()
    x = g01(z, y)
    assert x.min() >= 0 and x.max() <= 1


# --- CIFAR python pickles --------------------------------------------------------------------------
def _write_cifar(root, name, n_per_file=6, classes=10):
    """Tiny CIFAR folders in the official format (pickled dicts with byte-string keys, protocol 2)."""
    import pickle

    import numpy as np
    from text2image.cifar import CIFAR_FILES
    spec = CIFAR_FILES[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in spec["train"] + spec["test"]:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n_per_file).tolist()
        d = {b"data": data, b"batch_label": f.encode()}
        if name == "cifar10":
            d[b"labels"] = labels
        else:
            d[b"fine_labels"], d[b"coarse_labels"] = labels, [y % 20 for y in labels]
        with open(folder / f, "wb") as fh:
            pickle.dump(d, fh, protocol=2)
    meta = ({b"label_names": [f"c{i}".encode() for i in range(classes)]} if name == "cifar10" else
            {b"fine_label_names": [f"f{i}".encode() for i in range(classes)],
             b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
    with open(folder / spec["meta"], "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return folder


def test_cifar_pickles_load_and_bad_files_are_named(tmp_path):
    import pickle

    import numpy as np
    from text2image.cifar import CIFAR
    folder = _write_cifar(tmp_path / "c10", "cifar10")
    ds = CIFAR(tmp_path / "c10", "cifar10", "train", value_range=(-1, 1))
    assert len(ds) == 30 and ds.classes[3] == "c3"
    x, y = ds[7]
    with open(folder / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    # row layout: 1024 R, 1024 G, 1024 B, each row-major 32x32
    want = torch.from_numpy(raw[b"data"][1].reshape(3, 32, 32).astype(np.float32)) / 255 * 2 - 1
    torch.testing.assert_close(x, want)
    assert y == raw[b"labels"][1]
    assert len(CIFAR(folder, "cifar10", "test")) == 6          # the batches folder itself works too
    _write_cifar(tmp_path / "c100", "cifar100", classes=100)
    ds = CIFAR(tmp_path / "c100", "cifar100", "test", label="coarse")
    assert len(ds.classes) == 20 and 0 <= ds[0][1] < 20
    # malformed / missing files name the file
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFAR(tmp_path / "c10", "cifar10", "train")
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="data_batch_3.*3072"):
        CIFAR(tmp_path / "c10", "cifar10", "train")
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, fh)
    assert len(CIFAR(tmp_path / "c10", "cifar10", "train")) == 26
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        CIFAR(tmp_path / "c10", "cifar10", "train")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR(tmp_path / "c10", "cifar100", "train")


def test_contragan_reads_cifar_kind(tmp_path):
    _write_cifar(tmp_path / "c10", "cifar10")
    method = _method(tmp_path)
    method.cfg.data.kind, method.cfg.data.root = "cifar10", str(tmp_path / "c10")
    models = method.build_models(method.cfg)
    assert method.num_classes == 10 and models["d"].num_classes == 10
    x, y = method.build_dataset(method.cfg)[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


def _sn_ratios(module):
    """Per spectral-norm layer: stored sigma (u^T W v, what eval mode uses) / true largest singular value."""
    out = []
    for m in module.modules():
        if hasattr(m, "parametrizations"):
            p, w = m.parametrizations.weight[0], m.parametrizations.weight.original.detach().flatten(1)
            out.append(float(torch.vdot(p._u, w @ p._v) / torch.linalg.matrix_norm(w, 2)))
    return torch.tensor(out)


def test_eval_refreshes_spectral_norm_of_averaged_weights():
    """An EMA copy averages weights and u, v: in eval mode (no power iteration) sigma would be too small and
    every layer amplified; Generator.eval() re-runs the power method on the current weights."""
    torch.manual_seed(0)
    g, other = tiny_g(), tiny_g()
    with torch.no_grad():     # what EMA.update does: lerp parameters and buffers towards another model
        for p, q in zip(g.parameters(), other.parameters()):
            p.lerp_(q, 0.5)
        for (name, b), (_, c) in zip(g.named_buffers(), other.named_buffers()):
            if b.is_floating_point():
                b.lerp_(c, 0.5)
    stale = _sn_ratios(g)
    assert stale.min() < 0.9                                   # averaged u, v underestimate sigma
    g.eval()
    assert _sn_ratios(g).min() > 0.97 and _sn_ratios(g).max() < 1.0 + 1e-4
    z, y = torch.randn(4, Z), torch.tensor([0, 1, 2, 3])
    a = g(z, y)
    torch.testing.assert_close(g(z, y), a)                     # eval forwards do not move u, v
    g.train()
    assert g.training and all(m.training for m in g.modules())


@pytest.mark.parametrize("mtd", ["PD", "W/O"])
def test_projection_and_unconditional_baselines(tmp_path, mtd):
    """d_cond_mtd=PD: logit = linear1(h) + <embedding(y), h> (StudioGAN big_resnet.py); no 2C terms."""
    torch.manual_seed(0)
    method = _method(tmp_path, d_cond_mtd=mtd)
    d = method.build_models(method.cfg)["d"]
    x = torch.randn(2, 3, S, S).repeat(2, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 3])
    out = d(x, y)
    plain = d.linear1(out.features).squeeze(1)
    if mtd == "PD":
        torch.testing.assert_close(out.logits, plain + (d.embedding(y) * out.features).sum(1))
        assert not torch.allclose(out.logits[:2], out.logits[2:])          # the label changes the logit
    else:
        torch.testing.assert_close(out.logits, plain)
        torch.testing.assert_close(out.logits[:2], out.logits[2:])
        assert not hasattr(d, "embedding")
    s = GANStep(0, "d", None, y, cond_fake=y, out_real=out, out_fake=out)
    assert set(method.d_loss(s)) == {"d_adv"} and set(method.g_loss(s)) == {"g_adv"}
    with pytest.raises(ValueError, match="d_cond_mtd"):
        _method(tmp_path, d_cond_mtd="AC")


# --- DiffAugment (StudioGAN AUG.apply_diffaug) and the shapes data option ---------------------------
class _RecordingAug(torch.nn.Module):
    """Stands in for DiffAugment: records each call's input and returns a recognisable transform."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return -x


def test_diffaug_is_applied_to_reals_and_fakes_in_d_steps_and_to_fakes_in_g_step(tmp_path):
    """StudioGAN worker.py: train_discriminator augments reals and fakes (two series_augment calls),
    train_generator augments the fakes; D sees only augmented images and G's gradient passes through."""
    torch.manual_seed(0)
    method = _method(tmp_path, diffaug=True)
    from text2image.augment import DiffAugment
    assert isinstance(method.aug, DiffAugment) and method.aug.policy == "color,translation,cutout"
    assert method.aug.input_range == method.output_range
    models = method.build_models(method.cfg)
    ctx = _Ctx(models, method.build_optimizers(method.cfg, models))
    method.aug = rec = _RecordingAug()
    g0 = {k: v.detach().clone() for k, v in models["g"].named_parameters()}
    seen = []
    real_discriminate = method.discriminate

    def discriminate(d, images, cond):
        seen.append((images, torch.is_grad_enabled() and images.requires_grad))
        return real_discriminate(d, images, cond)

    method.discriminate = discriminate
    reals = torch.rand(8, 3, S, S) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    method.train_step((reals, labels), 0, ctx)
    # n_dis = 2 D updates (real chunk, fakes) + 1 G update (fakes)
    assert len(rec.inputs) == 5 and len(seen) == 3
    torch.testing.assert_close(rec.inputs[0], reals[:4])
    torch.testing.assert_close(rec.inputs[2], reals[4:])
    for i, (images, _) in enumerate(seen[:2]):              # D inputs = cat[aug(real), aug(fake)]
        torch.testing.assert_close(images, -torch.cat([rec.inputs[2 * i], rec.inputs[2 * i + 1]]))
        assert not rec.inputs[2 * i + 1].requires_grad       # D steps: fakes without a graph into G
    torch.testing.assert_close(seen[2][0], -rec.inputs[4])  # G step: D(aug(G(z)))
    assert rec.inputs[4].requires_grad and seen[2][1]
    g_after = {k: v for k, v in models["g"].named_parameters()}
    assert any(not torch.equal(g0[k], v) for k, v in g_after.items())  # G trained through aug


def test_diffaug_off_leaves_d_inputs_unaugmented(tmp_path):
    torch.manual_seed(0)
    method = _method(tmp_path)
    assert method.aug is None
    models = method.build_models(method.cfg)
    x = torch.rand(4, 3, S, S) * 2 - 1
    torch.testing.assert_close(method.augment(x), x)
    s = GANStep(0, "d", x[:2], torch.tensor([0, 1]), cond_fake=torch.tensor([2, 3]), fake=x[2:])
    d = models["d"].eval()
    out_r, out_f = method.d_forward(d, s)
    torch.testing.assert_close(out_r.logits, d(x[:2], torch.tensor([0, 1])).logits)
    # with diffaug on, the same D forward differs (the images are augmented)
    method_aug = _method(tmp_path, diffaug=True)
    torch.manual_seed(1)
    out_r2, _ = method_aug.d_forward(d, s)
    assert not torch.allclose(out_r2.logits, out_r.logits)
    with pytest.raises(ValueError, match="policy"):
        _method(tmp_path, diffaug=True, diffaug_policy="colour")


def test_shapes_max_shapes_option_writes_that_data(tmp_path):
    import json
    from text2image.contragan import build_class_image_dataset

    cfg = ContraGANConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    cfg.data.max_shapes = 1
    ds, classes = build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    root = tmp_path / "data" / "shapes_32px_n40_s0_m1"
    assert len(ds) == 35 and len(classes) == 5
    info = json.loads((root / "dataset_info.json").read_text())
    assert info["config"]["max_shapes"] == 1
    records = json.loads((root / "annotations" / "attributes_train.json").read_text())["images"]
    assert all(len(r["objects"]) == 1 for r in records)
    cfg.data.max_shapes = 2                                  # the default variant: no suffix
    build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    info2 = json.loads((tmp_path / "data" / "shapes_32px_n40_s0" / "dataset_info.json").read_text())
    assert info2["config"]["max_shapes"] == 2


def test_shapes_primary_size_option_writes_that_data(tmp_path):
    import json
    from cmgen.config import ConfigError
    from cmgen.engine.registry import load_config
    from text2image.contragan import build_class_image_dataset, shapes_variant_suffix

    cfg = ContraGANConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    assert shapes_variant_suffix(cfg.data) == ""
    cfg.data.primary_size = "large"
    assert shapes_variant_suffix(cfg.data) == "_large"
    build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    root = tmp_path / "data" / "shapes_32px_n40_s0_large"   # never the default data's root
    assert json.loads((root / "dataset_info.json").read_text())["config"]["primary_size"] == "large"
    records = json.loads((root / "annotations" / "attributes_train.json").read_text())["images"]
    assert all(r["objects"][0]["size"] == "large" for r in records)
    assert not (tmp_path / "data" / "shapes_32px").exists()
    cfg.data.max_shapes = 1
    assert shapes_variant_suffix(cfg.data) == "_m1_large"
    cfg.data.primary_size = "mixed"
    build_class_image_dataset(cfg, 32, (-1.0, 1.0))             # the default keeps its root, no key
    info = json.loads((tmp_path / "data" / "shapes_32px_n40_s0_m1" / "dataset_info.json").read_text())
    assert "primary_size" not in info["config"]
    path = Path(__file__).resolve().parents[1] / "configs" / "contragan" / "shapes.yaml"
    assert load_config(path, ["data.primary_size=large"]).data.primary_size == "large"
    assert load_config(path, []).data.primary_size == "huge"        # the shapes config's own data
    with pytest.raises(ConfigError, match="primary_size"):
        load_config(path, ["data.primary_size=giant"])
    cfg.data.primary_size = "huge"
    assert shapes_variant_suffix(cfg.data) == "_m1_huge"
    build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    records = json.loads((tmp_path / "data" / "shapes_32px_n40_s0_m1_huge" / "annotations" /
                          "attributes_train.json").read_text())["images"]
    assert all(len(r["objects"]) == 1 and r["objects"][0]["size"] == "huge" for r in records)


def test_shapes_default_root_is_per_setting_and_a_mismatch_is_named(tmp_path, capsys):
    """Two configs with other data settings in one runs/ folder never share data (ContraGAN's 256 images
    and ContraD's 512 once shared runs/data/shapes_32px, whoever came first); data written with other
    settings at the default root raise, naming the keys; at a user data.root they are used, with a note."""
    import shutil
    from cmgen.errors import DataError
    from text2image.contragan import build_class_image_dataset, shapes_dir_name

    cfg = ContraGANConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    assert shapes_dir_name(cfg.data, 32) == "shapes_32px_n40_s0"
    cfg.data.num_images, cfg.data.seed = 512, 0
    assert shapes_dir_name(cfg.data, 32) == "shapes_32px" and shapes_dir_name(cfg.data, 64) == "shapes_64px"
    cfg.data.seed = 3
    assert shapes_dir_name(cfg.data, 32) == "shapes_32px_n512_s3"
    cfg.data.num_images, cfg.data.seed = 40, 0
    ds40, _ = build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    cfg.data.num_images = 48
    ds48, _ = build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    assert (len(ds40), len(ds48)) == (35, 42)                      # each config got its own images
    # an older cmgen's folder for other settings at this config's default root: refused, keys named
    shutil.rmtree(tmp_path / "data" / "shapes_32px_n48_s0")
    shutil.copytree(tmp_path / "data" / "shapes_32px_n40_s0", tmp_path / "data" / "shapes_32px_n48_s0")
    with pytest.raises(DataError, match=r"shapes_32px_n48_s0 .*num_images: 40 there, 48 asked"):
        build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    cfg.data.root = str(tmp_path / "data" / "shapes_32px_n40_s0")  # a user root: used as it is, noted
    ds, _ = build_class_image_dataset(cfg, 32, (-1.0, 1.0))
    assert len(ds) == 35 and "num_images: 40 there, 48 asked" in capsys.readouterr().err

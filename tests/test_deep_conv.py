"""StudioGAN's DCGAN backbone (text2image/deep_conv.py) for ContraGAN: layer shapes against a table
transcribed from deep_conv.py, spectral norm vs BatchNorm, one-hot cBN conditioning, the heads, init,
save/load, the method's backbone switch and a 2-step engine run."""
from pathlib import Path

import pytest
import torch
from torch import nn

from text2image.contragan import ContraGANConfig, ContraGANMethod, DOutput
from text2image.deep_conv import DCGANDiscriminator, DCGANGenerator
from text2image.layers import ConditionalBatchNorm2d, is_spectral_normed

C, S = 5, 32

# PyTorch-StudioGAN src/models/deep_conv.py at 947b35e9835b67860fdce44d337f6d7fee7c8db3 (fixed widths):
#   Generator:      linear0 z -> 512*4*4; GenBlock in_dims [512, 256, 128] / out_dims [256, 128, 64],
#                   deconv0 kernel 4 stride 2 padding 1; conv4 64 -> 3 kernel 3 stride 1 padding 1.
#   Discriminator:  DiscBlock in_dims [3, 64, 128] / out_dims [64, 128, 256], conv0 k3 s1 p1 then conv1
#                   k4 s2 p1; conv1 256 -> 512 k3 s1 p1; linear1 512 -> 1; 2C linear2 512 -> d_embed_dim.
STUDIOGAN_G = {"linear0": (128, 512 * 16), "deconvs": [(512, 256, 4, 2, 1), (256, 128, 4, 2, 1), (128, 64, 4, 2, 1)],
               "conv_out": (64, 3, 3, 1, 1), "block_res": [8, 16, 32]}
STUDIOGAN_D = {"conv0": [(3, 64, 3, 1, 1), (64, 128, 3, 1, 1), (128, 256, 3, 1, 1)],
               "conv1": [(64, 64, 4, 2, 1), (128, 128, 4, 2, 1), (256, 256, 4, 2, 1)],
               "top": (256, 512, 3, 1, 1), "block_res": [16, 8, 4], "linear1": (512, 1), "linear2": (512, 512)}


def _conv(m):
    return (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])


def test_official_widths_match_deep_conv_tables():
    g = DCGANGenerator(z_dim=128, num_classes=10, channels=64).eval()
    assert (g.linear0.in_features, g.linear0.out_features) == STUDIOGAN_G["linear0"]
    assert [_conv(m) for m in g.deconvs] == STUDIOGAN_G["deconvs"]
    assert all(isinstance(m, nn.ConvTranspose2d) for m in g.deconvs)
    assert _conv(g.conv_out) == STUDIOGAN_G["conv_out"]
    res = []
    for bn in g.bns:
        bn.register_forward_hook(lambda m, i, o: res.append(o.shape[2]))
    assert g(torch.randn(2, 128), torch.tensor([0, 9])).shape == (2, 3, 32, 32)
    assert res == STUDIOGAN_G["block_res"]

    d = DCGANDiscriminator(num_classes=10, channels=64, embed_dim=512).eval()
    assert [_conv(b.conv0) for b in d.blocks] == STUDIOGAN_D["conv0"]
    assert [_conv(b.conv1) for b in d.blocks] == STUDIOGAN_D["conv1"]
    assert _conv(d.conv_top) == STUDIOGAN_D["top"]
    assert (d.linear1.in_features, d.linear1.out_features) == STUDIOGAN_D["linear1"]
    assert (d.linear2.in_features, d.linear2.out_features) == STUDIOGAN_D["linear2"]
    res = []
    for b in d.blocks:
        b.register_forward_hook(lambda m, i, o: res.append(o.shape[2]))
    out = d(torch.randn(2, 3, 32, 32), torch.tensor([0, 9]))
    assert res == STUDIOGAN_D["block_res"] and out.features.shape == (2, 512)


def test_width_scales_every_layer_with_channels():
    g, d = DCGANGenerator(z_dim=16, num_classes=C, channels=4), DCGANDiscriminator(num_classes=C, channels=4, embed_dim=8)
    assert [_conv(m)[:2] for m in g.deconvs] == [(32, 16), (16, 8), (8, 4)]
    assert [_conv(b.conv0)[:2] for b in d.blocks] == [(3, 4), (4, 8), (8, 16)] and _conv(d.conv_top)[:2] == (16, 32)


def test_spectral_norm_or_batchnorm_in_d():
    """apply_d_sn: every conv / linear / embedding spectral-normed, no BN; without it BN after each conv."""
    sn = DCGANDiscriminator(num_classes=C, channels=4, embed_dim=8, sn=True)
    weighted = [m for m in sn.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(weighted) == 3 * 2 + 1 + 2 + 1 and all(is_spectral_normed(m) for m in weighted)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sn.modules())
    bn = DCGANDiscriminator(num_classes=C, channels=4, embed_dim=8, sn=False)
    assert not any(is_spectral_normed(m) for m in bn.modules())
    bns = [m for m in bn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 * 2 + 1 and all(m.eps == 1e-4 and m.momentum == 0.1 and m.affine for m in bns)
    g = DCGANGenerator(z_dim=16, num_classes=C, channels=4, sn=True)
    assert all(is_spectral_normed(m) for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)))


def test_d_features_are_relu_sum_of_top_conv_and_heads():
    torch.manual_seed(0)
    d = DCGANDiscriminator(num_classes=C, channels=4, embed_dim=8).eval()
    top = []
    d.conv_top.register_forward_hook(lambda m, i, o: top.append(o))
    y = torch.tensor([0, 3, 3])
    out = d(torch.randn(3, 3, S, S), y)
    assert isinstance(out, DOutput)
    torch.testing.assert_close(out.features, torch.relu(top[0]).sum(dim=(2, 3)))
    torch.testing.assert_close(out.logits, d.linear1(out.features).squeeze(1))
    torch.testing.assert_close(out.embeddings, d.linear2(out.features))
    torch.testing.assert_close(out.proxies, d.embedding(y))
    pd = DCGANDiscriminator(num_classes=C, channels=4, cond_mtd="PD").eval()
    out = pd(torch.randn(3, 3, S, S), y)
    torch.testing.assert_close(out.logits, pd.linear1(out.features).squeeze(1) + (pd.embedding(y) * out.features).sum(1))
    assert pd.classify(torch.randn(4, 3, S, S)).shape == (4,)


def test_generator_conditions_every_block_on_one_hot_label():
    """cBN condition = one-hot(y) (affine_input_dim = num_classes); the label changes the image at a fixed z;
    the last class is reachable."""
    torch.manual_seed(0)
    g = DCGANGenerator(z_dim=16, num_classes=C, channels=4)
    assert all(isinstance(b, ConditionalBatchNorm2d) and b.gain.in_features == C for b in g.bns)
    for b in g.bns:
        nn.init.normal_(b.gain.weight)
    seen = []
    g.bns[0].register_forward_hook(lambda m, i, o: seen.append(i[1]))
    g.eval()
    z = torch.randn(1, 16).expand(C, 16)
    x = g(z, torch.arange(C))
    torch.testing.assert_close(seen[0], torch.eye(C))
    assert all(not torch.allclose(x[i], x[j], atol=1e-5) for i in range(C) for j in range(i))
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="needs class labels"):
        g(torch.randn(2, 16), None)


def test_options_are_checked():
    with pytest.raises(ValueError, match="32 px"):
        DCGANGenerator(image_size=64)
    with pytest.raises(ValueError, match="32 px"):
        DCGANDiscriminator(image_size=64)
    with pytest.raises(ValueError, match="attention_at"):
        DCGANDiscriminator(attention_at=32)
    with pytest.raises(ValueError, match="attention_at"):
        DCGANGenerator(attention_at=4)
    g = DCGANGenerator(z_dim=16, num_classes=C, channels=8, attention_at=16)
    d = DCGANDiscriminator(num_classes=C, channels=8, embed_dim=8, attention_at=8)
    assert g.attention_index == 1 and d.attention_index == 1
    assert g(torch.randn(2, 16), torch.tensor([0, 1])).shape == (2, 3, S, S)


def test_orthogonal_init_of_every_weight():
    torch.manual_seed(0)
    d = DCGANDiscriminator(num_classes=C, channels=4, embed_dim=8, sn=False)
    for m in d.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.flatten(1)
            rows, cols = w.shape
            gram = w @ w.T if rows <= cols else w.T @ w
            torch.testing.assert_close(gram, torch.eye(min(rows, cols)), atol=1e-5, rtol=0)
            assert m.bias is None or (m.bias == 0).all()


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    g = DCGANGenerator(z_dim=16, num_classes=C, channels=4, latent="uniform", output_range=(0.0, 1.0))
    g(torch.randn(4, 16), torch.tensor([0, 1, 2, 3]))
    g.save_pretrained(tmp_path / "g")
    g2 = DCGANGenerator.from_pretrained(tmp_path / "g")
    z = g2.sample_latents(3, torch.Generator().manual_seed(0))
    assert z.min() >= -1 and z.max() <= 1
    y = torch.tensor([0, 4, 2])
    torch.testing.assert_close(g2.eval()(z, y), g.eval()(z, y))
    assert g2(z, y).min() >= 0


def _method(tmp_path, **model):
    cfg = ContraGANConfig()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.num_images = 40
    for k, v in {**dict(backbone="deep_conv", z_dim=16, g_channels=4, d_channels=4, embed_dim=8, attention_at=None),
                 **model}.items():
        setattr(cfg.model, k, v)
    return ContraGANMethod(cfg)


def test_method_builds_the_chosen_backbone(tmp_path):
    method = _method(tmp_path, sn_d=False, sn_g=False)
    models = method.build_models(method.cfg)
    assert isinstance(models["g"], DCGANGenerator) and isinstance(models["d"], DCGANDiscriminator)
    assert models["d"].bn_top is not None and models["g"].config.num_classes == C
    with pytest.raises(ValueError, match="backbone"):
        _method(tmp_path, backbone="resnet")
    m = _method(tmp_path, backbone="big_resnet", sn_d=False, z_dim=20, attention_at=16)
    with pytest.raises(ValueError, match="sn_d"):
        m.build_models(m.cfg)


@pytest.mark.slow
def test_engine_two_steps_deep_conv(tmp_path):
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    config = Path(__file__).resolve().parents[1] / "configs" / "contragan" / "shapes.yaml"
    cfg = load_config(config, [f"run.output_dir={tmp_path}", "run.name=t", "train.max_steps=2", "train.sample_every=2",
                               "train.checkpoint_every=2", "train.log_every=1", "train.progress_bar=false",
                               "model.backbone=deep_conv", "model.attention_at=null"])
    result = train(cfg)
    assert result.step == 2 and all(k in result.metrics for k in ("d_2c", "g_2c", "d_adv", "g_adv"))
    assert (result.run_dir / "samples" / "step_000002.png").stat().st_size > 0


def test_eval_refresh_is_idempotent_until_the_weights_change():
    """eval() twice gives the sigma of eval() once (diffusers' from_pretrained calls eval(), then the
    sampler does); a weight update makes the next eval() refresh again."""
    import copy

    torch.manual_seed(0)
    g = DCGANGenerator(z_dim=16, num_classes=5, channels=4, sn=True)
    z, y = torch.randn(4, 16), torch.arange(4)
    g(z, y)                                                    # one train-mode power iteration
    once, twice = copy.deepcopy(g).eval(), copy.deepcopy(g).eval().eval()
    for (name, a), (_, b) in zip(once.state_dict().items(), twice.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        twice.deconvs[0].parametrizations.weight.original.mul_(1.5)
    u = twice.deconvs[0].parametrizations.weight[0]._u.clone()
    twice.eval()
    assert not torch.equal(u, twice.deconvs[0].parametrizations.weight[0]._u)   # refreshed on the new weight


def test_a_deep_copy_refreshes_on_its_own_tensors():
    """The refresh record travels with a deep copy (the EMA's), but the copy's tensors are new: its eval()
    still runs the power method on them."""
    import copy

    torch.manual_seed(0)
    g = DCGANGenerator(z_dim=16, num_classes=5, channels=4, sn=True).eval()
    ema = copy.deepcopy(g).train()
    with torch.no_grad():
        for a, b in zip(ema.parameters(), g.parameters()):
            a.copy_(b * 1.3)                                   # one in-place write per tensor, as an EMA update
        for (_, a), (_, b) in zip(ema.named_buffers(), g.named_buffers()):
            a.copy_(b)
    sn = ema.deconvs[0].parametrizations.weight[0]
    u = sn._u.clone()
    ema.eval()
    assert not torch.equal(u, sn._u)

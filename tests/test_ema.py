"""cmgen.engine.EMA against StudioGAN's src/utils/ema.py Ema.update (transcribed loop, float64)."""
import copy

import pytest
import torch
from torch import nn

from cmgen.engine.ema import EMA


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()


def _studiogan_update(source, target, decay, start_iter, it):
    """StudioGAN Ema.update, written out: decay 0 before start_iter, lerp everything else."""
    d = 0.0 if 0 <= it < start_iter else decay
    with torch.no_grad():
        for p_ema, p in zip(target.parameters(), source.parameters()):
            p_ema.copy_(p.lerp(p_ema, d))
        for (name, b_ema), (_, b) in zip(target.named_buffers(), source.named_buffers()):
            if "num_batches_tracked" in name:
                b_ema.copy_(b)
            else:
                b_ema.copy_(b.lerp(b_ema, d))


def test_buffers_averaged_except_num_batches_tracked():
    model = _model()
    ema = EMA(model, decay=0.9, start_step=1)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        x = torch.randn(8, 3, dtype=torch.float64)
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, step)
        # our step <= start_step copies; StudioGAN's iter < start_iter copies: iter = step - 1
        _studiogan_update(model, ref, 0.9, 1, step - 1)
    for (k, a), (_, b) in zip(ema.module.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    bn, bn_ema = model[1], ema.module[1]
    assert not torch.allclose(bn_ema.running_mean, bn.running_mean)      # averaged, not copied
    assert int(bn_ema.num_batches_tracked) == int(bn.num_batches_tracked) == 5


def test_copy_mode_and_validation():
    model = _model()
    ema = EMA(model, decay=0.5, buffers="copy")
    model[1](torch.randn(6, 4, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    w_before = ema.module[0].weight.clone()
    ema.update(model, 3)
    torch.testing.assert_close(ema.module[1].running_var, model[1].running_var)
    torch.testing.assert_close(ema.module[0].weight, 0.5 * w_before + 0.5 * model[0].weight)
    with pytest.raises(ValueError, match="buffers"):
        EMA(model, buffers="mean")
    state = ema.state_dict()
    other = EMA(_model())
    other.load_state_dict(state)
    assert other.buffers == "copy" and other.decay == 0.5


@pytest.mark.parametrize("mode", ["average", "copy"])
def test_config_ema_buffers_reaches_the_trainer(tmp_path, mode):
    """``ema.buffers`` in a config decides what the engine's EMA does with a float buffer (the toy head's
    queue, written every step): copied exactly, or averaged (then it differs from the live queue)."""
    from cmgen.engine import load_config, load_ema_state
    from cmgen.engine.checkpoint import load_model_state
    from cmgen.engine.trainer import train
    from tests.test_engine import ROOT
    cfg = load_config(ROOT / "configs" / "toy" / "synthetic.yaml",
                      [f"run.output_dir={tmp_path}", "run.name=t", "train.max_steps=6", "train.checkpoint_every=6",
                       "train.sample_every=0", "train.eval_every=0", "train.progress_bar=false", "ema.models=[head]",
                       "ema.decay=0.5", "ema.start_step=2", f"ema.buffers={mode}"])
    assert cfg.ema.buffers == mode
    ckpt = train(cfg).checkpoint
    live, ema = load_model_state(ckpt, "head"), load_ema_state(ckpt, "head")
    assert torch.equal(ema["ptr"], live["ptr"]) and torch.equal(ema["ages"], live["ages"])   # integers: copied
    assert live["queue"].abs().sum() > 0
    assert torch.equal(ema["queue"], live["queue"]) == (mode == "copy")

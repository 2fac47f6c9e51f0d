"""configs/xmcgan/{coco128,coco256,cub,lncoco}.yaml against the official values, and one step at 256 px.

OFFICIAL is transcribed from google-research/xmcgan_image_generation at commit
22a7ef2914787904949fe1fc3f5e560f1e75db29: ``xmcgan/configs/coco_xmc.py::get_config`` (the only released
config), ``xmcgan/libml/dataset_constants.py`` (text lengths), ``xmcgan/libml/coco_dataset.py``
(``num_examples``), ``xmcgan/libml/input_pipeline.py`` (a train_step loads ``batch_size x
d_step_per_g_step`` images) and ``flax.optim.Adam``'s default eps.
"""
from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest
import torch

from cmgen.engine.registry import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "xmcgan"

OFFICIAL = dict(seed=42, beta1=0.5, beta2=0.999, d_lr=0.0004, g_lr=0.0001, polyak_decay=0.999, dtype="bfloat16",
                image_size=128, batch_size=56, df_dim=96, gf_dim=96, z_dim=128, num_epochs=500, d_step_per_g_step=2,
                g_spectral_norm=False, d_spectral_norm=True, gamma_for_g=15, word_contrastive=True,
                sentence_contrastive=True, image_contrastive=True, pretrained_image_contrastive=True, cond_size=16,
                checkpoint_every_steps=5000, log_loss_every_steps=1000, show_num=64, adam_eps=1e-8)
COCO_MAX_TEXT_LENGTH, LN_MAX_TEXT_LENGTH = 17, 64
TRAIN_EXAMPLES = {"coco2014": 82_783, "ln": 134_272, "cub": 8_855}   # CUB: AttnGAN's train/filenames.pickle

# config -> (image size, max_tokens, training examples, data kind)
CONFIGS = {"coco128": (128, COCO_MAX_TEXT_LENGTH, TRAIN_EXAMPLES["coco2014"], "coco"),
           "coco256": (256, COCO_MAX_TEXT_LENGTH, TRAIN_EXAMPLES["coco2014"], "coco"),
           "cub": (256, COCO_MAX_TEXT_LENGTH, TRAIN_EXAMPLES["cub"], "cub"),
           "lncoco": (256, LN_MAX_TEXT_LENGTH, TRAIN_EXAMPLES["ln"], "lncoco")}

# What a smoke line may change: data source, widths, the pretrained networks, batch and image size.
SMOKE_KEYS = {"data.kind", "data.root", "data.num_images", "text.encoder", "text.random_init", "model.gf_dim",
              "model.df_dim", "model.z_dim", "model.image_encoder.random_init", "model.image_encoder.weights",
              "model.image_encoder.input_size", "train.batch_size", "train.num_workers", "gan.samples_per_class",
              "model.image_size"}


def _smoke(path: Path) -> list[str]:
    return [item for line in path.read_text().splitlines() if line.strip().startswith("# smoke:")
            for item in shlex.split(line.strip()[len("# smoke:"):])]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_is_the_official_one(name):
    size, max_tokens, examples, kind = CONFIGS[name]
    o = OFFICIAL
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.method == "xmcgan" and cfg.run.seed == o["seed"]
    # batch: train_d and train_g_d each see batch_size images; the loaded step holds both halves
    assert cfg.gan.n_dis == o["d_step_per_g_step"] and cfg.gan.d_batches == "split" and cfg.gan.g_step == "joint"
    assert cfg.train.batch_size == o["batch_size"] * o["d_step_per_g_step"] and cfg.train.grad_accum == 1
    assert cfg.train.max_steps == math.floor(examples * o["num_epochs"] / (o["batch_size"] * o["d_step_per_g_step"]))
    assert cfg.train.mixed_precision == "bf16" and o["dtype"] == "bfloat16"
    assert (cfg.train.checkpoint_every, cfg.train.log_every) == (o["checkpoint_every_steps"], o["log_loss_every_steps"])
    assert cfg.gan.samples_per_class == o["show_num"]
    for opt, lr in ((cfg.optim, o["g_lr"]), (cfg.gan.d_optim, o["d_lr"])):
        assert opt.name == "adam" and opt.lr == pytest.approx(lr) and tuple(opt.betas) == (o["beta1"], o["beta2"])
        assert opt.eps == o["adam_eps"] and opt.weight_decay == 0.0
    assert cfg.schedule.kind == "constant"
    assert cfg.ema.models == ["g"] and cfg.ema.decay == o["polyak_decay"] and cfg.ema.start_step == 0
    assert cfg.ema.buffers == "copy"           # EMA of the parameters only; sampling uses G's live batch stats
    assert cfg.gan.track_g_bn_in_d_steps is False
    m = cfg.model
    assert (m.image_size, m.gf_dim, m.df_dim, m.z_dim, m.cond_size) == (size, o["gf_dim"], o["df_dim"], o["z_dim"],
                                                                       o["cond_size"])
    assert m.g_channel_multipliers is None and m.d_channel_multipliers is None   # xmc_net.py's own layouts
    assert m.gamma_for_g == o["gamma_for_g"] and m.d_spectral_norm is o["d_spectral_norm"]
    assert (m.word_contrastive, m.sentence_contrastive, m.image_contrastive, m.pretrained_image_contrastive) == \
        (o["word_contrastive"], o["sentence_contrastive"], o["image_contrastive"], o["pretrained_image_contrastive"])
    assert (m.word_weight, m.sentence_weight, m.image_weight, m.pretrained_image_weight) == (1.0, 1.0, 1.0, 1.0)
    assert (m.temperature, m.gamma1, m.gamma2, m.gamma3) == (0.1, 5.0, 5.0, 50.0)
    assert m.gather_distributed is False
    assert m.image_encoder.arch == "resnet50" and m.image_encoder.input_size == 224 and not m.image_encoder.random_init
    assert cfg.text.max_tokens == max_tokens and cfg.text.pooling == "official_sum" and not cfg.text.random_init
    assert cfg.text.encoder is not None        # BERT-base from a local path, not the packaged MiniLM
    assert cfg.data.kind == kind and cfg.data.hflip and cfg.data.missing == "error"
    if kind == "coco":
        assert str(cfg.data.version) == "2014"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_smoke_lines_change_only_size_and_sources(name):
    path = CONFIG_DIR / f"{name}.yaml"
    keys = {item.split("=", 1)[0] for item in _smoke(path)}
    assert keys and keys <= SMOKE_KEYS, keys - SMOKE_KEYS
    cfg = load_config(path, _smoke(path))
    assert cfg.gan.n_dis == 2 and cfg.optim.lr == pytest.approx(1e-4) and cfg.train.mixed_precision == "bf16"


@pytest.mark.slow
def test_one_joint_step_at_256_px(tmp_path):
    """The 256 px layouts of coco256/cub/lncoco (the smoke runs use 128 px shapes): G, D and every loss."""
    from text2image.gan import GANStep
    from text2image.xmcgan import XMCGANMethod

    path = CONFIG_DIR / "coco256.yaml"
    cfg = load_config(path, [o for o in _smoke(path) if not o.startswith("model.image_size")] +
                      [f"run.output_dir={tmp_path}"])
    assert cfg.model.image_size == 256
    method = XMCGANMethod(cfg)
    models = method.build_models(cfg)
    g, d = models["g"], models["d"]
    captions = ["a red circle", "a large blue square on the left"]
    cond = method.encode_captions(captions, torch.device("cpu"))
    real = torch.rand(2, 3, 256, 256)
    z, cond_fake = method.sample_latents(2, torch.device("cpu"), torch.Generator().manual_seed(0), cond_real=cond)
    fake = method.generate(g, z, cond_fake)
    assert fake.shape == (2, 3, 256, 256)
    s = GANStep(step=0, phase="joint", real=real, cond_real=cond, z=z, cond_fake=cond_fake, fake=fake)
    s.out_real, s.out_fake = method.d_forward(d, s)
    assert s.out_real.regions.shape == (2, 16 * 16, method.text.dim)
    terms = {**method.d_loss(s), **method.g_loss(s)}
    assert set(terms) == {"d_adv", "d_word", "d_sentence", "g_adv", "g_word", "g_sentence", "g_image",
                          "g_image_pretrained"}
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in g.parameters() if p.requires_grad)

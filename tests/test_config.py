"""cmgen.config: YAML round trip, nested overrides, key and type errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from cmgen.config import (ConfigError, ExperimentConfig, apply_overrides, flat_keys, from_dict, from_yaml,
                          load_yaml, to_dict, to_yaml)
from cmgen.engine.registry import load_config
from cmgen.engine.toy import ToyConfig


@dataclass
class _Inner:
    size: int = 3
    scale: float = 1.0
    kind: Literal["a", "b"] = "a"
    dims: tuple[int, ...] = (4, 8)
    pair: tuple[float, float] = (0.5, 0.999)
    tags: list[str] = field(default_factory=list)
    maybe: Optional[int] = None
    table: dict[str, float] = field(default_factory=dict)


@dataclass
class _Cfg(ExperimentConfig):
    method: str = "x"
    model: _Inner = field(default_factory=_Inner)


def test_yaml_round_trip_preserves_every_type(tmp_path):
    cfg = _Cfg()
    cfg = apply_overrides(cfg, ["model.size=5", "model.kind=b", "model.dims=[1,2,3]", "model.tags=[x,y]",
                                "model.maybe=7", "model.table={a: 1.5}", "train.mixed_precision=bf16",
                                "train.grad_clip=0.5", "schedule.milestones=[10,20]", "ema.models=[g]"])
    path = tmp_path / "c.yaml"
    to_yaml(cfg, path)
    back = from_yaml(_Cfg, path)
    assert back == cfg
    assert isinstance(back.model.dims, tuple) and back.model.dims == (1, 2, 3)
    assert back.model.pair == (0.5, 0.999) and back.model.table == {"a": 1.5}
    assert to_dict(back) == to_dict(cfg)


def test_yaml_12_scalars_no_and_exponent_floats():
    assert load_yaml("a: no\nb: 1e-3\nc: yes\nd: true\ne: 10\n") == {"a": "no", "b": 1e-3, "c": "yes", "d": True, "e": 10}
    cfg = from_dict(_Cfg, {"train": {"mixed_precision": "no"}, "optim": {"lr": "2e-4"}})
    assert cfg.train.mixed_precision == "no" and cfg.optim.lr == pytest.approx(2e-4)


def test_nested_overrides_and_aliases():
    cfg = apply_overrides(_Cfg(), ["optim.lr=1e-3", "train.max_steps=10", "resume=latest", "run.name=123",
                                   "optim.betas=[0.5,0.9]", "train.grad_clip=null"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 10 and cfg.run.resume == "latest"
    assert cfg.run.name == "123"                   # str field keeps the raw text
    assert cfg.optim.betas == (0.5, 0.9) and cfg.train.grad_clip is None
    assert _Cfg().optim.lr == 1e-3 and _Cfg().train.max_steps == 1000  # the original is not mutated


def test_unknown_key_suggests_closest_names():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        apply_overrides(_Cfg(), ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'trian.max_steps'.*did you mean 'train.max_steps'"):
        apply_overrides(_Cfg(), ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.sise'.*'model.size'"):
        from_dict(_Cfg, {"model": {"sise": 3}})
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(_Cfg(), ["optim.lr"])


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=1.5", "'train.max_steps' expects int"),
    ("train.max_steps=true", "'train.max_steps' expects int"),
    ("optim.lr=fast", "'optim.lr' expects float"),
    ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of"),
    ("optim.betas=[0.9]", "'optim.betas' expects tuple"),
    ("model.dims=[1,x]", r"'model.dims\[1\]' expects int"),
    ("train.progress_bar=1", "'train.progress_bar' expects bool"),
    ("model.maybe=abc", "'model.maybe' expects Optional"),
    ("train=3", "'train' expects TrainConfig"),
    ("train.max_steps.x=3", "'train.max_steps' is a int, not a section"),
])
def test_wrong_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(_Cfg(), [override])


def test_flat_keys_lists_nested_paths():
    keys = flat_keys(_Cfg)
    assert {"method", "run.seed", "train.batch_size", "model.dims"} <= set(keys)


def test_toy_yaml_file_loads_with_overrides(tmp_path):
    cfg = load_config("configs/toy/synthetic.yaml", ["train.max_steps=3", f"run.output_dir={tmp_path}"])
    assert isinstance(cfg, ToyConfig) and cfg.method == "toy"
    assert cfg.train.max_steps == 3 and cfg.train.mixed_precision == "no" and cfg.optim.lr == 3e-3
    assert from_yaml(ToyConfig, to_yaml(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown method 'tyo'.*'toy'"):
        load_config("configs/toy/synthetic.yaml", ["method=tyo"])


@dataclass
class _WithOptional(ExperimentConfig):
    method: str = "x"
    extra: Optional[_Inner] = None
    second: Optional[_Inner] = None
    OPTIONAL_SECTION_SEEDS = {"second": "model"}
    model: _Inner = field(default_factory=_Inner)


def test_a_key_inside_an_optional_section_creates_it():
    cfg = apply_overrides(_WithOptional(), ["extra.size=7"])
    assert cfg.extra == _Inner(size=7)                          # the section's defaults, then the key
    cfg = apply_overrides(_WithOptional(), ["model.scale=2.5", "second.size=9"])
    assert cfg.second == _Inner(size=9, scale=2.5) and cfg.model == _Inner(scale=2.5)   # seeded from model
    assert cfg.second is not cfg.model
    assert apply_overrides(_WithOptional(), ["second.size=9", "model.scale=2.5"]).second.scale == 1.0  # in order
    assert apply_overrides(_WithOptional(), ["extra.size=7", "extra=null"]).extra is None
    with pytest.raises(ConfigError, match="extra.sise"):
        apply_overrides(_WithOptional(), ["extra.sise=7"])
    assert {"extra.size", "second.tags"} <= set(flat_keys(_WithOptional))


def test_gan_d_optim_override_starts_from_optim(tmp_path):
    """TTUR from the command line: gan.d_optim.lr on a config without a d_optim section gives D G's optimizer
    settings with only the named key changed; on a config with one it sets that key; range-checked like optim."""
    cfg = load_config("configs/contrad/shapes.yaml", ["optim.betas=[0.0,0.999]", "gan.d_optim.lr=2e-3"])
    assert load_config("configs/contrad/shapes.yaml").gan.d_optim is None
    assert cfg.gan.d_optim is not None and cfg.gan.d_optim.lr == 2e-3
    assert cfg.gan.d_optim.betas == cfg.optim.betas == (0.0, 0.999) and cfg.gan.d_optim.name == cfg.optim.name
    assert cfg.optim.lr != 2e-3
    cfg = load_config("configs/contragan/shapes.yaml", ["gan.d_optim.betas=[0.0,0.9]"])    # a d_optim section
    assert cfg.gan.d_optim.betas == (0.0, 0.9) and cfg.optim.betas != (0.0, 0.9)
    with pytest.raises(ConfigError, match="gan.d_optim.lr"):
        load_config("configs/contrad/shapes.yaml", ["gan.d_optim.lr=-1"])

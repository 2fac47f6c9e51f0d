"""Method names -> ``"module:Class"`` import strings, imported only when a run asks for them.

Keeping strings here means ``import cmgen`` never imports ``video`` or ``text2image``. A config may
also name any class directly: ``method: my_pkg.my_module:MyMethod``.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from cmgen.config import ConfigError, ExperimentConfig, apply_overrides, from_dict, load_yaml

__all__ = ["METHODS", "register_method", "resolve_method", "load_config"]

METHODS: dict[str, str] = {
    "toy": "cmgen.engine.toy:ToyMethod",
    "contragan": "text2image.contragan:ContraGANMethod",
    "xmcgan": "text2image.xmcgan:XMCGANMethod",
    "contrad": "text2image.contrad:ContraDMethod",
    "videomoco": "video.videomoco:VideoMoCoMethod",
    "supportset": "video.supportset:SupportSetMethod",
    "finetune": "video.finetune:FinetuneMethod",
}


def register_method(name: str, target: str) -> None:
    """Add ``name -> "module:Class"``; re-registering a name with another target is an error."""
    if ":" not in target:
        raise ValueError(f"method target must look like 'package.module:Class', got {target!r}")
    if METHODS.get(name, target) != target:
        raise ValueError(f"method {name!r} is already registered as {METHODS[name]!r}")
    METHODS[name] = target


def resolve_method(name: str) -> type:
    """The method class for a registered name or a ``"module:Class"`` string."""
    if not name:
        raise ConfigError("the config names no method (add a top-level 'method:' key)")
    target = METHODS.get(name, name)
    if ":" not in target:
        import difflib
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} (registered: {', '.join(sorted(METHODS))}; "
                          f"or give 'package.module:Class')")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import method {name!r} from {target!r}: {e}") from e
    return cls


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config, pick its method's config class, apply ``key=value`` overrides."""
    raw = load_yaml(Path(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping, got {type(raw).__name__}")
    method = raw.get("method", "")
    for item in overrides:
        if item.split("=", 1)[0].strip() == "method":
            method = item.split("=", 1)[1].strip()
    cls = resolve_method(method)
    cfg = from_dict(getattr(cls, "config_class", ExperimentConfig), raw)
    return apply_overrides(cfg, list(overrides))

"""Typed experiment configs: dataclasses <-> YAML, with ``key=value`` overrides.

Every method has one config dataclass that composes the shared sections below (``run``, ``train``,
``optim``, ``schedule``, ``ema``) with its own ``model:`` and ``data:`` sections::

    @dataclass
    class ToyConfig(ExperimentConfig):
        model: ToyModelConfig = field(default_factory=ToyModelConfig)
        data: ToyDataConfig = field(default_factory=ToyDataConfig)

A YAML file under ``configs/<method>/<dataset>.yaml`` names the method (``method: toy``) and sets any
subset of the fields; ``apply_overrides(cfg, ["optim.lr=1e-3", "train.max_steps=10"])`` changes nested
fields from the command line. Values are type-checked against the annotations (``Optional``,
``Literal``, ``tuple``, ``list``, ``dict``, nested dataclasses): an unknown key is an error that lists
the closest valid names, a wrong type names the key and the expected type.

YAML is read with 1.2 scalars: ``no``/``yes``/``on``/``off`` stay strings (``mixed_precision: no``) and
``1e-3`` is a float, as a reader of the file expects.
"""
from __future__ import annotations

import copy
import functools
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, TypeVar, Union

import yaml

from cmgen.errors import UserError

__all__ = [
    "ConfigError",
    "validate",
    "RunConfig",
    "TrainConfig",
    "OptimConfig",
    "ScheduleConfig",
    "EMAConfig",
    "ExperimentConfig",
    "from_dict",
    "to_dict",
    "from_yaml",
    "to_yaml",
    "load_yaml",
    "apply_overrides",
    "flat_keys",
]

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override does not match the config dataclass (the message names the file,
    line and column, or the key, and what was expected)."""


# --------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Where a run lives and how it starts.

    ``resume``: ``None`` (fresh run; an error if the run already has checkpoints), ``"latest"`` (newest
    complete checkpoint of this run, or a fresh start when there is none) or a checkpoint directory.
    """

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    resume: Optional[str] = None


@dataclass
class TrainConfig:
    """The training loop.

    ``batch_size`` is the GLOBAL batch of one optimizer step; each process gets
    ``batch_size / (world_size * grad_accum)`` samples per micro-batch (an error if not divisible).
    ``*_every`` count optimizer steps; 0 turns the hook off. ``keep_last=None`` keeps every checkpoint.
    ``data_seeding``: how random augmentation is seeded (:mod:`cmgen.engine.data`); ``"sample"``
    (default) makes it independent of the number of processes, workers and resume point, so 1 process
    and N processes see the same augmented global batch; ``"batch"`` only of workers and resumes.

    Scale-out and devices: ``collective_timeout_s`` bounds how long a rank waits in a collective for a
    dead or hung peer before it fails (process-group timeout). ``pin_memory`` (None = on CUDA) pins
    loader batches, which are then copied with ``non_blocking=True``. ``tf32`` allows TF32 matmuls and
    convolutions on Ampere+ GPUs. ``channels_last`` stores the 4-D weights of 2-D conv models (and 4-D
    float batch tensors) as NHWC; models with 5-D weights (video) stay as they are. ``compile`` wraps
    every model's forward in ``torch.compile`` (``compile_backend``, ``compile_mode``) in place, so
    state dicts and checkpoints keep their keys.
    """

    max_steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_clip: Optional[float] = None
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: Optional[int] = 3
    sample_every: int = 0
    eval_every: int = 0
    num_workers: int = 0
    shuffle: bool = True
    data_seeding: Literal["batch", "sample", "off"] = "sample"
    cpu: bool = False
    find_unused_parameters: bool = False
    progress_bar: bool = True
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    collective_timeout_s: float = 1800.0
    pin_memory: Optional[bool] = None
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: Optional[str] = None


@dataclass
class OptimConfig:
    """One optimizer; methods with several (G and D) add more sections of this type."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    """LR multiplier per optimizer step: linear warm-up, then constant, cosine or step decay."""

    kind: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class EMAConfig:
    """Exponential moving averages of the named models (e.g. ``models: [g]`` for a GAN generator).

    ``buffers``: ``"average"`` (default) averages floating-point buffers (BN running statistics) with the
    same decay, as StudioGAN's ``Ema``; ``"copy"`` copies them (``EmaStylegan2``). See :class:`cmgen.engine.EMA`.
    """

    models: list[str] = field(default_factory=list)
    decay: float = 0.999
    start_step: int = 0
    buffers: Literal["average", "copy"] = "average"


@dataclass
class ExperimentConfig:
    """Base of every method config. ``method`` selects the method in :mod:`cmgen.engine.registry`."""

    method: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    # Short override names accepted on the command line (``resume=latest``).
    ALIASES: ClassVar[dict[str, str]] = {
        "resume": "run.resume",
        "name": "run.name",
        "seed": "run.seed",
        "output_dir": "run.output_dir",
    }


# --------------------------------------------------------------------------------------------------
# YAML 1.2 scalars
# --------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text_or_path: str | Path) -> Any:
    """Parse YAML text, or the file at a path, with YAML 1.2 booleans and floats.

    Malformed YAML raises :class:`ConfigError` ``"<file>:<line>:<column>: <problem>"`` (1-based, as
    editors count); a missing file raises ``FileNotFoundError`` naming it.
    """
    where = "<text>"
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                          and text_or_path.endswith((".yaml", ".yml"))):
        where = str(text_or_path)
        try:
            text_or_path = Path(text_or_path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {where} not found") from None
        except (IsADirectoryError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: not a readable YAML text file ({e})") from None
    try:
        return yaml.load(text_or_path, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}:{_yaml_error_line(e)}") from e


def _yaml_error_line(err: yaml.YAMLError) -> str:
    """``"line:column: problem (context at line:column)"`` of a PyYAML error, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    head = f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else " "
    if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"{head}invalid YAML: {problem}"


# --------------------------------------------------------------------------------------------------
# Type checking
# --------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, root: type | None = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} "
                           f"({type(value).__name__}){extra}")

    if tp is Any:
        return value
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise fail(" (a mapping of its fields)")
        return _from_dict(tp, value, key, root)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, root)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f" (length {len(args)})")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        if not args:
            return dict(value)
        return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail()
    raise ConfigError(f"config key '{key}' has an unsupported annotation {tp!r}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in fields(cls)}


def flat_keys(cls_or_cfg: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a config dataclass (``['method', 'run', 'run.name', ...]``)."""
    cls = cls_or_cfg if isinstance(cls_or_cfg, type) else type(cls_or_cfg)
    out = []
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        out.append(path)
        section = _optional_section(tp)
        if section is not None:
            out.extend(flat_keys(section, path + "."))
    return out


def _unknown_key(key: str, cls: type, root: type | None, section: str = "") -> ConfigError:
    """Error for ``key`` (full dotted path); ``cls`` is the section (``section``) where lookup failed."""
    local = list(_hints(cls))
    candidates = [k for k in flat_keys(root) if k.count(".") == key.count(".")] if root is not None else []
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:
        leaf = key[len(section) + 1:].split(".")[0] if section else key.split(".")[0]
        close = [f"{section}.{c}" if section else c for c in difflib.get_close_matches(leaf, local, n=3, cutoff=0.5)]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = f" in '{section}'" if section else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys{where}: {', '.join(local)})")


def _from_dict(cls: type[T], data: dict, prefix: str = "", root: type | None = None) -> T:
    root = root or cls
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            raise _unknown_key(path, cls, root, prefix)
        kwargs[k] = _convert(v, hints[k], path, root)
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict | None) -> T:
    """Build the dataclass ``cls`` from a nested dict, checking keys and types."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} config must be a mapping, got {data!r}")
    return _from_dict(cls, data)


def to_dict(cfg: Any) -> Any:
    """Nested plain dict/list/scalar form of a config (tuples become lists, as YAML writes them)."""
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Any, path: str | Path | None = None) -> str:
    """YAML text of the config, also written to ``path`` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text


def from_yaml(cls: type[T], text_or_path: str | Path) -> T:
    """Build ``cls`` from YAML text or a YAML file."""
    return from_dict(cls, load_yaml(text_or_path))


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (nested keys joined by dots).

    Values are parsed as YAML (``train.grad_clip=null``, ``optim.betas=[0.5,0.999]``); a field typed
    ``str`` keeps the raw text (``run.name=123``). A key inside an optional section that is off (None,
    e.g. ``gan.d_optim.lr=2e-3``) first creates the section: a copy of the section the config class names
    in ``OPTIONAL_SECTION_SEEDS`` (``{"gan.d_optim": "optim"}``: D's optimizer starts as G's, as it
    behaves while it is None) as it stands when that override is applied (overrides apply left to
    right: put ``optim.*`` first to carry it into the copy), else the section's defaults.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        try:
            _apply_override(cfg, item)
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    try:
        return validate(cfg)
    except ConfigError as e:   # name the override that set the value, if one did
        aliases = getattr(type(cfg), "ALIASES", {})
        keys = [o.split("=", 1)[0].strip() for o in overrides]
        setters = [o for o, k in zip(overrides, keys) if aliases.get(k, k) == getattr(e, "key", None)]
        if setters:
            raise ConfigError(f"override {setters[-1]!r}: {e}") from None
        raise


def _optional_section(tp: Any) -> type | None:
    """The dataclass of a section annotation, plain (``OptimConfig``) or optional
    (``Optional[OptimConfig]``); None for a value annotation."""
    if is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and is_dataclass(args[0]):
            return args[0]
    return None


def _get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _apply_override(cfg: Any, item: str) -> None:
    """Set one ``key=value`` in place (errors are prefixed with the override by the caller)."""
    aliases = getattr(type(cfg), "ALIASES", {})
    if "=" not in item:
        raise ConfigError("not of the form key=value (e.g. optim.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = aliases.get(key.strip(), key.strip())
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        path = ".".join(parts[:depth + 1])
        hints = _hints(type(node))
        if part not in hints:
            raise _unknown_key(key, type(node), type(cfg), ".".join(parts[:depth]))
        tp = hints[part]
        if depth < len(parts) - 1:
            section = _optional_section(tp)
            if section is None:
                raise ConfigError(f"config key '{path}' is a {_type_name(tp)}, not a section; "
                                  f"cannot set '{key}'")
            if getattr(node, part) is None:         # an optional section that is off: create it first
                seed = getattr(type(cfg), "OPTIONAL_SECTION_SEEDS", {}).get(path)
                setattr(node, part, copy.deepcopy(_get_dotted(cfg, seed)) if seed else section())
            node = getattr(node, part)
            continue
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except ConfigError:
            if not _accepts_str(tp):
                raise ConfigError(f"the value {raw!r} is not valid YAML") from None
            value = raw
        if _accepts_str(tp) and value is not None and not isinstance(value, str):
            value = raw
        setattr(node, part, _convert(value, tp, path, type(cfg)))


# --------------------------------------------------------------------------------------------------
# Value ranges of the shared sections
# --------------------------------------------------------------------------------------------------
def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: v >= low), f">= {low}"


_POSITIVE = ((lambda v: v > 0), "> 0")
_UNIT = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_RANGES: dict[type, dict[str, tuple[Any, str]]] = {
    RunConfig: {"name": ((lambda v: v.strip() not in ("", ".", "..")), "a non-empty folder name")},
    TrainConfig: {
        "max_steps": _at_least(1), "batch_size": _at_least(1), "grad_accum": _at_least(1),
        "log_every": _at_least(1), "checkpoint_every": _at_least(0), "sample_every": _at_least(0),
        "eval_every": _at_least(0), "num_workers": _at_least(0),
        "keep_last": ((lambda v: v is None or v >= 1), ">= 1 or null (keep every checkpoint)"),
        "grad_clip": ((lambda v: v is None or v > 0), "> 0 or null (no clipping)"),
        "collective_timeout_s": _POSITIVE,
    },
    OptimConfig: {
        "lr": _at_least(0), "eps": _POSITIVE, "weight_decay": _at_least(0), "momentum": _UNIT,
        "betas": ((lambda v: all(0 <= b < 1 for b in v)), "two numbers in [0, 1)"),
    },
    ScheduleConfig: {
        "warmup_steps": _at_least(0), "gamma": _POSITIVE, "min_lr_ratio": _UNIT,
        "milestones": ((lambda v: all(m >= 1 for m in v) and list(v) == sorted(set(v))),
                       "increasing steps >= 1"),
    },
    EMAConfig: {"decay": _UNIT, "start_step": _at_least(0)},
}


def validate(cfg: T, prefix: str = "") -> T:
    """Check the value ranges of every shared section in ``cfg`` (also nested ones, like a second
    ``optim_g: OptimConfig``); returns ``cfg``. ``apply_overrides`` (so every ``load_config``) and
    ``train`` call it, so ``cmgen train --print-config`` refuses ``train.batch_size=-4`` too.

    Raises:
        ConfigError: ``"config key 'train.batch_size' must be >= 1, got -4"``.
    """
    if not is_dataclass(cfg) or isinstance(cfg, type):
        return cfg
    checks = next((c for cls, c in _RANGES.items() if isinstance(cfg, cls)), {})
    for f in fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if f.name in checks:
            ok, expected = checks[f.name]
            if not ok(value):
                err = ConfigError(f"config key '{key}' must be {expected}, got {value!r}")
                err.key = key
                raise err
        if is_dataclass(value):
            validate(value, key + ".")
    return cfg


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-exported for callers that build configs in code."""
    return dataclasses.replace(cfg, **changes)

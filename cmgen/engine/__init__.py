"""The training engine: one Accelerate loop for every method, with exact checkpoint/resume.

``train(cfg)`` runs a method config; ``Method`` is what a method implements; ``StepContext`` is what
its ``train_step`` receives. See :mod:`cmgen.engine.trainer` for the loop.
"""
from cmgen.engine.checkpoint import latest_checkpoint, list_checkpoints, load_ema_state, load_model_state
from cmgen.engine.ema import EMA
from cmgen.engine.method import Method, StepContext
from cmgen.engine.registry import METHODS, load_config, register_method, resolve_method
from cmgen.engine.schedules import LRMultiplier, build_optimizer, build_scheduler
from cmgen.engine.trainer import NonFiniteLossError, TrainResult, preserve_rng, run_dir_of, train

__all__ = [
    "EMA", "LRMultiplier", "METHODS", "Method", "NonFiniteLossError", "StepContext", "TrainResult",
    "build_optimizer", "build_scheduler", "latest_checkpoint", "list_checkpoints", "load_config",
    "load_ema_state", "load_model_state", "preserve_rng", "register_method", "resolve_method",
    "run_dir_of", "train",
]

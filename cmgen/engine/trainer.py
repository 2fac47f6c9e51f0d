"""The one training loop, on Accelerate.

``train(cfg)`` builds the method named by ``cfg.method``, then for ``step = start .. max_steps-1``:
draws ``grad_accum`` micro-batches, calls ``method.train_step`` on each inside
``accelerator.accumulate`` (DDP gradient sync only on the last), guards every returned loss term
against NaN/Inf (all ranks agree before anyone stops), steps the LR schedules once, updates the EMAs,
and runs the logging, evaluation, sampling and checkpoint hooks. Everything a resume needs is in the
checkpoint, so ``resume=latest`` continues bit for bit (see :mod:`cmgen.engine.checkpoint` and
:mod:`cmgen.engine.data`). In a multi-process run, a collective that fails because a peer hung past
``train.collective_timeout_s`` or died becomes a one-line :class:`cmgen.errors.CollectiveError`
(:mod:`cmgen.engine.collective`).

Run directory: ``{output_dir}/{name}/{config.yaml, checkpoints/, samples/, logs/, metrics.jsonl}``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration,
                               send_to_device, set_seed)
from torch import nn
from tqdm.auto import tqdm

from cmgen.config import ConfigError, ExperimentConfig, load_yaml, to_yaml, validate
from cmgen.distributed import all_reduce_mean
from cmgen.engine.best import BestTracker
from cmgen.engine.collective import StepBeacon, collective_message, is_collective_failure, is_timeout
from cmgen.engine.checkpoint import (clean_temporary, latest_checkpoint, list_checkpoints, read_engine_state,
                                     save_checkpoint, STATE_FILE)
from cmgen.engine.data import ResumableLoader, mix_seed
from cmgen.engine.ema import EMA
from cmgen.engine.method import Method, StepContext
from cmgen.engine.probe import StepProbe
from cmgen.engine.registry import resolve_method
from cmgen.engine.resume import HyperSnapshot, classify_changes, describe
from cmgen.errors import CheckpointError, CollectiveError
from cmgen.engine.schedules import build_scheduler

__all__ = ["NonFiniteLossError", "TrainResult", "train", "run_dir_of", "preserve_rng"]


class NonFiniteLossError(RuntimeError):
    """A loss term (or, before a checkpoint, a parameter) became NaN or Inf; the run stopped."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


@contextlib.contextmanager
def preserve_rng(device: torch.device | None = None):
    """Run a block (sampling, evaluation) without changing the training RNG streams."""
    cuda = device is not None and device.type == "cuda"
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
             torch.cuda.get_rng_state(device) if cuda else None)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
        if cuda:
            torch.cuda.set_rng_state(saved[3], device)


def _use_cpu(cfg: ExperimentConfig) -> bool:
    """Accelerate only sets up multi-process gloo (MULTI_CPU) when told it runs on CPU; a torchrun or
    ``accelerate launch`` job on a machine without CUDA must therefore say so itself."""
    if cfg.train.cpu:
        return True
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    return multi_process and not torch.cuda.is_available()


def train(cfg: ExperimentConfig, method_cls: type[Method] | None = None) -> TrainResult:
    """Train ``cfg`` (a method config) and return where it ended. Call on every process."""
    validate(cfg)
    method_cls = method_cls or resolve_method(cfg.method)
    run_dir = run_dir_of(cfg)
    owned_group = not (dist.is_available() and dist.is_initialized())
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        cpu=_use_cpu(cfg),
        log_with=list(cfg.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # The process-group timeout bounds every collective: a rank whose peer died or hangs fails
        # after collective_timeout_s instead of waiting forever (the launcher then stops the rest).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
        step_scheduler_with_optimizer=False,
    )
    trainer = None
    try:
        trainer = _Trainer(cfg, method_cls, accelerator, run_dir)
        return trainer.fit()
    except RuntimeError as err:
        if accelerator.num_processes > 1 and not isinstance(err, NonFiniteLossError) and is_collective_failure(err):
            step, beacon = getattr(trainer, "step", None), getattr(trainer, "beacon", None)
            behind = beacon.behind() if beacon is not None and is_timeout(err) else []
            raise CollectiveError(collective_message(err, cfg.train.collective_timeout_s, accelerator.process_index,
                                                     accelerator.num_processes, step, behind)) from err
        raise
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
        # Accelerate keeps process-wide singletons; clear them so a later run in this process (tests,
        # `cmgen demo`) may choose another precision or accumulation. A process group that existed
        # before this run belongs to the caller and stays; one Accelerate created is torn down.
        owned_group = owned_group and dist.is_available() and dist.is_initialized()
        if owned_group:
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=owned_group)
        GradientState._reset_state()


def _channels_last(batch: Any) -> Any:
    """4-D floating-point tensors of a batch (images) in channels_last memory format."""
    if torch.is_tensor(batch):
        if batch.dim() == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: _channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_channels_last(v) for v in batch)
    return batch


class _Trainer:
    def __init__(self, cfg: ExperimentConfig, method_cls: type[Method], accelerator: Accelerator, run_dir: Path):
        self.cfg, self.acc, self.run_dir = cfg, accelerator, run_dir
        self.ckpt_root = run_dir / "checkpoints"
        world, accum, batch = accelerator.num_processes, cfg.train.grad_accum, cfg.train.batch_size
        if batch % (world * accum):
            raise ValueError(f"train.batch_size={batch} (global) must be divisible by world_size * grad_accum "
                             f"= {world} * {accum}")
        self.method_cls = method_cls
        self.last_checkpoint: Path | None = None

    # ---------------------------------------------------------------------------------------------
    def _find_resume(self) -> Path | None:
        resume = self.cfg.run.resume
        if resume is None:
            existing = list_checkpoints(self.ckpt_root)
            if existing:
                raise ConfigError(f"{self.run_dir} already has checkpoints (newest {existing[-1][1].name}); "
                                  f"pass resume=latest to continue it or choose another run.name")
            return None
        if resume == "latest":
            return latest_checkpoint(self.ckpt_root)
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"run.resume={resume!r} is not a complete checkpoint directory (no {STATE_FILE})")
        return path

    def _setup(self) -> None:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_temporary(self.ckpt_root)
        acc.wait_for_everyone()
        resume_from = self._find_resume()

        # Same seed on every process for model construction (identical initial weights).
        set_seed(cfg.run.seed)
        self.method = self.method_cls(cfg)
        models = self.method.build_models(cfg)
        if not isinstance(models, dict) or not models or not all(isinstance(m, nn.Module) for m in models.values()):
            raise ValueError(f"build_models must return a non-empty dict of nn.Module, got {models!r}")
        self._device_options(models)
        optimizers = self.method.build_optimizers(cfg, models)
        schedulers = {n: build_scheduler(opt, cfg.schedule, cfg.train.max_steps) for n, opt in optimizers.items()}
        dataset = self.method.build_dataset(cfg)

        # Trainable models go through prepare (device, DDP, autocast); frozen ones (momentum encoders
        # kept as separate models, pretrained text encoders) are only moved and checkpointed as state.
        trainable = [n for n, m in models.items() if any(p.requires_grad for p in m.parameters())]
        frozen = [n for n in models if n not in trainable]
        opt_names = list(optimizers)
        prepared = acc.prepare(*[models[n] for n in trainable], *[optimizers[n] for n in opt_names])
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self.models = {n: prepared[i] for i, n in enumerate(trainable)}
        for n in frozen:
            self.models[n] = models[n].to(acc.device)
        self.models = {n: self.models[n] for n in models}
        self.optimizers = {n: prepared[len(trainable) + i] for i, n in enumerate(opt_names)}
        self.schedulers = schedulers
        self.trainable = trainable

        for n in cfg.ema.models:
            if n not in models:
                raise ValueError(f"ema.models names {n!r}, but the method's models are {list(models)}")
        self.ema = {n: EMA(acc.unwrap_model(self.models[n]), cfg.ema.decay, cfg.ema.start_step,
                         cfg.ema.buffers).to(acc.device)
                    for n in cfg.ema.models}
        if cfg.train.compile:
            # In place (nn.Module.compile): DDP wrappers, EMA copies and state-dict keys are unchanged.
            for m in models.values():
                m.compile(backend=cfg.train.compile_backend, mode=cfg.train.compile_mode)

        custom: list[tuple[str, Any]] = [(f"scheduler/{n}", s) for n, s in schedulers.items()]
        custom += [(f"ema/{n}", e) for n, e in self.ema.items()]
        custom += [(f"frozen/{n}", self.models[n]) for n in frozen]
        extra = self.method.extra_state()
        custom += [(f"method/{k}", v) for k, v in extra.items()]
        if custom:
            acc.register_for_checkpointing(*[obj for _, obj in custom])
        self.custom_names = [n for n, _ in custom]

        self.ctx = StepContext(acc, cfg, {n: self.models[n] for n in models}, self.optimizers,
                               {n: e.module for n, e in self.ema.items()})
        self.loader = ResumableLoader(dataset, cfg.train.batch_size // cfg.train.grad_accum, acc.process_index,
                                      acc.num_processes, cfg.run.seed, cfg.train.num_workers, self.method.collate_fn(),
                                      cfg.train.shuffle, pin_memory=self._pin_memory(),
                                      seeding=cfg.train.data_seeding)
        self.step = 0
        self.resume_note = ""
        if resume_from is not None:
            state = read_engine_state(resume_from)
            applied = self._check_resume(resume_from, state)
            expected = {"models": trainable, "optimizers": opt_names, "custom": self.custom_names}
            for key, names in expected.items():
                if state[key] != names:
                    raise CheckpointError(f"{resume_from} holds {key} {state[key]}, this run builds {names}")
            fresh = HyperSnapshot(self.optimizers, schedulers, self.ema)
            try:
                acc.load_state(str(resume_from))  # also restores every process's RNG state
            except (RuntimeError, KeyError, ValueError) as e:
                raise CheckpointError(f"{resume_from} does not fit the models this config builds: "
                                      f"{str(e).strip().splitlines()[0]}") from e
            if applied:
                fresh.restore(self.optimizers, schedulers, self.ema)
            self.step = int(state["step"])
            self.loader.load_state_dict(state["data"])
            self.ctx.amp_skipped = {k: int(v) for k, v in state.get("amp_skipped", {}).items()}
            self._rescale_note(resume_from, int(state.get("world_size", acc.num_processes)))
            self.last_checkpoint = resume_from
        else:
            # Per-process training randomness (noise, dropout) must differ between ranks.
            set_seed(cfg.run.seed, device_specific=True)
        self.resumed_from = resume_from
        self.probe = StepProbe.from_env(acc.process_index, acc.num_processes)
        self.beacon = StepBeacon(acc.process_index, acc.num_processes)

        self.config_yaml = to_yaml(cfg)
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(self.resume_note + self.config_yaml)
            for sub in ("checkpoints", "samples", "logs"):
                (self.run_dir / sub).mkdir(exist_ok=True)
            self._truncate_metrics(self.step)
        if cfg.train.trackers:
            acc.init_trackers("tensorboard" if "tensorboard" in cfg.train.trackers else cfg.run.name)

    def _check_resume(self, ckpt: Path, state: dict) -> list:
        """Refuse a checkpoint of another method or config changes it cannot honour; print what resumes
        and what changed (rank 0); return the applied changes (:mod:`cmgen.engine.resume`)."""
        cfg = self.cfg
        saved_method = state.get("method")
        if saved_method is not None and saved_method != cfg.method:
            raise CheckpointError(f"{ckpt} was written by method {saved_method!r}; this config trains "
                                  f"{cfg.method!r}")
        saved_path = ckpt / "config.yaml"
        saved = load_yaml(saved_path) if saved_path.is_file() else None
        if not isinstance(saved, dict):
            ignored, applied, refused, unknown = [], [], [], []
        else:
            ignored, applied, refused, unknown = classify_changes(saved, cfg)
        step = int(state["step"])
        if refused:
            raise CheckpointError(
                f"cannot resume {ckpt} (step {step}) with these changes to its config: {describe(refused)}; "
                f"its state was built with the old values: drop those overrides, or start a new run "
                f"(another run.name)")
        if self.acc.is_main_process:
            print(f"cmgen train: resumed from step {step} ({ckpt})", flush=True)
            if applied:
                print(f"cmgen train: applied from step {step} on: {describe(applied)} (optimizer and schedule "
                      f"as this config builds them, evaluated at step {step})", flush=True)
            if ignored:
                print(f"cmgen train: also changed: {describe(ignored)}", flush=True)
            if unknown:
                print(f"cmgen train: note: the checkpoint's config has keys this version does not know: "
                      f"{', '.join(unknown)}", flush=True)
            if step >= cfg.train.max_steps:
                print(f"cmgen train: step {step} >= train.max_steps={cfg.train.max_steps}: nothing to train",
                      flush=True)
        changed = [c.key for c in applied + ignored]
        self.resume_note = (f"# resumed at step {step} from {ckpt}" + (f"; changed: {', '.join(changed)}" if changed
                                                                      else "") + "\n")
        return applied

    def _pin_memory(self) -> bool:
        pin = self.cfg.train.pin_memory
        return self.acc.device.type == "cuda" if pin is None else bool(pin)

    def _device_options(self, models: dict[str, nn.Module]) -> None:
        """``train.tf32`` (CUDA matmul + cuDNN) and ``train.channels_last`` (models without 5-D tensors)."""
        tc = self.cfg.train
        if self.acc.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tc.tf32
            torch.backends.cudnn.allow_tf32 = tc.tf32
        if tc.channels_last:
            for m in models.values():
                tensors = [*m.parameters(), *m.buffers()]
                if any(t.dim() == 4 for t in tensors) and not any(t.dim() == 5 for t in tensors):
                    m.to(memory_format=torch.channels_last)

    def _rescale_note(self, ckpt: Path, saved_world: int) -> None:
        """Resuming at another number of processes works; this is what changes (printed on rank 0).

        Carried over exactly: models (with queues and BN statistics), optimizers, schedules, EMA,
        method state and the data position, which is stored in samples into the epoch (the global batch
        is the same for any world size). Not carried over: the per-process RNG streams (random_states_r
        exist for the old ranks only). Every process is therefore re-seeded from (run.seed, step, rank),
        so noise drawn in ``train_step`` (GAN z, dropout, ``model.input_noise``) differs from what either
        the old or an uninterrupted new-size run would draw. Augmentation inside the dataset continues
        identically with ``train.data_seeding=sample`` (the default) and changes with ``batch``.
        """
        world = self.acc.num_processes
        if saved_world == world:
            return
        set_seed(mix_seed(self.cfg.run.seed, self.step, 3) % 2**31, device_specific=True)
        if self.acc.is_main_process:
            augment = ("continues identically" if self.cfg.train.data_seeding == "sample"
                       else f"changes (train.data_seeding={self.cfg.train.data_seeding})")
            print(f"cmgen train: note: {ckpt} was written by {saved_world} process(es), resuming with {world}: "
                  f"weights, optimizer, schedule, queues and data position carry over; per-process random "
                  f"streams are re-seeded from (run.seed, step {self.step}, rank); dataset augmentation {augment}",
                  flush=True)

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop log lines the interrupted run wrote after its last checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------------------------------------
    def _guard(self, losses: dict[str, torch.Tensor], step: int) -> None:
        """Stop every rank if any rank's loss term is NaN/Inf (one small all-reduce per micro-batch)."""
        if not losses:
            return
        names = sorted(losses)
        vals = [losses[k].detach() for k in names]
        codes = torch.stack([torch.isnan(v).any().float() * 2 + torch.isinf(v).any().float() for v in vals])
        if dist.is_available() and dist.is_initialized() and self.acc.num_processes > 1:
            dist.all_reduce(codes, op=dist.ReduceOp.MAX)
        codes = codes.tolist()
        for name, code in zip(names, codes):
            if code > 0:
                kind = "nan" if code >= 2 else "inf"
                raise NonFiniteLossError(f"loss term '{name}' is {kind} at step {step}; last good checkpoint: "
                                         f"{self.last_checkpoint if self.last_checkpoint else 'none'}")

    def _check_params(self, step: int) -> None:
        for name, model in self.models.items():
            for pname, p in self.acc.unwrap_model(model).named_parameters():
                if not torch.isfinite(p).all():
                    raise NonFiniteLossError(
                        f"parameter '{name}.{pname}' is not finite after step {step}; no checkpoint written; "
                        f"last good checkpoint: {self.last_checkpoint if self.last_checkpoint else 'none'}")

    def _checkpoint(self, step: int) -> None:
        self._check_params(step)
        state = {"step": step, "data": self.loader.state_dict(), "models": self.trainable,
                 "optimizers": list(self.optimizers), "custom": self.custom_names,
                 "world_size": self.acc.num_processes, "method": self.cfg.method, "time": time.time(),
                 "amp_skipped": dict(self.ctx.amp_skipped)}
        fault = self.probe.checkpoint_fault(step) if self.probe is not None else None  # tests only
        self.last_checkpoint = save_checkpoint(self.acc, self.ckpt_root, step, state, self.config_yaml,
                                               self.cfg.train.keep_last, fault)

    def _set_train(self) -> None:
        for m in self.models.values():
            m.train()

    def _sample(self, step: int) -> None:
        with preserve_rng(self.acc.device), torch.no_grad():
            images = self.method.sample(self.ctx)
        self._set_train()
        if images is None or not self.acc.is_main_process:
            return
        import torchvision.utils as vutils
        if images.dim() != 4:
            raise ValueError(f"sample() must return images (N, C, H, W), got shape {tuple(images.shape)}")
        grid = vutils.make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=int(math.ceil(len(images) ** 0.5)))
        vutils.save_image(grid, self.run_dir / "samples" / f"step_{step:06d}.png")
        if "tensorboard" in self.cfg.train.trackers:
            self.acc.get_tracker("tensorboard", unwrap=True).add_image("samples", grid, step)

    def _evaluate(self, step: int) -> dict[str, float]:
        with preserve_rng(self.acc.device):
            metrics = {f"eval/{k}": float(v) for k, v in self.method.evaluate(self.ctx).items()}
        self._set_train()
        if metrics:
            self._log({"step": step, **metrics})
        return metrics

    def _log(self, record: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.cfg.train.trackers:
            self.acc.log(scalars, step=record["step"])

    # ---------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self._setup()
        cfg, acc, tc = self.cfg, self.acc, self.cfg.train
        best = BestTracker(self.ckpt_root, getattr(self.method, "best_metric", None))  # checkpoints/best
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=cfg.run.name, dynamic_ncols=True,
                   disable=not (acc.is_main_process and tc.progress_bar))
        sums: dict[str, torch.Tensor] = {}
        count, last_metrics = 0, {}
        t_last, s_last = time.perf_counter(), self.step
        batches = iter(self.loader)
        prepared_models = [self.models[n] for n in self.trainable]
        self._set_train()
        while self.step < tc.max_steps:
            step = self.step
            self.ctx.step_index = step
            self.beacon.started(step)
            for _ in range(tc.grad_accum):
                batch = send_to_device(next(batches), acc.device, non_blocking=True)
                if tc.channels_last:
                    batch = _channels_last(batch)
                with acc.accumulate(*prepared_models):
                    losses = self.method.train_step(batch, step, self.ctx)
                if not isinstance(losses, dict):
                    raise TypeError(f"train_step must return a dict of loss tensors, got {type(losses).__name__}")
                losses = {k: v if torch.is_tensor(v) else torch.tensor(float(v), device=acc.device)
                          for k, v in losses.items()}
                self._guard(losses, step)
                for k, v in losses.items():
                    v = v.detach().float().mean()
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
            for s in self.schedulers.values():
                s.step()
            self.step = done = step + 1
            for n, e in self.ema.items():
                e.update(acc.unwrap_model(self.models[n]), done)
            bar.update(1)

            if done % tc.log_every == 0 or done == tc.max_steps:
                names = sorted(sums)
                means = all_reduce_mean(torch.stack([sums[k] / count for k in names])).tolist() if names else []
                now = time.perf_counter()
                record = {"step": done, "epoch": self.loader.epoch, **dict(zip(names, means))}
                record.update({f"lr/{n}": opt.param_groups[0]["lr"] for n, opt in self.optimizers.items()})
                record.update({f"grad_norm/{n}": float(g) for n, g in self.ctx.grad_norms.items()})
                if acc.scaler is not None:  # fp16: updates skipped so far (inf/NaN gradients) and the scale
                    record.update({f"amp/skipped/{n}": self.ctx.amp_skipped.get(n, 0) for n in self.optimizers})
                    record["amp/scale"] = float(acc.scaler.get_scale())
                record["steps_per_sec"] = (done - s_last) / max(now - t_last, 1e-9)
                record["time"] = time.time()
                self._log(record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in zip(names, means)}, refresh=False)
                last_metrics = record
                sums, count, t_last, s_last = {}, 0, now, done
            best_due = False
            if tc.eval_every and done % tc.eval_every == 0:
                evaluated = self._evaluate(done)
                last_metrics = {**last_metrics, **evaluated}
                best_due = best.improved(evaluated)
            if tc.sample_every and done % tc.sample_every == 0:
                self._sample(done)
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.max_steps or best_due:
                self._checkpoint(done)
                if best_due:
                    best.mark(done, self.last_checkpoint, evaluated, acc.is_main_process)
            if self.probe is not None:  # tests only (cmgen.engine.probe): per-step dumps, injected faults
                self.probe.after_step(done, losses, {n: acc.unwrap_model(m) for n, m in self.models.items()},
                                      self.method.extra_state())
        bar.close()
        acc.wait_for_everyone()
        return TrainResult(self.run_dir, self.step, self.last_checkpoint, last_metrics)

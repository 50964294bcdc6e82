"""The one training loop both phases run (Appendix A): warm-up then StepLR, Adam steps, resume, finiteness
checks, progress, DVCLive logging and throughput. A phase supplies only its step and its validation.

Settings that change how a run executes but never what it computes (device, memory mode, validation
and checkpoint frequency, progress) are a separate :class:`RuntimeConfig`: they are not part of the
run's identity, so changing them neither invalidates a checkpoint nor re-runs a DVC stage.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vidtag.errors import CheckpointMismatchError, TrainingError
from vidtag.features.sequences import SequenceTable
from vidtag.progress import progress
from vidtag.seeding import seeded
from vidtag.train.batches import epoch_order
from vidtag.train.checkpoint import load_checkpoint, restore, save_checkpoint


@dataclass(frozen=True)
class RuntimeConfig:
    """How a run executes; results do not depend on any of it (params.yaml ``runtime:``, declared by no stage)."""

    device: str = "auto"  # auto = the CUDA device when there is one (vidtag.device)
    features_in_memory: str | bool = "auto"  # auto: resident on the device when they fit, else streamed by chunk
    feature_memory_gb: float | None = None  # budget for resident features; None = a share of free memory
    eval_every: int = 1  # epochs between validations (0 = only after the last epoch)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always writes one)
    eval_max_frames: int = 8192  # padded frames per validation forward pass
    backend: str = "auto"  # retrieval backend for validation (both are exact)
    progress: bool = True  # a bar on a terminal, periodic status lines in logs (vidtag.progress)


@dataclass(frozen=True)
class Schedule:
    """The optimisation schedule shared by both phases (Appendix A); each phase's config supplies it."""

    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    lr_gamma: float
    seed: int


@dataclass
class Phase:
    """What a phase plugs into :func:`run`: its modules, its step and its validation."""

    name: str  # "phase1" | "phase2": log prefix and checkpoint module name
    saved: nn.Module  # saved in checkpoints under ``name``
    trained: nn.Module  # put in train mode each epoch (a frozen part stays in eval mode)
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor], int]]
    # step(seq_idx (B,), generator) -> (loss, named loss parts, frames in the batch)
    validate: Callable[[], dict[str, float]] | None = None
    extra_metrics: Callable[[], dict[str, float]] = field(default=lambda: {})


def lr_at(base_lr: float, step: int, epoch: int, warmup_steps: int, gamma: float) -> float:
    """Linear warm-up over the first ``warmup_steps`` optimizer steps, times StepLR's gamma ** epoch."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return base_lr * warm * gamma**epoch


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """Every epoch draws from its own seeded generators, so a resumed run repeats an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 7919 + salt) % (2**63)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One update at learning rate ``lr`` (the schedule is a plain function, lr_at)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def check_finite(loss: torch.Tensor, where: str, ckpt_dir: Path) -> None:
    if not torch.isfinite(loss):
        kept = f"the last good checkpoint is kept at {ckpt_dir}" if ckpt_dir.exists() else "no checkpoint was written yet"
        raise TrainingError(f"{where}: loss is {loss.item()}; {kept}. Lower the learning rate or check the features for NaN/inf.")


def as_stored(run_config: dict[str, Any]) -> dict[str, Any]:
    """``run_config`` as it reads back from a checkpoint's JSON (tuples become lists), for comparison."""
    return json.loads(json.dumps(run_config))


def _comparable(train_cfg: dict[str, Any]) -> dict[str, Any]:
    """A train config less ``epochs``: a run may be extended, everything else must match to resume."""
    return {k: v for k, v in train_cfg.items() if k != "epochs"}


def resume(ckpt_dir: Path, device: torch.device, run_config: dict[str, Any], modules: dict[str, nn.Module],
           optimizer: torch.optim.Optimizer) -> tuple[int, int, dict[str, float], bool]:
    """(step, epoch, metrics, resumed) to continue from the checkpoint in ``ckpt_dir``, or a fresh start.

    Every part of ``run_config`` must equal the saved one (``train`` up to ``epochs``), else the
    checkpoint belongs to another run and CheckpointMismatchError says so.
    """
    ckpt = load_checkpoint(ckpt_dir, device)
    if ckpt is None:
        return 0, 0, {}, False
    saved = ckpt.state["config"]

    def view(cfg: dict[str, Any], key: str):
        return _comparable(cfg.get(key, {})) if key == "train" else cfg.get(key)

    differ = sorted(k for k in set(saved) | set(run_config) if view(saved, k) != view(run_config, k))
    if differ:
        raise CheckpointMismatchError(f"{ckpt_dir} was written with a different {', '.join(differ)}; delete it to start afresh")
    restore(ckpt, modules, optimizer)
    return ckpt.state["step"], ckpt.state["epoch"], ckpt.state.get("metrics", {}), True


def log_metrics(live, metrics: dict[str, float], prefix: str) -> None:
    """One DVCLive step of ``metrics`` under ``prefix/`` (non-finite values are left out)."""
    if live is None:
        return
    for k, v in metrics.items():
        if math.isfinite(v):
            live.log_metric(f"{prefix}/{k}", v)
    live.next_step()


def run(phase: Phase, train: SequenceTable, schedule: Schedule, runtime: RuntimeConfig, ckpt_dir: Path,
        run_config: dict[str, Any], device: torch.device, live=None) -> dict[str, float]:
    """Train ``phase`` for ``schedule.epochs`` over the sequences of ``train``, resuming from ``ckpt_dir``.

    Every epoch draws its batches and dropout from generators seeded by (seed, epoch), so a resumed run
    repeats an uninterrupted one; the caller's global RNG is left as it was.
    """
    ckpt_dir = Path(ckpt_dir)
    run_config = as_stored(run_config)
    modules = {phase.name: phase.saved}
    step, start_epoch, metrics, resumed = resume(ckpt_dir, device, run_config, modules, phase.optimizer)
    print(f"{phase.name}: train {train}, device {device}, from epoch {start_epoch} of {schedule.epochs}")
    with seeded(schedule.seed):
        for epoch in range(start_epoch, schedule.epochs):
            t0 = time.perf_counter()
            gen = torch.Generator(device=device).manual_seed(epoch_seed(schedule.seed, epoch))
            torch.manual_seed(epoch_seed(schedule.seed, epoch, salt=1))  # dropout
            phase.trained.train()
            batches = epoch_order(len(train), schedule.batch_size, gen, device)
            losses: list[torch.Tensor] = []
            parts: dict[str, list[torch.Tensor]] = {}
            frames = 0
            desc = f"{phase.name} epoch {epoch + 1}/{schedule.epochs}"
            for seq_idx in progress(batches, total=len(batches), desc=desc, unit="batch", enabled=runtime.progress):
                loss, loss_parts, n_frames = phase.step(seq_idx, gen)
                check_finite(loss, f"{phase.name} epoch {epoch + 1} step {step + 1}", ckpt_dir)
                optimizer_step(phase.optimizer, loss, lr_at(schedule.lr, step, epoch, schedule.warmup_steps, schedule.lr_gamma))
                step += 1
                frames += n_frames
                losses.append(loss.detach())
                for k, v in loss_parts.items():
                    parts.setdefault(k, []).append(v.detach())
            seconds = time.perf_counter() - t0
            metrics = {"train_loss": float(torch.stack(losses).mean()) if losses else float("nan")}
            metrics.update({f"train_loss_{k}": float(torch.stack(v).mean()) for k, v in parts.items()})
            metrics.update(phase.extra_metrics())
            metrics.update(lr=phase.optimizer.param_groups[0]["lr"], epoch_s=seconds, frames_per_s=frames / max(seconds, 1e-9))
            last = epoch + 1 == schedule.epochs
            if phase.validate is not None and ((runtime.eval_every and (epoch + 1) % runtime.eval_every == 0) or last):
                metrics.update({f"val_{k}": v for k, v in phase.validate().items()})
            log_metrics(live, metrics, phase.name)
            print(f"{desc} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            if last or (runtime.checkpoint_every and (epoch + 1) % runtime.checkpoint_every == 0):
                state = {"config": run_config, "step": step, "epoch": epoch + 1, "metrics": _finite(metrics), "complete": last}
                save_checkpoint(ckpt_dir, modules, phase.optimizer, state)
    if schedule.epochs == 0 and not resumed:
        # epochs=0 saves the untrained model: the baseline that "trained beats untrained" is measured
        # against, through the same pipeline.
        save_checkpoint(ckpt_dir, modules, phase.optimizer, {"config": run_config, "step": 0, "epoch": 0, "metrics": {}, "complete": True})
    return metrics


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def schedule_of(cfg) -> Schedule:
    """The :class:`Schedule` fields of a phase config."""
    return Schedule(**{k: getattr(cfg, k) for k in Schedule.__dataclass_fields__})

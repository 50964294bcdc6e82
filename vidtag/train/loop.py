"""The one training loop both phases run (Appendix A): warm-up then StepLR, Adam steps, resume, finiteness
checks, progress, DVCLive logging and throughput. A phase supplies only its step and its validation.

Settings that change how a run executes but never what it computes (device, memory mode, validation
and checkpoint frequency, compilation, progress) are a separate :class:`RuntimeConfig`: they are not part
of the run's identity, so changing them neither invalidates a checkpoint nor re-runs a DVC stage.

Built so a GPU is never kept waiting by the host: no host sync per step (losses stay on the device and
are checked for finiteness every ``check_every`` steps; the epoch's batch indices are copied to the host
once, so a step knows its frame count without asking the device), fused Adam on CUDA, an optional
``torch.compile``, and checkpoints written by a background thread from a CPU snapshot.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vidtag.errors import CheckpointMismatchError, TrainingError
from vidtag.features.sequences import SequenceTable
from vidtag.progress import clock, progress
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
    checkpoint_every: int = 1  # epochs between checkpoints (0 = none by count; the last epoch always writes one)
    checkpoint_minutes: float = 0.0  # also checkpoint at an epoch's end once this many minutes passed since the
    # last one (0 = off): on a GPU an epoch takes seconds, and a checkpoint per epoch would cost more than it saves
    check_every: int = 100  # optimizer steps between finiteness checks of the loss, each one host sync (epoch
    # ends and checkpoints always check, so a checkpoint never holds a non-finite step)
    compile: bool = False  # torch.compile the trained modules' forward (the first steps pay for compiling)
    eval_max_frames: int = 8192  # padded frames per validation forward pass
    backend: str = "auto"  # retrieval backend for validation (both are exact)
    progress: bool = True  # a bar on a terminal, periodic status lines in logs (vidtag.progress)
    deterministic: bool = True  # torch's deterministic kernels: with 2+ CPU threads some backward passes
    # (Phase II's) otherwise sum in a run-dependent order, and a fresh clone would not reproduce the weights

    def __post_init__(self):
        if self.check_every < 1:
            raise TrainingError(f"runtime.check_every must be >= 1 step; found {self.check_every}")
        if self.checkpoint_every < 0 or not math.isfinite(self.checkpoint_minutes) or self.checkpoint_minutes < 0:
            raise TrainingError("runtime.checkpoint_every and runtime.checkpoint_minutes must be >= 0")


@dataclass(frozen=True)
class Schedule:
    """The optimisation schedule shared by both phases (Appendix A); each phase's config supplies it."""

    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    lr_gamma: float
    seed: int


@dataclass(frozen=True)
class Batch:
    """The sequences of one step: their indices on the training device, and the same indices on the host
    (copied once per epoch), so a step can size its tensors without a host sync."""

    seq_idx: torch.Tensor  # (B,) int64 on the training device
    seq_idx_host: np.ndarray  # (B,) int64, the same indices on the host


@dataclass
class Phase:
    """What a phase plugs into :func:`run`: its modules, its step and its validation."""

    name: str  # "phase1" | "phase2": log prefix and checkpoint module name
    saved: nn.Module  # saved in checkpoints under ``name``
    trained: nn.Module  # put in train mode each epoch (a frozen part stays in eval mode)
    optimizer: torch.optim.Optimizer
    step: Callable[[Batch, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor], int]]
    # step(batch, generator) -> (loss, named loss parts, frames in the batch as a host int)
    validate: Callable[[], dict[str, float]] | None = None
    extra_metrics: Callable[[], dict[str, float]] = field(default=lambda: {})


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam as both phases use it: fused into one kernel per step on CUDA (many small kernels otherwise
    keep a GPU waiting on the host); on the CPU the default implementation, so CPU runs reproduce."""
    return torch.optim.Adam(params, lr=lr, fused=True if torch.device(device).type == "cuda" else None)


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast of the models' forward on ``device`` (CPU autocast works too); off: a no-op. Losses are
    computed outside it, in fp32: a logit scale of up to 100 would magnify bf16's rounding."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(bf16))


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` when enabled (dynamic shapes: the valid-frame count changes every step),
    else the module itself. The compiled wrapper shares the module's parameters; checkpoints save the module."""
    return torch.compile(module, dynamic=True) if enabled else module


def valid_positions(pad: torch.Tensor, n_valid: int) -> torch.Tensor:
    """Flat positions (n_valid,) of the False entries of ``pad`` (B, T), in order: ``x.flatten(0, 1)[pos]``
    equals ``x[~pad]`` bit for bit, without the host sync boolean indexing needs to size its result
    (``n_valid`` is known on the host from the sequences' lengths)."""
    return torch.argsort(pad.flatten().to(torch.int8), stable=True)[:n_valid]


def frames_in_batch(lengths_host: np.ndarray, seq_idx_host: np.ndarray, seq_len: int) -> int:
    """Valid frames of a batch sampled by ``batches.sample_frames``: min(length, seq_len) per sequence, from
    host copies of the lengths and indices."""
    return int(np.minimum(lengths_host[seq_idx_host], seq_len).sum())


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


def check_finite(losses: list[torch.Tensor], first_step: int, where: str, ckpt_dir: Path) -> None:
    """Raise at the first non-finite loss of ``losses`` (0-d device tensors of steps ``first_step``, ...): one host sync."""
    if not losses:
        return
    window = torch.stack(losses)  # (n,)
    bad = ~torch.isfinite(window)
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0, 0])
        kept = f"the last good checkpoint is kept at {ckpt_dir}" if ckpt_dir.exists() else "no checkpoint was written yet"
        raise TrainingError(f"{where} step {first_step + j + 1}: loss is {float(window[j])}; {kept}. Lower the learning "
                            "rate or check the features for NaN/inf.")


class _Frozen:
    """A state dict captured at one moment, standing in for a module or optimizer when it is saved."""

    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


def _cpu_copy(x):
    """``x`` (nested dicts/lists of tensors and plain values) with every tensor copied to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _cpu_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu_copy(v) for v in x)
    return x


class CheckpointWriter:
    """Checkpoints written by a background thread from a CPU snapshot, one at a time: the loop waits only for
    the copy off the device, never for the disk. A failed write is raised at the next write or at :meth:`wait`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, directory: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
              state: dict[str, Any]) -> None:
        self.wait()
        frozen = {name: _Frozen(_cpu_copy(m.state_dict())) for name, m in modules.items()}
        opt = None if optimizer is None else _Frozen(_cpu_copy(optimizer.state_dict()))

        def work():
            try:
                save_checkpoint(directory, frozen, opt, state)
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread
                self._error = e

        self._thread = threading.Thread(target=work, name="vidtag-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        """Until the pending write is on disk; raises its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def as_stored(run_config: dict[str, Any]) -> dict[str, Any]:
    """``run_config`` as it reads back from a checkpoint's JSON (tuples become lists), for comparison."""
    return json.loads(json.dumps(run_config))


# Training options added after checkpoints were first written, at the value that reproduces the runs before
# them: a checkpoint that does not name one was written with it at this value.
ADDED_TRAIN_OPTIONS = {"bf16": False}


def _comparable(train_cfg: dict[str, Any]) -> dict[str, Any]:
    """A train config less ``epochs``: a run may be extended, everything else must match to resume."""
    return {**ADDED_TRAIN_OPTIONS, **{k: v for k, v in train_cfg.items() if k != "epochs"}}


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
    # how Adam runs (fused, foreach) is this machine's choice, not the checkpoint's
    impl = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    restore(ckpt, modules, optimizer)
    for group, keep in zip(optimizer.param_groups, impl):
        group.update(keep)
    return ckpt.state["step"], ckpt.state["epoch"], ckpt.state.get("metrics", {}), True


def log_metrics(live, metrics: dict[str, float], prefix: str) -> None:
    """One DVCLive step of ``metrics`` under ``prefix/`` (non-finite values are left out)."""
    if live is None:
        return
    for k, v in metrics.items():
        if math.isfinite(v):
            live.log_metric(f"{prefix}/{k}", v)
    live.next_step()


@contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms inside (warnings, not errors, where an op has none), the caller's
    setting restored after: a library function leaves global state as it found it."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


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
    writer = CheckpointWriter()
    last_write = time.monotonic()
    started, done_here = time.monotonic(), 0  # for the run's ETA (epochs of this process only: a resume is timed afresh)
    try:
        with seeded(schedule.seed), deterministic_kernels(runtime.deterministic):
            for epoch in range(start_epoch, schedule.epochs):
                t0 = time.perf_counter()
                gen = torch.Generator(device=device).manual_seed(epoch_seed(schedule.seed, epoch))
                torch.manual_seed(epoch_seed(schedule.seed, epoch, salt=1))  # dropout
                phase.trained.train()
                batches = epoch_order(len(train), schedule.batch_size, gen, device)
                # the epoch's indices on the host, in one copy (one sync an epoch instead of one a step)
                on_host = np.split(torch.cat(batches).cpu().numpy(), np.cumsum([len(b) for b in batches])[:-1]) if batches else []
                losses: list[torch.Tensor] = []
                parts: dict[str, list[torch.Tensor]] = {}
                frames = checked = 0
                first_step = step
                desc = f"{phase.name} epoch {epoch + 1}/{schedule.epochs}"
                where = f"{phase.name} epoch {epoch + 1}"
                for seq_idx, seq_host in progress(zip(batches, on_host), total=len(batches), desc=desc, unit="batch",
                                                  enabled=runtime.progress):
                    loss, loss_parts, n_frames = phase.step(Batch(seq_idx, seq_host), gen)
                    optimizer_step(phase.optimizer, loss, lr_at(schedule.lr, step, epoch, schedule.warmup_steps, schedule.lr_gamma))
                    step += 1
                    frames += n_frames
                    losses.append(loss.detach())
                    for k, v in loss_parts.items():
                        parts.setdefault(k, []).append(v.detach())
                    if len(losses) - checked >= runtime.check_every:
                        check_finite(losses[checked:], first_step + checked, where, ckpt_dir)
                        checked = len(losses)
                check_finite(losses[checked:], first_step + checked, where, ckpt_dir)  # waits for the epoch's work
                seconds = time.perf_counter() - t0
                metrics = {"train_loss": float(torch.stack(losses).mean()) if losses else float("nan")}
                metrics.update({f"train_loss_{k}": float(torch.stack(v).mean()) for k, v in parts.items()})
                metrics.update(phase.extra_metrics())
                metrics.update(lr=phase.optimizer.param_groups[0]["lr"], epoch_s=seconds,
                               frames_per_s=frames / max(seconds, 1e-9), steps_per_s=len(losses) / max(seconds, 1e-9))
                last = epoch + 1 == schedule.epochs
                if phase.validate is not None and ((runtime.eval_every and (epoch + 1) % runtime.eval_every == 0) or last):
                    metrics.update({f"val_{k}": v for k, v in phase.validate().items()})
                log_metrics(live, metrics, phase.name)
                done_here += 1
                eta_s = (time.monotonic() - started) / done_here * (schedule.epochs - epoch - 1)
                print(f"{desc} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + f" eta={clock(eta_s)}", flush=True)
                by_count = runtime.checkpoint_every and (epoch + 1) % runtime.checkpoint_every == 0
                by_time = runtime.checkpoint_minutes and time.monotonic() - last_write >= 60 * runtime.checkpoint_minutes
                if last or by_count or by_time:
                    state = {"config": run_config, "step": step, "epoch": epoch + 1, "metrics": _finite(metrics), "complete": last}
                    writer.write(ckpt_dir, modules, phase.optimizer, state)
                    last_write = time.monotonic()
    except BaseException:
        try:  # a checkpoint being written is finished whole; the error that stopped training is the one raised
            writer.wait()
        except Exception:  # noqa: BLE001
            pass
        raise
    writer.wait()
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

"""Phase I (Sec. 3.5, Appendix A): frame encoder + location encoder trained contrastively from cached features."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidtag.device import resolve_device
from vidtag.geo import haversine_km
from vidtag.metrics import accuracy_at
from vidtag.models.bundle import build_models
from vidtag.models.config import VidTAGConfig
from vidtag.models.frame_encoder import FrameEncoder
from vidtag.models.location_encoder import LocationEncoder
from vidtag.train.batches import FeatureTensors, SequenceTable, build_sequences, epoch_order, feature_source, padded_chunks, sample_frames
from vidtag.train.checkpoint import load_checkpoint, restore, save_checkpoint
from vidtag.train.losses import contrastive_loss, positive_targets

CHECKPOINT_DIR = "checkpoint"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, no data, mismatched resume)."""


class CheckpointMismatchError(TrainingError):
    """The checkpoint to resume from was written with another model, config or data."""


@dataclass(frozen=True)
class Phase1Config:
    seq_len: int = 16  # Appendix A: 16 frames per training sequence
    batch_size: int = 128  # Appendix A: 128 sequences per batch
    epochs: int = 600  # Appendix A (MSLS)
    lr: float = 5e-5  # Appendix A
    lr_gamma: float = 0.99  # Appendix A: StepLR decay, applied once per epoch (step size not given)
    warmup_steps: int = 1000  # Appendix A: linear warm-up from 0 (shape not given)
    sampling: str = "subset"  # our choice, see vidtag.train.batches.sample_frames
    positive_radius_km: float = 0.0  # our choice, see vidtag.train.losses.positive_targets; 0 = Eq. 1
    symmetric: bool = False  # Eq. 1 is frame->GPS only (as GeoCLIP); True adds GPS->frame
    train_location_encoder: bool = True  # Sec. 3.3: the location encoder is fine-tuned
    eval_every: int = 1  # epochs between validation retrievals (0 = only at the end)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always writes one)
    eval_max_frames: int = 8192  # padded frames per evaluation forward pass
    device: str = "auto"  # auto = cuda when available
    seed: int = 0
    # Issue 5 item 6: "auto" keeps clip+dino (float16) resident on the device when they fit in the memory
    # budget and streams them from the store by chunk otherwise; true / false force either. Both modes give
    # identical batches (vidtag.train.batches.feature_source).
    features_in_memory: str | bool = "auto"
    feature_memory_gb: float | None = None  # budget for resident features; None = 70% of free CUDA memory (half the available RAM on CPU)


def lr_at(base_lr: float, step: int, epoch: int, warmup_steps: int, gamma: float) -> float:
    """Linear warm-up over the first ``warmup_steps`` optimizer steps, times StepLR's gamma ** epoch."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return base_lr * warm * gamma**epoch


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """Every epoch draws from its own seeded generators, so a resumed run repeats an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 7919 + salt) % (2**63)


def progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal, none when output goes to a log file
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


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


class Phase1Model(nn.Module):
    """What Phase I trains: frame encoder, location encoder and the logit scale, saved as one state dict."""

    def __init__(self, frame_encoder: FrameEncoder, location_encoder: LocationEncoder, logit_scale_init: float):
        super().__init__()
        self.frame_encoder = frame_encoder
        self.location_encoder = location_encoder
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))


@torch.no_grad()
def embed_sequences(frame_encoder: FrameEncoder, data: FeatureTensors, table: SequenceTable, max_frames: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-sequence frame embeddings for every frame in ``table`` -> (emb (M, D), rows (M,)), eval mode."""
    was_training = frame_encoder.training
    frame_encoder.eval()
    embs, rows_out = [], []
    for _, rows, pad in padded_chunks(table, max_frames):
        clip, dino, _ = data.gather(rows)
        emb = frame_encoder(clip, dino, pad)  # (B, L, D)
        embs.append(emb[~pad])
        rows_out.append(rows[~pad])
    frame_encoder.train(was_training)
    return torch.cat(embs), torch.cat(rows_out)


@torch.no_grad()
def gallery_embeddings(location_encoder: LocationEncoder, gallery_latlon: torch.Tensor, batch: int = 16384) -> torch.Tensor:
    """Unnormalised location embeddings of the gallery (G, D), in eval mode, batched."""
    was_training = location_encoder.training
    location_encoder.eval()
    out = torch.cat([location_encoder(chunk) for chunk in gallery_latlon.split(batch)])
    location_encoder.train(was_training)
    return out


def retrieval_metrics(pred_latlon: np.ndarray, true_latlon: np.ndarray, prefix: str = "") -> dict[str, float]:
    """vidtag.metrics' frame accuracies (percent, as in metrics/eval.json) under ``prefix``."""
    dist_km = haversine_km(pred_latlon[:, 0], pred_latlon[:, 1], true_latlon[:, 0], true_latlon[:, 1])
    return {f"{prefix}{k}": v for k, v in accuracy_at(dist_km).items()}


def top1(queries: torch.Tensor, gallery_emb_unit: torch.Tensor) -> np.ndarray:
    """Index of the nearest gallery embedding per query, through the project's one retrieval function."""
    from vidtag.retrieval import search

    q = F.normalize(queries.float(), dim=-1).cpu().numpy()
    _, index = search(q, gallery_emb_unit.cpu().numpy(), k=1)
    return np.asarray(index)[:, 0]


def evaluate_phase1(model: Phase1Model, data: FeatureTensors, val: SequenceTable, gallery_latlon: torch.Tensor, max_frames: int = 8192) -> dict[str, float]:
    """Frame-to-GPS top-1 retrieval on the validation frames: acc_1km, acc_5km, median_km."""
    emb, rows = embed_sequences(model.frame_encoder, data, val, max_frames)
    gal = F.normalize(gallery_embeddings(model.location_encoder, gallery_latlon), dim=-1)
    idx = top1(emb, gal)
    return retrieval_metrics(gallery_latlon.cpu().numpy()[idx], data.latlon[rows].cpu().numpy())


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Config keys that must match to resume (bookkeeping keys such as epochs may change)."""
    return {k: v for k, v in cfg_dict.items() if k not in {"epochs", "eval_every", "checkpoint_every", "eval_max_frames", "device",
                                                          "features_in_memory", "feature_memory_gb"}}


def resume(ckpt_dir: Path, device: torch.device, run_config: dict[str, Any], modules: dict[str, torch.nn.Module],
           optimizer: torch.optim.Optimizer) -> tuple[int, int, dict[str, float], bool]:
    """(step, epoch, metrics, resumed) to continue from the checkpoint in ``ckpt_dir``, or a fresh start.

    Every part of ``run_config`` must equal the saved one (``train`` up to bookkeeping keys such as
    epochs), else the checkpoint belongs to another run and CheckpointMismatchError says so.
    """
    ckpt = load_checkpoint(ckpt_dir, device)
    if ckpt is None:
        return 0, 0, {}, False
    saved = ckpt.state["config"]
    differ = sorted(k for k in set(saved) | set(run_config)
                    if (_comparable(saved.get(k, {})) if k == "train" else saved.get(k)) != (_comparable(run_config.get(k, {})) if k == "train" else run_config.get(k)))
    if differ:
        raise CheckpointMismatchError(f"{ckpt_dir} was written with a different {', '.join(differ)}; delete it to start afresh")
    restore(ckpt, modules, optimizer)
    return ckpt.state["step"], ckpt.state["epoch"], ckpt.state.get("metrics", {}), True


def train_phase1(
    features,
    manifest: pl.DataFrame,
    gallery_latlon: np.ndarray,
    out_dir: str | Path,
    cfg: Phase1Config = Phase1Config(),
    model_cfg: VidTAGConfig | None = None,
    live=None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train Phase I, resuming from ``out_dir/checkpoint`` when present; returns the final metrics.

    ``features`` has ``.clip``, ``.dino`` (numpy, or zarr from ``load_features(lazy=True)``), ``.valid`` and
    ``.attrs`` (vidtag.features.store); the model's feature dims are taken from the arrays. ``live`` is an optional DVCLive ``Live``.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    device = resolve_device(cfg.device)
    model_cfg = model_cfg or VidTAGConfig()
    frame_cfg = {**asdict(model_cfg.frame), "clip_dim": int(features.clip.shape[1]), "dino_dim": int(features.dino.shape[1])}
    model_cfg = VidTAGConfig.from_dict({**model_cfg.to_dict(), "frame": frame_cfg})

    data, why = feature_source(features, manifest, device, cfg.features_in_memory, cfg.feature_memory_gb)
    print(f"phase1: features: {why}")
    train = build_sequences(manifest, features.valid, "train").to(device)
    val = build_sequences(manifest, features.valid, "val").to(device)
    if len(train) < 2:
        raise TrainingError(f"Phase I needs at least 2 training sequences with valid frames; found {train}")
    gallery = torch.as_tensor(np.asarray(gallery_latlon, dtype=np.float64), device=device)

    fe, loc, _ = build_models(model_cfg, seed=cfg.seed)
    model = Phase1Model(fe, loc, model_cfg.logit_scale_init).to(device)
    loc.requires_grad_(cfg.train_location_encoder)
    for capsule in loc.capsules():  # the Fourier matrices stay fixed whatever the flag says
        capsule.capsule[0].b.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)

    run_config = {"model": model_cfg.to_dict(), "train": asdict(cfg), "data": _data_key(features, train)}
    run_config = json.loads(json.dumps(run_config))  # compare as stored: tuples become lists
    step, start_epoch, metrics, resumed = resume(ckpt_dir, device, run_config, {"phase1": model}, optimizer)
    print(f"phase1: train {train}, val {val}, gallery {len(gallery)} points, device {device}, from epoch {start_epoch}")

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch))
        torch.manual_seed(epoch_seed(cfg.seed, epoch, salt=1))  # dropout
        model.train()
        batches = epoch_order(len(train), cfg.batch_size, gen, device)
        losses = []
        for seq_idx in progress(batches, len(batches), f"phase1 epoch {epoch + 1}/{cfg.epochs}", show_progress):
            rows, pad = sample_frames(train, seq_idx, cfg.seq_len, gen, cfg.sampling)  # (B, T)
            clip, dino, latlon = data.gather(rows)
            valid = ~pad
            emb = model.frame_encoder(clip, dino, pad)[valid]  # (B, T, D) -> (N, D)
            gps = latlon[valid]  # (N, 2)
            targets = positive_targets(gps, cfg.positive_radius_km)
            loss = contrastive_loss(emb, model.location_encoder(gps), model.logit_scale, targets, cfg.symmetric)
            check_finite(loss, f"phase1 epoch {epoch + 1} step {step + 1}", ckpt_dir)
            optimizer_step(optimizer, loss, lr_at(cfg.lr, step, epoch, cfg.warmup_steps, cfg.lr_gamma))
            step += 1
            losses.append(loss.item())
        metrics = {"train_loss": float(np.mean(losses)), "logit_scale": float(model.logit_scale.detach().exp()), "lr": optimizer.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t0}
        last = epoch + 1 == cfg.epochs
        if len(val) and ((cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last):
            metrics.update({f"val_{k}": v for k, v in evaluate_phase1(model, data, val, gallery, cfg.eval_max_frames).items()})
        _log(live, metrics, "phase1")
        print(f"phase1 epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(ckpt_dir, {"phase1": model}, optimizer, {"config": run_config, "step": step, "epoch": epoch + 1, "metrics": metrics, "complete": last})
    if cfg.epochs == 0 and not resumed:
        # epochs=0 saves the untrained model (GeoCLIP-initialised location encoder): the baseline that
        # "trained beats untrained" is measured against, through the same pipeline.
        save_checkpoint(ckpt_dir, {"phase1": model}, optimizer, {"config": run_config, "step": 0, "epoch": 0, "metrics": {}, "complete": True})
    return metrics


def _data_key(features, train: SequenceTable) -> dict[str, Any]:
    attrs = dict(getattr(features, "attrs", {}) or {})
    return {"manifest_fingerprint": attrs.get("manifest_fingerprint"), "train_sequences": len(train), "train_frames": train.n_frames}


def _log(live, metrics: dict[str, float], phase: str) -> None:
    if live is None:
        return
    for k, v in metrics.items():
        if math.isfinite(v):
            live.log_metric(f"{phase}/{k}", v)
    live.next_step()


def load_phase1(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Phase1Model, dict[str, Any]]:
    """The trained Phase I model (eval mode) and its run config from ``directory/checkpoint``."""
    ckpt = load_checkpoint(Path(directory) / CHECKPOINT_DIR, device)
    if ckpt is None:
        raise TrainingError(f"no Phase I checkpoint in {directory}; run `dvc repro train_phase1` first")
    if not ckpt.state.get("complete"):
        raise TrainingError(f"the Phase I checkpoint in {directory} is from epoch {ckpt.state['epoch']} of an unfinished run; finish Phase I first")
    cfg = VidTAGConfig.from_dict(ckpt.state["config"]["model"])
    no_download = VidTAGConfig.from_dict({**cfg.to_dict(), "location": {**asdict(cfg.location), "pretrained": False}})
    fe, loc, _ = build_models(no_download)
    loc.cfg = cfg.location
    model = Phase1Model(fe, loc, cfg.logit_scale_init)
    restore(ckpt, {"phase1": model})
    return model.to(device).eval(), ckpt.state["config"]

"""Phase II (Sec. 3.4-3.5, Appendix A): GeoRefiner trained as a denoiser of corrupted GPS, Phase I frozen."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from vidtag.device import resolve_device
from vidtag.models.bundle import Bundle, save_bundle
from vidtag.models.config import GeoRefinerConfig, VidTAGConfig
from vidtag.models.georefiner import GeoRefiner
from vidtag.train.batches import FeatureTensors, SequenceTable, build_sequences, epoch_order, feature_source, sample_frames
from vidtag.train.checkpoint import save_checkpoint
from vidtag.train.losses import weighted_hinge_loss
from vidtag.train.noise import NoiseConfig, corrupt_gps
from vidtag.train.phase1 import (
    TrainingError,
    _log,
    check_finite,
    embed_sequences,
    epoch_seed,
    gallery_embeddings,
    load_phase1,
    lr_at,
    optimizer_step,
    progress,
    resume,
    retrieval_metrics,
    top1,
)


@dataclass(frozen=True)
class Phase2Config:
    seq_len: int = 16  # Appendix A: 16 frames in both phases
    batch_size: int = 128  # Appendix A
    epochs: int = 100  # Appendix A (MSLS)
    lr: float = 1e-4  # Appendix A
    lr_gamma: float = 0.95  # Appendix A: StepLR decay, once per epoch
    warmup_steps: int = 1000  # Appendix A
    sampling: str = "subset"  # as Phase I (vidtag.train.batches.sample_frames)
    alpha: float = 10.0  # Sec. 3.5, Table 7: weight of negative pairs
    beta: float = 1.0  # Sec. 3.5, Table 7: weight of positive pairs
    video_weight: float = 1.0  # Eq. 5 sums L_f and L_v with weight 1
    collapse_p: float = 0.1  # Appendix A noise, see vidtag.train.noise
    jitter_min_deg: float = 0.001
    jitter_max_deg: float = 0.02
    shift_max_deg: float = 0.2
    eval_every: int = 1
    checkpoint_every: int = 1
    eval_max_frames: int = 8192
    device: str = "auto"
    seed: int = 0
    features_in_memory: str | bool = "auto"  # as Phase1Config: resident when they fit, else streamed from the store
    feature_memory_gb: float | None = None

    @property
    def noise(self) -> NoiseConfig:
        return NoiseConfig(self.collapse_p, self.jitter_min_deg, self.jitter_max_deg, self.shift_max_deg)


@torch.no_grad()
def evaluate_two_stage(phase1, refiner: GeoRefiner, data: FeatureTensors, val: SequenceTable, gallery_latlon: torch.Tensor, max_frames: int = 8192) -> dict[str, float]:
    """Fig. 5 on the validation sequences: frame->GPS top-1, re-embed, refine, GPS->GPS top-1.

    Returns acc_1km / acc_5km / median_km for Phase I alone (``p1_``) and refined (``p2_``), and the mean
    discrete Fréchet distance in degrees over sequences (``p1_dfd_deg``, ``p2_dfd_deg``).
    """
    from vidtag.metrics import discrete_frechet_many

    refiner.eval()
    emb, rows = embed_sequences(phase1.frame_encoder, data, val, max_frames)  # (M, D), frames in table order
    gal_raw = gallery_embeddings(phase1.location_encoder, gallery_latlon)  # (G, D)
    gal = F.normalize(gal_raw, dim=-1)
    idx1 = top1(emb, gal)
    # regroup per sequence: embed_sequences walks padded_chunks, so map rows back to (sequence, position)
    lengths = val.lengths.cpu().numpy()
    table = val.rows.cpu().numpy()
    pos_of_row = {int(r): (s, p) for s, L in enumerate(lengths) for p, r in enumerate(table[s, :L])}
    width = int(lengths.max())
    emb_bt = torch.zeros(len(val), width, emb.shape[1], device=emb.device)
    q_bt = torch.zeros_like(emb_bt)
    rows_np = rows.cpu().numpy()
    s_idx = np.array([pos_of_row[int(r)][0] for r in rows_np])
    p_idx = np.array([pos_of_row[int(r)][1] for r in rows_np])
    emb_bt[s_idx, p_idx] = emb
    q_bt[s_idx, p_idx] = gal_raw[torch.as_tensor(idx1, device=gal_raw.device)]
    pad = torch.arange(width, device=emb.device)[None, :] >= val.lengths[:, None]
    refined = []
    step = max(1, max_frames // width)
    for start in range(0, len(val), step):
        sl = slice(start, start + step)
        refined.append(refiner(emb_bt[sl], q_bt[sl], pad[sl]))
    refined = torch.cat(refined)[s_idx, p_idx]  # (M, D)
    idx2 = top1(refined, gal)
    g = gallery_latlon.cpu().numpy()
    true = data.latlon[rows].cpu().numpy()
    out = {**retrieval_metrics(g[idx1], true, "p1_"), **retrieval_metrics(g[idx2], true, "p2_")}
    order = np.lexsort((p_idx, s_idx))
    splits = np.cumsum(np.bincount(s_idx, minlength=len(val)))[:-1]
    gt_curves = np.split(true[order], splits)
    for name, idx in (("p1", idx1), ("p2", idx2)):
        curves = np.split(g[idx][order], splits)
        out[f"{name}_dfd_deg"] = float(discrete_frechet_many(curves, gt_curves, metric="deg").mean())
    return out


def train_phase2(
    features,
    manifest: pl.DataFrame,
    gallery_path: str | Path,
    gallery_latlon: np.ndarray,
    phase1_dir: str | Path,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    cfg: Phase2Config = Phase2Config(),
    refiner_cfg: GeoRefinerConfig = GeoRefinerConfig(),
    live=None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train the GeoRefiner on frozen Phase I outputs, resuming from ``checkpoint_dir``; write the bundle to ``out_dir``."""
    device = resolve_device(cfg.device)
    checkpoint_dir = Path(checkpoint_dir)
    phase1, p1_config = load_phase1(phase1_dir, device)
    phase1.requires_grad_(False)
    model_cfg = VidTAGConfig.from_dict({**p1_config["model"], "refiner": asdict(refiner_cfg)})
    if refiner_cfg.width != model_cfg.frame.out_dim:
        raise TrainingError(f"GeoRefiner width {refiner_cfg.width} must equal the embedding size {model_cfg.frame.out_dim} (Sec. 3.4)")
    if (features.clip.shape[1], features.dino.shape[1]) != (model_cfg.frame.clip_dim, model_cfg.frame.dino_dim):
        raise TrainingError(f"features are {features.clip.shape[1]}+{features.dino.shape[1]}-d but Phase I was trained on {model_cfg.frame.clip_dim}+{model_cfg.frame.dino_dim}-d")

    data, why = feature_source(features, manifest, device, cfg.features_in_memory, cfg.feature_memory_gb)
    print(f"phase2: features: {why}")
    train = build_sequences(manifest, features.valid, "train").to(device)
    val = build_sequences(manifest, features.valid, "val").to(device)
    if len(train) < 2:
        raise TrainingError(f"Phase II needs at least 2 training sequences with valid frames; found {train}")
    gallery = torch.as_tensor(np.asarray(gallery_latlon, dtype=np.float64), device=device)

    torch.manual_seed(cfg.seed)
    refiner = GeoRefiner(refiner_cfg).to(device)
    optimizer = torch.optim.Adam(refiner.parameters(), lr=cfg.lr)
    # The whole Phase I run config: resuming on top of a Phase I trained differently would be stale.
    run_config = {"model": model_cfg.to_dict(), "train": asdict(cfg), "phase1": p1_config}
    run_config = json.loads(json.dumps(run_config))  # compare as stored: tuples become lists
    step, start_epoch, metrics, resumed = resume(checkpoint_dir, device, run_config, {"refiner": refiner}, optimizer)
    print(f"phase2: train {train}, val {val}, device {device}, from epoch {start_epoch}")

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch))
        torch.manual_seed(epoch_seed(cfg.seed, epoch, salt=1))
        refiner.train()
        batches = epoch_order(len(train), cfg.batch_size, gen, device)
        losses, parts = [], {"frame": [], "video": []}
        for seq_idx in progress(batches, len(batches), f"phase2 epoch {epoch + 1}/{cfg.epochs}", show_progress):
            rows, pad = sample_frames(train, seq_idx, cfg.seq_len, gen, cfg.sampling)  # (B, T)
            clip, dino, latlon = data.gather(rows)
            valid = ~pad
            with torch.no_grad():
                frame_emb = phase1.frame_encoder(clip, dino, pad)  # (B, T, D), TempGeo + MLP, frozen
                noisy = corrupt_gps(latlon, gen, cfg.noise, pad)  # (B, T, 2)
                g_true = torch.zeros_like(frame_emb)
                g_noisy = torch.zeros_like(frame_emb)
                g_true[valid] = phase1.location_encoder(latlon[valid])
                g_noisy[valid] = phase1.location_encoder(noisy[valid])
            refined = refiner(frame_emb, g_noisy, pad)  # (B, T, D)
            loss, loss_parts = weighted_hinge_loss(refined, g_true, pad, cfg.alpha, cfg.beta, cfg.video_weight)
            check_finite(loss, f"phase2 epoch {epoch + 1} step {step + 1}", checkpoint_dir)
            optimizer_step(optimizer, loss, lr_at(cfg.lr, step, epoch, cfg.warmup_steps, cfg.lr_gamma))
            step += 1
            losses.append(loss.item())
            for k, v in loss_parts.items():
                parts[k].append(v.item())
        metrics = {"train_loss": float(np.mean(losses)), "train_loss_frame": float(np.mean(parts["frame"])), "train_loss_video": float(np.mean(parts["video"])),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t0}
        last = epoch + 1 == cfg.epochs
        if len(val) and ((cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last):
            metrics.update({f"val_{k}": v for k, v in evaluate_two_stage(phase1, refiner, data, val, gallery, cfg.eval_max_frames).items()})
        _log(live, metrics, "phase2")
        print(f"phase2 epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(checkpoint_dir, {"refiner": refiner}, optimizer, {"config": run_config, "step": step, "epoch": epoch + 1, "metrics": metrics, "complete": last})
    if cfg.epochs == 0 and not resumed:  # the untrained refiner, as phase1 does for its baseline
        save_checkpoint(checkpoint_dir, {"refiner": refiner}, optimizer, {"config": run_config, "step": 0, "epoch": 0, "metrics": {}, "complete": True})

    attrs = dict(getattr(features, "attrs", {}) or {})
    bundle = Bundle(
        phase1.frame_encoder.cpu(), phase1.location_encoder.cpu(), refiner.cpu().eval(), phase1.logit_scale.detach().cpu(),
        {
            "model": model_cfg.to_dict(),
            "backbones": attrs.get("backbones"),
            "preprocessing": attrs.get("preprocessing"),
            "feature_dims": {"clip": model_cfg.frame.clip_dim, "dino": model_cfg.frame.dino_dim},
            "manifest_fingerprint": attrs.get("manifest_fingerprint"),
            "training": {"phase1": p1_config["train"], "phase2": asdict(cfg)},
        },
        Path(gallery_path),
    )
    save_bundle(out_dir, bundle)
    return metrics

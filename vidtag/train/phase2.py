"""Phase II (Sec. 3.4-3.5, Appendix A): GeoRefiner trained as a denoiser of corrupted GPS, Phase I frozen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from vidtag.device import resolve_device
from vidtag.errors import ConfigError, TrainingError
from vidtag.features.sequences import SequenceTable, build_sequences
from vidtag.features.source import feature_source
from vidtag.fingerprint import sha256_state
from vidtag.inference import Locator
from vidtag.metrics import discrete_frechet_many
from vidtag.models.bundle import assemble_bundle, save_bundle
from vidtag.models.config import GeoRefinerConfig, VidTAGConfig
from vidtag.models.georefiner import GeoRefiner
from vidtag.seeding import seeded
from vidtag.train import loop
from vidtag.train.batches import sample_frames
from vidtag.train.losses import gps_km_loss, weighted_hinge_loss
from vidtag.train.noise import NoiseConfig, corrupt_gps
from vidtag.train.phase1 import Phase1Model, load_frame_expert, load_phase1, retrieval_metrics, tied_positions


@dataclass(frozen=True)
class Phase2Config:
    """What Phase II computes; how it runs (device, memory, validation frequency) is loop.RuntimeConfig."""

    seq_len: int = 16  # Appendix A: 16 frames in both phases
    batch_size: int = 128  # Appendix A
    epochs: int = 100  # Appendix A (MSLS)
    lr: float = 1e-4  # Appendix A
    lr_gamma: float = 0.95  # Appendix A: StepLR decay, once per epoch
    warmup_steps: int = 1000  # Appendix A
    sampling: str = "subset"  # as Phase I (vidtag.train.batches.sample_frames)
    # hinge: Eqs. 2-5 | gps_km: mean km between corrected and true GPS (GeoRefiner output "offset" only; beyond
    # the paper, see vidtag.train.losses.gps_km_loss)
    loss: str = "hinge"
    alpha: float = 10.0  # Sec. 3.5, Table 7: weight of negative pairs
    beta: float = 1.0  # Sec. 3.5, Table 7: weight of positive pairs
    video_weight: float = 1.0  # Eq. 5 sums L_f and L_v with weight 1
    collapse_p: float = 0.1  # Appendix A noise, see vidtag.train.noise
    jitter_min_deg: float = 0.001
    jitter_max_deg: float = 0.02
    shift_max_deg: float = 0.2
    bf16: bool = False  # bf16 autocast of the forward passes (the loss stays fp32), as Phase1Config.bf16
    seed: int = 0

    def __post_init__(self):
        if self.loss not in ("hinge", "gps_km"):
            raise ConfigError(f"phase2.loss must be 'hinge' or 'gps_km', got {self.loss!r}")

    @property
    def noise(self) -> NoiseConfig:
        return NoiseConfig(self.collapse_p, self.jitter_min_deg, self.jitter_max_deg, self.shift_max_deg)


def validate_two_stage(phase1: Phase1Model, refiner: GeoRefiner, data, val: SequenceTable, gallery_latlon: np.ndarray,
                       runtime: loop.RuntimeConfig = loop.RuntimeConfig(), device="cpu") -> dict[str, float]:
    """Fig. 5 on the validation sequences: accuracies and median for Phase I alone (``p1_``) and refined
    (``p2_``), and the mean discrete Fréchet distance in degrees over sequences (``p1_dfd_deg``, ``p2_dfd_deg``)."""
    locator = Locator.for_model(phase1.frame_encoder, phase1.location_encoder, phase1.logit_scale, refiner, gallery_latlon,
                                backend=runtime.backend, device=device)
    found = locator.locate(data, val, batch_frames=runtime.eval_max_frames)
    g = locator.gallery_latlon
    true = data.latlon[torch.as_tensor(found.rows, device=data.latlon.device)].cpu().numpy()
    out = {**retrieval_metrics(g[found.phase1], true, "p1_"), **retrieval_metrics(g[found.final], true, "p2_")}
    # found.rows is grouped by sequence: split the curves at each sequence's frames, in time order
    table = val.rows.cpu().numpy()
    seq_of_row = np.full(int(table.max()) + 1 if table.size else 0, -1)
    for s, length in enumerate(val.lengths.cpu().numpy()):
        seq_of_row[table[s, :length]] = s
    seq = seq_of_row[found.rows]
    order = np.argsort(seq, kind="stable")
    splits = np.flatnonzero(np.diff(seq[order])) + 1
    gt_curves = np.split(true[order], splits)
    for name, idx in (("p1", found.phase1), ("p2", found.final)):
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
    runtime: loop.RuntimeConfig = loop.RuntimeConfig(),
    code: str | None = None,
) -> dict[str, Any]:
    """Train the GeoRefiner on frozen Phase I outputs, resuming from ``checkpoint_dir``; write the bundle to ``out_dir``."""
    device = resolve_device(runtime.device)
    phase1, p1_config = load_phase1(phase1_dir, device)
    phase1.requires_grad_(False)
    # The GeoRefiner's position table follows phase2.seq_len (the frozen TempGeo's is Phase I's own).
    refiner_cfg = replace(refiner_cfg, max_positions=tied_positions(
        refiner_cfg.max_positions, cfg.seq_len, GeoRefinerConfig.max_positions, "phase2.refiner.max_positions", "phase2.seq_len"))
    model_cfg = VidTAGConfig.from_dict({**p1_config["model"], "refiner": asdict(refiner_cfg)})
    if cfg.loss == "gps_km" and refiner_cfg.output != "offset":
        raise ConfigError("phase2.loss gps_km scores corrected GPS: it needs phase2.refiner.output: offset")
    if refiner_cfg.width != model_cfg.frame.out_dim:
        raise TrainingError(f"GeoRefiner width {refiner_cfg.width} must equal the embedding size {model_cfg.frame.out_dim} (Sec. 3.4)")
    if (features.clip.shape[1], features.dino.shape[1]) != (model_cfg.frame.clip_dim, model_cfg.frame.dino_dim):
        raise TrainingError(f"features are {features.clip.shape[1]}+{features.dino.shape[1]}-d but Phase I was trained on {model_cfg.frame.clip_dim}+{model_cfg.frame.dino_dim}-d")

    data, why = feature_source(features, manifest, device, runtime.features_in_memory, runtime.feature_memory_gb)
    print(f"phase2: features: {why}")
    train = build_sequences(manifest, features.valid, "train").to(device)
    val = build_sequences(manifest, features.valid, "val").to(device)
    if len(train) < 2:
        raise TrainingError(f"Phase II needs at least 2 training sequences with valid frames; found {train}")
    gallery = np.asarray(gallery_latlon, dtype=np.float64)

    with seeded(cfg.seed):
        refiner = GeoRefiner(refiner_cfg).to(device)
    optimizer = loop.adam(refiner.parameters(), cfg.lr, device)
    frozen_frame = loop.maybe_compile(phase1.frame_encoder, runtime.compile)
    frozen_location = loop.maybe_compile(phase1.location_encoder, runtime.compile)
    trained = loop.maybe_compile(refiner, runtime.compile)
    lengths_host = train.lengths.cpu().numpy()

    def step(batch: loop.Batch, gen: torch.Generator):
        rows, pad = data.sample(lambda: sample_frames(train, batch.seq_idx, cfg.seq_len, gen, cfg.sampling))  # (B, T)
        clip, dino, latlon = data.gather(rows)
        n = loop.frames_in_batch(lengths_host, batch.seq_idx_host, pad.shape[1])
        keep = loop.valid_positions(pad, n)  # (N,) = the frames of ~pad, without a host sync
        with torch.no_grad(), loop.autocast(device, cfg.bf16):
            frame_emb = frozen_frame(clip, dino, pad)  # (B, T, D), TempGeo + MLP, frozen
            noisy = corrupt_gps(latlon, gen, cfg.noise, pad)  # (B, T, 2)
            g_true = torch.zeros_like(frame_emb)
            g_noisy = torch.zeros_like(frame_emb)
            flat_true, flat_noisy = g_true.view(-1, g_true.shape[-1]), g_noisy.view(-1, g_noisy.shape[-1])
            flat_true[keep] = frozen_location(latlon.flatten(0, 1)[keep]).to(g_true.dtype)  # (N, D)
            flat_noisy[keep] = frozen_location(noisy.flatten(0, 1)[keep]).to(g_noisy.dtype)
        if cfg.loss == "gps_km":
            with loop.autocast(device, cfg.bf16):
                moved = refiner.corrected_gps(frame_emb, g_noisy, noisy, pad)  # (B, T, 2) degrees
            loss, parts = gps_km_loss(moved.float(), latlon.float(), pad)
            return loss, parts, n
        with loop.autocast(device, cfg.bf16):
            if refiner.needs_gps:  # output "offset": corrections of the noisy GPS, re-embedded by the frozen encoder
                refined = trained(frame_emb, g_noisy, pad, gps_latlon=noisy, location_encoder=frozen_location)  # (B, T, D)
            else:
                refined = trained(frame_emb, g_noisy, pad)  # (B, T, D)
        # the loss in fp32; pads weigh 0 in it (vidtag.train.losses), so the step has no host sync
        refined, g_true = refined.float(), g_true.float()
        loss, parts = weighted_hinge_loss(refined, g_true, pad, cfg.alpha, cfg.beta, cfg.video_weight)
        return loss, parts, n

    phase = loop.Phase(
        "phase2", refiner, refiner, optimizer, step,
        validate=(lambda: validate_two_stage(phase1, refiner, data, val, gallery, runtime, device)) if len(val) else None,
    )
    # The whole Phase I run config: resuming on top of a Phase I trained differently would be stale.
    # The Phase I weights themselves, not only their run config: a Phase I retrained by changed code with the same
    # params must not be refined on top of a Phase II trained against the old one.
    run_config = {"model": model_cfg.to_dict(), "train": asdict(cfg), "phase1": p1_config, "phase1_weights": sha256_state(phase1)}
    if code is not None:  # as in train_phase1
        run_config["code"] = code
    metrics = loop.run(phase, train, loop.schedule_of(cfg), runtime, Path(checkpoint_dir), run_config, device, live)

    attrs = dict(getattr(features, "attrs", {}) or {})
    training = {"phase1": p1_config["train"], "phase2": asdict(cfg)}
    bundle = assemble_bundle(phase1.frame_encoder, phase1.location_encoder, refiner, phase1.logit_scale, model_cfg, attrs, training,
                             gallery_path, expert=load_frame_expert(phase1_dir))
    save_bundle(out_dir, bundle)
    return metrics

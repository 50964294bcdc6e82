"""Phase I (Sec. 3.5, Appendix A): frame encoder + location encoder trained contrastively from cached features.

``Phase1Config.kind`` picks the model Phase I makes, so the paper's baselines are runs of the same pipeline:

* ``vidtag``: the paper's frame encoder (TempGeo + MLP over CLIP and DINOv2 features, Sec. 3.1-3.2); Phase II
  adds the GeoRefiner. Table 4's ablations are its configs (``tempgeo_layers: 0``, ``backbones: [dino]``).
* ``geoclip_finetune``: GeoCLIP fine-tuned (App. F.4, Table 4's first row): GeoCLIP's image head on each frame's
  CLIP features, frames as independent images (no TempGeo, no DINOv2), trained with the same loss, batches,
  schedule and location encoder as VidTAG's Phase I; no Phase II.
* ``geoclip_zero_shot``: GeoCLIP as shipped (App. F.1): its image head, location encoder (at its own sigmas)
  and logit scale, written as Phase I's output without a training step; no Phase II. Needs real CLIP
  ViT-L/14 features (768-d).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from vidtag.device import resolve_device
from vidtag.errors import ConfigError, TrainingError
from vidtag.features.sequences import SequenceTable, build_sequences
from vidtag.features.source import feature_source
from vidtag.geo import haversine_km
from vidtag.inference import Locator
from vidtag.metrics import accuracy_at
from vidtag.models.config import FrameEncoderConfig, LocationEncoderConfig, VidTAGConfig, build_config
from vidtag.models.frame_encoder import FrameEncoder
from vidtag.models.geoclip_head import (
    CLIP_DIM,
    GeoCLIPFrameConfig,
    GeoCLIPFrameEncoder,
    GeoCLIPHead,
    zero_shot_unavailable,
)
from vidtag.models.frame_expert import FrameExpert
from vidtag.models.location_encoder import GEOCLIP_SIGMAS, LocationEncoder
from vidtag.seeding import seeded
from vidtag.train import loop
from vidtag.train.batches import sample_frames
from vidtag.train.checkpoint import load_checkpoint, restore
from vidtag.train.losses import contrastive_loss, positive_targets

CHECKPOINT_DIR = "checkpoint"
EXPERT_DIR = "expert"  # Phase I's output folder holds the per-frame expert's run here (vidtag.models.frame_expert)
KINDS = ("vidtag", "geoclip_finetune", "geoclip_zero_shot")  # Phase1Config.kind, see the module docstring
REFINED_KINDS = ("vidtag",)  # kinds Phase II refines; the others are final after Phase I (`train_phase2` passes them on)
GEOCLIP_KINDS = ("geoclip_finetune", "geoclip_zero_shot")  # kinds whose frame encoder is GeoCLIP's image head


@dataclass(frozen=True)
class Phase1Config:
    """What Phase I computes; how it runs (device, memory, validation frequency) is loop.RuntimeConfig."""

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
    location_init: str = "geoclip"  # Sec. 3.3: start from GeoCLIP's shipped weights; "random" trains from scratch
    bf16: bool = False  # bf16 autocast of the encoders' forward (the loss stays fp32): the GPU setting, ~2x the
    # matmul rate of fp32 on bf16 tensor cores; it changes results slightly, so it is a training choice, off for
    # CPU runs that must reproduce (loop.autocast)
    seed: int = 0
    kind: str = "vidtag"  # KINDS: the model Phase I makes (the paper's, or a GeoCLIP baseline, App. F); see the module docstring

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"phase1.kind {self.kind!r}; expected one of {list(KINDS)}")


class Phase1Model(nn.Module):
    """What Phase I trains: frame encoder, location encoder and the logit scale, saved as one state dict."""

    def __init__(self, frame_encoder: FrameEncoder, location_encoder: LocationEncoder, logit_scale_init: float):
        super().__init__()
        self.frame_encoder = frame_encoder
        self.location_encoder = location_encoder
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))


def build_phase1_model(cfg: VidTAGConfig, location_init: str = "random", seed: int = 0) -> Phase1Model:
    """A fresh Phase I model, initialised from ``seed`` without touching the caller's RNG."""
    with seeded(seed):
        frame = FrameEncoder(cfg.frame)
        location = LocationEncoder.fresh(cfg.location, location_init, seed)
    return Phase1Model(frame, location, cfg.logit_scale_init)


def has_phase2(kind: str) -> bool:
    """Whether Phase II trains a GeoRefiner on top of a Phase I model of ``kind`` (only the paper's model)."""
    return kind in REFINED_KINDS


def geoclip_model_config(frame: GeoCLIPFrameConfig, location: LocationEncoderConfig) -> dict[str, Any]:
    """The run config's (and bundle's) ``model`` of a GeoCLIP kind: frame head and location encoder shapes."""
    return {"frame": asdict(frame), "location": asdict(location)}


def build_geoclip_phase1_model(kind: str, clip_dim: int, location_cfg: LocationEncoderConfig, location_init: str = "random",
                               seed: int = 0, logit_scale_init: float = VidTAGConfig.logit_scale_init) -> tuple[Phase1Model, str]:
    """A Phase I model of a GeoCLIP kind and a line saying where its weights came from.

    ``geoclip_zero_shot``: GeoCLIP as shipped: its head and logit scale, its location encoder at the sigmas its
    weights were trained with (``location_cfg`` is not used). ``geoclip_finetune`` (App. F.4): where the CLIP
    features are GeoCLIP's 768-d, its shipped head and logit scale; otherwise (the demo's tiny backbones) a
    freshly initialised head of the same architecture (``clip_dim`` -> 768 -> out, ReLU) and ``logit_scale_init``.
    The location encoder starts as VidTAG's Phase I does (``location_cfg``, ``location_init``), so Table 4 compares
    frame encoders under one location encoder.
    """
    if kind == "geoclip_zero_shot":
        frame = GeoCLIPFrameEncoder.from_geoclip()
        location = LocationEncoder.from_geoclip(sigmas=GEOCLIP_SIGMAS)
        model = Phase1Model(frame, location, 0.0)
        with torch.no_grad():
            model.logit_scale.copy_(frame.head.logit_scale)
        return model, "GeoCLIP as shipped (image head, location encoder at sigmas 2^0, 2^4, 2^8, logit scale)"
    if kind != "geoclip_finetune":
        raise ConfigError(f"not a GeoCLIP kind: {kind!r}; expected one of {list(GEOCLIP_KINDS)}")
    frame_cfg = GeoCLIPFrameConfig(clip_dim=int(clip_dim), out_dim=location_cfg.out_dim)
    with seeded(seed):
        location = LocationEncoder.fresh(location_cfg, location_init, seed)
        frame = GeoCLIPFrameEncoder(frame_cfg)
    shipped = int(clip_dim) == CLIP_DIM and location_cfg.out_dim == frame_cfg.out_dim == GeoCLIPFrameConfig.out_dim
    if shipped:
        frame.head = GeoCLIPHead.from_geoclip().train()
        logit_scale_init = float(frame.head.logit_scale)
        why = "GeoCLIP's shipped image head and logit scale"
    else:
        why = (f"a freshly initialised GeoCLIP image head ({clip_dim} -> {frame_cfg.hidden_dim} -> {frame_cfg.out_dim}): the "
               f"CLIP features are {clip_dim}-d, not the {CLIP_DIM}-d its shipped weights read")
    return Phase1Model(frame, location, logit_scale_init), f"{why}; location encoder from {location_init!r}"


def tied_positions(table_rows: int, seq_len: int, default_rows: int, key: str, seq_key: str) -> int:
    """The learned position table's length for training on ``seq_len``-frame sequences: the table is the
    training length (App. A: 16 frames in both phases, 16 rows).

    A table longer than the training sequences keeps rows no step ever updates (Table 10's 4- and 8-frame
    runs under a 16-row table), and inference then uses them: directly for a video of up to ``table_rows``
    frames, through interpolation over the whole table for a longer one (vidtag.models.positions). So a
    table left at its default (``default_rows``: a frozen config cannot tell "not set" from "set to the
    default") follows ``seq_len``: tying rather than refusing keeps a seq_len sweep one override away,
    and the checkpoint and bundle record the tied length. Any other length that differs from ``seq_len``
    was asked for and contradicts it: refused with a :class:`ConfigError` naming both keys.
    """
    if table_rows == seq_len:
        return table_rows
    if table_rows == default_rows:
        return seq_len
    raise ConfigError(f"{key}={table_rows} but {seq_key}={seq_len}: the position table must be the training length, "
                      f"or rows no training step updates are used at inference (Table 10); set {key}: {seq_len} or "
                      f"leave it out (it then follows {seq_key})")


def retrieval_metrics(pred_latlon: np.ndarray, true_latlon: np.ndarray, prefix: str = "") -> dict[str, float]:
    """vidtag.metrics' frame accuracies (percent, as in metrics/eval.json) under ``prefix``."""
    dist_km = haversine_km(pred_latlon[:, 0], pred_latlon[:, 1], true_latlon[:, 0], true_latlon[:, 1])
    return {f"{prefix}{k}": v for k, v in accuracy_at(dist_km).items()}


def validate_phase1(model: Phase1Model, data, val: SequenceTable, gallery_latlon: np.ndarray,
                    runtime: loop.RuntimeConfig = loop.RuntimeConfig(), device="cpu") -> dict[str, float]:
    """Fig. 5's first stage (frame -> GPS top-1) on the validation sequences: acc_*km, median_km."""
    locator = Locator.for_model(model.frame_encoder, model.location_encoder, model.logit_scale, None, gallery_latlon,
                                backend=runtime.backend, device=device)
    found = locator.locate(data, val, batch_frames=runtime.eval_max_frames)
    true = data.latlon[torch.as_tensor(found.rows, device=data.latlon.device)].cpu().numpy()
    return retrieval_metrics(locator.gallery_latlon[found.phase1], true)


def train_phase1(
    features,
    manifest: pl.DataFrame,
    gallery_latlon: np.ndarray,
    out_dir: str | Path,
    cfg: Phase1Config = Phase1Config(),
    model_cfg: VidTAGConfig | None = None,
    live=None,
    runtime: loop.RuntimeConfig = loop.RuntimeConfig(),
    code: str | None = None,
) -> dict[str, Any]:
    """Train Phase I, resuming from ``out_dir/checkpoint`` when present; returns the final metrics.

    ``features`` has ``.clip``, ``.dino`` (numpy, or zarr from ``load_features(lazy=True)``), ``.valid`` and
    ``.attrs`` (vidtag.features.store); the model's feature dims are taken from the arrays. ``live`` is an optional DVCLive ``Live``.
    ``code``: a fingerprint of the code that trains (the stage passes its import closure's), part of the run's identity.
    """
    out_dir = Path(out_dir)
    device = resolve_device(runtime.device)
    model_cfg = model_cfg or VidTAGConfig()
    clip_dim = int(features.clip.shape[1])
    if cfg.kind == "vidtag":
        rows = tied_positions(model_cfg.frame.max_positions, cfg.seq_len, FrameEncoderConfig.max_positions,
                              "phase1.model.frame.max_positions", "phase1.seq_len")
        frame_cfg = {**asdict(model_cfg.frame), "clip_dim": clip_dim, "dino_dim": int(features.dino.shape[1]), "max_positions": rows}
        model_cfg = VidTAGConfig.from_dict({**model_cfg.to_dict(), "frame": frame_cfg})
        model = build_phase1_model(model_cfg, cfg.location_init, cfg.seed)
        model_dict = model_cfg.to_dict()
    else:
        if cfg.kind == "geoclip_zero_shot":
            why_not = zero_shot_unavailable(clip_dim, _backbone_config(features))
            if why_not:
                raise ConfigError(f"phase1.kind geoclip_zero_shot: {why_not}; phase1.kind geoclip_finetune trains GeoCLIP's "
                                  "head on any CLIP features")
            cfg = replace(cfg, epochs=0)  # App. F.1: no training step; the loop saves the model as it is
        model, source = build_geoclip_phase1_model(cfg.kind, clip_dim, model_cfg.location, cfg.location_init, cfg.seed,
                                                   model_cfg.logit_scale_init)
        print(f"phase1: kind {cfg.kind}: {source}; phase1.model.frame is not used (GeoCLIP reads CLIP features frame by "
              "frame: no TempGeo, no DINOv2)")
        model_dict = geoclip_model_config(model.frame_encoder.cfg, model.location_encoder.cfg)

    data, why = feature_source(features, manifest, device, runtime.features_in_memory, runtime.feature_memory_gb)
    print(f"phase1: features: {why}")
    train = build_sequences(manifest, features.valid, "train").to(device)
    val = build_sequences(manifest, features.valid, "val").to(device)
    if len(train) < 2 and cfg.epochs > 0:
        raise TrainingError(f"Phase I needs at least 2 training sequences with valid frames; found {train}")
    gallery = np.asarray(gallery_latlon, dtype=np.float64)
    print(f"phase1: val {val}, gallery {len(gallery)} points")

    model = model.to(device)
    model.location_encoder.requires_grad_(cfg.train_location_encoder)
    for capsule in model.location_encoder.capsules():  # the Fourier matrices stay fixed whatever the flag says
        capsule.capsule[0].b.requires_grad_(False)
    optimizer = loop.adam([p for p in model.parameters() if p.requires_grad], cfg.lr, device)
    frame_encoder = loop.maybe_compile(model.frame_encoder, runtime.compile)
    location_encoder = loop.maybe_compile(model.location_encoder, runtime.compile)
    lengths_host = train.lengths.cpu().numpy()

    def step(batch: loop.Batch, gen: torch.Generator):
        rows, pad = data.sample(lambda: sample_frames(train, batch.seq_idx, cfg.seq_len, gen, cfg.sampling))  # (B, T)
        clip, dino, latlon = data.gather(rows)
        n = loop.frames_in_batch(lengths_host, batch.seq_idx_host, pad.shape[1])
        keep = loop.valid_positions(pad, n)  # (N,) = the frames of ~pad, without a host sync
        gps = latlon.flatten(0, 1)[keep]  # (N, 2)
        with loop.autocast(device, cfg.bf16):
            emb = frame_encoder(clip, dino, pad).flatten(0, 1)[keep]  # (B, T, D) -> (N, D)
            gps_emb = location_encoder(gps)  # (N, D)
        targets = positive_targets(gps, cfg.positive_radius_km)
        loss = contrastive_loss(emb.float(), gps_emb.float(), model.logit_scale, targets, cfg.symmetric)
        return loss, {}, n

    phase = loop.Phase(
        "phase1", model, model, optimizer, step,
        validate=(lambda: validate_phase1(model, data, val, gallery, runtime, device)) if len(val) else None,
        extra_metrics=lambda: {"logit_scale": float(model.logit_scale.detach().exp())},
    )
    run_config = {"model": model_dict, "train": asdict(cfg), "data": _data_key(features, train)}
    if code is not None:  # a fingerprint of the training code: an unfinished checkpoint of older code is not resumed
        run_config["code"] = code
    return loop.run(phase, train, loop.schedule_of(cfg), runtime, out_dir / CHECKPOINT_DIR, run_config, device, live)


def _backbone_config(features) -> dict[str, Any] | None:
    """The feature store's backbone config (preset, clip_arch, ...) where its attrs record one."""
    record = (dict(getattr(features, "attrs", {}) or {}).get("backbones") or {})
    config = record.get("config") if isinstance(record, dict) else None
    return config if isinstance(config, dict) else None


def _data_key(features, train: SequenceTable) -> dict[str, Any]:
    attrs = dict(getattr(features, "attrs", {}) or {})
    return {"manifest_fingerprint": attrs.get("manifest_fingerprint"), "train_sequences": len(train), "train_frames": train.n_frames}


def load_phase1(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Phase1Model, dict[str, Any]]:
    """The trained Phase I model (eval mode) and its run config from ``directory/checkpoint``."""
    ckpt = load_checkpoint(Path(directory) / CHECKPOINT_DIR, device)
    if ckpt is None:
        raise TrainingError(f"no Phase I checkpoint in {directory}; run `dvc repro train_phase1` first")
    if not ckpt.state.get("complete"):
        raise TrainingError(f"the Phase I checkpoint in {directory} is from epoch {ckpt.state['epoch']} of an unfinished run; finish Phase I first")
    kind = (ckpt.state["config"].get("train") or {}).get("kind", "vidtag")
    if kind in GEOCLIP_KINDS:
        model = _geoclip_phase1_shell(ckpt.state["config"]["model"])
    else:
        model = build_phase1_model(VidTAGConfig.from_dict(ckpt.state["config"]["model"]))  # random init, replaced below
    restore(ckpt, {"phase1": model})
    return model.to(device).eval(), ckpt.state["config"]


def load_frame_expert(directory: str | Path, device: str | torch.device = "cpu") -> FrameExpert | None:
    """The per-frame expert trained beside Phase I (``directory/expert``), or None when Phase I trained none."""
    if not (Path(directory) / EXPERT_DIR / CHECKPOINT_DIR).exists():
        return None
    model, _ = load_phase1(Path(directory) / EXPERT_DIR, device)
    return FrameExpert(model.frame_encoder, model.location_encoder, model.logit_scale).eval()


def _geoclip_phase1_shell(model: dict[str, Any]) -> Phase1Model:
    """A GeoCLIP-kind Phase I model of the run config's shapes, to load a checkpoint's weights into."""
    frame = GeoCLIPFrameEncoder(GeoCLIPFrameConfig.from_dict(dict(model.get("frame") or {})))
    location = LocationEncoder(cfg=build_config(LocationEncoderConfig, model.get("location")))
    return Phase1Model(frame, location, 0.0)

"""GeoCLIP's image head (Vivanco et al., NeurIPS 2023) on cached CLIP features, for zero-shot baselines.

GeoCLIP embeds an image as ``normalize(MLP(CLIP ViT-L/14 projected features))`` with the MLP
768 -> 768 (ReLU) -> 512, and a location with the encoder VidTAG reuses (Sec. 3.3, our
:class:`~vidtag.models.location_encoder.LocationEncoder`). The frozen CLIP tower is the expensive part and
VidTAG's feature store already holds its (N, 768) output, so this head alone turns the store into GeoCLIP's
image embeddings: GeoCLIP's zero-shot prediction is retrieval of these against the location encoder over
its shipped 100K GPS gallery, with no image decoded again.

The input is CLIP's *projected, un-normalised* image embedding (what ``CLIPModel.get_image_features`` and
open_clip's ``encode_image`` return, and what the feature store keeps): GeoCLIP feeds it to the MLP as is,
and the MLP's biases make it scale-sensitive, so L2-normalised CLIP features would give other embeddings.

Weights come from the ``geoclip`` package, which ships them beside its code (``model/weights/``); nothing is
downloaded and nothing but tensors is unpickled (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidtag.errors import BackboneError, BundleError, InferenceError

CLIP_DIM = 768  # CLIP ViT-L/14 projection width, GeoCLIP's image-encoder input
EMBED_DIM = 512  # GeoCLIP's shared image/location embedding width
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's temperature init, which GeoCLIP also starts from
MLP_WEIGHTS = "image_encoder_mlp_weights.pth"
LOGIT_SCALE_WEIGHTS = "logit_scale_weights.pth"


def geoclip_weights_dir() -> Path:
    """The ``weights`` folder the installed ``geoclip`` package ships (found without importing it: that would
    import transformers)."""
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError("the geoclip package is not installed; `pip install geoclip` provides GeoCLIP's weights")
    return Path(list(spec.submodule_search_locations)[0]) / "model" / "weights"


def geoclip_gallery_path() -> Path:
    """GeoCLIP's shipped 100K GPS gallery (``model/gps_gallery/coordinates_100K.csv``, columns ``LAT,LON``)."""
    from vidtag.gallery import geoclip_gallery_path as _path  # one place knows where geoclip keeps it

    return _path()


def load_geoclip_gallery(path: str | Path | None = None) -> np.ndarray:
    """GeoCLIP's 100K gallery as a (G, 2) float64 array of (lat, lon) degrees, in the file's row order.

    geoclip reads it with pandas and keeps float32 (``misc.load_gps_data``); we read the same ``LAT``/``LON``
    columns by name with polars and keep float64, so rounding to float32 gives geoclip's tensor exactly.
    """
    import polars as pl

    path = Path(path) if path is not None else geoclip_gallery_path()
    df = pl.read_csv(path, columns=["LAT", "LON"], schema_overrides={"LAT": pl.Float64, "LON": pl.Float64})
    return np.ascontiguousarray(df.select("LAT", "LON").to_numpy(), dtype=np.float64)  # (G, 2)


class GeoCLIPHead(nn.Module):
    """CLIP ViT-L/14 projected features (N, 768) -> GeoCLIP image embeddings (N, 512), unit-normalised.

    ``mlp`` mirrors geoclip's ``ImageEncoder.mlp`` (same ``nn.Sequential`` indices, so its state dict loads
    unchanged). ``logit_scale`` is GeoCLIP's learned log-temperature, a buffer: it is GeoCLIP's, not
    something this head trains. ``__init__`` builds the architecture only; :meth:`from_geoclip` loads weights.
    """

    def __init__(self, in_dim: int = CLIP_DIM, hidden_dim: int = CLIP_DIM, out_dim: int = EMBED_DIM):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
        self.register_buffer("logit_scale", torch.tensor(LOGIT_SCALE_INIT, dtype=torch.float32))  # () log-space

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        if clip_features.shape[-1] != self.in_dim:
            raise InferenceError(f"GeoCLIPHead expects (..., {self.in_dim}) CLIP features, got {tuple(clip_features.shape)}")
        w = self.mlp[0].weight
        return F.normalize(self.mlp(clip_features.to(w.device, w.dtype)), dim=-1)  # (N, 768) -> (N, 512), unit norm

    def logits(self, image_emb: torch.Tensor, location_emb: torch.Tensor) -> torch.Tensor:
        """GeoCLIP's ``forward``: exp(logit_scale) * cos(image, location); (N, 512), (G, 512) -> (N, G).

        ``image_emb`` is this head's output; ``location_emb`` the location encoder's raw output (normalised here,
        as GeoCLIP does)."""
        return self.logit_scale.exp() * image_emb @ F.normalize(location_emb, dim=-1).T

    @classmethod
    def from_geoclip(cls, weights_path: str | Path | None = None) -> GeoCLIPHead:
        """The head with the weights the ``geoclip`` package ships.

        ``weights_path``: geoclip's ``image_encoder_mlp_weights.pth`` or the folder holding it (default: the
        installed package's). GeoCLIP's ``logit_scale_weights.pth`` is read from the same folder when present;
        otherwise ``logit_scale`` keeps CLIP's init, ln(1/0.07).
        """
        path = Path(weights_path) if weights_path is not None else geoclip_weights_dir()
        if path.is_dir():
            path = path / MLP_WEIGHTS
        if not path.is_file():
            raise BackboneError(f"GeoCLIP image-head weights not found at {path}; reinstall geoclip or pass weights_path")
        head = cls()
        state = _load_tensors(path)
        try:
            head.mlp.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BackboneError(f"{path} is not GeoCLIP's image-encoder MLP (768 -> 768 -> 512): {e}") from e
        scale_path = path.parent / LOGIT_SCALE_WEIGHTS
        if scale_path.is_file():
            scale = _load_tensors(scale_path)
            if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
                raise BackboneError(f"{scale_path}: expected GeoCLIP's scalar logit_scale, got {type(scale).__name__}")
            head.logit_scale.copy_(scale.reshape(()).float())
        return head.eval()


# GeoCLIP's image side as a vidtag frame encoder: the zero-shot model (App. F.1), and the fine-tuned baseline
# (App. F.4) that Phase I trains when ``phase1.kind`` is ``geoclip_finetune``. It lives beside the head, not in
# geoclip_model (which assembles bundles), so Phase I can train it without importing the bundle or the GeoRefiner.


@dataclass(frozen=True)
class GeoCLIPFrameConfig:
    """GeoCLIP's image side as a vidtag frame encoder; the defaults are GeoCLIP's shipped shapes."""

    clip_dim: int = 768  # CLIP ViT-L/14 projected image embedding, GeoCLIP's MLP input
    dino_dim: int = 0  # GeoCLIP reads CLIP only: no DINOv2 features are extracted (0-d)
    hidden_dim: int = 768  # GeoCLIP's image MLP: 768 -> 768 (ReLU) -> 512
    out_dim: int = 512  # the shared image/location embedding width

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeoCLIPFrameConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BundleError(f"geoclip frame config: unknown key(s) {unknown}; expected some of {sorted(names)}")
        return cls(**d)


class GeoCLIPFrameEncoder(nn.Module):
    """clip (B, T, Dc), dino (B, T, 0) ignored, pad_mask ignored -> (B, T, 512) unit: every frame on its own,
    as GeoCLIP embeds single images. Same call as :class:`~vidtag.models.frame_encoder.FrameEncoder`."""

    def __init__(self, cfg: GeoCLIPFrameConfig = GeoCLIPFrameConfig()):
        super().__init__()
        self.cfg = cfg
        self.head = GeoCLIPHead(cfg.clip_dim, cfg.hidden_dim, cfg.out_dim)

    def forward(self, clip: torch.Tensor, dino: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(clip)  # (B, T, Dc) -> (B, T, 512), unit norm; padded rows are dropped by the caller

    @classmethod
    def from_geoclip(cls) -> GeoCLIPFrameEncoder:
        """With the image MLP and logit scale the ``geoclip`` package ships."""
        enc = cls()
        enc.head = GeoCLIPHead.from_geoclip()
        return enc.eval()


def zero_shot_unavailable(clip_dim: int | None = None, backbones: dict[str, Any] | None = None) -> str | None:
    """Why GeoCLIP's shipped head cannot be applied zero-shot to these features (None: it can).

    The head was trained on OpenAI's CLIP ViT-L/14 projected features: any other width cannot enter it, and
    features of the same width from other weights (the ``real-arch`` preset's random ViT-L/14) would enter it
    but mean nothing to it. ``clip_dim``: the features' width; ``backbones``: a ``BackboneConfig`` as a flat dict
    (``preset``, ``clip_arch``), where known. The one rule behind both the ``train_phase1`` refusal and the
    experiment table's "needs real CLIP ViT-L/14 features" row.
    """
    if clip_dim is not None and int(clip_dim) != CLIP_DIM:
        return (f"GeoCLIP zero-shot needs real CLIP ViT-L/14 features ({CLIP_DIM}-d, what its shipped head reads); "
                f"these are {int(clip_dim)}-d")
    if backbones:
        preset, arch = backbones.get("preset"), backbones.get("clip_arch")
        if preset not in (None, "real") or arch not in (None, "ViT-L-14"):
            return (f"GeoCLIP zero-shot needs real CLIP ViT-L/14 features; these come from backbone preset {preset!r}, "
                    f"CLIP {arch!r} (set backbone.preset: real)")
    return None


def clip_features_only(features):
    """``features`` (``.clip``, ``.dino``, ``.valid``, ``.attrs``) with the DINOv2 part emptied to (N, 0): what a
    GeoCLIP-kind model (``dino_dim`` 0) reads, as `vidtag predict` gives it from a CLIP-only backbone."""
    empty = np.zeros((int(features.clip.shape[0]), 0), dtype=np.float16)  # (N, 0)
    if dataclasses.is_dataclass(features) and not isinstance(features, type):
        return dataclasses.replace(features, dino=empty)
    from types import SimpleNamespace

    return SimpleNamespace(clip=features.clip, dino=empty, valid=features.valid, attrs=getattr(features, "attrs", {}))


def _load_tensors(path: Path):
    """Tensors only (weights_only=True): a weights file can never run code on load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file or one holding arbitrary objects
        raise BackboneError(f"cannot read GeoCLIP weights {path}: {e}") from e

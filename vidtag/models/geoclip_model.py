"""GeoCLIP (Vivanco et al., NeurIPS 2023) as a vidtag model: worldwide, zero-shot, no training.

A model bundle of kind ``geoclip`` is Fig. 5 with GeoCLIP's parts and no Phase II:

* frame encoder: GeoCLIP's image head (:class:`~vidtag.models.geoclip_head.GeoCLIPHead`) on each frame's
  CLIP ViT-L/14 features, frame by frame (GeoCLIP sees single images: no TempGeo, no DINOv2);
* location encoder: GeoCLIP's (Sec. 3.3) with the sigmas its weights were trained with, (2^0, 2^4, 2^8);
* logit scale: GeoCLIP's learned temperature, so candidate scores are GeoCLIP's probabilities;
* no GeoRefiner: :class:`vidtag.inference.Locator` stops after Phase I (frame -> GPS retrieval);
* gallery: GeoCLIP's 100K GPS points (App. D), or any other.

Everything but the CLIP tower ships inside the ``geoclip`` package; CLIP ViT-L/14 (open_clip ``ViT-L-14``,
``openai``, the weights GeoCLIP was trained on) comes from the local cache. The bundle is saved and loaded
by :mod:`vidtag.models.bundle` like a trained one; :func:`builtin_geoclip_dir` writes it once into a cache
folder named by the shipped files' sha256, so ``vidtag predict --model geoclip`` and
``load_model("geoclip")`` go through ``load_bundle`` like any bundle directory.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidtag.errors import BundleError
from vidtag.models.geoclip_head import (  # noqa: F401  (GeoCLIPFrameConfig / GeoCLIPFrameEncoder: re-exported)
    LOGIT_SCALE_WEIGHTS,
    MLP_WEIGHTS,
    GeoCLIPFrameConfig,
    GeoCLIPFrameEncoder,
    geoclip_gallery_path,
    geoclip_weights_dir,
)

KIND = "geoclip"
BUILTIN_NAME = "geoclip"  # `--model geoclip` / load_model("geoclip")
LOCATION_WEIGHTS = "location_encoder_weights.pth"
CLIP_ARCH, CLIP_PRETRAINED = "ViT-L-14", "openai"  # GeoCLIP's image tower: OpenAI's CLIP ViT-L/14


def model_config(frame: GeoCLIPFrameConfig, location) -> dict[str, Any]:
    """config.json's ``model`` for a geoclip bundle: the frame (head) and location encoder shapes."""
    return {"frame": asdict(frame), "location": asdict(location.cfg if isinstance(location, nn.Module) else location)}


def build_modules(model: dict[str, Any]):
    """Fresh (frame encoder, location encoder, None) for a geoclip bundle's ``model`` config; the saved
    weights replace them (the location encoder's Fourier matrices included)."""
    from vidtag.models.bundle import normalise_model_config
    from vidtag.models.config import LocationEncoderConfig
    from vidtag.models.location_encoder import LocationEncoder

    model = normalise_model_config(KIND, model)
    frame = GeoCLIPFrameEncoder(GeoCLIPFrameConfig(**model["frame"]))
    location = LocationEncoder(cfg=LocationEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                            for k, v in model["location"].items()}))
    return frame, location, None


def geoclip_bundle(gallery_path: str | Path, *, backbones=None, frame_encoder: GeoCLIPFrameEncoder | None = None,
                   location_encoder=None):
    """An in-memory bundle of kind ``geoclip`` (save it with ``save_bundle``).

    Defaults are GeoCLIP as shipped: its image head and logit scale, its location encoder at its own sigmas,
    and CLIP ViT-L/14 ``openai`` as the backbone (CLIP only). ``gallery_path``: a vidtag gallery parquet
    (:func:`write_geoclip_gallery` writes GeoCLIP's 100K). The other arguments swap parts (tests build a
    small geoclip-kind model on the tiny backbones this way); ``backbones`` is a
    :class:`~vidtag.features.backbones.BackboneConfig` or its dict (unset keys take its defaults).
    """
    from vidtag.models.bundle import Bundle
    from vidtag.models.location_encoder import GEOCLIP_SIGMAS, LocationEncoder

    if backbones is None:
        backbones = {"preset": "real", "clip_arch": CLIP_ARCH, "clip_pretrained": CLIP_PRETRAINED}
    backbones = asdict(backbones) if is_dataclass(backbones) else dict(backbones)
    frame = frame_encoder if frame_encoder is not None else GeoCLIPFrameEncoder.from_geoclip()
    location = location_encoder if location_encoder is not None else LocationEncoder.from_geoclip(sigmas=GEOCLIP_SIGMAS)
    config = {
        "kind": KIND,
        "model": model_config(frame.cfg, location),
        "backbones": {"config": backbones, "clip": {"arch": backbones.get("clip_arch", CLIP_ARCH),
                                                    "weights": backbones.get("clip_pretrained", CLIP_PRETRAINED)},
                      "dino": None},
        "preprocessing": None,  # rebuilt from the backbone config (open_clip's tag carries it)
        "feature_dims": {"clip": frame.cfg.clip_dim, "dino": 0},
        "source": {"package": "geoclip", "version": _geoclip_version(),
                   "method": "GeoCLIP (Vivanco et al., NeurIPS 2023), zero-shot: frame -> GPS retrieval"},
    }
    logit_scale = frame.head.logit_scale.detach().clone()
    return Bundle(frame.cpu().eval(), location.cpu().eval(), None, logit_scale, config, Path(gallery_path))


def assemble_geoclip_bundle(frame_encoder: GeoCLIPFrameEncoder, location_encoder, logit_scale: torch.Tensor,
                            feature_attrs: dict[str, Any], training: dict[str, Any], method: str,
                            gallery_path: str | Path | None = None):
    """The bundle of a pipeline run of a GeoCLIP kind (``phase1.kind``: fine-tuned, App. F.4, or zero-shot, App.
    F.1): Phase I's modules and logit scale, no GeoRefiner, and the feature store's backbone record with its
    DINOv2 part dropped (the model reads CLIP only, so `vidtag predict` builds the CLIP tower alone)."""
    from vidtag.models.bundle import Bundle

    backbones = dict(feature_attrs.get("backbones") or {})
    if backbones:
        backbones["dino"] = None
    preprocessing = feature_attrs.get("preprocessing")
    if isinstance(preprocessing, dict):
        preprocessing = {**preprocessing, "dino": None}
    config = {
        "kind": KIND,
        "model": model_config(frame_encoder.cfg, location_encoder),
        "backbones": backbones or None,
        "preprocessing": preprocessing,
        "feature_dims": {"clip": frame_encoder.cfg.clip_dim, "dino": 0},
        "manifest_fingerprint": feature_attrs.get("manifest_fingerprint"),
        "training": training,
        "source": {"package": "geoclip", "version": _geoclip_version(), "method": method},
    }
    modules = [m.cpu().eval() for m in (frame_encoder, location_encoder)]
    return Bundle(*modules, None, logit_scale.detach().cpu().reshape(()), config,
                  None if gallery_path is None else Path(gallery_path))


def write_geoclip_gallery(path: str | Path) -> Path:
    """GeoCLIP's shipped 100K GPS gallery as a vidtag gallery parquet (kind ``geoclip100k``), atomically."""
    from vidtag.gallery import build_gallery, write_gallery

    df, meta = build_gallery(None, "geoclip100k")
    write_gallery(df, meta, path)
    return Path(path)


def geoclip_files() -> dict[str, Path]:
    """The files of GeoCLIP the built-in model reads, by role (paths whether or not they exist)."""
    weights = geoclip_weights_dir()
    return {"image head": weights / MLP_WEIGHTS, "logit scale": weights / LOGIT_SCALE_WEIGHTS,
            "location encoder": weights / LOCATION_WEIGHTS, "100K gallery": geoclip_gallery_path()}


def builtin_geoclip_dir(cache_dir: str | Path) -> Path:
    """The built-in GeoCLIP bundle directory under ``cache_dir``, written once (atomically) and named by the
    sha256 of the shipped files, so a new geoclip release gets a new bundle rather than a stale one."""
    from vidtag.fingerprint import sha256_file
    from vidtag.models.bundle import CONFIG_FILE, save_bundle

    files = geoclip_files()
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise BundleError(f"the geoclip package lacks {missing}; reinstall it (`pip install --force-reinstall geoclip`)")
    import hashlib

    h = hashlib.sha256()
    for role, path in sorted(files.items()):
        h.update(f"{role}={sha256_file(path)};".encode())
    directory = Path(cache_dir) / "models" / f"geoclip-{h.hexdigest()[:16]}"
    if not (directory / CONFIG_FILE).is_file():
        import tempfile

        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:  # the bundle keeps its own copy
            save_bundle(directory, geoclip_bundle(write_geoclip_gallery(Path(tmp) / "gallery.parquet")))
    return directory


def _geoclip_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geoclip")
    except PackageNotFoundError:
        return None

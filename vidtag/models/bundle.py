"""The model bundle: one directory with everything `vidtag predict` needs, assembled after Phase II (Fig. 5).

Files: ``model.safetensors`` (all weights, keys prefixed ``frame_encoder.``, ``location_encoder.``,
``refiner.``, plus ``logit_scale``), ``config.json`` (model config, backbone config from the feature
store, feature dims, gallery file name + sha256, model sha256) and ``gallery.parquet`` (a copy).
A bundle with a per-frame expert (vidtag.models.frame_expert) also holds ``expert.frame_encoder.``,
``expert.location_encoder.`` and ``expert.logit_scale`` weights, and the expert's model config under ``expert``.

``config.json``'s ``kind`` names the model family (absent = ``vidtag``): ``vidtag`` is the paper's model
(TempGeo frame encoder, location encoder, GeoRefiner); ``geoclip`` is GeoCLIP zero-shot
(:mod:`vidtag.models.geoclip_model`: per-frame image head, no refiner, so inference stops after Phase I).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vidtag.errors import BundleError, VidtagError
from vidtag.fingerprint import sha256_file
from vidtag.io import atomic_path, write_error_reason
from vidtag.models.config import VidTAGConfig
from vidtag.models.frame_encoder import FrameEncoder
from vidtag.models.frame_expert import FrameExpert
from vidtag.models.georefiner import GeoRefiner
from vidtag.models.location_encoder import LocationEncoder
from vidtag.seeding import seeded

BUNDLE_FORMAT = 1
KINDS = ("vidtag", "geoclip")  # config.json "kind"; absent = "vidtag" (bundles written before kinds existed)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GALLERY_FILE = "gallery.parquet"


@dataclass
class Bundle:
    frame_encoder: FrameEncoder  # or GeoCLIPFrameEncoder (kind geoclip): same call, (B, T, Dc), (B, T, Dd) -> (B, T, 512)
    location_encoder: LocationEncoder
    refiner: GeoRefiner | None  # None: Fig. 5 stops after Phase I (kind geoclip)
    logit_scale: torch.Tensor  # scalar, log of the Phase I temperature
    config: dict[str, Any]  # config.json: "model" (VidTAGConfig dict), "backbones", "feature_dims", ...
    gallery_path: Path | None  # None: the bundle carries no gallery (a trained model before evaluation packs one)
    expert: FrameExpert | None = None  # the per-frame expert trained beside Phase I, if any

    @property
    def kind(self) -> str:
        return bundle_kind(self.config)

    def eval(self) -> Bundle:
        for m in (self.frame_encoder, self.location_encoder, self.refiner, self.expert):
            if m is not None:
                m.eval()
        return self


def bundle_kind(config: dict[str, Any], where: str = "config.json") -> str:
    kind = config.get("kind", "vidtag")
    if kind not in KINDS:
        raise BundleError(f"{where}: kind {kind!r} is not one of {KINDS}; the bundle was written by a newer vidtag?")
    return kind


def normalise_model_config(kind: str, model: dict[str, Any]) -> dict[str, Any]:
    """config.json's ``model`` validated and with every default filled in, for a bundle of ``kind``."""
    if kind == "vidtag":
        return VidTAGConfig.from_dict(model).to_dict()
    from dataclasses import asdict

    from vidtag.models.config import LocationEncoderConfig, build_config
    from vidtag.models.geoclip_model import GeoCLIPFrameConfig

    unknown = sorted(set(model) - {"frame", "location"})
    if unknown:
        raise BundleError(f"geoclip model config: unknown key(s) {unknown}; expected frame, location")
    return {"frame": asdict(GeoCLIPFrameConfig.from_dict(model.get("frame") or {})),
            "location": asdict(build_config(LocationEncoderConfig, model.get("location")))}


def _expert_model(config: dict[str, Any], where: str) -> VidTAGConfig | None:
    """The per-frame expert's model config from config.json's ``expert`` (None: the bundle has no expert)."""
    expert = config.get("expert")
    if expert is None:
        return None
    if not isinstance(expert, dict) or not isinstance(expert.get("model"), dict):
        raise BundleError(f"{where}: 'expert' must be an object with a 'model' object")
    if bundle_kind(config, where) != "vidtag":
        raise BundleError(f"{where}: only a vidtag bundle carries a per-frame expert")
    try:
        cfg = VidTAGConfig.from_dict(expert["model"])
    except VidtagError as e:
        raise BundleError(f"{where}: 'expert.model' is not a valid model config: {e}") from None
    if cfg.frame.tempgeo_layers != 0:
        raise BundleError(f"{where}: the per-frame expert must have frame.tempgeo_layers 0, found {cfg.frame.tempgeo_layers}")
    return cfg


def _build_for_kind(kind: str, model: dict[str, Any]):
    """(frame encoder, location encoder, refiner or None) of the bundle's architecture, weights to be loaded."""
    if kind == "geoclip":
        from vidtag.models.geoclip_model import build_modules

        return build_modules(model)
    return build_models(VidTAGConfig.from_dict(model))


def build_models(cfg: VidTAGConfig, seed: int = 0, location_init: str = "random") -> tuple[FrameEncoder, LocationEncoder, GeoRefiner]:
    """Fresh modules for ``cfg``, initialised from ``seed`` without touching the caller's RNG; the location
    encoder starts from ``location_init`` (see LocationEncoder.from_config)."""
    with seeded(seed):
        frame = FrameEncoder(cfg.frame)
        location = LocationEncoder.fresh(cfg.location, location_init, seed)
        refiner = GeoRefiner(cfg.refiner)
    return frame, location, refiner


def assemble_bundle(frame_encoder: FrameEncoder, location_encoder: LocationEncoder, refiner: GeoRefiner, logit_scale: torch.Tensor,
                    model_cfg: VidTAGConfig, feature_attrs: dict[str, Any], training: dict[str, Any],
                    gallery_path: str | Path | None = None, expert: FrameExpert | None = None) -> Bundle:
    """The bundle of a finished Phase II: the trained modules (on the CPU, eval mode), the feature store's
    backbone and preprocessing record (so `vidtag predict` extracts matching features), the gallery, and the
    per-frame expert trained beside Phase I where there is one."""
    config = {
        "model": model_cfg.to_dict(),
        "backbones": feature_attrs.get("backbones"),
        "preprocessing": feature_attrs.get("preprocessing"),
        "feature_dims": {"clip": model_cfg.frame.clip_dim, "dino": model_cfg.frame.dino_dim},
        "manifest_fingerprint": feature_attrs.get("manifest_fingerprint"),
        "training": training,
    }
    if expert is not None:
        config["expert"] = {"model": {"frame": asdict(expert.frame_encoder.cfg), "location": asdict(expert.location_encoder.cfg)}}
        expert = expert.cpu().eval()
    modules = [m.cpu().eval() for m in (frame_encoder, location_encoder, refiner)]
    return Bundle(*modules, logit_scale.detach().cpu(), config, None if gallery_path is None else Path(gallery_path), expert)


def bundle_state_dict(bundle: Bundle) -> dict[str, torch.Tensor]:
    state = {"logit_scale": bundle.logit_scale.detach().reshape(())}
    for prefix, module in (("frame_encoder", bundle.frame_encoder), ("location_encoder", bundle.location_encoder), ("refiner", bundle.refiner)):
        if module is not None:
            state.update({f"{prefix}.{k}": v.detach() for k, v in module.state_dict().items()})
    if bundle.expert is not None:
        state.update({f"expert.{k}": v.detach() for k, v in bundle.expert.state_dict().items()})
    return {k: v.cpu().contiguous() for k, v in state.items()}


def save_bundle(directory: str | Path, bundle: Bundle) -> Path:
    """Write the bundle directory atomically; returns its path. Fingerprints are computed here.

    The files are written into a temporary directory beside ``directory`` that replaces it only once
    complete (vidtag.io.atomic_path), so a write that fails (a full disk, no permission) leaves any previous
    bundle as it was and raises one BundleError line naming the path and the reason.
    """
    from safetensors import SafetensorError

    directory = Path(directory)
    gallery_src = None if bundle.gallery_path is None else Path(bundle.gallery_path)
    if gallery_src is not None and not gallery_src.exists():
        raise BundleError(f"gallery {gallery_src} does not exist; build it first (stage `gallery`)")
    try:
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file(bundle_state_dict(bundle), tmp / WEIGHTS_FILE, metadata={"format": "vidtag-bundle"})
            if gallery_src is not None:
                shutil.copyfile(gallery_src, tmp / GALLERY_FILE)
            config = dict(bundle.config)
            if config.get("expert") is not None:
                config["expert"] = {"model": _expert_model(config, "bundle config").to_dict()}
            config.update(
                format_version=BUNDLE_FORMAT,
                model=normalise_model_config(bundle_kind(config, "bundle config"), config["model"]),  # validates and normalises
                weights_file=WEIGHTS_FILE,
                model_sha256=sha256_file(tmp / WEIGHTS_FILE),
                gallery=None if gallery_src is None else
                {"file": GALLERY_FILE, "source": str(gallery_src), "sha256": sha256_file(tmp / GALLERY_FILE)},
            )
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except (OSError, SafetensorError) as e:  # safetensors reports its own I/O errors as SafetensorError
        kept = "the previous bundle there is kept" if (directory / CONFIG_FILE).exists() else "nothing was written there"
        raise BundleError(f"cannot write model bundle {directory}: {write_error_reason(e)}; {kept}") from None
    return directory


def _check_inside(directory: Path) -> None:
    """Bundle files are read only from inside the bundle: a symlink leaving it is refused."""
    real_dir = directory.resolve()
    for f in (WEIGHTS_FILE, CONFIG_FILE, GALLERY_FILE):
        if (directory / f).exists() and not (directory / f).resolve().is_relative_to(real_dir):
            raise BundleError(f"{directory / f} resolves outside the bundle ({(directory / f).resolve()}); a bundle's "
                              "files are read only from inside it: copy the file in instead of linking it")


def _read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict with the keys load_bundle needs, or one clear BundleError."""
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a finite number")

    try:
        config = json.loads(path.read_text(), parse_constant=refuse_constant)  # NaN / Infinity refused
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the bundle "
                          "is damaged, write it again (`dvc repro train_phase2`)") from None
    if not isinstance(config, dict):
        raise BundleError(f"{path}: holds a JSON {type(config).__name__}, expected an object with model, "
                          "model_sha256, gallery, format_version")
    if config.get("format_version") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format_version {config.get('format_version')!r}, expected {BUNDLE_FORMAT}")
    for key, kind in (("model", dict), ("gallery", (dict, type(None))), ("model_sha256", str)):
        if key not in config or not isinstance(config.get(key), kind):
            found = "missing" if key not in config else f"a {type(config[key]).__name__}"
            raise BundleError(f"{path}: '{key}' is {found}, expected a JSON {'object' if kind is dict else 'string'}")
    return config


def _check_shapes(directory: Path, kind: str, model: dict[str, Any], expert_cfg: VidTAGConfig | None = None) -> None:
    """Build the architecture config.json describes on the meta device (no memory) and compare its tensors
    with the weights file's header: bad dims (negative, huge, edited) and foreign files fail here."""
    from safetensors import SafetensorError, safe_open

    weights = directory / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{weights}: not a safetensors file ({e}); a bundle's weights are never unpickled") from None
    try:
        with torch.device("meta"):
            modules = _build_for_kind(kind, model)
    except VidtagError as e:
        raise BundleError(f"{directory / CONFIG_FILE}: 'model' is not a valid {kind} config: {e}") from None
    except Exception as e:  # bad dims surface as assertions or shape errors inside torch.nn
        raise BundleError(f"{directory / CONFIG_FILE}: 'model' describes no buildable {kind} model "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    want = {"logit_scale": ()}
    for prefix, module in zip(("frame_encoder", "location_encoder", "refiner"), modules):
        if module is not None:
            want.update({f"{prefix}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    if expert_cfg is not None:
        with torch.device("meta"):
            want.update({f"expert.{k}": tuple(v.shape) for k, v in FrameExpert.build(expert_cfg).state_dict().items()})
    for name in sorted(set(want) | set(found)):
        if want.get(name) != found.get(name) and not (name == "logit_scale" and found.get(name) in ((), (1,))):
            what = ("missing from the weights" if name not in found else "not part of this architecture" if name not in want
                    else f"shaped {list(found[name])} in the weights, {list(want[name])} in config.json")
            raise BundleError(f"{weights}: tensor {name!r} is {what}; config.json and the weights disagree")


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from a bundle directory, checking files and fingerprints; modules in eval mode."""
    directory = Path(directory)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (directory / f).is_file()]
    if missing:
        raise BundleError(f"model bundle {directory} is incomplete: missing {missing}; re-run `dvc repro train_phase2`")
    _check_inside(directory)
    config = _read_config(directory / CONFIG_FILE)
    has_gallery = config["gallery"] is not None
    if has_gallery and not (directory / GALLERY_FILE).is_file():
        raise BundleError(f"model bundle {directory} is incomplete: missing ['{GALLERY_FILE}'] named in its config.json")
    checks = [("weights", WEIGHTS_FILE, config.get("model_sha256"))]
    if has_gallery:
        checks.append(("gallery", GALLERY_FILE, config["gallery"].get("sha256")))
    for name, file, key in checks:
        found = sha256_file(directory / file)
        if found != key:
            raise BundleError(f"{directory / file}: sha256 {found[:12]}... does not match config.json ({str(key)[:12]}...); the {name} were changed after the bundle was written")
    kind = bundle_kind(config, str(directory / CONFIG_FILE))
    expert_cfg = _expert_model(config, str(directory / CONFIG_FILE))
    _check_shapes(directory, kind, config["model"], expert_cfg)  # before anything is allocated: dims cannot blow up memory
    frame, loc, refiner = _build_for_kind(kind, config["model"])  # random init, replaced by the saved weights below
    expert = FrameExpert.build(expert_cfg) if expert_cfg is not None else None
    state = load_file(directory / WEIGHTS_FILE, device="cpu")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BundleError(f"{directory / WEIGHTS_FILE}: tensor {name!r} holds NaN or infinite values; the model "
                              "cannot predict with it (retrain, or use another bundle)")
    for prefix, module in (("frame_encoder", frame), ("location_encoder", loc), ("refiner", refiner), ("expert", expert)):
        if module is None:
            continue
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{directory / WEIGHTS_FILE}: {prefix} weights do not match config.json's architecture: {str(e).splitlines()[0]}") from None
    if "logit_scale" not in state:
        raise BundleError(f"{directory / WEIGHTS_FILE}: no logit_scale tensor")
    bundle = Bundle(frame.to(device), loc.to(device), refiner.to(device) if refiner is not None else None,
                    state["logit_scale"].to(device), config, directory / GALLERY_FILE if has_gallery else None,
                    expert.to(device) if expert is not None else None)
    return bundle.eval()

"""The dual frame encoder's frozen backbones (Sec. 3.1): CLIP through open_clip, DINOv2 through transformers.

Three presets share one code path (the same classes, preprocessing and ``encode``):
``real`` loads pretrained weights (offline: caches or local paths); ``tiny`` builds small random
models from config with a fixed seed (tests, the demo, and ``predict`` on a demo bundle rebuild the
identical weights); ``real-arch`` builds the ViT-L/14 architectures with random weights (benchmarks).

The second slot is DINOv2 by default; ``backbone.dino.kind: open_clip`` puts any open_clip image tower there
instead (``arch`` + ``pretrained``; Table 6's CLIP + SigLIP is ``arch: ViT-B-16-SigLIP, pretrained: webli``).
The slot keeps the name ``dino`` everywhere (feature store arrays, ``frame.backbones``): it is "the second
backbone", whatever fills it.

``build_backbones(cfg, dino=False)`` builds the CLIP tower alone (GeoCLIP's zero-shot model reads CLIP
features only): DINOv2 is neither loaded nor run, and its features are (B, 0).

Real weights are looked up in the local caches before any loader runs (:func:`clip_weights_file`,
:func:`dino_weights_dir`): the Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, read when
called), where open_clip's ``hf_hub`` tags and transformers keep them. A missing file is one error line
naming the file, the folder it belongs in and the command that fetches it on a connected machine, at once:
no hub call, so no network timeouts or retries on an offline machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vidtag.errors import BackboneError, ConfigError  # BackboneError re-exported: `from vidtag.features.backbones import BackboneError` works
from vidtag.fingerprint import sha256_state

PRESETS = ("real", "tiny", "real-arch")
# How a frame becomes the backbones' square input. "crop": each backbone's own processor (open_clip's and
# DINOv2's resize of the shortest side + centre crop: a 4:3 frame loses ~12 % of its width per side, a
# 16:9 one ~22 %). "squash": the whole frame resized to image_size x image_size (App. A: frames "resized to
# 224x224"), aspect ratio not kept, nothing cut away.
RESIZE_MODES = ("crop", "squash")
SECOND_KINDS = ("dinov2", "open_clip")  # what fills the second backbone slot (Table 6 swaps DINOv2 for SigLIP)

# Small but real ViTs: enough depth/width to exercise every layer type, fast on 2 CPU cores.
# Different output dims for the two backbones so a swapped array cannot go unnoticed.
TINY_CLIP = {
    "embed_dim": 32,  # projected image embedding (ViT-L/14: 768)
    "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
TINY_SECOND_DIM = 48  # a tiny open_clip tower in the second slot: DINOv2-tiny's width, so the demo's shapes hold
TINY_DINO = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2, "patch_size": 8}
# facebook/dinov2-large's config.json, so that `real-arch` needs no hub access.
DINOV2_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
                "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6,
                "qkv_bias": True, "use_swiglu_ffn": False}
# DINOv2's image processor (BitImageProcessor in facebook/dinov2-*): resize shortest side to 256,
# centre crop 224, ImageNet mean/std. For other image sizes the 256/224 ratio is kept.
DINO_RESIZE_RATIO = 256 / 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen encoders make the features; stored in the feature store and the model bundle."""

    preset: str = "real"  # "real" | "tiny" (random, demo/tests) | "real-arch" (ViT-L/14 shapes, random weights)
    clip_arch: str = "ViT-L-14"  # Sec. 3.1 / App. A: CLIP ViT-L/14, the image encoder GeoCLIP uses
    clip_pretrained: str = "openai"  # open_clip pretrained tag, or a local checkpoint file
    clip_quick_gelu: bool = True  # OpenAI's CLIP weights were trained with QuickGELU (open_clip warns otherwise)
    dino_name: str = "facebook/dinov2-large"  # Sec. 3.1 / App. A: DINOv2 ViT-L/14; HF id (cached) or local dir
    dino_kind: str = "dinov2"  # SECOND_KINDS: what fills the second slot; "open_clip" = Table 6's CLIP + SigLIP rows
    dino_arch: str = "ViT-B-16-SigLIP"  # dino_kind "open_clip": the open_clip architecture
    dino_pretrained: str = "webli"  # dino_kind "open_clip": open_clip pretrained tag, or a local checkpoint file
    image_size: int = 224  # App. A: frames resized to 224x224
    seed: int = 0  # initialises the random presets; ignored by "real"
    resize: str = "crop"  # RESIZE_MODES: "crop" (each backbone's centre crop; stores made before this option) | "squash" (App. A)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"backbone preset must be one of {PRESETS}, got {self.preset!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"backbone resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.image_size < 16:
            raise ConfigError(f"backbone image_size must be >= 16 px, got {self.image_size}")
        if self.dino_kind not in SECOND_KINDS:
            raise ConfigError(f"backbone dino.kind must be one of {SECOND_KINDS}, got {self.dino_kind!r}")

    @property
    def second_is_open_clip(self) -> bool:
        return self.dino_kind == "open_clip"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneConfig":
        """From ``asdict`` output or the nested params form (``clip: {arch, pretrained}, dino: {name}``)."""
        flat = {k: v for k, v in d.items() if k not in ("clip", "dino")}
        for group in ("clip", "dino"):
            for k, v in (d.get(group) or {}).items():
                flat[f"{group}_{k}"] = v
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"unknown backbone setting(s) {unknown}; expected some of {sorted(known)}")
        return cls(**flat)


class Preprocessor:
    """PIL image -> two uint8 CHW crops (CLIP's and DINOv2's); picklable for DataLoader workers.

    Only the geometric part runs here (resize + centre crop, or the whole frame squashed); scaling to [0, 1] and mean/std happen in
    :meth:`DualBackbone.encode` on the device, so workers ship 4x fewer bytes and the GPU does the maths.
    """

    def __init__(self, clip_cfg: dict[str, Any], dino_cfg: dict[str, Any] | None):
        self.clip_cfg, self.dino_cfg = clip_cfg, dino_cfg  # dino_cfg None: CLIP only
        self._clip = _geometric(clip_cfg)
        self._dino = _geometric(dino_cfg) if dino_cfg is not None else None

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (clip (3, S, S) uint8, dino (3, S, S) uint8, or None for a CLIP-only backbone)."""
        img = img.convert("RGB")
        return _to_chw(self._clip(img)), (_to_chw(self._dino(img)) if self._dino is not None else None)

    def __getstate__(self):
        return {"clip_cfg": self.clip_cfg, "dino_cfg": self.dino_cfg}

    def __setstate__(self, state):
        self.__init__(state["clip_cfg"], state["dino_cfg"])

    def __repr__(self) -> str:
        return f"Preprocessor(clip={self.clip_cfg}, dino={self.dino_cfg})"


def _geometric(cfg: dict[str, Any]):
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[cfg["interpolation"]]
    if cfg["resize_mode"] == "shortest":
        return T.Compose([T.Resize(cfg["resize_px"], interpolation=interp), T.CenterCrop(cfg["crop_px"])])
    if cfg["resize_mode"] == "squash":
        return T.Resize((cfg["crop_px"], cfg["crop_px"]), interpolation=interp)
    raise BackboneError(f"unsupported resize_mode {cfg['resize_mode']!r}; expected 'shortest' or 'squash'")


def _to_chw(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


class DualBackbone(nn.Module):
    """Frozen CLIP visual tower + DINOv2; ``encode`` gives (B, Dc) and (B, Dd) float32 features.

    ``dino=None`` is the CLIP tower alone: ``dims == (Dc, 0)`` and ``encode`` gives (B, 0) DINOv2 features."""

    def __init__(self, cfg: BackboneConfig, clip_visual: nn.Module, dino: nn.Module | None, preprocessor: Preprocessor,
                 sources: dict[str, str | None]):
        super().__init__()
        self.cfg = cfg
        self.clip = clip_visual.eval().requires_grad_(False)
        self.dino = dino.eval().requires_grad_(False) if dino is not None else None
        self.preprocessor = preprocessor
        self.sources = sources
        self.bf16 = False
        self._encoders = (self.clip, self.dino)
        for name, pp in (("clip", preprocessor.clip_cfg), ("dino", preprocessor.dino_cfg)):
            if pp is not None:
                self.register_buffer(f"{name}_mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
                self.register_buffer(f"{name}_std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)
        self.dims = (int(clip_visual.output_dim), 0 if dino is None else
                     int(dino.output_dim) if cfg.second_is_open_clip else int(dino.config.hidden_size))
        self._weights_sha256: dict[str, str] | None = None

    def train(self, mode: bool = True) -> "DualBackbone":
        return super().train(False)  # frozen: dropout and friends stay off whatever the caller asks

    @property
    def device(self) -> torch.device:
        return self.clip_mean.device

    @property
    def has_dino(self) -> bool:
        return self.dino is not None

    def preprocess(self, img) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PIL image -> (clip (3, S, S) uint8, dino (3, S, S) uint8 or None without DINOv2)."""
        return self.preprocessor(img)

    def set_precision(self, bf16: bool) -> None:
        """bf16 autocast on CUDA (the weights stay float32); ignored on CPU, where fp32 is exact and deterministic."""
        self.bf16 = bool(bf16) and self.device.type == "cuda"

    def compile_encoders(self, **kwargs) -> None:
        """torch.compile both encoders for ``encode``; ``state_dict`` keeps its plain keys."""
        self._encoders = tuple(torch.compile(m, **kwargs) if m is not None else None for m in (self.clip, self.dino))

    @torch.inference_mode()
    def encode(self, clip_bchw: torch.Tensor, dino_bchw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (or [0, 1] float) crops from :meth:`preprocess` -> (clip (B, Dc), dino (B, Dd)) float32.

        Without DINOv2 ``dino_bchw`` is ignored (None is fine) and the DINOv2 features are (B, 0)."""
        dev = self.device
        x_clip = self._normalise(clip_bchw.to(dev, non_blocking=True), self.clip_mean, self.clip_std)
        clip_enc, dino_enc = self._encoders
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            f_clip = clip_enc(x_clip)  # (B, 3, S, S) -> (B, Dc): open_clip's projected image embedding
            if dino_enc is None:
                f_dino = f_clip.new_zeros((f_clip.shape[0], 0))  # (B, 0)
            else:
                x_dino = self._normalise(dino_bchw.to(dev, non_blocking=True), self.dino_mean, self.dino_std)
                if self.cfg.second_is_open_clip:
                    f_dino = dino_enc(x_dino)  # (B, 3, S, S) -> (B, Dd): the tower's projected image embedding
                else:
                    # pooler_output = CLS token after the final layernorm, read by name rather than by tuple
                    # position, so a transformers release that reorders the outputs cannot swap them.
                    f_dino = dino_enc(pixel_values=x_dino).pooler_output  # (B, 3, S, S) -> (B, Dd)
        return f_clip.float(), f_dino.float()

    @staticmethod
    def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - mean) / std

    def weights_sha256(self) -> dict[str, str]:
        """sha256 of each encoder's state dict (names, dtypes, shapes, values): the weights' identity."""
        if self._weights_sha256 is None:
            self._weights_sha256 = {"clip": sha256_state(self.clip),
                                    "dino": sha256_state(self.dino) if self.dino is not None else None}
        return self._weights_sha256

    def fingerprint(self) -> dict[str, Any]:
        """Everything that shapes the features: config, weights' hashes, dims, preprocessing, compute dtype.

        ``resize`` is recorded (config and each backbone's preprocessing) when it is "squash"; "crop" is what
        every store was made with before the option existed, so it is left out and those stores keep their key."""
        sha = self.weights_sha256()
        config = asdict(self.cfg)
        if config["resize"] == "crop":
            del config["resize"]
        if not self.cfg.second_is_open_clip:  # stores made before the second slot could be swapped keep their key
            for k in ("dino_kind", "dino_arch", "dino_pretrained"):
                del config[k]
        else:
            del config["dino_name"]
        return {
            "config": config,
            "clip": {"arch": self.sources["clip_arch"], "weights": self.sources["clip"], "weights_sha256": sha["clip"],
                     "dim": self.dims[0], "output": "projected image embedding"},
            "dino": {"name": self.sources["dino_name"], "weights": self.sources["dino"], "weights_sha256": sha["dino"],
                     "dim": self.dims[1],
                     "output": "projected image embedding" if self.cfg.second_is_open_clip else "pooler_output"},
            "preprocessing": {"clip": self.preprocessor.clip_cfg, "dino": self.preprocessor.dino_cfg},
            "compute_dtype": "bfloat16" if self.bf16 else "float32",
        }

    def extra_repr(self) -> str:
        return f"preset={self.cfg.preset!r}, dims={self.dims}, sources={self.sources}"


def build_backbones(cfg: BackboneConfig, device: str | torch.device = "cpu", *, dino: bool = True) -> DualBackbone:
    """Build the frozen encoders for ``cfg`` on ``device`` (``dino=False``: CLIP only); raises
    :class:`BackboneError` with a fix."""
    # Random presets draw from a private RNG so building a backbone never shifts the caller's stream.
    quiet = cfg.preset != "real"  # open_clip logs a warning for every random model; here that is the intent
    previous = logging.root.manager.disable
    dino_model, dino_pp, dino_src = None, None, None
    with torch.random.fork_rng(devices=[]):
        if quiet:
            logging.disable(logging.WARNING)
        try:
            torch.manual_seed(cfg.seed)
            clip_visual, clip_pp, clip_src = _build_clip(cfg)
            if dino:
                torch.manual_seed(cfg.seed + 1)
                dino_model, dino_pp, dino_src = _build_second_open_clip(cfg) if cfg.second_is_open_clip else _build_dino(cfg)
        finally:
            logging.disable(previous)
    tiny = cfg.preset == "tiny"
    if cfg.second_is_open_clip:
        dino_name = "vidtag-tiny-vit-2" if tiny else cfg.dino_arch
    else:
        dino_name = "vidtag-tiny-dinov2" if tiny else (cfg.dino_name if cfg.preset == "real" else "dinov2-large")
    sources = {"clip": clip_src, "dino": dino_src, "clip_arch": "vidtag-tiny-vit" if tiny else cfg.clip_arch,
               "dino_name": dino_name if dino else None}
    bb = DualBackbone(cfg, clip_visual, dino_model, Preprocessor(clip_pp, dino_pp), sources)
    return bb.to(device)


def _build_clip(cfg: BackboneConfig) -> tuple[nn.Module, dict[str, Any], str]:
    return _build_open_clip_tower(cfg, cfg.clip_arch, cfg.clip_pretrained, cfg.clip_quick_gelu, TINY_CLIP["embed_dim"],
                                  "backbone.clip.pretrained")


def _build_second_open_clip(cfg: BackboneConfig) -> tuple[nn.Module, dict[str, Any], str]:
    """The second slot filled by an open_clip image tower (Table 6: SigLIP). QuickGELU only for OpenAI's
    own weights (the tag ``openai``), which were trained with it; SigLIP and most others use GELU."""
    return _build_open_clip_tower(cfg, cfg.dino_arch, cfg.dino_pretrained, cfg.dino_pretrained == "openai",
                                  TINY_SECOND_DIM, "backbone.dino.pretrained")


def _build_open_clip_tower(cfg: BackboneConfig, arch: str, pretrained: str, quick_gelu: bool, tiny_dim: int,
                           setting: str) -> tuple[nn.Module, dict[str, Any], str]:
    """An open_clip model's image tower (random for the tiny / real-arch presets) and its preprocessing."""
    import open_clip

    kwargs: dict[str, Any] = {"force_quick_gelu": quick_gelu}
    if cfg.preset == "tiny":
        base = open_clip.get_model_config("ViT-B-16")
        vision = {**base["vision_cfg"], **TINY_CLIP["vision_cfg"], "image_size": cfg.image_size}
        text = {**base["text_cfg"], **TINY_CLIP["text_cfg"]}
        # Same factory as the real model; the architecture is data (open_clip's model_kwargs override).
        model = open_clip.create_model("ViT-B-16", pretrained=None, embed_dim=tiny_dim,
                                       vision_cfg=vision, text_cfg=text, **kwargs)
        src = f"random(seed={cfg.seed})"
    elif cfg.preset == "real-arch":
        model = open_clip.create_model(arch, pretrained=None, **kwargs)
        src = f"random(seed={cfg.seed})"
    else:
        if _is_file_spec(pretrained):
            if not os.path.isfile(pretrained):
                raise BackboneError(f"open_clip checkpoint {pretrained!r} ({setting}) does not exist; "
                                    "point it at a local open_clip checkpoint file, or use a pretrained tag")
            file, tag_cfg = pretrained, _preprocess_beside(Path(pretrained))
        else:
            found = clip_weights_file(arch, pretrained)
            if found.path is None:
                raise BackboneError(found.missing_message())
            file, tag_cfg = str(found.path), found.preprocess
        try:
            # A local file, never a tag: open_clip would ask the hub first. The tag's own preprocessing is
            # passed on, so the model is configured exactly as create_model(arch, pretrained=tag) would be.
            model = open_clip.create_model(arch, pretrained=file, force_preprocess_cfg=tag_cfg, **kwargs)
        except Exception as e:  # a truncated file, or weights of another architecture
            raise BackboneError(f"cannot load open_clip {arch} weights from {file} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); delete it and fetch it again") from None
        src = pretrained
    visual = model.visual
    pp = dict(visual.preprocess_cfg)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    if cfg.preset != "tiny" and size != cfg.image_size:
        raise BackboneError(f"open_clip {arch} expects {size} px images but backbone.image_size is "
                            f"{cfg.image_size}; set backbone.image_size: {size}")
    resize_mode = "squash" if cfg.resize == "squash" else (pp.get("resize_mode") or "shortest")
    tower_pp = {"resize_px": int(size), "crop_px": int(size), "resize_mode": resize_mode,
                "interpolation": pp.get("interpolation") or "bicubic",
                "mean": [float(m) for m in pp["mean"]], "std": [float(s) for s in pp["std"]]}
    return visual, tower_pp, src


def _build_dino(cfg: BackboneConfig) -> tuple[nn.Module, dict[str, Any], str]:
    from transformers import Dinov2Config, Dinov2Model

    crop = cfg.image_size
    resize = int(round(crop * DINO_RESIZE_RATIO))
    mean, std, interp = IMAGENET_MEAN, IMAGENET_STD, "bicubic"
    if cfg.preset in ("tiny", "real-arch"):
        arch = {**TINY_DINO, "image_size": cfg.image_size} if cfg.preset == "tiny" else DINOV2_LARGE
        model = Dinov2Model(Dinov2Config(**arch, attn_implementation="sdpa"))
        src = f"random(seed={cfg.seed})"
    else:
        from transformers import AutoImageProcessor

        found = dino_weights_dir(cfg.dino_name)
        if found.path is None:
            raise BackboneError(f"{found.missing_message()}, or set backbone.dino.name to a local directory holding "
                                f"{', '.join(DINO_FILES)}")
        try:
            # float32 whatever the file holds: transformers 5 would otherwise keep the file's dtype ("auto").
            model = Dinov2Model.from_pretrained(str(found.path), local_files_only=True, attn_implementation="sdpa",
                                                **_float32_kwarg())
            proc = AutoImageProcessor.from_pretrained(str(found.path), local_files_only=True)
        except Exception as e:
            raise BackboneError(f"cannot load DINOv2 {cfg.dino_name!r} from {found.path} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); delete it and fetch it again") from None
        # The processor's own numbers win over our defaults (they travel with the weights).
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        crop_cfg = getattr(proc, "crop_size", None) or {}
        size_cfg = getattr(proc, "size", None) or {}
        proc_crop = int(crop_cfg.get("height", crop))
        if proc_crop != crop:
            raise BackboneError(f"DINOv2 {cfg.dino_name!r} crops {proc_crop} px but backbone.image_size is {crop}; "
                                f"set backbone.image_size: {proc_crop}")
        resize = int(size_cfg.get("shortest_edge", resize))
        interp = {2: "bilinear", 3: "bicubic"}.get(int(getattr(proc, "resample", 3)), "bicubic")
        src = cfg.dino_name
    if cfg.resize == "squash":  # the whole frame to crop x crop: no shorter-side resize, nothing cut away
        resize, mode = crop, "squash"
    else:
        mode = "shortest"
    dino_pp = {"resize_px": resize, "crop_px": crop, "resize_mode": mode, "interpolation": interp,
               "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return model, dino_pp, src


# --- where real weights live ---------------------------------------------------------------------------

CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hub names, safest first
DINO_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")  # what Dinov2Model + its processor read


@dataclass(frozen=True)
class WeightsLocation:
    """Where one set of weights was found, or where it belongs and how to fetch it."""

    what: str  # e.g. "CLIP ViT-L-14 'openai' (open_clip)"
    path: Path | None  # the file or directory found; None = missing
    expected: str  # the file(s) and cache folder looked in
    fetch: str  # the command that fetches them on a connected machine; "" for a local path the user named
    preprocess: dict[str, Any]  # open_clip tag preprocessing (CLIP only), passed on when loading the file

    def missing_message(self) -> str:
        """One line: which file is missing, where it belongs, how to get it."""
        if not self.fetch:
            return f"{self.what} weights not found: expected {self.expected}"
        return (f"{self.what} weights not found: expected {self.expected}; on a connected machine run `{self.fetch}` "
                "and copy that folder into this machine's Hugging Face cache (HF_HOME/hub)")


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (huggingface_hub's own order; read per call, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def hf_repo_folder(repo_id: str) -> Path:
    """The cache folder of a model repo: ``models--{org}--{name}``."""
    return hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _hf_cached(repo_id: str, filename: str) -> Path | None:
    """The cached file of ``repo_id`` at its ``refs/main`` snapshot, without any network call."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=hf_hub_cache_dir())
    except ValueError:  # not a repo id (HFValidationError): nothing of it can be cached
        return None
    return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def _preprocess_beside(checkpoint: Path) -> dict[str, Any]:
    """The preprocessing recorded next to a local open_clip checkpoint: a Hugging Face copy of an open_clip model
    carries ``open_clip_config.json`` with its ``preprocess_cfg`` (SigLIP's mean/std 0.5 and squash differ from
    CLIP's), which open_clip itself reads for ``hf-hub:`` models. Nothing there: open_clip's defaults for the arch."""
    import json

    beside = checkpoint.parent / "open_clip_config.json"
    if not beside.is_file():
        return {}
    try:
        pp = json.loads(beside.read_text()).get("preprocess_cfg") or {}
    except (ValueError, AttributeError) as e:
        raise BackboneError(f"{beside}: not an open_clip config ({type(e).__name__}); delete it or fetch it again") from None
    return {k: pp[k] for k in ("mean", "std", "interpolation", "resize_mode") if pp.get(k) is not None}


def _is_file_spec(pretrained: str) -> bool:
    return os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def clip_weights_file(arch: str, pretrained: str) -> WeightsLocation:
    """The local file open_clip would load for ``create_model(arch, pretrained=tag)``, looked up offline.

    open_clip resolves a tag to a Hugging Face repo and file (``open_clip.get_pretrained_cfg``: ViT-L-14
    ``openai`` is ``timm/vit_large_patch14_clip_224.openai``, ``open_clip_model.safetensors`` preferred over
    ``open_clip_pytorch_model.bin``) and reads it from the hub cache; tags without a hub copy use open_clip's
    URL cache (``~/.cache/clip/<file>``)."""
    import open_clip

    what = f"CLIP {arch} {pretrained!r} (open_clip)"
    if _is_file_spec(pretrained):
        path = Path(pretrained)
        return WeightsLocation(what, path if path.is_file() else None, str(path), "", {})
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise BackboneError(f"open_clip has no pretrained tag {pretrained!r} for {arch} (known: {tags}); "
                            "set backbone.clip.pretrained to one of them or to a local checkpoint file")
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if tag_cfg.get(k) is not None}
    hub = tag_cfg.get("hf_hub") or ""
    if hub:
        repo_id, filename = os.path.split(hub)  # "org/repo/" -> default file names, as open_clip splits it
        names = (filename,) if filename else CLIP_FILES
        if filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        for name in names:
            hit = _hf_cached(repo_id, name)
            if hit is not None:
                return WeightsLocation(what, hit, str(hit), f"hf download {repo_id} {names[0]}", preprocess)
        return WeightsLocation(what, None, f"{names[0]} in {hf_repo_folder(repo_id)}",
                               f"hf download {repo_id} {names[0]}", preprocess)
    url = tag_cfg.get("url") or ""
    path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return WeightsLocation(what, path if path.is_file() else None, str(path),
                           f"python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{pretrained}')\"",
                           preprocess)


def dino_weights_dir(name: str) -> WeightsLocation:
    """The directory Dinov2Model would load ``name`` from: a local directory as given, or the hub cache's
    ``models--{org}--{name}/snapshots/<refs/main>/`` holding :data:`DINO_FILES`; looked up offline."""
    what = f"DINOv2 {name!r} (transformers)"
    local = Path(name).expanduser()
    if local.is_dir() or local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        ok = all((local / f).is_file() for f in DINO_FILES)
        return WeightsLocation(what, local if ok else None, f"{', '.join(DINO_FILES)} in {local}", "", {})
    hits = [_hf_cached(name, f) for f in DINO_FILES]
    fetch = f"hf download {name} {' '.join(DINO_FILES)}"
    if all(h is not None for h in hits):
        return WeightsLocation(what, hits[0].parent, str(hits[0].parent), fetch, {})
    missing = [f for f, h in zip(DINO_FILES, hits) if h is None]
    return WeightsLocation(what, None, f"{', '.join(missing)} in {hf_repo_folder(name)}", fetch, {})


def _float32_kwarg() -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}

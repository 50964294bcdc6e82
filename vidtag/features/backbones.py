"""The dual frame encoder's frozen backbones (Sec. 3.1): CLIP through open_clip, DINOv2 through transformers.

Three presets share one code path (the same classes, preprocessing and ``encode``):
``real`` loads pretrained weights (offline: caches or local paths); ``tiny`` builds small random
models from config with a fixed seed (tests, the demo, and ``predict`` on a demo bundle rebuild the
identical weights); ``real-arch`` builds the ViT-L/14 architectures with random weights (benchmarks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vidtag.errors import BackboneError, ConfigError  # BackboneError re-exported: `from vidtag.features.backbones import BackboneError` works
from vidtag.fingerprint import sha256_state

PRESETS = ("real", "tiny", "real-arch")

# Small but real ViTs: enough depth/width to exercise every layer type, fast on 2 CPU cores.
# Different output dims for the two backbones so a swapped array cannot go unnoticed.
TINY_CLIP = {
    "embed_dim": 32,  # projected image embedding (ViT-L/14: 768)
    "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
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
    image_size: int = 224  # App. A: frames resized to 224x224
    seed: int = 0  # initialises the random presets; ignored by "real"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"backbone preset must be one of {PRESETS}, got {self.preset!r}")
        if self.image_size < 16:
            raise ConfigError(f"backbone image_size must be >= 16 px, got {self.image_size}")

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

    Only the geometric part runs here (resize + centre crop); scaling to [0, 1] and mean/std happen in
    :meth:`DualBackbone.encode` on the device, so workers ship 4x fewer bytes and the GPU does the maths.
    """

    def __init__(self, clip_cfg: dict[str, Any], dino_cfg: dict[str, Any]):
        self.clip_cfg, self.dino_cfg = clip_cfg, dino_cfg
        self._clip = _geometric(clip_cfg)
        self._dino = _geometric(dino_cfg)

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        img = img.convert("RGB")
        return _to_chw(self._clip(img)), _to_chw(self._dino(img))

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
    """Frozen CLIP visual tower + DINOv2; ``encode`` gives (B, Dc) and (B, Dd) float32 features."""

    def __init__(self, cfg: BackboneConfig, clip_visual: nn.Module, dino: nn.Module, preprocessor: Preprocessor,
                 sources: dict[str, str]):
        super().__init__()
        self.cfg = cfg
        self.clip = clip_visual.eval().requires_grad_(False)
        self.dino = dino.eval().requires_grad_(False)
        self.preprocessor = preprocessor
        self.sources = sources
        self.bf16 = False
        self._encoders = (self.clip, self.dino)
        for name, pp in (("clip", preprocessor.clip_cfg), ("dino", preprocessor.dino_cfg)):
            self.register_buffer(f"{name}_mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)
        self.dims = (int(clip_visual.output_dim), int(dino.config.hidden_size))
        self._weights_sha256: dict[str, str] | None = None

    def train(self, mode: bool = True) -> "DualBackbone":
        return super().train(False)  # frozen: dropout and friends stay off whatever the caller asks

    @property
    def device(self) -> torch.device:
        return self.clip_mean.device

    def preprocess(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL image -> (clip (3, S, S) uint8, dino (3, S, S) uint8)."""
        return self.preprocessor(img)

    def set_precision(self, bf16: bool) -> None:
        """bf16 autocast on CUDA (the weights stay float32); ignored on CPU, where fp32 is exact and deterministic."""
        self.bf16 = bool(bf16) and self.device.type == "cuda"

    def compile_encoders(self, **kwargs) -> None:
        """torch.compile both encoders for ``encode``; ``state_dict`` keeps its plain keys."""
        self._encoders = (torch.compile(self.clip, **kwargs), torch.compile(self.dino, **kwargs))

    @torch.inference_mode()
    def encode(self, clip_bchw: torch.Tensor, dino_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (or [0, 1] float) crops from :meth:`preprocess` -> (clip (B, Dc), dino (B, Dd)) float32."""
        dev = self.device
        x_clip = self._normalise(clip_bchw.to(dev, non_blocking=True), self.clip_mean, self.clip_std)
        x_dino = self._normalise(dino_bchw.to(dev, non_blocking=True), self.dino_mean, self.dino_std)
        clip_enc, dino_enc = self._encoders
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            f_clip = clip_enc(x_clip)  # (B, 3, S, S) -> (B, Dc): open_clip's projected image embedding
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
            self._weights_sha256 = {"clip": sha256_state(self.clip), "dino": sha256_state(self.dino)}
        return self._weights_sha256

    def fingerprint(self) -> dict[str, Any]:
        """Everything that shapes the features: config, weights' hashes, dims, preprocessing, compute dtype."""
        sha = self.weights_sha256()
        return {
            "config": asdict(self.cfg),
            "clip": {"arch": self.sources["clip_arch"], "weights": self.sources["clip"], "weights_sha256": sha["clip"],
                     "dim": self.dims[0], "output": "projected image embedding"},
            "dino": {"name": self.sources["dino_name"], "weights": self.sources["dino"], "weights_sha256": sha["dino"],
                     "dim": self.dims[1], "output": "pooler_output"},
            "preprocessing": {"clip": self.preprocessor.clip_cfg, "dino": self.preprocessor.dino_cfg},
            "compute_dtype": "bfloat16" if self.bf16 else "float32",
        }

    def extra_repr(self) -> str:
        return f"preset={self.cfg.preset!r}, dims={self.dims}, sources={self.sources}"


def build_backbones(cfg: BackboneConfig, device: str | torch.device = "cpu") -> DualBackbone:
    """Build both frozen encoders for ``cfg`` on ``device``; raises :class:`BackboneError` with a fix."""
    # Random presets draw from a private RNG so building a backbone never shifts the caller's stream.
    quiet = cfg.preset != "real"  # open_clip logs a warning for every random model; here that is the intent
    previous = logging.root.manager.disable
    with torch.random.fork_rng(devices=[]):
        if quiet:
            logging.disable(logging.WARNING)
        try:
            torch.manual_seed(cfg.seed)
            clip_visual, clip_pp, clip_src = _build_clip(cfg)
            torch.manual_seed(cfg.seed + 1)
            dino, dino_pp, dino_src = _build_dino(cfg)
        finally:
            logging.disable(previous)
    tiny = cfg.preset == "tiny"
    sources = {"clip": clip_src, "dino": dino_src, "clip_arch": "vidtag-tiny-vit" if tiny else cfg.clip_arch,
               "dino_name": "vidtag-tiny-dinov2" if tiny else (cfg.dino_name if cfg.preset == "real" else "dinov2-large")}
    bb = DualBackbone(cfg, clip_visual, dino, Preprocessor(clip_pp, dino_pp), sources)
    return bb.to(device)


def _build_clip(cfg: BackboneConfig) -> tuple[nn.Module, dict[str, Any], str]:
    import open_clip

    kwargs: dict[str, Any] = {"force_quick_gelu": cfg.clip_quick_gelu}
    if cfg.preset == "tiny":
        base = open_clip.get_model_config("ViT-B-16")
        vision = {**base["vision_cfg"], **TINY_CLIP["vision_cfg"], "image_size": cfg.image_size}
        text = {**base["text_cfg"], **TINY_CLIP["text_cfg"]}
        # Same factory as the real model; the architecture is data (open_clip's model_kwargs override).
        model = open_clip.create_model("ViT-B-16", pretrained=None, embed_dim=TINY_CLIP["embed_dim"],
                                       vision_cfg=vision, text_cfg=text, **kwargs)
        src = f"random(seed={cfg.seed})"
    elif cfg.preset == "real-arch":
        model = open_clip.create_model(cfg.clip_arch, pretrained=None, **kwargs)
        src = f"random(seed={cfg.seed})"
    else:
        pretrained = cfg.clip_pretrained
        if os.path.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")):
            if not os.path.isfile(pretrained):
                raise BackboneError(f"CLIP checkpoint {pretrained!r} (backbone.clip.pretrained) does not exist; "
                                    "point it at a local open_clip checkpoint file, or use the tag 'openai'")
        try:
            model = open_clip.create_model(cfg.clip_arch, pretrained=pretrained, **kwargs)
        except Exception as e:  # open_clip raises RuntimeError/OSError/ValueError depending on what is missing
            hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
            raise BackboneError(
                f"cannot load CLIP {cfg.clip_arch} weights {pretrained!r} offline ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Either download them once on a connected machine "
                f"(python -c \"import open_clip; open_clip.create_model('{cfg.clip_arch}', pretrained='{pretrained}')\") "
                f"so they land in the Hugging Face cache under {hf_home}/hub (HF_HOME), or set backbone.clip.pretrained "
                "to a local checkpoint file; for a demo without weights use backbone.preset=tiny") from None
        src = pretrained
    visual = model.visual
    pp = dict(visual.preprocess_cfg)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    if cfg.preset != "tiny" and size != cfg.image_size:
        raise BackboneError(f"CLIP {cfg.clip_arch} expects {size} px images but backbone.image_size is "
                            f"{cfg.image_size}; set backbone.image_size: {size}")
    resize_mode = pp.get("resize_mode") or "shortest"
    clip_pp = {"resize_px": int(size), "crop_px": int(size), "resize_mode": resize_mode,
               "interpolation": pp.get("interpolation") or "bicubic",
               "mean": [float(m) for m in pp["mean"]], "std": [float(s) for s in pp["std"]]}
    return visual, clip_pp, src


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

        try:
            model = Dinov2Model.from_pretrained(cfg.dino_name, local_files_only=True, attn_implementation="sdpa")
            proc = AutoImageProcessor.from_pretrained(cfg.dino_name, local_files_only=True)
        except Exception as e:
            hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
            raise BackboneError(
                f"cannot load DINOv2 {cfg.dino_name!r} offline ({type(e).__name__}). Either download it once on a "
                f"connected machine (huggingface-cli download {cfg.dino_name}) so it lands in {hf_home}/hub "
                "(HF_HOME), or set backbone.dino.name to a local directory holding config.json, "
                "model.safetensors and preprocessor_config.json; for a demo without weights use "
                "backbone.preset=tiny") from None
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
    dino_pp = {"resize_px": resize, "crop_px": crop, "resize_mode": "shortest", "interpolation": interp,
               "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return model, dino_pp, src

"""Model configs: frozen dataclasses whose defaults are the paper's settings, the source beside each."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vidtag.errors import ConfigError


@dataclass(frozen=True)
class LocationEncoderConfig:
    """GeoCLIP's location encoder (Sec. 3.3); widths are GeoCLIP's so its weights load."""

    sigmas: tuple[float, ...] = (2.0**0, 2.0**3, 2.0**8)  # Table 9 best; GeoCLIP ships (2^0, 2^4, 2^8)
    rff_dim: int = 256  # GeoCLIP GaussianEncoding(encoded_size=256) -> cos/sin 512
    hidden_dim: int = 1024  # GeoCLIP capsule: 512 -> 1024 -> 1024 -> 1024 (ReLU) -> head 512
    n_hidden: int = 3  # GeoCLIP: three Linear+ReLU layers per capsule
    out_dim: int = 512  # GeoCLIP / Sec. 3.3: shared 512-d embedding space


FRAME_BACKBONES = ("clip", "dino")  # the dual frame encoder's two feature sources (Sec. 3.1), in concatenation order


@dataclass(frozen=True)
class FrameEncoderConfig:
    """Dual-backbone fusion + TempGeo + MLP (Sec. 3.1-3.2, Appendix B.2)."""

    clip_dim: int = 768  # CLIP ViT-L/14 projected embedding (Appendix B.2); from store attrs in practice
    dino_dim: int = 1024  # DINOv2 ViT-L/14 CLS (Appendix B.2); from store attrs in practice
    tempgeo_layers: int = 2  # Appendix A: "TempGeo module has 2 transformer encoder layers"; 0 = no-time ablation
    tempgeo_heads: int = 8  # paper silent; 1792 / 8 = 224 per head
    tempgeo_ff_dim: int = 2048  # paper silent; PyTorch's nn.TransformerEncoderLayer default
    dropout: float = 0.1  # Sec. 3.2 "uses dropout", rate not given; PyTorch default
    max_positions: int = 16  # learned table = training length (Appendix A); longer inputs interpolate it
    mlp_dims: tuple[int, ...] = (1024, 768)  # Appendix B.2: 1792 -> 1024 -> 768 -> 512, Mish between
    out_dim: int = 512  # = location encoder out_dim
    mlp_first: bool = False  # DEDD-SEQ README order (MLP, then TempGeo at out_dim); paper order is False
    # Sec. 3.1: both backbones' features, concatenated. ("clip",) or ("dino",) is Table 4's one-backbone ablation:
    # the other backbone's features are still read (the store and `predict` extract both) but never used.
    backbones: tuple[str, ...] = ("clip", "dino")

    def __post_init__(self):
        chosen = tuple(self.backbones)
        if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(FRAME_BACKBONES):
            raise ConfigError(f"FrameEncoderConfig: backbones {list(chosen)}; expected a non-empty subset of "
                              f"{list(FRAME_BACKBONES)} without repeats (e.g. [clip, dino], or [dino] for Table 4's DINOv2 rows)")
        # one order whatever the params say: [dino, clip] is the same model as [clip, dino] (clip first, Sec. 3.1)
        object.__setattr__(self, "backbones", tuple(b for b in FRAME_BACKBONES if b in chosen))

    @property
    def backbone_dims(self) -> dict[str, int]:
        """Feature width of each backbone the encoder reads, in concatenation order."""
        dims = {"clip": self.clip_dim, "dino": self.dino_dim}
        return {b: dims[b] for b in self.backbones}

    @property
    def in_dim(self) -> int:
        return sum(self.backbone_dims.values())


@dataclass(frozen=True)
class GeoRefinerConfig:
    """Encoder-decoder over frame embeddings (memory) and GPS embeddings (queries), Sec. 3.4."""

    width: int = 512  # Sec. 3.4: width matches the 512-d embedding space
    heads: int = 8  # paper silent; PyTorch nn.Transformer default
    encoder_layers: int = 1  # Appendix A
    decoder_layers: int = 2  # Appendix A
    ff_dim: int = 2048  # paper silent; PyTorch default
    dropout: float = 0.1  # paper silent; PyTorch default
    # What ties decoder query t to frame t (paper silent, see GeoRefiner): "position" = learned rank
    # positions on encoder inputs and queries, "frame" = query t += Linear(frame embedding t), "both";
    # "none" is the paper-literal refiner (ablation): identical queries give identical outputs.
    query_link: str = "both"
    max_positions: int = 16  # learned table = training length (Appendix A: 16 frames); longer inputs interpolate it
    # What the decoder outputs (see GeoRefiner): "embedding" = a free 512-d GPS embedding (Sec. 3.4, the paper);
    # "offset" = a bounded km correction of each query's GPS, re-embedded by the frozen location encoder (beyond the paper).
    output: str = "embedding"
    max_offset_km: float = 5.0  # "offset": the largest correction per coordinate (north, east)

    def __post_init__(self):
        if self.output not in ("embedding", "offset"):
            raise ConfigError(f"GeoRefinerConfig: output {self.output!r}; expected 'embedding' or 'offset'")
        if not self.max_offset_km > 0:
            raise ConfigError(f"GeoRefinerConfig: max_offset_km must be > 0, got {self.max_offset_km}")
        if self.query_link not in ("none", "position", "frame", "both"):
            raise ConfigError(f"GeoRefinerConfig: query_link {self.query_link!r}; expected 'none', 'position', 'frame' or 'both'")
        if self.max_positions < 1:
            raise ConfigError(f"GeoRefinerConfig: max_positions must be >= 1, got {self.max_positions}")


@dataclass(frozen=True)
class VidTAGConfig:
    """Everything needed to rebuild the model; stored as ``to_dict()`` in checkpoints and bundles."""

    frame: FrameEncoderConfig = field(default_factory=FrameEncoderConfig)
    location: LocationEncoderConfig = field(default_factory=LocationEncoderConfig)
    refiner: GeoRefinerConfig = field(default_factory=GeoRefinerConfig)
    logit_scale_init: float = 2.6592600  # ln(1/0.07), CLIP's init, which GeoCLIP also uses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VidTAGConfig:
        """Inverse of ``to_dict``; unknown keys are an error so a typo in params is never ignored."""
        d = dict(d)
        location = dict(d.pop("location", {}) or {})
        location.pop("pretrained", None)  # older bundles kept the init source here; it is not architecture
        parts = {
            "frame": _build(FrameEncoderConfig, d.pop("frame", {})),
            "location": _build(LocationEncoderConfig, location),
            "refiner": _build(GeoRefinerConfig, d.pop("refiner", {})),
        }
        return _build(cls, d, **parts)


def _build(klass, values: dict[str, Any] | None, **extra):
    """Construct a config dataclass from a plain dict, turning lists into tuples, refusing unknown keys."""
    values = dict(values or {})
    names = {f.name for f in fields(klass)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{klass.__name__}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return klass(**values, **extra)


def build_config(klass, values: dict[str, Any] | None):
    """Public twin of ``_build`` for train configs read from params sections."""
    return _build(klass, values)

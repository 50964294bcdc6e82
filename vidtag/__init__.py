"""vidtag: frame-wise video geolocalization (VidTAG) over a cached-feature pipeline."""

__version__ = "0.1.0"

"""Frozen CLIP + DINOv2 features (Sec. 3.1), cached once in a Zarr v3 store for training and evaluation."""

from vidtag.features.backbones import BackboneConfig, BackboneError, DualBackbone, build_backbones
from vidtag.features.store import Features, FeatureStoreError, load_features

__all__ = ["BackboneConfig", "BackboneError", "DualBackbone", "build_backbones", "Features", "FeatureStoreError",
           "load_features"]

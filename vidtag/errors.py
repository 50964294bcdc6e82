"""Every error a user can cause derives from :class:`VidtagError`: the CLI and the stage runner catch
that one class and print one line. Each subclass also derives from the builtin it refines, so code that
catches ``ValueError`` / ``RuntimeError`` keeps working."""

from __future__ import annotations


class VidtagError(Exception):
    """Base of every error a user can cause: bad input, missing files or weights, mismatched caches."""


class ManifestError(VidtagError, ValueError):
    """A dataset layout or manifest that cannot be read or violates the manifest schema."""


class FeatureStoreError(VidtagError, ValueError):
    """A feature store that is missing, incomplete, or made with other backbones or another manifest."""


class BackboneError(VidtagError, RuntimeError):
    """Backbone weights that cannot be found or built (offline hub, missing cache, bad config)."""


class GalleryError(VidtagError, ValueError):
    """A gallery that cannot be built or read, or was changed after it was written."""


class GalleryCacheError(VidtagError, RuntimeError):
    """A cached gallery-embedding file that does not belong to this (model, gallery) pair."""


class RetrievalError(VidtagError, ValueError):
    """Bad retrieval input (shapes, non-finite values, k) or an unusable backend."""


class DeviceError(VidtagError, ValueError):
    """A device name that is unknown or not available on this machine."""


class BundleError(VidtagError, ValueError):
    """A model bundle directory that is incomplete, corrupted, or does not match its config."""


class CheckpointError(VidtagError, ValueError):
    """A training checkpoint that is incomplete or does not match the model it is restored into."""


class TrainingError(VidtagError, RuntimeError):
    """Training cannot go on (non-finite loss, no data, inconsistent configs)."""


class CheckpointMismatchError(TrainingError):
    """The checkpoint to resume from was written with another model, config or data."""


class InferenceError(VidtagError, ValueError):
    """Inputs that do not fit the model or each other (shapes, offsets, empty gallery)."""


class PredictError(VidtagError, RuntimeError):
    """A video or folder that cannot be predicted, or a bundle whose backbones cannot be rebuilt."""


class EvaluationError(VidtagError, ValueError):
    """The inputs of an evaluation run do not fit together (split empty, rows misaligned)."""


class ConfigError(VidtagError, ValueError):
    """A params section or config with unknown keys or values outside what the method allows."""


class LockError(VidtagError, RuntimeError):
    """Another live process is writing the same output (its lock names it); one writer at a time."""


class VizError(VidtagError, ValueError):
    """A map or plot that cannot be drawn: an unknown file format, no coordinate to draw, mismatched inputs."""

"""VidTAG training from the feature cache: Phase I (contrastive) and Phase II (GeoRefiner), Sec. 3.5 / Appendix A."""

from vidtag.train.noise import NoiseConfig, corrupt_gps
from vidtag.train.phase1 import CheckpointMismatchError, Phase1Config, TrainingError, load_phase1, train_phase1
from vidtag.train.phase2 import Phase2Config, train_phase2

__all__ = ["CheckpointMismatchError", "NoiseConfig", "Phase1Config", "Phase2Config", "TrainingError", "corrupt_gps", "load_phase1", "train_phase1", "train_phase2"]

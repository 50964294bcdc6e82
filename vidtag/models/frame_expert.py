"""The per-frame expert (beyond the paper, App. L): Phase I's model without TempGeo, trained beside it.

TempGeo attends over a whole drive, which places the drive well (the toy world: every drive in the right city)
but blurs where along the drive each frame is; the same encoder without TempGeo (Table 4's "no TempGeo" row)
places each frame on its own, noisily (some frames in other cities), but keeps the along-drive signal. Fig. 5's
retrievals score a gallery point by both: ``exp(s) cos(frame, gps) + w exp(s') cos'(frame, gps)``, a product of
the two models' softmax distributions over the gallery (their normalisers do not change the ranking), which is
one inner product of concatenated embeddings, so the FAISS index and every later step (candidates, decoding,
refinement) work on it unchanged (vidtag.inference). ``w`` is ``eval.expert_weight``; 0 is Fig. 5 as published.
"""

from __future__ import annotations

import torch
from torch import nn

from vidtag.models.config import VidTAGConfig
from vidtag.models.frame_encoder import FrameEncoder
from vidtag.models.location_encoder import LocationEncoder


class FrameExpert(nn.Module):
    """A TempGeo-less frame encoder, its own location encoder and logit scale (a Phase I model's parts)."""

    def __init__(self, frame_encoder: FrameEncoder, location_encoder: LocationEncoder, logit_scale: torch.Tensor):
        super().__init__()
        if frame_encoder.tempgeo is not None:
            raise ValueError("a frame expert embeds each frame alone: its frame encoder must have tempgeo_layers: 0")
        self.frame_encoder = frame_encoder
        self.location_encoder = location_encoder
        self.logit_scale = nn.Parameter(logit_scale.detach().float().reshape(()).clone(), requires_grad=False)

    @classmethod
    def build(cls, cfg: VidTAGConfig) -> FrameExpert:
        """Modules of ``cfg``'s shapes (random weights, to load a saved expert into)."""
        return cls(FrameEncoder(cfg.frame), LocationEncoder(cfg=cfg.location), torch.zeros(()))


def expert_config(model_cfg: VidTAGConfig) -> VidTAGConfig:
    """The expert's config for a Phase I model config: the same frame MLP and location encoder, no TempGeo."""
    d = model_cfg.to_dict()
    return VidTAGConfig.from_dict({**d, "frame": {**d["frame"], "tempgeo_layers": 0}})


class ConcatLocationEncoder(nn.Module):
    """GPS -> [main embedding, expert embedding], each unit: the gallery side of the product of experts."""

    def __init__(self, main: nn.Module, expert: nn.Module):
        super().__init__()
        self.main, self.expert = main, expert

    def forward(self, latlon: torch.Tensor) -> torch.Tensor:
        a = nn.functional.normalize(self.main(latlon).float(), dim=-1)
        b = nn.functional.normalize(self.expert(latlon).float(), dim=-1)
        return torch.cat([a, b], dim=-1)

"""Frame encoder (Sec. 3.1-3.2, Appendix B.2): L2-norm each backbone, concat, TempGeo, MLP -> unit 512-d.

Table 4's ablations are configs of this one module: ``tempgeo_layers=0`` drops TempGeo (every frame alone) and
``backbones=("dino",)`` / ``("clip",)`` reads one backbone's features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidtag.models.config import FrameEncoderConfig
from vidtag.models.positions import interpolated_positions


class TempGeo(nn.Module):
    """Pre-norm transformer encoder with learned temporal positions; full self-attention, no causal mask.

    The position table has ``max_positions`` rows (the training length). A sequence of T <= max_positions
    frames uses rows 0..T-1; a longer one (validation videos run to 494 frames, Appendix C) uses the table
    linearly interpolated to T rows, so the first and last frames keep the first and last positions and
    order is preserved. Training samples frames as a sorted subset spanning the whole video
    (vidtag.train.batches), so positions encode order within the video rather than a fixed frame rate,
    which is what interpolation assumes.
    """

    def __init__(self, width: int, cfg: FrameEncoderConfig):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(cfg.max_positions, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=cfg.tempgeo_heads,
            dim_feedforward=cfg.tempgeo_ff_dim,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,  # Sec. 3.2 "standard pre-normalization"
        )
        # enable_nested_tensor is off: it is a fast path only for post-norm and warns otherwise.
        self.encoder = nn.TransformerEncoder(layer, cfg.tempgeo_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def positions(self, t: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Position embeddings (B, T, D) for frames padded to ``t`` (``pad_mask`` (B, T) True = pad).

        A frame's position is its rank among its sequence's unpadded frames, and a sequence of L of them
        longer than the table uses the table interpolated to L rows. So where the padding sits never changes
        the real frames' positions: a sequence with a masked frame is the same as that sequence without it.
        """
        return interpolated_positions(self.pos, pad_mask, t)

    def forward(self, z: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.dropout(z + self.positions(z.shape[1], pad_mask))  # (B, T, D)
        return self.encoder(x, src_key_padding_mask=pad_mask)  # (B, T, D)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.Mish())  # Appendix B.2: Mish between layers, none after the last
    return nn.Sequential(*layers)


class FrameEncoder(nn.Module):
    """clip (B, T, Dc), dino (B, T, Dd), pad_mask (B, T) True=pad -> (B, T, out_dim) unit-norm."""

    def __init__(self, cfg: FrameEncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FrameEncoderConfig()
        mlp_dims = [cfg.in_dim, *cfg.mlp_dims, cfg.out_dim]
        self.mlp = _mlp(mlp_dims)
        # tempgeo_layers=0 is the no-time ablation: every frame is embedded alone (GeoCLIP-style).
        self.tempgeo = TempGeo(cfg.out_dim if cfg.mlp_first else cfg.in_dim, cfg) if cfg.tempgeo_layers > 0 else None

    def fuse(self, clip: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
        """Sec. 3.1: each backbone L2-normalised, then concatenated (B, T, Dc + Dd).

        Only the backbones in ``cfg.backbones`` are used (Table 4's one-backbone rows: (B, T, Dd) or (B, T, Dc));
        both inputs are still checked against the dims the model was trained with."""
        if clip.shape[-1] != self.cfg.clip_dim or dino.shape[-1] != self.cfg.dino_dim:
            raise ValueError(
                f"feature dims ({clip.shape[-1]}, {dino.shape[-1]}) do not match the model's "
                f"(clip_dim={self.cfg.clip_dim}, dino_dim={self.cfg.dino_dim}); were the features extracted "
                "with the backbones this model was trained on?"
            )
        features = {"clip": clip, "dino": dino}
        return torch.cat([F.normalize(features[b].float(), dim=-1) for b in self.cfg.backbones], dim=-1)

    def forward(self, clip: torch.Tensor, dino: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        z = self.fuse(clip, dino)  # (B, T, Dc + Dd)
        if self.tempgeo is None:
            z = self.mlp(z)  # (B, T, in) -> (B, T, out), no temporal context
        elif self.cfg.mlp_first:
            z = self.tempgeo(self.mlp(z), pad_mask)  # (B, T, in) -> (B, T, out)
        else:
            z = self.mlp(self.tempgeo(z, pad_mask))  # (B, T, in) -> (B, T, out)
        return F.normalize(z, dim=-1)

"""GeoRefiner (Sec. 3.4): encoder over frame embeddings, decoder queried by GPS embeddings, no causal mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidtag.models.config import GeoRefinerConfig


class GeoRefiner(nn.Module):
    """frame_emb (B, T, W), gps_emb (B, T, W), pad_mask (B, T) True=pad -> refined GPS embeddings (B, T, W) unit-norm.

    Pre-norm layers, so the decoder's residual stream starts at the (normalised) GPS query: an identity
    refinement is easy to represent and training only has to learn the correction. There is no final
    LayerNorm on the decoder output (nn.Transformer adds one) because the output is L2-normalised anyway
    and LayerNorm's mean-centring would change cosine geometry; this is our choice, the paper is silent.
    Decoder inputs carry no positional embedding: GPS and frames are aligned by index and the encoder's
    memory is already ordered by TempGeo.
    """

    def __init__(self, cfg: GeoRefinerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GeoRefinerConfig()
        enc = nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(cfg.width, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, cfg.encoder_layers, norm=nn.LayerNorm(cfg.width), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, cfg.decoder_layers)

    def forward(self, frame_emb: torch.Tensor, gps_emb: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encoder(frame_emb, src_key_padding_mask=pad_mask)  # (B, T, W)
        query = F.normalize(gps_emb, dim=-1)  # location-encoder outputs are unnormalised
        out = self.decoder(query, memory, tgt_key_padding_mask=pad_mask, memory_key_padding_mask=pad_mask)  # (B, T, W)
        return F.normalize(out, dim=-1)

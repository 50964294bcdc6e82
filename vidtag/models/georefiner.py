"""GeoRefiner (Sec. 3.4): encoder over frame embeddings, decoder queried by GPS embeddings, no causal mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidtag.models.config import GeoRefinerConfig
from vidtag.models.positions import interpolated_positions


class GeoRefiner(nn.Module):
    """frame_emb (B, T, W), gps_emb (B, T, W), pad_mask (B, T) True=pad -> refined GPS embeddings (B, T, W) unit-norm.

    **Query t knows its frame** (``cfg.query_link``; Sec. 3.4 is silent on positions in the GeoRefiner).
    Read literally, the decoder queries are the bare GPS embeddings: no position and no tie to their frame.
    Then the decoder is permutation-equivariant over queries and cross-attention cannot tell which frame a
    query belongs to, so identical queries give identical outputs whatever the frames show. Identical
    queries are common: Phase I returns the same gallery point for several frames, and Appendix A's
    "collapsed" noise (10 %) makes a whole training sequence one point, which the literal refiner can never
    un-collapse: its outputs stay one point. Default ``"both"``:

    * ``"frame"``: query t += Linear(frame embedding t), the explicit link. It gives query t the visual
      evidence of its own frame, whatever the sequence length, and frame and GPS embeddings share one space
      (Sec. 3.3). The projection starts at zero, so a fresh refiner starts as the literal one and an identity
      refinement stays easy; training learns how much of the frame to bring in. Alone it keeps the refiner
      equivariant to a joint reordering of frames and queries (order reaches it only through TempGeo).
    * ``"position"``: TempGeo's learned positions (vidtag.models.positions: ``max_positions`` rows, a
      frame's position is its rank among the unpadded frames, longer sequences interpolate the table), added
      to the encoder inputs and to the queries, one shared table, so query t and memory slot t carry the
      same position. This gives the refiner's own attention the order of the trajectory (the frame link
      alone does not). Alone it is a weak link: query t must learn to find memory slot t by position, which
      blurs where interpolation packs a long video's positions close together, and in the tests' short
      un-collapse run it does not learn it at all where the frame link does within 100 steps.
    * ``"none"``: the paper-literal refiner, kept as an ablation.

    Masked frames are ranked out, so a masked frame anywhere is the same as a dropped one.

    Pre-norm layers, so the decoder's residual stream starts at the (normalised) GPS query plus its link:
    an identity refinement is easy to represent and training only has to learn the correction. There is no
    final LayerNorm on the decoder output (nn.Transformer adds one) because the output is L2-normalised
    anyway and LayerNorm's mean-centring would change cosine geometry; this is our choice, the paper is silent.
    """

    def __init__(self, cfg: GeoRefinerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GeoRefinerConfig()
        enc = nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(cfg.width, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, cfg.encoder_layers, norm=nn.LayerNorm(cfg.width), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, cfg.decoder_layers)
        # Absent parts are None, so the "none" variant's weights are exactly the literal refiner's.
        self.pos: nn.Parameter | None = None
        self.frame_link: nn.Linear | None = None
        if cfg.query_link in ("position", "both"):
            self.pos = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
            nn.init.normal_(self.pos, std=0.02)  # as TempGeo
        if cfg.query_link in ("frame", "both"):
            self.frame_link = nn.Linear(cfg.width, cfg.width)
            nn.init.zeros_(self.frame_link.weight)  # starts as the literal refiner
            nn.init.zeros_(self.frame_link.bias)

    def forward(self, frame_emb: torch.Tensor, gps_emb: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        src = frame_emb
        query = F.normalize(gps_emb, dim=-1)  # location-encoder outputs are unnormalised
        if self.pos is not None:
            pos = interpolated_positions(self.pos, pad_mask, frame_emb.shape[1]).to(frame_emb.dtype)  # (B|1, T, W)
            src = src + pos
            query = query + pos
        if self.frame_link is not None:
            query = query + self.frame_link(frame_emb)  # (B, T, W): query t carries frame t
        memory = self.encoder(src, src_key_padding_mask=pad_mask)  # (B, T, W)
        out = self.decoder(query, memory, tgt_key_padding_mask=pad_mask, memory_key_padding_mask=pad_mask)  # (B, T, W)
        return F.normalize(out, dim=-1)

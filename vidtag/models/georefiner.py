"""GeoRefiner (Sec. 3.4): encoder over frame embeddings, decoder queried by GPS embeddings, no causal mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidtag.geo import KM_PER_DEG_LAT
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

    **What it outputs** (``cfg.output``). ``"embedding"`` (Sec. 3.4): the decoder's output, normalised, is
    the refined GPS embedding. Where a region's location embeddings are nearly parallel (the toy world: cosine
    ~0.95 between points 1 km apart after Phase I), that output loses its query: the learned update, the same
    for every frame, swamps the few hundredths of cosine that tell the frames' queries apart, and a drive
    collapses to one point. ``"offset"`` (beyond the paper) cannot lose its query: the decoder predicts a
    correction of each query's GPS, at most ``max_offset_km`` per coordinate (tanh, zero-initialised so a fresh
    refiner returns its queries), and the corrected GPS is re-embedded by the frozen location encoder. The
    queries also carry their GPS relative to their sequence's mean (km, translation-invariant), so the refiner
    reads the shape of the query track directly. Eqs. 2-5 and the second retrieval of Fig. 5 are unchanged.

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
        self.coord_in: nn.Linear | None = None
        self.offset_head: nn.Linear | None = None
        if cfg.output == "offset":
            self.coord_in = nn.Linear(2, cfg.width)
            self.offset_head = nn.Linear(cfg.width, 2)
            nn.init.zeros_(self.offset_head.weight)  # a fresh refiner returns its queries
            nn.init.zeros_(self.offset_head.bias)

    @property
    def needs_gps(self) -> bool:
        """True when forward needs ``gps_latlon`` and ``location_encoder`` (``output: offset``)."""
        return self.offset_head is not None

    def forward(self, frame_emb: torch.Tensor, gps_emb: torch.Tensor, pad_mask: torch.Tensor | None = None,
                gps_latlon: torch.Tensor | None = None, location_encoder: nn.Module | None = None) -> torch.Tensor:
        """``gps_latlon`` (B, T, 2) degrees of the queries and the frozen ``location_encoder``: ``output: offset`` only."""
        if not self.needs_gps:
            return F.normalize(self._decode(frame_emb, gps_emb, pad_mask), dim=-1)
        if gps_latlon is None or location_encoder is None:
            raise ValueError("GeoRefiner(output='offset') needs gps_latlon and location_encoder")
        moved = self.corrected_gps(frame_emb, gps_emb, gps_latlon, pad_mask)  # (B, T, 2) degrees
        emb = location_encoder(moved.flatten(0, 1)).view(*moved.shape[:2], -1)  # (B, T, W)
        return F.normalize(emb.to(frame_emb.dtype), dim=-1)

    def corrected_gps(self, frame_emb: torch.Tensor, gps_emb: torch.Tensor, gps_latlon: torch.Tensor,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``output: offset``: the queries' GPS (B, T, 2) degrees moved by the predicted correction."""
        valid = torch.ones(gps_latlon.shape[:2], dtype=torch.bool, device=gps_latlon.device) if pad_mask is None else ~pad_mask
        out = self._decode(frame_emb, gps_emb, pad_mask, _relative_km(gps_latlon.float(), valid))  # (B, T, W)
        offset_km = self.cfg.max_offset_km * torch.tanh(self.offset_head(out).float())  # (B, T, 2) north, east
        return shift_km(gps_latlon.float(), offset_km)

    def _decode(self, frame_emb: torch.Tensor, gps_emb: torch.Tensor, pad_mask: torch.Tensor | None,
                rel_km: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder-decoder itself -> (B, T, W), before normalisation or the offset head."""
        src = frame_emb
        query = F.normalize(gps_emb, dim=-1)  # location-encoder outputs are unnormalised
        if rel_km is not None:
            query = query + self.coord_in(rel_km.to(query.dtype) / self.cfg.max_offset_km)
        if self.pos is not None:
            pos = interpolated_positions(self.pos, pad_mask, frame_emb.shape[1]).to(frame_emb.dtype)  # (B|1, T, W)
            src = src + pos
            query = query + pos
        if self.frame_link is not None:
            query = query + self.frame_link(frame_emb)  # (B, T, W): query t carries frame t
        memory = self.encoder(src, src_key_padding_mask=pad_mask)  # (B, T, W)
        return self.decoder(query, memory, tgt_key_padding_mask=pad_mask, memory_key_padding_mask=pad_mask)  # (B, T, W)


KM_PER_DEG = float(KM_PER_DEG_LAT)  # a Python float: torch keeps the tensors' dtype


def _relative_km(latlon: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) degrees -> (B, T, 2) north/east km from each sequence's mean over ``valid`` frames (0 at pads).

    Equirectangular around the mean: exact enough over a video's extent (tens of km); a sequence that
    crosses the antimeridian is unwrapped around its first frame."""
    w = valid[..., None].to(latlon.dtype)
    lon = latlon[..., 1]
    lon = lon[:, :1] + torch.remainder(lon - lon[:, :1] + 180.0, 360.0) - 180.0  # unwrap around frame 0
    ll = torch.stack([latlon[..., 0], lon], dim=-1)
    mean = (ll * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)  # (B, 1, 2)
    d = ll - mean
    north = d[..., 0] * KM_PER_DEG
    east = d[..., 1] * KM_PER_DEG * torch.cos(torch.deg2rad(mean[..., 0]))
    return torch.stack([north, east], dim=-1) * w


def shift_km(latlon: torch.Tensor, offset_km: torch.Tensor) -> torch.Tensor:
    """(..., 2) degrees moved by (..., 2) north/east km (equirectangular), latitude clamped, longitude wrapped."""
    lat = latlon[..., 0] + offset_km[..., 0] / KM_PER_DEG
    coslat = torch.cos(torch.deg2rad(latlon[..., 0])).clamp(min=1e-3)
    lon = latlon[..., 1] + offset_km[..., 1] / (KM_PER_DEG * coslat)
    lon = torch.remainder(lon + 180.0, 360.0) - 180.0
    return torch.stack([lat.clamp(-90.0, 90.0), lon], dim=-1)

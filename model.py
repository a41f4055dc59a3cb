"""The tessera model: a U-Net on the sparse spot lattice with signed attention and pathway tokens.
`Tessera.forward` runs these steps in order, one method each:

    _lattice      coords -> collision-free integer sites (HiST), row-major order, the pyramid of levels
    _embed        features (N, C) --stem--> x (N, d)                     [+ 2D sinusoidal PE, STF]
    _below_spot   [HiFusion: sub-patch tokens, a Block per level below the spot, pooled into it, fused]
    _local_stage  [FEAST: k-NN attention over spots + off-grid pseudo-spots, pseudo-spots dropped]
    _encode       level l = 0 .. L-1:  depths[l] x Block -> coarsen (HiST eq. 4)   (skip kept)
    _decode       level l = L-2 .. 0 (.. below the spot): uncoarsen (eq. 5) || skip -> Linear -> Blocks
    _spot_head    linear | mlp (FEAST) | pathway (STF: cosine(spot, pathway token) -> Linear(P -> G))
                  | zinb (mu, theta, pi for the ZINB loss);   _levels: a head per extra level (MagNet)
    every Block: x += Proj(SpotAttention(x) + GlobalAttention(x, tokens))  (HiST eq. 1), then FFN;
    tokens = calibration token(s) + pathway tokens, updated in every block; the coarsest level uses
    full attention (FEAST: every region talks to every region).

The maps between levels (coarsen, uncoarsen, fuse, sub-spot pooling) are in pyramid.py. The baselines
behind the same forward signature (`linear`, `mlp`, `ridge`, `ridge_spatial`) are in baselines.py, and so
is `SpatialStart` (`model.spatial_start`, `model.slide_norm`), which build_model wraps around tessera.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lattice
from attention import GlobalAttention, SpotAttention, knn, row_chunks, rows_of
from baselines import PerSpot, Ridge, SpatialRidge, SpatialStart
from losses import log_variance
from pyramid import Coarsen, Fuse, SubPool, Uncoarsen, level_rows


def inference(module: nn.Module) -> bool:
    """Eval mode without grad: per-spot results are written into preallocated outputs (no activations kept)."""
    return not (torch.is_grad_enabled() or module.training)


def by_rows(fn, n, out=None):
    """fn(rows) for chunks of rows (slices, attention.CHUNK each) of 0 .. n, stacked to (n, ...): concatenated
    (autograd), or written into `out` when it is given (inference; `out` may be an input of fn that each chunk
    reads only at its own rows, so a block's result can overwrite its attention output)."""
    if out is None:
        return torch.cat([fn(rows) for rows in row_chunks(n)])
    for rows in row_chunks(n):
        out[rows] = fn(rows)
    return out


@dataclass
class ModelConfig:
    arch: str = "tessera"             # tessera | linear | mlp | ridge | ridge_spatial
    dim: int = 128                    # token width d
    heads: int = 4                    # attention heads per block
    dropout: float = 0.1              # dropout after attention and feed-forward
    attn_dropout: float = 0.05        # dropout on the attention weights (HiST A.7)
    ffn_ratio: int = 4                # feed-forward width / d
    pos_encoding: bool = False        # STF: 2D sinusoidal encoding of the lattice coordinates
    unit_um: float | None = None      # lattice unit in micrometres; None = lattice.default_unit
    w: int = 3                        # window half-size: windows are 2w x 2w sites (HiST)
    depths: list = field(default_factory=lambda: [1, 1, 1])   # encoder blocks per level
    decoder_depths: list = field(default_factory=lambda: [1, 1])  # deepest decoder level first
    attention: str = "window"         # spot-to-spot mixing: window | knn | full | none (none = h2h off)
    bias: str = "rpb"                 # rpb | alibi | none
    signed: bool = False              # FEAST negative attention
    beta: float = 1.5                 # FEAST: weight of the inhibitory branch
    tau: float = 0.6                  # FEAST: temperature of the inhibitory branch
    knn_k: int = 32                   # neighbours per spot in k-NN attention
    coarse_attention: str = "full"    # the coarsest level: full (FEAST) | same (as `attention`)
    local_blocks: int = 0             # FEAST local stage: k-NN blocks over spots + pseudo-spots
    calibration_tokens: int = 1       # HiST slide calibration token(s)
    pathway_tokens: int = 0           # STF pathway tokens
    p2h: bool = True                  # tokens read spots
    p2p: bool = True                  # tokens read tokens
    h2p: bool = True                  # spots read tokens
    head: str = "linear"              # linear | mlp | pathway | zinb
    hidden: int = 256                 # width of the mlp head / mlp baseline
    checkpoint: bool = False          # training: recompute activations in the backward (less memory, more time)
    sub_levels: int = 0               # levels below the spot from sub_features: 1 = 2 x 2, 2 = 4 x 4 (HiFusion)
    sub_pool: str = "linear"          # sub-tokens -> spot: linear (HiST eq. 4) | attention (HiFusion CCF)
    out_levels: list = field(default_factory=lambda: [0])  # heads: offsets from the spot level (MagNet)
    pca: int = 256                    # ridge baseline: PCA components of the features
    ridge_alpha: float | None = None  # ridge penalty; None = HEST-Benchmark's 100 / (D * G)
    ridge_cv: bool = False            # spatial ridge: alpha chosen by leave-one-group-out on the training slides
    radii: list = field(default_factory=lambda: [1.5])  # ridge_spatial / spatial_start: neighbour radii in spot pitches
    slide_norm: bool | str = False    # standardise features over each slide's spots (stain shifts); auto: ridge_cv's
    spatial_start: bool = False       # tessera: output = closed-form spatial ridge + the network's residual
    head_var: bool = False            # tessera: also predict a log-variance per spot and gene ("log_var")
    ood_fallback: bool = False        # spatial_start: a slide unlike every training slide gets the ridge alone

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def check_config(cfg: ModelConfig) -> None:
    """Refuse configurations that cannot work, with a message saying why."""
    choices = {"arch": ("tessera", "linear", "mlp", "ridge", "ridge_spatial"), "attention": ("window", "knn", "full", "none"),
               "bias": ("rpb", "alibi", "none"), "coarse_attention": ("full", "same"), "slide_norm": (True, False, "auto"),
               "head": ("linear", "mlp", "pathway", "zinb"), "sub_pool": ("linear", "attention")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise ValueError(f"model.{key} = {getattr(cfg, key)!r}; expected one of {list(ok)}")
    if cfg.arch in ("ridge_spatial", "tessera") and (not cfg.radii or min(cfg.radii) <= 0):
        raise ValueError(f"model.radii = {cfg.radii}; expected a list of positive radii in spot pitches")
    if cfg.ood_fallback and not (cfg.arch == "tessera" and cfg.spatial_start):
        raise ValueError("model.ood_fallback needs model.spatial_start = true (the network alone: model.ood_fallback=false)")
    if cfg.arch != "tessera":
        if cfg.sub_levels or list(cfg.out_levels) != [0] or cfg.head_var:
            raise ValueError(f"model.sub_levels, model.out_levels and model.head_var need model.arch = tessera, got {cfg.arch!r}")
        return
    if cfg.sub_levels not in (0, 1, 2):
        raise ValueError(f"model.sub_levels = {cfg.sub_levels}; expected 0 (off), 1 (2 x 2 sub-patches) or 2 (4 x 4)")
    levels = list(cfg.out_levels)
    lo, hi = -cfg.sub_levels, len(cfg.depths) - 1
    if 0 not in levels or len(set(levels)) != len(levels) or any(not lo <= k <= hi for k in levels):
        raise ValueError(f"model.out_levels = {levels}: expected distinct offsets from the spot level, 0 among "
                         f"them, each in [{lo}, {hi}] (-model.sub_levels .. len(model.depths) - 1)")
    if cfg.dim % cfg.heads:
        raise ValueError(f"model.dim = {cfg.dim} must be divisible by model.heads = {cfg.heads}")
    if cfg.attention == "window" and cfg.heads % 2:
        raise ValueError(f"model.heads = {cfg.heads} must be even: half the heads attend in the "
                         "standard windows and half in the shifted windows")
    if len(cfg.decoder_depths) != len(cfg.depths) - 1:
        raise ValueError(f"model.decoder_depths needs one entry per level below the coarsest "
                         f"({len(cfg.depths) - 1} for depths {cfg.depths}), got {cfg.decoder_depths}")
    if (cfg.spatial_start or cfg.head_var) and cfg.head == "zinb":
        raise ValueError("model.spatial_start and model.head_var work on a log-space prediction; model.head = zinb "
                         "predicts count parameters: use head linear, mlp or pathway")
    if cfg.head == "pathway" and cfg.pathway_tokens < 1:
        raise ValueError("model.head = pathway needs model.pathway_tokens >= 1")
    if cfg.attention == "none":  # STF pathway bottleneck: spots talk only through the tokens
        if sum(cfg.depths) + sum(cfg.decoder_depths) < 2 or not (cfg.p2h and cfg.h2p):
            raise ValueError("model.attention = none (h2h off, the pathway bottleneck) needs at least 2 "
                             "blocks and p2h and h2p on: block 1 lets tokens read the spots, block 2 lets "
                             "spots read the tokens (STF)")
        if cfg.calibration_tokens + cfg.pathway_tokens < 1:
            raise ValueError("model.attention = none needs global tokens (calibration or pathway)")


def sinusoidal_2d(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, 2) positions -> (N, dim): half the channels encode x, half y (sin/cos, Transformer frequencies)."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=xy.device) / max(quarter, 1))
    ang = xy[:, :, None].float() * freq  # (N, 2, dim/4)
    pe = torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(1)  # (N, 4 * quarter)
    return F.pad(pe, (0, dim - pe.shape[1]))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: int, dropout: float):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ratio * dim, dim))


class Block(nn.Module):
    """HiST eq. 1 with pre-norm: x <- x + Proj(SpotAttention(x) + GlobalAttention(x, tokens)); then FFN.
    Global tokens are refreshed by attention in the same block and share the block's FFN, as tokens of
    one transformer sequence [tokens | spots] would (STF)."""

    def __init__(self, cfg: ModelConfig, mode: str, n_tokens: int):
        super().__init__()
        d = cfg.dim
        bias = "alibi" if mode in ("knn", "full") and cfg.bias == "rpb" else cfg.bias  # rpb needs windows
        self.norm1 = nn.LayerNorm(d)
        self.spot = SpotAttention(d, cfg.heads, mode=mode, w=cfg.w, bias=bias, signed=cfg.signed,
                                  beta=cfg.beta, tau=cfg.tau, attn_drop=cfg.attn_dropout)
        self.glob = GlobalAttention(d, cfg.heads, p2h=cfg.p2h, p2p=cfg.p2p, h2p=cfg.h2p) if n_tokens else None
        self.norm_tokens = nn.LayerNorm(d) if n_tokens else None
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_ratio, cfg.dropout)

    def forward(self, x, tokens, level, knn_index=None, attn_maps=None):
        """x (N, d), tokens (T, d) or None -> the same. Every per-spot step works on chunks of rows and the
        pre-norm input is computed where it is read, so inference (eval, no grad) keeps x and one (N, d) result,
        and writes the block's output into x."""
        N, x_rows = x.shape[0], rows_of(x)
        h = lambda rows: self.norm1(x_rows(rows))  # noqa: E731  (normalised spots, on demand)
        y = self.spot(h, N, level, knn_index, return_attention=attn_maps is not None)  # (N, d), before proj
        if attn_maps is not None:
            y, maps = y
            attn_maps.append(maps)
        if self.glob is not None:
            t = self.norm_tokens(tokens)  # the spots read the tokens as they were at the start of the block
            tokens = tokens + self.glob.tokens_read(h, N, t)  # residual on the un-normalised token stream
        y_rows = rows_of(y)

        def spots(rows):  # x + Proj(spot attention + the spots' read of the tokens), then the FFN
            a = y_rows(rows) if self.glob is None else y_rows(rows) + self.glob.spots_read_tokens(h(rows), t)
            z = x_rows(rows) + self.drop(self.proj(a))
            return z + self.drop(self.ffn(self.norm2(z)))

        # inference: the result overwrites x (each chunk reads x only at its own rows), so a caller still holding
        # the block's input holds no extra (N, d); it overwrites y instead where autocast made their dtypes differ
        x = by_rows(spots, N, out=(x if x.dtype == y.dtype else y) if inference(self) else None)
        if tokens is not None:
            tokens = tokens + self.drop(self.ffn(self.norm2(tokens)))
        return x, tokens


class PathwayHead(nn.Module):
    """STF: scores = cos(spot token, pathway token) * temperature -> (N, P); genes = Linear(P -> G)."""

    def __init__(self, n_pathways: int, n_genes: int):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.genes = nn.Linear(n_pathways, n_genes)
        nn.init.zeros_(self.genes.bias)

    def init_from_membership(self, membership: torch.Tensor) -> None:
        """membership (P, G) 0/1 -> weights with each pathway's row L1-normalised; genes in no pathway get 0."""
        m = membership.float()
        with torch.no_grad():
            self.genes.weight.copy_((m / m.sum(1, keepdim=True).clamp_min(1)).T)

    def forward(self, x, pathway_tokens):
        scores = F.normalize(x, dim=-1) @ F.normalize(pathway_tokens, dim=-1).T * self.log_temperature.exp()
        return self.genes(scores), scores           # (N, G), (N, P)


class Tessera(nn.Module):
    def __init__(self, cfg: ModelConfig, in_dim: int, n_genes: int):
        super().__init__()
        check_config(cfg)
        self.cfg, d, L = cfg, cfg.dim, len(cfg.depths)
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.stem = nn.Sequential(nn.Linear(in_dim, d), nn.Dropout(cfg.dropout))
        n_tokens = cfg.calibration_tokens + cfg.pathway_tokens
        self.tokens = nn.Parameter(torch.randn(n_tokens, d) * 0.02) if n_tokens else None
        self.local = nn.ModuleList(Block(cfg, "knn", 0) for _ in range(cfg.local_blocks))
        full = cfg.coarse_attention == "full" and cfg.attention != "none"      # at the coarsest level (FEAST)
        mode = lambda level: "full" if level == L - 1 and full else cfg.attention  # noqa: E731
        self.encoder = nn.ModuleList(
            nn.ModuleList(Block(cfg, mode(l), n_tokens) for _ in range(cfg.depths[l])) for l in range(L))
        self.coarsen = nn.ModuleList(Coarsen(d) for _ in range(L - 1))
        self.uncoarsen = nn.ModuleList(Uncoarsen(d) for _ in range(L - 1))
        self.fuse = nn.ModuleList(Fuse(d) for _ in range(L - 1))  # HiST 3.6.3 lateral fusion
        # decoder[i] works at level L-2-i (deepest first, as decoder_depths is written)
        self.decoder = nn.ModuleList(nn.ModuleList(Block(cfg, mode(L - 2 - i), n_tokens) for _ in range(n))
            for i, n in enumerate(cfg.decoder_depths))
        # HiFusion: levels below the spot, one block each, coarsened into the spot (sub_pool) and fused
        # with the spot's own features; the decoder continues below the spot down to the finest out level
        K, low = cfg.sub_levels, -min(cfg.out_levels)
        self.sub_encoder = nn.ModuleList(Block(cfg, cfg.attention, n_tokens) for _ in range(K))
        self.sub_pool = nn.ModuleList(SubPool(d, cfg.heads, cfg.sub_pool) for _ in range(K))
        self.sub_fuse = Fuse(d) if K else None                           # pooled sub-tokens || own features
        self.sub_uncoarsen = nn.ModuleList(Uncoarsen(d) for _ in range(low))  # [i]: level -1-i from -i
        self.sub_skip = nn.ModuleList(Fuse(d) for _ in range(low))
        self.sub_decoder = nn.ModuleList(Block(cfg, cfg.attention, n_tokens) for _ in range(low))
        # MagNet: an independent regression head per extra output level, on that level's decoder tokens
        self.level_heads = nn.ModuleDict({str(k): nn.Sequential(nn.LayerNorm(d), nn.Linear(d, n_genes))
                                          for k in cfg.out_levels if k != 0})
        self.norm, self.var_head = nn.LayerNorm(d), nn.Linear(d, n_genes) if cfg.head_var else None  # log sigma^2
        if cfg.head == "pathway":
            self.head = PathwayHead(cfg.pathway_tokens, n_genes)
        elif cfg.head == "mlp":  # FEAST: two hidden layers
            self.head = nn.Sequential(nn.Linear(d, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                      nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, n_genes))
        elif cfg.head == "zinb":  # log-rate per 1e4 counts, log inverse dispersion, zero-inflation logit
            self.head = nn.Linear(d, 3 * n_genes)
        else:
            self.head = nn.Linear(d, n_genes)
        self.register_buffer("pathway_membership", torch.zeros(cfg.pathway_tokens, n_genes))

    # ---- set-up from the training data of a fold -------------------------------------------------
    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        """Standardise features with training statistics; output bias = training mean of the targets."""
        self.feat_mean.copy_(feat_mean)
        self.feat_std.copy_(feat_std.clamp_min(1e-6))
        last = self.head.genes if self.cfg.head == "pathway" else (
            self.head[-1] if self.cfg.head == "mlp" else self.head)
        with torch.no_grad():
            if self.cfg.head == "zinb":
                G = target_mean.numel()
                last.bias.zero_()
                last.bias[:G].copy_(torch.log(torch.expm1(target_mean).clamp_min(1e-4)))
                last.bias[G:2 * G].fill_(math.log(10.0))
                last.bias[2 * G:].fill_(-3.0)
            else:
                last.bias.copy_(target_mean)
            for k, head in self.level_heads.items():  # a bin of 4^k spots (or a 1 / 4^-k sub-spot) on average
                head[-1].bias.copy_(torch.log1p(torch.expm1(target_mean).clamp_min(0) * 4.0 ** int(k)))
        if membership is not None and self.cfg.pathway_tokens:
            self.pathway_membership.copy_(membership)
            if self.cfg.head == "pathway":
                self.head.init_from_membership(membership)

    # ---- forward: the architecture, one step per line ----------------------------------------------
    def forward(self, features, coords, pseudo_features=None, pseudo_coords=None, unit=None,
                return_attention=False, out_dtype=None, sub_features=None, sub_valid=None, feat_stats=None):
        """features (N, C), coords (N, 2) in micrometres -> {"pred": (N, G), ...} in the caller's spot order.
        `out_dtype`: dtype of the per-spot outputs (default float32; float16 halves a 1M-spot prediction).
        `feat_stats`: (mean, std), (C,) each, to standardise every feature (spots, sub-patches, pseudo-spots)
        with instead of the training statistics (model.slide_norm: the slide's own, baselines.SpatialStart).
        Every per-spot step runs on chunks of spots; without grad in eval mode their results are written into
        preallocated tensors, so memory stays a few (N, d) tensors plus the outputs."""
        cfg = self.cfg
        maps = [] if return_attention else None                  # attention diagnostics, one per block
        self._recompute = cfg.checkpoint and self.training and torch.is_grad_enabled() and maps is None
        unit = unit or cfg.unit_um or lattice.default_unit(coords)
        order, sites, pyramid, sub_rows = self._lattice(coords, unit, sub_features, sub_valid)
        x = self._embed(features, (order,), feat_stats)           # (N, d), spots in lattice order
        if cfg.pos_encoding:                                      # STF: 2D sinusoidal position encoding
            x = x + sinusoidal_2d(sites, cfg.dim)
        tokens, skips, align = self.tokens, {}, None              # (T, d) calibration + pathway tokens
        if cfg.sub_levels:                                        # HiFusion: the levels below the spot
            xs = self._embed(sub_features, sub_rows, feat_stats)  # (n, d) sub-tokens
            x, tokens, align = self._below_spot(x, xs, tokens, pyramid, skips, maps)
        if len(self.local):                                       # FEAST local stage, over off-grid pseudo-spots too
            x, xy = self._add_pseudo_spots(x, coords[order] / unit, pseudo_features, pseudo_coords, unit, feat_stats)
            x = self._local_stage(x, xy, maps)[:len(order)]       # (N, d): the pseudo-spots are dropped
        levels = pyramid.levels[cfg.sub_levels:]                  # the spot level and the coarser ones
        x, tokens = self._encode(x, tokens, levels, skips, maps)  # (N_{L-1}, d) at the coarsest level
        decoded, tokens = self._decode(x, tokens, skips, pyramid, maps)  # {level offset k: (N_k, d)}
        out = self._spot_head(decoded[0], tokens, order, out_dtype)       # {"pred": (N, G), ...}
        if cfg.sub_levels or list(cfg.out_levels) != [0]:
            out.update(self._levels(pyramid, order, decoded, out_dtype))  # MagNet / sub-spot heads
        if align is not None:
            out["align"] = align
        if return_attention:
            out["attention"] = maps
        return out

    def _maybe_checkpoint(self, fn, *args):
        """fn(*args). With model.checkpoint in training, only fn's inputs are kept and fn is recomputed in the
        backward: training memory is then about one (N, d) tensor per step of the U-Net, not all activations."""
        return checkpoint(fn, *args, use_reentrant=False) if self._recompute else fn(*args)

    def _lattice(self, coords, unit, sub_features, sub_valid):
        """-> order (N,): caller's row of each spot in row-major lattice order (sites are unique, so neither the
        order nor how k-NN ties break depends on the input order), sites (N, 2) in that order, the pyramid (built
        once, shared by every layer; with sub_levels = K it starts at the spot sites refined by r = 2^K, which
        coarsened K times give back the spot sites), and (caller's spot, sub-position s) of each sub-token."""
        K, L, N = self.cfg.sub_levels, len(self.cfg.depths), coords.shape[0]
        sites = lattice.to_lattice(coords, unit)
        order = lattice.rowmajor_order(sites)
        sites = sites[order]
        if not K:
            return order, sites, lattice.build_pyramid(sites, L, self.cfg.w), None
        r = 2 ** K
        if sub_features is None or tuple(sub_features.shape[:2]) != (N, r * r):
            raise ValueError(f"model.sub_levels = {K} needs sub_features of shape ({N}, {r * r}, C), found "
                             f"{None if sub_features is None else tuple(sub_features.shape)}")
        valid = torch.ones(N, r * r, dtype=torch.bool, device=sites.device) if sub_valid is None else sub_valid
        spot, s = torch.nonzero(valid[order], as_tuple=True)     # sub-tokens by (sorted spot, s)
        pyramid = lattice.build_pyramid(lattice.refine(sites, r)[spot, s], K + L, self.cfg.w)
        return order, sites, pyramid, (order[spot], s)

    def _embed(self, features, index, stats):
        """The stem on features[index] (index: a tuple of (n,) row tensors) -> (n, d), a chunk of rows at a time:
        no (n, C) gathered copy."""
        stem = lambda rows: self._stem(features[tuple(i[rows] for i in index)], stats)  # noqa: E731
        return self._maybe_checkpoint(by_rows, stem, len(index[0]))

    def _below_spot(self, x, xs, tokens, pyramid, skips, maps):
        """HiFusion HISM: sub-tokens xs (n, d) through a block per level (kept in skips[k], k < 0, for the decoder),
        pooled up into the spot (model.sub_pool; the last step queried by the spot's own x (N, d), CCF), fused
        with x. -> (x (N, d), tokens, (pooled, own) for HiFusion's alignment loss, None in inference)."""
        K = self.cfg.sub_levels
        for l in range(K):
            level = pyramid.levels[l]
            xs, tokens = self._blocks(self.sub_encoder[l:l + 1], xs, tokens, level, maps)
            skips[l - K] = xs
            own = x if l == K - 1 else None
            xs = self._maybe_checkpoint(self.sub_pool[l], xs, level.parent, level.slot,
                                        pyramid.levels[l + 1].sites.shape[0], own)  # (n / 4, d)
        return self.sub_fuse(xs, x), tokens, None if inference(self) else (xs, x)

    def _add_pseudo_spots(self, x, xy, pseudo_features, pseudo_coords, unit, stats):
        """Spots x (N, d) at xy (N, 2, continuous lattice units) and any off-grid pseudo-spots (FEAST) after them
        -> x (N + M, d), xy (N + M, 2)."""
        if pseudo_features is None:
            return x, xy
        return torch.cat([x, self._stem(pseudo_features, stats)]), torch.cat([xy, pseudo_coords / unit])

    def _local_stage(self, x, xy, maps):
        """FEAST local stage: k-NN attention over x (n, d) at the continuous positions xy (n, 2). -> (n, d)."""
        index = knn(xy, xy, min(self.cfg.knn_k, xy.shape[0]))
        points = SimpleNamespace(sites=xy)                      # a level-like view of positions off the lattice
        return self._blocks(self.local, x, None, points, maps, index)[0]

    def _encode(self, x, tokens, levels, skips, maps):
        """HiST encoder: at level l, depths[l] blocks, the result kept in skips[l], then coarsened (eq. 4).
        x (N, d) at the spot level -> (N_{L-1}, d) at the coarsest, and the tokens."""
        for l, blocks in enumerate(self.encoder):
            x, tokens = self._blocks(blocks, x, tokens, levels[l], maps)
            if l < len(self.encoder) - 1:
                skips[l] = x
                x = self._maybe_checkpoint(self.coarsen[l], x, levels[l].parent, levels[l].slot,
                                           levels[l + 1].sites.shape[0])  # (N_{l+1}, d)
        return x, tokens

    def _decode(self, x, tokens, skips, pyramid, maps):
        """HiST decoder, deepest level first: uncoarsen (eq. 5), fuse with the lateral skip (3.6.3), blocks;
        below the spot it goes on down to the finest out level (model.out_levels). -> ({k: (N_k, d)}, tokens)
        with every decoded level, k the offset from the spot level."""
        K, L = self.cfg.sub_levels, len(self.cfg.depths)
        steps = [(L - 2 - i, self.uncoarsen[L - 2 - i], self.fuse[L - 2 - i], blocks)   # decoder[i]: level L-2-i
                 for i, blocks in enumerate(self.decoder)]
        steps += [(-1 - i, up, fuse, [block])  # and on below the spot
                  for i, (up, fuse, block) in enumerate(zip(self.sub_uncoarsen, self.sub_skip, self.sub_decoder))]
        decoded = {L - 1: x}
        for k, uncoarsen, fuse, blocks in steps:
            level = pyramid.levels[K + k]
            x = self._maybe_checkpoint(self._upsample, uncoarsen, fuse, x, skips.pop(k), level)  # (N_k, d)
            x, tokens = self._blocks(blocks, x, tokens, level, maps)
            decoded[k] = x
        return decoded, tokens

    @staticmethod
    def _upsample(uncoarsen, fuse, x, skip, level):
        """HiST eq. 5 then 3.6.3: the parents' tokens x (M, d) to the level's children, fused with the skip."""
        return fuse(uncoarsen(x, level.parent, level.slot), skip)

    def _blocks(self, blocks, x, tokens, level, maps, knn_index=None):
        """x (n, d) and the tokens through `blocks` at one level (k-NN neighbours found once for them all)."""
        index = self._knn_index(level, blocks) if knn_index is None else knn_index
        for block in blocks:
            x, tokens = self._maybe_checkpoint(block, x, tokens, level, index, maps)
        return x, tokens

    def _spot_head(self, x, tokens, order, out_dtype):
        """The head on the spot level's decoder tokens x (N, d), rows back in the caller's spot order."""
        N, back = len(order), torch.argsort(order)               # row of each caller's spot in x
        if not inference(self):
            out = self._maybe_checkpoint(self._head, x, back, tokens)
            return {k: v.to(out_dtype or v.dtype) for k, v in out.items()}
        out = {}
        for rows in row_chunks(N):                               # chunks of spots, written into the outputs
            for k, v in self._head(x, back[rows], tokens).items():
                if k not in out:
                    out[k] = v.new_empty(N, *v.shape[1:], dtype=out_dtype or v.dtype)
                out[k][rows] = v
        return out

    def _head(self, x, rows, tokens):
        """Decoder tokens x[rows] (n, d) -> {"pred": (n, G), ["log_var": (n, G)], ["pathway_scores": (n, P)], ["zinb": (n, 3G)]}."""
        cfg, out, x = self.cfg, {}, self.norm(x[rows])
        if cfg.head == "pathway":
            out["pred"], out["pathway_scores"] = self.head(x, tokens[cfg.calibration_tokens:])
        elif cfg.head == "zinb":
            out["zinb"] = self.head(x)
            log_rate, _, pi_logit = out["zinb"].chunk(3, dim=-1)
            out["pred"] = torch.log1p(torch.sigmoid(-pi_logit) * log_rate.exp())  # log1p E[x] per 1e4
        else:
            out["pred"] = self.head(x)
        if cfg.pathway_tokens and "pathway_scores" not in out:
            p = tokens[cfg.calibration_tokens:]
            out["pathway_scores"] = F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).T
        return out if self.var_head is None else {**out, "log_var": log_variance(self.var_head(x))}

    def _levels(self, pyramid, order, decoded, out_dtype):
        """The extra out_levels' predictions {"levels": {k: (N_k, G)}} with the maps between the levels'
        rows (pyramid.level_rows: "parents" and, below the spot, "sub_index"), in the order
        losses.level_loss and eval.level_outputs read."""
        parents, perm, sub_index = level_rows(pyramid, order, self.cfg.sub_levels)
        preds = {}
        for name, head in self.level_heads.items():
            k, dtype = int(name), out_dtype or torch.float32
            t, idx = decoded[k], perm.get(k)
            if inference(self):  # each chunk gathers its own rows: no reordered copy of the level
                preds[k] = t.new_empty(t.shape[0], head[-1].out_features, dtype=dtype)
                for rows in row_chunks(t.shape[0]):
                    preds[k][rows] = head(t[rows if idx is None else idx[rows]])
            else:                # gathered once, so each chunk reads a view (attention.rows_of)
                read = rows_of(t if idx is None else t[idx])
                preds[k] = torch.cat([head(read(rows)) for rows in row_chunks(t.shape[0])]).to(dtype)
        return {"levels": preds, "parents": parents, **({"sub_index": sub_index} if sub_index else {})}

    def _stem(self, features, stats=None):
        mean, std = (self.feat_mean, self.feat_std) if stats is None else stats  # training's, or the slide's
        return self.stem((features - mean) / std)

    def _knn_index(self, level, blocks):
        if self.cfg.attention != "knn" or not any(b.spot.mode == "knn" for b in blocks):
            return None
        xy = level.sites.float()
        return knn(xy, xy, min(self.cfg.knn_k, xy.shape[0]))


def build_model(cfg: ModelConfig, in_dim: int, n_genes: int) -> nn.Module:
    check_config(cfg)
    if cfg.arch == "tessera":
        net = Tessera(cfg, in_dim, n_genes)
        return SpatialStart(cfg, net, in_dim, n_genes) if cfg.spatial_start or cfg.slide_norm else net
    if cfg.arch == "ridge_spatial":
        return SpatialRidge(cfg, in_dim, n_genes)
    if cfg.arch in ("linear", "mlp"):
        return PerSpot(cfg, in_dim, n_genes)
    return Ridge(cfg, in_dim, n_genes)

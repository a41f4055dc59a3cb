"""The tessera model: a U-Net on the sparse spot lattice with signed attention and pathway tokens.

    lattice     coords -> collision-free integer sites (HiST App. A.6), the pyramid of levels
    stem        features (N, C) -> x (N, d)                      [+ 2D sinusoidal encoding, STF]
    below spot  [HiFusion: sub-patch tokens, a Block per level below the spot, pooled into it]
    local stage [FEAST: k-NN attention over spots + off-grid pseudo-spots, pseudo-spots dropped]
    encode      level l = 0 .. L-1: depths[l] x Block, then coarsen (HiST eq. 4), skip kept
    decode      level l = L-2 .. 0: uncoarsen (eq. 5), fuse with the skip (3.6.3), Blocks
    head        linear | mlp (FEAST) | pathway (STF) | zinb;  a head per extra level (MagNet)

Every Block is HiST eq. (1): x <- x + Proj(W-MSA(x) + MCA(x, tokens)), then an FFN; the tokens
(calibration token(s) + pathway tokens) are refreshed in every block; the coarsest level uses full
attention (FEAST: every region talks to every region). The maps between levels are in pyramid.py,
the attentions in attention.py, the baselines behind the same forward in baselines.py.
model.kernels = fast runs the same maths through kernels.py (chunks, a hand-written backward,
in-place inference) for large slides; tests/test_kernels.py holds the two paths equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
import lattice
from attention import GlobalAttention, SpotAttention
from baselines import PerSpot, Ridge, SpatialRidge, SpatialStart
from losses import log_variance
from pyramid import Coarsen, Fuse, SubPool, Uncoarsen, level_rows


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
    windows: str = "split"            # union: HiST eq. (2), every head over standard U shifted
                                      # split: half the heads in each partition (tessera's)
    depths: list = field(default_factory=lambda: [1, 1, 1])   # encoder blocks per level
    decoder_depths: list = field(default_factory=lambda: [1, 1])  # deepest decoder level first
    attention: str = "window"         # spot-to-spot mixing: window | knn | full | none (h2h off)
    bias: str = "rpb"                 # rpb | alibi | none
    slopes: str = "alibi"             # ALiBi slopes: alibi 2^(-8h/H) | feast (FEAST's code)
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
    uncoarsen: str = "linear"         # mlp: HiST eq. (5) | linear: one Linear, a copy at the start
    head: str = "linear"              # linear | mlp | pathway | zinb (HEADS)
    hidden: int = 256                 # width of the mlp head / mlp baseline
    kernels: str = "fast"             # fast: kernels.py | reference: attention.py's plain forms
    checkpoint: bool = False          # training: recompute activations in the backward
    sub_levels: int = 0               # levels below the spot: 1 = 2 x 2, 2 = 4 x 4 (HiFusion)
    sub_pool: str = "linear"          # sub-tokens -> spot: linear (HiST eq. 4) | attention (CCF)
    out_levels: list = field(default_factory=lambda: [0])  # heads: offsets from the spot level
    pca: int = 256                    # ridge baseline: PCA components of the features
    ridge_alpha: float | None = None  # ridge penalty; None = HEST-Benchmark's 100 / (D * G)
    ridge_cv: bool = False            # spatial ridge: alpha by leave-one-group-out on training
    radii: list = field(default_factory=lambda: [1.5])  # spatial ridge: radii in spot pitches
    slide_norm: bool | str = False    # standardise features over each slide's spots; auto: ridge_cv
    spatial_start: bool = False       # tessera: output = spatial ridge + the network's residual
    head_var: bool = False            # tessera: also predict a log-variance ("log_var")
    ood_fallback: bool = False        # spatial_start: a slide unlike the training gets the ridge

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


def Dropout(p: float, fast: bool) -> nn.Module:
    """nn.Dropout, or with model.kernels = fast kernels.Dropout (the same mask, drawn faster)."""
    return kernels.Dropout(p) if fast else nn.Dropout(p)


# ---- the heads: one class each; HEADS is the only list of them ---------------------------------
class Head:
    """A head maps decoder tokens x (n, d) and the pathway tokens (P, d) to {"pred": (n, G), ...}.
    start() is the layer whose bias starts at the targets' mean and which model.spatial_start
    zeroes (the network's residual then starts at 0); a head without one cannot start at zero."""

    def start(self) -> nn.Module:
        raise ValueError(f"{type(self).__name__} names no layer to start at zero "
                         "(model.spatial_start needs one)")

    def init_output(self, target_mean):
        self.start().bias.copy_(target_mean)


class LinearHead(Head, nn.Linear):
    """HiST: genes = W x + b."""

    def __init__(self, cfg, dim, n_genes):
        super().__init__(dim, n_genes)

    def forward(self, x, pathways):
        return {"pred": super().forward(x)}

    def start(self):
        return self


class MLPHead(Head, nn.Sequential):
    """FEAST: an MLP with two hidden layers."""

    def __init__(self, cfg, dim, n_genes):
        h = cfg.hidden
        super().__init__(nn.Linear(dim, h), nn.GELU(), Dropout(cfg.dropout, cfg.kernels == "fast"),
                         nn.Linear(h, h), nn.GELU(), nn.Linear(h, n_genes))

    def forward(self, x, pathways):
        return {"pred": super().forward(x)}

    def start(self):
        return self[-1]


class PathwayHead(Head, nn.Module):
    """STF: scores = cos(spot token, pathway token) * temperature (n, P); genes = Linear(P -> G),
    initialised from the gene sets' membership."""

    def __init__(self, cfg, dim, n_genes):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.genes = nn.Linear(cfg.pathway_tokens, n_genes)
        nn.init.zeros_(self.genes.bias)

    def init_from_membership(self, membership: torch.Tensor) -> None:
        """membership (P, G) 0/1 -> each pathway's row L1-normalised; genes in no pathway get 0."""
        m = membership.float()
        with torch.no_grad():
            self.genes.weight.copy_((m / m.sum(1, keepdim=True).clamp_min(1)).T)

    def forward(self, x, pathways):
        scores = F.normalize(x, dim=-1) @ F.normalize(pathways, dim=-1).T
        scores = scores * self.log_temperature.exp()
        return {"pred": self.genes(scores), "pathway_scores": scores}

    def start(self):
        return self.genes


class ZINBHead(Head, nn.Linear):
    """Zero-inflated negative binomial: log-rate per 1e4 counts, log inverse dispersion and
    zero-inflation logit per gene; "pred" = log1p of the expected count."""

    def __init__(self, cfg, dim, n_genes):
        super().__init__(dim, 3 * n_genes)

    def forward(self, x, pathways):
        zinb = super().forward(x)
        log_rate, _, pi_logit = zinb.chunk(3, dim=-1)
        return {"zinb": zinb, "pred": torch.log1p(torch.sigmoid(-pi_logit) * log_rate.exp())}

    def init_output(self, target_mean):
        G = target_mean.numel()
        self.bias.zero_()
        self.bias[:G].copy_(torch.log(torch.expm1(target_mean).clamp_min(1e-4)))
        self.bias[G:2 * G].fill_(math.log(10.0))
        self.bias[2 * G:].fill_(-3.0)


HEADS = {"linear": LinearHead, "mlp": MLPHead, "pathway": PathwayHead, "zinb": ZINBHead}


def check_config(cfg: ModelConfig) -> None:
    """Refuse configurations that cannot work, with a message saying why."""
    choices = {"arch": ("tessera", "linear", "mlp", "ridge", "ridge_spatial"),
               "attention": ("window", "knn", "full", "none"), "bias": ("rpb", "alibi", "none"),
               "coarse_attention": ("full", "same"), "slide_norm": (True, False, "auto"),
               "head": tuple(HEADS), "sub_pool": ("linear", "attention"),
               "windows": ("union", "split"), "uncoarsen": ("mlp", "linear"),
               "slopes": ("alibi", "feast"), "kernels": ("fast", "reference")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise ValueError(f"model.{key} = {getattr(cfg, key)!r}; expected one of {list(ok)}")
    if cfg.arch in ("ridge_spatial", "tessera") and (not cfg.radii or min(cfg.radii) <= 0):
        raise ValueError(f"model.radii = {cfg.radii}; expected positive radii in spot pitches")
    if cfg.ood_fallback and not (cfg.arch == "tessera" and cfg.spatial_start):
        raise ValueError("model.ood_fallback needs model.spatial_start = true (the network alone: "
                         "model.ood_fallback=false)")
    if cfg.arch != "tessera":
        if cfg.sub_levels or list(cfg.out_levels) != [0] or cfg.head_var:
            raise ValueError("model.sub_levels, model.out_levels and model.head_var need "
                             f"model.arch = tessera, got {cfg.arch!r}")
        return
    if cfg.sub_levels not in (0, 1, 2):
        raise ValueError(f"model.sub_levels = {cfg.sub_levels}; expected 0 (off), 1 (2 x 2 "
                         "sub-patches) or 2 (4 x 4)")
    levels = list(cfg.out_levels)
    lo, hi = -cfg.sub_levels, len(cfg.depths) - 1
    if 0 not in levels or len(set(levels)) != len(levels) or any(not lo <= k <= hi for k in levels):
        raise ValueError(f"model.out_levels = {levels}: expected distinct offsets from the spot "
                         f"level, 0 among them, each in [{lo}, {hi}] (-model.sub_levels .. "
                         "len(model.depths) - 1)")
    if cfg.dim % cfg.heads:
        raise ValueError(f"model.dim = {cfg.dim} must be divisible by model.heads = {cfg.heads}")
    if cfg.attention == "window" and cfg.windows == "split" and cfg.heads % 2:
        raise ValueError(f"model.heads = {cfg.heads} must be even with model.windows = split: "
                         "half the heads attend in the standard windows and half in the shifted")
    if len(cfg.decoder_depths) != len(cfg.depths) - 1:
        raise ValueError(f"model.decoder_depths needs one entry per level below the coarsest "
                         f"({len(cfg.depths) - 1} for depths {cfg.depths}), got "
                         f"{cfg.decoder_depths}")
    if (cfg.spatial_start or cfg.head_var) and cfg.head == "zinb":
        raise ValueError("model.spatial_start and model.head_var work on a log-space prediction; "
                         "model.head = zinb predicts count parameters: use head linear, mlp or "
                         "pathway")
    if cfg.head == "pathway" and cfg.pathway_tokens < 1:
        raise ValueError("model.head = pathway needs model.pathway_tokens >= 1")
    if cfg.attention == "none":  # STF pathway bottleneck: spots talk only through the tokens
        if sum(cfg.depths) + sum(cfg.decoder_depths) < 2 or not (cfg.p2h and cfg.h2p):
            raise ValueError("model.attention = none (h2h off, the pathway bottleneck) needs at "
                             "least 2 blocks and p2h and h2p on: block 1 lets tokens read the "
                             "spots, block 2 lets spots read the tokens (STF)")
        if cfg.calibration_tokens + cfg.pathway_tokens < 1:
            raise ValueError("model.attention = none needs global tokens (calibration or pathway)")


def sinusoidal_2d(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, 2) positions -> (N, dim): half the channels encode x, half y (Transformer's sin/cos)."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=xy.device) / max(quarter, 1))
    ang = xy[:, :, None].float() * freq                         # (N, 2, dim/4)
    pe = torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(1)   # (N, 4 * quarter)
    return F.pad(pe, (0, dim - pe.shape[1]))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: int, dropout: float, fast: bool = False):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), Dropout(dropout, fast),
                         nn.Linear(ratio * dim, dim))


class Block(nn.Module):
    """HiST eq. (1) with pre-norm, then an FFN. The global tokens are refreshed by attention in the
    same block and share its FFN, as tokens of one sequence [tokens | spots] would (STF)."""

    def __init__(self, cfg: ModelConfig, mode: str, n_tokens: int):
        super().__init__()
        d, fast = cfg.dim, cfg.kernels == "fast"
        # the relative position table is over window offsets: k-NN and full attention use ALiBi
        bias = "alibi" if mode in ("knn", "full") and cfg.bias == "rpb" else cfg.bias
        self.norm1 = nn.LayerNorm(d)
        self.spot = SpotAttention(d, cfg.heads, mode, cfg.w, bias, cfg.signed, cfg.beta, cfg.tau,
                                  cfg.attn_dropout, cfg.windows, cfg.slopes, fast)
        self.glob = GlobalAttention(d, cfg.heads, cfg.p2h, cfg.p2p, cfg.h2p, fast) \
            if n_tokens else None
        self.norm_tokens = nn.LayerNorm(d) if n_tokens else None
        self.proj = nn.Linear(d, d)
        self.drop = Dropout(cfg.dropout, fast)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_ratio, cfg.dropout, fast)
        self.fast = fast

    def forward(self, x, tokens, level, knn_index=None):
        """x (N, d), tokens (T, d) or None -> the same."""
        if self.fast and not (torch.is_grad_enabled() or self.training):
            return kernels.block_inference(self, x, tokens, level, knn_index)
        h = self.norm1(x)
        y = self.spot(h, level, knn_index)                      # W-MSA(X), (N, d)
        if self.glob is not None:
            t = self.norm_tokens(tokens)
            y = y + self.glob.spots_read_tokens(h, t)           # + MCA(X, C)
            tokens = tokens + self.glob.tokens_read(h, t)       # C <- C + Attn(C, [X; C])
        x = x + self.drop(self.proj(y))                         # HiST eq. (1)
        x = x + self.drop(self.ffn(self.norm2(x)))
        if tokens is not None:
            tokens = tokens + self.drop(self.ffn(self.norm2(tokens)))
        return x, tokens


class Tessera(nn.Module):
    def __init__(self, cfg: ModelConfig, in_dim: int, n_genes: int):
        super().__init__()
        check_config(cfg)
        self.cfg, d, L = cfg, cfg.dim, len(cfg.depths)
        self.fast = cfg.kernels == "fast"
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.stem = nn.Sequential(nn.Linear(in_dim, d), Dropout(cfg.dropout, self.fast))
        n_tokens = cfg.calibration_tokens + cfg.pathway_tokens
        self.tokens = nn.Parameter(torch.randn(n_tokens, d) * 0.02) if n_tokens else None
        self.local = nn.ModuleList(Block(cfg, "knn", 0) for _ in range(cfg.local_blocks))
        full = cfg.coarse_attention == "full" and cfg.attention != "none"   # coarsest (FEAST)
        mode = lambda level: "full" if level == L - 1 and full else cfg.attention  # noqa: E731
        self.encoder = nn.ModuleList(nn.ModuleList(Block(cfg, mode(l), n_tokens)
                                                   for _ in range(cfg.depths[l])) for l in range(L))
        self.coarsen = nn.ModuleList(Coarsen(d) for _ in range(L - 1))
        self.uncoarsen = nn.ModuleList(Uncoarsen(d, cfg.uncoarsen) for _ in range(L - 1))
        self.fuse = nn.ModuleList(Fuse(d) for _ in range(L - 1))  # HiST 3.6.3 lateral fusion
        # decoder[i] works at level L-2-i (deepest first, as decoder_depths is written)
        self.decoder = nn.ModuleList(nn.ModuleList(Block(cfg, mode(L - 2 - i), n_tokens)
                                                   for _ in range(n))
                                     for i, n in enumerate(cfg.decoder_depths))
        # HiFusion: levels below the spot, one block each, coarsened into the spot (sub_pool) and
        # fused with the spot's own features; the decoder goes on down to the finest out level
        K, low = cfg.sub_levels, -min(cfg.out_levels)
        self.sub_encoder = nn.ModuleList(Block(cfg, cfg.attention, n_tokens) for _ in range(K))
        self.sub_pool = nn.ModuleList(SubPool(d, cfg.heads, cfg.sub_pool) for _ in range(K))
        self.sub_fuse = Fuse(d) if K else None                  # pooled sub-tokens || own features
        self.sub_uncoarsen = nn.ModuleList(Uncoarsen(d, cfg.uncoarsen) for _ in range(low))
        self.sub_skip = nn.ModuleList(Fuse(d) for _ in range(low))
        self.sub_decoder = nn.ModuleList(Block(cfg, cfg.attention, n_tokens) for _ in range(low))
        # MagNet: an independent regression head per extra output level, on its decoder tokens
        self.level_heads = nn.ModuleDict({str(k): nn.Sequential(nn.LayerNorm(d),
                                                                nn.Linear(d, n_genes))
                                          for k in cfg.out_levels if k != 0})
        self.norm = nn.LayerNorm(d)
        self.var_head = nn.Linear(d, n_genes) if cfg.head_var else None  # log sigma^2
        self.head = HEADS[cfg.head](cfg, d, n_genes)
        self.register_buffer("pathway_membership", torch.zeros(cfg.pathway_tokens, n_genes))

    # ---- set-up from the training data of a fold --------------------------------------------
    def init_from_data(self, feat_mean, feat_std, target_mean, membership=None):
        """Standardise features with training statistics; output bias = training mean of targets."""
        self.feat_mean.copy_(feat_mean)
        self.feat_std.copy_(feat_std.clamp_min(1e-6))
        with torch.no_grad():
            self.head.init_output(target_mean)
            counts = torch.expm1(target_mean).clamp_min(0)
            for k, head in self.level_heads.items():  # a bin of 4^k spots (or 1 / 4^-k sub-spot)
                head[-1].bias.copy_(torch.log1p(counts * (lattice.FACTOR ** 2) ** int(k)))
        if membership is not None and self.cfg.pathway_tokens:
            self.pathway_membership.copy_(membership)
            if self.cfg.head == "pathway":
                self.head.init_from_membership(membership)

    # ---- forward: the architecture, one step per line -----------------------------------------
    def forward(self, features, coords, pseudo_features=None, pseudo_coords=None, unit=None,
                out_dtype=None, sub_features=None, sub_valid=None, feat_stats=None):
        """features (N, C), coords (N, 2) in micrometres -> {"pred": (N, G), ...}, rows in the
        caller's spot order. feat_stats: (mean, std) to standardise with, not the training's."""
        cfg, K = self.cfg, self.cfg.sub_levels
        self._recompute = cfg.checkpoint and self.training and torch.is_grad_enabled()
        unit = unit or cfg.unit_um or lattice.default_unit(coords)
        order, sites, levels, sub_rows = self._lattice(coords, unit, sub_features, sub_valid)
        x = self._stem(features, (order,), feat_stats)          # (N, d), spots in lattice order
        if cfg.pos_encoding:                                    # STF: 2D sinusoidal encoding
            x = x + sinusoidal_2d(sites, cfg.dim)
        tokens, skips, align = self.tokens, {}, None            # (T, d) calibration + pathway
        if K:                                                   # HiFusion: below the spot
            xs = self._stem(sub_features, sub_rows, feat_stats)  # (n, d) sub-tokens
            x, tokens, align = self._below_spot(x, xs, tokens, levels, skips)
        if len(self.local):                                     # FEAST local stage
            x = self._local_stage(x, coords[order] / unit, pseudo_features, pseudo_coords, unit,
                                  feat_stats)                   # (N, d)
        x, tokens = self._encode(x, tokens, levels[K:], skips)  # (N_{L-1}, d), the coarsest
        decoded, tokens = self._decode(x, tokens, skips, levels)  # {level offset k: (N_k, d)}
        out = self._spot_head(decoded[0], tokens, order, out_dtype)  # {"pred": (N, G), ...}
        if K or list(cfg.out_levels) != [0]:
            out.update(self._levels(levels, order, decoded, out_dtype))  # MagNet / sub-spot
        return out if align is None else {**out, "align": align}

    def _run(self, fn, *args):
        """fn(*args); with model.checkpoint in training, recomputed in the backward."""
        return checkpoint(fn, *args, use_reentrant=False) if self._recompute else fn(*args)

    def _rows(self, fn, n, dtype=None):
        """fn over all n rows; fast inference: chunk by chunk into one output (kernels.by_rows)."""
        if self.fast and not (torch.is_grad_enabled() or self.training):
            return kernels.by_rows(fn, n, dtype)
        out = fn(slice(None))
        return out if dtype is None else kernels.cast(out, dtype)

    def _lattice(self, coords, unit, sub_features, sub_valid):
        """-> order (N,): caller's row of each spot in row-major lattice order, sites (N, 2) in that
        order, the pyramid's levels, and (below the spot) the sub-tokens' rows."""
        sites = lattice.to_lattice(coords, unit)
        order = lattice.rowmajor_order(sites)
        sites = sites[order]
        if self.cfg.sub_levels:
            return (order, sites, *self._sub_lattice(sites, order, sub_features, sub_valid))
        return order, sites, lattice.build_pyramid(sites, len(self.cfg.depths), self.cfg.w), None

    def _sub_lattice(self, sites, order, sub_features, sub_valid):
        """HiFusion: the pyramid from the spot sites refined by r = 2^K (coarsened K times they
        give back the spot sites) and (caller's spot, sub-position s) of each sub-token."""
        K, L, N = self.cfg.sub_levels, len(self.cfg.depths), len(sites)
        r = lattice.FACTOR ** K
        if sub_features is None or tuple(sub_features.shape[:2]) != (N, r * r):
            found = None if sub_features is None else tuple(sub_features.shape)
            raise ValueError(f"model.sub_levels = {K} needs sub_features of shape ({N}, {r * r}, "
                             f"C), found {found}")
        valid = torch.ones(N, r * r, dtype=torch.bool, device=sites.device) if sub_valid is None \
            else sub_valid
        spot, s = torch.nonzero(valid[order], as_tuple=True)    # sub-tokens by (sorted spot, s)
        levels = lattice.build_pyramid(lattice.refine(sites, r)[spot, s], K + L, self.cfg.w)
        return levels, (order[spot], s)

    def _stem(self, features, index, stats=None):
        """The stem on features[index] (a tuple of row tensors), standardised -> (n, d)."""
        mean, std = (self.feat_mean, self.feat_std) if stats is None else stats
        at = lambda rows: tuple(i[rows] for i in index)  # noqa: E731
        stem = lambda rows: self.stem((features[at(rows)] - mean) / std)  # noqa: E731
        return self._run(self._rows, stem, len(index[0]))

    def _below_spot(self, x, xs, tokens, levels, skips):
        """HiFusion HISM: sub-tokens xs (n, d) through a block per level (kept in skips[k], k < 0),
        pooled up into the spot (model.sub_pool; the last step queried by the spot's own x, CCF),
        fused with x. -> (x (N, d), tokens, (pooled, own) for HiFusion's alignment loss or None)."""
        K = self.cfg.sub_levels
        for l in range(K):
            xs, tokens = self._blocks(self.sub_encoder[l:l + 1], xs, tokens, levels[l])
            skips[l - K] = xs
            own = x if l == K - 1 else None
            xs = self._run(self.sub_pool[l], xs, levels[l].parent, levels[l].slot,
                           len(levels[l + 1].sites), own)       # (n / 4, d)
        align = None if not (torch.is_grad_enabled() or self.training) else (xs, x)
        return self.sub_fuse(xs, x), tokens, align

    def _local_stage(self, x, xy, pseudo_features, pseudo_coords, unit, stats):
        """FEAST local stage: k-NN attention over the spots x (N, d) at xy (N, 2, lattice units)
        and any off-grid pseudo-spots after them; the pseudo-spots are dropped. -> (N, d)."""
        N = len(x)
        if pseudo_features is not None:
            pseudo = self._stem(pseudo_features, (torch.arange(len(pseudo_features)),), stats)
            x, xy = torch.cat([x, pseudo]), torch.cat([xy, pseudo_coords / unit])
        index = (kernels.knn if self.fast else lattice.knn)(xy, xy, self.cfg.knn_k)
        points = SimpleNamespace(sites=xy)                      # a level of points off the lattice
        return self._blocks(self.local, x, None, points, index)[0][:N]

    def _encode(self, x, tokens, levels, skips):
        """HiST encoder: at level l, depths[l] blocks, the result kept in skips[l], then coarsened
        (eq. 4). x (N, d) at the spot level -> (N_{L-1}, d) at the coarsest, and the tokens."""
        for l, blocks in enumerate(self.encoder):
            x, tokens = self._blocks(blocks, x, tokens, levels[l])
            if l < len(self.encoder) - 1:
                skips[l] = x
                x = self._run(self.coarsen[l], x, levels[l].parent, levels[l].slot,
                              len(levels[l + 1].sites))         # (N_{l+1}, d)
        return x, tokens

    def _decode(self, x, tokens, skips, levels):
        """HiST decoder, deepest level first: uncoarsen (eq. 5), fuse, blocks; below the spot on to
        the finest out level. -> ({offset k: (N_k, d)} of the levels a head reads, tokens)."""
        K, L = self.cfg.sub_levels, len(self.cfg.depths)
        steps = [(L - 2 - i, self.uncoarsen[L - 2 - i], self.fuse[L - 2 - i], blocks)
                 for i, blocks in enumerate(self.decoder)]      # decoder[i]: level L-2-i
        steps += [(-1 - i, up, fuse, [block]) for i, (up, fuse, block) in
                  enumerate(zip(self.sub_uncoarsen, self.sub_skip, self.sub_decoder))]
        read = {0, *map(int, self.level_heads)}                 # the spot head, out_levels
        decoded = {L - 1: x} if L - 1 in read else {}
        for k, uncoarsen, fuse, blocks in steps:
            level = levels[K + k]
            x = self._run(self._upsample, uncoarsen, fuse, x, skips.pop(k), level)  # (N_k, d)
            x, tokens = self._blocks(blocks, x, tokens, level)
            if k in read:
                decoded[k] = x
        return decoded, tokens

    def _upsample(self, uncoarsen, fuse, x, skip, level):
        """HiST eq. (5) then 3.6.3: the parents' x (M, d) to the level's children, fused."""
        def children(rows):
            return fuse(uncoarsen(x, level.parent[rows], level.slot[rows]), skip[rows])
        return self._rows(children, len(skip))

    def _blocks(self, blocks, x, tokens, level, knn_index=None):
        """x (n, d) and the tokens through `blocks` at one level (k-NN neighbours found once)."""
        if knn_index is None and any(b.spot.mode == "knn" for b in blocks):
            xy = level.sites.float()
            knn_index = (kernels.knn if self.fast else lattice.knn)(xy, xy, self.cfg.knn_k)
        for block in blocks:
            x, tokens = self._run(block, x, tokens, level, knn_index)
        return x, tokens

    def _spot_head(self, x, tokens, order, out_dtype):
        """The head on the spot level's tokens x (N, d), rows back in the caller's order."""
        back = torch.argsort(order)                             # row of each caller's spot in x
        pathways = None if tokens is None else tokens[self.cfg.calibration_tokens:]
        head = lambda rows: self._head(self.norm(x[back[rows]]), pathways)  # noqa: E731
        return self._run(self._rows, head, len(order), out_dtype)

    def _head(self, y, pathways):
        """y (n, d) -> the head's outputs, pathway scores (STF's loss), log-variance (head_var)."""
        out = self.head(y, pathways)
        if self.cfg.pathway_tokens and "pathway_scores" not in out:
            out["pathway_scores"] = F.normalize(y, dim=-1) @ F.normalize(pathways, dim=-1).T
        if self.var_head is not None:
            out["log_var"] = log_variance(self.var_head(y))
        return out

    def _levels(self, levels, order, decoded, out_dtype):
        """The extra out_levels' predictions {"levels": {k: (N_k, G)}} with the maps between the
        levels' rows (pyramid.level_rows: "parents" and, below the spot, "sub_index"), in the order
        losses.level_loss and eval.level_outputs read."""
        parents, perm, sub_index = level_rows(levels, order, self.cfg.sub_levels)
        preds = {}
        for name, head in self.level_heads.items():
            t, idx = decoded[int(name)], perm.get(int(name))
            rows = (lambda r: head(t[r])) if idx is None else (lambda r: head(t[idx[r]]))  # noqa
            preds[int(name)] = self._rows(rows, len(t), out_dtype or torch.float32)
        out = {"levels": preds, "parents": parents}
        return {**out, "sub_index": sub_index} if sub_index else out


def build_model(cfg: ModelConfig, in_dim: int, n_genes: int) -> nn.Module:
    check_config(cfg)
    if cfg.arch == "tessera":
        net = Tessera(cfg, in_dim, n_genes)
        wrap = cfg.spatial_start or cfg.slide_norm
        return SpatialStart(cfg, net, in_dim, n_genes) if wrap else net
    if cfg.arch == "ridge_spatial":
        return SpatialRidge(cfg, in_dim, n_genes)
    if cfg.arch in ("linear", "mlp"):
        return PerSpot(cfg, in_dim, n_genes)
    return Ridge(cfg, in_dim, n_genes)

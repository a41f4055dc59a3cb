"""The tessera model: a U-Net on the sparse spot lattice with signed attention and pathway tokens.

    features (N, C) --stem--> x (N, d)                     [+ 2D sinusoidal PE, STF]
        [FEAST local stage: k-NN attention over spots + off-grid pseudo-spots, pseudo-spots dropped]
    encoder, level l = 0 .. L-1:   depths[l] x Block  ->  coarsen (HiST eq. 4)   (skip kept)
        every Block: x += Proj(SpotAttention(x) + GlobalAttention(x, tokens))    (HiST eq. 1)
                     tokens = calibration token(s) + pathway tokens, updated in every block
        the coarsest level uses full attention (FEAST: every region talks to every region)
    decoder, level l = L-2 .. 0:   uncoarsen (HiST eq. 5) || skip -> Linear -> decoder_depths x Block
    head: linear | mlp (FEAST) | pathway (STF: cosine(spot, pathway token) -> Linear(P -> G))
          | zinb (mu, theta, pi for the ZINB loss)

The baselines behind the same forward signature (`linear`, `mlp`, `ridge`, `ridge_spatial`) are in
baselines.py, and so is `SpatialStart` (`model.spatial_start`: tessera started at the spatial ridge,
the network trained on the residual; `model.slide_norm`), which build_model wraps around tessera.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lattice
from attention import GlobalAttention, SpotAttention, child_attention, knn, row_chunks, rows_of
from baselines import PerSpot, Ridge, SpatialRidge, SpatialStart


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
    heads: int = 4
    dropout: float = 0.1
    attn_dropout: float = 0.05        # HiST A.7
    ffn_ratio: int = 4
    pos_encoding: bool = False        # STF: 2D sinusoidal encoding of the lattice coordinates
    unit_um: float | None = None      # lattice unit in micrometres; None = lattice.default_unit
    w: int = 3                        # window half-size: windows are 2w x 2w sites (HiST)
    depths: list = field(default_factory=lambda: [1, 1, 1])   # encoder blocks per level
    decoder_depths: list = field(default_factory=lambda: [1, 1])  # deepest decoder level first
    attention: str = "window"         # spot-to-spot mixing: window | knn | full | none (none = h2h off)
    bias: str = "rpb"                 # rpb | alibi | none
    signed: bool = False              # FEAST negative attention
    beta: float = 1.5
    tau: float = 0.6
    knn_k: int = 32
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
    pca: int = 256                    # ridge baseline
    ridge_alpha: float | None = None  # None = HEST-Benchmark's 100 / (D * G)
    radii: list = field(default_factory=lambda: [1.5])  # ridge_spatial / spatial_start: neighbour radii in spot pitches
    slide_norm: bool = False          # standardise features over each slide's own spots (removes a stain shift)
    spatial_start: bool = False       # tessera: output = closed-form spatial ridge + the network's residual
    head_var: bool = False            # tessera: also predict a log-variance per spot and gene ("log_var")

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
               "bias": ("rpb", "alibi", "none"), "coarse_attention": ("full", "same"),
               "head": ("linear", "mlp", "pathway", "zinb"), "sub_pool": ("linear", "attention")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise ValueError(f"model.{key} = {getattr(cfg, key)!r}; expected one of {list(ok)}")
    if cfg.arch in ("ridge_spatial", "tessera") and (not cfg.radii or min(cfg.radii) <= 0):
        raise ValueError(f"model.radii = {cfg.radii}; expected a list of positive radii in spot pitches")
    if cfg.head_var and (cfg.arch != "tessera" or cfg.head == "zinb"):
        raise ValueError(f"model.head_var needs model.arch = tessera and a log-space head (linear, mlp, "
                         f"pathway); got arch {cfg.arch!r}, head {cfg.head!r}")
    if cfg.arch != "tessera":
        if cfg.sub_levels or list(cfg.out_levels) != [0]:
            raise ValueError(f"model.sub_levels and model.out_levels need model.arch = tessera, got {cfg.arch!r}")
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
    if cfg.spatial_start and cfg.head == "zinb":
        raise ValueError("model.spatial_start adds a log-space ridge to the prediction; model.head = zinb "
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
        pre-norm input is computed where it is read, so inference (eval, no grad) keeps x and one (N, d) result."""
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

        x = by_rows(spots, N, out=y if inference(self) else None)  # inference: the result overwrites y
        if tokens is not None:
            tokens = tokens + self.drop(self.ffn(self.norm2(tokens)))
        return x, tokens


class Coarsen(nn.Module):
    """HiST eq. (4): x_parent = sum_delta m_delta W_delta x_child, one learned map per child slot.

    The four maps are the four (d x d) blocks of one Linear(4d -> d) (its input = the 4 child slots
    concatenated, zeros where a child is missing); computed slot by slot, no (4M, d) buffer. Then LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():  # start as sum pooling of the children (W_delta = I), then learn
            self.linear.weight.copy_(torch.eye(dim).repeat(1, 4))
            self.linear.bias.zero_()

    def forward(self, x, parent, slot, n_parents):
        d = x.shape[1]
        W = self.linear.weight.view(d, 4, d)       # W_delta = W[:, delta, :]
        out = x.new_zeros(n_parents, d)
        for delta in range(4):                     # sum over each parent's active children
            child = torch.nonzero(slot == delta).squeeze(1)
            out.index_add_(0, parent[child], F.linear(x[child], W[:, delta]).to(out.dtype))
        return self.norm(out + self.linear.bias)   # (M, d)


class Uncoarsen(nn.Module):
    """HiST eq. (5): z = Linear(d -> 4d)(x_parent), reshaped to 4 child slots, gathered at active children.

    Initialised as a nearest-neighbour copy (every slot starts as the parent's vector)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 4 * dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim).repeat(4, 1))
            self.linear.bias.zero_()

    def forward(self, x, parent, slot):
        d = x.shape[1]
        W, b = self.linear.weight.view(4, d, d), self.linear.bias.view(4, d)  # slot delta: rows delta*d ...
        up = x.new_empty(len(parent), d)
        for delta in range(4):                      # each child reads its slot's map of its parent
            child = torch.nonzero(slot == delta).squeeze(1)
            up[child] = F.linear(x[parent[child]], W[delta], b[delta]).to(up.dtype)
        return up                                   # (N, d), no (M, 4d) buffer


class Fuse(nn.Linear):
    """HiST 3.6.3: [upsampled coarse || lateral skip] -> d, initialised as their average so that the
    stem-to-head path starts as an identity and the coarse context is learned on top of it."""

    def __init__(self, dim: int):
        super().__init__(2 * dim, dim)
        with torch.no_grad():
            self.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)], 1) / 2)
            self.bias.zero_()

    def forward(self, up, skip):
        """Linear([up || skip]) as two products summed in place: no (N, 2d) concatenation."""
        d = up.shape[1]
        out = F.linear(skip, self.weight[:, d:], self.bias)   # bf16 under autocast, which addmm_ (in place) is
        return out.addmm_(up.to(out.dtype), self.weight[:, :d].T.to(out.dtype))  # not: its operands follow out


class SubPool(nn.Module):
    """Sub-tokens -> the next level up (the spot, or a coarser sub level). `linear`: HiST eq. (4), a learned
    map per child slot (Coarsen). `attention`: HiFusion's CCF, the parent's query (the spot's own embedding;
    at a sub level without features of its own, the mean of its children) attends over its <= 4 children."""

    def __init__(self, dim: int, heads: int, kind: str):
        super().__init__()
        self.heads = heads
        if kind == "linear":
            self.coarsen = Coarsen(dim)
        else:
            self.coarsen, self.q, self.kv = None, nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
            self.proj, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x, parent, slot, n_parents, query=None):
        if self.coarsen is not None:
            return self.coarsen(x, parent, slot, n_parents)
        d, H = x.shape[1], self.heads
        if query is None:                                                # mean of the children
            count = x.new_zeros(n_parents).index_add_(0, parent, x.new_ones(len(parent)))
            query = x.new_zeros(n_parents, d).index_add_(0, parent, x) / count.clamp_min(1)[:, None]
        k, v = self.kv(x).view(-1, 2, H, d // H).unbind(1)               # (n, H, d/H) each
        y = child_attention(self.q(query).view(-1, H, d // H), k, v, parent)
        return self.norm(self.proj(y.flatten(1)))                        # (M, d)


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


class VarianceHead(nn.Linear):
    """A Gaussian predictive distribution's spread: log sigma^2 (n, G) of the log1p target per spot and gene
    (heteroscedastic regression, Nix & Weigend 1994), beside the mean head. Starts at sigma = 1 everywhere
    (zero weights; training starts it at each gene's variance, `start_at`); soft-bounded to (-LIMIT, LIMIT) so that exp never overflows nor a spot's weight in the
    NLL explodes."""
    LIMIT = 12.0

    def __init__(self, dim: int, n_genes: int):
        super().__init__(dim, n_genes)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def start_at(self, variance: torch.Tensor) -> None:
        """Predict each gene's training variance (G,) at every spot: the model starts at the
        constant-width Gaussian around the training mean, and learns where spots deviate from it."""
        self.weight.zero_()
        self.bias.copy_(self.LIMIT * torch.atanh(variance.clamp_min(1e-4).log() / self.LIMIT))

    def forward(self, x):
        return self.LIMIT * torch.tanh(super().forward(x) / self.LIMIT)


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

        def mode(level):
            return "full" if level == L - 1 and cfg.coarse_attention == "full" and cfg.attention != "none" \
                else cfg.attention

        self.encoder = nn.ModuleList(
            nn.ModuleList(Block(cfg, mode(l), n_tokens) for _ in range(cfg.depths[l])) for l in range(L))
        self.coarsen = nn.ModuleList(Coarsen(d) for _ in range(L - 1))
        self.uncoarsen = nn.ModuleList(Uncoarsen(d) for _ in range(L - 1))
        self.fuse = nn.ModuleList(Fuse(d) for _ in range(L - 1))  # HiST 3.6.3 lateral fusion
        # decoder[i] works at level L-2-i (deepest first, as decoder_depths is written)
        self.decoder = nn.ModuleList(
            nn.ModuleList(Block(cfg, mode(L - 2 - i), n_tokens) for _ in range(n))
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
        self.norm = nn.LayerNorm(d)
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
        self.var_head = VarianceHead(d, n_genes) if cfg.head_var else None

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

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, features, coords, pseudo_features=None, pseudo_coords=None, unit=None,
                return_attention=False, out_dtype=None, sub_features=None, sub_valid=None, feat_stats=None):
        """features (N, C), coords (N, 2) in micrometres -> {"pred": (N, G), ...} in the caller's spot order.
        `out_dtype`: dtype of the per-spot outputs (default float32; float16 halves a 1M-spot prediction).
        `feat_stats`: (mean, std), (C,) each, to standardise every feature (spots, sub-patches, pseudo-spots)
        with instead of the training statistics (model.slide_norm: the slide's own, baselines.SpatialStart).
        Every per-spot step runs on chunks of spots; without grad in eval mode their results are written into
        preallocated tensors, so memory stays a few (N, d) tensors plus the outputs."""
        cfg, L, N = self.cfg, len(self.cfg.depths), features.shape[0]
        maps = [] if return_attention else None
        recompute = cfg.checkpoint and self.training and torch.is_grad_enabled() and maps is None

        def call(fn, *args):  # model.checkpoint keeps only fn's inputs and recomputes fn in the backward:
            # training memory is then about one (N, d) tensor per step of the U-Net, not all activations
            return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)

        unit = unit or cfg.unit_um or lattice.default_unit(coords)
        sites = lattice.to_lattice(coords, unit)
        # Work in row-major lattice order: sites are unique, so this order does not depend on the order
        # of the input spots, and neighbour ties (k-NN on integer sites) break the same way for any input order.
        order = lattice.rowmajor_order(sites)
        coords, sites = coords[order], sites[order]
        K = cfg.sub_levels
        if K:  # HiFusion: sub-spot sites are the spot sites refined by r = 2^K (lattice.refine); coarsening
            # them K times gives back exactly the spot sites, so one pyramid holds the sub and spot levels
            r = 2 ** K
            if sub_features is None or tuple(sub_features.shape[:2]) != (N, r * r):
                raise ValueError(f"model.sub_levels = {K} needs sub_features of shape ({N}, {r * r}, C), found "
                                 f"{None if sub_features is None else tuple(sub_features.shape)}")
            valid = torch.ones(N, r * r, dtype=torch.bool, device=sites.device) if sub_valid is None else sub_valid
            spot_of, s_of = torch.nonzero(valid[order], as_tuple=True)    # sub-tokens by (sorted spot, s)
            pyramid = lattice.build_pyramid(lattice.refine(sites, r)[spot_of, s_of], K + L, cfg.w)
        else:
            pyramid = lattice.build_pyramid(sites, L, cfg.w)      # built once, shared by every layer
        levels = pyramid.levels[K:]                               # the spot level and the coarser ones
        x = call(by_rows, lambda rows: self._stem(features[order[rows]], feat_stats), N)  # (N, d), no (N, C) copy
        if cfg.pos_encoding:
            x = x + sinusoidal_2d(sites, cfg.dim)
        tokens = self.tokens

        align, sub_skips = None, []
        if K:  # levels below the spot: stem on the sub-patches, a block per level, pooled into the spot
            xs = call(by_rows, lambda rows: self._stem(sub_features[order[spot_of[rows]], s_of[rows]], feat_stats), len(s_of))
            for l in range(K):
                level = pyramid.levels[l]
                xs, tokens = call(self.sub_encoder[l], xs, tokens, level, self._knn_index(level, self.sub_encoder[l:l + 1]), maps)
                sub_skips.append(xs)
                own = x if l == K - 1 else None                   # the spot's own embedding queries (CCF)
                xs = call(self.sub_pool[l], xs, level.parent, level.slot, pyramid.levels[l + 1].sites.shape[0], own)
            align = None if inference(self) else (xs, x)          # HiFusion's alignment: pooled vs own
            x = self.sub_fuse(xs, x)                              # (N, d)

        if len(self.local):  # FEAST local stage: k-NN attention over the spots and any off-grid pseudo-spots
            xy = coords / unit                                   # continuous lattice units, (N, 2)
            if pseudo_features is not None:
                xy = torch.cat([xy, pseudo_coords / unit])       # (N + M, 2)
                x = torch.cat([x, self._stem(pseudo_features, feat_stats)])
            index = knn(xy, xy, min(cfg.knn_k, xy.shape[0]))
            points = _Points(xy)
            for block in self.local:
                x, _ = call(block, x, None, points, index, maps)
            x = x[:N]                                            # pseudo-spots are dropped

        skips = []
        for l in range(L):                                       # encoder
            level = levels[l]
            index = self._knn_index(level, self.encoder[l])
            for block in self.encoder[l]:
                x, tokens = call(block, x, tokens, level, index, maps)
            if l < L - 1:
                skips.append(x)
                x = call(self.coarsen[l], x, level.parent, level.slot, levels[l + 1].sites.shape[0])
        decoded = {L - 1: x}                                     # every level's decoder tokens, for its head
        for i, blocks in enumerate(self.decoder):                # decoder, deepest first
            l = L - 2 - i
            level = levels[l]

            def up_fuse(x, skip, l=l, level=level):  # HiST eq. 5 upsampling, 3.6.3 fusion with the lateral skip
                return self.fuse[l](self.uncoarsen[l](x, level.parent, level.slot), skip)
            x = call(up_fuse, x, skips.pop())  # (l, level bound as defaults: a checkpoint calls it again later)
            index = self._knn_index(level, blocks)
            for block in blocks:
                x, tokens = call(block, x, tokens, level, index, maps)
            decoded[l] = x
        for i, block in enumerate(self.sub_decoder):             # below the spot, down to the finest out level
            level = pyramid.levels[K - 1 - i]

            def up_skip(x, skip, i=i, level=level):
                return self.sub_skip[i](self.sub_uncoarsen[i](x, level.parent, level.slot), skip)
            x = call(up_skip, x, sub_skips[K - 1 - i])
            x, tokens = call(block, x, tokens, level, self._knn_index(level, [block]), maps)
            decoded[-1 - i] = x
        x = decoded[0]

        back = torch.argsort(order)                              # row of each caller's spot in x
        head = lambda x, rows: self._head(self.norm(x[back[rows]]), tokens)  # noqa: E731  (caller's rows)
        if inference(self):                                      # chunks of spots, written into the outputs
            out = {}
            for rows in row_chunks(N):
                for k, v in head(x, rows).items():
                    if k not in out:
                        out[k] = v.new_empty(N, *v.shape[1:], dtype=out_dtype or v.dtype)
                    out[k][rows] = v
        else:
            out = {k: v.to(out_dtype or v.dtype) for k, v in call(head, x, slice(None)).items()}
        if K or list(cfg.out_levels) != [0]:
            out.update(self._levels(pyramid, order, decoded, out_dtype))
        if align is not None:
            out["align"] = align
        if return_attention:
            out["attention"] = maps
        return out

    def _levels(self, pyramid, order, decoded, out_dtype):
        """The extra out_levels' predictions {"levels": {k: (N_k, G)}}, the parent maps between all levels
        {"parents": {k: (N_k,) row at level k + 1}} and, below the spot, {"sub_index": {k: (N_k,) n * r^2 + s}},
        rows in the order losses.level_loss and eval.level_outputs read: caller's spots at level 0, sorted by
        (caller's spot, sub-position s = r * ix + iy, r = 2^-k) below it, lattice row-major above it."""
        K, L = self.cfg.sub_levels, len(self.cfg.depths)
        levels, N = pyramid.levels, len(order)
        parents = {j: levels[K + j].parent for j in range(1, L - 1)}
        parents[0] = levels[K].parent[torch.argsort(order)] if L > 1 else None
        perm, sub_index, spot, inv = {}, {}, torch.arange(N, device=order.device), None
        for l in range(K - 1, -1, -1):                           # from just below the spot downwards
            k, r, lvl = l - K, 2 ** (K - l), levels[l]
            spot = spot[lvl.parent]                              # sorted spot row of each row of level l
            key = order[spot] * r * r + r * (lvl.sites[:, 0] % r) + lvl.sites[:, 1] % r
            perm[k] = torch.argsort(key)
            sub_index[k] = key[perm[k]]
            up = lvl.parent[perm[k]]
            parents[k] = order[up] if inv is None else inv[up]   # caller's rows of the level above
            inv = torch.argsort(perm[k])
        preds = {}
        for name, head in self.level_heads.items():
            k = int(name)
            t, idx = decoded[k], perm.get(k)
            n = t.shape[0]
            rows = (lambda rows, t=t, idx=idx, head=head: head(t[rows if idx is None else idx[rows]]))
            if inference(self):
                preds[k] = by_rows(rows, n, out=t.new_empty(n, self.level_heads[name][-1].out_features,
                                                            dtype=out_dtype or torch.float32))
            else:  # gathered once, so each chunk reads a view (attention.rows_of)
                read = rows_of(t if idx is None else t[idx])
                preds[k] = by_rows(lambda rows, read=read, head=head: head(read(rows)), n).to(out_dtype or torch.float32)
        out = {"levels": preds, "parents": {k: v for k, v in parents.items() if v is not None}}
        if sub_index:
            out["sub_index"] = sub_index
        return out

    def _stem(self, features, stats=None):
        mean, std = (self.feat_mean, self.feat_std) if stats is None else stats  # training's, or the slide's
        return self.stem((features - mean) / std)

    def _head(self, x, tokens):
        """Normalised tokens x (n, d) -> {"pred": (n, G), ["log_var": (n, G)], ["pathway_scores": (n, P)], ["zinb": (n, 3G)]}."""
        cfg, out = self.cfg, {}
        if cfg.head == "pathway":
            out["pred"], out["pathway_scores"] = self.head(x, tokens[cfg.calibration_tokens:])
        elif cfg.head == "zinb":
            out["zinb"] = self.head(x)
            log_rate, _, pi_logit = out["zinb"].chunk(3, dim=-1)
            out["pred"] = torch.log1p(torch.sigmoid(-pi_logit) * log_rate.exp())  # log1p E[x] per 1e4
        else:
            out["pred"] = self.head(x)
        if self.var_head is not None:
            out["log_var"] = self.var_head(x)                    # (n, G) log sigma^2 of the log1p target
        if cfg.pathway_tokens and "pathway_scores" not in out:
            p = tokens[cfg.calibration_tokens:]
            out["pathway_scores"] = F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).T
        return out

    def _knn_index(self, level, blocks):
        if self.cfg.attention != "knn" or not any(b.spot.mode == "knn" for b in blocks):
            return None
        xy = level.sites.float()
        return knn(xy, xy, min(self.cfg.knn_k, xy.shape[0]))


@dataclass
class _Points:
    """A level-like view of continuous positions, for k-NN attention off the lattice."""
    sites: torch.Tensor


def build_model(cfg: ModelConfig, in_dim: int, n_genes: int) -> nn.Module:
    check_config(cfg)
    if cfg.arch == "tessera" and (cfg.spatial_start or cfg.slide_norm):
        return SpatialStart(cfg, Tessera(cfg, in_dim, n_genes), in_dim, n_genes)
    if cfg.arch == "tessera":
        return Tessera(cfg, in_dim, n_genes)
    if cfg.arch == "ridge_spatial":
        return SpatialRidge(cfg, in_dim, n_genes)
    if cfg.arch in ("linear", "mlp"):
        return PerSpot(cfg, in_dim, n_genes)
    return Ridge(cfg, in_dim, n_genes)

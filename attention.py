"""Every attention of the model, in the form its paper writes it, with ordinary autograd.

    attend            HiST eq. (3) softmax(Q K^T / sqrt(D) + B) V, with FEAST's signed weights
    signed_softmax    FEAST key design 2: softmax(S + B) - beta * softmax((-S + B) / tau)
    PairBias          B from the offset between two tokens: HiST eq. (3)'s learned table b(di, dj),
                      or FEAST's ALiBi distance bias -m_h * ||offset|| (key design 1)
    window_attention  HiST eq. (2): the tokens of a window attend to each other (or to the keys of
                      eq. (2)'s union of standard and shifted windows, lattice.union_rulebook)
    knn_attention     FEAST key design 3: each query attends to its k nearest tokens (lattice.knn)
    full_attention    FEAST key design 1: every token attends to every token (the coarsest level)
    SpotAttention     the spot-to-spot quadrant (h2h) of a block: one of the above, with its q, k, v
    GlobalAttention   HiST sec. 3.4.2 calibration token and SpatialTranscriptFormer's pathway
                      tokens: tokens read the spots (p2h) and each other (p2p), spots read
                      them (h2p)

Shapes: N tokens, H heads, D head dim, W windows of S = (2w)^2 slots, K neighbours, T global tokens.
The same maths runs through kernels.py with model.kernels = fast (chunks, hand-written backward,
online softmax: what a million-spot slide needs); tests/test_kernels.py holds the two equal.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import lattice


def signed_softmax(s, bias=None, mask=None, beta=0.0, tau=1.0):
    """FEAST negative attention weights over the last dim: softmax(S + B) - beta *
    softmax((-S + B) / tau); with beta = 0 the plain softmax(S + B) of HiST eq. (3). `mask` (True =
    may attend) is B = -inf; every row needs one allowed key."""
    b = torch.zeros_like(s) if bias is None else bias.to(s.dtype)
    b = b if mask is None else b.masked_fill(~mask, -math.inf)
    a = torch.softmax(s + b, -1)
    return a - beta * torch.softmax((b - s) / tau, -1) if beta else a


def attend(q, k, v, bias=None, mask=None, beta=0.0, tau=1.0, dropout_p=0.0):
    """A V with A = signed_softmax(Q K^T / sqrt(D), B): q (..., Lq, D), k and v (..., Lk, D), bias
    and mask broadcastable to (..., Lq, Lk) -> (..., Lq, D). Dropout drops attention weights."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])   # (..., Lq, Lk)
    a = signed_softmax(s, bias, mask, beta, tau)
    if dropout_p:
        a = F.dropout(a, dropout_p)
    return a @ v


def alibi_slopes(H, kind="alibi"):
    """The head slopes m_h of the distance bias, (H,). 'alibi' (Press et al. 2022, as FEAST's paper
    cites): 2^(-8h/H), h = 1..H, for H a power of two, else those of the next lower power of two p
    and every other slope of 2p. 'feast': FEAST's code, 1 / 2^(h + 1), h = 0..H-1."""
    if kind == "feast":
        return torch.tensor([0.5 ** (h + 1) for h in range(H)])

    def geometric(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 1 << (H.bit_length() - 1)  # largest power of two <= H
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][: H - p])


def distance_bias(xy_q, xy_k, slopes):
    """FEAST B_h(i, j) = -m_h * ||xy_i - xy_j||: xy_q (Lq, 2), xy_k (Lk, 2) -> (H, Lq, Lk)."""
    return PairBias.alibi(xy_q[:, None, :] - xy_k[None, :, :], slopes)


class PairBias(nn.Module):
    """The additive bias B of a (query, key) pair from its lattice offset (di, dj) = query - key:
    'rpb' HiST eq. (3), a learned b_h(di, dj), one (4w - 1)^2 table per head (offsets inside one
    window or eq. (2)'s union); 'alibi' FEAST, -m_h * ||offset||; 'none'. The model and plots.py
    both build their biases here. forward: offsets (..., 2) -> (H, ...), or None."""

    def __init__(self, kind, heads, w, slopes="alibi", groups=1):
        super().__init__()
        self.kind, self.w = kind, w
        if kind == "rpb":
            self.table = nn.Parameter(torch.empty(heads, (4 * w - 1) ** 2))
            nn.init.trunc_normal_(self.table, std=0.02)
        elif kind == "alibi":  # groups: split windows give each half of the heads every slope
            m = alibi_slopes(heads // groups, slopes).repeat(groups)
            self.register_buffer("slopes", m, persistent=False)

    @staticmethod
    def alibi(offsets, slopes):
        dist = offsets.to(slopes.dtype).pow(2).sum(-1).sqrt()      # (...)
        return -slopes.view(-1, *[1] * dist.dim()) * dist          # (H, ...)

    def forward(self, offsets):
        if self.kind == "rpb":
            return self.table[:, lattice.offset_index(offsets, self.w)]
        return self.alibi(offsets, self.slopes) if self.kind == "alibi" else None


def window_attention(q, k, v, queries, keys, bias=None, allowed=None, beta=0.0, tau=1.0,
                     dropout_p=0.0):
    """HiST eq. (2)-(3): the queries of each window attend to the keys of that window. q, k, v
    (N, H, D); queries (W, Sq), keys (W, Sk): token ids, -1 = empty (a rulebook, or for eq. (2)
    lattice.union_rulebook's keys); bias (H, Sq, Sk), allowed (Sq, Sk): the same in every window."""
    qw = q[queries.clamp(min=0)].transpose(1, 2)                       # (W, H, Sq, D)
    kw, vw = (t[keys.clamp(min=0)].transpose(1, 2) for t in (k, v))    # (W, H, Sk, D)
    mask = (keys >= 0)[:, None, None, :]                               # (W, 1, 1, Sk)
    mask = mask if allowed is None else mask & allowed
    out = attend(qw, kw, vw, bias, mask, beta, tau, dropout_p).transpose(1, 2)  # (W, Sq, H, D)
    filled = queries >= 0
    return q.new_zeros(q.shape).index_put((queries[filled],), out[filled])


def knn_attention(q, k, v, index, bias=None, beta=0.0, tau=1.0, dropout_p=0.0):
    """FEAST local stage: query n attends to its K neighbours index[n]. q (Nq, H, D), k and v
    (Nk, H, D), index (Nq, K), bias (H, Nq, K) -> (Nq, H, D)."""
    kn, vn = (t[index].transpose(1, 2) for t in (k, v))                # (Nq, H, K, D)
    b = None if bias is None else bias.transpose(0, 1)[:, :, None]     # (Nq, H, 1, K)
    return attend(q[:, :, None], kn, vn, b, None, beta, tau, dropout_p)[:, :, 0]


def full_attention(q, k, v, xy=None, bias=None, beta=0.0, tau=1.0, dropout_p=0.0, chunk=4096):
    """FEAST key design 1: every token attends to every token, with bias(offsets) (a PairBias, or
    None) on the positions xy (N, 2). q, k, v (N, H, D) -> (N, H, D), in chunks of queries, so
    memory is O(chunk * N * H): the coarsest level of the pyramid, where few tokens remain."""
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)                      # (H, N, D)
    out = []
    for rows in torch.arange(len(q), device=q.device).split(chunk):
        b = None if bias is None else bias(xy[rows, None, :] - xy[None, :, :])   # (H, c, N)
        out.append(attend(q[rows].transpose(0, 1), kt, vt, b, None, beta, tau, dropout_p))
    return torch.cat(out, 1).transpose(0, 1) if out else torch.zeros_like(q)


class SpotAttention(nn.Module):
    """Spot-to-spot attention (the h2h quadrant), `mode` one of:
    'window'  HiST W-MSA over the lattice windows. windows='union': HiST eq. (2), every head attends
              over the union of its standard and shifted window (one softmax); windows='split':
              the first H/2 heads attend within the standard windows, the others within the shifted
              ones (two softmaxes, each half of the heads sees half of eq. (2)'s pairs);
    'knn'     FEAST's local stage over the K nearest tokens; 'full': FEAST's global stage;
    'none'    h2h off: zeros, so the caller can always add.
    bias 'rpb' (windows only), 'alibi' (lattice distance; `slopes` 'alibi' or 'feast') or 'none';
    signed: FEAST's negative branch with beta, tau. Owns the qkv projection; the block sums the
    output with GlobalAttention's before one projection (HiST eq. 1). fast: kernels.py."""

    def __init__(self, dim, heads, mode="window", w=3, bias="rpb", signed=False, beta=1.5, tau=0.6,
                 attn_drop=0.0, windows="split", slopes="alibi", fast=False):
        super().__init__()
        if mode not in ("window", "knn", "full", "none") or bias not in ("rpb", "alibi", "none"):
            raise ValueError(f"SpotAttention: mode {mode!r} / bias {bias!r}: expected mode window, "
                             "knn, full or none and bias rpb, alibi or none")
        if dim % heads or (mode == "window" and windows == "split" and heads % 2):
            raise ValueError(f"SpotAttention: dim {dim} must divide by heads {heads}, and split "
                             "windows give half the heads to each partition: heads must be even")
        if mode in ("knn", "full") and bias == "rpb":
            raise ValueError(f"SpotAttention: bias 'rpb' is a table over window offsets; mode "
                             f"{mode!r} needs bias 'alibi' or 'none'")
        self.dim, self.heads, self.mode, self.windows, self.w, self.fast = (
            dim, heads, mode, windows, w, fast)
        self.beta, self.tau, self.attn_drop = (beta if signed else 0.0), tau, attn_drop
        if mode == "none":
            return
        self.qkv = nn.Linear(dim, 3 * dim)
        split = mode == "window" and windows == "split"
        self.bias = PairBias(bias, heads, w, slopes, 2 if split else 1)
        if mode == "window":
            pairs = lattice.union_pairs if windows == "union" else lattice.window_pairs
            allowed, offsets = pairs(w)
            self.register_buffer("allowed", allowed, persistent=False)  # (S, Sk) slot pairs
            self.register_buffer("offsets", offsets, persistent=False)  # (S, Sk, 2) query - key

    def _load_from_state_dict(self, state, prefix, *args):
        if prefix + "rpb.table" in state:  # a checkpoint from before the bias was one PairBias
            state[prefix + "bias.table"] = state.pop(prefix + "rpb.table")
        super()._load_from_state_dict(state, prefix, *args)

    def forward(self, h, level, knn_index=None):
        """h (N, dim) normalised tokens of a lattice.Level (k-NN: of points with .sites (N, 2))
        -> (N, dim), the heads concatenated, before the block's projection."""
        if self.mode == "none":
            return torch.zeros_like(h)
        if self.fast:
            return kernels.spot_attention(self, h.__getitem__, len(h), level, knn_index)
        q, k, v = self.qkv(h).view(len(h), 3, self.heads, -1).unbind(1)   # (N, H, D) each
        args = dict(beta=self.beta, tau=self.tau, dropout_p=self.attn_drop * self.training)
        attend_in = {"window": self.windowed, "knn": self.nearest, "full": self.everywhere}
        return attend_in[self.mode](q, k, v, level, knn_index, args).reshape(len(h), self.dim)

    def windowed(self, q, k, v, level, knn_index, args):
        if self.windows == "union":                                       # HiST eq. (2)
            return window_attention(q, k, v, level.windows, level.union,
                                    self.bias(self.offsets), self.allowed, **args)
        b = self.bias(self.offsets)                                       # half the heads each
        return torch.cat([window_attention(q[:, hs], k[:, hs], v[:, hs], book, book,
                                           None if b is None else b[hs], **args)
                          for hs, book in self.partitions(level)], 1)

    def nearest(self, q, k, v, level, knn_index, args):
        xy = level.sites.float()
        return knn_attention(q, k, v, knn_index, self.bias(xy[:, None, :] - xy[knn_index]), **args)

    def everywhere(self, q, k, v, level, knn_index, args):
        return full_attention(q, k, v, level.sites.float(), self.bias, **args)

    def query_keys(self, level, row, knn_index=None):
        """For pictures of one query token `row`: its keys (K,) token rows, their offsets (K, 2)
        (query - key, what self.bias reads) and attends (H, K), which heads see each key."""
        if self.mode == "window":
            parts = self.partitions(level) if self.windows == "split" else \
                [(slice(None), level.windows)]
            keys, offsets, heads = [], [], []
            for hs, book in parts:
                window, slot = (book == row).nonzero()[0].tolist()
                row_keys = (level.union if self.windows == "union" else book)[window]
                ok = (row_keys >= 0) & self.allowed[slot]
                keys.append(row_keys[ok])
                offsets.append(self.offsets[slot][ok])
                heads.append(torch.zeros(self.heads, int(ok.sum()), dtype=torch.bool))
                heads[-1][hs] = True
            keys, offsets, heads = torch.cat(keys), torch.cat(offsets), torch.cat(heads, 1)
            unique, inverse = torch.unique(keys, return_inverse=True)
            attends = torch.zeros(self.heads, len(unique)).index_add_(1, inverse, heads.float()) > 0
            first = torch.full((len(unique),), len(keys)).scatter_reduce(
                0, inverse, torch.arange(len(keys)), "amin")
            return unique, offsets[first], attends
        xy = level.sites.float()
        keys = knn_index[row] if self.mode == "knn" else torch.arange(len(xy))
        return keys, xy[row] - xy[keys], torch.ones(self.heads, len(keys), dtype=torch.bool)

    def partitions(self, level):
        """split windows: (heads, rulebook) of the standard and of the shifted partition."""
        half = self.heads // 2
        return (slice(0, half), level.windows), (slice(half, None), level.shifted)


class GlobalAttention(nn.Module):
    """Spots <-> global tokens (calibration token(s) + pathway tokens), linear in N.

    Tokens read the spots (p2h) and each other (p2p) in one softmax over [X; C], HiST sec. 3.4.2:
    C <- C + Attn(C Wq, [X; C] Wk, [X; C] Wv), here followed by a projection (tessera's; HiST
    writes none). Spots read the tokens (h2p): MCA(X, C) = Attn(X Wq, C Wk, C Wv), returned before
    projection so the block sums it with SpotAttention's output (HiST eq. 1). Spots read the tokens
    as they were at the start of the block. Each quadrant is a switch (SpatialTranscriptFormer)."""

    def __init__(self, dim, heads, p2h=True, p2p=True, h2p=True, fast=False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"GlobalAttention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.p2h, self.p2p, self.h2p = dim, heads, p2h, p2p, h2p
        self.fast = fast
        if h2p:
            self.q_spot = nn.Linear(dim, dim)
            self.kv_token = nn.Linear(dim, 2 * dim)
        if p2h or p2p:
            self.q_token = nn.Linear(dim, dim)
            self.kv_context = nn.Linear(dim, 2 * dim)
            self.proj = nn.Linear(dim, dim)

    def split(self, t):
        return t.reshape(t.shape[0], self.heads, -1).transpose(0, 1)  # (L, dim) -> (H, L, D)

    def merge(self, t):
        return t.transpose(0, 1).reshape(t.shape[1], self.dim)        # (H, L, D) -> (L, dim)

    def spots_read_tokens(self, x, tokens):
        """h2p, MCA(X, C): x (n, dim) attend to tokens (T, dim) -> (n, dim); zeros when off."""
        if not self.h2p:
            return x.new_zeros(x.shape[0], self.dim)
        k, v = self.kv_token(tokens).chunk(2, -1)
        return self.merge(attend(self.split(self.q_spot(x)), self.split(k), self.split(v)))

    def tokens_read(self, x, tokens):
        """p2h / p2p: proj(Attn(C Wq, [X; C] Wk, [X; C] Wv)) -> (T, dim); zeros when both off."""
        if not (self.p2h or self.p2p):
            return torch.zeros_like(tokens)
        if self.fast and x.shape[0] > kernels.CHUNK:   # chunks of spots: a large slide's memory
            return kernels.tokens_read(self, x.__getitem__, x.shape[0], tokens)
        context = torch.cat([x] * self.p2h + [tokens] * self.p2p)         # [X; C], (N + T, dim)
        k, v = self.kv_context(context).chunk(2, -1)
        q = self.split(self.q_token(tokens))                              # (H, T, D)
        return self.proj(self.merge(attend(q, self.split(k), self.split(v))))

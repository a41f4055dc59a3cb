"""Attention maths and modules: signed attention, ALiBi distance bias, window / k-NN / full attention.

Papers (../shared/papers): FEAST key designs 1-3 (fully connected attention with an ALiBi distance bias,
negative attention, local k-NN + global stages), HiST sec. 3.4 (eq. 1-3: window attention over the
standard and shifted partitions of the sparse lattice, slide calibration token), SpatialTranscriptFormer
(quadrants p2p, p2h, h2p, h2h between pathway tokens and spots).

Shapes: N spots, H heads, D head dim, W windows of S = (2w)^2 slots, K neighbours, T global tokens.
Every function takes and returns tensors; the modules hold the projections. Memory is linear in N
everywhere except `full_attention`, which is O(chunk * N * H).
"""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lattice

CHUNK = 1 << 14  # spots per chunk of the per-spot steps (projections, FFN, stem, head, the tokens' read)


def row_chunks(n):
    """Slices of at most CHUNK rows covering 0 .. n (slices, so a chunk of a tensor is a view)."""
    return [slice(start, start + CHUNK) for start in range(0, n, CHUNK)]


def rows_of(x: torch.Tensor):
    """rows -> x[rows]. While autograd records, the slices of row_chunks are views from one x.split: the
    backward then builds x's gradient once from every chunk's, where a read x[rows] per chunk would give
    x a zero-filled gradient of all its rows per chunk (a term in N^2 / CHUNK)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.__getitem__
    parts = x.split(CHUNK)

    def read(rows):
        if isinstance(rows, slice) and rows.step is None and rows.start is not None \
                and rows.start % CHUNK == 0 and rows.stop == rows.start + CHUNK:
            return parts[rows.start // CHUNK]
        return x[rows]
    return read


def signed_attention(q, k, v, bias=None, mask=None, beta=0.0, tau=1.0, *, dropout_p=0.0):
    """FEAST negative attention: softmax(S + B) @ v - beta * softmax((-S + B) / tau) @ v, S = q k^T / sqrt(D).

    q (..., Lq, D), k and v (..., Lk, D); `bias` additive, broadcastable to (..., Lq, Lk); `mask` bool,
    True = may attend. A query with no allowed key returns zeros (and zero gradients), never NaN.
    With beta = 0 it is ordinary attention, one fused call."""
    has_key = None
    if mask is not None:
        has_key = mask.any(-1, keepdim=True)  # (..., Lq, 1)
        mask = mask | ~has_key  # an empty row attends everywhere (finite, no NaN), and is zeroed below
    attn_mask = mask
    if bias is not None:
        bias = bias.to(q.dtype)
        attn_mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if beta:  # the negative branch: sdpa scales by 1/sqrt(D) itself, so (-q/tau) k^T/sqrt(D) + B/tau
        neg_mask = attn_mask / tau if bias is not None else mask
        out = out - beta * F.scaled_dot_product_attention(-q / tau, k, v, attn_mask=neg_mask, dropout_p=dropout_p)
    if has_key is not None:
        out = torch.where(has_key, out, 0.0)
    return out


def signed_softmax(s, b=0.0, beta=0.0, tau=1.0, dim=-1):
    """FEAST negative attention weights from scores s and an additive bias b (-inf = not allowed):
    a = softmax(s + b) - beta * softmax((b - s) / tau), over `dim`. Returns (a, pos, neg), the two softmaxes
    kept for a hand-written backward (neg is None when beta = 0)."""
    pos = _softmax(s + b, dim)
    neg = _softmax((b - s) / tau, dim) if beta else None
    return (pos - beta * neg if beta else pos), pos, neg


def _softmax(s, dim):
    """Softmax of a fresh tensor; in place when no gradient flows (faster than torch.softmax on short rows
    on the CPU)."""
    if s.requires_grad:
        return torch.softmax(s, dim)
    s -= s.amax(dim, keepdim=True)
    s.exp_()
    return s.div_(s.sum(dim, keepdim=True))


def signed_weights(q, k, bias=None, mask=None, beta=0.0, tau=1.0):
    """The explicit weight matrix of `signed_attention`, (..., Lq, Lk), for inspection of small cases
    (FEAST's excitatory / inhibitory maps). Rows sum to 1 - beta; a row with no allowed key is zero."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    b = torch.zeros_like(s) if bias is None else bias.to(q.dtype).expand_as(s)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand_as(s)
    keep = m.any(-1, keepdim=True)  # a row with no allowed key: any finite weights, zeroed below
    a, _, _ = signed_softmax(s, b.masked_fill(~m, float("-inf")).masked_fill(~keep, 0.0), beta, tau)
    return torch.where(keep, a, 0.0)


def alibi_slopes(H):
    """ALiBi head slopes (Press et al. 2022): 2^(-8h/H), h = 1..H, when H is a power of two. Otherwise the
    paper's rule: the slopes of the closest lower power of two p, then every other slope of 2p."""
    def geometric(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 1 << (H.bit_length() - 1)  # largest power of two <= H
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][: H - p])  # (H,)


def distance_bias(xy_q, xy_k, slopes):
    """FEAST B_h(i, j) = -m_h * ||xy_i - xy_j||: xy_q (Lq, 2), xy_k (Lk, 2), slopes (H,) -> (H, Lq, Lk)."""
    xy_q, xy_k = xy_q.to(slopes.dtype), xy_k.to(slopes.dtype)
    dist = (xy_q[:, None, :] - xy_k[None, :, :]).pow(2).sum(-1).sqrt()  # (Lq, Lk)
    return -slopes[:, None, None] * dist


def window_attention(q, k, v, windows, bias=None, beta=0.0, tau=1.0, *, dropout_p=0.0):
    """HiST eq. 2-3: attention among the tokens of each window, with FEAST's negative branch when beta > 0.

    q, k, v (N, H, D); `windows` = lattice.window_batches(rulebook), or a rulebook (W, S) (token ids,
    -1 = empty slot, each token in at most one row; a token in no row gets zeros); bias (H, S, S) shared by
    all windows (relative table or ALiBi on slot offsets). Dropout drops attention weights.

    Windows with the same number of tokens c are one dense (w, H, c, c) attention: no padding, no mask.
    Forward and backward are written by hand (`_WindowAttention`) and run batch by batch, so every
    temporary is the size of one batch (about 8k pairs per head); the backward keeps only the attention
    weights (pairs x H) and gathers q, k, v again: memory O(N H D + pairs H), never O(N^2) or O(pairs H D).
    Returns (N, H, D)."""
    if isinstance(windows, torch.Tensor):
        windows = lattice.window_batches(windows)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    return _WindowAttention.apply(q, k, v, bias, windows, beta, tau, dropout_p, grad)


def _pairs(slots, S):
    """(w, c) slots -> (w * c * c,) flat index a * S + b of every (query slot a, key slot b), row-major."""
    return (slots[:, :, None] * S + slots[:, None, :]).flatten()


def _rows(x):
    """x (N, H, D) as rows of D numbers: (R, step) with x[n, h] == R[n * step + h]. A view when each token's
    heads lie D apart in memory (contiguous, or a head slice of a packed q/k/v projection), else a copy."""
    N, H, D = x.shape
    if N and x.stride(2) == 1 and x.stride(1) == D and x.stride(0) % D == 0 and x.stride(0) >= H * D:
        step = x.stride(0) // D
        return x.as_strided(((N - 1) * step + H, D), (D, 1)), step
    return x.reshape(N * H, D), H


class _WindowAttention(torch.autograd.Function):
    """window_attention's forward and backward, one batch of equal-sized windows at a time.

    q, k, v are read as rows of D numbers (`_rows`): gathering the rows of a batch's tokens in (window, head,
    token) order gives (w, H, c, D) directly, ready for batched matmuls, and the result goes back with one
    index_copy_. Scores and softmax in float32 at least (also under bf16 autocast). Only the weights are
    kept for the backward, which gathers q, k, v again.
    With a = softmax(S + B) - beta * softmax((B - S) / tau), dropout mask m, out = (a * m / (1 - p)) V:
      dV = a'^T dO,  dA = m / (1 - p) * dO V^T,
      g+ = P+ (dA - rowsum(P+ dA)),  g- = -beta P- (dA - rowsum(P- dA)),
      dS = g+ - g- / tau,  dB = g+ + g- / tau,  dQ = dS K / sqrt(D),  dK = dS^T Q / sqrt(D)."""

    @staticmethod
    def rows(tokens, step, heads):
        """Row ids, in (window, head, token) order, of the tokens (w, c) in rows of `step` per token."""
        return (tokens[:, None, :] * step + heads[:, None]).flatten()

    @staticmethod
    def gather(xs, tokens, heads):
        """Each (rows, step) of xs at the tokens (w, c) -> (w, H, c, D) tensors."""
        w, c = tokens.shape
        return [r.index_select(0, _WindowAttention.rows(tokens, step, heads)).view(w, len(heads), c, -1)
                for r, step in xs]

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, bias, batches, beta, tau, dropout_p, grad):
        N, H, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
        table = None if bias is None else bias.flatten(1).T.contiguous()  # (S*S, H): row a*S + b = slots (a, b)
        heads = torch.arange(H, device=q.device)
        covered = sum(t.numel() for t, _ in batches) == N    # every token in a window: no zero fill needed
        out = (v.new_empty if covered else v.new_zeros)(N, H, v.shape[-1])
        qkv, saved = [_rows(x) for x in (q, k, v)], []
        for tokens, slots in batches:
            w, c = tokens.shape
            qw, kw, vw = _WindowAttention.gather(qkv, tokens, heads)  # (w, H, c, D)
            s = (qw @ kw.transpose(-1, -2)).to(acc) / math.sqrt(D)  # (w, H, c, c)
            b = 0.0 if table is None else \
                table.index_select(0, _pairs(slots, bias.shape[-1])).view(w, c, c, H).permute(0, 3, 1, 2)
            a, pos, neg = signed_softmax(s, b, beta, tau)
            keep = torch.rand_like(a) >= dropout_p if dropout_p else None
            if keep is not None:
                a = a * keep / (1 - dropout_p)
            rows = _WindowAttention.rows(tokens, H, heads)  # in the fresh (N * H, D) outputs
            out.view(N * H, -1).index_copy_(0, rows, (a.to(vw.dtype) @ vw).view(w * H * c, -1))
            if grad:  # keep the weights of this batch for the backward (nothing is kept for inference)
                saved += [tokens, slots, pos, neg, keep]
        ctx.save_for_backward(q, k, v, *saved)  # freed by autograd after the backward
        ctx.info = (covered, None if bias is None else (bias.shape, bias.dtype), beta, tau, dropout_p)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        covered, bias_like, beta, tau, dropout_p = ctx.info
        q, k, v, *saved = ctx.saved_tensors
        N, H, D = q.shape
        heads = torch.arange(H, device=q.device)
        dq, dk, dv = ((x.new_empty if covered else x.new_zeros)(N * H, x.shape[-1]) for x in (q, k, v))
        dtable = None if bias_like is None or not ctx.needs_input_grad[3] else \
            dout.new_zeros(bias_like[0][1:].numel(), H, dtype=torch.promote_types(dout.dtype, torch.float32))
        qkvo = [_rows(x) for x in (q, k, v, dout)]
        for i in range(0, len(saved), 5):
            tokens, slots, pos, neg, keep = saved[i:i + 5]
            w, c = tokens.shape
            qw, kw, vw, do = _WindowAttention.gather(qkvo, tokens, heads)
            a = pos - beta * neg if beta else pos  # the signed weights again, from the two saved softmaxes
            da = (do @ vw.transpose(-1, -2)).to(pos.dtype)
            if keep is not None:
                a, da = a * keep / (1 - dropout_p), da * keep / (1 - dropout_p)
            rows = _WindowAttention.rows(tokens, H, heads)  # in the fresh (N * H, D) outputs
            dv.index_copy_(0, rows, (a.transpose(-1, -2).to(do.dtype) @ do).view(w * H * c, -1))
            g = pos * (da - (pos * da).sum(-1, keepdim=True))  # through softmax(S + B)
            gb = g
            if beta:  # through -beta * softmax((B - S) / tau)
                gn = -beta * neg * (da - (neg * da).sum(-1, keepdim=True))
                g, gb = g - gn / tau, g + gn / tau
            if dtable is not None:
                dtable.index_add_(0, _pairs(slots, bias_like[0][-1]), gb.permute(0, 2, 3, 1).reshape(-1, H))
            g = (g / math.sqrt(D)).to(qw.dtype)
            dq.index_copy_(0, rows, (g @ kw).view(w * H * c, -1))
            dk.index_copy_(0, rows, (g.transpose(-1, -2) @ qw).view(w * H * c, -1))
        dbias = None if dtable is None else dtable.T.reshape(bias_like[0]).to(bias_like[1])
        return dq.view(N, H, -1), dk.view(N, H, -1), dv.view(N, H, -1), dbias, None, None, None, None, None


def knn(xy_q, xy_k, k, exclude_self=False, chunk=None):
    """Indices of the k nearest keys of each query (Euclidean), nearest first: LongTensor[Nq, k'].

    k' = min(k, Nk) (min(k, Nk - 1) with exclude_self): asking for more neighbours than exist returns
    all of them. exclude_self drops key i for query i (xy_q and xy_k are the same points). Brute force
    in chunks of queries, memory O(chunk * Nk); chunk=None picks ~4M distances per chunk. Integer
    coordinates are compared exactly in int64."""
    Nq, Nk = xy_q.shape[0], xy_k.shape[0]
    k = max(min(k, Nk - int(exclude_self)), 0)
    if not (xy_q.is_floating_point() and xy_k.is_floating_point()):
        xy_q, xy_k = xy_q.long(), xy_k.long()
    chunk = chunk or max(1, (1 << 22) // max(Nk, 1))
    out = torch.empty(Nq, k, dtype=torch.long, device=xy_q.device)
    for start in range(0, Nq, chunk):
        a = xy_q[start:start + chunk]
        d2 = (a[:, None, 0] - xy_k[None, :, 0]) ** 2 + (a[:, None, 1] - xy_k[None, :, 1]) ** 2  # (c, Nk)
        if exclude_self:  # query i is key i: push it beyond every real distance
            i = torch.arange(start, min(start + len(a), Nk), device=a.device)
            d2[i - start, i] = (torch.finfo if d2.is_floating_point() else torch.iinfo)(d2.dtype).max
        out[start:start + chunk] = d2.topk(k, dim=1, largest=False).indices
    return out


def knn_attention(q, k, v, index, bias=None, beta=0.0, tau=1.0, chunk=None, *, dropout_p=0.0):
    """FEAST local stage: each query attends to its K neighbours. q (Nq, H, D), k and v (Nk, H, D),
    index (Nq, K) valid key ids, bias (H, Nq, K). `chunk` = queries per batch (None = all): memory
    O(chunk * K * H * D). Returns (Nq, H, D).

    With one query per row the scores are a product and a sum over D, cheaper than Nq * H tiny matrix
    products; the weights are FEAST's (`signed_softmax`)."""
    step, out = chunk or max(q.shape[0], 1), q.new_empty(q.shape[0], *v.shape[1:])
    for start in range(0, q.shape[0], step):
        rows = slice(start, start + step)
        kn, vn = k[index[rows]], v[index[rows]]                           # (c, K, H, D)
        s = (q[rows].unsqueeze(1) * kn).sum(-1) / q.shape[-1] ** 0.5       # (c, K, H)
        b = 0.0 if bias is None else bias[:, rows].permute(1, 2, 0).to(s.dtype)  # (c, K, H)
        w, _, _ = signed_softmax(s, b, beta, tau, dim=1)
        w = F.dropout(w, dropout_p) if dropout_p else w
        out[rows] = (w.unsqueeze(-1) * vn).sum(1)                          # (c, H, D)
    return out


def full_attention(q, k, v, xy=None, slopes=None, beta=0.0, tau=1.0, chunk=4096, *, dropout_p=0.0):
    """FEAST key design 1: every token attends to every token, with the ALiBi distance bias on `xy`
    (N, 2) when `slopes` (H,) is given. Bias built per chunk of queries: peak O(chunk * N * H).
    q, k, v (N, H, D) -> (N, H, D)."""
    if slopes is not None and xy is None:
        raise ValueError("full_attention: slopes were given but no xy to measure distances on")
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # (H, N, D)
    out = q.new_empty(q.shape[0], *v.shape[1:])
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        qc = q[rows].transpose(0, 1)  # (H, c, D)
        bias = None if slopes is None else distance_bias(xy[rows], xy, slopes)  # (H, c, N)
        out[rows] = signed_attention(qc, kt, vt, bias, None, beta, tau, dropout_p=dropout_p).transpose(0, 1)
    return out


class RelativePositionBias(nn.Module):
    """HiST eq. 3: learned B_ab = b(di_ab, dj_ab), one (4w-1)^2 table per head, shared by all windows."""

    def __init__(self, heads, w):
        super().__init__()
        self.table = nn.Parameter(torch.empty(heads, (4 * w - 1) ** 2))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer("index", lattice.relative_index(w), persistent=False)  # (S, S)

    def forward(self):
        return self.table[:, self.index]  # (H, S, S)


class SpotAttention(nn.Module):
    """Spot-to-spot attention (the h2h quadrant), one of: 'window' (HiST W-MSA), 'knn' (FEAST local stage),
    'full' (FEAST global stage), 'none' (h2h off: returns zeros so the caller can always add).

    Owns only the qkv projection: the block sums this output with GlobalAttention's before one
    projection (HiST eq. 1). Window mode uses both partitions in every block: the first H/2 heads attend
    within level.rulebook, the other H/2 within level.rulebook_shifted. Bias 'rpb' (window only),
    'alibi' (distance on slot offsets in window mode, each half with the full slope range; on
    level.sites otherwise) or 'none'. `chunk`: queries per batch (knn, full); window mode runs the
    level's window batches (lattice.window_batches); without grad it projects q, k, v batch by batch,
    so inference holds no (N, 3 dim) tensor."""

    def __init__(self, dim, heads, mode="window", w=3, bias="rpb", signed=False, beta=1.5, tau=0.6,
                 attn_drop=0.0, chunk=4096):
        super().__init__()
        if mode not in ("window", "knn", "full", "none"):
            raise ValueError(f"SpotAttention: mode must be window, knn, full or none, got {mode!r}")
        if bias not in ("rpb", "alibi", "none"):
            raise ValueError(f"SpotAttention: bias must be rpb, alibi or none, got {bias!r}")
        if dim % heads:
            raise ValueError(f"SpotAttention: dim {dim} is not divisible by heads {heads}")
        if mode == "window" and heads % 2:
            raise ValueError(f"SpotAttention: window mode splits heads between the standard and shifted "
                             f"windows, so heads must be even, got {heads}")
        if mode in ("knn", "full") and bias == "rpb":
            raise ValueError(f"SpotAttention: bias 'rpb' is a table over window slot offsets; mode {mode!r} "
                             f"needs bias 'alibi' or 'none'")
        self.dim, self.heads, self.mode, self.bias, self.chunk = dim, heads, mode, bias, chunk
        self.beta, self.tau, self.attn_drop = (beta if signed else 0.0), tau, attn_drop
        if mode == "none":
            return
        self.qkv = nn.Linear(dim, 3 * dim)
        if mode == "window" and bias == "rpb":
            self.rpb = RelativePositionBias(heads, w)
        elif mode == "window" and bias == "alibi":
            offsets = lattice.slot_offsets(w).float()  # (S, 2)
            half = distance_bias(offsets, offsets, alibi_slopes(heads // 2))  # (H/2, S, S)
            self.register_buffer("alibi", torch.cat([half, half]), persistent=False)  # (H, S, S)
        elif bias == "alibi":
            self.register_buffer("slopes", alibi_slopes(heads), persistent=False)  # (H,)

    def forward(self, h, n, level, knn_index=None, return_attention=False):
        """h(rows) -> the (len(rows), dim) input of those of the n spots (rows: an index tensor or a slice;
        computed where it is read, so the caller needs no (n, dim) copy); a lattice.Level (.sites (n, 2), the
        rulebooks and their window batches) -> (n, dim) heads, or (out, diagnostics dict) with return_attention."""
        H, dim = self.heads, self.dim
        qk = lambda rows: self.qkv(h(rows)).view(-1, 3, H, dim // H).unbind(1)[:2]  # noqa: E731 (diagnostics)
        bias, dropout_p = self._bias(level, knn_index), (self.attn_drop if self.training else 0.0)
        if self.mode == "none":
            out = torch.zeros(n, dim, device=level.sites.device)
        elif self.mode == "window":
            out = self._window(h, n, level, bias, dropout_p)
        else:
            q, k, v = self.qkv(h(slice(None))).view(n, 3, H, -1).unbind(1)  # each (n, H, Dh)
            args = dict(beta=self.beta, tau=self.tau, chunk=self.chunk, dropout_p=dropout_p)
            if self.mode == "knn":
                if knn_index is None:
                    raise ValueError("SpotAttention: mode 'knn' needs knn_index (N, K) from attention.knn")
                out = knn_attention(q, k, v, knn_index, bias, **args).reshape(n, dim)
            else:
                xy = level.sites.float() if self.bias == "alibi" else None
                out = full_attention(q, k, v, xy, getattr(self, "slopes", None), **args).reshape(n, dim)
        return (out, self._diagnostics(qk, n, level, knn_index, bias)) if return_attention else out

    def _window(self, h, n, level, bias, dropout_p):
        """HiST W-MSA over the level's window batches -> (N, dim): standard-window heads, then shifted-window
        heads; zeros for a token in no window. With grad, q, k, v of all spots are projected at once and each
        partition is one autograd node. Without, they are projected per window batch, for the batch's tokens
        and the partition's heads only: no (N, 3 dim) tensor."""
        H, dim = self.heads, self.dim
        bias_of = lambda heads: None if bias is None else bias[heads]  # noqa: E731
        if torch.is_grad_enabled():  # (projecting per batch with autograd: ~10% slower training, BENCHMARKS.md)
            q, k, v = self.qkv(h(slice(None))).view(n, 3, H, -1).unbind(1)  # each (N, H, Dh)
            return torch.cat([window_attention(q[:, heads], k[:, heads], v[:, heads], batches, bias_of(heads),
                                               self.beta, self.tau, dropout_p=dropout_p)
                              for _, heads, _, batches in self._partitions(level)], 1).reshape(n, dim)
        Wqkv, bqkv, out = self.qkv.weight.view(3, H, -1, dim), self.qkv.bias.view(3, H, -1), None
        for _, heads, _, batches in self._partitions(level):
            W, b = Wqkv[:, heads].reshape(-1, dim), bqkv[:, heads].reshape(-1)  # this partition's q, k, v
            for tokens, slots in batches:
                w, c = tokens.shape
                rows = tokens.flatten()
                q, k, v = F.linear(h(rows), W, b).view(w * c, 3, H // 2, -1).unbind(1)
                local = torch.arange(w * c, device=rows.device).view(w, c)  # the batch's tokens, renumbered
                o = window_attention(q, k, v, [(local, slots)], bias_of(heads), self.beta, self.tau,
                                     dropout_p=dropout_p)  # (w * c, H/2, Dh)
                if out is None:  # here, to take o's dtype (bf16 under autocast)
                    out = o.new_zeros(n, H, o.shape[-1])
                out[rows, heads] = o
        return out.reshape(n, dim)

    def _partitions(self, level):
        h = self.heads // 2
        return (("standard", slice(0, h), level.rulebook, level.batches),
                ("shifted", slice(h, None), level.rulebook_shifted, level.batches_shifted))

    def _bias(self, level, knn_index):
        if self.bias == "none":
            return None
        if self.mode == "window":
            return self.rpb() if self.bias == "rpb" else self.alibi  # (H, S, S)
        if self.mode == "knn" and knn_index is not None:  # FEAST: -m_h * distance to each neighbour
            xy = level.sites.float()
            dist = (xy[:, None, :] - xy[knn_index]).pow(2).sum(-1).sqrt()  # (N, K)
            return -self.slopes[:, None, None] * dist  # (H, N, K)
        return None  # full mode builds its bias per chunk inside full_attention

    @torch.no_grad()
    def _diagnostics(self, qk, n, level, knn_index, bias):
        """Explicit signed weights, small: the first window of each partition (window mode, (H/2, S, S)),
        else the first 8 queries over their neighbours (knn, (H, m, K)) or over all tokens (full, (H, m, N)).
        qk(rows) projects the (q, k) of those spots."""
        weights = lambda q_, k_, b, m=None: signed_weights(q_, k_, b, m, self.beta, self.tau)  # noqa: E731
        m = min(n, 8)
        if self.mode == "window":
            info = {}
            for name, heads, rulebook, _ in self._partitions(level):
                slots = rulebook[0]  # (S,)
                qw, kw = (t[:, heads].transpose(0, 1) for t in qk(slots.clamp(min=0)))  # (H/2, S, Dh)
                pairs = (slots >= 0)[:, None] & (slots >= 0)[None, :]  # (S, S): both slots filled
                b = None if bias is None else bias[heads]
                info[name] = dict(tokens=slots, weights=weights(qw, kw, b, pairs))
            return info
        if self.mode == "none":
            return {}
        q, k = qk(slice(None))
        if self.mode == "knn":
            kn = k[knn_index[:m]].permute(2, 0, 1, 3)  # (H, m, K, Dh)
            b = None if bias is None else bias[:, :m, None, :]  # (H, m, 1, K)
            w = weights(q[:m].transpose(0, 1)[:, :, None], kn, b).squeeze(2)  # (H, m, K)
            return dict(queries=torch.arange(m, device=q.device), keys=knn_index[:m], weights=w)
        slopes = getattr(self, "slopes", None)
        b = None if slopes is None else distance_bias(level.sites[:m].float(), level.sites.float(), slopes)
        w = weights(q[:m].transpose(0, 1), k.transpose(0, 1), b)  # (H, m, N)
        return dict(queries=torch.arange(m, device=q.device), weights=w)


class GlobalAttention(nn.Module):
    """Spots <-> global tokens (calibration token(s) + pathway tokens), linear in N.

    tokens read spots (p2h) and tokens (p2p) in ONE softmax over [X; C]: HiST sec. 3.4.2,
    C <- C + Attn(C Wq, [X; C] Wk, [X; C] Wv), here followed by a projection (T x (N + T) scores).
    Spots read the tokens (h2p): MCA(X, C) = Attn(X Wq, C Wk, C Wv), (N x T) scores, returned before
    projection so the block sums it with SpotAttention's output (HiST eq. 1). Spots read the tokens as
    they were at the start of the block. Each quadrant is a switch (SpatialTranscriptFormer)."""

    def __init__(self, dim, heads, p2h=True, p2p=True, h2p=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"GlobalAttention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.p2h, self.p2p, self.h2p = dim, heads, p2h, p2p, h2p
        if h2p:
            self.q_spot = nn.Linear(dim, dim)
            self.kv_token = nn.Linear(dim, 2 * dim)
        if p2h or p2p:
            self.q_token = nn.Linear(dim, dim)
            self.kv_context = nn.Linear(dim, 2 * dim)
            self.proj = nn.Linear(dim, dim)

    def split(self, t):
        return t.reshape(t.shape[0], self.heads, -1).transpose(0, 1)  # (L, dim) -> (H, L, Dh)

    def merge(self, t):
        return t.transpose(0, 1).reshape(t.shape[1], self.dim)  # (H, L, Dh) -> (L, dim)

    def spots_read_tokens(self, x, tokens):
        """h2p, MCA(X, C): (n, dim) spots attend to the (T, dim) tokens, (H, n, T) scores -> (n, dim) before
        projection; zeros when h2p is off, so the caller can always add."""
        if not self.h2p:
            return x.new_zeros(x.shape[0], self.dim)
        k, v = self.kv_token(tokens).chunk(2, -1)
        return self.merge(signed_attention(self.split(self.q_spot(x)), self.split(k), self.split(v)))

    def tokens_read(self, h, n, tokens):
        """p2h / p2p: the tokens' update proj(Attn(C Wq, [X; C] Wk, [X; C] Wv)), (T, dim), one softmax over the
        n spots (p2h) and the tokens (p2p); zeros when both are off. h(rows) gives the spots of a chunk of rows:
        the softmax is accumulated chunk by chunk with a running maximum (online softmax), so there is no
        (N, 2 dim) context and no (H, T, N) score tensor."""
        if not (self.p2h or self.p2p):
            return torch.zeros_like(tokens)
        q = self.split(self.q_token(tokens)) / math.sqrt(self.dim // self.heads)  # (H, T, Dh)
        acc_dtype = torch.promote_types(q.dtype, torch.float32)  # float32 under bf16 autocast, float64 for float64
        top = torch.full((*q.shape[:2], 1), float("-inf"), device=q.device, dtype=acc_dtype)  # running max
        total, acc = torch.zeros_like(top), torch.zeros_like(q, dtype=top.dtype)
        spots = (h(rows) for rows in row_chunks(n)) if self.p2h else ()
        for context in itertools.chain(spots, [tokens] if self.p2p else []):
            k, v = (self.split(t) for t in self.kv_context(context).chunk(2, -1))
            s = (q @ k.transpose(-1, -2)).to(acc_dtype)  # (H, T, chunk)
            new_top = torch.maximum(top, s.amax(-1, keepdim=True)).detach()  # any shift gives the same softmax
            p, fade = torch.exp(s - new_top), torch.exp(top - new_top)
            total = total * fade + p.sum(-1, keepdim=True)
            acc = acc * fade + p @ v.to(acc_dtype)
            top = new_top
        return self.proj(self.merge((acc / total).to(tokens.dtype)))


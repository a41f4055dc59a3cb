"""The fast path (model.kernels = fast): the maths of attention.py and model.Block computed for
speed and memory, equal to the reference forms (tests/test_kernels.py: outputs and gradients).

    spot_attention   SpotAttention.forward. Windows: the windows are grouped into batches of equal
                     (or, on a small slide, padded) size, each one dense batched attention; forward
                     and backward are written by hand (_WindowAttention) and keep only the attention
                     weights, so memory is O(N H D + pairs H), never O(pairs H D). Without grad the
                     q, k, v of each batch are projected for its tokens only: no (N, 3d) tensor.
                     k-NN: chunks of queries. Full: torch's fused attention in chunks of queries.
    tokens_read      GlobalAttention.tokens_read as an online softmax over chunks of spots: no
                     (N, 2d) context, no (H, T, N) scores.
    block_inference  Block.forward without grad: every per-spot step on chunks of rows, the result
                     written over the block's input, so a block holds x and one (N, d) result.
    by_rows          fn over chunks of rows into one preallocated output (the stem, the heads).

None of it changes what is computed, only how: a reader learns the model from attention.py and
model.py and may skip this file.
"""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lattice

CHUNK = 1 << 14          # rows per chunk of the per-spot steps (projections, FFN, stem, heads)
PAIRS = 1 << 13          # (query, key) pairs per head in one window batch of a large slide
PADDED = 1 << 20         # a slide whose windows, all padded to full size, hold at most this many
                         # pairs per head runs as one padded batch (few operations, small slides)


def row_chunks(n):
    """Slices of at most CHUNK rows covering 0 .. n."""
    return [slice(start, start + CHUNK) for start in range(0, n, CHUNK)]


def by_rows(fn, n, dtype=None):
    """fn(rows) for chunks of rows of 0 .. n, written into preallocated outputs: (n, ...) tensors,
    or a dict of them when fn returns a dict."""
    out = None
    for rows in row_chunks(n):
        part = fn(rows)
        parts = part if isinstance(part, dict) else {None: part}
        if out is None:
            out = {k: v.new_empty(n, *v.shape[1:], dtype=dtype or v.dtype)
                   for k, v in parts.items()}
        for k, v in parts.items():
            out[k][rows] = v
    if out is None:
        return cast(fn(slice(0, 0)), dtype)
    return out if None not in out else out[None]


def keep_mask(shape, p, device):
    """A Bernoulli(1 - p) mask from 16 random bits per element (p resolved to 1 / 65536): torch's
    CPU dropout draws a float per element, several times slower."""
    n = math.prod(shape)
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return bits.view(torch.int16)[:n].view(shape) >= round(p * 65536) - 32768


def dropout(x, p):
    """nn.Dropout: x * mask / (1 - p)."""
    return torch.where(keep_mask(x.shape, p, x.device), x * (1 / (1 - p)), 0.0)


class Dropout(nn.Dropout):
    """nn.Dropout through dropout() above."""

    def forward(self, x):
        return dropout(x, self.p) if self.training and self.p else x


def cast(out, dtype=None):
    """A tensor, or a dict of tensors, in dtype (unchanged for None)."""
    if dtype is None:
        return out
    return {k: v.to(dtype) for k, v in out.items()} if isinstance(out, dict) else out.to(dtype)


# ---- window attention ---------------------------------------------------------------------
def window_batches(queries, keys, cache=None):
    """The windows of a pair of rulebooks, queries (W, Sq) and keys (W, Sk), as batches for dense
    attention. Each batch is (q_tok (w, cq), q_slot, k_tok (w, ck), k_slot): token ids (-1 = a
    padded slot) and their slots, filled slots first in slot order. On a small slide (all windows
    padded to full size hold at most PADDED pairs per head) one batch holds every window; on a
    large one, windows of equal (cq, ck) go together, about PAIRS pairs per batch, no padding.
    Built once per level (cache: a lattice.Level's cache dict)."""
    key = (queries.data_ptr(), keys.data_ptr(), queries.shape, keys.shape)
    if cache is not None and key in cache:
        return cache[key]
    qf, kf = queries >= 0, keys >= 0
    q_slot = torch.argsort(~qf, dim=1, stable=True)             # filled slots first, in order
    k_slot = torch.argsort(~kf, dim=1, stable=True)
    q_tok, k_tok = queries.gather(1, q_slot), keys.gather(1, k_slot)
    cq, ck = qf.sum(1), kf.sum(1)
    cq_max, ck_max = (int(c.max()) if len(c) else 0 for c in (cq, ck))
    if len(queries) * cq_max * ck_max <= PADDED:
        batches = [(q_tok[:, :cq_max], q_slot[:, :cq_max], k_tok[:, :ck_max], k_slot[:, :ck_max])]
    else:
        order = torch.argsort(cq * (keys.shape[1] + 1) + ck, stable=True)
        sizes, counts = torch.unique_consecutive(torch.stack([cq[order], ck[order]], 1), dim=0,
                                                 return_counts=True)
        batches, start = [], 0
        for (a, b), n in zip(sizes.tolist(), counts.tolist()):
            group = order[start:start + n]
            for part in group.split(max(1, PAIRS // max(a * b, 1))):
                batches.append((q_tok[part, :a], q_slot[part, :a], k_tok[part, :b],
                                k_slot[part, :b]))
            start += n
    if cache is not None:
        cache[key] = batches
    return batches


def _pair_table(bias, allowed, Sq, Sk, H, device, dtype):
    """(Sq * Sk, H): the bias of each (query slot, key slot) pair, -inf where not allowed."""
    table = torch.zeros(Sq * Sk, H, device=device, dtype=dtype) if bias is None else \
        bias.to(dtype).flatten(1).T
    if allowed is not None:
        table = table.masked_fill(~allowed.reshape(-1, 1), -math.inf)
    return table


def _signed(s, beta, tau):
    """FEAST's two softmaxes of biased scores: s = (S + B, B - S) -> pos, neg (None if beta = 0)."""
    pos = torch.softmax(s[0], -1)
    return pos, (torch.softmax(s[1] / tau, -1) if beta else None)


def _batch_weights(qw, kw, tab, q_tok, k_tok, beta, tau, acc):
    """Scores of one batch -> (pos, neg) weights, rows of padded queries zero. qw (w, H, cq, D),
    kw (w, H, ck, D), tab (w, cq, ck, H) pair biases."""
    s = (qw @ kw.transpose(-1, -2)).to(acc) / math.sqrt(qw.shape[-1])   # (w, H, cq, ck)
    b = tab.permute(0, 3, 1, 2).masked_fill((k_tok < 0)[:, None, None, :], -math.inf)
    keep = (b > -math.inf).any(-1, keepdim=True) & (q_tok >= 0)[:, None, :, None]
    b = b.masked_fill(~keep, 0.0)
    pos, neg = _signed((s + b, b - s), beta, tau)
    return pos * keep, (neg * keep if neg is not None else None)


def _gather(x, tok):
    """x (N, H, D) at tok (w, c), -1 read as row 0 -> (w, H, c, D)."""
    w, c = tok.shape
    return x.index_select(0, tok.clamp(min=0).flatten()).view(w, c, *x.shape[1:]).transpose(1, 2)


def _scatter(out, tok, y):
    """out (N, H, D) += y (w, H, c, D) at tok (w, c); padded rows of y are zero."""
    out.index_add_(0, tok.clamp(min=0).flatten(), y.transpose(1, 2).flatten(0, 1).to(out.dtype))


class _WindowAttention(torch.autograd.Function):
    """attention.window_attention, batch by batch, with a hand-written backward that keeps only
    the weights. With a = softmax(S + B) - beta * softmax((B - S) / tau), dropout mask m:
      out = (a m / (1 - p)) V,  dV = a'^T dO,  dA = m / (1 - p) dO V^T,
      g+ = P+ (dA - rowsum(P+ dA)),  g- = -beta P- (dA - rowsum(P- dA)),
      dS = g+ - g- / tau,  dB = g+ + g- / tau,  dQ = dS K / sqrt(D),  dK = dS^T Q / sqrt(D)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, bias, allowed, batches, pairs, beta, tau, dropout_p, grad):
        N, H, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        Sq, Sk = pairs                                          # slots of the two rulebooks
        table = None if bias is None and allowed is None else \
            _pair_table(bias, allowed, Sq, Sk, H, q.device, acc)
        out = v.new_zeros(N, H, v.shape[-1])
        saved = []
        for q_tok, q_slot, k_tok, k_slot in batches:
            qw, kw, vw = _gather(q, q_tok), _gather(k, k_tok), _gather(v, k_tok)
            tab = torch.zeros(1, 1, 1, H, device=q.device, dtype=acc) if table is None else \
                table[(q_slot[:, :, None] * Sk + k_slot[:, None, :])]      # (w, cq, ck, H)
            pos, neg = _batch_weights(qw, kw, tab, q_tok, k_tok, beta, tau, acc)
            a = pos - beta * neg if beta else pos
            keep = keep_mask(a.shape, dropout_p, a.device) if dropout_p else None
            if keep is not None:
                a = a * keep / (1 - dropout_p)
            _scatter(out, q_tok, a.to(vw.dtype) @ vw)
            if grad:
                saved += [q_tok, q_slot, k_tok, k_slot, pos, neg, keep]
        ctx.save_for_backward(q, k, v, *[t for t in saved if t is not None])
        ctx.layout = [t is not None for t in saved]
        ctx.info = (pairs, None if bias is None else bias.shape,
                    None if bias is None else bias.dtype, beta, tau, dropout_p)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        pairs, bias_shape, bias_dtype, beta, tau, dropout_p = ctx.info
        q, k, v, *rest = ctx.saved_tensors
        it = iter(rest)
        saved = [next(it) if present else None for present in ctx.layout]
        N, H, D = q.shape
        dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
        acc = torch.promote_types(dout.dtype, torch.float32)
        dtable = None if bias_shape is None or not ctx.needs_input_grad[3] else \
            dout.new_zeros(pairs[0] * pairs[1], H, dtype=acc)
        for i in range(0, len(saved), 7):
            q_tok, q_slot, k_tok, k_slot, pos, neg, keep = saved[i:i + 7]
            qw, do = _gather(q, q_tok), _gather(dout, q_tok)
            kw, vw = _gather(k, k_tok), _gather(v, k_tok)
            a = pos - beta * neg if beta else pos
            da = (do @ vw.transpose(-1, -2)).to(pos.dtype)
            if keep is not None:
                a, da = a * keep / (1 - dropout_p), da * keep / (1 - dropout_p)
            _scatter(dv, k_tok, a.transpose(-1, -2).to(do.dtype) @ do)
            g = pos * (da - (pos * da).sum(-1, keepdim=True))           # through softmax(S + B)
            gb = g
            if beta:                                                    # through -beta softmax(..)
                gn = -beta * neg * (da - (neg * da).sum(-1, keepdim=True))
                g, gb = g - gn / tau, g + gn / tau
            if dtable is not None:
                index = (q_slot[:, :, None] * pairs[1] + k_slot[:, None, :]).flatten()
                dtable.index_add_(0, index, gb.permute(0, 2, 3, 1).reshape(-1, H))
            g = (g / math.sqrt(D)).to(qw.dtype)
            _scatter(dq, q_tok, g @ kw)
            _scatter(dk, k_tok, g.transpose(-1, -2) @ qw)
        dbias = None if dtable is None else dtable.T.reshape(bias_shape).to(bias_dtype)
        return dq, dk, dv, dbias, None, None, None, None, None, None, None


def window_attention(q, k, v, queries, keys, bias=None, allowed=None, beta=0.0, tau=1.0,
                     dropout_p=0.0, cache=None):
    """attention.window_attention (same arguments; cache: where to keep the window batches)."""
    batches = window_batches(queries, keys, cache)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, bias))
    pairs = (queries.shape[1], keys.shape[1])
    return _WindowAttention.apply(q, k, v, bias, allowed, batches, pairs, beta, tau, dropout_p,
                                  grad)


def _windows_projected(module, h, n, level, bias, dropout_p):
    """Window attention without grad, a group of windows at a time (_window_groups): q, k and v
    projected once per group for its own query and key tokens, never for the whole level."""
    H, dim = module.heads, module.dim
    W, b = module.qkv.weight.view(3, H, -1, dim), module.qkv.bias.view(3, H, -1)
    out = None
    for heads, queries, keys, bh, allowed in _window_parts(module, level, bias):
        Wq, bq = W[0, heads].reshape(-1, dim), b[0, heads].reshape(-1)
        Wkv, bkv = W[1:, heads].reshape(-1, dim), b[1:, heads].reshape(-1)
        pairs = (queries.shape[1], keys.shape[1])
        for q_ids, k_ids, batches in _window_groups(queries, keys, level.cache):
            q = F.linear(h(q_ids), Wq, bq).view(len(q_ids), -1, dim // H)     # (nq, h, D)
            k, v = F.linear(h(k_ids), Wkv, bkv).view(len(k_ids), 2, -1, dim // H).unbind(1)
            o = _WindowAttention.apply(q, k, v, bh, allowed, batches, pairs, module.beta,
                                       module.tau, dropout_p, False)          # (nq, h, D)
            if out is None:  # here, to take o's dtype (bf16 under autocast)
                out = o.new_zeros(n, H, o.shape[-1])
            out[q_ids, heads] = o
    return out.reshape(n, dim)


def _window_groups(queries, keys, cache):
    """The windows of a pair of rulebooks in groups of consecutive windows, each at most CHUNK
    query slots and, padded, PADDED pairs per head (one batch): (the group's query token ids (nq,),
    its key token ids (nk,), its window_batches in positions of those two lists). Neighbouring
    windows share keys (eq. (2)'s union: each key in up to four windows), so a group projects each
    key once. Built once per level (cache: a lattice.Level's cache dict)."""
    key = ("groups", queries.data_ptr(), keys.data_ptr(), queries.shape, keys.shape, CHUNK)
    if key in cache:
        return cache[key]
    Sq, Sk = queries.shape[1], keys.shape[1]
    step = max(1, min(CHUNK // max(Sq, 1), PADDED // max(Sq * Sk, 1)))
    groups = []
    for start in range(0, len(queries), step):
        (q_ids, q_local), (k_ids, k_local) = (_local(book[start:start + step])
                                              for book in (queries, keys))
        groups.append((q_ids, k_ids, window_batches(q_local, k_local)))
    cache[key] = groups
    return groups


def _local(book):
    """A rulebook's token ids -> (its distinct ids (m,), the rulebook in positions 0 .. m - 1 of
    them, -1 kept for an empty slot)."""
    filled = book >= 0
    ids, position = torch.unique(book[filled], return_inverse=True)
    return ids, torch.full_like(book, -1).masked_scatter_(filled, position)


def _window_parts(module, level, bias):
    """(heads, query rulebook, key rulebook, bias of those heads, allowed pairs) per softmax."""
    if module.windows == "union":
        return [(slice(None), level.windows, level.union, bias, module.allowed)]
    return [(hs, book, book, None if bias is None else bias[hs], None)
            for hs, book in module.partitions(level)]


# ---- k-NN and full attention -----------------------------------------------------------------
def knn(xy_q, xy_k, k, chunk=4096):
    """lattice.knn on a grid, O(N k): keys are binned into square cells of side h (about 6k keys in
    3 x 3 cells, the k-th neighbour at about 0.7 h); a query's candidates are the keys of the 3 x 3
    cells around its own. Every key outside them is at least h away, so where the k-th candidate is
    nearer than h the answer is exact; other queries (sparse regions, too few candidates) take
    lattice.knn's brute force. The same distances and the same tie rule (lower index first) give
    the same neighbours."""
    k = min(k, len(xy_k))
    if k == 0 or len(xy_q) == 0 or len(xy_k) <= 4 * k:
        return lattice.knn(xy_q, xy_k, k)
    lo, hi = xy_k.amin(0).double(), xy_k.amax(0).double()
    h = float(((hi - lo).clamp_min(1e-9).prod() * 2 * k / math.pi / len(xy_k)).sqrt())
    h = max(h, float((hi - lo).max()) * k / len(xy_k))  # keys on a line: at most N / k cells a side
    if not h > 0:
        return lattice.knn(xy_q, xy_k, k)
    size = ((hi - lo) / h).long() + 1                             # cells per axis
    cell = lambda xy: (((xy.double() - lo) / h).floor().long().clamp(min=-1)  # noqa: E731
                       .minimum(size) + 1)                         # (n, 2), a ring of empty cells
    ny = int(size[1]) + 2
    ck = cell(xy_k)
    key_cell = ck[:, 0] * ny + ck[:, 1]
    order = torch.argsort(key_cell, stable=True)                  # keys by cell, then by index
    count = torch.bincount(key_cell, minlength=(int(size[0]) + 2) * ny)
    start = torch.cat([count.new_zeros(1), count.cumsum(0)])
    out = torch.empty(len(xy_q), k, dtype=torch.long, device=xy_q.device)
    for rows in torch.arange(len(xy_q), device=xy_q.device).split(chunk):
        raw = cell(xy_q[rows])
        cq = torch.minimum(raw.clamp(min=1), size)                 # a query outside: nearest cell
        mid = (cq[:, :1] + torch.tensor([-1, 0, 1], device=cq.device)) * ny + cq[:, 1:]  # (c, 3)
        first, length = start[mid - 1], start[mid + 2] - start[mid - 1]  # 3 cells of a column
        L = max(int(length.max()), -(-k // 3))   # k candidates at least: topk needs them
        t = torch.arange(L, device=cq.device)
        pos = (first[:, :, None] + t).clamp(max=len(order) - 1)    # (c, 3, L)
        cand = order[pos].flatten(1)                               # (c, 3L) key ids
        d2 = ((xy_q[rows, None, :] - xy_k[cand]) ** 2).sum(-1)     # (c, 3L), as lattice.knn
        d2 = d2.masked_fill((t >= length[:, :, None]).flatten(1), math.inf)
        best = lattice.pair_rank(d2, cand).topk(k, dim=1, largest=False).indices  # (c, k)
        out[rows] = cand.gather(1, best)
        kth = d2.gather(1, best[:, -1:])[:, 0].double()
        bad = rows[~(kth < h * h * (1 - 1e-5)) | (raw != cq).any(1)]  # not sure: brute force
        if len(bad):
            out[bad] = lattice.knn(xy_q[bad], xy_k, k)
    return out



def knn_attention(q, k, v, index, bias=None, beta=0.0, tau=1.0, dropout_p=0.0, chunk=4096):
    """attention.knn_attention in chunks of queries: memory O(chunk * K * H * D)."""
    out = q.new_empty(q.shape[0], *v.shape[1:])
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        kn, vn = k[index[rows]], v[index[rows]]                           # (c, K, H, D)
        s = (q[rows].unsqueeze(1) * kn).sum(-1) / q.shape[-1] ** 0.5       # (c, K, H)
        b = 0.0 if bias is None else bias[:, rows].permute(1, 2, 0).to(s.dtype)
        w = torch.softmax(s + b, 1)
        if beta:
            w = w - beta * torch.softmax((b - s) / tau, 1)
        w = dropout(w, dropout_p) if dropout_p else w
        out[rows] = (w.unsqueeze(-1) * vn).sum(1)                          # (c, H, D)
    return out


def full_attention(q, k, v, xy=None, bias=None, beta=0.0, tau=1.0, dropout_p=0.0, chunk=4096):
    """attention.full_attention through torch's fused scaled_dot_product_attention, in chunks of
    queries (peak O(chunk * N * H)). The negative branch is a second call: sdpa scales by
    1 / sqrt(D) itself, so (-q / tau) k^T / sqrt(D) + B / tau = (B - S) / tau. Signed with dropout
    (training), the weights are formed explicitly: one mask drops each signed weight, as attend."""
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)                          # (H, N, D)
    out = q.new_empty(q.shape[0], *v.shape[1:])
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        qc = q[rows].transpose(0, 1)                                       # (H, c, D)
        b = None if bias is None else bias(xy[rows, None, :] - xy[None, :, :])
        b = None if b is None else b.to(q.dtype)                           # (H, c, N)
        if beta and dropout_p:  # one mask over the signed weights (two calls would draw two)
            s = qc @ kt.transpose(-1, -2) / math.sqrt(qc.shape[-1])        # (H, c, N)
            b = 0.0 if b is None else b
            a = torch.softmax(s + b, -1) - beta * torch.softmax((b - s) / tau, -1)
            out[rows] = (dropout(a, dropout_p) @ vt).transpose(0, 1)
            continue
        o = F.scaled_dot_product_attention(qc, kt, vt, attn_mask=b, dropout_p=dropout_p)
        if beta:
            o = o - beta * F.scaled_dot_product_attention(
                -qc / tau, kt, vt, attn_mask=None if b is None else b / tau)
        out[rows] = o.transpose(0, 1)
    return out


# ---- the modules' fast forwards ----------------------------------------------------------
def spot_attention(module, h, n, level, knn_index=None):
    """SpotAttention.forward: h(rows) gives the normalised input of those of the n tokens."""
    H, dim = module.heads, module.dim
    dropout_p = module.attn_drop if module.training else 0.0
    if module.mode == "window":
        bias = module.bias(module.offsets)
        if not torch.is_grad_enabled():
            return _windows_projected(module, h, n, level, bias, dropout_p)
        q, k, v = module.qkv(h(slice(None))).view(n, 3, H, -1).unbind(1)
        return torch.cat([window_attention(q[:, hs], k[:, hs], v[:, hs], queries, keys, b,
                                           allowed, module.beta, module.tau, dropout_p,
                                           level.cache)
                          for hs, queries, keys, b, allowed in _window_parts(module, level, bias)],
                         1).reshape(n, dim)
    q, k, v = module.qkv(h(slice(None))).view(n, 3, H, -1).unbind(1)
    args = dict(beta=module.beta, tau=module.tau, dropout_p=dropout_p)
    if module.mode == "knn":
        xy = level.sites.float()
        bias = module.bias(xy[:, None, :] - xy[knn_index])                  # (H, N, K)
        return knn_attention(q, k, v, knn_index, bias, **args).reshape(n, dim)
    return full_attention(q, k, v, level.sites.float(), module.bias, **args).reshape(n, dim)


def tokens_read(module, h, n, tokens):
    """GlobalAttention.tokens_read as an online softmax: h(rows) gives the spots of a chunk; the
    softmax over [X; C] is accumulated chunk by chunk with a running maximum."""
    q = module.split(module.q_token(tokens)) / math.sqrt(module.dim // module.heads)  # (H, T, D)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    top = torch.full((*q.shape[:2], 1), -math.inf, device=q.device, dtype=acc_dtype)
    total, acc = torch.zeros_like(top), torch.zeros_like(q, dtype=acc_dtype)
    spots = (h(rows) for rows in row_chunks(n)) if module.p2h else ()
    for context in itertools.chain(spots, [tokens] if module.p2p else []):
        k, v = (module.split(t) for t in module.kv_context(context).chunk(2, -1))
        s = (q @ k.transpose(-1, -2)).to(acc_dtype)                      # (H, T, chunk)
        new_top = torch.maximum(top, s.amax(-1, keepdim=True)).detach()  # any shift: same softmax
        p, fade = torch.exp(s - new_top), torch.exp(top - new_top)
        total = total * fade + p.sum(-1, keepdim=True)
        acc = acc * fade + p @ v.to(acc_dtype)
        top = new_top
    return module.proj(module.merge((acc / total).to(tokens.dtype)))


@torch.no_grad()
def block_inference(block, x, tokens, level, knn_index=None):
    """Block.forward without grad, chunk by chunk; the result overwrites x (each chunk reads x only
    at its own rows), or the attention output where autocast made their dtypes differ."""
    N = x.shape[0]
    h = lambda rows: block.norm1(x[rows])                                  # noqa: E731
    y = spot_attention(block.spot, h, N, level, knn_index) if block.spot.mode != "none" \
        else x.new_zeros(N, block.spot.dim)
    if block.glob is not None:
        t = block.norm_tokens(tokens)
        tokens = tokens + (tokens_read(block.glob, h, N, t) if block.glob.p2h or block.glob.p2p
                           else torch.zeros_like(tokens))
    out = x if x.dtype == y.dtype else y
    for rows in row_chunks(N):
        a = y[rows] if block.glob is None else y[rows] + block.glob.spots_read_tokens(h(rows), t)
        z = x[rows] + block.drop(block.proj(a))
        out[rows] = z + block.drop(block.ffn(block.norm2(z)))
    if tokens is not None:
        tokens = tokens + block.drop(block.ffn(block.norm2(tokens)))
    return out, tokens

"""The fast path (model.kernels = fast): the maths of attention.py and model.Block computed for
speed and memory, equal to the reference forms (tests/test_kernels.py: outputs and gradients).

    spot_attention   SpotAttention.forward. Windows: the windows are grouped into batches of equal
                     (or, on a small slide, padded) size, each one dense batched attention; forward
                     and backward are written by hand (_WindowAttention) and keep only the attention
                     weights, so memory is O(N H D + pairs H), never O(pairs H D). Without grad the
                     q, k, v of each batch are projected for its tokens only: no (N, 3d) tensor.
                     k-NN: chunks of queries, the backward written by hand too (_KnnAttention),
                     keeping the weights and not the gathered keys and values. Full: torch's fused
                     attention in chunks of queries.
    dropout          Dropout from 16 random bits per element, the mask formed by arithmetic.
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


def random_bits(shape, device):
    """16 random bits per element (int16), four to each 64-bit draw of torch's generator: torch's
    CPU dropout draws a float per element, several times slower."""
    n = math.prod(shape)
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return bits.view(torch.int16)[:n].view(shape)


def keep_scale(bits, p, dtype=torch.float32):
    """Dropout's factor from random_bits: 1 / (1 - p) where an element is kept (bits >= t, chance
    1 - p resolved to 1 / 65536), else 0. Formed by arithmetic, clamp(bits - t + 1, 0, 1), exact
    in float32: torch's CPU comparisons and boolean masks are several times slower."""
    t = round(p * 65536) - 32768
    return (bits.float() - (t - 1)).clamp_(0, 1).to(dtype).mul_(1 / (1 - p))


class _Dropout(torch.autograd.Function):
    """x * keep_scale(bits): the backward recomputes the factor from the saved 16-bit draws."""

    @staticmethod
    def forward(ctx, x, p):
        bits = random_bits(x.shape, x.device)
        ctx.save_for_backward(bits)
        ctx.p = p
        return x * keep_scale(bits, p, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        bits, = ctx.saved_tensors
        return grad * keep_scale(bits, ctx.p, grad.dtype), None


def dropout(x, p):
    """nn.Dropout: x * mask / (1 - p)."""
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout through dropout() above."""

    def forward(self, x):
        return dropout(x, self.p) if self.training and self.p else x


def softmax_(x, dim=-1):
    """torch.softmax over dim, written into x (a temporary) where rows are short: on a CPU, rows
    shorter than 16 as exp / sum, where torch's kernel has no vector path and is about 5x slower
    (14 keys: 1.0 ms against 0.2 ms for 4,000 rows, the windows of a coarse level)."""
    if x.device.type != "cpu" or x.shape[dim] >= 16:
        return torch.softmax(x, dim)
    x = x.sub_(x.amax(dim, keepdim=True)).exp_()
    return x.div_(x.sum(dim, keepdim=True))


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


def _pair_table(bias, allowed, Sq, Sk, H, device, dtype, groups=1):
    """(H, G (Sq + 1) (Sk + 1)): per group of windows, the bias of each (query slot, key slot)
    pair, -inf where not allowed, with a last key slot at -inf (a padded key) and a last query
    slot at 0 (a padded query: finite weights; its output goes to a row that is dropped).
    bias (H, Sq, Sk) or, for G groups, (G, H, Sq, Sk)."""
    table = torch.zeros(H, groups, Sq + 1, Sk + 1, device=device, dtype=dtype)
    table[..., :Sq, Sk] = -math.inf
    if bias is not None:
        table[..., :Sq, :Sk] = bias.to(dtype).reshape(groups, H, Sq, Sk).transpose(0, 1)
    if allowed is not None:
        table[..., :Sq, :Sk].masked_fill_(~allowed, -math.inf)
    return table.view(H, -1)


def _pairs(q_tok, q_slot, k_tok, k_slot, Sq, Sk, groups=1):
    """(w, cq, ck) columns of _pair_table of one batch's pairs; padded slots read its last row
    and column; a window's group is its first query's row modulo G (split_rulebook)."""
    q_slot = torch.where(q_tok >= 0, q_slot, Sq)
    if groups > 1:
        q_slot = q_slot + q_tok[:, :1] % groups * (Sq + 1)
    k_slot = torch.where(k_tok >= 0, k_slot, Sk)
    return q_slot[:, :, None] * (Sk + 1) + k_slot[:, None, :]


def _batch_weights(qw, kw, table, pairs, beta, tau, acc):
    """Scores of one batch -> FEAST's two softmaxes, pos = softmax(S + B) and neg =
    softmax((B - S) / tau) (None if beta = 0). qw (w, H, cq, D) queries already scaled by
    1 / sqrt(D), kw (w, H, ck, D), table (H, P) from _pair_table, pairs (w, cq, ck) its columns
    (_pairs). A padded query's row is finite (its output goes to a row that is dropped). Each
    temporary is written over once it is used: a padded batch of a large slide holds 1M pairs."""
    s = (qw @ kw.transpose(-1, -2)).to(acc)                              # (w, H, cq, ck)
    b = table.index_select(1, pairs.flatten()).view(-1, *pairs.shape).transpose(0, 1)
    pos = softmax_(s + b)
    return pos, (softmax_(s.sub_(b).div_(-tau)) if beta else None)     # (B - S) / tau in s


def _gather(x, tok):
    """x (N, H, D) at tok (w, c), -1 read as row 0 -> (w, H, c, D)."""
    w, c = tok.shape
    return x.index_select(0, tok.clamp(min=0).flatten()).view(w, c, *x.shape[1:]).transpose(1, 2)


def _scatter(out, tok, y):
    """out += y (w, H, c, D) at tok (w, c), -1 to out's last row: the forward's extra row, which
    is dropped, or a real row where y's padded rows are zero."""
    rows = torch.where(tok >= 0, tok, len(out) - 1).flatten()
    out.index_add_(0, rows, y.transpose(1, 2).flatten(0, 1).to(out.dtype))


class _WindowAttention(torch.autograd.Function):
    """attention.window_attention, batch by batch, with a hand-written backward that keeps only
    the weights. With a = softmax(S + B) - beta * softmax((B - S) / tau), dropout mask m:
      out = (a m / (1 - p)) V,  dV = a'^T dO,  dA = m / (1 - p) dO V^T,
      g+ = P+ (dA - rowsum(P+ dA)),  g- = -beta P- (dA - rowsum(P- dA)),
      dS = g+ - g- / tau,  dB = g+ + g- / tau,  dQ = dS K / sqrt(D),  dK = dS^T Q / sqrt(D).
    q comes scaled by 1 / sqrt(D) (window_attention; in inference, in the projection). A padded
    query slot writes its output to an extra last row, dropped, and reads a zero dO there, so its
    weights need no mask."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, bias, allowed, batches, slots, groups, beta, tau, dropout_p,
                grad):
        N, H = q.shape[:2]
        acc = torch.promote_types(q.dtype, torch.float32)
        Sq, Sk = slots                                          # slots of the two rulebooks
        table = _pair_table(bias, allowed, Sq, Sk, H, q.device, acc, groups)
        out = v.new_zeros(N + 1, H, v.shape[-1])                # row N: the padded queries'
        saved = []
        for q_tok, q_slot, k_tok, k_slot in batches:
            qw, kw, vw = _gather(q, q_tok), _gather(k, k_tok), _gather(v, k_tok)
            pairs = _pairs(q_tok, q_slot, k_tok, k_slot, Sq, Sk, groups)
            pos, neg = _batch_weights(qw, kw, table, pairs, beta, tau, acc)
            a = pos                                             # kept for the backward
            if beta:
                a = torch.add(pos, neg, alpha=-beta) if grad else pos.sub_(neg, alpha=beta)
            keep = random_bits(a.shape, a.device) if dropout_p else None
            if keep is not None:
                a = a * keep_scale(keep, dropout_p, a.dtype)
            _scatter(out, q_tok, a.to(vw.dtype) @ vw)
            if grad:
                saved += [q_tok, q_slot, k_tok, k_slot, pos, neg, keep]
        ctx.save_for_backward(q, k, v, *[t for t in saved if t is not None])
        ctx.layout = [t is not None for t in saved]
        ctx.info = (slots, groups, None if bias is None else bias.shape,
                    None if bias is None else bias.dtype, beta, tau, dropout_p)
        return out[:N]

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        slots, groups, bias_shape, bias_dtype, beta, tau, dropout_p = ctx.info
        q, k, v, *rest = ctx.saved_tensors
        it = iter(rest)
        saved = [next(it) if present else None for present in ctx.layout]
        N, H = q.shape[:2]
        dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
        dout = torch.cat([dout, dout.new_zeros(1, *dout.shape[1:])])  # a padded query's dO: 0
        acc = torch.promote_types(dout.dtype, torch.float32)
        Sq, Sk = slots
        dtable = None if bias_shape is None or not ctx.needs_input_grad[3] else \
            dout.new_zeros(H, groups * (Sq + 1) * (Sk + 1), dtype=acc)
        for i in range(0, len(saved), 7):
            q_tok, q_slot, k_tok, k_slot, pos, neg, keep = saved[i:i + 7]
            qw, do = _gather(q, q_tok), _gather(dout, torch.where(q_tok >= 0, q_tok, N))
            kw, vw = _gather(k, k_tok), _gather(v, k_tok)
            a = torch.add(pos, neg, alpha=-beta) if beta else pos
            da = (do @ vw.transpose(-1, -2)).to(pos.dtype)
            if keep is not None:
                scale = keep_scale(keep, dropout_p, a.dtype)
                a, da = a * scale, da.mul_(scale)
            _scatter(dv, k_tok, a.transpose(-1, -2).to(do.dtype) @ do)
            g = pos * (da - (pos * da).sum(-1, keepdim=True))           # through softmax(S + B)
            gb = g
            if beta:                                                    # through -beta softmax(..)
                gn = neg * (da - (neg * da).sum(-1, keepdim=True)).mul_(-beta / tau)  # g- / tau
                g, gb = g - gn, g.add_(gn)
            if dtable is not None:
                pairs = _pairs(q_tok, q_slot, k_tok, k_slot, Sq, Sk, groups).flatten()
                dtable.index_add_(1, pairs, gb.transpose(0, 1).reshape(H, -1))
            g = g.to(qw.dtype)
            _scatter(dq, q_tok, g @ kw)                                 # dS K
            _scatter(dk, k_tok, g.transpose(-1, -2) @ qw)               # dS^T Q / sqrt(D)
        dbias = None if dtable is None else dtable.view(H, groups, Sq + 1, Sk + 1)[
            ..., :Sq, :Sk].transpose(0, 1).reshape(bias_shape).to(bias_dtype)
        return dq, dk, dv, dbias, None, None, None, None, None, None, None, None


def window_attention(q, k, v, queries, keys, bias=None, allowed=None, beta=0.0, tau=1.0,
                     dropout_p=0.0, cache=None, groups=1):
    """attention.window_attention (same arguments; cache: where to keep the window batches).
    groups G > 1: G sets of windows in one call (split_rulebook), row i G + g of q, k, v holding
    token i's heads of set g, bias (G, H, Sq, Sk)."""
    batches = window_batches(queries, keys, cache)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, bias))
    slots = (queries.shape[1], keys.shape[1])
    return _WindowAttention.apply(q * (1 / math.sqrt(q.shape[-1])), k, v, bias, allowed, batches,
                                  slots, groups, beta, tau, dropout_p, grad)


def _windows_projected(module, h, n, level, bias, dropout_p):
    """Window attention without grad, a group of windows at a time (_window_groups): q, k and v
    projected once per group for its own query and key tokens, never for the whole level."""
    H, dim = module.heads, module.dim
    W, b = module.qkv.weight.view(3, H, -1, dim), module.qkv.bias.view(3, H, -1)
    out = None
    for heads, queries, keys, bh, allowed in _window_parts(module, level, bias):
        scale = 1 / math.sqrt(dim // H)                 # _WindowAttention's q comes scaled
        Wq, bq = W[0, heads].reshape(-1, dim) * scale, b[0, heads].reshape(-1) * scale
        Wkv, bkv = W[1:, heads].reshape(-1, dim), b[1:, heads].reshape(-1)
        slots = (queries.shape[1], keys.shape[1])
        for q_ids, k_ids, batches in _window_groups(queries, keys, level.cache):
            q = F.linear(h(q_ids), Wq, bq).view(len(q_ids), -1, dim // H)     # (nq, h, D)
            k, v = F.linear(h(k_ids), Wkv, bkv).view(len(k_ids), 2, -1, dim // H).unbind(1)
            o = _WindowAttention.apply(q, k, v, bh, allowed, batches, slots, 1, module.beta,
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


def split_rulebook(level):
    """The standard and the shifted windows of a level as one rulebook over rows 2i + g (token i's
    half of the heads of partition g = 0 standard, 1 shifted), -1 kept. Built once per level."""
    if "split" not in level.cache:
        level.cache["split"] = torch.cat([torch.where(book >= 0, 2 * book + g, -1) for g, book
                                          in enumerate((level.windows, level.shifted))])
    return level.cache["split"]


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
        cand = order.index_select(0, pos.flatten()).view(len(raw), -1)  # (c, 3L) key ids
        # lattice.knn's dx^2 + dy^2, one coordinate at a time (the same rounding, fewer steps)
        dx, dy = (xy_q[rows, i, None] - xy_k[:, i].index_select(0, cand.flatten()).view(cand.shape)
                  for i in (0, 1))
        d2 = dx * dx + dy * dy                                     # (c, 3L)
        d2 = d2.masked_fill((t >= length[:, :, None]).flatten(1), math.inf)
        best = lattice.pair_rank(d2, cand).topk(k, dim=1, largest=False).indices  # (c, k)
        out[rows] = cand.gather(1, best)
        kth = d2.gather(1, best[:, -1:])[:, 0].double()
        bad = rows[~(kth < h * h * (1 - 1e-5)) | (raw != cq).any(1)]  # not sure: brute force
        if len(bad):
            out[bad] = lattice.knn(xy_q[bad], xy_k, k)
    return out



def knn_attention(q, k, v, index, bias=None, beta=0.0, tau=1.0, dropout_p=0.0, chunk=4096):
    """attention.knn_attention in chunks of queries (_KnnAttention): memory O(N K H) for the
    weights kept for the backward, O(chunk * K * H * D) for the neighbours' keys and values."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, bias))
    return _KnnAttention.apply(q, k, v, index, bias, beta, tau, dropout_p, chunk, grad)


def _dot(x, y):
    """sum(x * y, -1) through a matrix-vector product: torch's CPU sum over a short last dim (a
    head's 16 channels) is several times slower than the product."""
    xy = x * y
    return (xy.reshape(-1, xy.shape[-1]) @ xy.new_ones(xy.shape[-1])).view(xy.shape[:-1])


class _KnnAttention(torch.autograd.Function):
    """attention.knn_attention, chunk by chunk, with a hand-written backward that keeps only the
    weights (c, K, H), not the gathered keys and values. With s = q.k_j / sqrt(D) + b_j,
    a = softmax(s) - beta * softmax((b - s) / tau) over the K neighbours j, dropout factor m:
      out = sum_j a_j m_j v_j,  dv_j += a_j m_j dO,  dA_j = m_j dO.v_j,  g+, g- as
      _WindowAttention,  dq = sum_j dS_j k_j / sqrt(D),  dk_j += dS_j q / sqrt(D),  db_j = dB_j."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, index, bias, beta, tau, dropout_p, chunk, grad):
        N, H, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        out = v.new_empty(N, H, v.shape[-1])
        saved = []
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            c, K = index[rows].shape
            at = index[rows].flatten()
            kn = k.index_select(0, at).view(c, K, H, D)                     # (c, K, H, D)
            s = _dot(q[rows].unsqueeze(1), kn).to(acc) / math.sqrt(D)      # (c, K, H)
            b = 0.0 if bias is None else bias[:, rows].permute(1, 2, 0).to(acc)
            pos = softmax_(s + b, 1)
            neg = softmax_((b - s) / tau, 1) if beta else None
            a = pos - beta * neg if beta else pos
            keep = random_bits(a.shape, a.device) if dropout_p else None
            if keep is not None:
                a = a * keep_scale(keep, dropout_p, a.dtype)
            vn = v.index_select(0, at).view(c, K, H, -1)
            out[rows] = (a.unsqueeze(-1).to(vn.dtype) * vn).sum(1)              # (c, H, D)
            if grad:
                saved += [pos, neg, keep]
        ctx.save_for_backward(q, k, v, index, *[t for t in saved if t is not None])
        ctx.layout = [t is not None for t in saved]
        ctx.info = (chunk, bias is not None, beta, tau, dropout_p)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        chunk, has_bias, beta, tau, dropout_p = ctx.info
        q, k, v, index, *rest = ctx.saved_tensors
        it = iter(rest)
        saved = [next(it) if present else None for present in ctx.layout]
        N, H, D = q.shape
        dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
        dbias = dout.new_empty(H, N, index.shape[1], dtype=saved[0].dtype) \
            if has_bias and ctx.needs_input_grad[4] else None
        for i, start in enumerate(range(0, N, chunk)):
            rows = slice(start, start + chunk)
            pos, neg, keep = saved[3 * i:3 * i + 3]
            c, K = index[rows].shape
            at = index[rows].flatten()
            kn, vn = (t.index_select(0, at).view(c, K, H, -1) for t in (k, v))
            do = dout[rows].unsqueeze(1)                                    # (c, 1, H, D)
            a = pos - beta * neg if beta else pos
            da = _dot(do, vn).to(pos.dtype)                                 # (c, K, H)
            if keep is not None:
                scale = keep_scale(keep, dropout_p, a.dtype)
                a, da = a * scale, da * scale
            dv.index_add_(0, at, (a.unsqueeze(-1).to(do.dtype) * do).view(-1, H, v.shape[-1]))
            g = pos * (da - (pos * da).sum(1, keepdim=True))            # through softmax(S + B)
            gb = g
            if beta:                                                    # through -beta softmax(..)
                gn = -beta * neg * (da - (neg * da).sum(1, keepdim=True))
                g, gb = g - gn / tau, g + gn / tau
            if dbias is not None:
                dbias[:, rows] = gb.permute(2, 0, 1)
            g = (g / math.sqrt(D)).unsqueeze(-1).to(q.dtype)                # (c, K, H, 1)
            dq[rows] = (g * kn).sum(1)
            dk.index_add_(0, at, (g * q[rows].unsqueeze(1)).view(-1, H, D))
        dbias = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dq, dk, dv, None, dbias, None, None, None, None, None


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
            s = (qc / math.sqrt(qc.shape[-1])) @ kt.transpose(-1, -2)      # (H, c, N)
            b = 0.0 if b is None else b
            a = torch.sub(torch.softmax(s + b, -1), torch.softmax((b - s) / tau, -1), alpha=beta)
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
        args = (module.beta, module.tau, dropout_p, level.cache)
        if module.windows == "union":
            return window_attention(q, k, v, level.windows, level.union, bias, module.allowed,
                                    *args).reshape(n, dim)
        # split: both partitions in one call, row 2i + g of (2n, H/2, D) token i's heads of g
        book = split_rulebook(level)
        b = None if bias is None else bias.view(2, H // 2, *bias.shape[1:])
        q, k, v = (t.reshape(2 * n, H // 2, -1) for t in (q, k, v))
        return window_attention(q, k, v, book, book, b, None, *args, groups=2).reshape(n, dim)
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

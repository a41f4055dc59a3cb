"""The learned maps between the levels of the lattice pyramid (lattice.build_pyramid), as
model.Tessera uses them: coarsen a level into its parents (HiST eq. 4), uncoarsen back to the
children (eq. 5), fuse the upsampled coarse tokens with the lateral skip (HiST 3.6.3), and pool
sub-spot tokens into the spot (HiFusion: HiST eq. 4, or CCF's cross-attention of the spot over its
sub-tokens); and how the rows of the levels' outputs map onto each other (`level_rows`).

Every map works slot by slot on a level's (parent, slot) arrays: no (4M, d) or (M, 4d) buffer.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lattice

CHILDREN = lattice.FACTOR ** 2   # child slots of a parent (4: HiST's dyadic 2 x 2)


class Coarsen(nn.Module):
    """HiST eq. (4): x_parent = sum_delta m_delta W_delta x_child, one learned map per child slot.

    The four maps are the four (d x d) blocks of one Linear(4d -> d) (its input = the 4 child slots
    concatenated, zeros where a child is missing); computed slot by slot, no (4M, d) buffer. Then
    LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(CHILDREN * dim, dim)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():  # start as sum pooling of the children (W_delta = I), then learn
            self.linear.weight.copy_(torch.eye(dim).repeat(1, CHILDREN))
            self.linear.bias.zero_()

    def forward(self, x, parent, slot, n_parents):
        d = x.shape[1]
        W = self.linear.weight.view(d, CHILDREN, d)  # W_delta = W[:, delta, :]
        out = x.new_zeros(n_parents, d)
        for delta in range(CHILDREN):              # sum over each parent's active children
            child = torch.nonzero(slot == delta).squeeze(1)
            out.index_add_(0, parent[child], F.linear(x[child], W[:, delta]).to(out.dtype))
        return self.norm(out + self.linear.bias)   # (M, d)


class Uncoarsen(nn.Module):
    """HiST eq. (5): z = MLP(x_parent) in R^{4d}, reshaped to the 4 child slots, each child reading
    its slot of its parent: z_{u,v,delta} -> child (2u + delta_1, 2v + delta_2).

    kind 'mlp': HiST's form, Linear(d, 4d) -> GELU -> Linear(4d, 4d). kind 'linear' (tessera's
    default): one Linear(d, 4d), initialised as a nearest-neighbour copy (every child starts as its
    parent), so the U-Net starts as an identity path and learns the coarse context on top. Computed
    slot by slot for the children present, each from its parent's row: no (M, 4d) buffer, and
    `parent`, `slot` may be any subset of a level's children (model.Tessera runs large slides'
    inference in chunks of children)."""

    def __init__(self, dim: int, kind: str = "linear"):
        super().__init__()
        wide = CHILDREN * dim
        self.mlp = nn.Sequential(nn.Linear(dim, wide), nn.GELU()) if kind == "mlp" else None
        self.linear = nn.Linear(wide if kind == "mlp" else dim, wide)
        if kind == "linear":
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim).repeat(CHILDREN, 1))
                self.linear.bias.zero_()

    def forward(self, x, parent, slot):
        d = self.linear.out_features // CHILDREN
        W, b = self.linear.weight.view(CHILDREN, d, -1), self.linear.bias.view(CHILDREN, d)
        up = x.new_empty(len(parent), d)
        for delta in range(CHILDREN):                # each child reads its slot of its parent
            child = torch.nonzero(slot == delta).squeeze(1)
            z = x[parent[child]]                     # (n_delta, d) the parents of these children
            z = z if self.mlp is None else self.mlp(z)   # (n_delta, 4d) HiST's MLP hidden
            up[child] = F.linear(z, W[delta], b[delta]).to(up.dtype)
        return up                                    # (n, d)


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
        # F.linear runs in bf16 under autocast, the in-place addmm_ not: its operands follow out
        out = F.linear(skip, self.weight[:, d:], self.bias)
        return out.addmm_(up.to(out.dtype), self.weight[:, :d].T.to(out.dtype))


def child_attention(q, k, v, parent):
    """Each parent's query attends over its own children only (HiFusion CCF: the spot token
    queries its sub-tokens). q (M, H, dh); k, v (n, H, dh); parent (n,) -> (M, H, dh): a softmax per
    parent and head
    over its <= 4 children, by scatter (no padding); a parent without children gets 0."""
    score = (q[parent] * k).sum(-1) / math.sqrt(q.shape[-1])            # (n, H)
    index = parent[:, None].expand_as(score)
    top = score.new_full(q.shape[:2], -math.inf).scatter_reduce(0, index, score, "amax")
    e = (score - top[parent]).exp()
    w = e / e.new_zeros(q.shape[:2]).index_add_(0, parent, e)[parent]   # (n, H), sum 1 per parent
    return q.new_zeros(q.shape).index_add_(0, parent, w[..., None] * v)


class SubPool(nn.Module):
    """Sub-tokens -> the next level up (the spot, or a coarser sub level). `linear`: HiST eq. (4), a
    learned map per child slot (Coarsen). `attention`: HiFusion's CCF, the parent's query (the
    spot's own embedding; at a sub level without features of its own, the mean of its children)
    attends over its <= 4 children."""

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


def level_rows(levels, order, sub_levels):
    """The maps between the rows of the levels' outputs, in the order losses.level_loss and
    eval.level_outputs read: caller's spots at level 0, sorted by (caller's spot, sub-position
    s = r * ix + iy, r = 2^-k) below it, lattice row-major above it. levels: lattice.build_pyramid
    from sub_levels = K levels below the spot; order (N,): caller's row of each lattice-sorted spot.
    -> (parents {k: (N_k,) row at level k + 1},
    perm {k < 0: (N_k,) pyramid row of each output row}, sub_index {k < 0: (N_k,) n * r^2 + s})."""
    K, N = sub_levels, len(order)
    L = len(levels) - K
    parents = {j: levels[K + j].parent for j in range(1, L - 1)}
    if L > 1:
        parents[0] = levels[K].parent[torch.argsort(order)]
    perm, sub_index, spot, inv = {}, {}, torch.arange(N, device=order.device), None
    for l in range(K - 1, -1, -1):                           # from just below the spot downwards
        k, r, lvl = l - K, lattice.FACTOR ** (K - l), levels[l]
        spot = spot[lvl.parent]                              # sorted spot row of each row of l
        key = order[spot] * r * r + r * (lvl.sites[:, 0] % r) + lvl.sites[:, 1] % r
        perm[k] = torch.argsort(key)
        sub_index[k] = key[perm[k]]
        up = lvl.parent[perm[k]]
        parents[k] = order[up] if inv is None else inv[up]   # caller's rows of the level above
        inv = torch.argsort(perm[k])
    return parents, perm, sub_index

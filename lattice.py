"""Lattice geometry (HiST sec. 3.1, 3.4.1, 3.5, App. A.2-A.6): spots on a collision-free integer lattice,
window rulebooks for sparse window attention, dyadic coarsening maps, and the per-slide pyramid of levels.

A site is (i, j) = round(xy / unit): column 0 from x, column 1 from y; "row-major" means sorted by (i, j).
Windows have side 2w. A standard window is keyed (i // 2w, j // 2w); the shifted partition moves the grid
origin by w, key ((i + w) // 2w, (j + w) // 2w), so a shifted window straddles the corner of four standard
ones and tokens near a boundary attend across it (HiST eq. 2). The slot of a site inside its window is
row-major: 2w * (i mod 2w) + (j mod 2w), on the shifted coordinates for the shifted partition. w = 2:

    standard windows        shifted windows         slots of any window
      j 0 1 2 3 4 5 6 7       j 0 1 2 3 4 5 6 7
    i 0 A A A A B B B B     i 0 a a b b b b c c        0  1  2  3
      1 A A A A B B B B       1 a a b b b b c c        4  5  6  7
      2 A A A A B B B B       2 d d e e e e f f        8  9 10 11
      3 A A A A B B B B       3 d d e e e e f f       12 13 14 15
      4 C C C C D D D D       4 d d e e e e f f
      5 C C C C D D D D       5 d d e e e e f f     (site (3, 4): window B slot 4 * 3 + 0 = 12,
      6 C C C C D D D D       6 g g h h h h i i      shifted window e slot 4 * 1 + 2 = 6)
      7 C C C C D D D D       7 g g h h h h i i

One coarsening step (HiST eq. 4, Alg. 2): site (i, j) goes to parent (i // 2, j // 2) in slot
2 * (i % 2) + (j % 2); a parent has at most four children.

    level l:   (4,6) (4,7)    ->    level l+1: parent (2,3), children in slots   0 1
               (5,6) (5,7)                                                        2 3

Everything is sort / unique / scatter on int64 keys: no Python loop over spots or windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_OFF = 2 ** 30  # to_lattice keys: (i + _OFF) * 2^32 + (j + _OFF), valid for lattices up to 2^30 wide
_CHUNK = 2 ** 20  # candidate pairs per batch in default_unit


def _rowmajor(ij):
    """(N, 2) integers -> (N,) int64 keys >= 0 that sort like (i, j), the minima, the stride of column 1."""
    lo = ij.amin(0)
    d = ij - lo
    stride = int(d[:, 1].max()) + 1
    return d[:, 0] * stride + d[:, 1], lo, stride


def rowmajor_order(sites):
    """(N, 2) unique sites -> the permutation that sorts them row-major, by i then j."""
    return torch.argsort(_rowmajor(sites)[0])


def _group(key):
    """torch.unique(key, return_inverse=True) for keys >= 0. When the key range is small, as on a lattice,
    a dense table of occupied keys (HiST App. A.2's index map) and a cumsum replace the sort."""
    span = int(key.max()) + 1
    if span > 4 * len(key):
        return torch.unique(key, return_inverse=True)
    occupied = torch.zeros(span, dtype=torch.bool, device=key.device)
    occupied[key] = True
    return torch.nonzero(occupied).squeeze(1), (torch.cumsum(occupied, 0) - 1)[key]


def median_nn_distance(xy):
    """Exact median over spots of the distance to the nearest other spot, with a grid hash (HiST App. A.2's
    index map). Cells of side h hold about one spot; the 3 x 3 cells around a spot hold every spot within
    h of it. h doubles until more than half of the spots found a neighbour within h, which fixes the median
    (the others are farther than h from everything). Cells are clamped to a box that ignores stray spots:
    clamping keeps neighbouring cells adjacent, so no neighbour is missed."""
    p = xy.double()
    n = len(p)
    sub = p[::max(1, n // 4096)]
    lo, hi = sub.quantile(0.005, dim=0), sub.quantile(0.995, dim=0)
    ext = hi - lo                                        # h from the area per spot, or length for a line
    h = float(ext.prod() / n) ** 0.5 or float(ext.max()) / n or float((p.amax(0) - p.amin(0)).max()) / n
    if h == 0:                                           # every spot at one point
        return 0.0
    best = torch.full((n,), float("inf"), dtype=torch.float64, device=p.device)
    todo = torch.arange(n, device=p.device)
    while n - len(todo) <= n // 2:
        size = (ext / h).long() + 1
        c = torch.minimum(((p - lo) / h).floor().clamp(min=0).long(), size - 1) + 1  # (N, 2), empty border
        ny = int(size[1]) + 2
        cell = c[:, 0] * ny + c[:, 1]
        order = torch.argsort(cell)                                  # spots grouped by cell
        xs, ys = p[order, 0], p[order, 1]                            # coordinates in that order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=p.device)               # position of each spot in it
        count = torch.bincount(cell, minlength=(int(size[0]) + 2) * ny)
        start = torch.cat([count.new_zeros(1), torch.cumsum(count, 0)])  # cell c holds start[c]:start[c + 1]
        mid = (c[todo, :1] + torch.tensor([-1, 0, 1], device=p.device)) * ny + c[todo, 1:]  # (Q, 3) rows
        first, k = start[mid - 1], start[mid + 2] - start[mid - 1]   # 3 cells of a row are consecutive
        by = torch.argsort(k.amax(1), descending=True, stable=True)  # batches of queries of similar load
        load = k.amax(1)[by].clamp(min=1).tolist()
        i = 0
        while i < len(by):
            rows = by[i:i + max(1, _CHUNK // (3 * load[i]))]
            q, t = todo[rows], torch.arange(load[i], device=p.device)
            pos = (first[rows, :, None] + t).clamp(max=n - 1)         # (R, 3, kmax) candidates, in cell order
            dx = xs.index_select(0, pos.flatten()).view(pos.shape) - p[q, 0, None, None]  # (index_select
            dy = ys.index_select(0, pos.flatten()).view(pos.shape) - p[q, 1, None, None]  # beats [] on CPU)
            empty = (t >= k[rows, :, None]) | (pos == rank[q, None, None])  # past the row's end, or itself
            best[q] = (dx * dx + dy * dy).masked_fill(empty, float("inf")).flatten(1).amin(1)
            i += len(rows)
        todo = todo[best[todo] > h * h]
        h *= 2
    lower, upper = best.kthvalue((n + 1) // 2).values, best.kthvalue(n // 2 + 1).values  # the middle two
    return float(lower.sqrt() + upper.sqrt()) / 2


def default_unit(xy) -> float:
    """Lattice unit in micrometres: median nearest-neighbour distance / 1.8 (HiST: 55 um for Visium's
    100 um pitch). A single spot gets 1.0 (any unit puts it on one site)."""
    if len(xy) < 2:
        return 1.0
    unit = median_nn_distance(xy) / 1.8
    if unit == 0:
        raise ValueError(f"default_unit: more than half of the {len(xy)} spots share their coordinate with "
                         "another spot, so the median spacing is 0; pass the unit (unit_um) explicitly")
    return unit


def _key(ij):
    return (ij[..., 0] + _OFF) * 2 ** 32 + (ij[..., 1] + _OFF)


def _member(sorted_keys, q):
    """Whether each key of q is in the sorted 1-D tensor sorted_keys."""
    if len(sorted_keys) == 0:
        return torch.zeros_like(q, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, q).clamp(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == q


def to_lattice(xy, unit) -> torch.Tensor:
    """(N, 2) micrometres -> (N, 2) unique int64 sites (HiST App. A.6), minima shifted to 0.

    Round xy / unit; on each rounded site the spot nearest to it keeps it (ties: lower index). The
    displaced spots then move to the nearest free site (Euclidean, from the continuous position) in rounds:
    each searches the square of radius R around its rounded site and proposes its nearest free site if
    nothing outside the square can be closer, else its R grows by one; a site wanted by several goes to the
    spot closest to its own rounded site (then lower index), the others retry next round."""
    if not unit > 0:
        raise ValueError(f"to_lattice: unit must be a positive number of micrometres, got {unit}")
    g = xy.double() / unit                                      # (N, 2) continuous lattice coordinates
    r = torch.round(g)
    d0 = (g[:, 0] - r[:, 0]) ** 2 + (g[:, 1] - r[:, 1]) ** 2     # squared distance to the rounded site
    lo = r.amin(0)
    r, g = (r - lo).long(), g - lo
    taken, inv, count = torch.unique(_key(r), return_inverse=True, return_counts=True)
    hit = torch.nonzero(count[inv] > 1).squeeze(1)              # spots on contested sites, by index
    hit = hit[torch.argsort(d0[hit], stable=True)]              # nearest first, then lower index
    hit = hit[torch.argsort(inv[hit], stable=True)]             # grouped by site
    keeps = torch.ones_like(hit, dtype=torch.bool)
    keeps[1:] = inv[hit[1:]] != inv[hit[:-1]]
    pending = hit[~keeps].sort().values
    pending = pending[torch.argsort(d0[pending], stable=True)]  # priority: closest to rounded site first
    site, new = r.clone(), torch.zeros(0, dtype=torch.long, device=r.device)  # new: sites taken in rounds
    rad = torch.ones_like(pending)                              # search radius of each pending spot
    while len(pending):
        dest, dist = torch.empty_like(r[pending]), torch.empty_like(d0[pending])
        for R in rad.unique().tolist():                         # one square of offsets per radius in use
            m = torch.nonzero(rad == R).squeeze(1)
            ax = torch.arange(-R, R + 1, device=r.device)
            cand = r[pending[m], None] + torch.cartesian_prod(ax, ax)  # (P_R, (2R+1)^2, 2)
            ck = _key(cand)
            d = ((g[pending[m], None] - cand) ** 2).sum(-1)
            d = d.masked_fill(_member(taken, ck) | _member(new, ck), float("inf"))
            dist[m], k = d.min(1)                               # first minimum: ties follow offset order
            dest[m] = cand[torch.arange(len(m), device=r.device), k]
        sure = dist <= (rad + 0.5) ** 2                         # every site outside the square is >= R + 0.5
        rad += ~sure
        who = torch.nonzero(sure).squeeze(1)                    # rows of pending that propose, by priority
        wanted, owner = torch.unique(_key(dest[who]), return_inverse=True)
        win = who[torch.full_like(wanted, len(who)).scatter_reduce(0, owner, torch.arange(len(who),
                                                                   device=r.device), "amin")]
        site[pending[win]] = dest[win]
        new = torch.cat([new, wanted]).sort().values
        keep = torch.ones_like(pending, dtype=torch.bool).index_fill(0, win, False)  # the losers retry
        pending, rad = pending[keep], rad[keep]
    return site - site.amin(0)


def _nn_vectors(xy, centre, size):
    """Vectors to the nearest other spot from the spots of a square of side `size` around `centre`
    (brute force inside the square, which holds a few thousand spots)."""
    inside = torch.nonzero(((xy - centre).abs() <= size / 2).all(1)).squeeze(1)
    p = xy[inside]
    d = torch.cdist(p, p).fill_diagonal_(float("inf"))
    return p[d.argmin(1)] - p


def square_grid(xy, tolerance=0.4):
    """Fit a square grid to spot centres (N, 2) in micrometres (Visium HD bins, legacy ST): returns
    sites (N, 2) int64 >= 0, A (2, 2) and b (2,) float64 with xy ~ A @ site + b (A = pitch x rotation).
    Gaps, jitter and a rotated image are fine. The rotation is the mean of the nearest-neighbour
    directions modulo 90 degrees; A and b are then refitted by least squares on growing discs around the
    centre (a pitch error would otherwise add up across a large slide). Raises ValueError when a spot lies
    more than `tolerance` pitches off the fitted grid, two spots share a grid position, or the grid is not
    square (a hexagonal Visium layout, for example)."""
    p = xy.double()
    n = len(p)
    if n < 2:
        raise ValueError(f"square_grid: expected at least 2 spots, found {n}")
    pitch = median_nn_distance(p)
    if pitch == 0:
        raise ValueError("square_grid: more than half of the spots share their position with another spot")
    centre = p.median(0).values
    v = _nn_vectors(p, p[((p - centre) ** 2).sum(1).argmin()], 64 * pitch)
    angle = torch.atan2(v[:, 1], v[:, 0]) * 4                   # directions modulo 90 degrees
    theta = float(torch.atan2(angle.sin().mean(), angle.cos().mean())) / 4
    c, s = math.cos(theta), math.sin(theta)
    A = pitch * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    b = p[((p - centre) ** 2).sum(1).argmin()]                   # a spot on the grid: the most central one
    radius, done = 3.0, False
    while not done:
        near = ((p - b) ** 2).sum(1) <= (radius * pitch) ** 2
        done = bool(near.all())
        for _ in range(2):                                      # refit twice: sites may change once
            site = torch.round(torch.linalg.solve(A, (p[near] - b).T).T)
            design = torch.cat([site, torch.ones(len(site), 1, dtype=torch.float64)], 1)
            if torch.linalg.matrix_rank(design) == 3:           # spots in two directions: refit A and b
                fit = torch.linalg.lstsq(design, p[near]).solution  # (3, 2): xy = site @ A.T + b
                A, b = fit[:2].T.contiguous(), fit[2]
        radius *= 1.5
    u = torch.linalg.solve(A, (p - b).T).T                      # (N, 2) grid coordinates
    site = torch.round(u)
    off = (u - site).abs().amax(1)
    scale = A.norm(dim=0)
    if float((A[:, 0] @ A[:, 1]).abs() / (scale[0] * scale[1])) > 0.05 or float(scale.max() / scale.min()) > 1.05 \
            or float(off.max()) > tolerance:
        bad = int((off > tolerance).sum())
        raise ValueError(f"square_grid: the spots do not lie on a square grid: {bad} of {n} spots are more than "
                         f"{tolerance} pitches off the best-fitting grid (largest offset {float(off.max()):.2f}; "
                         f"fitted axes {scale[0]:.2f} and {scale[1]:.2f} um at "
                         f"{math.degrees(math.acos(min(1.0, float((A[:, 0] @ A[:, 1]).abs() / (scale[0] * scale[1]))))):.1f} "
                         "degrees); only square grids (Visium HD bins, legacy ST) can be binned")
    site = site.long()
    lo = site.amin(0)
    uniq = torch.unique(_key(site), return_counts=True)[1]
    if (uniq > 1).any():
        raise ValueError(f"square_grid: {int((uniq > 1).sum())} grid positions hold more than one spot "
                         "(duplicated or overlapping spots); expected one spot per grid position")
    return site - lo, A, b + A @ lo.double()


def slot_offsets(w) -> torch.Tensor:
    """(4w^2, 2): slot s of a 2w x 2w window sits at (s // 2w, s % 2w)."""
    s = torch.arange(4 * w * w)
    return torch.stack([s // (2 * w), s % (2 * w)], 1)


def relative_index(w) -> torch.Tensor:
    """(S, S) index into a flattened (4w-1) x (4w-1) table of relative offsets (HiST eq. 3):
    (ia - ib + 2w - 1) * (4w - 1) + (ja - jb + 2w - 1) for query slot a, key slot b."""
    d = slot_offsets(w)[:, None, :] - slot_offsets(w)[None, :, :] + 2 * w - 1  # (S, S, 2), in [0, 4w-2]
    return d[..., 0] * (4 * w - 1) + d[..., 1]


def window_rulebook(sites, w, shift=False) -> torch.Tensor:
    """(N, 2) unique sites -> (W, 4w^2) token ids, -1 for an empty slot (HiST Alg. 1): one row per non-empty
    2w x 2w window in row-major window order, column = row-major slot. `shift` offsets the grid by w."""
    s = sites + w if shift else sites
    win, loc = torch.div(s, 2 * w, rounding_mode="floor"), s % (2 * w)
    windows, row = _group(_rowmajor(win)[0])
    book = torch.full((len(windows), 4 * w * w), -1, dtype=torch.long, device=sites.device)
    book[row, loc[:, 0] * 2 * w + loc[:, 1]] = torch.arange(len(sites), device=sites.device)
    return book


def coarsen(sites):
    """(N, 2) sites -> parent_sites (M, 2) = unique(sites // 2) row-major, parent (N,) row of each site's
    parent, slot (N,) = 2 * (i % 2) + (j % 2) (HiST eq. 4, Alg. 2 lines 2-4)."""
    key, lo, stride = _rowmajor(torch.div(sites, 2, rounding_mode="floor"))
    uniq, parent = _group(key)
    parent_sites = torch.stack([uniq // stride, uniq % stride], 1) + lo
    return parent_sites, parent, 2 * (sites[:, 0] % 2) + sites[:, 1] % 2


def sub_offsets(r) -> torch.Tensor:
    """(r*r, 2): sub-patch s of an r x r split of a spot sits at (ix, iy) = (s // r, s % r), ix along x
    (image columns), iy along y (image rows). For r = 2 this is the coarsening slot 2 * (i % 2) + (j % 2)."""
    s = torch.arange(r * r)
    return torch.stack([s // r, s % r], 1)


def refine(sites, r) -> torch.Tensor:
    """(N, 2) spot sites -> (N, r*r, 2) sub-spot sites r * site + (ix, iy) (HiFusion's intra-spot split on
    the lattice). Coarsening them log2(r) times gives back exactly the spot sites: (r*i + ix) // r = i."""
    if r not in (2, 4):
        raise ValueError(f"refine: r must be 2 or 4 (sub_levels 1 or 2), got {r}")
    return r * sites[:, None, :] + sub_offsets(r).to(sites.device)


def sub_coords(coords, r, extent_um) -> torch.Tensor:
    """(N, 2) spot centres in micrometres -> (N, r*r, 2) sub-spot centres:
    centre + ((ix + 0.5) / r - 0.5, (iy + 0.5) / r - 0.5) * extent_um, with (ix, iy) = sub_offsets(r)."""
    frac = (sub_offsets(r).to(coords.device, torch.float64) + 0.5) / r - 0.5
    return (coords.double()[:, None, :] + frac * float(extent_um)).to(coords.dtype)


def window_batches(rulebook, max_pairs=8192) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The windows of a rulebook (W, S), grouped for batched attention: windows holding the same number
    of tokens c go together, at most max(1, max_pairs // c^2) windows per batch, so a batch has about
    `max_pairs` (query, key) pairs per head whatever the occupancy. Each batch is
      tokens (w, c): the token ids of its w windows, in slot order;
      slots (w, c): their slots (row-major inside the window; a pair of slots indexes the (S, S) bias).
    Empty windows are dropped. O(N) memory; built once per rulebook (batch sizes read on the host)."""
    filled = rulebook >= 0
    count = filled.sum(1)
    order = torch.argsort(count, stable=True)                    # windows by number of tokens
    slots = torch.argsort(~filled[order], dim=1, stable=True)    # (W, S): filled slots first, in slot order
    tokens = rulebook[order].gather(1, slots)
    sizes, n_windows = torch.unique_consecutive(count[order], return_counts=True)
    batches, start = [], 0
    for c, n in zip(sizes.tolist(), n_windows.tolist()):  # one group per size, cut into batches (views)
        if c:
            step = max(1, max_pairs // (c * c))
            group = slice(start, start + n)
            batches += list(zip(tokens[group, :c].split(step), slots[group, :c].split(step)))
        start += n
    return batches


@dataclass
class Level:
    """One scale of the pyramid; N_l tokens, W windows, S = 4w^2 slots. The window batches are derived
    from the rulebooks (`window_batches`) once, when the level is made."""
    sites: torch.Tensor                   # (N_l, 2)
    rulebook: torch.Tensor                # (W, S) standard windows
    rulebook_shifted: torch.Tensor        # (W', S) windows of the grid shifted by w
    parent: torch.Tensor | None = None    # (N_l,) row of the parent in the next level; None at the coarsest
    slot: torch.Tensor | None = None      # (N_l,) child slot 0..3 inside the parent
    batches: list = field(init=False)          # window_batches(rulebook)
    batches_shifted: list = field(init=False)  # window_batches(rulebook_shifted)

    def __post_init__(self):
        self.batches = window_batches(self.rulebook)
        self.batches_shifted = window_batches(self.rulebook_shifted)


@dataclass
class Pyramid:
    """The lattice levels of one slide, finest first; built once per forward, shared by all layers."""
    levels: list[Level]
    w: int


def build_pyramid(sites, levels, w) -> Pyramid:
    """Level 0 = sites, level l + 1 = coarsen(level l); both rulebooks at every level, parent/slot maps on
    all but the coarsest (HiST sec. 3.5: N_{l+1} is about N_l / 4)."""
    if levels < 1 or w < 1:
        raise ValueError(f"build_pyramid: levels and w must be >= 1, got levels={levels}, w={w}")
    out = []
    for l in range(levels):
        parent_sites, parent, slot = coarsen(sites) if l < levels - 1 else (None, None, None)
        out.append(Level(sites, window_rulebook(sites, w), window_rulebook(sites, w, shift=True), parent, slot))
        sites = parent_sites
    return Pyramid(out, w)

"""Lattice geometry (HiST sec. 3.1, 3.4.1, 3.5, App. A.2-A.6): spots on a collision-free integer
lattice, the window rulebooks of sparse window attention, dyadic coarsening, the pyramid of levels.

A site is (i, j) = round(xy / unit): column 0 from x, column 1 from y; "row-major" means sorted by
(i, j). Windows have side 2w. A standard window is keyed (i // 2w, j // 2w); the shifted partition
moves the grid origin by w, key ((i + w) // 2w, (j + w) // 2w), so a shifted window straddles the
corner of four standard ones. The slot of a site inside its window is row-major:
2w * (i mod 2w) + (j mod 2w), on the shifted coordinates for the shifted partition. w = 2:

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

HiST eq. (2): a token attends to every token of its standard window and of its shifted window (the
union of the two sets of pairs, one softmax). Both lie in the 4w x 4w region made of the four
shifted windows that overlap its standard window (A: a, b, d, e), so the keys of all the queries of
one standard window are one row of `union_rulebook`, and which (query slot, key slot) pairs are
allowed is the same for every window (`union_pairs`).

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

FACTOR = 2       # dyadic coarsening: a parent covers FACTOR x FACTOR sites (HiST sec. 3.5)
_OFF = 2 ** 30   # _key: (i + _OFF) * 2^32 + (j + _OFF), valid for lattices up to 2^30 wide
_QUERIES = 1024  # median_nn_distance: spots whose nearest neighbour is looked up


def _key(ij):
    """(..., 2) integer sites -> int64 keys that sort row-major, by i then j."""
    return (ij[..., 0] + _OFF) * 2 ** 32 + (ij[..., 1] + _OFF)


def _member(sorted_keys, q):
    """Whether each key of q is in the sorted, non-empty 1-D tensor sorted_keys, and where."""
    pos = torch.searchsorted(sorted_keys, q).clamp(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == q, pos


def rowmajor_order(sites):
    """(N, 2) unique sites -> the permutation that sorts them row-major, by i then j."""
    return torch.argsort(_key(sites))


def median_nn_distance(xy, queries=_QUERIES):
    """Median over spots of the distance to the nearest other spot. With more than `queries` spots,
    over every k-th spot (a regular sample), each against all spots: O(queries * N)."""
    p = xy.double()
    rows = torch.arange(0, len(p), max(1, len(p) // queries), device=p.device)
    d = torch.cat([torch.cdist(p[r], p, compute_mode="donot_use_mm_for_euclid_dist")
                   .index_put_((torch.arange(len(r)), r), torch.tensor(math.inf, dtype=p.dtype))
                   .amin(1) for r in rows.split(64)]).sort().values
    return float(d[(len(d) - 1) // 2] + d[len(d) // 2]) / 2          # the middle one or two


def default_unit(xy) -> float:
    """Lattice unit in micrometres: median nearest-neighbour distance / 1.8 (HiST: 55 um for
    Visium's 100 um pitch); 1.0 for a single spot (any unit puts it on one site)."""
    unit = median_nn_distance(xy) / 1.8 if len(xy) > 1 else 1.0
    if unit == 0:
        raise ValueError(f"default_unit: more than half of the {len(xy)} spots share their place "
                         "with another spot, so the median spacing is 0; give the unit (unit_um)")
    return unit


def to_lattice(xy, unit) -> torch.Tensor:
    """(N, 2) micrometres -> (N, 2) unique int64 sites (HiST App. A.6), minima shifted to 0: round
    xy / unit; where spots collide, _move_collided gives all but one a free site nearby."""
    if not unit > 0:
        raise ValueError(f"to_lattice: unit must be a positive number of micrometres, got {unit}")
    g = xy.double() / unit                                      # (N, 2) continuous coordinates
    r = torch.round(g)                             # before the shift: a tie (x.5) rounds to
    lo = r.amin(0)                                 # even whatever the minimum's parity
    site, g = (r - lo).long(), g - lo
    taken, inv, count = torch.unique(_key(site), return_inverse=True, return_counts=True)
    if (count > 1).any():
        site = _move_collided(site, g, taken, inv, count)
    return site - site.amin(0)


def _move_collided(r, g, taken, inv, count):
    """On each contested site the spot nearest to it keeps it (ties: lower index); the others move
    to the nearest free site in rounds: each searches the square of radius R around its rounded
    site and proposes its nearest free site if nothing outside the square can be closer, else R
    grows; a site wanted by several goes to the spot closest to its own rounded site (then lower
    index), the others retry next round. r (N, 2) rounded sites, g (N, 2) continuous positions."""
    d0 = ((g - r) ** 2).sum(1)                                  # squared distance to rounded site
    hit = torch.nonzero(count[inv] > 1).squeeze(1)              # spots on contested sites
    hit = hit[torch.argsort(d0[hit], stable=True)]              # nearest first, then lower index
    hit = hit[torch.argsort(inv[hit], stable=True)]             # grouped by site
    keeps = torch.ones_like(hit, dtype=torch.bool)
    keeps[1:] = inv[hit[1:]] != inv[hit[:-1]]
    pending = hit[~keeps].sort().values
    pending = pending[torch.argsort(d0[pending], stable=True)]  # closest to its rounded site first
    site = r.clone()
    rad = torch.ones_like(pending)                              # search radius of each pending spot
    while len(pending):
        dest, dist = torch.empty_like(r[pending]), torch.empty_like(d0[pending])
        for R in rad.unique().tolist():                         # one square of offsets per radius
            m = torch.nonzero(rad == R).squeeze(1)
            ax = torch.arange(-R, R + 1, device=r.device)
            cand = r[pending[m], None] + torch.cartesian_prod(ax, ax)  # (P_R, (2R+1)^2, 2)
            d = ((g[pending[m], None] - cand) ** 2).sum(-1)
            d = d.masked_fill(_member(taken, _key(cand))[0], math.inf)
            dist[m], k = d.min(1)                               # first minimum: offset order
            dest[m] = cand[torch.arange(len(m), device=r.device), k]
        sure = dist <= (rad + 0.5) ** 2                         # every site outside is >= R + 0.5
        rad += ~sure
        who = torch.nonzero(sure).squeeze(1)                    # rows that propose, by priority
        wanted, owner = torch.unique(_key(dest[who]), return_inverse=True)
        first = torch.full_like(wanted, len(who)).scatter_reduce(
            0, owner, torch.arange(len(who), device=r.device), "amin")
        win = who[first]
        site[pending[win]] = dest[win]
        taken = torch.cat([taken, wanted]).sort().values          # sites now taken
        keep = torch.ones_like(pending, dtype=torch.bool).index_fill(0, win, False)  # losers retry
        pending, rad = pending[keep], rad[keep]
    return site


def _nn_vectors(xy, centre, size):
    """Vectors to the nearest other spot from the spots of a square of side `size` around `centre`
    (brute force inside the square, which holds a few thousand spots)."""
    inside = torch.nonzero(((xy - centre).abs() <= size / 2).all(1)).squeeze(1)
    p = xy[inside]
    d = torch.cdist(p, p).fill_diagonal_(math.inf)
    return p[d.argmin(1)] - p


def square_grid(xy, tolerance=0.4):
    """Fit a square grid to spot centres (N, 2) in micrometres (Visium HD bins, legacy ST): returns
    sites (N, 2) int64 >= 0, A (2, 2) and b (2,) float64 with xy ~ A @ site + b (A = pitch x
    rotation). Gaps, jitter and a rotated image are fine. The rotation is the mean of the
    nearest-neighbour directions modulo 90 degrees; A and b are then refitted by least squares on
    growing discs around the centre (a pitch error would otherwise add up across a large slide).
    Raises ValueError when a spot lies more than `tolerance` pitches off the fitted grid, two spots
    share a grid position, or the grid is not square (a hexagonal Visium layout, for example)."""
    p = xy.double()
    n = len(p)
    if n < 2:
        raise ValueError(f"square_grid: expected at least 2 spots, found {n}")
    pitch = median_nn_distance(p)
    if pitch == 0:
        raise ValueError("square_grid: more than half of the spots share their position with "
                         "another spot")
    centre = p.median(0).values
    v = _nn_vectors(p, p[((p - centre) ** 2).sum(1).argmin()], 64 * pitch)
    angle = torch.atan2(v[:, 1], v[:, 0]) * 4                   # directions modulo 90 degrees
    theta = float(torch.atan2(angle.sin().mean(), angle.cos().mean())) / 4
    c, s = math.cos(theta), math.sin(theta)
    A = pitch * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    b = p[((p - centre) ** 2).sum(1).argmin()]                  # the most central spot: on the grid
    radius, done = 3.0, False
    while not done:
        near = ((p - b) ** 2).sum(1) <= (radius * pitch) ** 2
        done = bool(near.all())
        for _ in range(2):                                      # refit twice: sites may change once
            site = torch.round(torch.linalg.solve(A, (p[near] - b).T).T)
            design = torch.cat([site, torch.ones(len(site), 1, dtype=torch.float64)], 1)
            if torch.linalg.matrix_rank(design) == 3:           # spots in two directions: refit
                fit = torch.linalg.lstsq(design, p[near]).solution  # (3, 2): xy = site @ A.T + b
                A, b = fit[:2].T.contiguous(), fit[2]
        radius *= 1.5
    u = torch.linalg.solve(A, (p - b).T).T                      # (N, 2) grid coordinates
    site = torch.round(u)
    off = (u - site).abs().amax(1)
    scale = A.norm(dim=0)
    cos = min(1.0, float((A[:, 0] @ A[:, 1]).abs() / (scale[0] * scale[1])))
    if cos > 0.05 or float(scale.max() / scale.min()) > 1.05 or float(off.max()) > tolerance:
        bad = int((off > tolerance).sum())
        raise ValueError(f"square_grid: the spots do not lie on a square grid: {bad} of {n} spots "
                         f"are more than {tolerance} pitches off the best-fitting grid (largest "
                         f"offset {float(off.max()):.2f}; fitted axes {scale[0]:.2f} and "
                         f"{scale[1]:.2f} um at {math.degrees(math.acos(cos)):.1f} degrees); only "
                         "square grids (Visium HD bins, legacy ST) can be binned")
    site = site.long()
    lo = site.amin(0)
    uniq = torch.unique(_key(site), return_counts=True)[1]
    if (uniq > 1).any():
        raise ValueError(f"square_grid: {int((uniq > 1).sum())} grid positions hold more than one "
                         "spot (duplicated or overlapping spots); expected one spot per position")
    return site - lo, A, b + A @ lo.double()


def slot_offsets(w) -> torch.Tensor:
    """(4w^2, 2): slot s of a 2w x 2w window sits at (s // 2w, s % 2w)."""
    s = torch.arange(4 * w * w)
    return torch.stack([s // (2 * w), s % (2 * w)], 1)


def offset_index(delta, w) -> torch.Tensor:
    """(..., 2) lattice offsets (di, dj), each in [-(2w - 1), 2w - 1] -> (...) index into a
    flattened (4w - 1) x (4w - 1) table of offsets (HiST eq. 3's b(di, dj)); clamped outside."""
    d = (delta + 2 * w - 1).clamp(0, 4 * w - 2)
    return d[..., 0] * (4 * w - 1) + d[..., 1]


def window_rulebook(sites, w, shift=False):
    """(N, 2) unique sites -> rulebook (W, 4w^2) token ids, -1 = empty slot (HiST Alg. 1), a row
    per non-empty window, a column per slot, both row-major; the window keys (W,). shift: by w."""
    s = sites + w if shift else sites
    win, loc = torch.div(s, 2 * w, rounding_mode="floor"), s % (2 * w)
    keys, row = torch.unique(_key(win), return_inverse=True)
    book = torch.full((len(keys), 4 * w * w), -1, dtype=torch.long, device=sites.device)
    book[row, loc[:, 0] * 2 * w + loc[:, 1]] = torch.arange(len(sites), device=sites.device)
    return book, keys


def union_rulebook(keys, shifted, shifted_keys):
    """HiST eq. (2)'s keys per standard window: the shifted windows (I + a, J + b), a, b in {0, 1},
    that overlap window (I, J). keys (W,) standard window keys, shifted (W', S) and shifted_keys
    (W',) -> (W, 4S) token ids in the order (a, b, shifted slot), -1 = empty."""
    parts = []
    for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
        found, pos = _member(shifted_keys, keys + a * 2 ** 32 + b)
        parts.append(torch.where(found[:, None], shifted[pos], -1))
    return torch.cat(parts, 1)


def union_pairs(w):
    """The pairs of HiST eq. (2) inside one region: query slot a of the standard window (S,) and key
    slot r of union_rulebook (4S,) -> allowed (S, 4S) bool (r in a's standard window or in a's
    shifted window) and offsets (S, 4S, 2), query site - key site."""
    S = 4 * w * w
    q = slot_offsets(w)                                         # (S, 2) in the standard window
    part = torch.arange(4 * S) // S                             # which shifted window: 2a + b
    ab = torch.stack([part // 2, part % 2], 1)                  # (4S, 2)
    k = 2 * w * ab - w + slot_offsets(w).repeat(4, 1)           # (4S, 2) in the same frame
    in_window = ((k >= 0) & (k < 2 * w)).all(1)                 # in the standard window itself
    own_shift = ((q[:, None, :] >= w).long() == ab[None]).all(-1)   # r in a's shifted window
    return own_shift | in_window[None], q[:, None, :] - k[None]


def window_pairs(w):
    """The pairs of one window of either partition: allowed (S, S) all True, offsets (S, S, 2)."""
    q = slot_offsets(w)
    return torch.ones(len(q), len(q), dtype=torch.bool), q[:, None, :] - q[None]


def pair_rank(d2, key):
    """Squared distances (>= 0) and key ids -> int64 ranks ordering the pairs by distance (rounded
    to float32), then by key id: the rank's high 32 bits are the float32's bits (which sort as the
    numbers do), the low ones the id. k-NN is then one topk, with no ties left to chance."""
    return d2.float().view(torch.int32).long() << 32 | key


def knn(xy_q, xy_k, k, chunk=None):
    """Indices of the min(k, Nk) nearest keys of each query, nearest first, ties to the lower key
    (pair_rank), (Nq, k'). Brute force in chunks of queries, memory O(chunk * Nk) (None: about 4M
    distances a chunk); kernels.knn finds the same on a grid in O(N k)."""
    chunk = chunk or max(1, (1 << 22) // max(len(xy_k), 1))
    key = torch.arange(len(xy_k), device=xy_k.device)
    d2 = lambda a: ((a[:, None, :] - xy_k[None, :, :]) ** 2).sum(-1)  # noqa: E731, (c, Nk)
    k = min(k, len(xy_k))
    parts = [pair_rank(d2(a), key).topk(k, dim=1, largest=False).indices for a in xy_q.split(chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long, device=xy_q.device)


def coarsen(sites):
    """(N, 2) sites -> parent_sites (M, 2) = unique(sites // 2) row-major, parent (N,) row of each
    site's parent, slot (N,) = 2 * (i % 2) + (j % 2) (HiST eq. 4, Alg. 2 lines 2-4)."""
    up = torch.div(sites, FACTOR, rounding_mode="floor")
    keys, parent = torch.unique(_key(up), return_inverse=True)
    parent_sites = torch.zeros(len(keys), 2, dtype=sites.dtype, device=sites.device)
    parent_sites[parent] = up
    return parent_sites, parent, FACTOR * (sites[:, 0] % FACTOR) + sites[:, 1] % FACTOR


def sub_offsets(r) -> torch.Tensor:
    """(r*r, 2): sub-patch s of an r x r split of a spot sits at (ix, iy) = (s // r, s % r), ix
    along x (image columns), iy along y (image rows). For r = 2 this is the coarsening slot."""
    s = torch.arange(r * r)
    return torch.stack([s // r, s % r], 1)


def refine(sites, r) -> torch.Tensor:
    """(N, 2) spot sites -> (N, r*r, 2) sub-spot sites r * site + (ix, iy) (HiFusion's intra-spot
    split on the lattice). Coarsening them log2(r) times gives back the spot sites."""
    if r not in (FACTOR, FACTOR ** 2):
        raise ValueError(f"refine: r must be {FACTOR} or {FACTOR ** 2} (sub_levels 1 or 2), "
                         f"not {r}")
    return r * sites[:, None, :] + sub_offsets(r).to(sites.device)


def sub_coords(coords, r, extent_um) -> torch.Tensor:
    """(N, 2) spot centres in micrometres -> (N, r*r, 2) sub-spot centres:
    centre + ((ix + 0.5) / r - 0.5, (iy + 0.5) / r - 0.5) * extent_um, (ix, iy) = sub_offsets(r)."""
    frac = (sub_offsets(r).to(coords.device, torch.float64) + 0.5) / r - 0.5
    return (coords.double()[:, None, :] + frac * float(extent_um)).to(coords.dtype)


@dataclass
class Level:
    """One scale of the pyramid: N_l tokens, W standard windows, S = 4w^2 slots per window."""
    sites: torch.Tensor                  # (N_l, 2), row-major
    windows: torch.Tensor                # (W, S) standard windows (window_rulebook)
    shifted: torch.Tensor                # (W', S) windows of the grid shifted by w
    union: torch.Tensor                  # (W, 4S) eq. (2)'s keys of each standard window
    parent: torch.Tensor | None = None   # (N_l,) row of the parent in the next level (or None)
    slot: torch.Tensor | None = None     # (N_l,) child slot 0..3 inside the parent
    cache: dict = field(default_factory=dict, repr=False)  # kernels.py's window batches


def build_pyramid(sites, levels, w) -> list[Level]:
    """Level 0 = sites, level l + 1 = coarsen(level l) (HiST sec. 3.5: N_{l+1} ~ N_l / 4); the
    rulebooks at every level, parent and slot maps on all but the coarsest."""
    if levels < 1 or w < 1:
        raise ValueError(f"build_pyramid: levels and w must be >= 1, got {levels}, {w}")
    out = []
    for l in range(levels):
        parent_sites, parent, slot = coarsen(sites) if l < levels - 1 else (None, None, None)
        (windows, keys), (shifted, shifted_keys) = (window_rulebook(sites, w, shift)
                                                    for shift in (False, True))
        union = union_rulebook(keys, shifted, shifted_keys)
        out.append(Level(sites, windows, shifted, union, parent, slot))
        sites = parent_sites
    return out

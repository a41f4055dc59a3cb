"""lattice.py against slow, obviously-correct references: Python dicts and loops over spots,
exhaustive search."""
import math

import numpy as np
import pytest
import torch

import files
import lattice


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---- layouts (micrometres, float64) --------------------------------------------------------------
def _blob(xy, rng):
    """Keep the points inside a wobbly disc with a few round holes: an irregular tissue
    footprint."""
    c = xy.mean(0)
    d = xy - c
    ang, rad = np.arctan2(d[:, 1], d[:, 0]), np.hypot(d[:, 0], d[:, 1])
    a = rng.uniform(0, 2 * np.pi, 3)
    edge = rad.max() * (0.75 + 0.1 * np.sin(3 * ang + a[0]) + 0.08 * np.cos(5 * ang + a[1]))
    keep = rad < edge
    for h in c + rng.uniform(-0.4, 0.4, (3, 2)) * rad.max():
        keep &= np.hypot(*(xy - h).T) > 0.08 * rad.max()
    return xy[keep]


def visium(rng, side=30, pitch=100.0):
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    xy = np.stack([j.ravel() * pitch + (i.ravel() % 2) * pitch / 2,
                   i.ravel() * pitch * math.sqrt(3) / 2], 1)
    xy = _blob(xy, rng)
    return xy + rng.normal(0, 0.5, xy.shape)


def visium_jittered(rng):
    xy = visium(rng)
    return xy + rng.normal(0, 2.0, xy.shape)


def square_with_holes(rng, side=28, pitch=50.0):
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    hole = (i.ravel() > 5) & (i.ravel() < 12) & (j.ravel() > 8)
    keep = (rng.random(side * side) > 0.25) & ~hole
    return np.stack([i.ravel(), j.ravel()], 1)[keep] * pitch + 1000.0


def hd_grid(rng, side=45, pitch=8.0):
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return _blob(np.stack([i.ravel(), j.ravel()], 1) * pitch, rng)


def hd_jittered(rng):
    xy = hd_grid(rng)
    return xy + rng.uniform(-5.0, 5.0, xy.shape)


def clustered(rng, clusters=15, per=40, spread=4.0):
    """Tight clusters at unit ~5: many spots round to the same site, some exact duplicates."""
    centres = rng.uniform(0, 400, (clusters, 2))
    xy = (centres[:, None] + rng.normal(0, spread, (clusters, per, 2))).reshape(-1, 2)
    return np.concatenate([xy, xy[rng.choice(len(xy), 30, replace=False)]])


LAYOUTS = {  # name -> (generator, unit in micrometres)
    "visium": (visium, 55.0),
    "visium_jittered": (visium_jittered, 55.0),
    "visium_coarse": (visium_jittered, 90.0),
    "square_holes": (square_with_holes, 50.0),
    "square_holes_coarse": (square_with_holes, 60.0),
    "hd": (hd_grid, 8.0 / 1.8),
    "hd_jittered": (hd_jittered, 8.0),
    "clustered": (clustered, 5.0),
    "single": (lambda rng: np.array([[12.5, -3.0]]), 1.0),
    "same_point": (lambda rng: np.array([[7.0, 7.0], [7.0, 7.0]]), 2.0),
}
COLLIDING = ["visium_coarse", "square_holes_coarse", "hd_jittered", "clustered"]


def layout(name, seed=0):
    gen, unit = LAYOUTS[name]
    return torch.tensor(gen(np.random.default_rng(seed)), dtype=torch.float64), unit


# ---- references ----------------------------------------------------------------------------------
def ref_keepers(xy, unit):
    """Rounded sites, distance^2 to them, and {rounded site: spot that keeps it} by loops over
    spots."""
    g = xy.numpy() / unit
    r = np.round(g)
    d0 = ((g - r) ** 2).sum(1)
    best = {}
    for n in range(len(g)):
        s = (int(r[n, 0]), int(r[n, 1]))
        if s not in best or (d0[n], n) < (d0[best[s]], best[s]):
            best[s] = n
    return g, r.astype(np.int64), d0, best


def ref_greedy(xy, unit):
    """Sequential greedy: displaced spots, closest to their rounded site first, one at a time, each
    takes the nearest free site by exhaustive search over a box that surely holds it. Returns
    {spot: site}."""
    g, r, d0, best = ref_keepers(xy, unit)
    keepers = set(best.values())
    moved = sorted((n for n in range(len(g)) if n not in keepers), key=lambda n: (d0[n], n))
    m = int(math.ceil(1.5 * math.sqrt(len(g)))) + 3
    lo = r.min(0) - m
    free = np.ones(tuple(r.max(0) - lo + m + 1), dtype=bool)
    for s in best:
        free[s[0] - lo[0], s[1] - lo[1]] = False
    ii, jj = np.meshgrid(np.arange(free.shape[0]) + lo[0], np.arange(free.shape[1]) + lo[1],
                         indexing="ij")
    out = {}
    for n in moved:
        d = np.where(free, (ii - g[n, 0]) ** 2 + (jj - g[n, 1]) ** 2, np.inf)
        a, b = np.unravel_index(np.argmin(d), d.shape)
        free[a, b] = False
        out[n] = (a + lo[0], b + lo[1])
    return out


def ref_coarsen(sites):
    parents = sorted({(i // 2, j // 2) for i, j in sites.tolist()})
    row = {p: k for k, p in enumerate(parents)}
    parent = [row[(i // 2, j // 2)] for i, j in sites.tolist()]
    slot = [2 * (i % 2) + j % 2 for i, j in sites.tolist()]
    return torch.tensor(parents).reshape(-1, 2), torch.tensor(parent), torch.tensor(slot)


def site_sets():
    """Site layouts for the rulebook and coarsening tests: to_lattice outputs plus raw random
    sites."""
    out = {name: lattice.to_lattice(*layout(name)) for name in LAYOUTS}
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(-25, 25, (900, 2), generator=g)
    unique = torch.unique(raw, dim=0)
    out["random_negative"] = unique[torch.randperm(len(unique), generator=g)]
    far = torch.unique(torch.randint(0, 10 ** 6, (200, 2), generator=g), dim=0)  # sparse: sorted,
    out["far_apart"] = torch.cat([far, far[:50] + torch.tensor([0, 1])])           # not tabulated
    return out


SITES = site_sets()


# ---- default_unit --------------------------------------------------------------------------------
def ref_median_nn(xy, queries):
    """Median over the sampled spots (every k-th, k = N // queries, all spots when N <= queries) of
    the distance to the nearest other spot, by numpy over all pairs."""
    p = xy.double().numpy()
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(1)[::max(1, len(p) // queries)]))


@pytest.mark.parametrize("name", ["visium", "visium_jittered", "square_holes", "hd", "clustered",
                                  "line", "outliers", "full_hex"])
def test_default_unit_is_median_nn_over_1_8(name):
    if name == "full_hex":  # packed denser than one spot per pitch^2
        i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
        xy = torch.tensor(np.stack([j.ravel() + (i.ravel() % 2) / 2,
                                    i.ravel() * math.sqrt(3) / 2], 1) * 100.0)
        xy = xy + torch.rand(xy.shape, dtype=torch.float64)
    elif name == "line":
        xy = torch.tensor(np.stack([np.sort(np.random.rand(300)) * 1e4, np.zeros(300)], 1))
    elif name == "outliers":  # far-away spots must not change the answer
        xy, _ = layout("hd")
        far = torch.tensor([[1e5, 3e5], [-4e5, 2e4], [1e5 + 40.0, 3e5]], dtype=torch.float64)
        xy = torch.cat([xy, far])
    else:
        xy, _ = layout(name)
    assert lattice.default_unit(xy) == pytest.approx(ref_median_nn(xy, 1024) / 1.8, rel=1e-9)
    for queries in (1, 7, 100, 10 ** 6):  # every k-th spot: the sample's median, not all spots'
        want = ref_median_nn(xy, queries)
        assert lattice.median_nn_distance(xy, queries) == pytest.approx(want, rel=1e-9), queries
        want32 = ref_median_nn(xy.float().double(), queries)   # float32 input: its own rounding
        assert lattice.median_nn_distance(xy.float(), queries) == pytest.approx(want32, rel=1e-9)
    every = ref_median_nn(xy, len(xy))
    assert lattice.median_nn_distance(xy, 10 ** 6) == pytest.approx(every, rel=1e-9)


def test_median_nn_distance_samples_every_kth_spot():
    """Spots 0, 3, 6, ... sit 1 um from a partner, the others 5 um: with k = 3 only the 1's
    count."""
    xy = torch.tensor([[100.0 * n, 0.0] for n in range(30)] + [[100.0 * n, 5.0] for n in range(30)])
    xy[0:30:3, 1] += 4.0                          # spots 0, 3, ... 27: 1 um from their partner
    assert lattice.median_nn_distance(xy, 60) == pytest.approx(5.0)   # all 60: 40 of them at 5
    assert lattice.median_nn_distance(xy, 20) == pytest.approx(1.0)   # k = 3: spots 0, 3, ..., 57
    assert lattice.median_nn_distance(xy, 20) == pytest.approx(ref_median_nn(xy, 20))


def test_default_unit_visium_pitch_and_degenerate_inputs():
    xy, _ = layout("visium")
    assert lattice.default_unit(xy) == pytest.approx(100 / 1.8, rel=0.02)
    assert lattice.default_unit(torch.tensor([[3.0, 4.0]])) == 1.0
    with pytest.raises(ValueError, match="unit"):
        lattice.default_unit(torch.tensor([[7.0, 7.0], [7.0, 7.0]]))


# ---- to_lattice ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_to_lattice_unique_and_keepers_keep_their_site(name):
    xy, unit = layout(name)
    sites = lattice.to_lattice(xy, unit)
    assert sites.dtype == torch.long and sites.shape == (len(xy), 2)
    assert len(torch.unique(sites, dim=0)) == len(xy)
    assert sites.amin(0).tolist() == [0, 0]
    _, r, _, best = ref_keepers(xy, unit)
    keepers = sorted(best.values())
    shift = r[keepers] - sites[keepers].numpy()       # the final shift of minima to 0 is one vector
    assert (shift == shift[0]).all()
    counts = {}
    for s in map(tuple, r.tolist()):
        counts[s] = counts.get(s, 0) + 1
    alone = [n for n in range(len(xy)) if counts[tuple(r[n])] == 1]
    assert all(n in best.values() for n in alone)  # uncontested spots are keepers: they keep it
    assert torch.equal(lattice.to_lattice(xy, unit), sites)  # deterministic


@pytest.mark.parametrize("name", COLLIDING)
def test_to_lattice_moves_nearly_as_little_as_sequential_greedy(name):
    for seed in range(3):
        xy, unit = layout(name, seed)
        sites = lattice.to_lattice(xy, unit)
        g, r, _, best = ref_keepers(xy, unit)
        greedy = ref_greedy(xy, unit)
        assert greedy, "layout must have collisions"
        moved = sorted(greedy)
        keeper = next(iter(best.values()))
        shift = r[keeper] - sites[keeper].numpy()
        ours = np.hypot(*(sites[moved].numpy() + shift - g[moved]).T)
        ref = np.hypot(*(np.array([greedy[n] for n in moved]) - g[moved]).T)
        assert ours.mean() <= 1.2 * ref.mean(), (name, seed, ours.mean(), ref.mean())


def test_to_lattice_isolated_collisions_take_the_nearest_free_site():
    """With collisions far apart, rounds and the sequential greedy must agree spot by spot."""
    rng = np.random.default_rng(3)
    base = np.stack(np.meshgrid(np.arange(40.0), np.arange(40.0), indexing="ij"), -1).reshape(-1, 2)
    base = base[rng.random(len(base)) > 0.3]
    extra = np.array([[a, b] for a in range(3, 40, 9) for b in range(3, 40, 9)])
    extra = extra + rng.uniform(-0.45, 0.45, (25, 2))
    xy = torch.tensor(np.concatenate([base, extra]) * 10.0)
    sites = lattice.to_lattice(xy, 10.0)
    g, r, _, best = ref_keepers(xy, 10.0)
    greedy = ref_greedy(xy, 10.0)
    assert len(greedy) >= 10
    keeper = next(iter(best.values()))
    shift = r[keeper] - sites[keeper].numpy()
    for n, s in greedy.items():
        want = np.hypot(*(np.array(s) - g[n]))
        assert np.hypot(*(sites[n].numpy() + shift - g[n])) == pytest.approx(want)


def test_to_lattice_rejects_a_bad_unit():
    with pytest.raises(ValueError, match="unit"):
        lattice.to_lattice(torch.zeros(3, 2), 0.0)


def test_to_lattice_two_spots_at_one_point():
    sites = lattice.to_lattice(torch.tensor([[7.0, 7.0], [7.0, 7.0]]), 1.0)
    assert len(torch.unique(sites, dim=0)) == 2
    assert (sites[0] - sites[1]).abs().sum().item() == 1  # the loser takes an adjacent site


# ---- windows -------------------------------------------------------------------------------------
def all_offsets(w):
    """Every lattice offset two tokens of one 2w x 2w window can have, row-major: (di, dj), each in
    [-(2w - 1), 2w - 1]; HiST eq. (3)'s table b(di, dj) has one entry per offset, in this order."""
    r = range(-(2 * w - 1), 2 * w)
    return [(di, dj) for di in r for dj in r]


def test_slot_offsets_and_offset_index_match_loops():
    for w in (1, 2, 3, 4):
        side = 2 * w
        want = [[s // side, s % side] for s in range(side * side)]
        assert lattice.slot_offsets(w).tolist() == want
        offsets = all_offsets(w)
        assert len(offsets) == (4 * w - 1) ** 2
        got = lattice.offset_index(torch.tensor(offsets), w)
        assert got.tolist() == list(range(len(offsets)))   # entry n of the table is offset n
        lo, hi = -(2 * w - 1), 2 * w - 1             # outside the window: the nearest offset
        outside = [(di, dj) for di in range(lo - 3, hi + 4) for dj in range(lo - 3, hi + 4)]
        want = [offsets.index((min(max(di, lo), hi), min(max(dj, lo), hi))) for di, dj in outside]
        assert lattice.offset_index(torch.tensor(outside), w).tolist() == want
        pairs = torch.tensor(offsets).view(1, -1, 2)       # any leading shape
        assert lattice.offset_index(pairs, w).tolist() == [list(range(len(offsets)))]


def window_of(site, w, shift):
    """(window (I, J), row-major slot) of a site in the standard (shift False) or shifted
    partition."""
    i, j = (site[0] + w, site[1] + w) if shift else site
    return (i // (2 * w), j // (2 * w)), (i % (2 * w)) * 2 * w + j % (2 * w)


def ref_windows(sites, w, shift):
    """{window (I, J): {slot: token}} by grouping the sites one by one."""
    windows = {}
    for n, site in enumerate(sites.tolist()):
        key, slot = window_of(site, w, shift)
        windows.setdefault(key, {})[slot] = n
    return windows


def ref_rulebook(sites, w, shift):
    windows = ref_windows(sites, w, shift)
    book = torch.full((len(windows), 4 * w * w), -1, dtype=torch.long)
    for r, key in enumerate(sorted(windows)):
        for slot, n in windows[key].items():
            book[r, slot] = n
    return book, sorted(windows)


def ref_neighbours(sites, w):
    """HiST eq. (2)'s keys of every token, by definition: the tokens that share its standard window
    or its shifted window (itself included)."""
    groups = {}
    of = [[] for _ in range(len(sites))]
    for n, site in enumerate(sites.tolist()):
        for shift in (False, True):
            key = (shift, window_of(site, w, shift)[0])
            groups.setdefault(key, []).append(n)
            of[n].append(key)
    return [set(groups[of[n][0]]) | set(groups[of[n][1]]) for n in range(len(sites))]


@pytest.mark.parametrize("name", list(SITES))
def test_window_rulebook_equals_brute_force_grouping(name):
    sites = SITES[name]
    for w in (1, 2, 3):
        for shift in (False, True):
            book, keys = lattice.window_rulebook(sites, w, shift=shift)
            want, windows = ref_rulebook(sites, w, shift)
            assert torch.equal(book, want), (name, w, shift)
            assert torch.equal(book[book >= 0].sort().values, torch.arange(len(sites)))
            assert keys.shape == (len(book),) and (keys[1:] > keys[:-1]).all()   # sorted, distinct
            assert torch.equal(keys, lattice._key(torch.tensor(windows).view(-1, 2)))


def ref_union_rulebook(sites, w):
    """(W, 4S) by definition: for the standard window (I, J), the shifted windows (I + a, J + b), a,
    b in {0, 1}, in that order, each as its S slots (-1 where empty or where the window holds no
    token)."""
    S = 4 * w * w
    standard, shifted = ref_windows(sites, w, False), ref_windows(sites, w, True)
    book = torch.full((len(standard), 4 * S), -1, dtype=torch.long)
    for r, (I, J) in enumerate(sorted(standard)):
        for part, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            for slot, n in shifted.get((I + a, J + b), {}).items():
                book[r, part * S + slot] = n
    return book


@pytest.mark.parametrize("name", list(SITES))
def test_union_rulebook_and_pairs_are_hist_eq2(name):
    """Per standard window, the keys are the four overlapping shifted windows; with union_pairs'
    allowed mask, each token's allowed keys are exactly the tokens sharing its standard or its
    shifted window (each once), and union_pairs' offsets are the query's site minus the key's."""
    sites = SITES[name]
    for w in (1, 2, 3):
        book, keys = lattice.window_rulebook(sites, w)
        shifted, shifted_keys = lattice.window_rulebook(sites, w, shift=True)
        union = lattice.union_rulebook(keys, shifted, shifted_keys)
        assert torch.equal(union, ref_union_rulebook(sites, w)), (name, w)
        allowed, offsets = lattice.union_pairs(w)
        neighbours = ref_neighbours(sites, w)
        seen = set()
        for window in range(len(book)):
            row = union[window]
            for a, n in enumerate(book[window].tolist()):
                if n < 0:
                    continue
                seen.add(n)
                found = row[(row >= 0) & allowed[a]].tolist()
                assert len(found) == len(set(found)) and set(found) == neighbours[n], (name, w, n)
                filled = row >= 0
                torch.testing.assert_close(offsets[a][filled], sites[n] - sites[row[filled]])
        assert seen == set(range(len(sites)))


def test_union_pairs_by_definition():
    """Query slot a of a standard window and key slot r of union_rulebook's row (shifted window
    (a', b') = divmod(r // S, 2), slot r % S), placed in the frame of the standard window: allowed
    when the key lies in the standard window itself or in the query's own shifted window."""
    for w in (1, 2, 3):
        S, side = 4 * w * w, 2 * w
        allowed, offsets = lattice.union_pairs(w)
        assert allowed.shape == (S, 4 * S) and offsets.shape == (S, 4 * S, 2)
        for a in range(S):
            qi, qj = divmod(a, side)
            own = ((qi + w) // side, (qj + w) // side)   # the query's shifted window: 0 or 1 each
            for r in range(4 * S):
                part, slot = divmod(r, S)
                ki, kj = side * (part // 2) - w + slot // side, side * (part % 2) - w + slot % side
                in_standard = 0 <= ki < side and 0 <= kj < side
                in_own = (part // 2, part % 2) == own
                assert bool(allowed[a, r]) == (in_standard or in_own), (w, a, r)
                assert offsets[a, r].tolist() == [qi - ki, qj - kj]
        assert (allowed.sum(1) > 0).all()
        same, pairs = lattice.window_pairs(w)
        assert same.all() and same.shape == (S, S)
        assert pairs.tolist() == [[[a // side - b // side, a % side - b % side] for b in range(S)]
                                  for a in range(S)]


@pytest.mark.parametrize("name", list(SITES))
def test_coarsen_equals_brute_force(name):
    sites = SITES[name]
    for got, want in zip(lattice.coarsen(sites), ref_coarsen(sites)):
        assert torch.equal(got, want)


# ---- k nearest neighbours ------------------------------------------------------------------------
def ref_knn(xy_q, xy_k, k):
    """For each query, the keys sorted by (squared distance rounded to float32, key index), the
    first min(k, Nk): numpy in the inputs' own precision, one query at a time."""
    q, p = xy_q.numpy(), xy_k.numpy()
    out = []
    for a in q:
        d2 = ((a[0] - p[:, 0]) ** 2 + (a[1] - p[:, 1]) ** 2).astype(np.float32)
        out.append(sorted(range(len(p)), key=lambda j: (float(d2[j]), j))[:min(k, len(p))])
    return torch.tensor(out, dtype=torch.long).reshape(len(q), min(k, len(p)))


@pytest.mark.parametrize("points", ["integer", "float32", "float64", "duplicates"])
def test_knn_is_nearest_first_ties_to_the_lower_index(points):
    g = torch.Generator().manual_seed(5)
    xy = {"integer": lambda: torch.randint(0, 12, (150, 2), generator=g).float(),  # many ties
          "float32": lambda: torch.rand(150, 2, generator=g) * 12,
          "float64": lambda: torch.rand(150, 2, generator=g, dtype=torch.float64) * 12,
          "duplicates": lambda: torch.rand(50, 2, generator=g).repeat(3, 1)}[points]()
    xy_q = torch.cat([xy[:40], xy[:5] + 0.25, xy[:3] - 30])     # on keys, between, far outside
    for chunk in (None, 7):
        for k in (1, 7, 200):
            got = lattice.knn(xy_q, xy, k, chunk)
            assert torch.equal(got, ref_knn(xy_q, xy, k)), (points, chunk, k)
    assert lattice.knn(xy_q[:0], xy, 3).shape == (0, 3)


def test_pair_rank_orders_by_float32_distance_then_key():
    d2 = torch.tensor([[4.0, 1.0, 1.0, 0.0, 1.0 + 1e-9, 3e38, 1e-30]], dtype=torch.float64)
    key = torch.tensor([[0, 5, 2, 9, 1, 3, 4]])
    ranks = lattice.pair_rank(d2, key)
    order = sorted(range(7), key=lambda n: (float(np.float32(d2[0, n])), int(key[0, n])))
    assert torch.argsort(ranks[0]).tolist() == order         # 1 + 1e-9 is 1 in float32: key 1 first


# ---- pyramid -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["visium", "hd", "clustered", "random_negative", "far_apart",
                                  "single"])
def test_build_pyramid_is_repeated_coarsening(name):
    sites, w = SITES[name], 2
    levels = lattice.build_pyramid(sites, 4, w)
    assert len(levels) == 4
    for l, level in enumerate(levels):
        assert isinstance(level, lattice.Level) and level.cache == {}
        assert torch.equal(level.sites, sites)
        assert torch.equal(level.windows, ref_rulebook(sites, w, False)[0])
        assert torch.equal(level.shifted, ref_rulebook(sites, w, True)[0])
        assert torch.equal(level.union, ref_union_rulebook(sites, w))
        if l == 3:
            assert level.parent is None and level.slot is None
            break
        parent_sites, parent, slot = ref_coarsen(sites)
        assert torch.equal(level.parent, parent) and torch.equal(level.slot, slot)
        sites = parent_sites
    assert levels[0].cache is not levels[1].cache


@pytest.mark.parametrize("name", list(SITES))
def test_rowmajor_order_sorts_by_i_then_j(name):
    sites = SITES[name]
    order = lattice.rowmajor_order(sites)
    assert order.tolist() == sorted(range(len(sites)), key=lambda n: tuple(sites[n].tolist()))


def test_build_pyramid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="levels"):
        lattice.build_pyramid(SITES["hd"], 0, 3)


# ---- sub-spot sites and coordinates (HiFusion's intra-spot split) --------------------------------
@pytest.mark.parametrize("name", ["visium", "hd", "clustered", "random_negative", "single"])
@pytest.mark.parametrize("r", [2, 4])
def test_refined_sites_coarsen_back_exactly(name, r):
    """Refine, keep a random subset of sub-positions (at least one per spot), coarsen log2(r) times:
    the parents are the spot sites in row-major order and every sub-site's parent is its own
    spot."""
    sites = SITES[name] - SITES[name].amin(0)                   # model sites are >= 0
    g = torch.Generator().manual_seed(r)
    sub = lattice.refine(sites, r)                              # (N, S, 2)
    for n, (i, j) in enumerate(sites.tolist()):          # the formula, one sub-position at a time
        for s in range(r * r):
            assert sub[n, s].tolist() == [r * i + s // r, r * j + s % r]
    valid = torch.rand(len(sites), r * r, generator=g) < 0.6
    valid[torch.arange(len(sites)), torch.randint(r * r, (len(sites),), generator=g)] = True
    spot = torch.arange(len(sites))[:, None].expand(-1, r * r)[valid]
    level, owner = sub[valid], spot
    for _ in range({2: 1, 4: 2}[r]):
        level, parent, _ = lattice.coarsen(level)
        owner_of_parent = torch.full((len(level),), -1, dtype=torch.long)
        owner_of_parent[parent] = owner
        owner = owner_of_parent
    order = sorted(range(len(sites)), key=lambda n: tuple(sites[n].tolist()))
    assert torch.equal(level, sites[order]) and owner.tolist() == order


def test_sub_offsets_follow_the_coarsening_slot_for_r2():
    sites = torch.tensor([[3, 5]])
    for s, (di, dj) in enumerate(lattice.sub_offsets(2).tolist()):
        child = 2 * sites + torch.tensor([[di, dj]])
        assert lattice.coarsen(child)[2].item() == s
    with pytest.raises(ValueError, match="r must be 2 or 4"):
        lattice.refine(sites, 3)


@pytest.mark.parametrize("r", [2, 4])
def test_sub_coords_are_the_centres_of_the_image_blocks(r):
    """A spot patch of h x w pixels covering `extent` um, centred on the spot: sub-patch s is the
    block img[iy*h/r:(iy+1)*h/r, ix*w/r:(ix+1)*w/r]; its centre in micrometres, computed from pixel
    indices."""
    rng = np.random.default_rng(r)
    coords = torch.tensor(rng.uniform(0, 5000, (5, 2)), dtype=torch.float32)
    h = w = 112
    extent = 77.3
    um_per_px = extent / w
    got = lattice.sub_coords(coords, r, extent)
    for n in range(len(coords)):
        for s in range(r * r):
            ix, iy = s // r, s % r
            cols = np.arange(ix * w // r, (ix + 1) * w // r) + 0.5  # pixel centres of the block
            rows = np.arange(iy * h // r, (iy + 1) * h // r) + 0.5
            centre = np.array([cols.mean(), rows.mean()])
            want = coords[n].double().numpy() + (centre - w / 2) * um_per_px
            np.testing.assert_allclose(got[n, s].double().numpy(), want, rtol=0, atol=1e-3)


# ---- square grids (binning Visium HD bins and legacy ST) -----------------------------------------
def grid_layout(rng, side, pitch, degrees, jitter, gap=0.3):
    """Grid positions ij (kept ones) and their centres: rotated by `degrees`, jittered by `jitter`
    pitches."""
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    ij = np.stack([i.ravel(), j.ravel()], 1)
    band = (ij[:, 0] > side // 3) & (ij[:, 0] < side // 2)
    ij = ij[(rng.random(len(ij)) > gap) & ~band]                                # gaps, a band
    t = math.radians(degrees)
    xy = ij * pitch @ np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]).T
    return ij, torch.tensor(xy + [1234.5, 678.9] + rng.normal(0, jitter * pitch, xy.shape))


@pytest.mark.parametrize("side, pitch, degrees, jitter", [(30, 200.0, 0.0, 0.03),
                                                          (60, 8.0, 7.0, 0.05),
                                                          (120, 8.0, -30.0, 0.03),
                                                          (40, 16.0, 44.0, 0.02)])
def test_square_grid_recovers_the_grid_positions(side, pitch, degrees, jitter):
    ij, xy = grid_layout(np.random.default_rng(side), side, pitch, degrees, jitter)
    site, A, b = lattice.square_grid(xy)
    ij = torch.tensor(ij)
    # the same grid up to one of its 8 symmetries and a translation
    d, e = site - site[0], ij - ij[0]
    sym = [torch.tensor(m) for m in ([[1, 0], [0, 1]], [[0, 1], [-1, 0]], [[-1, 0], [0, -1]],
                                     [[0, -1], [1, 0]])]
    sym += [m @ torch.tensor([[0, 1], [1, 0]]) for m in sym]
    assert any(torch.equal(d, e @ m) for m in sym)
    assert site.amin(0).tolist() == [0, 0]
    np.testing.assert_allclose(A.norm(dim=0).numpy(), [pitch, pitch], rtol=0.01)
    # every spot within a few jitters of its fitted grid position
    assert float((site.double() @ A.T + b - xy).norm(dim=1).max()) < 6 * jitter * pitch


def test_square_grid_refuses_other_layouts():
    i, j = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    hexagonal = np.stack([j.ravel() * 100 + (i.ravel() % 2) * 50,
                          i.ravel() * 100 * math.sqrt(3) / 2], 1)
    for xy in (hexagonal, np.random.default_rng(0).uniform(0, 3000, (400, 2))):
        with pytest.raises(ValueError, match="do not lie on a square grid"):
            lattice.square_grid(torch.tensor(xy))
    ij, xy = grid_layout(np.random.default_rng(1), 20, 10.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="more than one spot"):
        lattice.square_grid(torch.cat([xy, xy[:3] + 0.5]))


def test_square_grid_on_her2st_recovers_the_array_positions(shared_data):
    """Legacy ST (200 um pitch, real registration jitter): the fitted sites are the arrays' own
    positions."""
    import data
    meta = files.read_metadata(shared_data / "her2st" / "metadata.csv")
    for sid in ("A1", "B3", "C6", "F3"):
        h = files.read_h5ad(shared_data / "her2st" / "st" / f"{sid}.h5ad")
        um = h.xy * float(meta[sid]["pixel_size_um_estimated"])
        site, A, _ = lattice.square_grid(torch.tensor(um))
        array = torch.tensor(np.stack([h.obs["array_col"], h.obs["array_row"]], 1).astype(np.int64))
        assert torch.equal(site - site[0], array - array[0]), sid
        np.testing.assert_allclose(A.norm(dim=0).numpy(), [200, 200], rtol=0.02)

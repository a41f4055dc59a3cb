"""attention.py, the reference path, against slow, obviously-correct references written here: loops
over queries, the allowed pairs listed from their definitions (sites grouped into windows with
dicts), softmax by hand, float64, on random inputs. kernels.py's fast forms are held equal to these
in test_kernels.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import lattice
from attention import (GlobalAttention, PairBias, SpotAttention, alibi_slopes, attend,
                       distance_bias, full_attention, knn_attention, signed_softmax,
                       window_attention)
from lattice import knn

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TOL = dict(rtol=1e-5, atol=1e-5)


# ---- references ----------------------------------------------------------------------------------
def softmax_by_hand(x):
    """1-D float64: exp(x - max) / sum."""
    e = torch.exp(x - x.max())
    return e / e.sum()


def ref_weights(s, bias, beta=0.0, tau=1.0):
    """FEAST's signed weights of one query over its allowed keys: scores s (m,), bias (m,),
    float64."""
    s, bias = s.double(), bias.double()
    return softmax_by_hand(s + bias) - beta * softmax_by_hand((bias - s) / tau)


def ref_row(q, keys, values, bias, beta=0.0, tau=1.0):
    """One query q (D,) over its allowed keys (m, D), values (m, Dv), bias (m,) -> (Dv,),
    float64."""
    s = keys.double() @ q.double() / math.sqrt(q.shape[0])
    return ref_weights(s, bias, beta, tau) @ values.double()


def random_sites(n, side, seed=0):
    """n distinct sites in a side x side square (about half full: empty slots in most windows) and
    one isolated site far away (a window of one token)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(side * side, generator=g)[:n]
    sites = torch.stack([flat // side, flat % side], 1)
    return torch.cat([sites, torch.tensor([[side + 20, side + 20]])])


def window_of(site, w, shift):
    """(window (I, J), row-major slot) of a site in the standard or the shifted (by w) partition."""
    i, j = (site[0] + w, site[1] + w) if shift else site
    return (i // (2 * w), j // (2 * w)), (i % (2 * w)) * 2 * w + j % (2 * w)


def window_neighbours(sites, w, shift):
    """For every token, the tokens of its window (itself included), the sites grouped in a dict."""
    groups, key = {}, []
    for n, site in enumerate(sites.tolist()):
        key.append(window_of(site, w, shift)[0])
        groups.setdefault(key[-1], []).append(n)
    return [sorted(groups[k]) for k in key]


def union_neighbours(sites, w):
    """HiST eq. (2): the tokens that share a token's standard window or its shifted window."""
    standard, shifted = window_neighbours(sites, w, False), window_neighbours(sites, w, True)
    return [sorted(set(a) | set(b)) for a, b in zip(standard, shifted)]


def all_offsets(w):
    """{(di, dj): entry of HiST eq. (3)'s table}, row-major over di, dj in [-(2w - 1), 2w - 1]."""
    r = range(-(2 * w - 1), 2 * w)
    return {o: n for n, o in enumerate((di, dj) for di in r for dj in r)}


def table_bias(table, w, sites, n, keys):
    """Bias of query n over keys (list) from one head's table (E,): the entry of the offset
    site_n - site_key."""
    index = all_offsets(w)
    return torch.stack([table[index[tuple((sites[n] - sites[m]).tolist())]] for m in keys])


def slot_bias(bias_h, sites, w, shift, n, keys):
    """Bias of query n over keys (list) from a (S, S) per-slot-pair table of one head."""
    slot = lambda m: window_of(sites[m].tolist(), w, shift)[1]  # noqa: E731
    return torch.stack([bias_h[slot(n), slot(m)] for m in keys])


# ---- signed softmax and attend -------------------------------------------------------------------
@pytest.mark.parametrize("beta,tau", [(0.0, 1.0), (1.5, 0.6), (0.7, 2.0)])
def test_signed_softmax_by_hand(beta, tau):
    s, bias = torch.randn(3, 6, 9, dtype=torch.float64), torch.randn(3, 6, 9, dtype=torch.float64)
    mask = torch.rand(6, 9) < 0.5
    mask[:, 4] = True   # every row needs an allowed key
    mask[2] = False
    mask[2, 7] = True   # a row with a single key
    got = signed_softmax(s, bias, mask, beta, tau)
    want = torch.zeros_like(s)
    for h in range(3):
        for i in range(6):
            keys = mask[i].nonzero().flatten()
            want[h, i, keys] = ref_weights(s[h, i, keys], bias[h, i, keys], beta, tau)
    torch.testing.assert_close(got, want)
    assert (got[:, ~mask] == 0).all()
    torch.testing.assert_close(got.sum(-1), torch.full((3, 6), 1 - beta, dtype=torch.float64))
    if beta:
        assert (got < 0).any()  # negative attention can inhibit
    plain = torch.stack([torch.stack([ref_weights(s[h, i], torch.zeros(9), beta, tau)
                                      for i in range(6)]) for h in range(3)])
    torch.testing.assert_close(signed_softmax(s, None, None, beta, tau), plain)


@pytest.mark.parametrize("beta,tau", [(0.0, 1.0), (1.5, 0.6)])
def test_attend_matches_loops(beta, tau):
    """q (B, H, Lq, D), k and v (B, H, Lk, .), value width other than D; bias (H, Lq, Lk) and mask
    (Lq, Lk) broadcast over the batch."""
    B, H, Lq, Lk, D = 2, 3, 5, 8, 4
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, 6)
    bias, mask = torch.randn(H, Lq, Lk), torch.rand(Lq, Lk) < 0.6
    mask[:, 0] = True
    out = attend(q, k, v, bias, mask, beta, tau)
    assert out.shape == (B, H, Lq, 6)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                keys = mask[i].nonzero().flatten()
                want = ref_row(q[b, h, i], k[b, h, keys], v[b, h, keys], bias[h, i, keys],
                               beta, tau)
                torch.testing.assert_close(out[b, h, i], want.float(), **TOL)


def test_attend_gradcheck():
    q, k, v = (torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 4) < 0.6
    mask[:, 1] = True
    fn = lambda q, k, v, b: attend(q, k, v, b, mask, 1.5, 0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_attend_dropout_drops_weights_and_is_unbiased():
    """With values = the identity, the output is the weights: each is 0 or weight / (1 - p)."""
    H, L, p = 2, 6, 0.4
    q, k = torch.randn(H, L, 4, dtype=torch.float64), torch.randn(H, L, 4, dtype=torch.float64)
    eye = torch.eye(L, dtype=torch.float64).expand(H, L, L)
    weights = attend(q, k, eye, beta=1.5, tau=0.6)
    dropped = attend(q, k, eye, beta=1.5, tau=0.6, dropout_p=p)
    kept = dropped != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p))
    mean = torch.stack([attend(q, k, eye, beta=1.5, tau=0.6, dropout_p=p)
                        for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, weights, atol=0.05, rtol=0)


# ---- biases --------------------------------------------------------------------------------------
def test_alibi_slopes_follow_their_formulas():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -h for h in range(1, 9)]))
    assert torch.allclose(alibi_slopes(2), torch.tensor([2.0 ** -4, 2.0 ** -8]))
    assert torch.allclose(alibi_slopes(1), torch.tensor([2.0 ** -8]))
    # not a power of two: the 4 slopes of H=4, then slopes 1, 3 of H=8 (ALiBi paper, sec. 3)
    six = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8] + [2.0 ** -1, 2.0 ** -3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(six))
    twelve = [2.0 ** -h for h in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    assert torch.allclose(alibi_slopes(12), torch.tensor(twelve))
    for H in (1, 2, 3, 4, 8):  # FEAST's code: 1 / 2^(h + 1), h = 0 .. H - 1
        assert alibi_slopes(H, "feast").tolist() == [1 / 2 ** (h + 1) for h in range(H)]


def test_distance_bias_by_loops():
    xy_q, xy_k, slopes = torch.rand(4, 2) * 10, torch.rand(6, 2) * 10, alibi_slopes(3)
    bias = distance_bias(xy_q, xy_k, slopes)
    assert bias.shape == (3, 4, 6)
    for h in range(3):
        for i in range(4):
            for j in range(6):
                d = math.hypot(*(xy_q[i] - xy_k[j]).tolist())
                assert math.isclose(bias[h, i, j].item(), -slopes[h].item() * d, rel_tol=1e-5)


@pytest.mark.parametrize("w", [1, 2, 3])
def test_pair_bias_rpb_looks_up_the_table_by_offset(w):
    H = 3
    rpb = PairBias("rpb", H, w)
    assert rpb.table.shape == (H, (4 * w - 1) ** 2) and 0.01 < rpb.table.std() < 0.03
    offsets = torch.randint(-(2 * w - 1), 2 * w, (5, 7, 2))
    got = rpb(offsets)
    assert got.shape == (H, 5, 7)
    index = all_offsets(w)
    for h in range(H):
        for a in range(5):
            for b in range(7):
                assert got[h, a, b] == rpb.table[h, index[tuple(offsets[a, b].tolist())]]
    got.sum().backward()  # each entry's gradient: how often its offset was looked up
    counts = torch.zeros((4 * w - 1) ** 2)
    for o in offsets.view(-1, 2).tolist():
        counts[index[tuple(o)]] += 1
    assert torch.equal(rpb.table.grad, counts.expand(H, -1))


def test_pair_bias_alibi_and_none():
    offsets = torch.randint(-5, 6, (4, 9, 2))
    dist = offsets.double().pow(2).sum(-1).sqrt()
    for slopes, groups, want in [("alibi", 1, alibi_slopes(4)),
                                 ("feast", 1, alibi_slopes(4, "feast")),
                                 ("alibi", 2, alibi_slopes(2).repeat(2))]:  # split: each half all
        got = PairBias("alibi", 4, 3, slopes, groups)(offsets)
        assert got.shape == (4, 4, 9)
        for h in range(4):
            torch.testing.assert_close(got[h].double(), -want[h].double() * dist)
    assert PairBias("none", 4, 3)(offsets) is None
    assert not list(PairBias("alibi", 4, 3).parameters())


# ---- window attention ----------------------------------------------------------------------------
def ref_window(q, k, v, neighbours, bias_of, beta=0.0, tau=1.0):
    """q, k, v (N, H, D); neighbours[n]: the keys of query n; bias_of(h, n, keys) -> (m,). Loops."""
    N, H, _ = q.shape
    out = torch.zeros(N, H, v.shape[-1], dtype=torch.float64)
    for n in range(N):
        keys = neighbours[n]
        for h in range(H):
            out[n, h] = ref_row(q[n, h], k[keys, h], v[keys, h], bias_of(h, n, keys), beta, tau)
    return out


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_window_attention_in_one_partition(shift, beta):
    """Each token attends to the tokens of its window: bias by slot pair (any (S, S) table) or none;
    the order of the rulebook's rows does not matter."""
    w, H, D = 2, 3, 4
    sites = random_sites(40, 9)
    N, S = len(sites), 4 * w * w
    book = lattice.window_rulebook(sites, w, shift)[0]
    book = book[torch.randperm(len(book))]
    q, k, v = (torch.randn(N, H, D, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(H, S, S, dtype=torch.float64)
    near = window_neighbours(sites, w, shift)
    got = window_attention(q, k, v, book, book, bias, None, beta, 0.6)
    by_slot = lambda h, n, keys: slot_bias(bias[h], sites, w, shift, n, keys)  # noqa: E731
    want = ref_window(q, k, v, near, by_slot, beta, 0.6)
    torch.testing.assert_close(got, want)
    want = ref_window(q, k, v, near, lambda h, n, keys: torch.zeros(len(keys)), beta, 0.6)
    torch.testing.assert_close(window_attention(q, k, v, book, book, beta=beta, tau=0.6), want)


@pytest.mark.parametrize("w", [1, 2, 3])
@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_window_attention_over_the_union_is_hist_eq2(w, beta):
    """HiST eq. (2): every token attends, in one softmax, to the tokens sharing its standard window
    or its shifted window, with the table entry of their lattice offset as bias; outputs and
    gradients."""
    H, D = 2, 3
    sites = random_sites(60, 11, seed=w)
    N = len(sites)
    level = lattice.build_pyramid(sites, 1, w)[0]
    allowed, offsets = lattice.union_pairs(w)
    q, k, v = (torch.randn(N, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = torch.randn(H, (4 * w - 1) ** 2, dtype=torch.float64, requires_grad=True)
    bias = table[:, lattice.offset_index(offsets, w)]                     # (H, S, 4S)
    got = window_attention(q, k, v, level.windows, level.union, bias, allowed, beta, 0.6)
    want = ref_window(q, k, v, union_neighbours(sites, w),
                      lambda h, n, keys: table_bias(table[h], w, sites, n, keys), beta, 0.6)
    torch.testing.assert_close(got, want)
    dout = torch.randn(N, H, D, dtype=torch.float64)
    for g, r in zip(torch.autograd.grad(got, (q, k, v, table), dout),
                    torch.autograd.grad(want, (q, k, v, table), dout)):
        torch.testing.assert_close(g, r)


# ---- k-NN and full attention ---------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 1.5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_knn_attention_matches_loops(beta, with_bias):
    Nq, Nk, K, H, D = 12, 20, 5, 2, 4
    q, k, v = torch.randn(Nq, H, D), torch.randn(Nk, H, D), torch.randn(Nk, H, D)
    index = torch.stack([torch.randperm(Nk)[:K] for _ in range(Nq)])
    bias = torch.randn(H, Nq, K) if with_bias else None
    out = knn_attention(q, k, v, index, bias, beta, 0.6)
    for i in range(Nq):
        for h in range(H):
            b = bias[h, i] if with_bias else torch.zeros(K)
            want = ref_row(q[i, h], k[index[i], h], v[index[i], h], b, beta, 0.6)
            torch.testing.assert_close(out[i, h], want.float(), **TOL)


@pytest.mark.parametrize("bias", ["alibi", "none"])
@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_full_attention_chunked_equals_dense_loops(bias, beta):
    N, H, D = 23, 4, 8
    q, k, v = (torch.randn(N, H, D, dtype=torch.float64) for _ in range(3))
    xy = torch.randint(0, 9, (N, 2)).double()
    pair = PairBias(bias, H, 3).double()
    slopes = alibi_slopes(H).double()
    out = full_attention(q, k, v, xy, pair, beta, 0.6, chunk=5)
    for i in range(N):
        for h in range(H):
            b = torch.tensor([-slopes[h] * math.dist(xy[i].tolist(), p) if bias == "alibi" else 0.0
                              for p in xy.tolist()], dtype=torch.float64)
            torch.testing.assert_close(out[i, h], ref_row(q[i, h], k[:, h], v[:, h], b, beta, 0.6))
    torch.testing.assert_close(full_attention(q, k, v, xy, pair, beta, 0.6), out)  # one chunk
    assert full_attention(q[:0], k[:0], v[:0], xy[:0], pair).shape == (0, H, D)


# ---- SpotAttention -------------------------------------------------------------------------------
MODES = [("window", "split"), ("window", "union"), ("knn", "split"), ("full", "split")]


def spot_reference(m, x, sites, knn_index):
    """SpotAttention by definition with the module's own weights, float64: per query and head, the
    keys of its mode (split windows: heads < H/2 their standard window, the others their shifted
    window; union: HiST eq. (2); knn: knn_index; full: all) and the bias of the lattice offset
    query - key (rpb: the head's table entry; alibi: -m_h * distance, split windows giving each
    half of the heads every slope)."""
    N, H = x.shape[0], m.heads
    qkv = x.double() @ m.qkv.weight.double().T + m.qkv.bias.double()
    q, k, v = qkv.view(N, 3, H, -1).unbind(1)
    split = m.mode == "window" and m.windows == "split"
    slopes = alibi_slopes(H // 2).repeat(2) if split else alibi_slopes(H)
    near = {"knn": lambda h: knn_index.tolist(), "full": lambda h: [list(range(N))] * N,
            "window": lambda h: (window_neighbours(sites, m.w, h >= H // 2) if split
                                 else union_neighbours(sites, m.w))}[m.mode]

    def bias_of(h, n, keys):
        if m.bias.kind == "rpb":
            return table_bias(m.bias.table[h].detach().double(), m.w, sites, n, keys)
        d = torch.tensor([math.dist(sites[n].tolist(), sites[j].tolist()) for j in keys])
        return -slopes[h].double() * d if m.bias.kind == "alibi" else torch.zeros(len(keys))

    out = torch.zeros(N, H, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        hs = slice(h, h + 1)
        out[:, hs] = ref_window(q[:, hs], k[:, hs], v[:, hs], near(h),
                                lambda _, n, keys: bias_of(h, n, keys), m.beta, m.tau)
    return out.reshape(N, -1).float()


@pytest.mark.parametrize("mode,windows,bias", [(m, w, b) for m, w in MODES
                                                for b in ("rpb", "alibi", "none")
                                                if b != "rpb" or m == "window"])  # rpb: windows
@pytest.mark.parametrize("signed", [False, True])
def test_spot_attention_against_its_definition(mode, windows, bias, signed):
    w, H, dim = 2, 4, 16
    sites = random_sites(45, 9)
    level = lattice.build_pyramid(sites, 1, w)[0]
    m = SpotAttention(dim, H, mode, w, bias, signed, beta=1.5, tau=0.6, windows=windows)
    if bias == "rpb":
        m.bias.table.data.normal_()  # make the table matter
    x = torch.randn(len(sites), dim)
    index = knn(sites.float(), sites.float(), 6) if mode == "knn" else None
    out = m(x, level, index)
    assert out.shape == (len(sites), dim)
    torch.testing.assert_close(out, spot_reference(m, x, sites, index), **TOL)


def test_spot_attention_feast_slopes():
    sites = random_sites(30, 8)
    level = lattice.build_pyramid(sites, 1, 2)[0]
    m = SpotAttention(8, 2, "full", bias="alibi", signed=True, slopes="feast")
    x = torch.randn(len(sites), 8)
    N = len(sites)
    qkv = x.double() @ m.qkv.weight.double().T + m.qkv.bias.double()
    q, k, v = qkv.view(N, 3, 2, -1).unbind(1)
    want = torch.zeros(N, 2, 4, dtype=torch.float64)
    for n in range(N):
        d = torch.tensor([math.dist(sites[n].tolist(), s) for s in sites.tolist()],
                         dtype=torch.float64)
        for h in range(2):
            want[n, h] = ref_row(q[n, h], k[:, h], v[:, h], -d / 2 ** (h + 1), 1.5, 0.6)
    torch.testing.assert_close(m(x, level), want.view(N, -1).float(), **TOL)


@pytest.mark.parametrize("mode,windows", MODES)
def test_query_keys_are_the_keys_of_the_definition(mode, windows):
    """For each token: its keys (every token some head attends to, each once), their offsets
    (query - key) and which heads attend to each (split: a half per partition)."""
    w, H = 2, 4
    sites = random_sites(45, 9)
    level = lattice.build_pyramid(sites, 1, w)[0]
    m = SpotAttention(16, H, mode, w, "alibi", windows=windows)
    index = knn(sites.float(), sites.float(), 6) if mode == "knn" else None
    standard, shifted = window_neighbours(sites, w, False), window_neighbours(sites, w, True)
    union = union_neighbours(sites, w)
    for n in range(len(sites)):
        keys, offsets, attends = m.query_keys(level, n, index)
        assert len(set(keys.tolist())) == len(keys) and attends.shape == (H, len(keys))
        torch.testing.assert_close(offsets.double(), (sites[n] - sites[keys]).double())
        for c, key in enumerate(keys.tolist()):
            if mode == "window" and windows == "split":
                want = [key in standard[n]] * (H // 2) + [key in shifted[n]] * (H // 2)
            else:
                want = [True] * H
            assert attends[:, c].tolist() == want
        want = {"knn": index[n].tolist() if index is not None else None, "full": range(len(sites)),
                "window": union[n]}[mode]
        assert sorted(keys.tolist()) == sorted(want)


def test_spot_attention_none_errors_and_old_checkpoints():
    sites = random_sites(20, 6)
    level = lattice.build_pyramid(sites, 1, 2)[0]
    x = torch.randn(len(sites), 8)
    none = SpotAttention(8, 2, mode="none")
    assert torch.equal(none(x, level), torch.zeros_like(x)) and not list(none.parameters())
    with pytest.raises(ValueError, match="even"):
        SpotAttention(24, 3, mode="window")
    SpotAttention(24, 3, mode="window", windows="union")  # union: every head sees both partitions
    with pytest.raises(ValueError, match="rpb"):
        SpotAttention(8, 2, mode="full", bias="rpb")
    with pytest.raises(ValueError, match="mode"):
        SpotAttention(8, 2, mode="dense")
    m = SpotAttention(8, 2, "window", 2, "rpb")
    state = {k.replace("bias.table", "rpb.table"): torch.randn_like(t)
             for k, t in m.state_dict().items()}
    m.load_state_dict(state)  # a checkpoint from before the bias was one PairBias
    assert torch.equal(m.bias.table, state["rpb.table"])


# ---- global tokens -------------------------------------------------------------------------------
def global_reference(m, x, tokens):
    """Tokens attend over [spots if p2h; tokens if p2p] in one softmax, then the projection; spots
    attend over the tokens (h2p). Loops, float64 -> (spots' read (N, dim), the tokens' update
    (T, dim))."""
    lin = lambda layer, t: t.double() @ layer.weight.double().T + layer.bias.double()  # noqa: E731
    N, T, H, dim = x.shape[0], tokens.shape[0], m.heads, m.dim
    Dh = dim // H
    x_out = torch.zeros(N, dim, dtype=torch.float64)
    update = torch.zeros(T, dim, dtype=torch.float64)
    if m.h2p:
        q, (k, v) = lin(m.q_spot, x), lin(m.kv_token, tokens).chunk(2, -1)
        for i in range(N):
            for h in range(H):
                hd = slice(h * Dh, (h + 1) * Dh)
                x_out[i, hd] = ref_row(q[i, hd], k[:, hd], v[:, hd], torch.zeros(T))
    if m.p2h or m.p2p:
        context = torch.cat(([x] if m.p2h else []) + ([tokens] if m.p2p else []))
        q, (k, v) = lin(m.q_token, tokens), lin(m.kv_context, context).chunk(2, -1)
        for t in range(T):
            for h in range(H):
                hd = slice(h * Dh, (h + 1) * Dh)
                update[t, hd] = ref_row(q[t, hd], k[:, hd], v[:, hd], torch.zeros(len(context)))
        update = lin(m.proj, update)
    return x_out, update


def test_global_attention_quadrants_against_reference():
    N, T, H, dim = 20, 3, 2, 8
    x, tokens = torch.randn(N, dim), torch.randn(T, dim)
    updates = {}
    for switches in [(1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1), (0, 0, 0)]:
        torch.manual_seed(1)  # the same weights for every variant
        m = GlobalAttention(dim, H, *map(bool, switches))
        ref_x, ref_update = global_reference(m, x, tokens)
        torch.testing.assert_close(m.spots_read_tokens(x, tokens), ref_x.float(), **TOL)
        torch.testing.assert_close(m.tokens_read(x, tokens), ref_update.float(), **TOL)
        updates[switches] = m.tokens_read(x, tokens)
    assert not torch.allclose(updates[1, 1, 1], updates[0, 1, 1])  # p2h matters
    assert not torch.allclose(updates[1, 1, 1], updates[1, 0, 1])  # p2p matters
    assert (updates[0, 0, 1] == 0).all() and (updates[0, 0, 0] == 0).all()  # tokens pass through
    with pytest.raises(ValueError, match="divisible"):
        GlobalAttention(10, 3)

"""attention.py against slow, obviously-correct references: explicit loops over queries and explicit lists
of allowed pairs, softmax by hand, float64."""
import math
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import attention
import lattice
from attention import (GlobalAttention, RelativePositionBias, SpotAttention, alibi_slopes, distance_bias,
                       full_attention, knn, knn_attention, signed_attention, signed_weights, window_attention)

TOL = dict(rtol=1e-5, atol=1e-5)


# ---- references ------------------------------------------------------------------------------------
def softmax_by_hand(x):
    e = torch.exp(x - x.max())
    return e / e.sum()


def ref_row(q, keys, values, bias, beta=0.0, tau=1.0):
    """One query q (D,) over its allowed keys (m, D) and values (m, Dv) with bias (m,), in float64."""
    if len(keys) == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64)
    s = keys.double() @ q.double() / math.sqrt(q.shape[0])
    w = softmax_by_hand(s + bias.double()) - beta * softmax_by_hand((-s + bias.double()) / tau)
    return w @ values.double()


def ref_dense(q, k, v, allowed, bias, beta=0.0, tau=1.0):
    """q (H, Lq, D), k and v (H, Lk, D), allowed bool (Lq, Lk), bias (H, Lq, Lk) -> (H, Lq, Dv), loops."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for h in range(q.shape[0]):
        for i in range(q.shape[1]):
            keys = allowed[i].nonzero().flatten()
            out[h, i] = ref_row(q[h, i], k[h, keys], v[h, keys], bias[h, i, keys], beta, tau)
    return out


def partition(sites, w, shift):
    """Window rulebook by definition: window = ((i+shift)//2w, (j+shift)//2w), slot row-major inside."""
    groups = {}
    for n, (i, j) in enumerate(sites.tolist()):
        a, b = i + shift, j + shift
        groups.setdefault((a // (2 * w), b // (2 * w)), {})[(a % (2 * w)) * 2 * w + b % (2 * w)] = n
    rulebook = torch.full((len(groups), 4 * w * w), -1)
    for r, key in enumerate(sorted(groups)):
        for slot, n in groups[key].items():
            rulebook[r, slot] = n
    return rulebook[torch.randperm(len(rulebook))]


def random_sites(n, side):
    """n distinct lattice sites in a side x side square, plus one isolated site (a window of one token)."""
    flat = torch.randperm(side * side)[:n]
    sites = torch.stack([flat // side, flat % side], 1)
    return torch.cat([sites, torch.tensor([[side + 20, side + 20]])])


def random_rulebook(N, W, S):
    """N tokens in random slots of W windows (-1 elsewhere); first window holds one token, last is empty."""
    slots = torch.randperm((W - 2) * S)[: N - 1] + S
    rulebook = torch.full((W * S,), -1)
    rulebook[slots] = torch.randperm(N - 1) + 1
    rulebook[3] = 0
    return rulebook.view(W, S)


def window_pairs(rulebook):
    """Explicit list of allowed (query, key, query slot, key slot) pairs: tokens sharing a window."""
    pairs = []
    for row in rulebook.tolist():
        filled = [(s, t) for s, t in enumerate(row) if t >= 0]
        pairs += [(a, b, sa, sb) for sa, a in filled for sb, b in filled]
    return pairs


def ref_window(q, k, v, rulebook, bias, beta=0.0, tau=1.0):
    """q, k, v (N, H, D), bias (H, S, S): per query, attention over its pair list."""
    by_query = {}
    for a, b, sa, sb in window_pairs(rulebook):
        by_query.setdefault(a, []).append((b, sa, sb))
    N, H, _ = q.shape
    out = torch.zeros(N, H, v.shape[-1], dtype=torch.float64)
    for a, lst in by_query.items():
        keys = torch.tensor([b for b, _, _ in lst])
        for h in range(H):
            b = torch.stack([bias[h, sa, sb] for _, sa, sb in lst]) if bias is not None else torch.zeros(len(lst))
            out[a, h] = ref_row(q[a, h], k[keys, h], v[keys, h], b, beta, tau)
    return out


class measure_peak(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the block (inputs excluded): every tensor an aten op
    returns that does not alias one of its arguments (views, in-place ops) is new until it is freed.
    Buffers private to a fused kernel are not seen."""

    def __init__(self):
        super().__init__()
        self.now, self.peak, self.live = 0, 0, set()

    def _free(self, key, nbytes):
        self.live.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
        seen = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        for t in tensors(out):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live and key not in seen:
                self.live.add(key)
                self.now += storage.nbytes()
                weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.now)
        return out


# ---- signed attention ------------------------------------------------------------------------------
def test_signed_attention_beta0_is_sdpa_in_one_call(monkeypatch):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    bias, mask = torch.randn(3, 5, 7), torch.rand(5, 7) < 0.7
    mask[:, 0] = True  # every row has a key: sdpa is then well defined
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf")))
    calls = []
    sdpa = F.scaled_dot_product_attention
    counting = lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    torch.testing.assert_close(signed_attention(q, k, v, bias, mask), expected, **TOL)
    torch.testing.assert_close(signed_attention(q, k, v), sdpa(q, k, v), **TOL)
    torch.testing.assert_close(signed_attention(q, k, v, mask=mask), sdpa(q, k, v, attn_mask=mask), **TOL)
    assert len(calls) == 3
    signed_attention(q, k, v, bias, mask, beta=1.5, tau=0.6)
    assert len(calls) == 5


@pytest.mark.parametrize("beta,tau", [(0.0, 1.0), (1.5, 0.6), (0.7, 2.0)])
def test_signed_attention_matches_loops(beta, tau):
    H, Lq, Lk, D = 3, 9, 11, 8
    q, k, v = torch.randn(H, Lq, D), torch.randn(H, Lk, D), torch.randn(H, Lk, 5)
    bias, mask = torch.randn(H, Lq, Lk), torch.rand(Lq, Lk) < 0.5
    mask[2] = False  # an isolated query
    mask[4] = False
    mask[4, 6] = True  # a query with a single key
    out = signed_attention(q, k, v, bias, mask, beta, tau)
    torch.testing.assert_close(out, ref_dense(q, k, v, mask, bias, beta, tau).float(), **TOL)
    assert (out[:, 2] == 0).all()


def test_signed_weights_rows_sum_to_one_minus_beta():
    H, Lq, Lk, D, beta, tau = 2, 6, 9, 4, 1.5, 0.6
    q, k = torch.randn(H, Lq, D, dtype=torch.float64), torch.randn(H, Lk, D, dtype=torch.float64)
    bias, mask = torch.randn(H, Lq, Lk, dtype=torch.float64), torch.rand(Lq, Lk) < 0.6
    mask[1] = False
    eye = torch.eye(Lk, dtype=torch.float64).expand(H, Lk, Lk)  # v = identity: the output is the weights
    weights = signed_attention(q, k, eye, bias, mask, beta, tau)  # (H, Lq, Lk)
    rows = weights.sum(-1)
    assert torch.allclose(rows[:, mask.any(1)], torch.tensor(1 - beta, dtype=torch.float64))
    assert (rows[:, 1] == 0).all() and (weights[:, ~mask] == 0).all()
    torch.testing.assert_close(signed_weights(q, k, bias, mask, beta, tau), weights)
    assert (weights < 0).any()  # negative attention can inhibit


def test_signed_attention_gradcheck_and_no_nan_on_empty_rows():
    q = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    bias, mask = torch.randn(2, 4, 5, dtype=torch.float64), torch.rand(4, 5) < 0.6
    mask[0], mask[1, 2] = False, True
    fn = lambda q, k, v: signed_attention(q, k, v, bias, mask, beta=1.5, tau=0.6)
    assert torch.autograd.gradcheck(fn, (q, k, v))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    signed_attention(qf, kf, vf, bias.float(), mask, 1.5, 0.6).square().sum().backward()
    assert all(t.grad.isfinite().all() and t.grad.abs().sum() > 0 for t in (qf, kf, vf))
    assert (qf.grad[:, 0] == 0).all()


# ---- ALiBi -----------------------------------------------------------------------------------------
def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -h for h in range(1, 9)]))
    assert torch.allclose(alibi_slopes(2), torch.tensor([2.0 ** -4, 2.0 ** -8]))
    # not a power of two: the 4 slopes of H=4, then slopes 1, 3 of H=8 (ALiBi paper, sec. 3)
    six = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8] + [2.0 ** -1, 2.0 ** -3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(six))
    twelve = [2.0 ** -h for h in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    assert torch.allclose(alibi_slopes(12), torch.tensor(twelve))


def test_distance_bias_by_loops():
    xy_q, xy_k, slopes = torch.rand(4, 2) * 10, torch.rand(6, 2) * 10, alibi_slopes(3)
    bias = distance_bias(xy_q, xy_k, slopes)
    assert bias.shape == (3, 4, 6)
    for h in range(3):
        for i in range(4):
            for j in range(6):
                d = math.hypot(*(xy_q[i] - xy_k[j]).tolist())
                assert math.isclose(bias[h, i, j].item(), -slopes[h].item() * d, rel_tol=1e-5)


# ---- window attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("beta,max_pairs", [(0.0, 8192), (1.5, 20)])
def test_window_attention_matches_pair_list(shift, beta, max_pairs):
    w, H, D = 2, 3, 4
    sites = random_sites(40, 9)  # ~50% occupancy: empty slots, plus one isolated token
    N, S = len(sites), 4 * w * w
    rulebook = partition(sites, w, shift)  # standard (shift 0) or shifted (shift w) windows
    assert (rulebook >= 0).sum(1).min() == 1
    q, k, v = torch.randn(N, H, D), torch.randn(N, H, D), torch.randn(N, H, D)
    bias = torch.randn(H, S, S)
    batches = lattice.window_batches(rulebook, max_pairs=max_pairs)  # 20: a batch per window or two
    out = window_attention(q, k, v, batches, bias, beta=beta, tau=0.6)
    torch.testing.assert_close(out, ref_window(q, k, v, rulebook, bias, beta, 0.6).float(), **TOL)
    ref = ref_window(q, k, v, rulebook, None).float()
    torch.testing.assert_close(window_attention(q, k, v, rulebook, None), ref, **TOL)


def test_window_attention_gradients_match_the_reference():
    """Backward (written by hand) against autograd through the loop reference, for q, k, v and the bias;
    random rulebook with a one-token window, an empty window and a token in no window."""
    N, W, S, H, D = 13, 6, 5, 2, 3
    rulebook = random_rulebook(N - 1, W, S)  # token N - 1 is in no window: output and gradients 0
    x = [torch.randn(N, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    bias = torch.randn(H, S, S, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(N, H, D, dtype=torch.float64)
    for beta in (0.0, 1.5):
        out = window_attention(*x, lattice.window_batches(rulebook, max_pairs=8), bias, beta=beta, tau=0.6)
        ref = ref_window(*x, rulebook, bias, beta, 0.6)
        torch.testing.assert_close(out, ref)
        got = torch.autograd.grad(out, [*x, bias], dout)
        want = torch.autograd.grad(ref, [*x, bias], dout)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)
        assert all((g[N - 1] == 0).all() for g in got[:3])


def test_window_attention_gradcheck_and_dropout():
    N, W, S, H, D = 12, 5, 4, 2, 2
    rulebook = random_rulebook(N, W, S)
    x = [torch.randn(N, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    bias = torch.randn(H, S, S, dtype=torch.float64, requires_grad=True)
    batches = lattice.window_batches(rulebook, max_pairs=4)
    fn = lambda q, k, v, b: window_attention(q, k, v, batches, b, 1.5, 0.6)
    assert torch.autograd.gradcheck(fn, (*x, bias))

    def dropped(q, k, v, b):  # the same dropout mask on every call: reseed before each
        torch.manual_seed(7)
        return window_attention(q, k, v, batches, b, 1.5, 0.6, dropout_p=0.4)
    assert torch.autograd.gradcheck(dropped, (*x, bias))
    assert not torch.allclose(dropped(*x, bias), fn(*x, bias))  # some weights were dropped
    # dropout is unbiased: averaged over many masks, the output approaches the one without dropout
    with torch.no_grad():
        mean = torch.stack([window_attention(*x, batches, bias, 1.5, 0.6, dropout_p=0.4) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, fn(*x, bias).detach(), atol=0.08, rtol=0)


# ---- k-NN --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_equals_brute_force(integer, exclude_self):
    xy = torch.randint(0, 12, (150, 2)) if integer else torch.rand(150, 2) * 12  # integers: many ties
    index = knn(xy, xy, 7, exclude_self=exclude_self, chunk=16)
    assert index.shape == (150, 7)
    for i in range(150):
        d = [math.dist(xy[i].tolist(), xy[j].tolist()) for j in range(150) if not (exclude_self and j == i)]
        got = sorted(math.dist(xy[i].tolist(), xy[j].tolist()) for j in index[i].tolist())
        assert len(set(index[i].tolist())) == 7 and (not exclude_self or i not in index[i].tolist())
        assert got == pytest.approx(sorted(d)[:7])


def test_knn_clamps_k_to_the_number_of_keys():
    xy_q, xy_k = torch.rand(5, 2), torch.rand(3, 2)
    assert knn(xy_q, xy_k, 10).shape == (5, 3)
    assert sorted(knn(xy_k, xy_k, 10, exclude_self=True)[0].tolist()) == [1, 2]
    torch.testing.assert_close(knn(xy_q, xy_k, 2), knn(xy_q, xy_k, 2, chunk=1))


@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_knn_attention_matches_loops(beta):
    Nq, Nk, K, H, D = 12, 20, 5, 2, 4
    q, k, v = torch.randn(Nq, H, D), torch.randn(Nk, H, D), torch.randn(Nk, H, D)
    index, bias = torch.stack([torch.randperm(Nk)[:K] for _ in range(Nq)]), torch.randn(H, Nq, K)
    out = knn_attention(q, k, v, index, bias, beta, 0.6)
    ref = torch.zeros(Nq, H, D, dtype=torch.float64)
    for i in range(Nq):
        for h in range(H):
            ref[i, h] = ref_row(q[i, h], k[index[i], h], v[index[i], h], bias[h, i], beta, 0.6)
    torch.testing.assert_close(out, ref.float(), **TOL)
    torch.testing.assert_close(knn_attention(q, k, v, index, bias, beta, 0.6, chunk=5), out, **TOL)


def test_knn_and_full_attention_gradcheck_when_chunked():
    q, k, v = (torch.randn(5, 1, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    index, xy = torch.stack([torch.randperm(5)[:3] for _ in range(5)]), torch.rand(5, 2, dtype=torch.float64)
    bias, slopes = torch.randn(1, 5, 3, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    knn_fn = lambda q, k, v: knn_attention(q, k, v, index, bias, 1.5, 0.6, chunk=2)
    full_fn = lambda q, k, v: full_attention(q, k, v, xy, slopes, 1.5, 0.6, chunk=2)
    assert torch.autograd.gradcheck(knn_fn, (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(full_fn, (q, k, v), fast_mode=True)


# ---- full attention ----------------------------------------------------------------------------------
def test_full_attention_chunked_equals_dense_reference_with_alibi():
    N, H, D = 37, 4, 8
    q, k, v, xy = torch.randn(N, H, D), torch.randn(N, H, D), torch.randn(N, H, D), torch.rand(N, 2) * 10
    slopes = alibi_slopes(H)
    bias = torch.stack([torch.tensor([[-slopes[h].item() * math.dist(a, b) for b in xy.tolist()]
                                      for a in xy.tolist()]) for h in range(H)])  # (H, N, N)
    tr = lambda t: t.transpose(0, 1)
    ref = tr(ref_dense(tr(q), tr(k), tr(v), torch.ones(N, N, dtype=torch.bool), bias, 1.5, 0.6)).float()
    chunked = full_attention(q, k, v, xy, slopes, beta=1.5, tau=0.6, chunk=5)
    torch.testing.assert_close(chunked, ref, **TOL)
    torch.testing.assert_close(full_attention(q, k, v, xy, slopes, beta=1.5, tau=0.6), chunked, **TOL)
    plain = tr(F.scaled_dot_product_attention(tr(q), tr(k), tr(v)))
    torch.testing.assert_close(full_attention(q, k, v, chunk=6), plain, **TOL)


def test_full_attention_chunk_bounds_peak_memory():
    N, H, D = 1200, 4, 8
    q, k, v, xy = torch.randn(N, H, D), torch.randn(N, H, D), torch.randn(N, H, D), torch.rand(N, 2)
    peaks = {}
    for chunk in (N, 150):
        with torch.no_grad(), measure_peak() as m:
            full_attention(q, k, v, xy, alibi_slopes(H), beta=1.5, chunk=chunk)
        peaks[chunk] = m.peak
    print(f"full_attention N={N} H={H}: peak {peaks[N] / 2**20:.1f} MiB unchunked, "
          f"{peaks[150] / 2**20:.1f} MiB chunk=150")
    assert peaks[N] > 4 * N * N * H  # the (H, N, N) bias exists once unchunked
    assert peaks[150] < peaks[N] / 6


# ---- modules -----------------------------------------------------------------------------------------
def rel_index(w):
    """(S, S) relative-offset index by its definition: (ia - ib + 2w - 1) * (4w - 1) + (ja - jb + 2w - 1)."""
    S = 4 * w * w
    r = 2 * w
    return torch.tensor([[(a // r - b // r + r - 1) * (4 * w - 1) + (a % r - b % r + r - 1) for b in range(S)]
                         for a in range(S)])


def test_relative_position_bias_looks_up_the_table():
    rpb = RelativePositionBias(3, 2)
    assert rpb.table.shape == (3, 49) and 0.01 < rpb.table.std() < 0.03
    torch.testing.assert_close(rpb(), rpb.table[:, rel_index(2)])


def spot_reference(module, x, level, bias_of_head):
    """Window-mode reference with the module's own qkv weights: head h < H/2 over the standard pair list,
    the others over the shifted pair list; bias_of_head(h) -> (S, S)."""
    N, H = x.shape[0], module.heads
    q, k, v = (x.double() @ module.qkv.weight.double().T + module.qkv.bias.double()).view(N, 3, H, -1).unbind(1)
    out = torch.zeros(N, H, q.shape[-1], dtype=torch.float64)
    for h in range(H):
        rulebook = level.rulebook if h < H // 2 else level.rulebook_shifted
        bias = bias_of_head(h).double()[None]
        one = slice(h, h + 1)
        out[:, one] = ref_window(q[:, one], k[:, one], v[:, one], rulebook, bias, module.beta, module.tau)
    return out.view(N, -1).float()


@pytest.mark.parametrize("bias", ["rpb", "alibi", "none"])
def test_spot_attention_window_splits_heads_between_partitions(bias):
    w, H, dim = 2, 4, 16
    sites = random_sites(45, 9)
    level = lattice.Level(sites, lattice.window_rulebook(sites, w), lattice.window_rulebook(sites, w, shift=True))
    module = SpotAttention(dim, H, mode="window", w=w, bias=bias, signed=True, beta=1.5, tau=0.6, chunk=4)
    x = torch.randn(len(sites), dim)
    offsets = torch.tensor([[s // (2 * w), s % (2 * w)] for s in range(4 * w * w)], dtype=torch.float64)
    if bias == "rpb":
        module.rpb.table.data.normal_()  # make the table matter
        bias_of_head = lambda h: module.rpb.table[h].detach()[rel_index(w)]
    elif bias == "alibi":  # each half gets the full range of H/2 = 2 slopes: 2^-4, 2^-8
        bias_of_head = lambda h: -(2.0 ** (-4 * (h % 2 + 1))) * torch.cdist(offsets, offsets)
    else:
        bias_of_head = lambda h: torch.zeros(4 * w * w, 4 * w * w)
    out, info = module(x.__getitem__, len(x), level, return_attention=True)  # q, k, v projected per batch
    by_definition = SimpleNamespace(rulebook=partition(sites, w, 0), rulebook_shifted=partition(sites, w, w))
    torch.testing.assert_close(out, spot_reference(module, x, by_definition, bias_of_head), **TOL)
    with torch.no_grad():  # inference projects q, k, v per window batch
        torch.testing.assert_close(module(x.__getitem__, len(x), level), out.detach(), **TOL)
    for part in ("standard", "shifted"):  # weights of the first window: rows of filled slots sum to 1 - beta
        weights, filled = info[part]["weights"], info[part]["tokens"] >= 0
        assert weights.shape == (H // 2, 4 * w * w, 4 * w * w) and (weights[:, ~filled] == 0).all()
        assert torch.allclose(weights.sum(-1)[:, filled], torch.tensor(-0.5))


def test_spot_attention_knn_full_none_and_errors():
    N, H, dim, K = 25, 2, 8, 6
    sites = torch.randint(0, 10, (N, 2))
    level = SimpleNamespace(sites=sites)
    x = torch.randn(N, dim)
    index = knn(sites, sites, K)
    dist = torch.cdist(sites.double(), sites.double())  # (N, N)
    for mode in ("knn", "full"):
        module = SpotAttention(dim, H, mode=mode, bias="alibi", signed=True)
        qkv = x.double() @ module.qkv.weight.double().T + module.qkv.bias.double()
        q, k, v = qkv.view(N, 3, H, -1).unbind(1)
        ref = torch.zeros(N, H, dim // H, dtype=torch.float64)
        for i in range(N):
            keys = index[i] if mode == "knn" else torch.arange(N)
            for h in range(H):
                bias = -(2.0 ** (-4 * (h + 1))) * dist[i, keys]  # alibi_slopes(2) = 2^-4, 2^-8
                ref[i, h] = ref_row(q[i, h], k[keys, h], v[keys, h], bias, 1.5, 0.6)
        out, info = module(x.__getitem__, N, level, knn_index=index, return_attention=True)
        torch.testing.assert_close(out, ref.view(N, dim).float(), **TOL)
        assert torch.allclose(info["weights"].sum(-1), torch.tensor(-0.5))
    none = SpotAttention(dim, H, mode="none")
    assert (none(x.__getitem__, N, level) == 0).all() and none(x.__getitem__, N, level).shape == (N, dim)
    with pytest.raises(ValueError, match="even"):
        SpotAttention(dim * 3, 3, mode="window")
    with pytest.raises(ValueError, match="rpb"):
        SpotAttention(dim, H, mode="full", bias="rpb")
    with pytest.raises(ValueError, match="knn_index"):
        SpotAttention(dim, H, mode="knn", bias="none")(x.__getitem__, N, level)


def global_reference(m, x, tokens, dtype=torch.float32):
    """Tokens attend over [spots if p2h; tokens if p2p] in one softmax; spots attend over tokens. Loops."""
    lin = lambda layer, t: t.double() @ layer.weight.double().T + layer.bias.double()
    N, T, H, dim = x.shape[0], tokens.shape[0], m.heads, m.dim
    Dh = dim // H
    x_out, tokens_out = torch.zeros(N, dim, dtype=torch.float64), tokens.double().clone()
    if m.h2p:
        q, (k, v) = lin(m.q_spot, x), lin(m.kv_token, tokens).chunk(2, -1)
        for i in range(N):
            for h in range(H):
                hd = slice(h * Dh, (h + 1) * Dh)
                x_out[i, hd] = ref_row(q[i, hd], k[:, hd], v[:, hd], torch.zeros(T))
    if m.p2h or m.p2p:
        context = torch.cat(([x] if m.p2h else []) + ([tokens] if m.p2p else []))
        q, (k, v) = lin(m.q_token, tokens), lin(m.kv_context, context).chunk(2, -1)
        upd = torch.zeros(T, dim, dtype=torch.float64)
        for t in range(T):
            for h in range(H):
                hd = slice(h * Dh, (h + 1) * Dh)
                upd[t, hd] = ref_row(q[t, hd], k[:, hd], v[:, hd], torch.zeros(len(context)))
        tokens_out = tokens_out + lin(m.proj, upd)
    return x_out.to(dtype), tokens_out.to(dtype)


def global_attention(m, x, tokens):
    """The spots' read of the tokens (h2p) and the tokens after their read of [spots; tokens] (p2h, p2p)."""
    return m.spots_read_tokens(x, tokens), tokens + m.tokens_read(x.__getitem__, len(x), tokens)


def test_global_attention_quadrants_against_reference(monkeypatch):
    """The tokens read the spots in chunks of 7 (online softmax over 3 chunks, then the tokens)."""
    monkeypatch.setattr(attention, "CHUNK", 7)
    N, T, H, dim = 20, 3, 2, 8
    x, tokens = torch.randn(N, dim), torch.randn(T, dim)
    outputs = {}
    for switches in [(1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1)]:
        torch.manual_seed(1)  # same weights for every variant
        m = GlobalAttention(dim, H, *map(bool, switches))
        x_out, tokens_out = global_attention(m, x, tokens)
        ref_x, ref_tokens = global_reference(m, x, tokens)
        torch.testing.assert_close(x_out, ref_x, **TOL)
        torch.testing.assert_close(tokens_out, ref_tokens, **TOL)
        outputs[switches] = tokens_out
    assert not torch.allclose(outputs[1, 1, 1], outputs[0, 1, 1])  # p2h matters
    assert not torch.allclose(outputs[1, 1, 1], outputs[1, 0, 1])  # p2p matters
    assert (global_attention(GlobalAttention(dim, H, h2p=False), x, tokens)[0] == 0).all()  # h2p off: nothing
    assert torch.equal(outputs[0, 0, 1], tokens)  # neither p2h nor p2p: tokens pass through


def test_global_attention_keeps_float64_in_float64(monkeypatch):
    """The tokens' online softmax accumulates in float32 at least, not at most: a float64 module is float64
    throughout (the CUDA tests compare float64 on both devices at float64 precision)."""
    monkeypatch.setattr(attention, "CHUNK", 7)
    m = GlobalAttention(8, 2).double()
    x, tokens = torch.randn(20, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    x_out, tokens_out = global_attention(m, x, tokens)
    ref_x, ref_tokens = global_reference(m, x, tokens, dtype=torch.float64)
    torch.testing.assert_close(x_out, ref_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tokens_out, ref_tokens, rtol=1e-12, atol=1e-12)


def test_global_attention_is_linear_in_spots():
    N, T, dim = 20000, 4, 16
    m = GlobalAttention(dim, 2)
    with torch.no_grad(), measure_peak() as mem:
        global_attention(m, torch.randn(N, dim), torch.randn(T, dim))
    assert mem.peak < 40 * N * dim * 4  # a few (N, dim) tensors; an (N+T)^2 mask would be 1.6 GB


# ---- memory scaling ----------------------------------------------------------------------------------
def test_window_and_knn_attention_peak_memory_grows_linearly():
    H, D, w, K = 2, 8, 3, 8
    S, rows = 4 * w * w, []
    for N in (10_000, 40_000, 160_000):
        x = [torch.randn(N, H, D, requires_grad=True) for _ in range(3)]
        rulebook = random_rulebook(N, N // 18 + 2, S)  # ~50% occupancy, as on a Visium lattice
        batches = lattice.window_batches(rulebook)
        with torch.no_grad(), measure_peak() as win:
            window_attention(*x, batches, torch.randn(H, S, S), beta=1.5)
        with measure_peak() as win_grad:
            window_attention(*x, batches, torch.randn(H, S, S), beta=1.5).sum().backward()
        index = torch.randint(0, N, (N, K))
        with torch.no_grad(), measure_peak() as nn_:
            knn_attention(*x, index, torch.randn(H, N, K), beta=1.5)
        rows.append((N, win.peak, win_grad.peak, nn_.peak))
        print(f"N={N:>7}  window_attention peak {win.peak / 2**20:7.1f} MiB (with backward "
              f"{win_grad.peak / 2**20:7.1f})  knn_attention peak {nn_.peak / 2**20:7.1f} MiB")
    for N, fwd, both, _ in rows:  # inference: the output plus one batch's temporaries (a constant)
        output = N * H * D * 4
        assert fwd < output + 4 * 2**20, (N, fwd)
        assert both < 16 * output + 8 * 2**20, (N, both)  # backward: (N, H, D) tensors and weights
    for (n0, _, b0, k0), (n1, _, b1, k1) in zip(rows, rows[1:]):  # 4x the tokens, 4x the peak (not 16x)
        assert 3.3 < b1 / b0 < 4.4 and 3.6 < k1 / k0 < 4.4, (n0, b0, b1, k0, k1)

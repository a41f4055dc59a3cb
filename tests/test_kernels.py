"""kernels.py, the fast path (model.kernels = fast), equals the reference path (attention.py,
model.py): outputs within 1e-5 and gradients within 1e-4 in float32, 1e-12 and 1e-10 in float64,
each relative to the largest entry of the reference tensor; on random slides, for every attention
mode (windows split and over HiST eq. (2)'s union, k-NN, full, none), signed and not, every bias,
with and without global tokens (each quadrant switch), in training (gradients) and in inference
(block_inference, by_rows); both batchings of window_batches; whole models of every configs/*.yaml.
And the fast path's memory grows linearly in the tokens."""
import copy
import math
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import attention
import kernels
import lattice
from attention import GlobalAttention, PairBias, SpotAttention
from lattice import knn
from model import Block, ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}  # (outputs, gradients)


def assert_same(got, want, tol, what=""):
    """max |got - want| <= tol * max |want|, same shape and dtype."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    got, want = got.detach(), want.detach()
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = diff / scale if scale else (0.0 if diff == 0 else math.inf)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def random_sites(n, side, seed=0):
    """n distinct sites in a side x side square (about half full: windows with empty slots), and one
    isolated site far away (a window of one token)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(side * side, generator=g)[:n]
    sites = torch.stack([flat // side, flat % side], 1)
    return torch.cat([sites, torch.tensor([[side + 20, side + 20]])])


def visium_sites(n_side=13, seed=0):
    """A Visium-like slide on the lattice: hexagonal 100 um pitch, jitter, a hole, the default
    unit."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    xy = torch.stack([j * 100.0 + (i % 2) * 50.0, i * 86.6], -1).reshape(-1, 2).double()
    xy = xy[(xy - xy.mean(0)).norm(dim=1) > 180]
    xy = xy + torch.randn(xy.shape, generator=g, dtype=torch.float64) * 3
    return lattice.to_lattice(xy, lattice.default_unit(xy))


SLIDES = {"random": lambda: random_sites(70, 12), "visium": visium_sites}


def use_regime(monkeypatch, regime):
    """window_batches' two batchings: all windows padded into one batch (a small slide), or windows
    of equal size together in batches of about PAIRS pairs (forced here by PADDED = 0, PAIRS
    small)."""
    if regime == "exact":
        monkeypatch.setattr(kernels, "PADDED", 0)
        monkeypatch.setattr(kernels, "PAIRS", 200)
    return regime


@pytest.fixture(params=["padded", "exact"])
def regime(request, monkeypatch):
    return use_regime(monkeypatch, request.param)


def rulebooks(level, kind, w):
    """(queries, keys, allowed) of one softmax: a partition's windows, or eq. (2)'s union."""
    if kind == "union":
        return level.windows, level.union, lattice.union_pairs(w)[0]
    return (level.windows, level.windows, None) if kind == "standard" else \
        (level.shifted, level.shifted, None)


# ---- window batches ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["standard", "shifted", "union"])
@pytest.mark.parametrize("chunk,padded", [(50, 1 << 20), (1 << 14, 1 << 20), (50, 0)])
def test_window_groups_hold_each_window_once_with_its_own_tokens(kind, chunk, padded,
                                                                 monkeypatch):
    """kernels._window_groups, read back window by window: the groups are the rulebooks' windows in
    order, each window's local ids index the group's id lists to its own token ids (-1 kept), and
    every query token of the level is in exactly one group."""
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    monkeypatch.setattr(kernels, "PADDED", padded)
    w = 2
    level = lattice.build_pyramid(SLIDES["visium"](), 1, w)[0]
    queries, keys, _ = rulebooks(level, kind, w)
    groups = kernels._window_groups(queries, keys, {})
    rows, seen = 0, []
    for q_ids, k_ids, batches in groups:
        assert len(set(q_ids.tolist())) == len(q_ids) and len(set(k_ids.tolist())) == len(k_ids)
        got = {}
        for q_tok, q_slot, k_tok, k_slot in batches:
            for i in range(len(q_tok)):
                qs = filled(q_tok[i], q_slot[i])
                got[qs] = {(s, int(k_ids[t])) for s, t in filled(k_tok[i], k_slot[i])}
        n = max(1, min(chunk // queries.shape[1], padded // (queries.shape[1] * keys.shape[1])))
        for window in range(rows, min(rows + n, len(queries))):
            qs = tuple((s, t) for s, t in enumerate(queries[window].tolist()) if t >= 0)
            if not qs:
                continue
            local = tuple((s, int((q_ids == t).nonzero())) for s, t in qs)
            want = {(s, t) for s, t in enumerate(keys[window].tolist()) if t >= 0}
            assert got[local] == want
        rows += n
        seen += q_ids.tolist()
    assert rows >= len(queries)
    assert sorted(seen) == sorted(t for t in queries.flatten().tolist() if t >= 0)


def filled(tokens, slots):
    """The (slot, token) pairs of one batch row whose token is not padding."""
    return tuple((s, t) for s, t in zip(slots.tolist(), tokens.tolist()) if t >= 0)


@pytest.mark.parametrize("kind", ["standard", "shifted", "union"])
@pytest.mark.parametrize("slide", list(SLIDES))
def test_window_batches_hold_every_window_once(regime, kind, slide):
    """Every window is one row of one batch: its filled query slots and key slots, each with its
    token, filled first in slot order; exact batches have no padding and about PAIRS pairs; padded:
    one batch."""
    level = lattice.build_pyramid(SLIDES[slide](), 1, 2)[0]
    queries, keys, _ = rulebooks(level, kind, 2)
    want = sorted((filled(q, torch.arange(len(q))), filled(k, torch.arange(len(k))))
                  for q, k in zip(queries, keys))
    batches = kernels.window_batches(queries, keys, level.cache)
    got = []
    for q_tok, q_slot, k_tok, k_slot in batches:
        for tok, slot in ((q_tok, q_slot), (k_tok, k_slot)):
            count = (tok >= 0).sum(1, keepdim=True)
            assert ((tok >= 0) == (torch.arange(tok.shape[1]) < count)).all()   # filled first
            assert all((row[:c].diff() > 0).all() for row, c in zip(slot, count.flatten()))
        got += [(filled(a, b), filled(c, d)) for a, b, c, d in zip(q_tok, q_slot, k_tok, k_slot)]
        if regime == "exact":
            assert (q_tok >= 0).all() and (k_tok >= 0).all()
            assert len(q_tok) == 1 or q_tok.numel() * k_tok.shape[1] <= kernels.PAIRS
    assert sorted(got) == want
    if regime == "padded":
        assert len(batches) == 1
    assert kernels.window_batches(queries, keys, level.cache) is batches   # built once per level
    assert len(level.cache) == 1


# ---- window, k-NN and full attention -------------------------------------------------------------
def grads(out, inputs, seed=1):
    """Gradients of a random linear function of out with respect to inputs (None where unused)."""
    if not out.requires_grad:  # e.g. a switched-off quadrant's zeros
        return [None] * len(inputs)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def check_paths(fast, reference, inputs, dtype, what):
    """fast() equals reference(): outputs, and gradients with respect to every input."""
    tol_out, tol_grad = TOL[dtype]
    got, want = fast(), reference()
    assert_same(got, want, tol_out, what)
    for n, (g, r) in enumerate(zip(grads(got, inputs), grads(want, inputs))):
        assert (g is None) == (r is None), (what, n)
        if r is not None:
            assert_same(g, r, tol_grad, f"{what}: gradient {n}")


@pytest.mark.parametrize("kind", ["standard", "shifted", "union"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("beta", [0.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_attention_equals_reference(regime, kind, bias, beta, dtype):
    w, H, D = 2, 3, 4
    level = lattice.build_pyramid(SLIDES["random"](), 1, w)[0]
    queries, keys, allowed = rulebooks(level, kind, w)
    N = len(level.sites)
    q, k, v = (torch.randn(N, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    b = torch.randn(H, queries.shape[1], keys.shape[1], dtype=dtype, requires_grad=True) \
        if bias else None
    args = (q, k, v, queries, keys, b, allowed, beta, 0.6)
    check_paths(lambda: kernels.window_attention(*args, cache=level.cache),
                lambda: attention.window_attention(*args), [q, k, v] + [b] * bias, dtype, kind)
    with torch.no_grad():
        assert_same(kernels.window_attention(*args, cache=level.cache),
                    attention.window_attention(*args), TOL[dtype][0], "without grad")


def test_window_attention_dropout_gradcheck_and_unbiased(regime):
    """The hand-written backward with a dropout mask (the same mask on every call: reseeded), and
    the mean over many masks is the output without dropout (drawn batch by batch alike in both
    regimes)."""
    w, H, D = 1, 2, 2
    level = lattice.build_pyramid(random_sites(14, 5), 1, w)[0]
    queries, keys, allowed = rulebooks(level, "union", w)
    N = len(level.sites)
    x = [torch.randn(N, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    bias = torch.randn(H, queries.shape[1], keys.shape[1], dtype=torch.float64, requires_grad=True)

    def dropped(q, k, v, b):
        torch.manual_seed(7)
        return kernels.window_attention(q, k, v, queries, keys, b, allowed, 1.5, 0.6, dropout_p=0.4)
    assert torch.autograd.gradcheck(dropped, (*x, bias), fast_mode=True)
    plain = attention.window_attention(*x, queries, keys, bias, allowed, 1.5, 0.6).detach()
    assert not torch.allclose(dropped(*x, bias), plain)
    if regime == "exact":
        return
    with torch.no_grad():
        draws = torch.stack([kernels.window_attention(*x, queries, keys, bias, allowed, 1.5, 0.6,
                                                      dropout_p=0.4) for _ in range(1000)])
    assert ((draws.mean(0) - plain).abs() <= 5 * draws.std(0) / 1000 ** 0.5 + 1e-9).all()  # 5 sigma


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("beta", [0.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_attention_equals_reference(bias, beta, dtype):
    Nq, Nk, K, H, D = 23, 30, 6, 2, 4
    q = torch.randn(Nq, H, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(Nk, H, D, dtype=dtype, requires_grad=True) for _ in range(2))
    index = torch.stack([torch.randperm(Nk)[:K] for _ in range(Nq)])
    b = torch.randn(H, Nq, K, dtype=dtype, requires_grad=True) if bias else None
    args = (q, k, v, index, b, beta, 0.6)
    check_paths(lambda: kernels.knn_attention(*args, chunk=5),
                lambda: attention.knn_attention(*args), [q, k, v] + [b] * bias, dtype, "knn")


@pytest.mark.parametrize("bias", ["alibi", "none"])
@pytest.mark.parametrize("beta", [0.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_attention_equals_reference(bias, beta, dtype):
    N, H, D = 29, 4, 4
    q, k, v = (torch.randn(N, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    xy = torch.randint(0, 9, (N, 2)).to(dtype)
    pair = PairBias(bias, H, 3).to(dtype)
    args = (q, k, v, xy, pair, beta, 0.6)
    check_paths(lambda: kernels.full_attention(*args, chunk=5),
                lambda: attention.full_attention(*args), [q, k, v], dtype, "full")


@pytest.mark.parametrize("kind", ["window", "knn", "full"])
def test_dropout_drops_whole_signed_weights(kind):
    """As attention.attend: one mask over the signed weights softmax(S + B) - beta softmax((B - S) /
    tau). With the values an identity, the output is the weights: each entry is 0 or the weight
    without dropout / (1 - p)."""
    N, H, p = 24, 2, 0.3
    level = lattice.build_pyramid(random_sites(N - 1, 6), 1, 1)[0]
    q, k = (torch.randn(N, H, N, dtype=torch.float64) / 3 for _ in range(2))  # value width
    eye = torch.eye(N, dtype=torch.float64)[:, None].expand(N, H, N)    # value of token j: e_j
    index = knn(level.sites.float(), level.sites.float(), 5)
    queries, keys, allowed = rulebooks(level, "union", 1)
    bias = torch.randn(H, queries.shape[1], keys.shape[1], dtype=torch.float64)
    pair = PairBias("alibi", H, 1).double()
    run = {"window": lambda f, d: f(q, k, eye, queries, keys, bias, allowed, 1.5, 0.6, d),
           "knn": lambda f, d: f(q, k, eye, index, None, 1.5, 0.6, d),
           "full": lambda f, d: f(q, k, eye, level.sites.double(), pair, 1.5, 0.6, d)}[kind]
    weights = run(getattr(attention, f"{kind}_attention"), 0.0)
    dropped = run(getattr(kernels, f"{kind}_attention"), p)
    kept = dropped != 0
    assert 0 < kept.sum() < (weights != 0).sum()
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p))


def knn_layouts():
    g = torch.Generator().manual_seed(11)
    uniform = torch.rand(5000, 2, generator=g) * 1000
    hexagonal = visium_sites(50).float()                      # integers: ties everywhere
    centres = torch.rand(12, 2, generator=g) * 5000
    clusters = (centres[:, None] + torch.randn(12, 200, 2, generator=g) * 20).reshape(-1, 2)
    clusters = torch.cat([clusters, torch.rand(30, 2, generator=g) * 5000])  # sparse outliers
    pseudo = torch.cat([hexagonal, hexagonal[::2] + torch.tensor([0.5, 0.29])])  # spots + pseudo
    far = torch.tensor([[1000.0 * i, 10000.0 - 900.0 * i] for i in range(1, 11)])  # each alone
    line = uniform * torch.tensor([1.0, 0.0])
    return {"uniform": (uniform, uniform, 8), "hexagonal": (hexagonal, hexagonal, 32),
            "uniform float64": (uniform.double(), uniform.double(), 8),
            "clusters": (clusters, clusters, 8), "pseudo-spots": (pseudo, pseudo, 32),
            "line": (line, line, 8), "one place": (torch.ones(300, 2), torch.ones(300, 2), 8),
            "queries outside": (uniform[:500] * 1.5 - 250, uniform, 8),
            "only sparse queries": (far, torch.cat([uniform[:1000] / 100, far]), 8)}


@pytest.mark.parametrize("layout", list(knn_layouts()))
def test_knn_on_a_grid_equals_brute_force(layout, monkeypatch):
    """kernels.knn gives lattice.knn's neighbours exactly (same distances, same tie rule), mostly
    from the grid cells (the brute-force fallback only where the cells cannot be sure)."""
    xy_q, xy_k, k = knn_layouts()[layout]
    want = lattice.knn(xy_q, xy_k, k)
    brute = []
    real = lattice.knn
    monkeypatch.setattr(lattice, "knn", lambda q, *a: brute.append(len(q)) or real(q, *a))
    for chunk in (4096, 333):
        assert torch.equal(kernels.knn(xy_q, xy_k, k, chunk), want), (layout, chunk)
    if layout in ("uniform", "hexagonal", "pseudo-spots", "line"):
        assert sum(brute) < 0.1 * 2 * len(xy_q), brute       # the grid answered


@pytest.mark.parametrize("width", [1, 7, 14, 15, 16, 36])
def test_softmax_equals_torch_on_short_and_long_rows(width):
    """kernels.softmax_ (exp / sum below 16 keys on a CPU) against exp(x - max) / sum written out,
    with -inf entries (masked keys) in rows that keep one finite key."""
    x = torch.randn(50, 3, width, dtype=torch.float64) * 4
    x[:, 0, 1:] = -math.inf
    x[:, 1, ::2] = -math.inf if width > 1 else x[:, 1, ::2]
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    torch.testing.assert_close(kernels.softmax_(x.clone()), e / e.sum(-1, keepdim=True))
    torch.testing.assert_close(kernels.softmax_(x.transpose(1, 2).clone(), 1),  # k-NN's dim
                               (e / e.sum(-1, keepdim=True)).transpose(1, 2))


def test_random_bits_keep_scale_and_dropout():
    """keep_scale is Bernoulli(1 - p) / (1 - p) in every 16-bit lane of the random words, kept
    exactly where bits >= round(65536 p) - 32768 (compared here element by element, against the
    arithmetic form); dropout scales kept entries, and its gradient is the same factor."""
    n = 400_000
    for p in (0.05, 0.3, 0.5):
        bits = kernels.random_bits((n,), "cpu")
        assert bits.dtype == torch.int16
        scale = kernels.keep_scale(bits, p)
        threshold = round(p * 65536) - 32768
        want = torch.tensor([1 / (1 - p) if b >= threshold else 0.0 for b in bits[:2000].tolist()])
        assert torch.equal(scale[:2000], want.float())
        keep = scale > 0
        for lane in range(4):                                 # the 4 int16 of each int64 word
            rate = keep[lane::4].double().mean()
            assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / (n / 4)) ** 0.5, (p, lane, rate)
        assert kernels.random_bits((n,), "cpu").ne(bits).any()   # new bits every call
    edge = torch.tensor([-32768, -26215, -26214, 32767], dtype=torch.int16)
    assert kernels.keep_scale(edge, 0.1).tolist() == [0, 0] + [pytest.approx(1 / 0.9)] * 2
    assert (kernels.keep_scale(kernels.random_bits((1000,), "cpu"), 0.0) == 1).all()
    x = torch.randn(3, 1000, dtype=torch.float64, requires_grad=True)
    y = kernels.dropout(x, 0.25)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.double() / 0.75)
    drop = kernels.Dropout(0.25)
    assert torch.equal(drop.eval()(x), x) and (drop.train()(x) == 0).any()


# ---- the modules ---------------------------------------------------------------------------------
def twins(module):
    """(reference, fast): the same weights, the fast flag off and on."""
    fast = copy.deepcopy(module)
    module.fast, fast.fast = False, True
    return module, fast


def params_and_grads(module, out, extra=(), seed=1):
    named = list(module.named_parameters()) + [(f"input {n}", t) for n, t in enumerate(extra)]
    return [n for n, _ in named], grads(out, [p for _, p in named], seed)


def check_modules(ref, fast, run, inputs, dtype, what):
    """run(module, inputs) -> a tensor: outputs and the gradients of every parameter and input
    equal."""
    tol_out, tol_grad = TOL[dtype]
    a = [t.detach().clone().requires_grad_() for t in inputs]
    b = [t.detach().clone().requires_grad_() for t in inputs]
    want, got = run(ref, a), run(fast, b)
    assert_same(got, want, tol_out, what)
    names, want_g = params_and_grads(ref, want, a)
    _, got_g = params_and_grads(fast, got, b)
    for name, g, r in zip(names, got_g, want_g):
        assert (g is None) == (r is None), (what, name)
        if r is not None:
            assert_same(g, r, tol_grad, f"{what}: gradient of {name}")


SPOT_MODES = [("window", "split"), ("window", "union"), ("knn", "split"), ("full", "split")]


@pytest.mark.parametrize("mode,windows,bias,regime", [
    (m, w, b, r) for m, w in SPOT_MODES
    for b in ("rpb", "alibi", "none") if b != "rpb" or m == "window"
    for r in (("padded", "exact") if m == "window" else ("padded",))])  # rpb: window offsets
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spot_attention_fast_equals_reference(mode, windows, bias, regime, signed, dtype,
                                              monkeypatch):
    """Training (gradients of the weights, the bias table and the input) and inference (without grad
    the windows' q, k, v are projected batch by batch)."""
    use_regime(monkeypatch, regime)
    w, dim, H = 2, 16, 4
    level = lattice.build_pyramid(SLIDES["visium"](), 1, w)[0]
    xy = level.sites.float()
    index = knn(xy, xy, 7) if mode == "knn" else None
    module = SpotAttention(dim, H, mode, w, bias, signed, 1.5, 0.6, windows=windows).to(dtype)
    ref, fast = twins(module)
    if bias == "rpb":
        ref.bias.table.data.normal_()
        fast.bias.table.data.copy_(ref.bias.table)
    x = torch.randn(len(xy), dim, dtype=dtype)
    check_modules(ref, fast, lambda m, t: m(t[0], level, index), [x], dtype, f"{mode} {windows}")
    with torch.no_grad():
        ref.eval(), fast.eval()
        assert_same(fast(x, level, index), ref(x, level, index), TOL[dtype][0], "inference")


SWITCHES = [(1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1)]


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tokens_read_online_softmax_equals_reference(switches, dtype, monkeypatch):
    """The tokens' softmax over [X; C], chunk by chunk (7 spots a chunk: 3 chunks, then the
    tokens)."""
    monkeypatch.setattr(kernels, "CHUNK", 7)
    ref, fast = twins(GlobalAttention(8, 2, *map(bool, switches)).to(dtype))
    x, tokens = torch.randn(20, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype)
    check_modules(ref, fast, lambda m, t: m.tokens_read(*t), [x, tokens], dtype, str(switches))


def block_config(mode, windows, tokens, switches, signed=True):
    bias = "rpb" if mode == "window" else "alibi"
    return ModelConfig(dim=16, heads=4, dropout=0.0, attn_dropout=0.0, w=2, windows=windows,
                       bias=bias, signed=signed, calibration_tokens=tokens, p2h=bool(switches[0]),
                       p2p=bool(switches[1]), h2p=bool(switches[2]))


BLOCK_MODES = SPOT_MODES + [("none", "split")]


@pytest.mark.parametrize("mode,windows", BLOCK_MODES)
@pytest.mark.parametrize("tokens,switches", [(0, (1, 1, 1))] + [(3, s) for s in SWITCHES])
def test_block_fast_equals_reference(mode, windows, tokens, switches, monkeypatch):
    """HiST eq. (1) with the fast kernels against the reference Block: in training and in evaluation
    with grad (outputs and every gradient), and without grad (kernels.block_inference, chunk by
    chunk in 11 rows, writing over its input)."""
    monkeypatch.setattr(kernels, "CHUNK", 11)
    torch.manual_seed(3)
    ref = Block(block_config(mode, windows, tokens, switches, signed=mode != "none"), mode, tokens)
    fast = copy.deepcopy(ref)
    for m in fast.modules():   # the block, its SpotAttention and its GlobalAttention
        if hasattr(m, "fast"):
            m.fast = True
    level = lattice.build_pyramid(SLIDES["visium"](), 1, 2)[0]
    xy = level.sites.float()
    index = knn(xy, xy, 7) if mode == "knn" else None
    x, t = torch.randn(len(xy), 16), torch.randn(tokens, 16) if tokens else None

    def run(m, inputs):
        y, t_out = m(inputs[0], inputs[1] if tokens else None, level, index)
        return torch.cat([y, t_out]) if tokens else y
    for train in (True, False):
        ref.train(train), fast.train(train)
        check_modules(ref, fast, run, [x, t] if tokens else [x], torch.float32, f"train={train}")
    with torch.no_grad():
        want_x, want_t = ref(x.clone(), t, level, index)
        x_in = x.clone()
        got_x, got_t = fast(x_in, t, level, index)
    assert_same(got_x, want_x, TOL[torch.float32][0], "block_inference")
    assert got_x.data_ptr() == x_in.data_ptr()          # written over the block's input
    if tokens:
        assert_same(got_t, want_t, TOL[torch.float32][0], "block_inference tokens")


def test_by_rows_equals_one_call(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 7)
    x = torch.randn(30, 4, dtype=torch.float64)
    calls = []

    def fn(rows):
        calls.append(rows)
        return {"a": x[rows] * 2, "b": x[rows].sum(1)}
    got = kernels.by_rows(fn, 30)
    assert len(calls) == 5 and all(c.stop - c.start <= 7 for c in calls)
    torch.testing.assert_close(got["a"], x * 2) and torch.testing.assert_close(got["b"], x.sum(1))
    one = kernels.by_rows(lambda rows: x[rows] + 1, 30, torch.float32)
    assert one.dtype == torch.float32 and torch.equal(one, (x + 1).float())
    assert kernels.by_rows(lambda rows: x[rows], 0).shape == (0, 4)
    assert kernels.cast({"a": x}, torch.float32)["a"].dtype == torch.float32


# ---- whole models --------------------------------------------------------------------------------
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                 if yaml.safe_load(p.read_text())["model"].get("arch", "tessera") == "tessera")


def model_inputs(m, n_side=12):
    """A hexagonal slide of n_side^2 spots at the config's scale, with what its config reads."""
    g = torch.Generator().manual_seed(0)
    i, j = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    xy = torch.stack([j * 100.0 + (i % 2) * 50.0, i * 86.6], -1).reshape(-1, 2) + 1000
    xy = xy / 100 * m["unit_um"] if m.get("unit_um") else xy
    N = len(xy)
    kw = {"features": torch.randn(N, 8, generator=g), "coords": xy}
    if m.get("sub_levels"):
        kw["sub_features"] = torch.randn(N, 4 ** m["sub_levels"], 8, generator=g)
    if m.get("local_blocks"):
        kw.update(pseudo_features=torch.randn(N // 2, 8, generator=g), pseudo_coords=xy[::2] + 30)
    return kw


def tensors(out):
    """The floating-point tensors of a model's output, by name (levels, the alignment pair)."""
    if isinstance(out, torch.Tensor):
        return {"": out} if out.is_floating_point() else {}
    items = out.items() if isinstance(out, dict) else enumerate(out)
    return {f"{k}.{n}".strip("."): t for k, v in items for n, t in tensors(v).items()}


F32, F64 = torch.float32, torch.float64
CASES = [(name, {}, "padded", F32) for name in CONFIGS] + [  # and the papers' forms, a large
    ("hist.yaml", {"windows": "union", "uncoarsen": "mlp"}, "exact", F32),  # slide's batching,
    ("default.yaml", {"windows": "union", "slopes": "feast"}, "exact", F32),  # the pathway
    ("stf.yaml", {"attention": "none"}, "padded", F32),                     # bottleneck, float64
    ("default.yaml", {}, "padded", F64), ("hist.yaml", {"windows": "union"}, "exact", F64)]


def case_id(config, overrides, regime, dtype):
    return "-".join([config[:-5], *map(str, overrides.values()), regime, str(dtype)[6:]])


@pytest.mark.parametrize("config,overrides,regime,dtype", CASES, ids=[case_id(*c) for c in CASES])
def test_whole_models_fast_equal_reference(config, overrides, regime, dtype, monkeypatch):
    """build_model of every config at tiny width, model.kernels reference vs fast (dropout 0): every
    output and every parameter's gradient in training, every output in inference (chunks of 50
    rows)."""
    use_regime(monkeypatch, regime)
    monkeypatch.setattr(kernels, "CHUNK", 50)
    m = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]
    m.update(dim=16, hidden=16, dropout=0.0, attn_dropout=0.0, knn_k=min(m.get("knn_k", 8), 8),
             ood_fallback=False, **overrides)  # the fallback needs training slides
    kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_inputs(m).items()}
    runs, calls = {}, []
    for name in ("spot_attention", "window_attention", "tokens_read", "block_inference", "by_rows"):
        def counted(*args, name=name, fn=getattr(kernels, name), **kwargs):
            calls.append((kind, name, torch.is_grad_enabled()))  # kind: the path now running
            return fn(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    for kind in ("reference", "fast"):
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_dict({**m, "kernels": kind}), 8, 5).to(dtype)
        with torch.no_grad():  # weights off their start (identity copies, zero residual heads)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                   dtype=dtype) * 0.05)
        out = tensors(model(**kw))
        g = torch.Generator().manual_seed(7)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=dtype)).sum() for t in out.values())
        loss.backward()
        model.eval()
        with torch.no_grad():
            inference = tensors(model(**kw))
        runs[kind] = out, {n: p.grad for n, p in model.named_parameters()}, inference
    assert not [c for c in calls if c[0] == "reference"]           # the switch picks the path
    assert ("fast", "block_inference", False) in calls and ("fast", "by_rows", False) in calls
    assert m["attention"] == "none" or ("fast", "spot_attention", True) in calls
    (out, grad, inference), (f_out, f_grad, f_inference) = runs["reference"], runs["fast"]
    assert out.keys() == f_out.keys() and grad.keys() == f_grad.keys() and len(out) >= 1
    tol_out, tol_grad = TOL[dtype]
    for name in out:
        assert_same(f_out[name], out[name], tol_out, f"{config} {name}")
    for name in grad:
        assert (grad[name] is None) == (f_grad[name] is None), (config, name)
        if grad[name] is not None:
            assert_same(f_grad[name], grad[name], tol_grad, f"{config} gradient of {name}")
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grad.values()) > len(grad) // 2
    assert inference.keys() == f_inference.keys()
    for name in inference:
        assert_same(f_inference[name], inference[name], tol_out, f"{config} inference {name}")


# ---- memory: the fast path is linear in the tokens -----------------------------------------------
class measure_peak(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the block (inputs excluded): every tensor an
    aten op returns that does not alias one of its arguments (views, in-place ops) is new until it
    is freed. Buffers private to a fused kernel are not seen."""

    def __init__(self):
        super().__init__()
        self.now, self.peak, self.live = 0, 0, set()

    def _free(self, key, nbytes):
        self.live.discard(key)
        self.now -= nbytes

    @staticmethod
    def _tensors(tree):
        if isinstance(tree, torch.Tensor):
            yield tree
        elif isinstance(tree, (list, tuple, dict)):
            for t in tree.values() if isinstance(tree, dict) else tree:
                yield from measure_peak._tensors(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in self._tensors((args, kwargs))}
        for t in self._tensors(out):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live and key not in seen:
                self.live.add(key)
                self.now += storage.nbytes()
                weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.now)
        return out


def test_window_and_knn_attention_peak_memory_grows_linearly(monkeypatch):
    """A large slide's batching (exact-size batches), split and union windows: the forward holds the
    output and one batch; the backward (N, H, D) tensors and the saved weights (two per pair and
    head, signed), never (pairs, H, D); 4x the tokens, 4x the peak (not 16x). k-NN in chunks: the
    same."""
    monkeypatch.setattr(kernels, "PADDED", 0)
    monkeypatch.setattr(kernels, "PAIRS", 1 << 15)  # fewer batches: quicker to measure
    H, D, w, K = 2, 8, 3, 8
    rows = []
    for N in (4_000, 16_000):
        sites = random_sites(N - 1, int((2 * N) ** 0.5))           # about half the sites full
        level = lattice.build_pyramid(sites, 1, w)[0]
        x = [torch.randn(N, H, D, requires_grad=True) for _ in range(3)]
        output, peaks = N * H * D * 4, []
        for kind in ("standard", "union"):
            queries, keys, allowed = rulebooks(level, kind, w)
            bias = torch.randn(H, queries.shape[1], keys.shape[1])
            batches = kernels.window_batches(queries, keys, level.cache)  # built once per level
            weights = sum(q.numel() * k.shape[1] for q, _, k, _ in batches) * H * 4 * 2
            with torch.no_grad(), measure_peak() as fwd:
                kernels.window_attention(*x, queries, keys, bias, allowed, 1.5, cache=level.cache)
            with measure_peak() as both:
                kernels.window_attention(*x, queries, keys, bias, allowed, 1.5,
                                         cache=level.cache).sum().backward()
            print(f"N={N:>6} {kind:>8}: forward {fwd.peak / 2**20:5.1f} MiB, with backward "
                  f"{both.peak / 2**20:5.1f} MiB (output {output / 2**20:.1f}, weights "
                  f"{weights / 2**20:.1f})")
            batch = 16 * kernels.PAIRS * H * 4                # a batch's temporaries: (pairs, H)
            assert fwd.peak < output + batch, (N, kind, fwd.peak)
            assert both.peak < 16 * output + weights + 2 * batch, (N, kind, both.peak)
            peaks.append(both.peak)
        index, bias = torch.randint(0, N, (N, K)), torch.randn(H, N, K)
        with torch.no_grad(), measure_peak() as near:
            kernels.knn_attention(*x, index, bias, 1.5, chunk=256)
        rows.append(peaks + [near.peak])
    for small, large in zip(*rows):
        assert large < 4.4 * small, rows


def test_full_attention_chunk_bounds_peak_memory():
    N, H, D = 1200, 4, 8
    q, k, v, xy = torch.randn(N, H, D), torch.randn(N, H, D), torch.randn(N, H, D), torch.rand(N, 2)
    peaks = {}
    for chunk in (N, 150):
        with torch.no_grad(), measure_peak() as m:
            kernels.full_attention(q, k, v, xy, PairBias("alibi", H, 3), beta=1.5, chunk=chunk)
        peaks[chunk] = m.peak
    assert peaks[N] > 4 * N * N * H  # the (H, N, N) bias exists once unchunked
    assert peaks[150] < peaks[N] / 6


def test_tokens_read_and_block_inference_are_linear_in_spots(monkeypatch):
    """The tokens read 20k spots without an (N, 2d) context; a block in inference (a large slide's
    batching, chunks of 1024 rows) holds one (N, d) result beside its input, which it writes
    over."""
    N, T, dim = 20_000, 4, 16
    m = GlobalAttention(dim, 2, fast=True)
    x = torch.randn(N, dim)
    with torch.no_grad(), measure_peak() as mem:
        m.tokens_read(x, torch.randn(T, dim))
    assert mem.peak < 6 * 2**20 + 8 * (1 << 14) * dim * 4, mem.peak  # a few chunks, not 1.6 GB
    monkeypatch.setattr(kernels, "PADDED", 0)
    monkeypatch.setattr(kernels, "CHUNK", 1024)
    N = 40_000
    block = Block(ModelConfig(dim=dim, heads=2, w=3, calibration_tokens=1), "window", 1).eval()
    level = lattice.build_pyramid(random_sites(N - 1, int((2 * N) ** 0.5)), 1, 3)[0]
    for rulebook in (level.windows, level.shifted):  # built once per level, outside
        kernels._window_groups(rulebook, rulebook, level.cache)
    x, tokens = torch.randn(N, dim), torch.randn(1, dim)
    with torch.no_grad(), measure_peak() as mem:
        block(x, tokens, level)
    print(f"block_inference N={N} d={dim}: peak {mem.peak / 2**20:.1f} MiB, "
          f"x {N * dim * 4 / 2**20:.1f} MiB")
    assert mem.peak < N * dim * 4 + 2 * 2**20, mem.peak

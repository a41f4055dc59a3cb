"""model.py: shapes, permutation equivariance, every switch, coarsening maths, pathway head,
baselines."""
import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import files
import lattice
import model as model_module
from model import ModelConfig, PathwayHead, Ridge, build_model, check_config
from pyramid import Coarsen, Fuse, Uncoarsen, child_attention

C, G = 12, 7


def hex_slide(n_side=12, pitch=100.0, seed=0):
    """A jittered hexagonal Visium-like patch, float64-free coordinates in micrometres."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    x = j.flatten() * pitch + (i.flatten() % 2) * pitch / 2
    y = i.flatten() * pitch * 3 ** 0.5 / 2
    xy = torch.stack([x, y], 1).float() + torch.rand(n_side * n_side, 2, generator=g) * 3
    feats = torch.randn(xy.shape[0], C, generator=g)
    return feats, xy


def small_cfg(**kw):
    base = dict(dim=16, heads=2, depths=[1, 1, 1], decoder_depths=[1, 1], dropout=0.0,
                attn_dropout=0.0, calibration_tokens=1, pathway_tokens=3, signed=True,
                local_blocks=1, knn_k=6)
    base.update(kw)
    return ModelConfig(**base)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, C, G).eval()


@pytest.mark.parametrize("cfg", [
    small_cfg(),
    small_cfg(attention="knn", bias="alibi"),
    small_cfg(attention="full", bias="alibi", depths=[2], decoder_depths=[]),
    small_cfg(bias="alibi", head="pathway", pos_encoding=True),
    small_cfg(attention="none", head="mlp"),
    small_cfg(head="zinb"),
])
def test_prediction_is_per_spot_and_permutation_equivariant(cfg):
    feats, xy = hex_slide()
    model = make(cfg)
    with torch.no_grad():
        out = model(feats, xy)["pred"]
        perm = torch.randperm(feats.shape[0])
        out_perm = model(feats[perm], xy[perm])["pred"]
    assert out.shape == (feats.shape[0], G)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-4, atol=1e-5)


def test_pseudo_spots_are_used_then_dropped_and_equivariant():
    feats, xy = hex_slide()
    g = torch.Generator().manual_seed(1)
    pf, pxy = torch.randn(40, C, generator=g), xy[:40] + 50.0
    model = make(small_cfg())
    with torch.no_grad():
        a = model(feats, xy, pf, pxy)["pred"]
        b = model(feats, xy)["pred"]
        perm = torch.randperm(40, generator=g)
        c = model(feats, xy, pf[perm], pxy[perm])["pred"]
    assert a.shape == (feats.shape[0], G)
    assert not torch.allclose(a, b)          # pseudo-spots change the result
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [small_cfg(), small_cfg(attention="full", bias="alibi", depths=[1],
                                                          decoder_depths=[])])
def test_one_spot_and_an_isolated_spot(cfg):
    model = make(cfg)
    feats, xy = hex_slide()
    with torch.no_grad():
        one = model(feats[:1], xy[:1], unit=55.0)["pred"]
        far = torch.cat([xy, torch.tensor([[1e5, 1e5]])])
        iso = model(torch.cat([feats, feats[:1]]), far)["pred"]
    assert one.shape == (1, G) and torch.isfinite(one).all()
    assert iso.shape == (xy.shape[0] + 1, G) and torch.isfinite(iso).all()


SWITCHES = {  # field: (on value, off value, whether the parameter count changes)
    "signed": (True, False, False),
    "pos_encoding": (True, False, False),
    "bias": ("rpb", "none", True),
    "local_blocks": (1, 0, True),
    "calibration_tokens": (1, 0, True),
    "pathway_tokens": (3, 0, True),
    "p2h": (True, False, False),
    "p2p": (True, False, False),
    "h2p": (True, False, True),
    "coarse_attention": ("full", "same", True),
    "attention": ("window", "none", True),
    "head": ("linear", "mlp", True),
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_each_switch_changes_the_computation(name):
    on, off, params_change = SWITCHES[name]
    feats, xy = hex_slide()
    g = torch.Generator().manual_seed(3)
    pf, pxy = torch.randn(30, C, generator=g), xy[:30] + 40.0
    cfg_on = small_cfg(**{name: on})
    cfg_off = small_cfg(**{name: off})
    if name == "attention":
        cfg_on = dataclasses.replace(cfg_on, coarse_attention="same")
        cfg_off = dataclasses.replace(cfg_off, coarse_attention="same")
    m_on, m_off = make(cfg_on), make(cfg_off)
    with torch.no_grad():
        a = m_on(feats, xy, pf, pxy)["pred"]
        b = m_off(feats, xy, pf, pxy)["pred"]
    assert not torch.allclose(a, b, atol=1e-6), f"switching {name} off changed nothing"
    n_on = sum(p.numel() for p in m_on.parameters())
    n_off = sum(p.numel() for p in m_off.parameters())
    assert (n_on != n_off) == params_change


def test_parameter_counts_follow_the_config():
    d = 16
    base = make(small_cfg(pathway_tokens=0, calibration_tokens=1))
    more = make(small_cfg(pathway_tokens=5, calibration_tokens=1))
    assert (sum(p.numel() for p in more.parameters()) - sum(p.numel() for p in base.parameters())
            == 5 * d)
    rpb = make(small_cfg(bias="rpb"))
    none = make(small_cfg(bias="none"))
    n_blocks = 3 + 2  # window blocks with an rpb table (the coarsest uses full attention: no table)
    n_blocks -= 1 + 0  # the encoder's coarsest block is 'full'
    diff = sum(p.numel() for p in rpb.parameters()) - sum(p.numel() for p in none.parameters())
    assert diff == n_blocks * 2 * (4 * 3 - 1) ** 2  # heads x (4w-1)^2 per window block


def random_coarsening(n):
    """Up to n distinct random sites in a 9 x 9 square and their coarsening: sites, parent_sites,
    parent, slot."""
    torch.manual_seed(0)
    sites = torch.unique(torch.randint(0, 9, (n, 2)), dim=0)
    return (sites, *lattice.coarsen(sites))


def test_coarsen_is_hist_eq4_sum_of_per_slot_maps():
    d = 5
    sites, parent_sites, parent, slot = random_coarsening(40)
    x = torch.randn(sites.shape[0], d)
    op = Coarsen(d)
    torch.nn.init.normal_(op.linear.weight)  # four different maps (they start as identities)
    torch.nn.init.normal_(op.linear.bias)
    out = op(x, parent, slot, parent_sites.shape[0])
    W = op.linear.weight.view(d, 4, d)  # W_delta = W[:, delta, :]
    for u in range(parent_sites.shape[0]):  # explicit sum over active children, then LayerNorm
        acc = op.linear.bias.clone()
        for n in range(sites.shape[0]):
            i, j = sites[n].tolist()
            if (i // 2, j // 2) == tuple(parent_sites[u].tolist()):
                acc += W[:, 2 * (i % 2) + (j % 2)] @ x[n]
        torch.testing.assert_close(out[u], op.norm(acc), rtol=1e-5, atol=1e-5)


def test_uncoarsen_starts_as_nearest_neighbour_copy():
    d = 6
    sites, parent_sites, parent, slot = random_coarsening(30)
    x = torch.randn(parent_sites.shape[0], d)
    up = Uncoarsen(d)(x, parent, slot)
    for n in range(sites.shape[0]):
        i, j = sites[n].tolist()
        u = [tuple(p) for p in parent_sites.tolist()].index((i // 2, j // 2))
        torch.testing.assert_close(up[n], x[u])


def test_pathway_head_initial_weights_are_l1_normalised_gmt_membership(tmp_path):
    import data
    import train
    genes = ["A", "B", "C", "D", "E", "F"]
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("P1\turl\tA\tB\tZZZ\nP2\turl\tC\nP3\turl\tA\tC\tD\tE\n")
    cfg = {"data": {"gmt": str(gmt)}}
    m = train.membership(cfg, genes, 3)
    head = PathwayHead(SimpleNamespace(pathway_tokens=3), 8, len(genes))
    head.init_from_membership(m)
    sets = files.read_gmt(gmt)
    for p, name in enumerate(["P1", "P2", "P3"]):
        present = [g for g in sets[name] if g in genes]
        for gi, g in enumerate(genes):
            expect = 1.0 / len(present) if g in present else 0.0
            assert head.genes.weight[gi, p].item() == pytest.approx(expect)
    assert head.genes.weight[genes.index("F")].abs().sum() == 0  # F is in no pathway


def test_ridge_matches_normal_equations_of_hest_benchmark():
    g = np.random.default_rng(0)
    X, Y = g.normal(size=(80, 10)).astype(np.float32), g.normal(size=(80, 4)).astype(np.float32)
    cfg = ModelConfig(arch="ridge", pca=6)
    model = Ridge(cfg, 10, 4)
    Xt = torch.tensor(X)
    model.init_from_data(Xt.mean(0), Xt.std(0), torch.zeros(4))
    model.fit(Xt, torch.tensor(Y))
    # independent reference: standardise (ddof=1 as torch.std),
    # PCA by eigen-decomposition, ridge solve
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    Zc = Z - Z.mean(0)
    evals, evecs = np.linalg.eigh(Zc.T @ Zc)
    P = Zc @ evecs[:, ::-1][:, :6]
    alpha = 100 / (6 * 4)
    Wr = np.linalg.solve(P.T @ P + alpha * np.eye(6), P.T @ Y)
    ref = P @ Wr  # sign of each component cancels in P @ W
    out = model(Xt, None)["pred"].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


def test_bad_configs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least 2"):
        check_config(ModelConfig(attention="none", depths=[1], decoder_depths=[], pathway_tokens=4))
    with pytest.raises(ValueError, match="even"):
        check_config(ModelConfig(heads=3, dim=12))
    with pytest.raises(ValueError, match="decoder_depths"):
        check_config(ModelConfig(depths=[1, 1], decoder_depths=[]))
    with pytest.raises(ValueError, match="valid keys"):
        ModelConfig.from_dict({"dimm": 3})


def test_pathway_scores_are_returned_for_every_head():
    feats, xy = hex_slide()
    model = make(small_cfg())
    with torch.no_grad():
        out = model(feats, xy)
    assert out["pathway_scores"].shape == (feats.shape[0], 3)


@pytest.mark.parametrize("cfg", [
    small_cfg(),  # window + rpb, signed, local k-NN
    small_cfg(bias="alibi", head="pathway", pos_encoding=True, coarse_attention="same"),
    small_cfg(attention="none", head="mlp", pathway_tokens=2),           # pathway bottleneck
    small_cfg(head="zinb", p2p=False, calibration_tokens=2),
    small_cfg(p2h=False, h2p=False, signed=False),
    small_cfg(attention="knn", bias="alibi"),  # k-NN blocks, full coarsest level
])
def test_outputs_do_not_depend_on_the_chunk_size(cfg, monkeypatch):
    """The fast path runs every per-spot step on chunks of spots (kernels.CHUNK) and the window
    attention on batches of windows. Chunks of 7 spots and batches of at most 20 pairs (every loop
    runs many times), in inference (eval, no grad: results written into preallocated outputs,
    float64 outputs asked for), give what one chunk and the default batches give with grad
    enabled."""
    import kernels as attention
    feats, xy = hex_slide()
    model = make(cfg)
    with torch.no_grad():
        for p in model.parameters():  # make the global tokens and biases matter
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(attention, "CHUNK", 1 << 20)
    whole = model(feats, xy)
    monkeypatch.setattr(attention, "CHUNK", 7)
    monkeypatch.setattr(attention, "PADDED", 0)
    monkeypatch.setattr(attention, "PAIRS", 20)
    with torch.no_grad():
        chunked = model(feats, xy, out_dtype=torch.float64)
    assert chunked["pred"].dtype == torch.float64 and whole["pred"].dtype == torch.float32
    assert whole["pred"].requires_grad and set(chunked) == set(whole)
    for key in whole:
        torch.testing.assert_close(chunked[key].float(), whole[key].detach(), rtol=1e-4, atol=1e-5)


def test_uncoarsen_and_fuse_with_random_weights_by_definition():
    """HiST eq. 5: z = MLP(x_parent) in R^{4d} (kind mlp: Linear, GELU, Linear; kind linear: one
    Linear) cut into 4 slots, child n reads slot[n] of its parent; fusion = Linear(2d -> d) on [up
    || skip]. Loops, math.erf's GELU and an explicit concatenation."""
    import math
    d = 4
    sites, parent_sites, parent, slot = random_coarsening(30)
    x = torch.randn(parent_sites.shape[0], d)
    gelu = lambda t: t * 0.5 * (1 + torch.tensor([math.erf(v / math.sqrt(2))  # noqa
                                                  for v in t.tolist()]))
    for kind in ("linear", "mlp"):
        op = Uncoarsen(d, kind)
        for p in op.parameters():
            torch.nn.init.normal_(p)
        up = op(x, parent, slot)
        for n in range(sites.shape[0]):
            hidden = x[parent[n]]
            if kind == "mlp":
                hidden = gelu(op.mlp[0].weight @ hidden + op.mlp[0].bias)   # (4d,)
            z = op.linear.weight @ hidden + op.linear.bias                   # (4d,)
            torch.testing.assert_close(up[n], z[slot[n] * d:(slot[n] + 1) * d])
    fuse, skip = Fuse(d), torch.randn_like(up)
    torch.nn.init.normal_(fuse.weight)
    torch.testing.assert_close(fuse(up, skip), torch.cat([up, skip], 1) @ fuse.weight.T + fuse.bias)


def test_checkpointing_gives_the_same_gradients(monkeypatch):
    """model.checkpoint recomputes each block in the backward; with dropout the recomputation must
    draw the same masks, so loss and gradients equal those of the plain run from the same seed."""
    import model as model_module
    calls = []
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or
                        torch.utils.checkpoint.checkpoint(*a, **k))
    feats, xy = hex_slide()
    grads = []
    for ckpt in (False, True):
        model = make(small_cfg(checkpoint=ckpt, dropout=0.2, attn_dropout=0.3)).train()
        torch.manual_seed(5)
        loss = model(feats, xy)["pred"].pow(2).mean()
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    # blocks, stem, coarsenings, upsampling + fusion, head
    assert len(calls) == 6 + 1 + 2 + 2 + 1 and sum(g is not None for g in grads[1]) > 20
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


# ---- levels below and above the spot (HiFusion sub-spots, MagNet multi-resolution heads) ---------
def test_child_attention_against_a_loop():
    g = torch.Generator().manual_seed(0)
    M, H, dh = 5, 2, 3
    parent = torch.tensor([0, 0, 1, 3, 3, 3, 3, 1, 4])                 # parent 2 has no children
    q, k, v = (torch.randn(M, H, dh, generator=g), torch.randn(9, H, dh, generator=g),
               torch.randn(9, H, dh, generator=g))
    got = child_attention(q, k, v, parent)
    for m in range(M):
        kids = [c for c in range(9) if parent[c] == m]
        for h in range(H):
            if not kids:
                assert got[m, h].abs().sum() == 0
                continue
            s = torch.stack([q[m, h] @ k[c, h] / dh ** 0.5 for c in kids])
            w = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
            torch.testing.assert_close(got[m, h], sum(w[i] * v[c, h] for i, c in enumerate(kids)))


def sub_inputs(n, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = 4 ** K
    valid = torch.rand(n, S, generator=g) < 0.7
    valid[torch.arange(n), torch.randint(S, (n,), generator=g)] = True
    return torch.randn(n, S, C, generator=g), valid


LEVEL_CFGS = [small_cfg(sub_levels=1, out_levels=[-1, 0, 2]),
              small_cfg(sub_levels=2, sub_pool="attention", out_levels=[-2, -1, 0, 1]),
              small_cfg(sub_levels=1, sub_pool="attention", out_levels=[0], head="pathway",
                        attention="knn", bias="alibi"),
              small_cfg(out_levels=[0, 1, 2], unit_um=100.0)]


@pytest.mark.parametrize("cfg", LEVEL_CFGS)
def test_level_outputs_follow_their_contract(cfg):
    """Rows below the spot are the valid (caller's spot, sub-position) pairs in that order; each
    parent map sends a row to the row of the level above that holds it (checked with the
    sub-positions by hand)."""
    feats, xy = hex_slide()
    n, K = len(xy), cfg.sub_levels
    sub, valid = sub_inputs(n, K) if K else (None, None)
    out = make(cfg)(feats, xy, sub_features=sub, sub_valid=valid)
    assert out["pred"].shape == (n, G)
    assert sorted(out["levels"]) == sorted(k for k in cfg.out_levels if k != 0)
    for k in range(-K, 0):
        r = 2 ** -k
        rows = []
        for a in range(n):  # a sub-position of level k exists if any data child does
            R = 2 ** K
            have = {r * ((s // R) * r // R) + (s % R) * r // R for s in range(R * R) if valid[a, s]}
            rows += [a * r * r + t for t in sorted(have)]
        assert out["sub_index"][k].tolist() == rows
        up = out["parents"][k]
        for row, flat in enumerate(rows):
            a, t = divmod(flat, r * r)
            if k == -1:
                assert up[row] == a
            else:  # the level above (r / 2) holds (a, coarser position)
                ix, iy = divmod(t, r)
                assert (out["sub_index"][k + 1][up[row]]
                        == a * (r // 2) ** 2 + (r // 2) * (ix // 2) + iy // 2)
        if k in out["levels"]:
            assert out["levels"][k].shape == (len(rows), G)
    if K:
        pooled, own = out["align"]
        assert pooled.shape == own.shape == (n, cfg.dim)
    for k in [k for k in cfg.out_levels if k > 0]:
        assert out["levels"][k].shape == (int(out["parents"][k - 1].max()) + 1, G)
    # the level above the spot: a spot's parent holds
    # it in the lattice (sites // 2 of the spot level)
    sites = lattice.to_lattice(xy, cfg.unit_um or lattice.default_unit(xy))
    key = {}
    for a in range(n):
        key.setdefault(tuple((sites[a] // 2).tolist()), set()).add(int(out["parents"][0][a]))
    assert (all(len(v) == 1 for v in key.values())
            and len(key) == len({int(p) for p in out["parents"][0]}))


@pytest.mark.parametrize("cfg", LEVEL_CFGS[:3])
def test_levels_are_equivariant_to_the_spot_order(cfg):
    feats, xy = hex_slide()
    n = len(xy)
    sub, valid = sub_inputs(n, cfg.sub_levels)
    model = make(cfg)
    with torch.no_grad():
        a = model(feats, xy, sub_features=sub, sub_valid=valid)
        p = torch.randperm(n, generator=torch.Generator().manual_seed(3))
        b = model(feats[p], xy[p], sub_features=sub[p], sub_valid=valid[p])
    torch.testing.assert_close(b["pred"], a["pred"][p], rtol=1e-4, atol=1e-5)
    for k, pred in a["levels"].items():
        if k < 0:
            S = 4 ** -k
            where = {int(f): i for i, f in enumerate(a["sub_index"][k])}
            rows = [where[int(p[f // S]) * S + int(f % S)] for f in b["sub_index"][k]]
            torch.testing.assert_close(b["levels"][k], pred[rows], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", LEVEL_CFGS[:2])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_gradients_do_not_depend_on_the_chunk_size(cfg, checkpointed, monkeypatch):
    """With autograd, chunks of 7 rows (the tokens' online softmax over chunks of spots, kernels.py)
    give every parameter the gradient one chunk gives, through every level's output, with and
    without model.checkpoint."""
    import kernels as attention
    feats, xy = hex_slide()
    sub, valid = sub_inputs(len(xy), cfg.sub_levels)
    feats, sub = feats.double(), sub.double()  # float64: summation order hardly shows
    model = make(ModelConfig(**dict(cfg.__dict__, checkpoint=checkpointed))).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {k: torch.randn(G, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(abs(k)))
               for k in [0, *cfg.out_levels]}

    def grads(chunk):
        monkeypatch.setattr(attention, "CHUNK", chunk)
        model.zero_grad()
        out = model(feats, xy, sub_features=sub, sub_valid=valid)
        loss = ((out["pred"] * weights[0]).sum()
                + sum((p * weights[k]).sum() for k, p in out["levels"].items()))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    whole, chunked = grads(1 << 20), grads(7)
    assert set(whole) == set(chunked) and len(whole) > 20
    for name in whole:
        err = (chunked[name] - whole[name]).abs().max() / whole[name].abs().max().clamp_min(1e-12)
        # float64, but the tokens' online softmax is in float32
        assert err < 1e-5, (name, float(err))


@pytest.mark.parametrize("cfg", LEVEL_CFGS)
def test_level_outputs_do_not_depend_on_the_chunk_size(cfg, monkeypatch):
    """Inference (eval, no grad, chunks of 7 rows, window batches of at most 20 pairs) gives every
    level what one chunk gives with grad enabled."""
    import kernels as where                                            # the per-spot chunk size
    feats, xy = hex_slide()
    K = cfg.sub_levels
    sub, valid = sub_inputs(len(xy), K) if K else (None, None)
    model = make(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(where, "CHUNK", 1 << 20)
    whole = model(feats, xy, sub_features=sub, sub_valid=valid)
    monkeypatch.setattr(where, "CHUNK", 7)
    monkeypatch.setattr(where, "PADDED", 0)
    monkeypatch.setattr(where, "PAIRS", 20)
    with torch.no_grad():
        chunked = model(feats, xy, out_dtype=torch.float64, sub_features=sub, sub_valid=valid)
    torch.testing.assert_close(chunked["pred"].float(), whole["pred"].detach(),
                               rtol=1e-4, atol=1e-5)
    for k in whole["levels"]:
        torch.testing.assert_close(chunked["levels"][k].float(), whole["levels"][k].detach(),
                                   rtol=1e-4, atol=1e-5)
    for key in ("parents", "sub_index"):
        for k in whole.get(key, {}):
            assert torch.equal(chunked[key][k], whole[key][k])
    assert "align" not in chunked and ("align" in whole) == bool(K)


def test_sub_levels_need_their_sub_features():
    feats, xy = hex_slide()
    model = make(small_cfg(sub_levels=1, out_levels=[-1, 0]))
    with pytest.raises(ValueError,
                       match=r"model\.sub_levels = 1 needs sub_features of shape \(144, 4, C\)"):
        model(feats, xy)
    with pytest.raises(ValueError, match=r"found \(144, 16, 12\)"):
        model(feats, xy, sub_features=torch.zeros(len(xy), 16, C))


@pytest.mark.parametrize("arch,extra",
                         [("tessera", {}), ("tessera", {"spatial_start": True, "slide_norm": True}),
                          ("linear", {}), ("mlp", {}), ("ridge", {}), ("ridge_spatial", {})])
def test_every_model_states_the_feature_width_it_expects(arch, extra):
    """predict.py compares a cache's feature width with feat_mean's before predicting."""
    m = build_model(ModelConfig(arch=arch, dim=8, heads=2, pathway_tokens=0, **extra), 7, 3)
    assert m.feat_mean.shape == (7,)


@pytest.mark.parametrize("arch", ["ridge", "ridge_spatial", "tessera"])
def test_closed_forms_run_in_float64_and_never_in_bf16(arch):
    """The closed-form models (the ridge, the spatial ridge, tessera's spatial start) evaluate their
    float64 solution in the model's own dtype: a float64 model runs (a float32 design met float64
    weights before), and under bf16 autocast (train.forward and predict.py use it on CUDA; here its
    CPU twin) the products stay in float32, so the closed form's prediction is unchanged."""
    feats, xy = hex_slide()
    extra = {"spatial_start": True, "slide_norm": True} if arch == "tessera" else {}
    torch.manual_seed(0)
    model = build_model(small_cfg(arch=arch, pca=8, **extra), C, G).eval()
    target = torch.randn(len(xy), G)
    model.init_from_data(feats.mean(0), feats.std(0), target.mean(0))
    batch = {"features": feats, "coords": xy, "target": target}
    model.fit(feats, target) if arch == "ridge" else model.fit_slides([batch])
    ridge = model.start if arch == "tessera" else model
    with torch.no_grad():
        pred = ridge(feats, xy)["pred"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ridge(feats, xy)["pred"], pred)
        model64 = copy.deepcopy(model).double()
        pred64 = model64(feats.double(), xy.double())["pred"]
        assert pred64.dtype == torch.float64
        torch.testing.assert_close(pred64.float(), model(feats, xy)["pred"], rtol=1e-4, atol=1e-4)


class TwoLayerHead(model_module.Head, torch.nn.Sequential):
    """A new head type, as a fork would add one: a class and its entry in model.HEADS."""

    def __init__(self, cfg, dim, n_genes):
        super().__init__(torch.nn.Linear(dim, 7), torch.nn.Tanh(), torch.nn.Linear(7, n_genes))

    def forward(self, x, pathways):
        return {"pred": super().forward(x)}

    def start(self):
        return self[-1]


class NoStartHead(TwoLayerHead):
    start = model_module.Head.start


def spatial_start_training(head, steps=5):
    """The head's Linear layers' gradient sums over `steps` AdamW steps under
    model.spatial_start."""
    g = torch.Generator().manual_seed(0)
    feats, xy = hex_slide()
    y = torch.randn(len(xy), G, generator=g)
    cfg = small_cfg(head=head, spatial_start=True, hidden=16, dropout=0.0, attn_dropout=0.0)
    net = build_model(cfg, C, G)
    net.init_from_data(feats.mean(0), feats.std(0), y.mean(0))
    net.fit_slides([{"features": feats, "coords": xy, "target": y}])
    layers = [m for m in net.net.head.modules() if isinstance(m, torch.nn.Linear)]
    sums = torch.zeros(len(layers))
    opt = torch.optim.AdamW(net.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        ((net(feats, xy)["pred"] - y) ** 2).mean().backward()
        sums += torch.tensor([float(m.weight.grad.abs().sum()) for m in layers])
        opt.step()
    return sums


def test_a_new_head_is_one_class_and_one_entry_and_trains_under_the_spatial_start(monkeypatch):
    """model.spatial_start zeroes the head's start() layer only: the network's residual starts at 0
    and every layer of the head gets a gradient (zeroing every layer would leave them all at 0)."""
    assert (spatial_start_training("mlp") > 0).all()
    monkeypatch.setitem(model_module.HEADS, "two_layer", TwoLayerHead)
    assert (spatial_start_training("two_layer") > 0).all()
    monkeypatch.setitem(model_module.HEADS, "no_start", NoStartHead)
    with pytest.raises(ValueError, match="NoStartHead names no layer to start at zero"):
        spatial_start_training("no_start")

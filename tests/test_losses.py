"""losses.py: every loss against a direct formula written here (loops over spots, genes and
children)."""
import math

import numpy as np
import pytest
import torch

import losses


def test_pcc_loss_matches_a_loop_and_has_correct_gradients():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 4, generator=g, dtype=torch.float64)
    ref = 0.0
    for j in range(4):
        a, b = pred[:, j].tolist(), y[:, j].tolist()
        ma, mb = sum(a) / 9, sum(b) / 9
        cov = sum((ai - ma) * (bi - mb) for ai, bi in zip(a, b))
        va = sum((ai - ma) ** 2 for ai in a) ** 0.5
        vb = sum((bi - mb) ** 2 for bi in b) ** 0.5
        ref += cov / (va * vb) / 4
    assert losses.pcc_loss(pred, y).item() == pytest.approx(1 - ref, rel=1e-6)
    assert torch.autograd.gradcheck(lambda p: losses.pcc_loss(p, y), (pred,))


def test_pcc_loss_gradient_is_finite_for_constant_columns():
    pred = torch.randn(6, 3, dtype=torch.float64)
    pred[:, 1] = 0.7                                  # e.g. a gene that no pathway reaches
    pred.requires_grad_(True)
    y = torch.randn(6, 3, dtype=torch.float64)
    y[:, 2] = 0.0                                     # a gene absent from the slide
    loss = losses.pcc_loss(pred, y)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    a = [losses.pearson_per_column(pred[:, [j]], y[:, [j]]).item() for j in range(3)]
    assert abs(a[1]) < 1e-9 and abs(a[2]) < 1e-9


def zinb_pmf(x, mu, theta, pi):
    """ZINB probability mass written out with lgamma, in plain Python."""
    log_nb = (math.lgamma(x + theta) - math.lgamma(theta) - math.lgamma(x + 1)
              + theta * math.log(theta / (theta + mu)) + x * math.log(mu / (theta + mu)))
    nb = math.exp(log_nb)
    return pi + (1 - pi) * nb if x == 0 else (1 - pi) * nb


@pytest.mark.parametrize("x,mu,theta,pi",
                         [(0, 2.0, 1.5, 0.3), (3, 2.0, 1.5, 0.3), (0, 0.1, 10.0, 0.01),
                          (17, 9.5, 0.7, 0.6), (1, 50.0, 3.0, 0.05)])
def test_zinb_nll_equals_the_pmf(x, mu, theta, pi):
    t = lambda v: torch.tensor([[float(v)]], dtype=torch.float64)
    logit = math.log(pi / (1 - pi))
    nll = losses.zinb_nll(t(x), t(mu), t(theta), t(logit)).item()
    assert nll == pytest.approx(-math.log(zinb_pmf(x, mu, theta, pi)), rel=1e-6)


def test_pathway_loss_against_explicit_reference():
    g = np.random.default_rng(0)
    y = g.normal(size=(20, 5))
    scores = g.normal(size=(20, 3))
    member = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=float)
    z = (y - y.mean(0)) / y.std(0)
    pccs = []
    for p in (0, 2):  # pathway 1 has no member gene and is skipped
        act = np.array([np.mean([z[n, gi] for gi in range(5) if member[p, gi]]) for n in range(20)])
        pccs.append(np.corrcoef(scores[:, p], act)[0, 1])
    loss = losses.pathway_loss(torch.tensor(scores), torch.tensor(y), torch.tensor(member))
    assert loss.item() == pytest.approx(1 - np.mean(pccs), rel=1e-5)


def _parents(rng, sizes):
    """Random parent maps between levels of the given sizes (every parent has at least one
    child)."""
    maps = []
    for n_child, n_parent in zip(sizes, sizes[1:]):
        p = np.concatenate([np.arange(n_parent), rng.integers(0, n_parent, n_child - n_parent)])
        maps.append(torch.tensor(rng.permutation(p)))
    return maps


def test_level_losses_against_explicit_formulas():
    rng = np.random.default_rng(0)
    n_sub, n, G = 40, 12, 5
    up, = _parents(rng, [n_sub, n])
    pred_sub = torch.tensor(rng.normal(1.0, 1.0, (n_sub, G)), dtype=torch.float32,
                            requires_grad=True)
    target = torch.tensor(rng.uniform(0, 4, (n, G)), dtype=torch.float32)
    # aggregation: MSE(log1p(sum_s expm1(pred_sub)), target), children summed one by one
    want = 0.0
    for i in range(n):
        for g in range(G):
            total = sum(max(math.expm1(pred_sub[c, g].item()), 0.0) for c in range(n_sub)
                        if up[c] == i)
            want += (math.log1p(total) - target[i, g].item()) ** 2
    loss = losses.aggregation_loss(pred_sub, up, target)
    assert loss.item() == pytest.approx(want / (n * G), rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred_sub.grad).all() and pred_sub.grad.abs().sum() > 0
    # consistency (MagNet): parent prediction against its children's, both predicted
    pred_parent = torch.tensor(rng.normal(2.0, 1.0, (n, G)), dtype=torch.float32)
    want = 0.0
    for i in range(n):
        for g in range(G):
            total = sum(max(math.expm1(pred_sub[c, g].item()), 0.0) for c in range(n_sub)
                        if up[c] == i)
            want += (pred_parent[i, g].item() - math.log1p(total)) ** 2
    assert (losses.consistency_loss(pred_parent, pred_sub, up).item()
            == pytest.approx(want / (n * G), rel=1e-5))
    # alignment (HiFusion): 1 - cosine, mean over spots
    a, b = rng.normal(size=(n, 7)), rng.normal(size=(n, 7))
    want = np.mean([1 - a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i])
                    for i in range(n)])
    got = losses.alignment_loss(torch.tensor(a, dtype=torch.float32),
                                torch.tensor(b, dtype=torch.float32))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_level_targets_and_composed_parent_maps():
    rng = np.random.default_rng(1)
    sizes = [60, 20, 9, 4, 2]                                    # levels -2 .. 2
    maps = _parents(rng, sizes)
    parents = {k: m for k, m in zip(range(-2, 2), maps)}
    for a in range(-2, 3):
        for b in range(a, 3):
            got = losses.to_level(parents, a, b)
            for row in range(sizes[a + 2]):                      # follow the chain by hand
                r = row
                for k in range(a, b):
                    r = int(parents[k][r])
                assert (row if got is None else int(got[row])) == r
    counts = torch.tensor(rng.poisson(3.0, (9, 4)), dtype=torch.float32)  # level 0: 9 spots
    for k in (1, 2):
        got = losses.level_target(counts, parents, k, sizes[k + 2])
        for row in range(sizes[k + 2]):
            members = [s for s in range(9) if int(losses.to_level(parents, 0, k)[s]) == row]
            assert torch.allclose(got[row], torch.log1p(counts[members].sum(0)))

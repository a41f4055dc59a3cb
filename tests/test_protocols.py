"""Tests for protocols.py: the papers' slide lists and label smoothing, each against a reference
written here (the papers' own code restated, dense loops). Gene-name harmonisation is tested with
the h5ad import (test_hest.py), the papers' numbers beside a run's with protocols.py's command
(test_eval.py), the papers' fold assignments with the other folds (test_data.py)."""
import math
from pathlib import Path

import numpy as np
import pytest

import protocols
from data import CacheError

ROOT = Path(__file__).resolve().parents[1]


def test_slide_lists_expand_the_printed_ranges_and_counts():
    lists = protocols.read_slide_lists(ROOT / "configs/protocols/hist_slides.yaml")
    assert (lists["kidney"][:4] == ["NCBI538", "NCBI539", "NCBI540", "NCBI562"]
            and "NCBI599" in lists["kidney"])
    assert lists["heart"][35:37] == ["MISC136", "MISC138"]            # MISC137 is not in Table 4
    assert sum(map(len, lists.values())) == 14 + 41 + 41 + 34 + 14 + 20 + 27 + 59 + 15 + 104 + 4
    path, ids = protocols.dataset_slides("hist:lung_ncbi")
    assert ids == ["NCBI534", "NCBI535", "NCBI536", "NCBI537"] and path.name == "hist_slides.yaml"
    with pytest.raises(CacheError, match=r"expected a dataset 'lung'; it has \["):
        protocols.dataset_slides("hist:lung")


def test_slide_lists_refuse_a_slide_in_two_datasets_and_a_wrong_count(tmp_path):
    p = tmp_path / "x_slides.yaml"
    p.write_text("a: {n: 3, slides: [S1-S3]}\nb: {n: 2, slides: [S3, S9]}\n")
    with pytest.raises(CacheError,
                       match=r"x_slides\.yaml: slides listed in two datasets \(b and a\): S3"):
        protocols.read_slide_lists(p)
    p.write_text("a: {n: 4, slides: [S1-S3]}\n")
    with pytest.raises(CacheError,
                       match=r"x_slides\.yaml: a: expected 4 slides as printed, found 3"):
        protocols.read_slide_lists(p)
    p.write_text("a: {slides: [S3-T5]}\n")
    with pytest.raises(CacheError,
                       match=r"expected an id range like NCBI628-NCBI641, found 'S3-T5'"):
        protocols.read_slide_lists(p)


def spcs_reference(E, grid, alpha, beta, tau_p, tau_s, n_pcs, hexagonal):
    """SPCS written from its definition: eigen-decomposed covariance, explicit loops over spot
    pairs."""
    N = len(E)
    Ec = E - E.mean(0)
    evals, evecs = np.linalg.eigh(Ec.T @ Ec)
    V = evecs[:, ::-1][:, :n_pcs]
    S = Ec @ V
    for c in range(S.shape[1]):
        if S[np.argmax(np.abs(S[:, c])), c] < 0:
            S[:, c] = -S[:, c]
    pattern, spatial = np.zeros_like(E), np.zeros_like(E)
    t = 2 * tau_s if hexagonal else tau_s
    for i in range(N):
        cand = []
        for j in range(N):
            if j != i:
                d = 1 - np.corrcoef(S[i], S[j])[0, 1]
                if d <= 1:
                    cand.append((-math.exp(-4.5 * d * d), j))
        chosen = sorted(cand)[:tau_p]
        total = sum(-w for w, _ in chosen)
        pattern[i] = sum(-w * E[j] for w, j in chosen) / (total + 1e-8)
        near = [(1 / dist, j) for j in range(N)
                if 0 < (dist := abs(grid[i][0] - grid[j][0]) + abs(grid[i][1] - grid[j][1])) <= t]
        total = sum(w for w, _ in near)
        spatial[i] = sum(w * E[j] for w, j in near) / (total + 1e-8)
    return (1 - alpha) * E + alpha * (beta * spatial + (1 - beta) * pattern)


@pytest.mark.parametrize("tau_p,tau_s,hexagonal,chunk",
                         [(16, 2, False, 2048), (5, 1, True, 7), (100, 3, False, 13)])
def test_spcs_matches_its_definition(tau_p, tau_s, hexagonal, chunk):
    r = np.random.default_rng(tau_p)
    sites = r.choice(12 * 12, 60, replace=False)
    grid = np.stack([sites // 12, sites % 12], 1)
    E = np.log1p(r.poisson(r.gamma(1.0, 3.0, (1, 15)) * r.gamma(2.0, 0.5, (60, 1)),
                           (60, 15)).astype(float))
    got = protocols.spcs(E, grid, 0.6, 0.4, tau_p, tau_s, 10, hexagonal, chunk=chunk)
    np.testing.assert_allclose(got, spcs_reference(E, grid, 0.6, 0.4, tau_p, tau_s, 10, hexagonal),
                               atol=1e-10)
    with pytest.raises(ValueError, match="expected unique grid positions, found 1 repeated"):
        protocols.spcs(E[:3], np.array([[0, 0], [0, 1], [0, 1]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_array_neighbours_find_the_spot_at_each_offset(seed):
    r = np.random.default_rng(seed)
    sites = r.choice(9 * 7, 30, replace=False)
    grid = np.stack([sites // 7 - 4, sites % 7 + 3], 1)  # any origin, negative positions too
    neighbour, n_sites = protocols.array_neighbours(grid)
    assert n_sites == 30
    for di in range(-3, 4):
        for dj in range(-3, 4):
            expect = [next((j for j in range(30) if (grid[j] == grid[i] + (di, dj)).all()), -1)
                      for i in range(30)]
            assert neighbour(di, dj).tolist() == expect
    # a repeated position
    assert protocols.array_neighbours(np.array([[0, 0], [2, 1], [0, 0]]))[1] == 2


def test_eight_neighbour_mean_and_minmax_rescale():
    r = np.random.default_rng(3)
    grid = np.array([[0, 0], [0, 1], [1, 1], [3, 3], [2, 2]])
    x = r.normal(size=(5, 4))
    expect = np.stack([x[[j for j in range(5) if np.abs(grid[j] - grid[i]).max() <= 1]].mean(0)
                       for i in range(5)])
    np.testing.assert_allclose(protocols.eight_neighbour_mean(x, grid), expect)
    x[:, 2] = 7.0                                                   # a constant column maps to lo
    y = protocols.minmax_to_range(x, -1.0, 2.0)
    for c in (0, 1, 3):
        np.testing.assert_allclose(
            y[:, c], -1 + 3 * (x[:, c] - x[:, c].min()) / (x[:, c].max() - x[:, c].min()))
    assert (y[:, 2] == -1).all()

"""The spatial baseline, tessera's spatial start, per-slide standardisation, weight averaging and the
real-geometry accuracy benchmark, each against an independent reference written here."""
import numpy as np
import pytest
import torch

import model as model_module
from model import ModelConfig, build_model, neighbour_mean, radius_pairs, slide_standardise

C, G = 5, 3


def grid_slide(n=9, pitch=200.0, seed=0, drop=0.2):
    """A jittered square grid with holes (legacy ST-like), features and targets, float32."""
    g = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    xy = np.stack([j.ravel(), i.ravel()], 1) * pitch + g.normal(scale=5.0, size=(n * n, 2))
    xy = xy[g.random(n * n) > drop]
    f = g.normal(size=(len(xy), C))
    y = g.normal(size=(len(xy), G)) + f[:, :G]
    return (torch.tensor(f, dtype=torch.float32), torch.tensor(xy, dtype=torch.float32),
            torch.tensor(y, dtype=torch.float32))


def ref_pitch(xy):
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.median(d.min(1))


def ref_neighbour_mean(x, xy, r):
    """Explicit loop over spot pairs."""
    out = np.empty_like(x)
    for a in range(len(x)):
        nb = [b for b in range(len(x)) if b != a and np.hypot(*(xy[a] - xy[b])) <= r]
        out[a] = x[nb].mean(0) if nb else x[a]
    return out


@pytest.mark.parametrize("radius", [0.5, 1.0, 2.3, 50.0])
def test_radius_pairs_are_exactly_the_pairs_within_the_radius(radius):
    g = np.random.default_rng(1)
    xy = np.concatenate([g.uniform(0, 10, size=(150, 2)), [[3.0, 3.0], [3.0, 3.0]]])   # with a duplicate
    i, j = radius_pairs(torch.tensor(xy), radius)
    got = sorted(zip(i.tolist(), j.tolist()))
    ref = sorted((a, b) for a in range(len(xy)) for b in range(len(xy))
                 if a != b and np.hypot(*(xy[a] - xy[b])) <= radius)
    assert got == ref


def test_neighbour_mean_matches_an_explicit_loop():
    f, xy, _ = grid_slide(seed=2, drop=0.5)          # holes: some spots have no neighbour within 1 pitch
    for r in (150.0, 300.0, 600.0):
        np.testing.assert_allclose(neighbour_mean(f, xy, r).numpy(),
                                   ref_neighbour_mean(f.numpy().astype(np.float64), xy.numpy().astype(np.float64), r),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slide_norm", [False, True])
def test_spatial_ridge_matches_explicit_neighbours_and_a_least_squares_solve(slide_norm):
    """ridge_spatial: ridge with intercept on [z, mean z within r1 pitches, within r2 pitches], z the
    standardised features; reference: explicit neighbour loop, numpy lstsq on the augmented system."""
    radii, alpha = [1.5, 3.0], 2.0
    cfg = ModelConfig(arch="ridge_spatial", radii=radii, ridge_alpha=alpha, slide_norm=slide_norm)
    slides = [grid_slide(seed=s) for s in range(3)]
    train, test = slides[:2], slides[2]
    feats = torch.cat([s[0] for s in train])
    m = build_model(cfg, C, G)
    m.init_from_data(feats.mean(0), feats.std(0), torch.cat([s[2] for s in train]).mean(0))
    m.fit_slides([{"features": f, "coords": xy, "target": y} for f, xy, y in train])

    F = feats.numpy().astype(np.float64)
    mean, std = F.mean(0), F.std(0, ddof=1)

    def design(f, xy):
        f, xy = f.numpy().astype(np.float64), xy.numpy().astype(np.float64)
        z = (f - f.mean(0)) / f.std(0) if slide_norm else (f - mean) / std
        p = ref_pitch(xy)
        return np.concatenate([z] + [ref_neighbour_mean(z, xy, r * p) for r in radii], 1)

    X = np.concatenate([design(f, xy) for f, xy, _ in train])
    Y = np.concatenate([y.numpy() for _, _, y in train]).astype(np.float64)
    D = X.shape[1]
    # ridge with an unpenalised intercept = least squares on [X 1; sqrt(alpha) I 0] against [Y; 0]
    A = np.block([[X, np.ones((len(X), 1))], [np.sqrt(alpha) * np.eye(D), np.zeros((D, 1))]])
    W = np.linalg.lstsq(A, np.concatenate([Y, np.zeros((D, G))]), rcond=None)[0]
    ref = np.concatenate([design(test[0], test[1]), np.ones((len(test[0]), 1))], 1) @ W
    np.testing.assert_allclose(m(test[0], test[1])["pred"].numpy(), ref, rtol=1e-4, atol=1e-4)

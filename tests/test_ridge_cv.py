"""The spatial ridge's alpha and per-slide standardisation chosen on the training slides
(model.ridge_cv, model.slide_norm = auto), against explicit leave-one-group-out loops written
here."""
import numpy as np
import pytest
import torch

import baselines
from model import ModelConfig, build_model
from test_accuracy import grid_slide, ref_neighbour_mean, ref_pitch

C, G = 5, 3


def ref_design(f, xy, radii, mean, std, slide_norm):
    f, xy = f.numpy().astype(np.float64), xy.numpy().astype(np.float64)
    z = (f - f.mean(0)) / f.std(0) if slide_norm else (f - mean) / std
    p = ref_pitch(xy)
    return np.concatenate([z] + [ref_neighbour_mean(z, xy, r * p) for r in radii], 1)


def ref_ridge(X, Y, alpha):
    """Ridge with an unpenalised intercept: lstsq of [X 1; sqrt(alpha) I 0] against [Y; 0]."""
    D = X.shape[1]
    A = np.block([[X, np.ones((len(X), 1))], [np.sqrt(alpha) * np.eye(D), np.zeros((D, 1))]])
    return np.linalg.lstsq(A, np.concatenate([Y, np.zeros((D, Y.shape[1]))]), rcond=None)[0]


def ref_pcc_gene(p, t):
    return np.mean([np.corrcoef(p[:, g], t[:, g])[0, 1] for g in range(t.shape[1])])


def ref_logo(designs, targets, groups, alphas):
    """Per alpha: mean over groups of pcc_gene on the group, the ridge fitted on every other
    group."""
    out = []
    for a in alphas:
        scores = []
        for g in sorted(set(groups)):
            fit = [i for i, h in enumerate(groups) if h != g]
            held = [i for i, h in enumerate(groups) if h == g]
            W = ref_ridge(np.concatenate([designs[i] for i in fit]),
                          np.concatenate([targets[i] for i in fit]), a)
            X = np.concatenate([designs[i] for i in held])
            scores.append(ref_pcc_gene(np.c_[X, np.ones(len(X))] @ W,
                                       np.concatenate([targets[i] for i in held])))
        out.append(np.mean(scores))
    return np.array(out)


class _Slide:
    def __init__(self, patient):
        self.patient = patient


def batches_of(slides, patients):
    return [{"features": f, "coords": xy, "target": y, "slide": _Slide(p)}
            for (f, xy, y), p in zip(slides, patients)]


def test_leave_one_group_out_scores_match_explicit_refits():
    g = np.random.default_rng(3)
    designs = [g.normal(size=(n, 6)) for n in (30, 41, 25, 33)]
    W = g.normal(size=(6, 4))
    targets = [d @ W + 2.0 * g.normal(size=(len(d), 4)) for d in designs]
    groups = ["a", "b", "a", "c"]                       # a group of two slides is held out together
    alphas = [0.01, 1.0, 30.0, 1000.0]
    got = baselines.cv_scores([torch.tensor(d) for d in designs],
                              [torch.tensor(t) for t in targets], groups, alphas)
    np.testing.assert_allclose(got, ref_logo(designs, targets, groups, alphas),
                               rtol=1e-8, atol=1e-10)


def test_cv_groups_are_patients_from_three_on_else_slides():
    slides = [(None, None, None)] * 4
    assert baselines.cv_groups(batches_of(slides, "AABC")) == list("AABC")
    assert baselines.cv_groups(batches_of(slides[:3], "AAB")) == ["0", "1", "2"]


def fitted(cfg, slides, patients):
    feats = torch.cat([s[0] for s in slides])
    m = build_model(cfg, C, G)
    m.init_from_data(feats.mean(0), feats.std(0), torch.cat([s[2] for s in slides]).mean(0))
    m.fit_slides(batches_of(slides, patients))
    return m.eval()


def test_ridge_cv_fits_the_alpha_with_the_best_leave_one_patient_out_score():
    radii = [1.5]
    slides = [grid_slide(seed=s) for s in range(4)]
    patients = "ABCD"
    feats = np.concatenate([f.numpy() for f, _, _ in slides]).astype(np.float64)
    mean, std = feats.mean(0), feats.std(0, ddof=1)
    designs = [ref_design(f, xy, radii, mean, std, False) for f, xy, _ in slides]
    targets = [y.numpy().astype(np.float64) for _, _, y in slides]
    alphas = [a * len(feats) for a in baselines.ALPHAS]
    best = alphas[int(np.argmax(ref_logo(designs, targets, list(patients), alphas)))]
    m = fitted(ModelConfig(arch="ridge_spatial", radii=radii, ridge_cv=True), slides, patients)
    assert m.chosen.startswith(f"alpha {best:.3g}")
    test = grid_slide(seed=9)
    W = ref_ridge(np.concatenate(designs), np.concatenate(targets), best)
    X = ref_design(test[0], test[1], radii, mean, std, False)
    np.testing.assert_allclose(m(test[0], test[1])["pred"].numpy(), np.c_[X, np.ones(len(X))] @ W,
                               rtol=1e-4, atol=1e-4)


def shifted(seed, composition: bool):
    """A slide whose features carry a random per-slide affine shift (a stain), or whose slide-level
    mean carries the targets (composition: more of one tissue on some slides), which per-slide
    standardisation erases."""
    f, xy, _ = grid_slide(seed=seed)
    g = np.random.default_rng(100 + seed)
    if composition:
        f = f + torch.tensor(g.normal(scale=2.0, size=(1, C)), dtype=torch.float32)
        y = f[:, :G] + 0.3 * torch.randn(len(f), G, generator=torch.Generator().manual_seed(seed))
    else:
        y = f[:, :G] + 0.3 * torch.randn(len(f), G, generator=torch.Generator().manual_seed(seed))
        f = f * torch.tensor(np.exp(g.normal(size=C)), dtype=torch.float32) + \
            torch.tensor(g.normal(scale=3.0, size=C), dtype=torch.float32)
    return f, xy, y


@pytest.mark.parametrize("composition, expected", [(False, True), (True, False)])
def test_slide_norm_auto_standardises_a_stain_shift_and_keeps_composition(composition, expected):
    slides = [shifted(s, composition) for s in range(5)]
    for arch in ("ridge_spatial", "tessera"):
        cfg = ModelConfig(arch=arch, radii=[1.5], ridge_cv=True, slide_norm="auto", dim=8, heads=2,
                          depths=[1], decoder_depths=[], w=2)
        m = fitted(cfg, slides, "ABCDE")
        assert m.norm_on() is expected
        assert f"slide_norm {str(expected).lower()}" in m.chosen
    ref = build_model(ModelConfig(arch="ridge_spatial", radii=[1.5], slide_norm=expected,
                                  ridge_alpha=m.start.alpha), C, G)
    feats = torch.cat([s[0] for s in slides])
    ref.init_from_data(feats.mean(0), feats.std(0), torch.cat([s[2] for s in slides]).mean(0))
    ref.fit_slides(batches_of(slides, "ABCDE"))
    test = shifted(7, composition)
    # the checkpoint keeps the choice: a model loaded from the state dict predicts the same
    with torch.no_grad():
        loaded = build_model(ModelConfig(arch="ridge_spatial", radii=[1.5], ridge_cv=True,
                                         slide_norm="auto"), C, G)
        loaded.load_state_dict(m.start.state_dict())
        np.testing.assert_allclose(loaded(test[0], test[1])["pred"].numpy(),
                                   ref(test[0], test[1])["pred"].numpy(), rtol=1e-4, atol=1e-4)


def test_ridge_cv_on_one_slide_holds_out_four_bands_of_its_spots():
    f, xy, y = grid_slide(seed=4, n=12)
    feats = f.numpy().astype(np.float64)
    design = ref_design(f, xy, [1.5], feats.mean(0), feats.std(0, ddof=1), False)
    bands = np.array_split(np.argsort(xy[:, 0].numpy(), kind="stable"), 4)
    alphas = [a * len(f) for a in baselines.ALPHAS]
    scores = ref_logo([design[b] for b in bands], [y.numpy().astype(np.float64)[b] for b in bands],
                      list("0123"), alphas)
    m = fitted(ModelConfig(arch="ridge_spatial", radii=[1.5], ridge_cv=True), [(f, xy, y)], "A")
    assert m.alpha == alphas[int(np.argmax(scores))]


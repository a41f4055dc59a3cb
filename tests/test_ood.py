"""model.ood_fallback: a slide unlike every training slide is predicted by the spatial ridge alone.
The distances and the radius against explicit loops over slides; the prediction against the ridge
reference of test_accuracy.py."""
import numpy as np
import pytest
import torch

from baselines import novelty_radius
from model import ModelConfig, build_model
from test_accuracy import C, TINY, fitted, grid_slide, ref_spatial_ridge


def ref_distance(a, b, scale):
    return float(np.sqrt(np.mean(((a - b) / scale) ** 2)))


@pytest.mark.parametrize("groups", [list("abcdef"), list("aabbbc"), list("aaaaab")])
def test_novelty_radius_is_the_largest_distance_to_the_nearest_slide_of_another_group(groups):
    g = np.random.default_rng(len(set(groups)))
    means, scale = g.normal(size=(6, 4)), g.uniform(0.5, 2.0, size=4)
    ref = max(min(ref_distance(means[i], means[j], scale) for j in range(6)
                  if groups[j] != groups[i])
              for i in range(6))
    got = novelty_radius(torch.tensor(means), torch.tensor(scale), groups)
    assert got == pytest.approx(ref, rel=1e-9)


def test_novelty_radius_of_a_single_group_is_zero():
    assert novelty_radius(torch.randn(3, 4), torch.ones(4), ["p", "p", "p"]) == 0.0


def gated(slide_norm=True):
    radii, alpha = [1.5], 1.0
    slides = [grid_slide(seed=s) for s in range(3)]
    m = fitted(ModelConfig(spatial_start=True, slide_norm=slide_norm, radii=radii,
                           ridge_alpha=alpha, ood_fallback=True, **TINY), slides)
    with torch.no_grad():
        for p in m.net.parameters():                                   # a residual that is not zero
            p.add_(0.1 * torch.randn_like(p))
    return m, slides, radii, alpha


def test_the_radius_and_the_distances_are_those_of_the_training_slides():
    m, slides, _, _ = gated()
    feats = [s[0].double().numpy() for s in slides]
    scale = np.concatenate(feats).std(0, ddof=1)
    means = [f.mean(0) for f in feats]
    # three slides of no named patient: each slide is its own group
    ref = max(min(ref_distance(means[i], means[j], scale) for j in range(3) if j != i)
              for i in range(3))
    assert float(m.ood_radius) == pytest.approx(ref, rel=1e-4)
    new = slides[0][0] + 3.0
    assert m.novelty(new) == pytest.approx(min(ref_distance(new.double().numpy().mean(0), mu, scale)
                                                for mu in means), rel=1e-4)


def test_an_unlike_slide_gets_the_spatial_ridge_alone_and_a_like_slide_the_ridge_plus_the_network():
    m, slides, radii, alpha = gated()
    f, xy, _ = slides[1]                                 # a training slide: distance 0, like the
                                                         # training slides
    far = f + 3.0                                        # every feature shifted by
                                                         # about 3 standard deviations
    assert not m.unlike_training(f) and m.unlike_training(far)
    with torch.no_grad():
        ridge_far = ref_spatial_ridge(slides, (far, xy, None), radii, alpha, slide_norm=True)
        np.testing.assert_allclose(m(far, xy)["pred"].numpy(), ridge_far, rtol=1e-4, atol=1e-4)
        ridge = ref_spatial_ridge(slides, (f, xy, None), radii, alpha, slide_norm=True)
        # the network's residual is there
        assert np.abs(m(f, xy)["pred"].numpy() - ridge).max() > 1e-3
    m.train()  # training never falls back: the residual learns
    assert np.abs(m(far, xy)["pred"].detach().numpy() - ridge_far).max() > 1e-3


def test_a_model_fitted_to_no_slide_runs_its_network_in_inference():
    """Before fit_slides (a model built to time or inspect it) no slide is unlike the training
    slides: inference runs the network (dropout off: twice the same output) instead of failing on
    an empty set of training slides."""
    f, xy, _ = grid_slide(seed=0)
    m = build_model(ModelConfig(spatial_start=True, radii=[1.5], ood_fallback=True, **TINY), C,
                    4).eval()
    assert m.novelty(f) == 0.0 and not m.unlike_training(f)
    with torch.no_grad():
        a, b = m(f, xy)["pred"], m(f, xy)["pred"]
    assert a.shape == (len(f), 4) and torch.equal(a, b)


def test_the_training_slides_statistics_are_saved_and_loaded_with_the_model():
    m, slides, _, _ = gated()
    other = build_model(m.cfg, C, slides[0][2].shape[1]).eval()
    assert other.train_means.shape[0] == 0
    other.load_state_dict(m.state_dict())
    assert (torch.equal(other.train_means, m.train_means)
            and float(other.ood_radius) == float(m.ood_radius))
    far, xy = slides[2][0] + 3.0, slides[2][1]
    with torch.no_grad():
        assert torch.equal(other(far, xy)["pred"], m(far, xy)["pred"])


def test_ood_fallback_needs_the_spatial_start():
    import train
    from conftest import ROOT
    with pytest.raises(SystemExit, match="model.ood_fallback"):
        train.load_config(ROOT / "configs/hist.yaml", ["model.ood_fallback=true"])
    cfg = train.load_config(ROOT / "configs/tessera.yaml")
    assert cfg["model"]["ood_fallback"] is True


@pytest.mark.slow
def test_a_run_names_the_unlike_slides_and_predicts_them_by_the_spatial_ridge(tmp_path, capsys):
    """End to end: tessera.yaml's fold trained on one slide has nothing to compare a new slide with,
    so each test slide is predicted by the ridge alone: the same numbers as
    configs/ridge_spatial.yaml on the same fold, a line in the log naming the slide, and predict.py
    saying so."""
    import json
    import files
    import predict
    import synthetic
    import train
    from conftest import ROOT
    root = tmp_path / "data"
    # patients 0, 0, 0, 1
    synthetic.make_synthetic(root, n_slides=4, seed=0, n_spots=150, log=lambda *a: None)
    common = [f"data.root={root}", "data.folds=2", "data.genes={by: mean, n: 20}",
              f"run.dir={tmp_path / 'runs'}"]
    train.main([str(ROOT / "configs/tessera.yaml"), *common, "run.name=t", "model.dim=16",
                "model.heads=2", "train.epochs=1", "model.radii=[1.5]"])
    train.main([str(ROOT / "configs/ridge_spatial.yaml"), *common, "run.name=r",
                "model.radii=[1.5]"])
    log = (tmp_path / "runs" / "t" / "log.txt").read_text()
    folds = json.loads((tmp_path / "runs" / "t" / "folds.json").read_text())["folds"]
    k = next(i for i, f in enumerate(folds) if len(f["train"]) == 1)
    for s in folds[k]["test"]:
        assert (f"fold {k}: {s} is unlike every training slide: predicted by the "
                "spatial ridge alone" in log)
        got = files.read_predictions(tmp_path / "runs" / "t" / f"fold_{k}" / "pred"
                                     / f"{s}.h5")["pred"]
        want = files.read_predictions(tmp_path / "runs" / "r" / f"fold_{k}" / "pred"
                                      / f"{s}.h5")["pred"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    predict.main(["--run", str(tmp_path / "runs" / "t"), "--slides", str(root), "--out",
                  str(tmp_path / "pred"), "--fold", str(k)])
    lines = capsys.readouterr().out.splitlines()
    said = {s: next(line for line in lines if f"{s} (.h5): " in line)
            for s in folds[k]["test"] + folds[k]["train"]}
    ridge = f"unlike the training slides of fold {k}: predicted there by the spatial ridge alone"
    assert all(ridge in said[s] for s in folds[k]["test"])
    # its own training slide is like itself
    assert "spatial ridge alone" not in said[folds[k]["train"][0]]


def fallback_dataset(root):
    """Four synthetic slides of two patients (P00: three, P01: one) whose features are shifted by
    8 per patient: every slide of one patient is unlike every slide of the other, so each fold of a
    two-fold split by patient predicts all its test slides by the spatial ridge alone."""
    import data
    import synthetic
    synthetic.make_synthetic(root, n_slides=4, seed=0, n_spots=150, log=lambda *a: None)
    for path in sorted(root.glob("*.h5")):
        slide = data.read_slide(path)
        slide.features = slide.features + 8.0 * int(slide.patient[1:])
        data.write_slide(path, slide, overwrite=True)


@pytest.mark.slow
def test_a_fold_whose_every_test_slide_falls_back_trains_no_network(tmp_path, monkeypatch, capsys):
    """End to end on slides built to fall back: the fold says so before training, no epoch runs and
    the network never runs forward (the ridge alone is the model); the predictions are those of
    configs/ridge_spatial.yaml on the same folds; results.md, results.json, eval.py and predict.py's
    files say which slides fell back. train.skip_unused=false trains the network anyway."""
    import json
    import eval as evaluation
    import files
    import model as model_module
    import predict
    import train
    from conftest import ROOT
    root = tmp_path / "data"
    fallback_dataset(root)
    common = [f"data.root={root}", "data.folds=2", "data.genes={by: mean, n: 20}",
              f"run.dir={tmp_path / 'runs'}", "model.radii=[1.5]"]
    tiny = ["model.dim=16", "model.heads=2", "train.epochs=2"]
    forwards = []
    real_forward = model_module.Tessera.forward
    monkeypatch.setattr(model_module.Tessera, "forward",
                        lambda self, *a, **k: forwards.append(1) or real_forward(self, *a, **k))
    monkeypatch.setattr(train, "train_fold", lambda *a, **k: pytest.fail("a network was trained"))
    train.main([str(ROOT / "configs/tessera.yaml"), *common, *tiny, "run.name=t"])
    assert forwards == []                                  # not even to predict the test slides
    monkeypatch.undo()
    train.main([str(ROOT / "configs/ridge_spatial.yaml"), *common, "run.name=r"])
    run = tmp_path / "runs" / "t"
    log = (run / "log.txt").read_text()
    folds = json.loads((run / "folds.json").read_text())["folds"]
    for k, f in enumerate(folds):
        said = log.index(f"fold {k}: every test slide is predicted by the spatial ridge alone: the "
                         "network is not trained (train.skip_unused=false trains it anyway)")
        assert said < log.index(f"fold {k}: done in") and f"fold {k} epoch" not in log
        assert torch.load(run / f"fold_{k}" / "model.pt", weights_only=True)["trained"] is False
        for s in f["test"]:
            got = files.read_predictions(run / f"fold_{k}" / "pred" / f"{s}.h5")
            want = files.read_predictions(tmp_path / "runs" / "r" / f"fold_{k}" / "pred"
                                          / f"{s}.h5")
            np.testing.assert_allclose(got["pred"], want["pred"], rtol=1e-5, atol=1e-5)
            assert got["ridge_alone"] is True and want["ridge_alone"] is False
    results = json.loads((run / "results.json").read_text())
    assert results["ridge_alone"] == {f"fold_{k}": sorted(f["test"]) for k, f in enumerate(folds)}
    md = (run / "results.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("Predicted by the spatial ridge alone"))
    assert all(s in line for f in folds for s in f["test"])
    capsys.readouterr()
    evaluation.main([str(run), str(tmp_path / "runs" / "r")])
    printed = capsys.readouterr().out
    assert f"t: {evaluation.ridge_alone_line(results)}" in printed and "\nr: " not in printed
    predict.main(["--run", str(run), "--slides", str(root), "--out", str(tmp_path / "pred"),
                  "--fold", "0"])
    for s in folds[0]["test"]:
        assert files.read_predictions(tmp_path / "pred" / f"{s}.h5")["ridge_alone"] is True
    for s in folds[0]["train"]:                             # its own training slides are like them
        assert files.read_predictions(tmp_path / "pred" / f"{s}.h5")["ridge_alone"] is False
    train.main([str(ROOT / "configs/tessera.yaml"), *common, *tiny, "run.name=anyway",
                "train.skip_unused=false"])
    log = (tmp_path / "runs" / "anyway" / "log.txt").read_text()
    assert "the network is trained anyway (train.skip_unused=false)" in log
    assert "fold 0 epoch 2/2" in log and "fold 1 epoch 2/2" in log
    for k, f in enumerate(folds):
        for s in f["test"]:
            got, want = (files.read_predictions(tmp_path / "runs" / name / f"fold_{k}" / "pred"
                                                / f"{s}.h5") for name in ("anyway", "r"))
            np.testing.assert_allclose(got["pred"], want["pred"], rtol=1e-5, atol=1e-5)

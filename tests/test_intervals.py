"""Predictive spread and split-conformal intervals: the Gaussian NLL against scipy, the conformal
quantile against a loop with exact fractions, coverage on data drawn from a known distribution, and
a run whose files, calibration and metrics are checked against each other with numpy."""
import json
import math
import subprocess
import sys
from fractions import Fraction

import h5py
import numpy as np
import pytest
import torch

import conformal
import eval as ev
import files
import losses
from model import ModelConfig, build_model

ROOT = ev.Path(ev.__file__).resolve().parent


# ---------------------------------------------------------------- the Gaussian likelihood
def test_gaussian_nll_is_scipys_negative_log_density():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y, mu, log_var = rng.normal(size=(3, 50, 4)) * [[[1.0]], [[1.0]], [[3.0]]]
    ours = losses.gaussian_nll(*(torch.tensor(a) for a in (y, mu, log_var))).numpy()
    np.testing.assert_allclose(ours, -stats.norm.logpdf(y, loc=mu, scale=np.exp(log_var / 2)),
                               rtol=1e-12)
    plain = losses.beta_nll(*(torch.tensor(a) for a in (y, mu, log_var)), beta=0.0)
    assert float(plain) == pytest.approx(
        -stats.norm.logpdf(y, loc=mu, scale=np.exp(log_var / 2)).mean(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_nll_weights_each_value_by_sigma_to_the_2beta_held_constant(beta):
    """Seitzer et al. 2022: the gradient on the mean is (mu - y) sigma^(2 beta) / sigma^2 / n; at
    beta = 1 it is the MSE's, (mu - y) / n, whatever sigma."""
    rng = np.random.default_rng(1)
    y, mu0, lv0 = (torch.tensor(a) for a in rng.normal(size=(3, 30)))
    mu, lv = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
    losses.beta_nll(y, mu, lv, beta).backward()
    var, n = np.exp(lv0.numpy()), len(y)
    np.testing.assert_allclose(mu.grad.numpy(), (mu0 - y).numpy() * var ** beta / var / n,
                               rtol=1e-10)
    # d/dlv of w * 0.5 (lv + r^2 / var), w held constant
    np.testing.assert_allclose(lv.grad.numpy(),
                               var ** beta * 0.5 * (1 - (y - mu0).numpy() ** 2 / var) / n,
                               rtol=1e-10)


def test_variance_head_gives_the_same_log_var_in_training_and_in_the_low_memory_inference_path():
    cfg = ModelConfig(dim=16, heads=2, depths=[1, 1], decoder_depths=[1], dropout=0.0,
                      attn_dropout=0.0, head_var=True, knn_k=4)
    torch.manual_seed(0)
    model = build_model(cfg, 6, 5)
    torch.nn.init.normal_(model.var_head.weight, std=0.5)
    feats, xy = torch.randn(60, 6), torch.rand(60, 2) * 1000
    train_out = model.train()(feats, xy)
    with torch.no_grad():
        eval_out = model.eval()(feats, xy)
    assert train_out["log_var"].shape == (60, 5) and train_out["log_var"].requires_grad
    torch.testing.assert_close(eval_out["log_var"], train_out["log_var"].detach(),
                               rtol=1e-5, atol=1e-5)
    assert float(train_out["log_var"].detach().std()) > 0.01  # the spread depends on the spot


def test_variance_head_starts_at_each_genes_variance_at_every_spot():
    """losses.start_variance through the model's own bound (Tessera._head): exp(log_var) = the
    variance given."""
    model = build_model(ModelConfig(dim=16, heads=2, depths=[1], decoder_depths=[], head_var=True),
                        4, 3).eval()
    torch.nn.init.normal_(model.var_head.weight)
    losses.start_variance(model.var_head, torch.tensor([0.5, 2.0, 1e-9]))
    with torch.no_grad():
        log_var = model(torch.randn(30, 4), torch.rand(30, 2) * 1000)["log_var"]
    torch.testing.assert_close(log_var.exp(), torch.tensor([[0.5, 2.0, 1e-4]] * 30))
    torch.testing.assert_close(losses.log_variance(torch.tensor([-1e3, 0.0, 1e3])),
                               torch.tensor([-12.0, 0.0, 12.0]))


# ---------------------------------------------------------------- the conformal quantile
def ref_conformal_quantile(column, level):
    """The k-th smallest value, k = ceil((n + 1) level) computed with exact fractions; inf when
    k > n."""
    n = len(column)
    k = math.ceil((n + 1) * Fraction(str(level)))
    return math.inf if k > n else sorted(column)[k - 1]


@pytest.mark.parametrize("n", [1, 5, 9, 10, 19, 99, 100, 257])
@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95])
def test_conformal_quantile_is_the_ceil_n_plus_1_level_th_smallest_score(n, level):
    scores = np.random.default_rng(n).exponential(size=(n, 6))
    scores[:, 5] = 1.0                                             # ties
    ours = conformal.conformal_quantile(scores, level)
    assert ours.tolist() == [ref_conformal_quantile(scores[:, g].tolist(), level) for g in range(6)]


def test_calibration_split_holds_out_whole_patients_when_folds_group_by_patient():
    """The last n slides calibrate; grouped by patient, so do all their patients' other slides,
    unless that leaves fewer than `keep` slides to train on."""
    class S:
        def __init__(self, name, patient):
            self.name, self.patient = name, patient
    slides = [S("A1", "A"), S("B1", "B"), S("A2", "A"), S("C1", "C"), S("B2", "B")]
    names = lambda xs: [x.name for x in xs]
    assert (tuple(map(names, conformal.calibration_split(slides, 1, by_patient=False)))
            == (["A1", "B1", "A2", "C1"], ["B2"]))
    assert (tuple(map(names, conformal.calibration_split(slides, 1, by_patient=True)))
            == (["A1", "A2", "C1"], ["B1", "B2"]))
    assert (tuple(map(names, conformal.calibration_split(slides, 2, by_patient=True)))
            == (["A1", "A2"], ["B1", "C1", "B2"]))
    assert (tuple(map(names, conformal.calibration_split(slides, 2, by_patient=True, keep=3)))
            == (["A1", "B1", "A2"], ["C1", "B2"]))
    assert (tuple(map(names, conformal.calibration_split(slides, 0, by_patient=True)))
            == (names(slides), []))


def test_normalised_intervals_cover_at_the_nominal_level_narrower_than_constant_width():
    """Heteroscedastic Gaussian errors with the true sigma given: over 400 genes x 20 draws the
    coverage of pred +- q sigma is within 2 points of 90% (exactly k / (n + 1) = 0.9 in expectation
    for n = 99), and so is the constant-width interval's, which must be wider to get there."""
    rng = np.random.default_rng(3)
    cov, cov_c, width, width_c = [], [], [], []
    for _ in range(20):
        def draw(n):
            sigma = np.exp(rng.uniform(-1.5, 1.0, size=(n, 400)))
            pred = rng.normal(size=(n, 400))
            return pred, pred + sigma * rng.normal(size=(n, 400)), sigma
        p, y, s = draw(99)
        c = conformal.calibrate([p], [y], [s], 0.9)
        p, y, s = draw(200)
        m = conformal.interval_metrics(p - c["q"] * s, p + c["q"] * s, y)
        mc = conformal.interval_metrics(p - c["q_constant"], p + c["q_constant"], y)
        (cov.append(m["coverage"]), cov_c.append(mc["coverage"]), width.append(m["width"]),
         width_c.append(mc["width"]))
    assert abs(np.mean(cov) - 0.9) < 0.02 and abs(np.mean(cov_c) - 0.9) < 0.02
    assert np.mean(width) < 0.9 * np.mean(width_c)


# ---------------------------------------------------------------- a run with intervals
TINY = ["data.root=data/synthetic", "data.synthetic={slides: 8, seed: 0, spots: 150}",
        "data.folds=2", "data.genes={by: hvg, n: 12}", "data.gmt=null", "model.dim=16",
        "model.heads=2", "model.depths=[1,1]", "model.decoder_depths=[1]", "model.pathway_tokens=0",
        "model.knn_k=4", "train.epochs=2", "run.threads=1", "model.head_var=true",
        "train.loss=gaussian", "eval.calibration_slides=1", "eval.save_h5ad=true"]


@pytest.fixture(scope="module")
def interval_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("intervals")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "run.name=iv"], cwd=where,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return where / "runs" / "iv"


def test_file_intervals_are_the_calibrated_quantile_times_the_std_the_metrics_used(interval_run):
    results = json.loads((interval_run / "results.json").read_text())
    for k, fold in enumerate(sorted(interval_run.glob("fold_*"))):
        cal = conformal.read_calibration(fold / "calibration.h5")
        assert cal["level"] == 0.9 and cal["sigma"] == "predicted" and len(cal["scores"]) > 100
        # calibration slides: training slides of the fold (folds.json names them apart from those it
        # trained on), whole patients unless one patient trains the fold
        record = json.loads((interval_run / "folds.json").read_text())["folds"][k]
        cache = {}
        for s in record["train"] + record["calibration"]:
            with h5py.File(interval_run.parents[1] / "data" / "synthetic" / f"{s}.h5") as h:
                cache[s] = (str(h.attrs["patient"]), len(h["barcodes"]))
        trained = record["train"]
        assert (cal["slides"] == record["calibration"] and trained
                and not set(trained) & set(cal["slides"]))
        assert len(cal["scores"]) == sum(cache[s][1] for s in cal["slides"])
        if len({p for p, _ in cache.values()}) > 1:
            assert not {cache[s][0] for s in cal["slides"]} & {cache[s][0] for s in trained}
        else:
            assert len(cal["slides"]) == 1
        assert cal["q"].tolist() == [ref_conformal_quantile(cal["scores"][:, g].tolist(), 0.9)
                                     for g in range(12)]
        assert (cal["q_constant"].tolist()
                == [ref_conformal_quantile(cal["scores_constant"][:, g].tolist(), 0.9)
                    for g in range(12)])
        preds = [files.read_predictions(p) for p in sorted((fold / "pred").glob("*.h5"))]
        for f in preds:
            assert f["interval"] == 0.9
            np.testing.assert_allclose(f["lower"], f["pred"] - cal["q"] * f["std"],
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(f["upper"], f["pred"] + cal["q"] * f["std"],
                                       rtol=1e-5, atol=1e-6)
            # AnnData layers: the same arrays
            with h5py.File(fold / "pred" / f"{f['slide_id']}.h5ad") as a:
                np.testing.assert_array_equal(a["layers/lower"][:], f["lower"])
                np.testing.assert_array_equal(a["layers/upper"][:], f["upper"])
                assert float(a["uns/tessera/interval"][()]) == 0.9
            row = results["per_slide"][f["slide_id"]]
            inside = (f["true"] >= f["lower"]) & (f["true"] <= f["upper"])
            assert row["coverage@90"] == pytest.approx(inside.mean(), abs=1e-12)
        t, lo, hi, p = (np.concatenate([f[key] for f in preds]).astype(np.float64)
                        for key in ("true", "lower", "upper", "pred"))
        m = results["metrics"]
        assert m["coverage@90"]["folds"][k] == pytest.approx(np.mean((t >= lo) & (t <= hi)),
                                                             abs=1e-12)
        assert m["width@90"]["folds"][k] == pytest.approx(np.mean(hi - lo), rel=1e-6)
        q = cal["q_constant"].astype(np.float64)
        assert (m["coverage@90_constant"]["folds"][k]
                == pytest.approx(np.mean(np.abs(t - p) <= q), abs=1e-12))
        assert m["width@90_constant"]["folds"][k] == pytest.approx(2 * q.mean(), rel=1e-6)
    assert "coverage@90" in (interval_run / "results.md").read_text()


def test_calibration_curve_recomputed_with_the_reference_quantile(interval_run):
    curve = conformal.calibration_curve(interval_run, levels=(0.5, 0.9))
    inside = np.zeros(2)
    total = 0
    for fold in sorted(interval_run.glob("fold_*")):
        cal = conformal.read_calibration(fold / "calibration.h5")
        for path in sorted((fold / "pred").glob("*.h5")):
            f = files.read_predictions(path)
            for i, level in enumerate((0.5, 0.9)):
                q = np.array([ref_conformal_quantile(cal["scores"][:, g].tolist(), level)
                              for g in range(12)])
                inside[i] += np.sum(np.abs(f["true"].astype(np.float64) - f["pred"])
                                    <= q * f["std"])
            total += f["pred"].size
    np.testing.assert_allclose(curve["observed"], inside / total, rtol=1e-12)
    assert curve["sigma"] == "predicted" and len(curve["observed_constant"]) == 2


def test_predict_with_one_fold_writes_that_folds_calibrated_intervals(interval_run, tmp_path):
    """predict.py --fold k on a test slide of fold k reproduces the intervals training wrote (no
    dropout passes: the predictions are deterministic); with the ensemble of folds, no intervals
    (the quantiles hold for the model they were calibrated for)."""
    test_slide = sorted((interval_run / "fold_0" / "pred").glob("*.h5"))[0]
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / test_slide.name).symlink_to(
        (interval_run.parent.parent / "data" / "synthetic" / test_slide.name).resolve())
    for fold, out in (("0", "one"), (None, "all")):
        args = (["--run", interval_run, "--slides", slides, "--out", tmp_path / out]
                + (["--fold", fold] if fold else []))
        r = subprocess.run([sys.executable, str(ROOT / "predict.py"), *map(str, args)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    new, old = (files.read_predictions(tmp_path / "one" / test_slide.name),
                files.read_predictions(test_slide))
    assert new["genes"] == old["genes"] and new["interval"] == 0.9
    np.testing.assert_allclose(new["lower"], old["lower"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["upper"], old["upper"], rtol=1e-5, atol=1e-5)
    assert files.read_predictions(tmp_path / "all" / test_slide.name)["lower"] is None


def test_gaussian_loss_without_the_variance_head_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY[:13], "train.loss=gaussian",
                        "run.name=x"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "train.loss = gaussian and model.head_var = true" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_maps_show_the_interval_width_beside_the_error_and_a_calibration_plot_is_drawn(
        interval_run):
    pytest.importorskip("matplotlib")
    import plots
    written = plots.plot_run(interval_run, top=1)
    assert interval_run / "plots" / "calibration.png" in written
    f = files.read_predictions(sorted((interval_run / "fold_0" / "pred").glob("*.h5"))[0])
    width = f["upper"][:, 0] - f["lower"][:, 0]
    fig = plots.map_figure(f["slide_id"], f["genes"][0], f["coords"], f["pred"][:, 0],
                           f["true"][:, 0], f["std"][:, 0], width=width, interval=f["interval"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.index("90% interval width") + 1 == titles.index("error (predicted - measured)")
    shown = fig.axes[titles.index("90% interval width")].images[0].get_array()
    expected, _ = plots.raster(f["coords"], width, plots.pitch_um(f["coords"]))
    np.testing.assert_allclose(np.ma.filled(shown, np.nan),
                               np.ma.filled(np.ma.masked_invalid(expected), np.nan),
                               equal_nan=True, rtol=1e-6)


def test_the_variance_head_learns_a_spread_that_follows_the_true_noise():
    """Targets with noise sigma = exp(feature 0) at each spot: after a short beta-NLL training the
    predicted sigma ranks the spots as the true sigma does (the head and the loss can learn a spread
    when the features carry one)."""
    g = torch.Generator().manual_seed(0)
    feats, xy = torch.randn(400, 4, generator=g), torch.rand(400, 2, generator=g) * 4000
    sigma = torch.exp(feats[:, :1].clamp(-1.5, 1.5)).expand(400, 3)
    y = 2.0 + sigma * torch.randn(400, 3, generator=g)
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=16, heads=2, depths=[1], decoder_depths=[], dropout=0.0,
                                    attn_dropout=0.0, head_var=True), 4, 3)
    losses.start_variance(model.var_head, y.var(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        out = model.train()(feats, xy)
        loss = losses.beta_nll(y, out["pred"], out["log_var"], 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        predicted = model.eval()(feats, xy)["log_var"]
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731
    for j in range(3):
        r = np.corrcoef(rank(predicted[:, j]).numpy(), rank(sigma[:, j]).numpy())[0, 1]
        assert r > 0.8, r

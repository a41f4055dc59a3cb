"""predict.py and the maps of plots.py on a tiny trained run: which slides each fold model trained
on, out-of-fold prediction, threads, AnnData laid out as scanpy / squidpy expect, maps per slide and
level."""
import numpy as np
import pytest
import torch

import files
import plots
import predict
from test_eval import predict_cli, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 folds over 4 synthetic slides (data/synthetic under the run's parent folder), genes per
    fold."""
    return train_tiny(tmp_path_factory.mktemp("predict"), "tiny")


def slides_of(run):
    return run.parents[1] / "data" / "synthetic"


def fold_tests(run) -> dict[int, set[str]]:
    """fold -> the slides it tested (its pred folder): in cross-validation it trained on all the
    others."""
    return {k: {p.stem for p in (run / f"fold_{k}" / "pred").glob("*.h5")} for k in (0, 1)}


def test_predict_names_each_fold_models_training_slides_and_warns_in_sample(run, tmp_path):
    r = predict_cli("--run", run, "--slides", slides_of(run), "--out", tmp_path / "p", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tested = fold_tests(run)
    every = tested[0] | tested[1]
    for k in (0, 1):
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"fold {k} model trained on"))
        assert sorted(line.split(": ", 1)[1].split(", ")) == sorted(every - tested[k])
    warned = [x for x in r.stderr.splitlines() if "warning" in x]
    assert (len(warned) == len(every)
            and all("in-sample" in x and "--exclude-training" in x for x in warned))


def test_exclude_training_predicts_each_slide_with_the_fold_that_tested_it(run, tmp_path):
    out = tmp_path / "oof"
    r = predict_cli("--run", run, "--slides", slides_of(run), "--out", out, "--exclude-training",
                    "--format", "h5", "h5ad", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    for k, slides in fold_tests(run).items():
        for s in slides:   # the reference: the fold's own test prediction, written by train.py
            a, b = (files.read_predictions(out / f"{s}.h5"),
                    files.read_predictions(run / f"fold_{k}" / "pred" / f"{s}.h5"))
            assert a["genes"] == b["genes"] and a["n_models"].tolist() == [1] * len(a["genes"])
            np.testing.assert_allclose(a["pred"], b["pred"], rtol=1e-5, atol=1e-6)
            with __import__("h5py").File(out / f"{s}.h5ad") as f:
                assert f["uns/tessera/fold"][()].decode() == str(k)
                assert not f["obs/in_training"][:].any()


def test_exclude_training_names_a_slide_every_model_trained_on(run, tmp_path):
    tested = fold_tests(run)
    seen = sorted(tested[1])[0]                                   # fold 0 trained on it
    r = predict_cli("--run", run, "--slides", slides_of(run), "--out", tmp_path / "x", "--fold", 0,
                    "--exclude-training", cwd=tmp_path)
    assert r.returncode != 0 and seen in r.stderr and "every fold model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def cache_log1p(path, genes) -> np.ndarray:
    """log1p of a cache's counts for `genes`, read with h5py alone: the reference for `true`."""
    import h5py
    with h5py.File(path, "r") as f:
        names = [g.decode() if isinstance(g, bytes) else str(g) for g in f["genes"][()]]
        return np.log1p(f["counts"][()][:, [names.index(g) for g in genes]].astype(np.float64))


@pytest.mark.parametrize("options, layers, models", [
    ([], {"std", "true"}, 2),                             # the ensemble: the fold models' spread
    (["--exclude-training"], {"true"}, 1),                # one model per slide: no spread
    (["--exclude-training", "--mc", "2"], {"std", "true"}, 1),  # dropout passes: a spread again
    (["--fold", "0"], {"true"}, 1),
])
def test_anndata_holds_the_layers_readme_names_on_every_command_path(run, tmp_path, options, layers,
                                                                     models):
    """README: X the prediction, layers `std` where there is a spread and `true` for slides with
    counts (here: every slide; its measured log1p counts), obs index the barcodes, var index the
    genes."""
    ad = pytest.importorskip("anndata")
    out = tmp_path / "p"
    r = predict_cli("--run", run, "--slides", slides_of(run), "--out", out, "--format", "h5",
                    "h5ad", *options, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tested = fold_tests(run)
    for path in sorted(out.glob("*.h5ad")):
        a = ad.read_h5ad(path)
        assert set(a.layers) == layers, (options, path.name)
        assert a.X.min() >= 0                                  # log1p targets: no value below 0
        genes = list(a.var_names)
        want = cache_log1p(slides_of(run) / f"{path.stem}.h5", genes)
        np.testing.assert_allclose(a.layers["true"], want, rtol=1e-6)
        h5 = files.read_predictions(path.with_suffix(".h5"))
        assert h5["genes"] == genes and list(a.obs_names) == h5["barcodes"].tolist()
        np.testing.assert_array_equal(h5["true"], a.layers["true"])
        np.testing.assert_array_equal(h5["pred"], a.X)
        if "std" in layers:
            assert (a.layers["std"] > 0).any()
        if models == 1:                                        # a test slide's own fold, or fold 0
            fold = 0 if "--fold" in options else next(k for k, s in tested.items()
                                                      if path.stem in s)
            assert a.uns["tessera"]["fold"] == str(fold)
            seen = "--fold" in options and path.stem not in tested[0]
            assert a.obs["in_training"].all() == seen


def test_predict_names_the_fold_whose_model_fell_back_to_its_ridge(run, tmp_path, monkeypatch,
                                                                  capsys):
    """A slide unlike the training slides of one fold model (model.ood_fallback) is named with that
    fold."""
    load = predict.load_fold_models

    def one_unlike(run_dir, device="cpu", folds=None):
        models = load(run_dir, device, folds)
        models[1][0].unlike_training = lambda features: True   # fold 1's model: every slide
        return models

    monkeypatch.setattr(predict, "load_fold_models", one_unlike)
    predict.main(["--run", str(run), "--slides", str(slides_of(run)), "--out", str(tmp_path / "p")])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(str(tmp_path / "p"))]
    assert len(lines) == 4
    said = "unlike the training slides of fold 1: predicted there by the spatial ridge alone"
    assert all(said in x for x in lines)


def test_predict_takes_the_runs_threads_unless_told(run, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    predict.main(["--run", str(run), "--slides", str(slides_of(run)), "--out", str(tmp_path / "a")])
    predict.main(["--run", str(run), "--slides", str(slides_of(run)), "--out", str(tmp_path / "b"),
                  "--threads", "2"])
    assert calls == [1, 2]                                        # the run has run.threads=1


# ---- AnnData as scanpy and squidpy expect it -----------------------------------------------------
@pytest.fixture(scope="module")
def h5ad(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("h5ad")
    r = predict_cli("--run", run, "--slides", slides_of(run), "--out", out, "--format",
                    "h5ad", cwd=out)
    assert r.returncode == 0, r.stderr
    return sorted(out.glob("*.h5ad"))[0]


def test_anndata_has_visiums_spatial_layout_and_obs_columns(h5ad, run):
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(h5ad)
    sid = h5ad.stem
    assert list(a.uns["spatial"]) == [sid]
    lib = a.uns["spatial"][sid]
    sf = lib["scalefactors"]
    assert set(sf) >= {"spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef",
                       "fiducial_diameter_fullres"}
    xy = a.obsm["spatial"]
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))  # small slide: dense distances, reference
    np.fill_diagonal(d, np.inf)
    assert sf["spot_diameter_fullres"] == pytest.approx(0.55 * np.median(d.min(1)), rel=0.05)
    img = lib["images"]["hires"]
    assert img.ndim == 3 and img.shape[2] == 3 and max(img.shape[:2]) <= 600
    px = xy * sf["tissue_hires_scalef"]                            # every spot on the image
    assert (px >= 0).all() and (px[:, 0] < img.shape[1]).all() and (px[:, 1] < img.shape[0]).all()
    assert "1 um = 1 full-res unit" in a.uns["tessera"]["spatial_units"]
    assert ({"slide", "array_row", "array_col", "in_tissue", "fold", "in_training"}
            <= set(a.obs.columns))
    assert (a.obs["slide"] == sid).all() and (a.obs["in_tissue"] == 1).all()
    assert a.obs["in_training"].all()  # one fold model trained on every slide
    sites = a.obs[["array_col", "array_row"]].to_numpy()
    assert len({tuple(s) for s in sites}) == len(sites)            # one spot per array position
    for axis in (0, 1):                                            # array positions follow
                                                                   # the coordinates
        assert np.corrcoef(sites[:, axis], xy[:, axis])[0, 1] > 0.99


def test_scanpy_draws_the_prediction_with_default_arguments(h5ad, tmp_path):
    sc = pytest.importorskip("scanpy")
    plt = pytest.importorskip("matplotlib.pyplot")
    a = sc.read_h5ad(h5ad)
    sc.pl.spatial(a, color=a.var_names[0], show=False)
    plt.savefig(tmp_path / "spatial.png")
    assert (tmp_path / "spatial.png").stat().st_size > 1000


# ---- maps ----------------------------------------------------------------------------------------
def test_plot_ranks_genes_over_the_slides_it_draws(run, capsys):
    pytest.importorskip("matplotlib")
    preds = {p.stem: (k, files.read_predictions(p)) for k in (0, 1)
             for p in (run / f"fold_{k}" / "pred").glob("*.h5")}
    for sid, (k, f) in sorted(preds.items()):
        # the drawn slide only (numpy)
        p, t = f["pred"].astype(np.float64), f["true"].astype(np.float64)
        pcc = [np.corrcoef(p[:, i], t[:, i])[0, 1] for i in range(p.shape[1])]
        best = f["genes"][int(np.nanargmax(pcc))]
        written = plots.plot_run(run, slide=sid, top=1)
        assert run / "plots" / f"{sid}__{best}.png" in written, (sid, best)


def test_plot_names_genes_a_slide_lacks_and_fails_when_nothing_is_drawn(run, capsys):
    pytest.importorskip("matplotlib")
    genes = [set(files.read_predictions(next((run / f"fold_{k}" / "pred").glob("*.h5")))["genes"])
             for k in (0, 1)]
    only0 = sorted(genes[0] - genes[1])[0]
    plots.plot_run(run, genes=[only0])
    err = capsys.readouterr().err
    lacking = sorted(p.stem for p in (run / "fold_1" / "pred").glob("*.h5"))
    assert err.strip() == ("plots.py plot: not drawn where a slide's fold chose other genes: "
                           f"{only0} not on {', '.join(lacking)}")  # one line, whatever the slides
    with pytest.raises(SystemExit) as e:
        plots.main(["plot", str(run), "--slide", lacking[0], "--genes", only0])
    assert e.value.code != 0


def test_a_one_model_std_map_says_so_and_titles_carry_n_models():
    pytest.importorskip("matplotlib")
    xy = np.stack(np.meshgrid(np.arange(6.0), np.arange(5.0)), -1).reshape(-1, 2) * 100
    pred = np.linspace(0, 1, len(xy))
    fig = plots.map_figure("s", "G", xy, pred, std=np.zeros(len(xy)), n_models=1)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "one model: no spread" in texts and "n_models 1" in fig._suptitle.get_text()
    assert not [ax for ax in fig.axes if ax.images and "std" in ax.get_title()]   # no map of zeros
    fig = plots.map_figure("s", "G", xy, pred, std=np.full(len(xy), 0.1), n_models=2)
    assert [ax for ax in fig.axes if ax.images and "std" in ax.get_title()]


def test_plot_draws_every_level_a_run_predicts(tmp_path):
    pytest.importorskip("matplotlib")
    xy = np.stack(np.meshgrid(np.arange(4.0), np.arange(4.0)), -1).reshape(-1, 2) * 200
    sub = (xy[:, None] + np.array([[-50, -50], [-50, 50], [50, -50], [50, 50]])).reshape(-1, 2)
    rng = np.random.default_rng(0)
    files.write_predictions(tmp_path / "s.h5", rng.random((16, 2)), ["A", "B"],
                            [f"b{i}" for i in range(16)], xy,
                            levels={-1: {"pred": rng.random((64, 2)), "coords": sub}})
    written = plots.plot_run(tmp_path, top=1)
    assert any(p.name.endswith("__level-1.png") for p in written)


def test_a_run_config_without_newer_keys_reads_with_their_defaults(tmp_path):
    """A run folder written before data.smooth and eval.floor existed: its predictions are floored
    as a new run's are, and eval.floor=false keeps them as the model gives them."""
    (tmp_path / "config.yaml").write_text("data:\n  pseudo: false\nrun:\n  name: old\n")
    cfg = predict.run_config(tmp_path)
    assert cfg["data"]["pseudo"] is False and predict.target_floor(cfg) == 0.0
    assert predict.target_floor({**cfg, "eval": {"floor": False}}) is None
    assert predict.target_floor({"data": {"smooth": {"method": "spcs"}}}) is None

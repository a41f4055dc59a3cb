"""eval.py: every metric against slow references written here with explicit Python loops (no
scipy)."""
import csv
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import eval as ev
import files
import predict
import protocols

ROOT = ev.Path(ev.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _no_silent_nan():
    """A NaN, division by zero or warning anywhere in eval.py fails the test."""
    with np.errstate(divide="raise", invalid="raise", over="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- references (lists of rows, loops)
def ref_pearson(x, y):
    """Pearson of two lists by explicit means and sums of products; 0 when either is constant."""
    if all(v == x[0] for v in x) or all(v == y[0] for v in y):
        return 0.0
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sxx = syy = 0.0
    for a, b in zip(x, y):
        sxy += (a - mx) * (b - my)
        sxx += (a - mx) ** 2
        syy += (b - my) ** 2
    return sxy / math.sqrt(sxx * syy)


def ref_per_gene(pred, true):
    rows_p, rows_t = pred.tolist(), true.tolist()
    return [ref_pearson([r[g] for r in rows_p], [r[g] for r in rows_t])
            for g in range(len(rows_p[0]))]


def ref_pcc_gene(pred, true):
    values = ref_per_gene(pred, true)
    return sum(values) / len(values)


def ref_zero_variance(pred, true):
    rows_p, rows_t = pred.tolist(), true.tolist()
    count = 0
    for g in range(len(rows_p[0])):
        col_p, col_t = [r[g] for r in rows_p], [r[g] for r in rows_t]
        count += all(v == col_p[0] for v in col_p) or all(v == col_t[0] for v in col_t)
    return count


def ref_linear(x):
    return [max(math.expm1(v), 0.0) for row in x.tolist() for v in row]


def ref_mean_defined(values):
    """Mean over the slides where a per-slide metric is defined (None elsewhere); NaN when none
    is."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def ref_constant_truth(t):
    """True when every gene of the slide is constant in truth (one spot, all counts zero)."""
    rows = t.tolist()
    return all(all(r[g] == rows[0][g] for r in rows) for g in range(len(rows[0])))


def ref_pcc_flat(preds, trues):
    return ref_mean_defined([None if len(set(ref_linear(t))) == 1
                             else ref_pearson(ref_linear(p), ref_linear(t))
                             for p, t in zip(preds, trues)])


def ref_r2_flat(preds, trues):
    scores = []
    for p, t in zip(preds, trues):
        lp, lt = ref_linear(p), ref_linear(t)
        mean = sum(lt) / len(lt)
        ss_tot = sum((v - mean) ** 2 for v in lt)
        ss_res = sum((a - b) ** 2 for a, b in zip(lp, lt))
        scores.append(None if ss_tot == 0 else 1.0 - ss_res / ss_tot)
    return ref_mean_defined(scores)


def ref_pcc_gene_slide(preds, trues):
    return ref_mean_defined([None if ref_constant_truth(t) else ref_pcc_gene(p, t)
                             for p, t in zip(preds, trues)])


def ref_mean_error(preds, trues, power):
    total, count = 0.0, 0
    for p, t in zip(preds, trues):
        for row_p, row_t in zip(p.tolist(), t.tolist()):
            for a, b in zip(row_p, row_t):
                total += abs(a - b) ** power
                count += 1
    return total / count


def ref_metrics(preds, trues):
    pooled_p, pooled_t = np.concatenate(preds), np.concatenate(trues)
    return {"pcc_gene": ref_pcc_gene(pooled_p, pooled_t),
            "pcc_gene_slide": ref_pcc_gene_slide(preds, trues),
            "pcc_flat": ref_pcc_flat(preds, trues), "r2_flat": ref_r2_flat(preds, trues),
            "mse": ref_mean_error(preds, trues, 2), "mae": ref_mean_error(preds, trues, 1),
            "per_gene_pcc": ref_per_gene(pooled_p, pooled_t),
            "zero_variance_genes": ref_zero_variance(pooled_p, pooled_t),
            "zero_variance_genes_slide": sum(ref_zero_variance(p, t) for p, t in zip(preds, trues)),
            "slides_left_out": {"pcc_gene_slide": sum(map(ref_constant_truth, trues)),
                                "pcc_flat": sum(len(set(ref_linear(t))) == 1 for t in trues),
                                "r2_flat": sum(len(set(ref_linear(t))) == 1 for t in trues)}}


def make_slide(rng, n, g, const_true=(), const_pred=()):
    """log1p counts and a noisy prediction, float32; listed genes made constant in
    truth / prediction."""
    true = np.log1p(rng.poisson(rng.uniform(0.5, 20, size=g), size=(n, g))).astype(np.float32)
    pred = (0.6 * true + rng.normal(0, 0.5, size=(n, g))).astype(np.float32)
    # means of such constants are inexact in float64
    true[:, list(const_true)] = np.float32(np.log1p(3.0))
    pred[:, list(const_pred)] = np.float32(0.1)
    return pred, true


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- metrics
def test_per_gene_pcc_with_zero_variance_genes():
    pred, true = make_slide(np.random.default_rng(1), 40, 8, const_true=[2], const_pred=[5])
    per_gene = ev.per_gene_pcc(pred, true)
    assert per_gene.shape == (8,) and per_gene[2] == 0 and per_gene[5] == 0
    assert_close(per_gene, ref_per_gene(pred, true))
    assert_close(ev.pcc_gene(pred, true), ref_pcc_gene(pred, true))
    assert ev.zero_variance_genes(pred, true) == 2
    assert np.delete(per_gene, [2, 5]).mean() > 0.3  # the noisy prediction does correlate
    pred, true = pred.astype(np.float64), true.astype(np.float64)
    # float64 constants whose column mean is not exactly the constant
    pred[:, 5], true[:, 2] = 0.1, 0.7
    assert ev.zero_variance_genes(pred, true) == 2
    assert_close(ev.per_gene_pcc(pred, true), ref_per_gene(pred, true))


def test_slide_metrics_match_reference_including_one_spot_and_all_zero_slides():
    rng = np.random.default_rng(2)
    slides = [make_slide(rng, 25, 6, const_true=[0]), make_slide(rng, 12, 6, const_pred=[3]),
              make_slide(rng, 1, 6), (rng.normal(size=(9, 6)).astype(np.float32),
                                      np.zeros((9, 6), np.float32))]
    preds, trues = [s[0] for s in slides], [s[1] for s in slides]
    got, want = ev.compute_metrics(preds, trues), ref_metrics(preds, trues)
    assert set(got) == set(ev.METRICS) | {"per_gene_pcc", "zero_variance_genes",
                                          "zero_variance_genes_slide", "slides_left_out"}
    for key in ev.METRICS + ["per_gene_pcc"]:
        assert_close(got[key], want[key])
    for key in ("zero_variance_genes", "zero_variance_genes_slide", "slides_left_out"):
        assert got[key] == want[key]
    # the one-spot slide and the all-zero slide are left
    # out of pcc_gene_slide; their 12 constant genes counted
    assert got["slides_left_out"] == {"pcc_gene_slide": 2, "pcc_flat": 1, "r2_flat": 1}
    assert got["zero_variance_genes_slide"] == 1 + 1 + 6 + 6
    assert_close(ev.pcc_gene_slide(preds, trues), want["pcc_gene_slide"])
    assert_close(ev.pcc_flat(preds, trues), want["pcc_flat"])
    assert_close(ev.r2_flat(preds, trues), want["r2_flat"])
    assert_close(ev.mse(preds, trues), want["mse"])
    assert_close(ev.mae(preds, trues), want["mae"])


def test_one_spot_slide_gives_zero_pcc_without_nan():
    pred, true = make_slide(np.random.default_rng(3), 1, 5)
    assert ev.per_gene_pcc(pred, true).tolist() == [0.0] * 5
    assert ev.zero_variance_genes(pred, true) == 5
    # undefined
    assert ev.pcc_gene(pred, true) == 0.0 and math.isnan(ev.pcc_gene_slide([pred], [true]))
    m = ev.compute_metrics([pred], [true])
    assert m["slides_left_out"]["pcc_gene_slide"] == 1 and m["zero_variance_genes_slide"] == 5
    assert all(np.isfinite(m[k]).all()
               for k in ("pcc_gene", "per_gene_pcc", "pcc_flat", "mse", "mae"))


def test_perfect_prediction_scores():
    _, true = make_slide(np.random.default_rng(4), 30, 5)
    m = ev.compute_metrics([true, true[:10]], [true, true[:10]])
    assert [m[k] for k in ev.METRICS] == pytest.approx([1, 1, 1, 1, 0, 0], abs=1e-12)
    assert ev.pcc_gene(-true, true) == pytest.approx(-1, abs=1e-12)


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(5)
    slides = [make_slide(rng, 20, 4, const_true=[1]), make_slide(rng, 7, 4)]
    as_numpy = ev.compute_metrics([s[0] for s in slides], [s[1] for s in slides])
    as_torch = ev.compute_metrics([torch.from_numpy(s[0]).requires_grad_() for s in slides],
                                  [torch.from_numpy(s[1]) for s in slides])
    for key in ev.METRICS + ["zero_variance_genes"]:
        assert as_torch[key] == as_numpy[key]
    np.testing.assert_array_equal(as_torch["per_gene_pcc"], as_numpy["per_gene_pcc"])
    pred, true = slides[0]
    assert (ev.pcc_gene(torch.from_numpy(pred).double(), torch.from_numpy(true))
            == ev.pcc_gene(pred, true))
    assert ev.mse(torch.from_numpy(pred), true) == ev.mse([pred], [true])


def test_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3, 4\)"):
        ev.pcc_gene(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="slides"):
        ev.pcc_flat([np.zeros((3, 2))], [])
    with pytest.raises(ValueError, match="finite"):
        ev.mse(np.full((2, 2), np.nan), np.zeros((2, 2)))


# ---------------------------------------------------------------- prediction files
def test_prediction_file_round_trip(tmp_path):
    pred, true = make_slide(np.random.default_rng(6), 4, 3)
    genes, barcodes = ["CD3E", "Ménage", "MT-CO1"], [f"AAAC-{i}" for i in range(4)]
    coords = np.arange(8, dtype=np.float64).reshape(4, 2)
    files.write_predictions(tmp_path / "s1.h5", torch.from_numpy(pred), genes, barcodes,
                            coords, true=true)
    files.write_predictions(tmp_path / "s2.h5", pred, genes, barcodes, coords, slide_id="slide two")
    # no temporary files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.h5", "s2.h5"]
    r = files.read_predictions(tmp_path / "s1.h5")
    assert r["slide_id"] == "s1" and r["genes"] == genes and r["barcodes"].tolist() == barcodes
    assert (r["pred"].dtype == np.float32 and r["coords"].dtype == np.float32
            and r["true"].dtype == np.float32)
    np.testing.assert_array_equal(r["pred"], pred)
    np.testing.assert_array_equal(r["true"], true)
    np.testing.assert_array_equal(r["coords"], coords)
    r2 = files.read_predictions(tmp_path / "s2.h5")
    assert r2["true"] is None and r2["slide_id"] == "slide two"
    with pytest.raises(ValueError, match=r"s3\.h5.*barcodes"):
        files.write_predictions(tmp_path / "s3.h5", pred, genes, barcodes[:3], coords)
    assert not (tmp_path / "s3.h5").exists()


# ---------------------------------------------------------------- runs
@pytest.fixture
def fake_run(tmp_path):
    """runs/fake: fold_0 with 2 slides (gene B constant in truth), fold_1 with 3 slides (one of one
    spot) plus one without counts; fold_1's last gene differs, as when genes are chosen per fold."""
    rng = np.random.default_rng(7)
    run = tmp_path / "runs" / "fake"
    genes = [["A", "B", "C", "D", "E"], ["A", "B", "C", "D", "F"]]
    sizes = [[30, 18], [22, 1, 15]]
    folds = []
    for k in range(2):
        slides = [make_slide(rng, n, 5, const_true=[1] if k == 0 else ()) for n in sizes[k]]
        for i, (pred, true) in enumerate(slides):
            files.write_predictions(run / f"fold_{k}" / "pred" / f"s{k}{i}.h5", pred, genes[k],
                                    [f"b{j}" for j in range(len(pred))],
                                    rng.uniform(0, 1e3, (len(pred), 2)), true=true)
        folds.append(slides)
    pred, _ = make_slide(rng, 6, 5)
    files.write_predictions(run / "fold_1" / "pred" / "unlabelled.h5", pred, genes[1],
                            list("abcdef"), np.zeros((6, 2)))
    (run / "config.yaml").write_text("run: {name: fake}\n")
    return run, folds, genes


def test_evaluate_run_matches_reference(fake_run):
    run, folds, genes = fake_run
    returned = ev.evaluate_run(run)
    results = json.loads((run / "results.json").read_text())
    assert returned == results
    want = [ref_metrics([s[0] for s in slides], [s[1] for s in slides]) for slides in folds]
    assert (results["run"] == "fake" and results["n_folds"] == 2
            and results["slides_per_fold"] == [2, 3])
    assert results["genes"] == 6 and results["genes_per_fold"] == [5, 5]
    assert results["slides"] == [["s00", "s01"], ["s10", "s11", "s12"]]
    assert (results["zero_variance_genes"]["folds"] == [w["zero_variance_genes"] for w in want]
            == [1, 0])
    for key in ev.METRICS:
        values = [w[key] for w in want]
        mean = sum(values) / 2
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # population std (ddof=0)
        entry = results["metrics"][key]
        assert_close(entry["folds"], values)
        assert_close([entry["mean"], entry["std"]], [mean, std])

    with open(run / "per_gene.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["gene", "fold_0", "fold_1", "mean"]
    table = {r[0]: r[1:] for r in rows[1:]}
    assert list(table) == ["A", "B", "C", "D", "E", "F"]
    for k in range(2):
        for gene, value in zip(genes[k], want[k]["per_gene_pcc"]):
            assert float(table[gene][k]) == pytest.approx(value, abs=1e-6)
    assert table["E"][1] == "" and table["F"][0] == ""
    assert float(table["A"][2]) == pytest.approx(
        (want[0]["per_gene_pcc"][0] + want[1]["per_gene_pcc"][0]) / 2, abs=1e-6)
    assert float(table["F"][2]) == pytest.approx(want[1]["per_gene_pcc"][4], abs=1e-6)

    md = (run / "results.md").read_text()
    assert "ddof=0" in md and "| metric | mean ± std | fold_0 | fold_1 |" in md
    e = results["metrics"]["pcc_gene"]
    assert (f"| pcc_gene | {e['mean']:.4f} ± {e['std']:.4f} | {e['folds'][0]:.4f} | "
            f"{e['folds'][1]:.4f} |" in md)


def test_evaluate_run_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="fold_<k>"):
        ev.evaluate_run(tmp_path)
    (tmp_path / "fold_0" / "pred").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"fold_0.pred"):
        ev.evaluate_run(tmp_path)


def test_format_table():
    def result(name, mean, per_fold):
        return {"run": name, "n_folds": 3, "genes": 491, "genes_per_fold": per_fold,
                "metrics": {m: {"mean": mean, "std": 0.1} for m in ev.METRICS}}
    lines = ev.format_table([result("tessera", 0.5, [250] * 3),
                             result("mlp", 0.25, [250, 249, 250])]).splitlines()
    assert "ddof=0" in lines[0]
    header = "| run | folds | genes | " + " | ".join(ev.METRICS) + " |"
    i = lines.index(header)
    assert lines[i + 1].count("---") == 3 + len(ev.METRICS)
    cells = lambda v: " | ".join([f"{v} ± 0.1000"] * 6)  # noqa: E731
    assert lines[i + 2:] == [f"| tessera | 3 | 491 (250 per fold) | {cells('0.5000')} |",
                             f"| mlp | 3 | 491 (250, 249, 250) | {cells('0.2500')} |"]


def test_cli_reevaluates_and_prints_table(fake_run):
    run = fake_run[0]
    (run / "results.json").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "eval.py", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| run | folds | genes | pcc_gene |" in proc.stdout
    assert "| fake | 2 | 6 (5 per fold) |" in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert f"{results['metrics']['pcc_gene']['mean']:.4f}" in proc.stdout


def two_runs_on_other_genes(tmp_path):
    """runs/small (3 genes per fold, chosen per fold) and runs/large (5 per fold, other ones), the
    same 2 folds of the same test slides: {run: (folder, {fold: (genes, [(pred, true)])})}."""
    rng = np.random.default_rng(11)
    genes = {"small": [["A", "B", "C"], ["A", "B", "D"]],
             "large": [["C", "B", "E", "A", "F"], ["G", "A", "D", "H", "E"]]}
    runs = {}
    for name, per_fold in genes.items():
        run, folds = tmp_path / "runs" / name, {}
        for k, gs in enumerate(per_fold):
            slides = [make_slide(rng, n, len(gs)) for n in (20, 14)]
            for i, (pred, true) in enumerate(slides):
                files.write_predictions(run / f"fold_{k}" / "pred" / f"s{k}{i}.h5", pred, gs,
                                        [f"b{j}" for j in range(len(pred))],
                                        rng.uniform(0, 1e3, (len(pred), 2)), true=true)
            folds[f"fold_{k}"] = (gs, slides)
        (run / "config.yaml").write_text("run: {name: %s}\n" % name)
        runs[name] = (run, folds)
    return runs


def eval_cli(*args):
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_eval_names_the_genes_runs_scored_and_scores_them_on_the_genes_they_share(tmp_path):
    runs = two_runs_on_other_genes(tmp_path)
    r = eval_cli(runs["small"][0], runs["large"][0])
    assert r.returncode == 0, r.stderr
    # per fold, the genes both runs predicted (explicit lists): fold_0 A, B, C; fold_1 A, D
    shared = {"fold_0": ["A", "B", "C"], "fold_1": ["A", "D"]}
    assert "| small | 2 | 4 (3 per fold) |" in r.stdout
    assert "| large | 2 | 8 (5 per fold) |" in r.stdout
    assert ("genes scored: small 4 (3 per fold), large 8 (5 per fold); shared by all runs: 4 "
            "(per fold 3, 2)") in r.stdout
    warning = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "different genes (4, 8; 4 shared)" in warning[0]
    assert "--shared-genes" in warning[0]
    own = {name: json.loads((run / "results.json").read_text()) for name, (run, _) in runs.items()}

    r = eval_cli(runs["small"][0], runs["large"][0], "--shared-genes")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "| small | 2 | 4 (3, 2) |" in r.stdout and "| large | 2 | 4 (3, 2) |" in r.stdout
    assert "(--shared-genes)" in r.stdout
    for name, (run, folds) in runs.items():
        values = {m: [] for m in ev.METRICS}
        for fold, (gs, slides) in folds.items():
            cols = [gs.index(g) for g in shared[fold]]     # the reference: columns picked by name
            want = ref_metrics([p[:, cols] for p, _ in slides], [t[:, cols] for _, t in slides])
            for m in ev.METRICS:
                values[m].append(want[m])
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][3:]
        for m, cell in zip(ev.METRICS, cells):
            assert cell == f"{np.mean(values[m]):.4f} ± {np.std(values[m]):.4f}", (name, m)
        assert json.loads((run / "results.json").read_text()) == own[name]  # its own genes kept


def test_eval_of_runs_on_the_same_genes_says_so_without_a_warning(fake_run, tmp_path):
    import shutil
    run = fake_run[0]
    shutil.copytree(run, tmp_path / "twin")
    r = eval_cli(run, tmp_path / "twin")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert ("genes scored: fake 6 (5 per fold), twin 6 (5 per fold); shared by all runs: 6 "
            "(per fold 5, 5)") in r.stdout


def test_cli_reports_a_bad_run_folder(tmp_path):
    with pytest.raises(SystemExit, match="no fold_<k> folders"):
        ev.main([str(tmp_path)])


# ---------------------------------------------------------- shared run folders are data, never code
class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a file if the loader executed it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_model_file_that_carries_code_is_refused_and_nothing_runs(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "executed"
    (run / "fold_0").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {pseudo: false}\n")
    torch.save({"model": {}, "payload": _RunsCodeWhenUnpickled(marker)},
               run / "fold_0" / "model.pt")
    with pytest.raises(ValueError, match="model.pt: not loaded"):
        predict.load_fold_models(run)
    assert not marker.exists()


def test_predict_refuses_to_write_into_its_input_folders(tmp_path):
    slides = tmp_path / "caches"
    slides.mkdir()
    (slides / "s1.h5").write_bytes(b"input the user owns")
    for out in (slides, tmp_path / "run"):
        r = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--run",
                            str(tmp_path / "run"), "--slides", str(slides), "--out", str(out),
                            "--overwrite"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "expected an output folder other than the inputs" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert ((slides / "s1.h5").read_bytes() == b"input the user owns"
            and sorted(slides.iterdir()) == [slides / "s1.h5"])


# ---------------------------------------------------------------- uncertainty
def test_welford_equals_the_two_pass_formula_also_on_column_subsets():
    rng = np.random.default_rng(8)
    samples = [rng.normal(3.0, 2.0, size=(7, 5)) for _ in range(6)]
    cols = [None, [0, 2, 4], None, [1, 2], [4], None]          # some samples cover some genes only
    acc = predict.Welford(7, 5, dtype=torch.float64)
    for x, c in zip(samples, cols):
        acc.add(torch.from_numpy(x if c is None else x[:, c]), c)
    # two passes over the samples that have gene g: mean, then mean squared deviation
    for g in range(5):
        have = [x[:, g] for x, c in zip(samples, cols) if c is None or g in c]
        mean = sum(have) / len(have)
        var = sum((h - mean) ** 2 for h in have) / len(have)
        assert acc.count[g] == len(have)
        np.testing.assert_allclose(acc.mean[:, g].numpy(), mean, rtol=1e-12)
        np.testing.assert_allclose(acc.std()[:, g].numpy(), np.sqrt(var), rtol=1e-10)
    acc32 = predict.Welford(7, 5)  # the float32 accumulator predictions use
    for x in samples:
        acc32.add(torch.from_numpy(x))
    np.testing.assert_allclose(acc32.std().numpy(), np.std(np.stack(samples), axis=0), rtol=1e-5)


def ref_spearman_mean(std, pred, true):
    """scipy.stats.spearmanr per gene between std and |error|, mean over genes where it is
    defined."""
    stats = pytest.importorskip("scipy.stats")
    values = []
    for g in range(std.shape[1]):
        err = np.abs(pred[:, g] - true[:, g])
        if len(set(std[:, g].tolist())) > 1 and len(set(err.tolist())) > 1:
            values.append(stats.spearmanr(std[:, g], err).statistic)
    return sum(values) / len(values)


def test_unc_spearman_and_coverage_match_references():
    rng = np.random.default_rng(9)
    pred, true = make_slide(rng, 60, 6)
    std = (np.abs(pred - true) * rng.uniform(0.2, 2, size=pred.shape)
           + rng.uniform(0, 0.3, size=pred.shape))
    std[:, 1] = 0.5                                          # constant std: gene left out
    std[:5, 2] = std[5:10, 2] = 0.25                         # ties
    assert_close(ev.unc_spearman(std, pred, true), ref_spearman_mean(std, pred, true))
    inside = sum(abs(t - p) <= 1.96 * s
                 for p, t, s in zip(pred.ravel().tolist(), true.ravel().tolist(),
                                    std.ravel().tolist()))
    assert ev.coverage(std, pred, true) == pytest.approx(inside / pred.size, abs=1e-12)
    # std = |error| exactly
    assert ev.unc_spearman(np.abs(pred - true), pred, true) == pytest.approx(1.0)
    m = ev.compute_metrics([pred[:30], pred[30:]], [true[:30], true[30:]], [std[:30], std[30:]])
    assert (m["unc_spearman"] == ev.unc_spearman(std, pred, true)
            and m["coverage"] == ev.coverage(std, pred, true))


# --------------------------------------------------- a tiny trained run (2 folds, gene sets differ)
TINY = ["data.root=data/synthetic", "data.synthetic={slides: 4, seed: 0, spots: 150}",
        "data.folds=2", "data.genes={by: hvg, n: 12}", "data.gmt=null", "model.dim=16",
        "model.heads=2", "model.depths=[1,1]", "model.decoder_depths=[1]", "model.pathway_tokens=0",
        "model.knn_k=4", "train.epochs=1", "run.threads=1"]


def train_tiny(where, name, *extra):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"run.name={name}", *extra],
                       cwd=where, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return where / "runs" / name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-fold run of a small tessera (k-NN local stage, windows, full attention at the coarse
    level) on 4 synthetic slides, with eval.mc_samples and eval.save_h5ad; genes are chosen per
    fold."""
    where = tmp_path_factory.mktemp("tiny")
    return train_tiny(where, "tiny", "eval.mc_samples=3", "eval.save_h5ad=true")


def predict_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cross_validation_reports_uncertainty_and_writes_h5ad(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    for key in ("unc_spearman", "coverage"):
        assert len(results["metrics"][key]["folds"]) == 2
    f = files.read_predictions(tiny_run / "fold_0" / "pred" / "synth_00.h5")
    assert (f["std"] is not None and (f["std"] > 0).mean() > 0.9
            and f["n_models"].tolist() == [1] * 12)
    # the fold's figures recomputed from the files with the references
    fold = [files.read_predictions(p) for p in sorted((tiny_run / "fold_0" / "pred").glob("*.h5"))]
    p, t, s = (np.concatenate([x[k] for x in fold]).astype(np.float64)
               for k in ("pred", "true", "std"))
    assert (results["metrics"]["unc_spearman"]["folds"][0]
            == pytest.approx(ref_spearman_mean(s, p, t), abs=1e-9))
    assert (results["metrics"]["coverage"]["folds"][0]
            == pytest.approx(np.mean(np.abs(t - p) <= 1.96 * s), abs=1e-12))
    assert "unc_spearman" in (tiny_run / "results.md").read_text()
    # mean and std are those of 3 seeded Monte-Carlo dropout passes of the fold model, each raised
    # to 0 (log1p targets: no value below 0)
    import data
    models = predict.load_fold_models(tiny_run, folds=[0])
    slide = data.read_slide(tiny_run.parents[1] / "data" / "synthetic" / "synth_00.h5",
                            genes=models[0][1])
    passes = np.stack([predict.predict_slide(models[0][0], slide, True, "cpu", mc_seed=j).numpy()
                       for j in range(3)]).clip(min=0)
    np.testing.assert_allclose(f["pred"], passes.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f["std"], passes.std(0), rtol=1e-4, atol=1e-6)


class Fixed(torch.nn.Module):
    """A model whose output is given: "pred" (N, G) and a coarser level (M, G)."""

    def __init__(self, pred, level):
        super().__init__()
        self.cfg, self.pred, self.level = type("Cfg", (), {"sub_levels": 0})(), pred, level

    def forward(self, *args, out_dtype=None, **kw):
        return {"pred": self.pred.clone(), "levels": {1: self.level.clone()}}


def test_log1p_predictions_are_raised_to_zero_and_nothing_else_changes(tiny_run):
    """Every level of a prediction of log1p targets is max(raw, 0) (numpy); smoothed targets keep
    theirs; a prediction with nothing below 0 comes back bit for bit, so its metrics are
    unchanged."""
    import data
    import train
    slide = data.read_slide(tiny_run.parents[1] / "data" / "synthetic" / "synth_00.h5")
    g = torch.Generator().manual_seed(3)
    raw, level = torch.randn(slide.n_spots, 4, generator=g), torch.randn(9, 4, generator=g)
    log1p = {"data": {"smooth": None, "normalize": False, "pseudo": False}}
    smoothed = {"data": {"smooth": {"method": "spcs"}, "normalize": False, "pseudo": False}}
    assert predict.target_floor(log1p) == 0.0 and predict.target_floor(smoothed) is None
    floor = predict.target_floor(log1p)
    out = predict.predict_outputs(Fixed(raw, level), slide, False, "cpu", floor=floor)
    np.testing.assert_array_equal(out["pred"].numpy(), np.maximum(raw.numpy(), 0))
    np.testing.assert_array_equal(out["levels"][1].numpy(), np.maximum(level.numpy(), 0))
    floor = predict.target_floor(smoothed)
    out = predict.predict_outputs(Fixed(raw, level), slide, False, "cpu", floor=floor)
    assert torch.equal(out["pred"], raw) and torch.equal(out["levels"][1], level)
    above = raw.abs()                                                # nothing below 0: unchanged
    got = predict.predict_slide(Fixed(above, level), slide, False, "cpu", floor=0.0)
    assert torch.equal(got, above)
    true = torch.log1p(torch.poisson(torch.full_like(raw, 2.0), generator=g))
    m_got, m_raw = ev.compute_metrics([got], [true]), ev.compute_metrics([above], [true])
    assert all(m_got[k] == m_raw[k] for k in ev.METRICS)
    # the validation score that picks a fold's epoch sees the predictions the test slides get
    score = train.val_score(Fixed(raw, level), [{"slide": slide, "target": true}], log1p, "cpu")
    floored = np.maximum(raw.numpy(), 0).astype(np.float64)
    assert score == pytest.approx(ref_pcc_gene(floored, true.numpy().astype(np.float64)), abs=1e-12)


def test_no_prediction_file_of_a_log1p_run_holds_a_value_below_zero(tiny_run, tmp_path):
    """The run's own test predictions and predict.py's files (both formats), where the models' raw
    outputs do reach below 0."""
    import data
    models = predict.load_fold_models(tiny_run)
    raw = [predict.predict_slide(m, data.read_slide(p), True, "cpu").min() for m, _ in models
           for p in sorted((tiny_run.parents[1] / "data" / "synthetic").glob("*.h5"))]
    assert min(raw) < 0                                      # the check below is not vacuous
    r = predict_cli("--run", tiny_run, "--slides", tiny_run.parents[1] / "data" / "synthetic",
                    "--out", tmp_path / "p", "--format", "h5", "h5ad", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = sorted(tiny_run.glob("fold_*/pred/*.h5")) + sorted((tmp_path / "p").glob("*.h5"))
    assert len(paths) == 8
    for p in paths:
        f = files.read_predictions(p)
        assert f["pred"].min() >= 0, p
    import h5py
    for p in sorted((tmp_path / "p").glob("*.h5ad")) + sorted(tiny_run.glob("fold_*/pred/*.h5ad")):
        with h5py.File(p) as f:
            assert f["X"][()].min() >= 0, p


def test_ensemble_std_is_numpys_std_over_the_fold_models_and_genes_average_over_their_folds(
        tiny_run):
    import data
    models = predict.load_fold_models(tiny_run)
    assert models[0][1] != models[1][1]  # genes chosen per fold
    slide = data.read_slide(tiny_run.parents[1] / "data" / "synthetic" / "synth_01.h5")
    genes, mean, std, n_models = predict.predict_with_std(models, slide, True, "cpu")
    preds = [dict(zip(gs, predict.predict_slide(m, slide, True, "cpu").numpy().T))
             for m, gs in models]
    assert genes == list(dict.fromkeys(models[0][1] + models[1][1]))
    for i, g in enumerate(genes):
        have = [p[g] for p in preds if g in p]
        assert n_models[i] == len(have)
        np.testing.assert_allclose(mean[:, i].numpy(), np.mean(have, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std[:, i].numpy(), np.std(have, axis=0), rtol=1e-4, atol=1e-6)
    assert (n_models == 2).sum() < len(genes) and (std[:, n_models == 2] > 0).any()


def test_mc_dropout_is_seeded_and_zero_without_dropout(tiny_run):
    import data
    from model import ModelConfig, build_model
    model, genes = predict.load_fold_models(tiny_run, folds=[1])[0]
    slide = data.read_slide(tiny_run.parents[1] / "data" / "synthetic" / "synth_02.h5")
    state = torch.random.get_rng_state()
    a = predict.predict_with_std([(model, genes)], slide, True, "cpu", mc=3, seed=5)
    b = predict.predict_with_std([(model, genes)], slide, True, "cpu", mc=3, seed=5)
    # the caller's random stream is untouched
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and (a[2] > 0).float().mean() > 0.9
    assert not torch.equal(a[2], predict.predict_with_std([(model, genes)], slide, True, "cpu",
                                                          mc=3, seed=6)[2])
    assert not model.training
    cfg = dict(model.cfg.__dict__, dropout=0.0, attn_dropout=0.0)
    off = build_model(ModelConfig(**cfg), slide.features.shape[1], len(genes))
    off.load_state_dict(model.state_dict())
    assert predict.has_dropout(model) and not predict.has_dropout(off)
    _, mean, std, _ = predict.predict_with_std([(off.eval(), genes)], slide, True, "cpu", mc=4)
    assert torch.equal(std, torch.zeros_like(std))
    np.testing.assert_allclose(mean.numpy(), predict.predict_slide(off, slide, True, "cpu").numpy(),
                               rtol=1e-5, atol=1e-6)


def test_mc_dropout_pass_is_the_training_mode_forward_without_its_memory(tiny_run):
    """A Monte-Carlo pass keeps the low-memory inference path, yet equals the plain training-mode
    forward (every module in train mode, no grad) with the same random seed: same dropout, same
    draws."""
    import data
    model, genes = predict.load_fold_models(tiny_run, folds=[0])[0]
    slide = data.read_slide(tiny_run.parents[1] / "data" / "synthetic" / "synth_03.h5")
    mc = predict.predict_slide(model, slide, True, "cpu", mc_seed=11)
    args = [slide.features, slide.coords, slide.pseudo_features, slide.pseudo_coords]
    torch.manual_seed(11)
    with torch.no_grad():
        ref = model.train()(*args)["pred"]
    model.eval()
    np.testing.assert_allclose(mc.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    # dropout did act
    assert not torch.allclose(mc, predict.predict_slide(model, slide, True, "cpu"))
    seen = []
    import kernels
    real = kernels.block_inference
    kernels.block_inference = lambda *a, **k: seen.append(1) or real(*a, **k)
    try:
        predict.predict_slide(model, slide, True, "cpu", mc_seed=11)
    finally:
        kernels.block_inference = real
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    assert len(seen) == len(blocks)  # every block took the low-memory inference path


def test_h5ad_opens_in_anndata_with_the_same_values_names_and_coordinates(tiny_run, tmp_path):
    anndata = pytest.importorskip("anndata")
    r = predict_cli("--run", tiny_run, "--slides", tiny_run.parents[1] / "data" / "synthetic",
                    "--out", tmp_path / "p", "--format", "h5", "h5ad", "--mc", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("synth_03", ):
        h5 = files.read_predictions(tmp_path / "p" / f"{name}.h5")
        a = anndata.read_h5ad(tmp_path / "p" / f"{name}.h5ad")
        assert (a.obs_names.tolist() == h5["barcodes"].tolist()
                and a.var_names.tolist() == h5["genes"])
        np.testing.assert_array_equal(np.asarray(a.X), h5["pred"])
        np.testing.assert_array_equal(a.layers["std"], h5["std"])
        np.testing.assert_array_equal(a.obsm["spatial"], h5["coords"])
        assert a.var["n_models"].tolist() == h5["n_models"].tolist()
        assert a.uns["tessera"]["run"] == "tiny" and "log1p" in a.uns["tessera"]["X"]
        assert "model:" in a.uns["tessera"]["config"] and a.uns["tessera"]["mc_samples"] == 2
    # the repository's own h5ad reader reads it too
    back = files.read_h5ad(tmp_path / "p" / "synth_03.h5ad")
    np.testing.assert_array_equal(back.counts, h5["pred"])
    assert back.genes == h5["genes"] and back.barcodes.tolist() == h5["barcodes"].tolist()
    np.testing.assert_array_equal(back.xy, h5["coords"])
    # the run's own test predictions
    a = anndata.read_h5ad(tiny_run / "fold_0" / "pred" / "synth_00.h5ad")
    h5 = files.read_predictions(tiny_run / "fold_0" / "pred" / "synth_00.h5")
    np.testing.assert_array_equal(a.layers["true"], h5["true"])
    assert a.uns["tessera"]["fold"] == "0"


# ------------------------------------------------------------- bad input: one line, nothing written
def assert_one_line_and_nothing_written(r, message, out):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_predict_bad_input_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    import data
    slides, out = tiny_run.parents[1] / "data" / "synthetic", tmp_path / "out"
    assert_one_line_and_nothing_written(predict_cli("--run", tiny_run, "--slides", slides, "--out",
                                                    out, "--fold", "5", cwd=tmp_path),
                                        "--fold 5: expected a fold number 0 ... 1", out)
    for args, message in [(["--fold", "-1"], "--fold -1: expected a fold number 0 ... 1"),
                          (["--mc", "-2"], "--mc -2: expected")]:  # the same, in process (faster)
        with pytest.raises(SystemExit) as e:
            predict.main(["--run", str(tiny_run), "--slides", str(slides), "--out",
                          str(out), *args])
        assert message in str(e.value) and "\n" not in str(e.value) and not out.exists()
    wide = tmp_path / "wide"  # caches of another encoder: more feature columns
    s = data.read_slide(slides / "synth_00.h5")
    s.features, s.pseudo_features, s.pseudo_coords = (torch.cat([s.features, s.features], 1),
                                                      None, None)
    data.write_slide(wide / "synth_00.h5", s)
    r = predict_cli("--run", tiny_run, "--slides", wide, "--out", out, cwd=tmp_path)
    assert_one_line_and_nothing_written(r, "synth_00.h5: features have", out)
    assert f"expect {s.features.shape[1] // 2}" in r.stderr


def test_partial_runs_and_runs_without_dropout(tiny_run, tmp_path):
    import shutil
    slides, out = tiny_run.parents[1] / "data" / "synthetic", tmp_path / "out"
    partial = tmp_path / "partial"
    shutil.copytree(tiny_run, partial)
    shutil.rmtree(partial / "fold_1" / "pred")
    (partial / "fold_1" / "model.pt").unlink()
    r = predict_cli("--run", partial, "--slides", slides, "--out", out, cwd=tmp_path)
    assert_one_line_and_nothing_written(r, "partial run, fold_1 not finished; pass --partial", out)
    with pytest.raises(SystemExit,
                       match="--fold 1: .*fold_1.model.pt does not exist .unfinished fold."):
        predict.main(["--run", str(partial), "--slides", str(slides), "--out", str(out),
                      "--fold", "1"])
    assert not out.exists()
    predict.main(["--run", str(partial), "--slides", str(slides), "--out", str(out), "--partial"])
    assert len(list(out.glob("*.h5"))) == 4
    results = ev.evaluate_run(partial)  # the finished fold is evaluated, the missing one named
    assert results["fold_names"] == ["fold_0"] and results["missing_folds"] == ["fold_1"]
    assert "Not finished, not evaluated: fold_1" in (partial / "results.md").read_text()
    # killed while writing fold_0's predictions: its checkpoint is still there
    killed = tmp_path / "killed"
    shutil.copytree(tiny_run, killed)
    (killed / "fold_0" / "checkpoint.pt").write_bytes(b"")
    assert ev.evaluate_run(killed)["missing_folds"] == ["fold_0"]
    before = (partial / "results.json").read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(partial)],
                          capture_output=True, text=True)
    assert (proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
            and "fold_1 missing" in proc.stderr)
    # an unfinished run is evaluated only on request
    assert (partial / "results.json").read_bytes() == before
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(partial), "--partial"],
                          capture_output=True, text=True)
    assert (proc.returncode == 0 and "fold_1" in proc.stderr
            and "| partial | 1 (missing fold_1) |" in proc.stdout)
    # a run trained without dropout, asked for Monte-Carlo dropout
    nodrop = tmp_path / "nodrop"
    shutil.copytree(tiny_run, nodrop)
    for k in (0, 1):  # the same models saved as trained without dropout
        ck = torch.load(nodrop / f"fold_{k}" / "model.pt", weights_only=True)
        ck["model_config"].update(dropout=0.0, attn_dropout=0.0)
        torch.save(ck, nodrop / f"fold_{k}" / "model.pt")
    r = predict_cli("--run", nodrop, "--slides", slides, "--out", out / "x", "--mc", "4",
                    cwd=tmp_path)
    assert_one_line_and_nothing_written(r, "--mc 4: the models of", out / "x")
    assert "have no dropout" in r.stderr


# ---------------------------------------------------------------- a paper's numbers beside a run's
def test_pcc_spot_is_hifusions_per_spot_pearson():
    rng = np.random.default_rng(3)
    preds = [rng.normal(size=(7, 6)), rng.normal(size=(4, 6))]
    trues = [rng.normal(size=(7, 6)), rng.normal(size=(4, 6))]
    trues[1][2] = 1.5                                                   # a constant spot: PCC 0
    per_spot = [0.0 if np.ptp(t) == 0 else np.corrcoef(p, t)[0, 1]
                for P, T in zip(preds, trues) for p, t in zip(P, T)]
    assert ev.pcc_spot(preds, trues) == pytest.approx(np.mean(per_spot), abs=1e-12)


def test_paper_numbers_print_beside_the_run(fake_run):
    run, folds, _ = fake_run
    results = ev.evaluate_run(run)
    text = protocols.paper_table(results, run, "hifusion:her2st")
    assert text.startswith('HiFusion (AAAI 2026), "Main Results", columns HER2-2D')
    assert ("| method | mse | pcc_spot |" in text
            and "| HiFusion (paper) | 0.5459 | 0.4961 |" in text)
    spot = [ev.pcc_spot([s[0] for s in slides], [s[1] for s in slides]) for slides in folds]
    mse = results["metrics"]["mse"]
    assert text.splitlines()[-1] == (f"| fake (this run) | {mse['mean']:.4f} ± {mse['std']:.4f} | "
                                     f"{np.mean(spot):.4f} ± {np.std(spot):.4f} |")
    assert ("| HiST (paper) | 0.23 ± 0.14 | 0.54 ± 0.19 |"
            in protocols.paper_table(results, run, "hist:brain"))
    r = subprocess.run([sys.executable, str(ROOT / "protocols.py"), str(run), "--paper",
                        "hist:nowhere"],
                       capture_output=True, text=True)
    assert (r.returncode != 0
            and "expected an entry --paper 'hist:nowhere'; it has hist:brain" in r.stderr)
    r = subprocess.run([sys.executable, str(ROOT / "protocols.py"), str(run), "--paper",
                        "feast:her2st"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "| FEAST (paper) | 0.5761 | 0.5782 | 0.5524 |" in r.stdout


# ---------------------------------------------------------------- levels of the pyramid
def test_level_outputs_against_loops():
    """Sub levels -2 (4 x 4) and -1 (2 x 2) of a slide with 4 x 4 sub-counts, and bins at levels 1
    and 2."""
    from types import SimpleNamespace
    rng = np.random.default_rng(3)
    n, G, extent = 6, 3, 50.0
    valid = rng.random((n, 16)) < 0.7
    valid[:, 0] = True
    sub_counts = torch.tensor(rng.poisson(2.0, (n, 16, G)) * valid[..., None], dtype=torch.float32)
    slide = SimpleNamespace(n_spots=n,
                            coords=torch.tensor(rng.uniform(0, 1000, (n, 2)), dtype=torch.float32),
                            counts=sub_counts.sum(1), sub_counts=sub_counts, sub_extent_um=extent,
                            spot_pitch_um=100.0)
    idx2 = torch.tensor([a * 16 + s for a in range(n) for s in range(16) if valid[a, s]])
    idx1 = torch.tensor([a * 4 + s for a in range(n) for s in range(4)
                         if any(valid[a, 4 * ix + iy] for ix in range(4) for iy in range(4)
                                if 2 * (ix // 2) + iy // 2 == s)])
    parents = {0: torch.tensor([0, 1, 0, 2, 1, 2]), 1: torch.tensor([1, 0, 0])}
    out = {"pred": torch.tensor(rng.normal(2, 1, (n, G)), dtype=torch.float32),
           "levels": {-2: torch.randn(len(idx2), G), -1: torch.randn(len(idx1), G),
                      1: torch.randn(3, G), 2: torch.randn(2, G)},
           "sub_index": {-2: idx2, -1: idx1}, "parents": parents}
    got = ev.level_outputs(out, slide)
    for k, index in ((-2, idx2), (-1, idx1)):
        r = 2 ** -k
        for row, flat in enumerate(index.tolist()):
            a, s = divmod(flat, r * r)
            ix, iy = divmod(s, r)
            want_xy = (slide.coords[a].double()
                       + torch.tensor([(ix + 0.5) / r - 0.5, (iy + 0.5) / r - 0.5],
                                      dtype=torch.float64) * extent)
            assert torch.allclose(got[k]["coords"][row].double(), want_xy, atol=1e-3)
            members = [4 * jx + jy for jx in range(4) for jy in range(4)
                       if (jx * r // 4, jy * r // 4) == (ix, iy)]
            assert torch.allclose(got[k]["true"][row], torch.log1p(sub_counts[a, members].sum(0)))
            copy = torch.log1p(torch.expm1(out["pred"][a]).clamp_min(0) / (r * r))
            assert torch.allclose(got[k]["copy"][row], copy)
    for k, m in ((1, 3), (2, 2)):
        for row in range(m):
            spots = [a for a in range(n)
                     if (parents[0][a] if k == 1 else parents[1][parents[0][a]]) == row]
            assert torch.allclose(got[k]["true"][row], torch.log1p(slide.counts[spots].sum(0)))
            assert torch.allclose(got[k]["coords"][row].double(),
                                  slide.coords[spots].double().mean(0), atol=1e-3)
        assert torch.equal(got[k]["pred"], out["levels"][k])


def test_levels_are_written_read_and_evaluated(tmp_path):
    rng = np.random.default_rng(4)
    run, written = tmp_path / "run", []
    for k in range(2):
        for i in range(2):
            pred, true = make_slide(rng, 20, 4)
            sub = {name: rng.normal(size=(50, 4)) for name in ("pred", "true", "copy")}
            sub["coords"] = rng.uniform(size=(50, 2))
            up = {name: rng.normal(size=(7, 4)) for name in ("pred", "true")}
            up["coords"] = rng.uniform(size=(7, 2))
            files.write_predictions(run / f"fold_{k}" / "pred" / f"s{k}{i}.h5", pred, list("ABCD"),
                                 [f"b{j}" for j in range(20)], rng.uniform(size=(20, 2)), true=true,
                                 levels={-1: sub, 1: up})
            written.append((k, sub, up))
    r = files.read_predictions(run / "fold_0" / "pred" / "s00.h5")
    assert (sorted(r["levels"]) == [-1, 1]
            and sorted(r["levels"][-1]) == ["coords", "copy", "pred", "true"])
    np.testing.assert_array_equal(r["levels"][1]["pred"], written[0][2]["pred"].astype(np.float32))
    results = ev.evaluate_run(run)
    for k in range(2):
        subs = [f[1] for f in written if f[0] == k]
        ups = [f[2] for f in written if f[0] == k]
        want = ref_metrics([s["pred"].astype(np.float32) for s in subs],
                           [s["true"].astype(np.float32) for s in subs])
        for name in ev.METRICS:
            assert_close([results["metrics"][f"{name}@-1"]["folds"][k]], [want[name]])
        want = ref_metrics([s["pred"].astype(np.float32) for s in ups],
                           [s["true"].astype(np.float32) for s in ups])
        assert_close([results["metrics"]["pcc_gene@1"]["folds"][k]], [want["pcc_gene"]])
        copy = ref_pcc_gene(np.concatenate([s["copy"] for s in subs]).astype(np.float32),
                            np.concatenate([s["true"] for s in subs]).astype(np.float32))
        assert_close([results["metrics"]["pcc_gene@-1_copy"]["folds"][k]], [copy])
    assert "| pcc_gene@-1_copy |" in (run / "results.md").read_text()


def test_eval_names_a_missing_test_slide_and_evaluates_the_rest_only_with_partial(tmp_path, capsys):
    from test_adversarial import fake_run
    run = fake_run(tmp_path, test=("s0", "s1", "s2"), preds=("s0", "s2"))
    with pytest.raises(SystemExit, match=r"fold_0/pred: no prediction file of test slide\(s\) s1 "
                                         r"\(folds.json\)"):
        ev.main([str(run)])
    assert not (run / "results.json").exists()
    ev.main([str(run), "--partial"])
    assert "warning" in capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["slides"] == [["s0", "s2"]] and results["slides_per_fold"] == [2]


def test_eval_names_a_run_folder_it_cannot_write_before_reading(tmp_path, monkeypatch):
    from test_adversarial import fake_run
    run = fake_run(tmp_path)

    def refuse(*args, **kwargs):   # what a read-only folder (or mount) answers, also to root
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)   # files.check_writable's probe
    monkeypatch.setattr(ev, "read_predictions", None)      # nothing is read before the check
    with pytest.raises(SystemExit,
                       match=f"{run}: the run folder .*cannot be written \\(Permission denied\\)"):
        ev.main([str(run)])
    assert not (run / "results.json").exists()

"""Metrics and result tables (docs/design.md, "Metrics"). Prediction files and AnnData
are read and written by files.py; prediction of new slides with a run's fold models is predict.py's
command, maps plots.py's, a paper's numbers beside a run's protocols.py's.

Usage (re-evaluate runs, print one comparison table; runs scored on different genes are named):
    python eval.py runs/<name> [runs/<other> ...] [--partial] [--shared-genes]
All metrics take log-space values (log1p of counts), numpy arrays or torch tensors, and compute in
float64.
"""
from __future__ import annotations

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

import data
import lattice
from conformal import fold_intervals, interval_entries
from files import _array, atomic_path, listed, missing_test_slides, read_predictions

METRICS = ["pcc_gene", "pcc_gene_slide", "pcc_flat", "r2_flat", "mse", "mae"]
UNCERTAINTY = ["unc_spearman", "coverage"]  # with predicted std (eval.mc_samples, ensembles)
STD_NOTE = "mean ± std over folds (population std, numpy ddof=0)"


# ---------------------------------------------------------------- metrics
def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p, t = _array(pred), _array(true)
    finite = np.isfinite(p).all() and np.isfinite(t).all()
    if p.shape != t.shape or p.ndim != 2 or len(p) == 0 or not finite:
        raise ValueError(f"pred, true: expected finite (N, G) arrays of one shape; got {p.shape}, "
                         f"{t.shape}")
    return p, t


def _slides(preds, trues) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lists of per-slide (N_i, G) arrays; a single 2-D array counts as one slide."""
    if isinstance(preds, (np.ndarray, torch.Tensor)):
        preds, trues = [preds], [trues]
    if len(preds) != len(trues) or len(preds) == 0:
        raise ValueError(f"expected as many predicted as true slides, >= 1; got {len(preds)}, "
                         f"{len(trues)}")
    return [_pair(p, t) for p, t in zip(preds, trues)]


def _constant(x: np.ndarray) -> np.ndarray:
    # Exact test: a constant column's float64 mean is not always exactly its value, which would
    # leave tiny residuals and a meaningless PCC of +-1.
    return (x == x[:1]).all(axis=0)


def _pcc_columns(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Pearson per column; 0 where truth or prediction is constant (docs/design.md)."""
    pc, tc = p - p.mean(0), t - t.mean(0)
    num = (pc * tc).sum(0)
    den = np.sqrt((pc * pc).sum(0) * (tc * tc).sum(0))
    ok = ~(_constant(p) | _constant(t)) & (den > 0)
    return np.clip(np.where(ok, num / np.where(ok, den, 1.0), 0.0), -1.0, 1.0)


def per_gene_pcc(pred, true) -> np.ndarray:
    """(G,) Pearson per gene over the N spots of (N, G) arrays; 0 for a zero-variance gene."""
    return _pcc_columns(*_pair(pred, true))


def zero_variance_genes(pred, true) -> int:
    """Number of genes constant over the spots in truth or prediction (their PCC is set to 0)."""
    p, t = _pair(pred, true)
    return int((_constant(p) | _constant(t)).sum())


def pcc_gene(pred, true) -> float:
    """`pcc_gene`: Pearson per gene over the pooled spots, mean over genes
    (HEST-Benchmark, FEAST)."""
    return float(per_gene_pcc(pred, true).mean())


def _mean(values) -> float:
    """Mean of a list, NaN for an empty list (a metric defined on no slide), without a warning."""
    return float(np.mean(values)) if len(values) else float("nan")


def _per_slide(fn, preds, trues) -> list[float]:
    """fn(p, t) of each slide where it is defined (None = undefined, e.g. constant truth)."""
    return [v for v in (fn(p, t) for p, t in _slides(preds, trues)) if v is not None]


def _slide_pcc(p, t):
    return None if _constant(t).all() else _pcc_columns(p, t).mean()  # one spot, all genes constant


def pcc_gene_slide(preds, trues) -> float:
    """`pcc_gene_slide`: pcc_gene within each slide, mean over the slides where it is
    defined: a slide whose truth is constant in every gene (one spot, all counts zero) is left out.
    NaN if none."""
    return _mean(_per_slide(_slide_pcc, preds, trues))


def _linear_flat(x: np.ndarray) -> np.ndarray:
    return np.clip(np.expm1(x), 0.0, None).reshape(-1, 1)  # (N*G, 1) counts


def _slide_pcc_flat(p, t):
    p, t = _linear_flat(p), _linear_flat(t)
    return None if _constant(t)[0] else _pcc_columns(p, t)[0]


def _slide_r2_flat(p, t):
    p, t = _linear_flat(p), _linear_flat(t)
    ss_tot = ((t - t.mean()) ** 2).sum()
    return None if _constant(t)[0] or ss_tot == 0 else 1.0 - ((t - p) ** 2).sum() / ss_tot


def pcc_flat(preds, trues) -> float:
    """`pcc_flat` (HiST): Pearson over each slide's flattened N*G matrix in linear space
    (expm1, clipped at 0), mean over slides; a slide whose flattened truth is constant is left
    out."""
    return _mean(_per_slide(_slide_pcc_flat, preds, trues))


def r2_flat(preds, trues) -> float:
    """`r2_flat` (HiST): 1 - SS_res / SS_tot over each slide's flattened N*G matrix in
    linear space, SS_tot around that slide's flattened mean; mean over slides, leaving out slides
    with SS_tot = 0."""
    return _mean(_per_slide(_slide_r2_flat, preds, trues))


def mse(preds, trues) -> float:
    """`mse`: mean squared error in log space over all spots and genes (pooled over
    slides)."""
    return float(np.mean(np.concatenate([((p - t) ** 2).ravel()
                                         for p, t in _slides(preds, trues)])))


def mae(preds, trues) -> float:
    """`mae`: mean absolute error in log space over all spots and genes (pooled over
    slides)."""
    return float(np.mean(np.concatenate([np.abs(p - t).ravel() for p, t in _slides(preds, trues)])))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of each column of (N, G), ties sharing their average rank (as scipy.stats.rankdata)."""
    out = np.empty_like(x, dtype=np.float64)
    for g in range(x.shape[1]):
        order = np.argsort(x[:, g], kind="stable")
        xs = x[order, g]
        new = np.r_[True, xs[1:] != xs[:-1]]                 # first of each group of equal values
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:], len(xs)]
        out[order, g] = ((starts + ends - 1) / 2)[np.cumsum(new) - 1]
    return out


def unc_spearman(std, pred, true) -> float:
    """How informative the uncertainty is: per gene, Spearman correlation between `std` and
    |pred - true| over the spots, mean over the genes where both vary (NaN if none). (N, G)
    arrays."""
    s, err = _array(std), np.abs(_array(pred) - _array(true))
    ok = ~(_constant(s) | _constant(err))
    if not ok.any():
        return float("nan")
    return _mean(_pcc_columns(_ranks(s[:, ok]), _ranks(err[:, ok])).tolist())


def coverage(std, pred, true, z: float = 1.96) -> float:
    """Share of the values with |true - pred| <= z * std (0.95 for calibrated Gaussian errors)."""
    return float(np.mean(np.abs(_array(true) - _array(pred)) <= z * _array(std)))


def pcc_spot(preds, trues) -> float:
    """HiFusion's PCC: Pearson over the genes of each spot, mean over all spots (0 for a constant
    spot)."""
    ps, ts = map(list, zip(*_slides(preds, trues)))
    return float(_pcc_columns(np.concatenate(ps).T, np.concatenate(ts).T).mean())


def compute_metrics(preds, trues, stds=None, intervals=None) -> dict:
    """Every metric (docs/design.md) on a fold's test slides (lists of per-slide (N_i, G) log-space
    arrays). pcc_gene, per_gene_pcc and zero_variance_genes use the concatenation of the slides;
    zero_variance_genes_slide counts (slide, gene) pairs constant within a slide; slides_left_out
    says how many slides each per-slide metric left out (undefined there). With `stds`, also
    unc_spearman, coverage. With `intervals` {"level", "lower", "upper" (lists like preds), optional
    "q_constant" (G,)}, also coverage@<level>, width@<level> (and the constant-width interval's,
    conformal.interval_entries) and "per_slide": these and unc_spearman on each slide alone."""
    ps, ts = map(list, zip(*_slides(preds, trues)))
    p, t = np.concatenate(ps), np.concatenate(ts)
    per_gene = _pcc_columns(p, t)
    per_slide = {k: _per_slide(fn, ps, ts) for k, fn in  # each once: its mean, and slides left out
                 [("pcc_gene_slide", _slide_pcc), ("pcc_flat", _slide_pcc_flat),
                  ("r2_flat", _slide_r2_flat)]}
    out = {"pcc_gene": float(per_gene.mean()), **{k: _mean(v) for k, v in per_slide.items()},
           "mse": mse(ps, ts), "mae": mae(ps, ts),
           "per_gene_pcc": per_gene, "zero_variance_genes": zero_variance_genes(p, t),
           "zero_variance_genes_slide": sum(zero_variance_genes(a, b) for a, b in zip(ps, ts)),
           "slides_left_out": {k: len(ps) - len(v) for k, v in per_slide.items()}}
    if stds is not None:
        s = np.concatenate([_array(x) for x in stds])
        out["unc_spearman"], out["coverage"] = unc_spearman(s, p, t), coverage(s, p, t)
    if intervals is not None:
        out.update(interval_entries(ps, ts, intervals))
        out["per_slide"] = []
        for i in range(len(ps)):
            one = {k: [v[i]] for k, v in intervals.items() if k in ("lower", "upper")}
            e = interval_entries([ps[i]], [ts[i]], {**intervals, **one})
            if stds is not None:
                e["unc_spearman"] = unc_spearman(stds[i], ps[i], ts[i])
            out["per_slide"].append(e)
    return out


# ---------------------------------------------------------------- levels of the pyramid
def level_name(metric: str, k: int) -> str:
    """`<metric>@<k>` for a level k != 0; level 0 (the spot) keeps the plain name."""
    return metric if k == 0 else f"{metric}@{k}"


def _sum_rows(x, index, n):
    return x.new_zeros(n, *x.shape[1:]).index_add_(0, index, x)


def level_outputs(out: dict, slide, normalize: bool = False, truth: bool = True) -> dict:
    """The model's extra levels (`out["levels"]`) for one slide as prediction-file groups:
    {k: {"pred" (N_k, G), "coords" (N_k, 2) um, "true" (N_k, G) log1p or absent, "copy" (N_k, G)
    for k < 0}}. Below the spot (k < 0, r = 2^-k): rows are the sub-positions
    out["sub_index"][k] = n * r^2 + s; their centres follow lattice.sub_coords; truth = the slide's
    sub_counts summed into r x r; `copy` gives each sub-spot its spot's prediction,
    log1p(expm1(pred) / r^2) (the baseline a super-resolution model must beat). Above (k > 0): rows
    are lattice bins; centre = mean of their spots' centres; truth = log1p of the counts summed over
    the bin's spots (multi-level outputs need normalize=false). `truth` False leaves `true` out (a
    slide read without the model's gene selection)."""
    groups, n = {}, slide.n_spots
    for k, pred in out.get("levels", {}).items():
        pred = pred.float().cpu()
        g = {"pred": pred}
        if k < 0:
            r = lattice.FACTOR ** -k
            index = out["sub_index"][k].cpu()
            spot = index // (r * r)
            extent = slide.sub_extent_um
            extent = extent if extent == extent else slide.spot_pitch_um        # NaN: the pitch
            g["coords"] = lattice.sub_coords(slide.coords, r, extent).reshape(-1, 2)[index]
            spot_pred = torch.expm1(out["pred"].float().cpu()[spot]).clamp_min(0)
            g["copy"] = torch.log1p(spot_pred / (r * r))
            if truth and slide.sub_counts is not None and not normalize:
                rd = math.isqrt(slide.sub_counts.shape[1])          # the data's own split, r <= rd
                sd = torch.arange(rd * rd)
                s_k = r * ((sd // rd) * r // rd) + (sd % rd) * r // rd  # data's sub-spot -> level k
                fine = torch.zeros(n, r * r, slide.sub_counts.shape[2])
                fine.index_add_(1, s_k, slide.sub_counts)
                g["true"] = torch.log1p(fine.reshape(n * r * r, -1)[index])
        else:
            index = None
            for j in range(k):                                          # spot -> bin of level k
                index = out["parents"][j].cpu() if index is None else out["parents"][j].cpu()[index]
            m = pred.shape[0]
            size = _sum_rows(torch.ones(n), index, m).clamp_min(1)
            g["coords"] = _sum_rows(slide.coords.double(), index, m) / size[:, None]
            if truth and slide.counts is not None and not normalize:
                g["true"] = torch.log1p(_sum_rows(slide.counts.float(), index, m))
        groups[k] = g
    return groups


def level_metrics(files: list[dict]) -> dict:
    """Every metric at each extra level that all the fold's prediction files hold with truth, named
    `<metric>@<k>`; below the spot also `pcc_gene@<k>_copy`, the copy baseline's pcc_gene."""
    out = {}
    levels = set.intersection(*({k for k, g in f["levels"].items() if "true" in g} for f in files))
    for k in sorted(levels):
        groups = [f["levels"][k] for f in files]
        m = compute_metrics([g["pred"] for g in groups], [g["true"] for g in groups])
        out.update({level_name(name, k): m[name] for name in METRICS})
        if k < 0:
            out[f"pcc_gene@{k}_copy"] = pcc_gene(np.concatenate([g["copy"] for g in groups]),
                                                 np.concatenate([g["true"] for g in groups]))
    return out


# ---------------------------------------------------------------- runs and tables
def _fold_dirs(run: Path) -> list[Path]:
    return sorted((d for d in run.glob("fold_*") if d.name[5:].isdigit()),
                  key=lambda d: int(d.name[5:]))


def expected_folds(run, cfg: dict | None = None) -> list[int]:
    """The fold numbers a run has when finished: from its config (data.folds, data.split_dir, or for
    leave-one-patient-out the patients of data.root when it is there), else its fold_<k> folders."""
    run = Path(run)
    if cfg is None:
        import yaml
        path = run / "config.yaml"
        cfg = yaml.safe_load(path.read_text()) if path.exists() else {}
    d = (cfg or {}).get("data") or {}
    k = None
    if d.get("split_dir") and Path(d["split_dir"]).is_dir():
        k = len(list(Path(d["split_dir"]).glob("test_*.csv")))
    elif isinstance(d.get("folds"), int) and d["folds"] > 0 and not d.get("split_dir"):
        k = d["folds"]
    elif d.get("folds") == -1 and d.get("root") and list(Path(d["root"]).glob("*.h5")):
        k = len({data.read_slide_meta(p).patient for p in data.list_slides(d["root"])})
    return list(range(k)) if k else [int(f.name[5:]) for f in _fold_dirs(run)]


def _summary(values: list) -> dict:
    """Folds, mean and std (ddof=0) of a metric over the folds where it is defined (null
    elsewhere)."""
    ok = [v for v in values if not math.isnan(v)]
    return {"folds": [None if math.isnan(v) else v for v in values],
            "mean": float(np.mean(ok)) if ok else None,
            "std": float(np.std(ok, ddof=0)) if ok else None}


def finished_folds(run: Path, allow_missing: bool = False) -> tuple[list, list[str]]:
    """The folds of a run with test predictions to score: [(fold folder, its prediction files with
    truth)] in fold order, and the pred folders of the folds without (still training, or none yet).
    A test slide of folds.json without a prediction file: an error (allow_missing: a warning)."""
    done, empty = [], []
    for fold in _fold_dirs(run):
        files = [f for f in map(read_predictions, sorted((fold / "pred").glob("*.h5")))
                 if f["true"] is not None]
        busy = (fold / "lock").exists() and not (fold / "done").exists()   # trained or predicted
        if not files or busy or (fold / "checkpoint.pt").exists():  # a checkpoint: still training
            empty.append(f"{fold / 'pred'}")
            continue
        lost = missing_test_slides(run, fold)   # a line naming them, or ""
        if lost and not allow_missing:
            raise FileNotFoundError(f"{lost}; predict them again, or pass --partial to evaluate "
                                    "the rest")
        if lost:
            print(f"eval.py: warning: {lost}; metrics over the other {len(files)}", file=sys.stderr)
        bad = [f["slide_id"] for f in files if f["genes"] != files[0]["genes"]]
        if bad:
            raise ValueError(f"{fold / 'pred'}: slides {bad} have other genes than "
                             f"{files[0]['slide_id']}")
        done.append((fold, files))
    return done, empty


def evaluate_run(run_dir, partial: bool = True, allow_missing: bool = False) -> dict:
    """Metrics per fold from runs/<name>/fold_<k>/pred/*.h5 (slides with `true` only), over the
    folds that have predictions; the others are listed as `missing_folds` (partial=False: they are
    an error, and nothing is written). Writes results.json, per_gene.csv and results.md in the run
    folder and returns the results dict. A test slide of folds.json without a prediction file: an
    error (allow_missing: a warning)."""
    run = Path(run_dir).resolve()
    if not _fold_dirs(run):
        raise FileNotFoundError(f"{run}: no fold_<k> folders; is this a run directory "
                                "(runs/<name>)?")
    data.check_writable(run, "the run folder (results.json, per_gene.csv, results.md)")
    done, empty = finished_folds(run, allow_missing)
    folds, per_gene, slides, names, per_slide, alone = [], [], [], [], {}, {}
    for fold, files in done:
        stds = [f["std"] for f in files] if all(f["std"] is not None for f in files) else None
        m = compute_metrics([f["pred"] for f in files], [f["true"] for f in files], stds,
                            fold_intervals(fold, files))
        for f, e in zip(files, m.pop("per_slide", [])):
            per_slide[f["slide_id"]] = {"fold": fold.name, **e}
        m.update(level_metrics(files))
        folds.append(m)
        per_gene.append(dict(zip(files[0]["genes"], m["per_gene_pcc"].tolist())))  # gene -> PCC
        slides.append([f["slide_id"] for f in files])
        names.append(fold.name)
        if any(f["ridge_alone"] for f in files):   # model.ood_fallback
            alone[fold.name] = [f["slide_id"] for f in files if f["ridge_alone"]]
    if not folds:
        raise FileNotFoundError(f"{run}: no finished fold: no prediction files with `true` to "
                                f"evaluate in {', '.join(empty)}")
    missing = [f"fold_{k}" for k in expected_folds(run) if k not in {int(n[5:]) for n in names}]
    if missing and not partial:
        raise FileNotFoundError(f"{run}: not finished, {', '.join(missing)} missing; results are "
                                "written when every fold is done (--partial evaluates the finished "
                                "folds)")
    all_genes = list(dict.fromkeys(g for pg in per_gene for g in pg))  # union over folds
    extra = [k for k in UNCERTAINTY if all(k in m for m in folds)]
    extra += [k for k in folds[0] if "@" in k and all(k in m for m in folds)]  # the other levels
    results = {"run": run.name, "n_folds": len(folds), "fold_names": names,
               "missing_folds": missing,
               "metrics": {k: _summary([m[k] for m in folds]) for k in METRICS + extra},
               "zero_variance_genes": {"folds": [m["zero_variance_genes"] for m in folds]},
               "zero_variance_genes_slide": {"folds": [m["zero_variance_genes_slide"]
                                                       for m in folds]},
               "slides_left_out": {k: [m["slides_left_out"][k] for m in folds]
                                   for k in folds[0]["slides_left_out"]},
               "genes": len(all_genes), "genes_per_fold": [len(pg) for pg in per_gene],
               "slides_per_fold": [len(s) for s in slides], "slides": slides}
    if per_slide:
        results["per_slide"] = per_slide
    if alone:
        results["ridge_alone"] = alone
    with atomic_path(run / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(run / "per_gene.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["gene"] + names + ["mean"])
        for g in all_genes:  # a gene absent from a fold's list leaves that cell empty
            vals = [pg.get(g) for pg in per_gene]
            mean = np.mean([v for v in vals if v is not None])
            w.writerow([g] + ["" if v is None else f"{v:.6f}" for v in vals] + [f"{mean:.6f}"])
    with atomic_path(run / "results.md") as tmp:
        tmp.write_text(_run_markdown(results))
    return results


# ---- runs scored on other genes ------------------------------------------------------------------
def fold_genes(run_dir) -> dict[str, list[str]]:
    """Fold name -> the genes it scored, as the run's per_gene.csv records them (a fold's empty
    cell: a gene it did not predict)."""
    with open(Path(run_dir) / "per_gene.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return {name: [r[0] for r in rows[1:] if r[k]] for k, name in enumerate(rows[0][1:-1], start=1)}


def shared_genes(fold_genes: list[dict]) -> dict[str, list[str]]:
    """Per fold that every run has, the genes every run scored in it (in the first run's order):
    genes are chosen per fold, so runs are compared fold by fold. `fold_genes`: one dict per run,
    fold name -> genes (`fold_genes`)."""
    common = [n for n in fold_genes[0] if all(n in g for g in fold_genes[1:])]
    return {n: [g for g in fold_genes[0][n] if all(g in set(other[n]) for other in fold_genes[1:])]
            for n in common}


def score_on_genes(run_dir, genes: dict[str, list[str]], allow_missing: bool = False) -> dict:
    """A run's METRICS with each fold scored on `genes` (fold name -> genes) alone, over the folds
    `genes` names; nothing is written (results.json keeps the run's own genes). eval.py
    --shared-genes: runs compared on the genes they share."""
    run = Path(run_dir).resolve()
    folds, names, counts = [], [], []
    for fold, files in finished_folds(run, allow_missing)[0]:
        if fold.name not in genes:
            continue
        keep = set(genes[fold.name])
        cols = [i for i, g in enumerate(files[0]["genes"]) if g in keep]
        if not cols:
            raise ValueError(f"{fold}: scored none of the genes the runs share in {fold.name}")
        folds.append(compute_metrics([f["pred"][:, cols] for f in files],
                                     [f["true"][:, cols] for f in files]))
        names.append(fold.name)
        counts.append(len(cols))
    if not folds:
        raise ValueError(f"{run}: none of its folds is among the folds the runs share")
    return {"run": run.name, "n_folds": len(folds), "fold_names": names, "missing_folds": [],
            "metrics": {k: _summary([m[k] for m in folds]) for k in METRICS},
            "genes": len({g for n in names for g in genes[n]}), "genes_per_fold": counts}


def genes_note(results: list[dict], genes: list[dict], shared: dict) -> tuple[str, str]:
    """The line that says how many genes each run scored and how many the runs share, and a warning
    when they differ ("" when not), naming --shared-genes. `genes`: each run's `fold_genes`;
    `shared`: `shared_genes` of them."""
    n_shared = len({g for v in shared.values() for g in v})
    per_fold = ", ".join(str(len(v)) for v in shared.values())
    line = ("genes scored: " + ", ".join(f"{r['run']} {gene_count(r)}" for r in results)
            + f"; shared by all runs: {n_shared} (per fold {per_fold})")
    same = all(g.keys() == genes[0].keys() and all(set(g[n]) == set(genes[0][n]) for n in g)
               for g in genes)
    counts = ", ".join(str(r["genes"]) for r in results)
    warning = "" if same else (
        f"eval.py: warning: the runs scored different genes ({counts}; {n_shared} shared), so "
        "their metrics are not comparable; --shared-genes scores every run on the genes all of "
        "them predicted in each fold")
    return line, warning


def gene_count(r: dict) -> str:
    """`491 (250 per fold)`, or `491 (250, 248)` where the folds scored different numbers of
    genes; the total alone for results without the folds' counts."""
    per = r.get("genes_per_fold") or []
    each = f"{per[0]} per fold" if len(set(per)) == 1 else ", ".join(map(str, per))
    return f"{r.get('genes', 'n/a')}" + (f" ({each})" if per else "")


# ---- the genes a picture shows -------------------------------------------------------------------
def fold_gene_scores(files: list[dict], folds: list) -> dict:
    """Per fold, gene -> PCC over the fold's test spots pooled (as results.md scores the fold);
    `folds`: one key per file (its folder: fold_<k>/pred). Without truth, the spatial standard
    deviation of the prediction ranks the genes instead."""
    by_fold: dict = {}
    for f, fold in zip(files, folds, strict=True):
        by_fold.setdefault(fold, []).append(f)
    out = {}
    for fold, fs in by_fold.items():
        labelled = [f for f in fs if f["true"] is not None]
        if labelled:
            values = per_gene_pcc(np.concatenate([f["pred"] for f in labelled]),
                                  np.concatenate([f["true"] for f in labelled]))
        else:
            values = np.concatenate([f["pred"] for f in fs]).astype(np.float64).std(0)
        out[fold] = dict(zip(fs[0]["genes"], values.tolist()))
    return out


def gene_scores(fold_scores: dict) -> dict[str, float]:
    """Gene -> its score (`fold_gene_scores`), mean over the folds that predict it."""
    scores: dict[str, list[float]] = {}
    for by_gene in fold_scores.values():
        for g, v in by_gene.items():
            scores.setdefault(g, []).append(v)
    return {g: float(np.mean(v)) for g, v in scores.items()}


def choose_genes(scores: dict[str, float], genes=None, top=None) -> list[str]:
    """The requested genes (each must exist), the `top` best, or the best, median and worst."""
    if genes:
        unknown = [g for g in genes if g not in scores]
        if unknown:
            raise ValueError(f"gene {unknown[0]}: not among the {len(scores)} predicted genes "
                             f"(e.g. {listed(scores)})")
        return list(genes)
    ranked = sorted(scores, key=lambda g: -scores[g])
    if top is not None:
        if top < 1:
            raise ValueError(f"--top {top}: expected a number of genes >= 1")
        return ranked[:top]
    return list(dict.fromkeys([ranked[0], ranked[len(ranked) // 2], ranked[-1]]))


def number(x, digits: int = 4) -> str:
    """A number as every table shows it: `digits` decimals, or scientific notation where decimals
    would be unreadable (|x| >= 1e6: a diverged r2_flat has 28 digits; nonzero |x| < 1e-3: 0.0000
    hides it); n/a for None."""
    if x is None:
        return "n/a"
    x = float(x)
    if x != 0 and math.isfinite(x) and not 1e-3 <= abs(x) < 1e6:
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}f}"


def mean_std(entry: dict) -> str:
    """A metric's entry of results.json as `mean ± std` over folds (`number`), n/a when
    undefined."""
    return "n/a" if entry["mean"] is None else f"{number(entry['mean'])} ± {number(entry['std'])}"


def _run_markdown(r: dict) -> str:
    k = r["n_folds"]
    lines = [f"# Results: {r['run']}", "",
             f"{STD_NOTE}; {k} folds, {r['genes']} genes, test slides per fold: "
             f"{r['slides_per_fold']}.", "",
             "| metric | mean ± std | " + " | ".join(r["fold_names"]) + " |",
             "| --- | --- |" + " --- |" * k]
    for name, e in r["metrics"].items():
        cells = [number(v) for v in e["folds"]]
        lines.append(f"| {name} | {mean_std(e)} | " + " | ".join(cells) + " |")
    lines += ["", "Zero-variance genes (PCC set to 0) per fold: "
              f"{r['zero_variance_genes']['folds']} over the pooled test spots; (slide, gene) "
              f"pairs constant within a slide: {r['zero_variance_genes_slide']['folds']}."]
    left = {m: n for m, n in r["slides_left_out"].items() if any(n)}
    if left:
        lines.append("Per-slide metrics leave out the slides where they are undefined (truth "
                     "constant), per fold: " + "; ".join(f"{m} {n}" for m, n in left.items()) + ".")
    if "unc_spearman" in r["metrics"]:
        lines.append("unc_spearman: per gene, Spearman between the predicted std and |error| over "
                     "the test spots, mean over genes; coverage: share of test values within "
                     "pred ± 1.96 std.")
    if any(k.startswith("coverage@") for k in r["metrics"]):
        lines.append("coverage@L, width@L: share of test values inside the split-conformal "
                     "interval of nominal level L% and its mean width (log1p units); _constant: "
                     "the constant-width interval per gene of the same calibration slides; "
                     "width_ratio: width / constant width.")
    if r.get("per_slide"):
        keys = list(next(iter(r["per_slide"].values())))[1:]
        lines += ["", "| slide | fold | " + " | ".join(keys) + " |",
                  "| --- | --- |" + " --- |" * len(keys)]
        lines += [f"| {sid} | {e['fold']} | " + " | ".join(number(e[k]) for k in keys) + " |"
                  for sid, e in r["per_slide"].items()]
    if r.get("ridge_alone"):
        lines += ["", ridge_alone_line(r)]
    if r["missing_folds"]:
        lines.append(f"Not finished, not evaluated: {', '.join(r['missing_folds'])}.")
    return "\n".join(lines + [""])


def ridge_alone_line(r: dict) -> str:
    """The test slides each fold predicted by the spatial ridge alone (model.ood_fallback)."""
    return ("Predicted by the spatial ridge alone, unlike every training slide "
            "(model.ood_fallback): "
            + "; ".join(f"{k} {', '.join(s)}" for k, s in r["ridge_alone"].items()) + ".")


def format_table(results_list: list[dict]) -> str:
    """One markdown table comparing runs: rows = runs, columns = the folds, the genes scored
    (`gene_count`) and METRICS as mean ± std over folds."""
    lines = [f"{STD_NOTE}; higher is better except mse and mae.", "",
             "| run | folds | genes | " + " | ".join(METRICS) + " |",
             "| --- | --- | --- |" + " --- |" * len(METRICS)]
    for r in results_list:
        missing = f" (missing {', '.join(r['missing_folds'])})" if r.get("missing_folds") else ""
        cells = [r["run"], f"{r['n_folds']}{missing}", gene_count(r)]
        cells += [mean_std(r["metrics"][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prediction_files(run) -> list[Path]:
    """A run's test predictions (fold_<k>/pred/*.h5) or a folder of prediction files
    (predict.py)."""
    run = Path(run)
    files = sorted(run.glob("fold_*/pred/*.h5"))
    files = files or sorted(p for p in run.glob("*.h5") if _is_prediction(p))
    if not files:
        raise FileNotFoundError(f"{run}: no prediction files (fold_<k>/pred/*.h5 or <slide>.h5 "
                                "from predict.py); train the run or predict first")
    return files


def _is_prediction(path) -> bool:
    with h5py.File(path, "r") as f:
        return "pred" in f and "genes" in f


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="eval.py", description="Re-evaluate runs (rewrites "
                                "results.json, per_gene.csv, results.md), print one table.")
    p.add_argument("runs", nargs="+", help="run folders, e.g. runs/default")
    p.add_argument("--partial", action="store_true",
                   help="evaluate finished folds, and folds without some test slides")
    p.add_argument("--shared-genes", action="store_true",
                   help="score every run on the genes all of them predicted in each fold (each "
                        "run's own files keep its own genes)")
    a = p.parse_args(argv)
    try:
        results = [evaluate_run(d, a.partial, a.partial) for d in a.runs]
        genes = [fold_genes(d) for d in a.runs]
        shared = shared_genes(genes)
        line, warning = genes_note(results, genes, shared) if len(results) > 1 else ("", "")
        if a.shared_genes:
            results = [{**score_on_genes(d, shared, a.partial), "missing_folds": r["missing_folds"]}
                       for d, r in zip(a.runs, results)]
            line += ("\n" if line else "") + ("scored on the genes every run predicted in each "
                                              "fold (--shared-genes); results.json keeps each "
                                              "run's own")
            warning = ""
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"eval.py: {e}")
    if warning:
        print(warning, file=sys.stderr)
    report(results, line)


def report(results: list[dict], note: str = "") -> None:
    """Print the runs' table, after a line on stderr for each run that is not finished; `note` (the
    genes the runs scored) after the table."""
    for r in results:
        if r["missing_folds"]:
            print(f"{r['run']}: not finished, not evaluated: {', '.join(r['missing_folds'])}",
                  file=sys.stderr)
    print(format_table(results) + (f"\n\n{note}" if note else ""))
    for r in results:
        if r.get("ridge_alone"):
            print(f"{r['run']}: {ridge_alone_line(r)}")


if __name__ == "__main__":
    main()

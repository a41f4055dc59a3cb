"""Metrics, prediction files and result tables (DESIGN.md, "Training and evaluation").

Usage:
    python eval.py runs/<name> [runs/<other> ...]              # re-evaluate runs, print one comparison table
    python eval.py predict --run runs/<name> --slides DIR --out DIR [--mc N] [--format h5ad]
    python eval.py plot runs/<name> [--slide ID] [--genes G ... | --top K]      # maps (plots.py)
    python eval.py attention runs/<name> --slide ID --spot BARCODE [--block K]  # one spot's attention
    python eval.py runs/<name> --paper hist:brain                  # the paper's numbers beside the run's
All metrics take log-space values (log1p of counts), numpy arrays or torch tensors, and compute in float64.
"""
from __future__ import annotations

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
from data import atomic_path

METRICS = ["pcc_gene", "pcc_gene_slide", "pcc_flat", "r2_flat", "mse", "mae"]
UNCERTAINTY = ["unc_spearman", "coverage"]  # with predicted std (eval.mc_samples, ensembles)
STD_NOTE = "mean ± std over folds (population std, numpy ddof=0)"


# ---------------------------------------------------------------- metrics
def _array(x, dtype=np.float64) -> np.ndarray:
    """A tensor or array-like as a numpy array of `dtype` (float64 or float32; bf16 tensors included)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    return np.asarray(x, dtype=dtype)


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p, t = _array(pred), _array(true)
    if p.shape != t.shape or p.ndim != 2 or len(p) == 0 or not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError(f"pred, true: expected finite (N, G) arrays of one shape; got {p.shape}, {t.shape}")
    return p, t


def _slides(preds, trues) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lists of per-slide (N_i, G) arrays; a single 2-D array counts as one slide."""
    if isinstance(preds, (np.ndarray, torch.Tensor)):
        preds, trues = [preds], [trues]
    if len(preds) != len(trues) or len(preds) == 0:
        raise ValueError(f"expected as many predicted as true slides, >= 1; got {len(preds)}, {len(trues)}")
    return [_pair(p, t) for p, t in zip(preds, trues)]


def _constant(x: np.ndarray) -> np.ndarray:
    # Exact test: a constant column's float64 mean is not always exactly its value, which would
    # leave tiny residuals and a meaningless PCC of +-1.
    return (x == x[:1]).all(axis=0)


def _pcc_columns(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Pearson per column; 0 where truth or prediction is constant (DESIGN.md)."""
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
    """DESIGN.md `pcc_gene`: Pearson per gene over the pooled spots, mean over genes (HEST-Benchmark, FEAST)."""
    return float(per_gene_pcc(pred, true).mean())


def _mean(values) -> float:
    """Mean of a list, NaN for an empty list (a metric defined on no slide), without a warning."""
    return float(np.mean(values)) if len(values) else float("nan")


def _per_slide(fn, preds, trues) -> list[float]:
    """fn(p, t) of each slide where it is defined (None = undefined, e.g. constant truth)."""
    return [v for v in (fn(p, t) for p, t in _slides(preds, trues)) if v is not None]


def _slide_pcc(p, t):
    return None if _constant(t).all() else _pcc_columns(p, t).mean()  # one spot, or all genes constant


def pcc_gene_slide(preds, trues) -> float:
    """DESIGN.md `pcc_gene_slide`: pcc_gene within each slide, mean over the slides where it is defined:
    a slide whose truth is constant in every gene (one spot, all counts zero) is left out. NaN if none."""
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
    """DESIGN.md `pcc_flat` (HiST): Pearson over each slide's flattened N*G matrix in linear space
    (expm1, clipped at 0), mean over slides; a slide whose flattened truth is constant is left out."""
    return _mean(_per_slide(_slide_pcc_flat, preds, trues))


def r2_flat(preds, trues) -> float:
    """DESIGN.md `r2_flat` (HiST): 1 - SS_res / SS_tot over each slide's flattened N*G matrix in linear
    space, SS_tot around that slide's flattened mean; mean over slides, leaving out slides with SS_tot = 0."""
    return _mean(_per_slide(_slide_r2_flat, preds, trues))


def mse(preds, trues) -> float:
    """DESIGN.md `mse`: mean squared error in log space over all spots and genes (pooled over slides)."""
    return float(np.mean(np.concatenate([((p - t) ** 2).ravel() for p, t in _slides(preds, trues)])))


def mae(preds, trues) -> float:
    """DESIGN.md `mae`: mean absolute error in log space over all spots and genes (pooled over slides)."""
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
    """How informative the uncertainty is: per gene, Spearman correlation between `std` and |pred - true|
    over the spots, mean over the genes where both vary (NaN if none). (N, G) arrays."""
    s, err = _array(std), np.abs(_array(pred) - _array(true))
    ok = ~(_constant(s) | _constant(err))
    return _mean(_pcc_columns(_ranks(s[:, ok]), _ranks(err[:, ok])).tolist()) if ok.any() else float("nan")


def coverage(std, pred, true, z: float = 1.96) -> float:
    """Share of the values with |true - pred| <= z * std (0.95 for calibrated Gaussian errors)."""
    return float(np.mean(np.abs(_array(true) - _array(pred)) <= z * _array(std)))


def compute_metrics(preds, trues, stds=None) -> dict:
    """Every DESIGN.md metric on a fold's test slides (lists of per-slide (N_i, G) log-space arrays).
    pcc_gene, per_gene_pcc and zero_variance_genes use the concatenation of the slides;
    zero_variance_genes_slide counts (slide, gene) pairs constant within a slide; slides_left_out says how
    many slides each per-slide metric left out (undefined there). With `stds`, also unc_spearman, coverage."""
    ps, ts = map(list, zip(*_slides(preds, trues)))
    p, t = np.concatenate(ps), np.concatenate(ts)
    per_gene = _pcc_columns(p, t)
    out = {"pcc_gene": float(per_gene.mean()), "pcc_gene_slide": pcc_gene_slide(ps, ts),
           "pcc_flat": pcc_flat(ps, ts), "r2_flat": r2_flat(ps, ts), "mse": mse(ps, ts), "mae": mae(ps, ts),
           "per_gene_pcc": per_gene, "zero_variance_genes": zero_variance_genes(p, t),
           "zero_variance_genes_slide": sum(zero_variance_genes(a, b) for a, b in zip(ps, ts)),
           "slides_left_out": {k: len(ps) - len(_per_slide(fn, ps, ts)) for k, fn in
                               [("pcc_gene_slide", _slide_pcc), ("pcc_flat", _slide_pcc_flat),
                                ("r2_flat", _slide_r2_flat)]}}
    if stds is not None:
        s = np.concatenate([_array(x) for x in stds])
        out["unc_spearman"], out["coverage"] = unc_spearman(s, p, t), coverage(s, p, t)
    return out


# ---------------------------------------------------------------- prediction files
def write_predictions(path, pred, genes, barcodes, coords, true=None, slide_id=None, std=None,
                      n_models=None) -> None:
    """One h5 per slide: `pred` (N, G) float32 log1p space, `genes`, `barcodes`, `coords` (N, 2),
    optional `true` and `std` (N, G) and `n_models` (G,) (fold models behind each gene); written to a
    temporary name and renamed."""
    # float32 directly, no float64 copy: (N, G) is 8 GB at 1M spots x 2,000 genes
    pred, coords = _array(pred, np.float32), _array(coords, np.float32)
    n, g = pred.shape
    extra = {k: None if v is None else _array(v, np.float32) for k, v in (("true", true), ("std", std))}
    found = {"genes": (len(genes),), "barcodes": (len(barcodes),), "coords": coords.shape,
             **{k: (n, g) if v is None else v.shape for k, v in extra.items()},
             "n_models": (g,) if n_models is None else np.shape(n_models)}
    expected = {"genes": (g,), "barcodes": (n,), "coords": (n, 2), "true": (n, g), "std": (n, g), "n_models": (g,)}
    problems = [f"{k} has shape {found[k]}, expected {expected[k]}" for k in found if found[k] != expected[k]]
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    strings = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["pred"] = pred
        f.create_dataset("genes", data=[str(x) for x in genes], dtype=strings)
        f.create_dataset("barcodes", data=[str(x) for x in barcodes], dtype=strings)
        f["coords"] = coords
        for k, v in extra.items():
            if v is not None:
                f[k] = v
        if n_models is not None:
            f["n_models"] = np.asarray(n_models, dtype=np.int32)
        f.attrs["slide_id"] = str(slide_id if slide_id is not None else Path(path).stem)


def read_predictions(path) -> dict:
    """Inverse of write_predictions: {slide_id, pred, genes (list), barcodes, coords, true, std, n_models}
    (None where absent)."""
    with h5py.File(path, "r") as f:
        get = lambda k: f[k][:] if k in f else None  # noqa: E731
        return {"slide_id": str(f.attrs.get("slide_id", Path(path).stem)), "pred": f["pred"][:],
                "genes": list(f["genes"].asstr()[:]), "barcodes": np.array(f["barcodes"].asstr()[:], dtype=str),
                "coords": f["coords"][:], "true": get("true"), "std": get("std"), "n_models": get("n_models")}


def _h5ad_put(group, key, value) -> None:
    """One entry in AnnData's on-disk format (anndata.readthedocs.io, "On-disk format"): arrays,
    string arrays, string and numeric scalars, dicts as groups."""
    if isinstance(value, dict):
        sub = group.create_group(key)
        sub.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        for k, v in value.items():
            _h5ad_put(sub, str(k), v)
    elif isinstance(value, str):
        group.create_dataset(key, data=value, dtype=h5py.string_dtype("utf-8"))
        group[key].attrs.update({"encoding-type": "string", "encoding-version": "0.2.0"})
    elif np.ndim(value) == 0:
        group[key] = value
        group[key].attrs.update({"encoding-type": "numeric-scalar", "encoding-version": "0.2.0"})
    elif np.asarray(value).dtype.kind in "USO":
        group.create_dataset(key, data=[str(x) for x in value], dtype=h5py.string_dtype("utf-8"))
        group[key].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    else:
        group[key] = np.asarray(value)
        group[key].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def write_h5ad(path, pred, genes, barcodes, coords, std=None, true=None, n_models=None, uns=None) -> None:
    """An AnnData file (h5py only) that anndata.read_h5ad, scanpy and squidpy open: X = predicted
    expression (N, G), layers `std` / `true` when given, obs index = barcodes, var index = genes (column
    `n_models` when given), obsm['spatial'] = coords in micrometres, `uns` a dict of strings and numbers."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        _h5ad_put(f, "X", _array(pred, np.float32))
        for name, index, columns in (("obs", barcodes, {}),
                                     ("var", genes, {} if n_models is None else {"n_models": n_models})):
            frame = f.create_group(name)
            frame.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index"})
            frame.attrs.create("column-order", np.array(list(columns), dtype=object),
                               dtype=h5py.string_dtype("utf-8"))
            _h5ad_put(frame, "_index", np.array([str(x) for x in index], dtype=object))
            for k, v in columns.items():
                _h5ad_put(frame, k, np.asarray(v))
        layers = {k: _array(v, np.float32) for k, v in (("std", std), ("true", true)) if v is not None}
        for name, value in (("layers", layers), ("obsm", {"spatial": _array(coords, np.float32)}),
                            ("uns", uns or {}), ("obsp", {}), ("varm", {}), ("varp", {})):
            _h5ad_put(f, name, value)


# ---------------------------------------------------------------- prediction with uncertainty
class Welford:
    """Running mean and spread of samples of an (N, G) array (Welford 1962): memory two (N, G) arrays
    whatever the number of samples, never one per sample. A sample may cover some columns only (`cols`:
    a fold model that predicts a subset of the genes); `count` (G,) says how many samples each column had."""

    def __init__(self, n: int, g: int, dtype=torch.float32):
        self.count = torch.zeros(g, dtype=torch.long)
        self.mean, self.m2 = torch.zeros(n, g, dtype=dtype), torch.zeros(n, g, dtype=dtype)

    def add(self, x: torch.Tensor, cols=None) -> None:
        cols = slice(None) if cols is None else torch.as_tensor(cols, dtype=torch.long)
        self.count[cols] += 1
        mean = self.mean[:, cols]                              # a view (every column) or a copy (some)
        delta = x.to(mean.dtype) - mean
        mean += delta / self.count[cols]
        self.mean[:, cols] = mean
        self.m2[:, cols] += delta * (x - mean)

    def std(self) -> torch.Tensor:
        """Population standard deviation (numpy's default ddof=0) of each entry over its samples."""
        return (self.m2 / self.count.clamp(min=1)).sqrt()


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether Monte-Carlo dropout can vary this model's output (a dropout or attention dropout > 0)."""
    return any((isinstance(m, torch.nn.Dropout) and m.p > 0) or getattr(m, "attn_drop", 0) > 0
               for m in model.modules())


@torch.no_grad()
def predict_slide(model, slide, use_pseudo: bool, device, dtype=torch.float32, mc_seed: int | None = None
                  ) -> torch.Tensor:
    """Log-space prediction (N, G) for one Slide, on the CPU, as `dtype`; bf16 autocast on CUDA.
    The model runs its low-memory inference path (eval, no grad). With `mc_seed`, one Monte-Carlo dropout
    pass instead: dropout active (train mode, still no grad), random numbers seeded by `mc_seed` so that
    reruns are identical, the global random state left as it was."""
    pseudo = use_pseudo and slide.pseudo_features is not None
    args = [slide.features, slide.coords, slide.pseudo_features if pseudo else None,
            slide.pseudo_coords if pseudo else None]
    args = [None if a is None else a.to(device) for a in args]
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else [], enabled=mc_seed is not None):
        if mc_seed is not None:
            torch.manual_seed(mc_seed)
        model.train(mc_seed is not None)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                return model(*args, out_dtype=dtype)["pred"].cpu()
        finally:
            model.eval()


def predict_with_std(models, slide, use_pseudo: bool, device, mc: int = 0, seed: int = 0):
    """Mean and spread over the samples of the fold models (the ensemble) and, with mc > 0, of mc
    Monte-Carlo dropout passes per model (each seeded). `models`: [(model, genes)]; a gene is averaged
    over the models that predict it. Returns genes (union, first-seen order), mean (N, G), std (N, G)
    (population std over the samples) and n_models (G,) (models behind each gene)."""
    genes = list(dict.fromkeys(g for _, gs in models for g in gs))
    column = {g: i for i, g in enumerate(genes)}
    acc = Welford(slide.n_spots, len(genes))
    for m, (model, gs) in enumerate(models):
        cols = None if gs == genes else [column[g] for g in gs]
        for j in range(max(mc, 1)):
            acc.add(predict_slide(model, slide, use_pseudo, device,
                                  mc_seed=(seed * 1000003 + m * 1009 + j) if mc else None), cols)
    return genes, acc.mean, acc.std(), acc.count // max(mc, 1)


def write_slide_predictions(models, slide, cfg: dict, device, out_dir, true=None, fold="", mc: int = 0,
                            formats=("h5",), seed: int = 0) -> None:
    """Predict one slide (predict_with_std) and write <slide>.h5 and/or <slide>.h5ad in out_dir; `std`
    only where there is a spread (several models or mc > 0). `true` (N, G) on the first model's genes."""
    genes, pred, std, n_models = predict_with_std(models, slide, cfg["data"]["pseudo"], device, mc, seed)
    std = std if (len(models) > 1 or mc) else None
    space = "log1p(counts / library_size * 1e4)" if cfg["data"]["normalize"] else "log1p(counts)"
    out = Path(out_dir) / slide.slide_id
    if "h5" in formats:
        write_predictions(f"{out}.h5", pred, genes, slide.barcodes, slide.coords, true=true,
                          slide_id=slide.slide_id, std=std, n_models=n_models.numpy())
    if "h5ad" in formats:
        import yaml
        uns = {"tessera": {"run": str(cfg["run"]["name"]), "fold": str(fold), "slide_id": slide.slide_id,
                           "X": f"predicted expression, {space}", "mc_samples": int(mc),
                           "config": yaml.safe_dump(cfg, sort_keys=False)}}
        write_h5ad(f"{out}.h5ad", pred, genes, slide.barcodes, slide.coords, std=std, true=true,
                   n_models=n_models.numpy(), uns=uns)


# ---------------------------------------------------------------- runs and tables
def _fold_dirs(run: Path) -> list[Path]:
    return sorted((d for d in run.glob("fold_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:]))


def expected_folds(run, cfg: dict | None = None) -> list[int]:
    """The fold numbers a run has when finished: from its config (data.folds, data.split_dir, or for
    leave-one-patient-out the patients of data.root when it is there), else its fold_<k> folders."""
    run = Path(run)
    if cfg is None:
        import yaml
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
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
    """Folds, mean and std (ddof=0) of a metric over the folds where it is defined (null elsewhere)."""
    ok = [v for v in values if not math.isnan(v)]
    return {"folds": [None if math.isnan(v) else v for v in values],
            "mean": float(np.mean(ok)) if ok else None, "std": float(np.std(ok, ddof=0)) if ok else None}


def evaluate_run(run_dir) -> dict:
    """Metrics per fold from runs/<name>/fold_<k>/pred/*.h5 (slides with `true` only), over the folds
    that have predictions; the others are listed as `missing_folds`. Writes results.json, per_gene.csv
    and results.md in the run folder and returns the results dict."""
    run = Path(run_dir).resolve()
    fold_dirs = _fold_dirs(run)
    if not fold_dirs:
        raise FileNotFoundError(f"{run}: no fold_<k> folders; is this a run directory (runs/<name>)?")
    folds, per_gene, slides, names, empty = [], [], [], [], []
    for fold in fold_dirs:
        files = [f for f in map(read_predictions, sorted((fold / "pred").glob("*.h5"))) if f["true"] is not None]
        if not files or (fold / "checkpoint.pt").exists():  # a checkpoint: still training or predicting
            empty.append(f"{fold / 'pred'}")
            continue
        bad = [f["slide_id"] for f in files if f["genes"] != files[0]["genes"]]
        if bad:
            raise ValueError(f"{fold / 'pred'}: slides {bad} have other genes than {files[0]['slide_id']}")
        stds = [f["std"] for f in files] if all(f["std"] is not None for f in files) else None
        m = compute_metrics([f["pred"] for f in files], [f["true"] for f in files], stds)
        folds.append(m)
        per_gene.append(dict(zip(files[0]["genes"], m["per_gene_pcc"].tolist())))  # gene -> PCC
        slides.append([f["slide_id"] for f in files])
        names.append(fold.name)
    if not folds:
        raise FileNotFoundError(f"{run}: no finished fold: no prediction files with `true` to evaluate "
                                f"in {', '.join(empty)}")
    done = {int(n[5:]) for n in names}
    missing = [f"fold_{k}" for k in expected_folds(run) if k not in done]
    all_genes = list(dict.fromkeys(g for pg in per_gene for g in pg))  # union over folds, first-seen order
    extra = [k for k in UNCERTAINTY if all(k in m for m in folds)]
    results = {"run": run.name, "n_folds": len(folds), "fold_names": names, "missing_folds": missing,
               "metrics": {k: _summary([m[k] for m in folds]) for k in METRICS + extra},
               "zero_variance_genes": {"folds": [m["zero_variance_genes"] for m in folds]},
               "zero_variance_genes_slide": {"folds": [m["zero_variance_genes_slide"] for m in folds]},
               "slides_left_out": {k: [m["slides_left_out"][k] for m in folds] for k in folds[0]["slides_left_out"]},
               "genes": len(all_genes), "genes_per_fold": [len(pg) for pg in per_gene],
               "slides_per_fold": [len(s) for s in slides], "slides": slides}
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


def _mean_std(entry: dict) -> str:
    return "n/a" if entry["mean"] is None else f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def _run_markdown(r: dict) -> str:
    k = r["n_folds"]
    lines = [f"# Results: {r['run']}", "",
             f"{STD_NOTE}; {k} folds, {r['genes']} genes, test slides per fold: {r['slides_per_fold']}.", "",
             "| metric | mean ± std | " + " | ".join(r["fold_names"]) + " |",
             "| --- | --- |" + " --- |" * k]
    for name, e in r["metrics"].items():
        cells = ["n/a" if v is None else f"{v:.4f}" for v in e["folds"]]
        lines.append(f"| {name} | {_mean_std(e)} | " + " | ".join(cells) + " |")
    lines += ["", f"Zero-variance genes (PCC set to 0) per fold: {r['zero_variance_genes']['folds']} over the "
              f"pooled test spots; (slide, gene) pairs constant within a slide: "
              f"{r['zero_variance_genes_slide']['folds']}."]
    left = {m: n for m, n in r["slides_left_out"].items() if any(n)}
    if left:
        lines.append("Per-slide metrics leave out the slides where they are undefined (truth constant), "
                     "per fold: " + "; ".join(f"{m} {n}" for m, n in left.items()) + ".")
    if "unc_spearman" in r["metrics"]:
        lines.append("unc_spearman: per gene, Spearman between the predicted std and |error| over the test "
                     "spots, mean over genes; coverage: share of test values within pred ± 1.96 std.")
    if r["missing_folds"]:
        lines.append(f"Not finished, not evaluated: {', '.join(r['missing_folds'])}.")
    return "\n".join(lines + [""])


def format_table(results_list: list[dict]) -> str:
    """One markdown table comparing runs: rows = runs, columns = METRICS as mean ± std over folds."""
    lines = [f"{STD_NOTE}; higher is better except mse and mae.", "",
             "| run | folds | " + " | ".join(METRICS) + " |", "| --- | --- |" + " --- |" * len(METRICS)]
    for r in results_list:
        missing = f" (missing {', '.join(r['missing_folds'])})" if r.get("missing_folds") else ""
        cells = [r["run"], f"{r['n_folds']}{missing}"] + [_mean_std(r["metrics"][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- a paper's numbers beside a run's
PAPERS = Path(__file__).with_name("configs") / "protocols" / "papers.yaml"


def pcc_spot(preds, trues) -> float:
    """HiFusion's PCC: Pearson over the genes of each spot, mean over all spots (0 for a constant spot)."""
    ps, ts = map(list, zip(*_slides(preds, trues)))
    return float(_pcc_columns(np.concatenate(ps).T, np.concatenate(ts).T).mean())


def paper_table(results: dict, run_dir, key: str) -> str:
    """The rows of configs/protocols/papers.yaml entry `key` and, below them, this run's values of the
    same metrics (mean ± std over folds); pcc_spot is computed from the run's prediction files."""
    import yaml
    table = yaml.safe_load(PAPERS.read_text())
    if key not in table:
        raise ValueError(f"{PAPERS}: expected an entry --paper {key!r}; it has {', '.join(table)}")
    entry, cells = table[key], []
    for m in entry["metrics"]:
        if m == "pcc_spot":
            folds = [[read_predictions(f) for f in sorted((Path(run_dir) / name / "pred").glob("*.h5"))]
                     for name in results["fold_names"]]
            v = [pcc_spot([f["pred"] for f in fs if f["true"] is not None], [f["true"] for f in fs if f["true"] is not None])
                 for fs in folds]
            cells.append(f"{np.mean(v):.4f} ± {np.std(v):.4f}")
        else:
            cells.append(_mean_std(results["metrics"][m]))
    lines = [f"{entry['source']} ({key}), beside {results['run']} ({results['n_folds']} folds):", "",
             "| method | " + " | ".join(entry["metrics"]) + " |", "| --- |" + " --- |" * len(entry["metrics"])]
    lines += [f"| {name} (paper) | " + " | ".join(str(v) for v in row) + " |" for name, row in entry["rows"].items()]
    lines.append(f"| {results['run']} (this run) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- prediction of new slides
def load_fold_models(run_dir, device="cpu", folds=None) -> list[tuple[torch.nn.Module, list[str]]]:
    """The model of every finished fold of a run (or of the given fold numbers), with its gene list."""
    from model import ModelConfig, build_model
    models = []
    paths = sorted(Path(run_dir).glob("fold_*/model.pt")) if folds is None else \
        [Path(run_dir) / f"fold_{k}" / "model.pt" for k in folds]
    for path in paths:
        try:  # weights_only: a shared or downloaded run folder can hold tensors, numbers and strings, never code
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (pickle and zip errors have no common base class)
            raise ValueError(f"{path}: not loaded: expected a tessera model file of tensors, numbers and "
                             f"strings, found {str(e).splitlines()[0]}") from None
        model = build_model(ModelConfig.from_dict(ck["model_config"]), ck["in_dim"], len(ck["genes"]))
        model.load_state_dict(ck["model"])
        models.append((model.to(device).eval(), ck["genes"]))
    if not models:
        raise FileNotFoundError(f"{run_dir}: no fold_<k>/model.pt; is this a finished run (runs/<name>)?")
    return models


def run_folds(run_dir, fold: int | None = None, partial: bool = False) -> list[int]:
    """The fold numbers to use: `fold`, or every fold of the run; an unknown fold, an unfinished one, or
    a partial run (unless `partial`) is an error that names the folds."""
    run = Path(run_dir)
    expected = expected_folds(run)
    have = [k for k in expected if (run / f"fold_{k}" / "model.pt").exists()]
    if fold is not None:
        if fold not in expected:
            raise ValueError(f"--fold {fold}: expected a fold number 0 ... {len(expected) - 1} of {run}")
        if fold not in have:
            raise FileNotFoundError(f"--fold {fold}: {run / f'fold_{fold}' / 'model.pt'} does not exist "
                                    "(unfinished fold)")
        return [fold]
    missing = [f"fold_{k}" for k in expected if k not in have]
    if not have:
        raise FileNotFoundError(f"{run}: no fold_<k>/model.pt; is this a finished run (runs/<name>)?")
    if missing and not partial:
        raise FileNotFoundError(f"{run}: partial run, {', '.join(missing)} not finished; pass --partial to "
                                f"predict with the {len(have)} finished fold(s)")
    return have


def predict_run(run_dir, slides_dir, out_dir, fold: int | None = None, device="cpu", overwrite: bool = False,
                mc: int = 0, formats=("h5",), partial: bool = False, seed: int = 0) -> list[Path]:
    """Predict every slide cache in `slides_dir` with the run's fold models (each gene averaged over the
    folds that predict it, `std` over the folds and mc dropout passes), or with one fold; one prediction
    file per slide and format in `out_dir`. Every check runs before anything is written."""
    import yaml
    data.not_an_input(out_dir, slides_dir, run_dir)  # before anything is read: inputs are never written over
    if not (Path(run_dir) / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}/config.yaml: not found; is this a run folder (runs/<name>)?")
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    folds = run_folds(run_dir, fold, partial)
    models = load_fold_models(run_dir, device, folds)
    if mc and not any(has_dropout(m) for m, _ in models):
        raise ValueError(f"--mc {mc}: the models of {run_dir} have no dropout (model.dropout and "
                         "model.attn_dropout are 0), so Monte-Carlo passes would all be equal")
    paths = data.list_slides(slides_dir)
    width, metas = models[0][0].feat_mean.shape[0], [data.read_slide_meta(p) for p in paths]
    for path, meta in zip(paths, metas):
        if meta.n_features != width:
            raise ValueError(f"{path}: features have {meta.n_features} columns, the models of {run_dir} "
                             f"expect {width} (another encoder?)")
    outs = [Path(out_dir) / f"{m.slide_id}.{ext}" for m in metas for ext in formats]  # as written below
    exists = [str(o) for o in outs if o.exists()]
    if exists and not overwrite:
        raise FileExistsError(f"{exists[0]} exists ({len(exists)} files in all); choose another --out "
                              "or pass --overwrite")
    for path in paths:
        slide = data.read_slide(path)
        write_slide_predictions(models, slide, cfg, device, out_dir, fold=",".join(map(str, folds)), mc=mc,
                                formats=formats, seed=seed)
        print(f"{Path(out_dir) / slide.slide_id} ({', '.join('.' + f for f in formats)}): {slide.n_spots} spots "
              f"({len(models)} fold model(s){f', {mc} dropout passes each' if mc else ''})")
    return outs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("plot", "attention"):  # pictures: plots.py, where matplotlib is imported lazily
        import plots
        return plots.main(argv)
    command = "predict" if argv and argv[0] == "predict" else None
    p = argparse.ArgumentParser(prog=f"eval.py {command or ''}".strip())
    if command == "predict":
        p.description = "Predict slide caches (counts not needed) with a finished run's fold models."
        p.add_argument("--run", required=True, help="run folder, e.g. runs/demo")
        p.add_argument("--slides", required=True, help="folder of <slide>.h5 caches")
        p.add_argument("--out", required=True, help="output folder for the prediction files")
        p.add_argument("--fold", type=int, default=None, help="use one fold's model instead of the ensemble")
        p.add_argument("--mc", type=int, default=0, help="Monte-Carlo dropout passes per model (std)")
        p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo dropout passes")
        p.add_argument("--format", choices=["h5", "h5ad"], nargs="+", default=["h5"],
                       help="h5 prediction files and/or AnnData .h5ad")
        p.add_argument("--partial", action="store_true", help="predict with the finished folds of a partial run")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
    else:
        p.description = "Re-evaluate runs (rewrites results.json, per_gene.csv, results.md), print one table."
        p.add_argument("runs", nargs="+", help="run folders, e.g. runs/default")
        p.add_argument("--paper", help="also print a paper's numbers beside each run's, e.g. hist:brain "
                       "(entries of configs/protocols/papers.yaml)")
    a = p.parse_args(argv[1:] if command else argv)
    try:
        if command == "predict":
            if a.mc < 0:
                raise ValueError(f"--mc {a.mc}: expected a number of passes >= 0")
            predict_run(a.run, a.slides, a.out, a.fold, a.device, a.overwrite, a.mc, tuple(a.format), a.partial, a.seed)
            return
        results = [evaluate_run(d) for d in a.runs]
        papers = [paper_table(r, d, a.paper) for r, d in zip(results, a.runs)] if a.paper else []
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"eval.py{' ' + command if command else ''}: {e}")
    for r in results:
        if r["missing_folds"]:
            print(f"{r['run']}: not finished, not evaluated: {', '.join(r['missing_folds'])}", file=sys.stderr)
    print(format_table(results))
    for table in papers:
        print("\n" + table)


if __name__ == "__main__":
    main()

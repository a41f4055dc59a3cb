"""Metrics, prediction files and result tables (DESIGN.md, "Training and evaluation").

Usage:
    python eval.py runs/<name> [runs/<other> ...]              # re-evaluate runs, print one comparison table
    python eval.py predict --run runs/<name> --slides DIR --out DIR  # predict slides without counts
All metrics take log-space values (log1p of counts), numpy arrays or torch tensors, and compute in float64.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

import data
from data import atomic_path

METRICS = ["pcc_gene", "pcc_gene_slide", "pcc_flat", "r2_flat", "mse", "mae"]
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


def pcc_gene_slide(preds, trues) -> float:
    """DESIGN.md `pcc_gene_slide`: pcc_gene within each slide, mean over slides."""
    return float(np.mean([_pcc_columns(p, t).mean() for p, t in _slides(preds, trues)]))


def _linear_flat(x: np.ndarray) -> np.ndarray:
    return np.clip(np.expm1(x), 0.0, None).reshape(-1, 1)  # (N*G, 1) counts


def pcc_flat(preds, trues) -> float:
    """DESIGN.md `pcc_flat` (HiST): Pearson over each slide's flattened N*G matrix in linear space
    (expm1, clipped at 0), mean over slides; 0 for a slide whose flattened values are constant."""
    return float(np.mean([_pcc_columns(_linear_flat(p), _linear_flat(t))[0] for p, t in _slides(preds, trues)]))


def r2_flat(preds, trues) -> float:
    """DESIGN.md `r2_flat` (HiST): 1 - SS_res / SS_tot over each slide's flattened N*G matrix in linear
    space, SS_tot around that slide's flattened mean; mean over slides. 0 for a slide with SS_tot = 0."""
    scores = []
    for p, t in _slides(preds, trues):
        p, t = _linear_flat(p), _linear_flat(t)
        ss_tot = ((t - t.mean()) ** 2).sum()
        scores.append(0.0 if _constant(t)[0] or ss_tot == 0 else 1.0 - ((t - p) ** 2).sum() / ss_tot)
    return float(np.mean(scores))


def mse(preds, trues) -> float:
    """DESIGN.md `mse`: mean squared error in log space over all spots and genes (pooled over slides)."""
    return float(np.mean(np.concatenate([((p - t) ** 2).ravel() for p, t in _slides(preds, trues)])))


def mae(preds, trues) -> float:
    """DESIGN.md `mae`: mean absolute error in log space over all spots and genes (pooled over slides)."""
    return float(np.mean(np.concatenate([np.abs(p - t).ravel() for p, t in _slides(preds, trues)])))


def compute_metrics(preds, trues) -> dict:
    """Every DESIGN.md metric on a fold's test slides (lists of per-slide (N_i, G) log-space arrays).
    pcc_gene, per_gene_pcc and zero_variance_genes use the concatenation of the slides."""
    ps, ts = map(list, zip(*_slides(preds, trues)))
    p, t = np.concatenate(ps), np.concatenate(ts)
    per_gene = _pcc_columns(p, t)
    return {"pcc_gene": float(per_gene.mean()), "pcc_gene_slide": pcc_gene_slide(ps, ts),
            "pcc_flat": pcc_flat(ps, ts), "r2_flat": r2_flat(ps, ts), "mse": mse(ps, ts), "mae": mae(ps, ts),
            "per_gene_pcc": per_gene, "zero_variance_genes": zero_variance_genes(p, t)}


# ---------------------------------------------------------------- prediction files
def write_predictions(path, pred, genes, barcodes, coords, true=None, slide_id=None) -> None:
    """One h5 per slide: `pred` (N, G) float32 log1p space, `genes`, `barcodes`, `coords` (N, 2),
    optional `true` (N, G); written to a temporary name and renamed."""
    # float32 directly, no float64 copy: (N, G) is 8 GB at 1M spots x 2,000 genes
    pred, coords = _array(pred, np.float32), _array(coords, np.float32)
    n, g = pred.shape
    true = None if true is None else _array(true, np.float32)
    found = {"genes": (len(genes),), "barcodes": (len(barcodes),), "coords": coords.shape,
             "true": (n, g) if true is None else true.shape}
    expected = {"genes": (g,), "barcodes": (n,), "coords": (n, 2), "true": (n, g)}
    problems = [f"{k} has shape {found[k]}, expected {expected[k]}" for k in found if found[k] != expected[k]]
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    strings = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["pred"] = pred
        f.create_dataset("genes", data=[str(x) for x in genes], dtype=strings)
        f.create_dataset("barcodes", data=[str(x) for x in barcodes], dtype=strings)
        f["coords"] = coords
        if true is not None:
            f["true"] = true
        f.attrs["slide_id"] = str(slide_id if slide_id is not None else Path(path).stem)


def read_predictions(path) -> dict:
    """Inverse of write_predictions: {slide_id, pred, genes (list), barcodes, coords, true (or None)}."""
    with h5py.File(path, "r") as f:
        return {"slide_id": str(f.attrs.get("slide_id", Path(path).stem)), "pred": f["pred"][:],
                "genes": list(f["genes"].asstr()[:]), "barcodes": np.array(f["barcodes"].asstr()[:], dtype=str),
                "coords": f["coords"][:], "true": f["true"][:] if "true" in f else None}


# ---------------------------------------------------------------- runs and tables
def evaluate_run(run_dir) -> dict:
    """Metrics per fold from runs/<name>/fold_<k>/pred/*.h5 (slides with `true` only); writes
    results.json, per_gene.csv and results.md in the run folder and returns the results dict."""
    run = Path(run_dir).resolve()
    fold_dirs = sorted((d for d in run.glob("fold_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:]))
    if not fold_dirs:
        raise FileNotFoundError(f"{run}: no fold_<k> folders; is this a run directory (runs/<name>)?")
    folds, per_gene, slides = [], [], []
    for fold in fold_dirs:
        files = [f for f in map(read_predictions, sorted((fold / "pred").glob("*.h5"))) if f["true"] is not None]
        if not files:
            raise FileNotFoundError(f"{fold / 'pred'}: no prediction files with `true` to evaluate")
        bad = [f["slide_id"] for f in files if f["genes"] != files[0]["genes"]]
        if bad:
            raise ValueError(f"{fold / 'pred'}: slides {bad} have other genes than {files[0]['slide_id']}")
        m = compute_metrics([f["pred"] for f in files], [f["true"] for f in files])
        folds.append(m)
        per_gene.append(dict(zip(files[0]["genes"], m["per_gene_pcc"].tolist())))  # gene -> PCC
        slides.append([f["slide_id"] for f in files])
    all_genes = list(dict.fromkeys(g for pg in per_gene for g in pg))  # union over folds, first-seen order
    results = {"run": run.name, "n_folds": len(folds), "fold_names": [d.name for d in fold_dirs],
               "metrics": {k: {"folds": [m[k] for m in folds], "mean": float(np.mean([m[k] for m in folds])),
                               "std": float(np.std([m[k] for m in folds], ddof=0))} for k in METRICS},
               "zero_variance_genes": {"folds": [m["zero_variance_genes"] for m in folds]},
               "genes": len(all_genes), "genes_per_fold": [len(pg) for pg in per_gene],
               "slides_per_fold": [len(s) for s in slides], "slides": slides}
    with atomic_path(run / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(run / "per_gene.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["gene"] + results["fold_names"] + ["mean"])
        for g in all_genes:  # a gene absent from a fold's list leaves that cell empty
            vals = [pg.get(g) for pg in per_gene]
            mean = np.mean([v for v in vals if v is not None])
            w.writerow([g] + ["" if v is None else f"{v:.6f}" for v in vals] + [f"{mean:.6f}"])
    with atomic_path(run / "results.md") as tmp:
        tmp.write_text(_run_markdown(results))
    return results


def _mean_std(entry: dict) -> str:
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def _run_markdown(r: dict) -> str:
    k = r["n_folds"]
    lines = [f"# Results: {r['run']}", "",
             f"{STD_NOTE}; {k} folds, {r['genes']} genes, test slides per fold: {r['slides_per_fold']}.", "",
             "| metric | mean ± std | " + " | ".join(r["fold_names"]) + " |",
             "| --- | --- |" + " --- |" * k]
    for name in METRICS:
        e = r["metrics"][name]
        lines.append(f"| {name} | {_mean_std(e)} | " + " | ".join(f"{v:.4f}" for v in e["folds"]) + " |")
    zv = r["zero_variance_genes"]["folds"]
    lines += ["", f"Zero-variance genes (PCC set to 0) per fold: {zv}.", ""]
    return "\n".join(lines)


def format_table(results_list: list[dict]) -> str:
    """One markdown table comparing runs: rows = runs, columns = METRICS as mean ± std over folds."""
    lines = [f"{STD_NOTE}; higher is better except mse and mae.", "",
             "| run | folds | " + " | ".join(METRICS) + " |", "| --- | --- |" + " --- |" * len(METRICS)]
    for r in results_list:
        cells = [r["run"], str(r["n_folds"])] + [_mean_std(r["metrics"][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- prediction of new slides
@torch.no_grad()
def predict_slide(model, slide, use_pseudo: bool, device, dtype=torch.float32) -> torch.Tensor:
    """Log-space prediction (N, G) for one Slide, on the CPU, as `dtype`; bf16 autocast on CUDA.
    The model runs its low-memory inference path (eval, no grad)."""
    model.eval()
    pseudo = use_pseudo and slide.pseudo_features is not None
    args = [slide.features, slide.coords, slide.pseudo_features if pseudo else None,
            slide.pseudo_coords if pseudo else None]
    args = [None if a is None else a.to(device) for a in args]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        return model(*args, out_dtype=dtype)["pred"].cpu()


def load_fold_models(run_dir, device="cpu") -> list[tuple[torch.nn.Module, list[str]]]:
    """The model of every finished fold of a run, with its gene list."""
    from model import ModelConfig, build_model
    models = []
    for path in sorted(Path(run_dir).glob("fold_*/model.pt")):
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


def predict_run(run_dir, slides_dir, out_dir, fold: int | None = None, device="cpu",
                overwrite: bool = False) -> list[Path]:
    """Predict every slide cache in `slides_dir` with the run's fold models, averaged over folds
    (on the genes every fold predicts), or with one fold; one prediction file per slide in `out_dir`."""
    import yaml
    data.not_an_input(out_dir, slides_dir, run_dir)  # before anything is read: inputs are never written over
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    models = load_fold_models(run_dir, device)
    if fold is not None:
        models = [models[fold]]
    genes = [g for g in models[0][1] if all(g in set(gs) for _, gs in models[1:])]
    paths = data.list_slides(slides_dir)
    if not paths:
        raise FileNotFoundError(f"{slides_dir}: no <slide>.h5 caches to predict")
    outs = [Path(out_dir) / p.name for p in paths]
    exists = [str(o) for o in outs if o.exists()]
    if exists and not overwrite:
        raise FileExistsError(f"{exists[0]} exists ({len(exists)} files in all); choose another --out "
                              "or pass --overwrite")
    for path, out in zip(paths, outs):
        slide = data.read_slide(path)
        pred = 0
        for model, gs in models:
            col = torch.tensor([gs.index(g) for g in genes])
            pred = pred + predict_slide(model, slide, cfg["data"]["pseudo"], device)[:, col] / len(models)
        write_predictions(out, pred, genes, slide.barcodes, slide.coords, slide_id=slide.slide_id)
        print(f"{out}: {slide.n_spots} spots x {len(genes)} genes ({len(models)} fold model(s))")
    return outs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "predict":
        p = argparse.ArgumentParser(prog="eval.py predict", description="Predict slide caches (counts not "
                                    "needed) with a finished run's fold models; averages the folds by default.")
        p.add_argument("--run", required=True, help="run folder, e.g. runs/demo")
        p.add_argument("--slides", required=True, help="folder of <slide>.h5 caches")
        p.add_argument("--out", required=True, help="output folder for <slide>.h5 prediction files")
        p.add_argument("--fold", type=int, default=None, help="use one fold's model instead of the ensemble")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
        a = p.parse_args(argv[1:])
        try:
            predict_run(a.run, a.slides, a.out, a.fold, a.device, a.overwrite)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            sys.exit(f"eval.py predict: {e}")
        return
    parser = argparse.ArgumentParser(prog="eval.py", description="Re-evaluate runs (rewrites results.json, "
                                     "per_gene.csv, results.md) and print one comparison table.")
    parser.add_argument("runs", nargs="+", help="run folders, e.g. runs/default")
    args = parser.parse_args(argv)
    try:
        results = [evaluate_run(d) for d in args.runs]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"eval.py: {e}")
    print(format_table(results))


if __name__ == "__main__":
    main()

"""Every file the project reads or writes besides the slide caches (data.py): the small text files a
run reads (gene lists, MSigDB gene sets, metadata.csv, HEST-Benchmark split CSVs) and the files it
writes (prediction files, AnnData .h5ad). Beside data.py, in the data-contract
layer, so that every program reads and writes them the same way without importing another program.
"""
from __future__ import annotations

import collections
import csv
import json
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

from data import CacheError, atomic_path, fail, listed


def _array(x, dtype=np.float64) -> np.ndarray:
    """A tensor or array-like as a numpy array of `dtype` (float64 or float32; bf16 tensors included)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------- small text formats
def read_gmt(path) -> dict[str, list[str]]:
    """MSigDB GMT: one gene set per line, `name <tab> url <tab> gene <tab> gene ...`."""
    sets = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                raise CacheError(f"{path}: line {i}: expected 'name<TAB>url<TAB>genes...', found {line[:60]!r}")
            sets[parts[0]] = [g for g in parts[2:] if g]
    return sets


def read_gene_list(path) -> list[str]:
    """A gene list: JSON {"genes": [...]} (HEST-Benchmark) or a JSON list, or text with one gene per line."""
    text = Path(path).read_text()
    if text.lstrip()[:1] in "[{":
        data = json.loads(text)
        genes = data["genes"] if isinstance(data, dict) and "genes" in data else data
        if not isinstance(genes, list):
            raise CacheError(f"{path}: key 'genes': expected a list of gene names, found {type(genes).__name__}")
    else:
        genes = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]
    dup = sorted(g for g, k in collections.Counter(genes).items() if k > 1)
    if dup:
        raise CacheError(f"{path}: key 'genes': expected unique names, found duplicates {listed(dup)}")
    return [str(g) for g in genes]


def _csv_rows(path, columns: tuple) -> tuple[list[dict], str]:
    """Rows of a CSV file and the first of `columns` it has."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = next((k for k in columns if rows and k in rows[0]), None)
    if key is None:
        fail(path, columns[0], f"a column {' or '.join(columns)} and rows", list(rows[0]) if rows else "no rows")
    return rows, key


def read_metadata(path) -> dict[str, dict[str, str]]:
    """metadata.csv rows keyed by the `id` (or `sample_id`) column."""
    rows, key = _csv_rows(path, ("id", "sample_id"))
    return {r[key]: r for r in rows}


def read_split_csvs(folder) -> list[tuple[list[str], list[str]]]:
    """HEST-Benchmark splits: train_{i}.csv / test_{i}.csv with a `sample_id` column, i = 0, 1, ..."""
    folds, folder = [], Path(folder)
    while any((folder / f"{part}_{len(folds)}.csv").exists() for part in ("train", "test")):
        pair = [folder / f"{part}_{len(folds)}.csv" for part in ("train", "test")]
        for p in pair:
            if not p.exists():
                raise FileNotFoundError(f"{p}: expected beside its partner split file, found nothing")
        train, test = ([r["sample_id"] for r in _csv_rows(p, ("sample_id",))[0]] for p in pair)
        folds.append((train, test))
    if not folds:
        raise FileNotFoundError(f"{folder}: expected train_0.csv and test_0.csv, found none")
    return folds


# ----------------------------------------------------------------------------- prediction files
def write_predictions(path, pred, genes, barcodes, coords, true=None, slide_id=None, std=None,
                      n_models=None, levels=None, lower=None, upper=None, interval=None) -> None:
    """One h5 per slide: `pred` (N, G) float32 log1p space, `genes`, `barcodes`, `coords` (N, 2),
    optional `true` and `std` (N, G) and `n_models` (G,) (fold models behind each gene); `lower`, `upper`
    (N, G) a prediction interval of nominal coverage `interval` (attribute, e.g. 0.9); `levels`
    {k: {"pred", "coords", ["true"], ["copy"]}} (`level_outputs`) as groups `level_<k>`; written to a
    temporary name and renamed."""
    # float32 directly, no float64 copy: (N, G) is 8 GB at 1M spots x 2,000 genes
    pred, coords = _array(pred, np.float32), _array(coords, np.float32)
    n, g = pred.shape
    extra = {k: None if v is None else _array(v, np.float32)
             for k, v in (("true", true), ("std", std), ("lower", lower), ("upper", upper))}
    found = {"genes": (len(genes),), "barcodes": (len(barcodes),), "coords": coords.shape,
             **{k: (n, g) if v is None else v.shape for k, v in extra.items()},
             "n_models": (g,) if n_models is None else np.shape(n_models)}
    expected = {"genes": (g,), "barcodes": (n,), "coords": (n, 2), "true": (n, g), "std": (n, g), "n_models": (g,),
                "lower": (n, g), "upper": (n, g)}
    problems = [f"{k} has shape {found[k]}, expected {expected[k]}" for k in found if found[k] != expected[k]]
    if (lower is None) != (upper is None) or (lower is not None) != (interval is not None):
        problems.append("lower, upper and interval go together")
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
        for k, group in (levels or {}).items():
            for key, x in group.items():
                f[f"level_{k}/{key}"] = _array(x, np.float32)
        f.attrs["slide_id"] = str(slide_id if slide_id is not None else Path(path).stem)
        if interval is not None:
            f.attrs["interval"] = float(interval)


def read_predictions(path) -> dict:
    """Inverse of write_predictions: {slide_id, pred, genes (list), barcodes, coords, true, std, n_models,
    lower, upper, interval} (None where absent) and levels {k: {pred, coords, [true], [copy]}}."""
    with h5py.File(path, "r") as f:
        get = lambda k: f[k][:] if k in f else None  # noqa: E731
        return {"slide_id": str(f.attrs.get("slide_id", Path(path).stem)), "pred": f["pred"][:],
                "genes": list(f["genes"].asstr()[:]), "barcodes": np.array(f["barcodes"].asstr()[:], dtype=str),
                "coords": f["coords"][:], "true": get("true"), "std": get("std"), "n_models": get("n_models"),
                "lower": get("lower"), "upper": get("upper"),
                "interval": float(f.attrs["interval"]) if "interval" in f.attrs else None,
                "levels": {int(name[6:]): {key: f[name][key][:] for key in f[name]}
                           for name in f if name.startswith("level_")}}


class CSR(NamedTuple):
    """A sparse matrix in compressed sparse row form, as AnnData stores one."""
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple


def _h5ad_put(group, key, value) -> None:
    """One entry in AnnData's on-disk format (anndata.readthedocs.io, "On-disk format"): arrays, CSR
    matrices, string arrays, string and numeric scalars, dicts as groups."""
    if isinstance(value, CSR):
        sub = group.create_group(key)
        sub.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": value.shape})
        sub["data"], sub["indices"], sub["indptr"] = value.data, value.indices, value.indptr
    elif isinstance(value, dict):
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


def write_h5ad(path, pred, genes, barcodes, coords, std=None, true=None, n_models=None, uns=None,
               lower=None, upper=None) -> None:
    """An AnnData file (h5py only) that anndata.read_h5ad, scanpy and squidpy open: X = predicted
    expression (N, G), layers `std` / `true` / `lower` / `upper` (an interval; its level in `uns`) when given, obs index = barcodes, var index = genes (column
    `n_models` when given), obsm['spatial'] = coords in micrometres, `uns` a dict of strings and numbers."""
    write_anndata(path, _array(pred, np.float32), barcodes, genes,
                  var={} if n_models is None else {"n_models": n_models},
                  layers={k: _array(v, np.float32) for k, v in (("std", std), ("true", true), ("lower", lower),
                                                                 ("upper", upper)) if v is not None},
                  obsm={"spatial": _array(coords, np.float32)}, uns=uns)


def write_anndata(path, X, obs_names, var_names, obs=None, var=None, layers=None, obsm=None, uns=None) -> None:
    """An AnnData file, h5py only: X (an array or a CSR), obs / var dataframes (index + numeric columns),
    layers, obsm, uns (dicts of arrays, strings and numbers)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        _h5ad_put(f, "X", X)
        for name, index, columns in (("obs", obs_names, obs or {}), ("var", var_names, var or {})):
            frame = f.create_group(name)
            frame.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index"})
            frame.attrs.create("column-order", np.array(list(columns), dtype=object),
                               dtype=h5py.string_dtype("utf-8"))
            _h5ad_put(frame, "_index", np.array([str(x) for x in index], dtype=object))
            for k, v in columns.items():
                _h5ad_put(frame, k, np.asarray(v))
        for name, value in (("layers", layers or {}), ("obsm", obsm or {}), ("uns", uns or {}), ("obsp", {}),
                            ("varm", {}), ("varp", {})):
            _h5ad_put(f, name, value)



# ----------------------------------------------------------------------------- conformal calibration
def write_calibration(path, genes, level: float, sigma: str, q, q_constant, scores, scores_constant) -> None:
    """A fold's split-conformal calibration (eval.calibrate): nominal `level`, what sigma was (predicted |
    ensemble | predicted+ensemble | constant), per-gene quantiles `q` (normalised scores) and `q_constant`
    (constant width) (G,), and the calibration spots' scores |y - pred| / sigma and |y - pred| (n, G)
    float32, from which the quantile at any other level follows (the calibration plot)."""
    n, g = np.shape(scores)
    if len(genes) != g or np.shape(scores_constant) != (n, g) or np.shape(q) != (g,) or np.shape(q_constant) != (g,):
        raise ValueError(f"{path}: expected scores (n, G), q (G,) for {len(genes)} genes")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("genes", data=[str(x) for x in genes], dtype=h5py.string_dtype("utf-8"))
        for key, v in (("q", q), ("q_constant", q_constant), ("scores", scores), ("scores_constant", scores_constant)):
            f[key] = _array(v, np.float32)
        f.attrs["level"], f.attrs["sigma"] = float(level), str(sigma)


def read_calibration(path) -> dict:
    """Inverse of write_calibration: {genes, level, sigma, q, q_constant, scores, scores_constant}."""
    with h5py.File(path, "r") as f:
        return {"genes": list(f["genes"].asstr()[:]), "level": float(f.attrs["level"]),
                "sigma": str(f.attrs["sigma"]), **{k: f[k][:] for k in ("q", "q_constant", "scores", "scores_constant")}}

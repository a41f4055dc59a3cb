"""The files themselves: how every file is written (atomically, never over an input, a full disk named
in one line) and how a bad one is named (file, key, expected, found; numeric values checked block by
block); and every file format the project reads or writes besides the slide caches (data.py): the small
text files a run reads (gene lists, MSigDB gene sets, metadata.csv, HEST-Benchmark split CSVs), the
prediction files it writes, and AnnData .h5ad (read and written with h5py only). The lowest file of the
data-contract layer: data.py and every program read and write files the same way through it.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

# ----------------------------------------------------------------------------- writing files
class DiskFull(OSError):
    """A write that ran out of space; the message is one line naming the file."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. A full disk
    (ENOSPC, from the block or the rename) becomes DiskFull, "<file>: disk full", and the partial
    temporary file is removed: the file at `path`, if any, is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise disk_full(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def disk_full(path, e: OSError) -> OSError:
    """A write error as DiskFull ("<file>: disk full") when the disk is full, else the error itself. h5py
    reports a failed write without errno, with the C library's text."""
    if e.errno == errno.ENOSPC or "No space left on device" in str(e):
        return DiskFull(f"{path}: disk full (no space left on the device to write it)")
    return e


def listed(items, n: int = 5) -> str:
    """The first n items, comma-separated, and " ..." when some were cut: messages that show part of a list."""
    items = [str(x) for x in items]
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def refuse_existing(outputs, overwrite: bool) -> None:
    """Before a command writes its first file: none of its outputs exists yet, unless --overwrite."""
    for out in [] if overwrite else outputs:
        if Path(out).exists():
            raise FileExistsError(f"{out}: already exists; refusing to overwrite it (pass --overwrite)")


def not_an_input(out_dir, *inputs) -> None:
    """Refuse an output folder that is one of the input folders: outputs are never written over inputs."""
    if any(Path(out_dir).resolve() == Path(folder).resolve() for folder in inputs):
        raise ValueError(f"{out_dir}: expected an output folder other than the inputs, found an input folder")

# ----------------------------------------------------------------------------- a bad file, named
class CacheError(ValueError):
    """A file that does not have the layout it should; the message names file, key, expected, found."""


def fail(path, key, expected, found):
    raise CacheError(f"{path}: key '{key}': expected {expected}, found {found}")


def open_h5(path, what: str = "slide cache") -> h5py.File:
    """An HDF5 file opened for reading; an error naming it when it is not one (`what` says what was expected)."""
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise CacheError(f"{path}: expected a readable HDF5 {what}, found: {e}") from None


def dataset(path, f, key: str, expected: str = "a dataset") -> h5py.Dataset:
    """f[key] when it is a dataset; otherwise an error naming the file and the key (absent, or a group)."""
    if key not in f:
        fail(path, key, expected, "no such key")
    if not isinstance(f[key], h5py.Dataset):
        fail(path, key, expected, "a group")
    return f[key]


def h5_strings(ds) -> np.ndarray:
    """Any HDF5 string dataset (fixed or variable length, bytes or str) as a numpy str array."""
    return np.asarray(ds.asstr("utf-8")[()], dtype=str)


# ----------------------------------------------------------------------------- numeric values, block by block
COUNT_KEYS = ("counts", "library_size", "expected", "sub_counts")
FEATURE_KEYS = ("features", "pseudo_features", "sub_features", "embeddings", "sub_embeddings")  # (hest.py's names)
# Features beyond this magnitude are refused: float16 caches hold at most 65504, patch embeddings are of
# order 1-100, and the models standardise features with sums of squares in float32, where values near
# 1e19 (and a slide's worth of values near 1e16) overflow to inf and make every prediction of the slide NaN.
FEATURE_BOUND = 1e6
BLOCK = 1 << 24   # values per block when a dataset is checked from the file in blocks of rows (scan_slide)

def _bad(found: dict, name: str, mask: np.ndarray, offset: int) -> None:
    """Add a block's bad values to found[name] = [count, index of the first]."""
    if mask.any():
        first = np.argwhere(mask)[0]
        first[0] += offset
        count = found.setdefault(name, [0, tuple(int(i) for i in first)])
        count[0] += int(mask.sum())


def _blocks(x):
    """(first row, rows) of a numpy array (all of it) or of an h5py dataset (blocks of about BLOCK values,
    so a slide is checked without holding it in memory)."""
    if isinstance(x, np.ndarray) or x.ndim == 0:
        yield 0, np.asarray(x)
        return
    step = max(1, BLOCK // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, len(x), step):
        yield start, x[start:start + step]


def check_values(path, key: str, x) -> int:
    """Values of a numeric array (or dataset), block by block: finite in float32; counts >= 0; features within
    FEATURE_BOUND. Returns the number of non-integer values of `counts` (0 for other keys)."""
    found, fractional, largest = {}, 0, 0.0
    for start, block in _blocks(x):
        with np.errstate(over="ignore", invalid="ignore"):
            x = block.astype(np.float32)
        finite = np.isfinite(x)                     # also catches values outside the float32 range
        _bad(found, "finite", ~finite, start)
        if key in COUNT_KEYS:
            _bad(found, "negative", block < 0, start)
        if key in FEATURE_KEYS:
            size = np.abs(np.where(finite, x, 0))
            _bad(found, "large", size > FEATURE_BOUND, start)
            largest = max(largest, float(size.max(initial=0)))
        if key == "counts" and block.dtype.kind == "f":
            fractional += int((finite & (block != np.round(block))).sum())
    text = {k: f"{n} bad values, first at index {first}" for k, (n, first) in found.items()}
    if "finite" in found:
        fail(path, key, "finite float32 values", text["finite"])
    if "negative" in found:
        fail(path, key, "values >= 0", f"negative values: {text['negative']}")
    if "large" in found:
        fail(path, key, f"features of magnitude <= {FEATURE_BOUND:g} (larger values overflow the "
             "standardisation)", f"values up to {largest:.3g}: {text['large']}")
    return fractional



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
                      n_models=None, levels=None, lower=None, upper=None, interval=None,
                      ridge_alone=False) -> None:
    """One h5 per slide: `pred` (N, G) float32 log1p space, `genes`, `barcodes`, `coords` (N, 2),
    optional `true` and `std` (N, G) and `n_models` (G,) (fold models behind each gene); `lower`, `upper`
    (N, G) a prediction interval of nominal coverage `interval` (attribute, e.g. 0.9); `levels`
    {k: {"pred", "coords", ["true"], ["copy"]}} (`level_outputs`) as groups `level_<k>`; attribute
    `ridge_alone`: every model predicted the slide by its spatial ridge alone (model.ood_fallback);
    written to a temporary name and renamed."""
    # float32 directly, no float64 copy: (N, G) is 8 GB at 1M spots x 2,000 genes
    pred, coords = _array(pred, np.float32), _array(coords, np.float32)
    n, g = pred.shape
    extra = {k: None if v is None else _array(v, np.float32) for k, v in (("true", true), ("std", std), ("lower", lower), ("upper", upper))}
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
        f.attrs["ridge_alone"] = bool(ridge_alone)
        if interval is not None:
            f.attrs["interval"] = float(interval)


def read_predictions(path) -> dict:
    """Inverse of write_predictions: {slide_id, pred, genes (list), barcodes, coords, true, std, n_models,
    lower, upper, interval} (None where absent), ridge_alone (False where absent) and levels {k: {pred,
    coords, [true], [copy]}}; a damaged file: a CacheError naming it."""
    with open_h5(path, "prediction file") as f:
        need, get = (lambda k: dataset(path, f, k)), (lambda k: f[k][:] if k in f else None)
        try:  # a truncated or damaged file fails while its data are read
            return {"slide_id": str(f.attrs.get("slide_id", Path(path).stem)), "pred": need("pred")[:],
                    "genes": list(need("genes").asstr()[:]), "barcodes": need("barcodes").asstr()[:].astype(str),
                    "coords": need("coords")[:], "true": get("true"), "std": get("std"), "n_models": get("n_models"),
                    "lower": get("lower"), "upper": get("upper"), "interval": f.attrs.get("interval"),
                    "ridge_alone": bool(f.attrs.get("ridge_alone", False)),
                    "levels": {int(n[6:]): {k: f[n][k][:] for k in f[n]} for n in f if n.startswith("level_")}}
        except (OSError, KeyError) as e:
            raise CacheError(f"{path}: expected a readable prediction file, found: {e}") from None


def missing_test_slides(run, fold) -> str:
    """A line naming the test slides of `fold` (fold_<k>) in the run's folds.json that have no prediction file
    fold_<k>/pred/<slide>.h5; "" when there are none or the run has no folds.json."""
    record, k, pred = Path(run) / "folds.json", int(Path(fold).name[5:]), Path(fold) / "pred"
    folds = json.loads(record.read_text())["folds"] if record.exists() else []
    lost = [s for s in (folds[k]["test"] if k < len(folds) else []) if not (pred / f"{s}.h5").exists()]
    return f"{pred}: no prediction file of test slide(s) {listed(lost, 8)} (folds.json)" if lost else ""


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


def write_h5ad(path, pred, genes, barcodes, coords, std=None, true=None, n_models=None, uns=None, obs=None,
               lower=None, upper=None) -> None:
    """An AnnData file (h5py only) that anndata.read_h5ad, scanpy and squidpy open: X = predicted
    expression (N, G), layers `std` / `true` / `lower` / `upper` (an interval; its level in `uns`) when given, obs index = barcodes (columns `obs`, a dict of
    (N,) arrays), var index = genes (column `n_models` when given), obsm['spatial'] = coords in
    micrometres, `uns` a dict of strings, numbers and arrays (uns['spatial']: `visium_spatial`)."""
    write_anndata(path, _array(pred, np.float32), barcodes, genes, obs=obs,
                  var={} if n_models is None else {"n_models": n_models},
                  layers={k: _array(v, np.float32) for k, v in dict(std=std, true=true, lower=lower, upper=upper).items() if v is not None},
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


# ----------------------------------------------------------------------------- AnnData reading (h5py only)

@dataclass
class H5ad:
    counts: np.ndarray              # (N, G) float32, the requested genes in the requested order
    barcodes: np.ndarray            # (N,) str, the obs index
    genes: list[str]                # (G,)
    xy: np.ndarray | None           # (N, 2) float64 spot centres in full-resolution pixels, x then y
    obs: dict[str, np.ndarray]      # obs columns (categoricals decoded; missing entries None)
    library_size: np.ndarray        # (N,) float64 total counts over all genes of the file


def text_attr(node, name, default="") -> str:
    """An HDF5 attribute as str (h5py returns bytes or str, by how it was written)."""
    e = node.attrs.get(name, default)
    return e.decode() if isinstance(e, bytes) else str(e)


def _enc(node) -> str:
    return text_attr(node, "encoding-type")


def h5ad_array(f, node):
    """A column or index: plain array, string array, or categorical in the old or current anndata encoding."""
    if isinstance(node, h5py.Group):
        if _enc(node) == "categorical":                              # anndata >= 0.8
            codes, cats = node["codes"][()], h5ad_array(f, node["categories"])
        elif _enc(node).startswith("nullable"):
            values = h5ad_array(f, node["values"]).astype(object)
            values[node["mask"][()].astype(bool)] = None
            return values
        else:
            raise CacheError(f"{f.filename}: key '{node.name}': expected an array or categorical, "
                             f"found encoding '{_enc(node)}'")
    elif "categories" in node.attrs:                                 # anndata < 0.8: codes + reference
        codes, cats = node[()], h5ad_array(f, f[node.attrs["categories"]])
    elif h5py.check_string_dtype(node.dtype) or node.dtype.kind == "S":
        return h5_strings(node)
    else:
        return node[()]
    out = np.asarray(cats, dtype=object)[np.maximum(codes, 0)]
    out[codes < 0] = None
    return out


def h5ad_frame(f, name) -> tuple[np.ndarray, dict]:
    """(index, columns) of obs or var; the index dataset is whichever `_index` names."""
    if name not in f:
        fail(f.filename, name, "a dataframe group (AnnData)", "no such key")
    g = f[name]
    if not isinstance(g, h5py.Group):
        fail(f.filename, name, "a dataframe group (anndata >= 0.7)", "a dataset (re-save with a newer anndata)")
    index = text_attr(g, "_index", "_index")
    cols = {k: h5ad_array(f, g[k]) for k in g if k not in (index, "__categories")}
    return np.asarray(h5ad_array(f, g[index]), dtype=str), cols


def h5ad_matrix(f) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """X as coordinates (rows, cols, values) and shape; CSR, CSC (current or old h5sparse) or dense."""
    if "X" not in f:
        fail(f.filename, "X", "the count matrix (AnnData)", "no such key")
    X = f["X"]
    if isinstance(X, h5py.Dataset):
        dense = X[()]
        rows, cols = np.nonzero(dense)
        return rows, cols, dense[rows, cols].astype(np.float64), dense.shape
    fmt = _enc(X).replace("_matrix", "") or text_attr(X, "h5sparse_format")
    shape = tuple(int(s) for s in X.attrs.get("shape", X.attrs.get("h5sparse_shape", (0, 0))))
    if fmt not in ("csr", "csc"):
        raise CacheError(f"{f.filename}: key 'X': expected dense, csr_matrix or csc_matrix, found '{fmt}'")
    indptr = X["indptr"][()]
    major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    minor = X["indices"][()]
    rows, cols = (major, minor) if fmt == "csr" else (minor, major)
    return rows, cols, X["data"][()].astype(np.float64), shape


XY_COLUMNS = (("pxl_col_in_fullres", "pxl_row_in_fullres"), ("x_pixel", "y_pixel"), ("x", "y"),
              ("imagecol", "imagerow"))


def h5ad_xy(f, obs: dict) -> np.ndarray | None:
    """(N, 2) spot centres in pixels: obsm/spatial, else the first pair of XY_COLUMNS in obs; None if neither."""
    if "obsm" in f and "spatial" in f["obsm"]:
        return np.asarray(f["obsm"]["spatial"][()], dtype=np.float64)[:, :2]
    return next((np.stack([obs[a], obs[b]], 1).astype(np.float64) for a, b in XY_COLUMNS
                 if a in obs and b in obs), None)


def read_h5ad_sparse(path) -> tuple[np.ndarray, dict, np.ndarray, tuple, np.ndarray | None]:
    """An AnnData file as it is stored, its parts checked against each other: (obs index, obs columns, var
    index, X as (rows, cols, values), xy or None). X stays sparse: a cell table can be large."""
    with open_h5(path, "AnnData file") as f:
        barcodes, obs = h5ad_frame(f, "obs")
        var_names, _ = h5ad_frame(f, "var")
        rows, cols, values, shape = h5ad_matrix(f)
        xy = h5ad_xy(f, obs)
    n = len(barcodes)
    if shape != (n, len(var_names)):
        fail(path, "X", f"shape ({n}, {len(var_names)}) from obs and var", f"{shape}")
    if xy is not None and xy.shape != (n, 2):
        fail(path, "obsm/spatial", f"shape ({n}, 2)", f"{xy.shape}")
    return barcodes, obs, var_names, (rows, cols, values), xy


def read_h5ad(path, genes: list[str] | None = None, rename=None) -> H5ad:
    """Counts, barcodes, genes, spot centres and obs columns of an AnnData .h5ad file, without anndata.
    rename (HiST A.1: protocols.harmonise_gene_names) maps the gene names; the columns that then share a
    name, and the rows that share a barcode, are summed (first-seen order; obs and xy of the first row)."""
    barcodes, obs, var_names, (rows, cols, values), xy = read_h5ad_sparse(path)
    n = len(barcodes)
    names = list(var_names) if rename is None else list(rename(var_names))
    row_of = np.arange(n)
    if rename is not None:                          # duplicated barcodes: one row each, summed
        first = {}
        row_of = np.array([first.setdefault(b, len(first)) for b in barcodes])
        keep_row = np.unique(row_of, return_index=True)[1]
        barcodes, xy = barcodes[keep_row], None if xy is None else xy[keep_row]
        obs = {k: np.asarray(v)[keep_row] for k, v in obs.items()}
    index = {}
    for i, g in enumerate(names):                   # duplicated names: all their columns, summed
        if rename is not None:
            index.setdefault(g, []).append(i)
        else:
            index[g] = [i]                          # a repeated name keeps its last column, as before
    genes = list(index) if genes is None else list(genes)
    missing = [g for g in genes if g not in index]
    if missing:
        fail(path, "var", f"all {len(genes)} requested genes", f"{len(missing)} missing: {listed(missing, 10)}")
    column_of = np.full(len(var_names), -1)
    for j, g in enumerate(genes):
        column_of[index[g]] = j
    keep = column_of[cols] >= 0
    counts = np.zeros((len(barcodes), len(genes)), dtype=np.float64)
    np.add.at(counts, (row_of[rows[keep]], column_of[cols[keep]]), values[keep])  # duplicates sum, as in scipy
    library = np.bincount(row_of[rows], weights=values, minlength=len(barcodes))
    return H5ad(counts.astype(np.float32), barcodes, genes, xy, obs, library)

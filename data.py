"""Slide feature caches and everything that turns a user's files into tensors.

Sections: cache format (write, read, validate) · h5ad reader · small text formats · gene selection
and targets · folds · coordinate augmentation · placeholder encoder · HEST import · synthetic slides ·
command line:
    python data.py synth --out DIR [--slides 12 --seed 0 --layout visium|square|hd --spots 1500 --pseudo]
    python data.py embed --patches DIR --out DIR [--encoder module:callable]
    python data.py import-hest --st DIR --features DIR --out DIR [--meta CSV] [--genes FILE | --max-genes N]
    python data.py genes --slides DIR --n 250 --by hvg|mean --out genes.json [--ids ID ...]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

FORMAT_VERSION = 1


@dataclass
class Slide:
    """One slide in memory. Tensors are float32 on the CPU, except features (and pseudo_features) that the
    cache stores as float16: they stay float16 (half the memory of a Visium HD slide; the models
    standardise them in float32). N spots, C features, G genes."""
    slide_id: str
    features: torch.Tensor                        # (N, C)
    coords: torch.Tensor                          # (N, 2) micrometres, x then y
    barcodes: np.ndarray                          # (N,) str
    patient: str = ""
    spot_pitch_um: float = float("nan")
    encoder: str = ""
    counts: torch.Tensor | None = None            # (N, G) raw counts
    genes: list[str] | None = None                # (G,)
    library_size: torch.Tensor | None = None      # (N,) total counts before gene filtering
    expected: torch.Tensor | None = None          # (N, G) noise-free mean counts (synthetic slides only)
    pseudo_features: torch.Tensor | None = None   # (M, C) off-grid pseudo-spots (FEAST)
    pseudo_coords: torch.Tensor | None = None     # (M, 2)

    @property
    def n_spots(self) -> int:
        return self.features.shape[0]


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def not_an_input(out_dir, *inputs) -> None:
    """Refuse an output folder that is one of the input folders: outputs are never written over inputs."""
    for folder in inputs:
        if Path(out_dir).resolve() == Path(folder).resolve():
            raise ValueError(f"{out_dir}: expected an output folder other than the inputs, found an input folder")


# ----------------------------------------------------------------------------- cache format

class CacheError(ValueError):
    """A file that does not have the layout it should; the message names file, key, expected, found."""


def _fail(path, key, expected, found):
    raise CacheError(f"{path}: key '{key}': expected {expected}, found {found}")


STR = h5py.string_dtype("utf-8")
ARRAY_KEYS = ("features", "coords", "barcodes", "counts", "genes", "library_size", "expected",
              "pseudo_features", "pseudo_coords")
STRING_KEYS = ("barcodes", "genes")


def _strings(ds) -> np.ndarray:
    """Any HDF5 string dataset (fixed or variable length, bytes or str) as a numpy str array."""
    return np.asarray(ds.asstr("utf-8")[()], dtype=str)


def _first_bad(mask: np.ndarray) -> str:
    return f"{int(mask.sum())} bad values, first at index {tuple(int(i) for i in np.argwhere(mask)[0])}"


def _check(path, a: dict, key: str, shape: tuple, kind: str):
    """One array: kind 'float' | 'number' | 'str', shape with None for any size; finite and unique checks."""
    x = a[key]
    want = str(tuple("any" if s is None else s for s in shape)).replace("'", "")
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        _fail(path, key, f"shape {want}", f"shape {tuple(x.shape)}")
    if kind == "str":
        if x.dtype.kind != "U":
            _fail(path, key, "utf-8 strings", f"dtype {x.dtype}")
        values, counts = np.unique(x, return_counts=True)
        if (counts > 1).any():
            _fail(path, key, "unique values", f"{int((counts > 1).sum())} duplicated, e.g. '{values[counts > 1][0]}'")
        return
    if x.dtype.kind not in ("f" if kind == "float" else "fiu"):
        _fail(path, key, "float16/float32 values" if kind == "float" else "numeric values", f"dtype {x.dtype}")
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(x.astype(np.float32))  # also catches values outside the float32 range
    if bad.any():
        _fail(path, key, "finite float32 values", _first_bad(bad))
    if key in ("counts", "library_size", "expected") and (x < 0).any():
        _fail(path, key, "values >= 0", f"negative values: {_first_bad(x < 0)}")


def _validate(path, a: dict):
    """Every key of DESIGN.md's data contract; `a` maps keys to numpy arrays (absent keys left out)."""
    for key in ("features", "coords", "barcodes"):
        if key not in a:
            _fail(path, key, "a dataset (required)", "no such key")
    _check(path, a, "features", (None, None), "float")
    n, c = a["features"].shape
    _check(path, a, "coords", (n, 2), "float")
    _check(path, a, "barcodes", (n,), "str")
    if "counts" in a and "genes" not in a:
        _fail(path, "genes", "a gene list beside 'counts'", "no such key")
    if "genes" in a:
        _check(path, a, "genes", (None,), "str")
    g = len(a["genes"]) if "genes" in a else None
    for key, shape, kind in (("counts", (n, g), "number"), ("expected", (n, g), "float"),
                             ("library_size", (n,), "number"), ("pseudo_features", (None, c), "float")):
        if key in a:
            _check(path, a, key, shape, kind)
    if ("pseudo_features" in a) != ("pseudo_coords" in a):
        _fail(path, "pseudo_coords", "pseudo_features and pseudo_coords together", "only one of them")
    if "pseudo_coords" in a:
        _check(path, a, "pseudo_coords", (len(a["pseudo_features"]), 2), "float")


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_slide(path, slide: Slide, overwrite: bool = False) -> Path:
    """Write one slide cache atomically; refuses to replace an existing file unless overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; refusing to overwrite it (pass overwrite=True)")
    a = {k: _np(getattr(slide, k)) for k in ARRAY_KEYS if getattr(slide, k) is not None}
    for k in STRING_KEYS:
        if k in a:
            a[k] = a[k].astype(str)
    _validate(path, a)  # never write a file that read_slide would reject
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for k, x in a.items():
            if k in STRING_KEYS:
                f.create_dataset(k, data=x.astype(object), dtype=STR)
            elif k in ("counts", "expected"):  # (N, G) can be large: chunked, compressed
                f.create_dataset(k, data=x.astype(np.float32), chunks=(min(len(x), 1024), min(x.shape[1], 256)),
                                 compression="gzip", compression_opts=4, shuffle=True)
            else:
                f.create_dataset(k, data=x if x.dtype == np.float16 else x.astype(np.float32))
        f.attrs.update(slide_id=slide.slide_id, patient=slide.patient or slide.slide_id,
                       spot_pitch_um=float(slide.spot_pitch_um), encoder=slide.encoder,
                       format_version=FORMAT_VERSION)
    return path


def _open(path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise CacheError(f"{path}: expected a readable HDF5 slide cache, found: {e}") from None


def _attrs(path, f) -> dict:
    version = int(f.attrs.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        _fail(path, "attrs/format_version", f"<= {FORMAT_VERSION}", f"{version} (written by a newer tessera)")
    sid = str(f.attrs.get("slide_id", Path(path).stem))
    return dict(slide_id=sid, patient=str(f.attrs.get("patient", "")) or sid, encoder=str(f.attrs.get("encoder", "")),
                spot_pitch_um=float(f.attrs.get("spot_pitch_um", float("nan"))))


def read_slide(path, genes: list[str] | None = None, zero_fill: bool = False) -> Slide:
    """Read and validate one cache. `genes` selects and orders count columns; a gene the slide lacks is an
    error unless zero_fill=True (then its column is 0). Slides without counts ignore `genes`."""
    with _open(path) as f:
        a = {}
        for k in ARRAY_KEYS:
            if k in f:
                if not isinstance(f[k], h5py.Dataset):
                    _fail(path, k, "a dataset", "a group")
                a[k] = _strings(f[k]) if h5py.check_string_dtype(f[k].dtype) or f[k].dtype.kind == "S" else f[k][()]
        meta = _attrs(path, f)
    _validate(path, a)
    half = lambda k: k in ("features", "pseudo_features") and a[k].dtype == np.float16  # noqa: E731
    t = {k: torch.from_numpy(np.ascontiguousarray(a[k], dtype=np.float16 if half(k) else np.float32))
         for k in a if k not in STRING_KEYS}
    slide = Slide(**meta, barcodes=a["barcodes"], genes=a["genes"].tolist() if "counts" in a else None, **t)
    return slide if genes is None else take_genes(slide, genes, zero_fill, path)


def take_genes(slide: Slide, genes: list[str], zero_fill: bool = False, path=None) -> Slide:
    """The slide with its count columns (and `expected`) for `genes`, in that order; a gene the slide lacks
    is an error naming `path` unless zero_fill=True (then its column is 0). A slide without counts is
    returned as it is."""
    if slide.counts is None:
        return slide
    index = {g: i for i, g in enumerate(slide.genes)}
    missing = [g for g in genes if g not in index]
    if missing and not zero_fill:
        _fail(path or slide.slide_id, "genes", f"all {len(genes)} requested genes",
              f"{len(missing)} missing: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
              " (zero_fill=True fills them with zeros)")
    cols = torch.tensor([index.get(g, -1) for g in genes], dtype=torch.long)
    pick = lambda x: None if x is None else torch.where(cols >= 0, x[:, cols.clamp(min=0)], 0.0)  # noqa: E731
    return dataclasses.replace(slide, genes=list(genes), counts=pick(slide.counts), expected=pick(slide.expected))


@dataclass
class SlideMeta:
    slide_id: str
    patient: str
    n_spots: int
    n_features: int
    genes: list[str] | None        # None for a slide without counts
    spot_pitch_um: float
    encoder: str


def read_slide_meta(path) -> SlideMeta:
    """Attributes, sizes and the gene list of a cache without loading its arrays (fold building, gene lists)."""
    with _open(path) as f:
        if "features" not in f:
            _fail(path, "features", "a dataset (required)", "no such key")
        n, c = f["features"].shape
        genes = _strings(f["genes"]).tolist() if "counts" in f and "genes" in f else None
        return SlideMeta(**_attrs(path, f), n_spots=n, n_features=c, genes=genes)


def list_slides(root) -> list[Path]:
    """The slide caches of a dataset folder, sorted by name."""
    paths = sorted(Path(root).glob("*.h5"))
    if not paths:
        raise FileNotFoundError(f"{root}: expected slide caches *.h5, found none")
    return paths


# ----------------------------------------------------------------------------- h5ad reader (h5py only)

@dataclass
class H5ad:
    counts: np.ndarray              # (N, G) float32, the requested genes in the requested order
    barcodes: np.ndarray            # (N,) str, the obs index
    genes: list[str]                # (G,)
    xy: np.ndarray | None           # (N, 2) float64 spot centres in full-resolution pixels, x then y
    obs: dict[str, np.ndarray]      # obs columns (categoricals decoded; missing entries None)
    library_size: np.ndarray        # (N,) float64 total counts over all genes of the file


def _attr(node, name, default="") -> str:
    e = node.attrs.get(name, default)
    return e.decode() if isinstance(e, bytes) else str(e)


def _enc(node) -> str:
    return _attr(node, "encoding-type")


def _h5ad_array(f, node):
    """A column or index: plain array, string array, or categorical in the old or current anndata encoding."""
    if isinstance(node, h5py.Group):
        if _enc(node) == "categorical":                              # anndata >= 0.8
            codes, cats = node["codes"][()], _h5ad_array(f, node["categories"])
        elif _enc(node).startswith("nullable"):
            values = _h5ad_array(f, node["values"]).astype(object)
            values[node["mask"][()].astype(bool)] = None
            return values
        else:
            raise CacheError(f"{f.filename}: key '{node.name}': expected an array or categorical, "
                             f"found encoding '{_enc(node)}'")
    elif "categories" in node.attrs:                                 # anndata < 0.8: codes + reference
        codes, cats = node[()], _h5ad_array(f, f[node.attrs["categories"]])
    elif h5py.check_string_dtype(node.dtype) or node.dtype.kind == "S":
        return _strings(node)
    else:
        return node[()]
    out = np.asarray(cats, dtype=object)[np.maximum(codes, 0)]
    out[codes < 0] = None
    return out


def _h5ad_frame(f, name) -> tuple[np.ndarray, dict]:
    """(index, columns) of obs or var; the index dataset is whichever `_index` names."""
    g = f[name]
    if not isinstance(g, h5py.Group):
        _fail(f.filename, name, "a dataframe group (anndata >= 0.7)", "a dataset (re-save with a newer anndata)")
    index = _attr(g, "_index", "_index")
    cols = {k: _h5ad_array(f, g[k]) for k in g if k not in (index, "__categories")}
    return np.asarray(_h5ad_array(f, g[index]), dtype=str), cols


def _h5ad_X(f) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """X as coordinates (rows, cols, values) and shape; CSR, CSC (current or old h5sparse) or dense."""
    X = f["X"]
    if isinstance(X, h5py.Dataset):
        dense = X[()]
        rows, cols = np.nonzero(dense)
        return rows, cols, dense[rows, cols].astype(np.float64), dense.shape
    fmt = _enc(X).replace("_matrix", "") or _attr(X, "h5sparse_format")
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


def read_h5ad(path, genes: list[str] | None = None, harmonise: bool = False) -> H5ad:
    """Counts, barcodes, genes, spot centres and obs columns of an AnnData .h5ad file, without anndata.
    harmonise=True (HiST A.1): gene names through harmonise_gene_names, and the columns that then share a
    name, and the rows that share a barcode, are summed (first-seen order; obs and xy of the first row)."""
    with _open(path) as f:
        barcodes, obs = _h5ad_frame(f, "obs")
        var_names, _ = _h5ad_frame(f, "var")
        rows, cols, values, shape = _h5ad_X(f)
        xy = None
        if "obsm" in f and "spatial" in f["obsm"]:
            xy = np.asarray(f["obsm"]["spatial"][()], dtype=np.float64)[:, :2]
        else:
            xy = next((np.stack([obs[a], obs[b]], 1).astype(np.float64) for a, b in XY_COLUMNS
                       if a in obs and b in obs), None)
    n = len(barcodes)
    if shape != (n, len(var_names)):
        _fail(path, "X", f"shape ({n}, {len(var_names)}) from obs and var", f"{shape}")
    if xy is not None and xy.shape != (n, 2):
        _fail(path, "obsm/spatial", f"shape ({n}, 2)", f"{xy.shape}")
    names = harmonise_gene_names(var_names) if harmonise else list(var_names)
    row_of = np.arange(n)
    if harmonise:                                   # duplicated barcodes: one row each, summed
        first = {}
        row_of = np.array([first.setdefault(b, len(first)) for b in barcodes])
        keep_row = np.unique(row_of, return_index=True)[1]
        barcodes, xy = barcodes[keep_row], None if xy is None else xy[keep_row]
        obs = {k: np.asarray(v)[keep_row] for k, v in obs.items()}
    index = {}
    for i, g in enumerate(names):                   # duplicated names: all their columns, summed
        if harmonise:
            index.setdefault(g, []).append(i)
        else:
            index[g] = [i]                          # a repeated name keeps its last column, as before
    genes = list(index) if genes is None else list(genes)
    missing = [g for g in genes if g not in index]
    if missing:
        _fail(path, "var", f"all {len(genes)} requested genes", f"{len(missing)} missing: {', '.join(missing[:10])}")
    column_of = np.full(len(var_names), -1)
    for j, g in enumerate(genes):
        column_of[index[g]] = j
    keep = column_of[cols] >= 0
    counts = np.zeros((len(barcodes), len(genes)), dtype=np.float64)
    np.add.at(counts, (row_of[rows[keep]], column_of[cols[keep]]), values[keep])  # duplicates sum, as in scipy
    library = np.bincount(row_of[rows], weights=values, minlength=len(barcodes))
    return H5ad(counts.astype(np.float32), barcodes, genes, xy, obs, library)


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
        raise CacheError(f"{path}: key 'genes': expected unique names, found duplicates {dup[:5]}")
    return [str(g) for g in genes]


def _csv_rows(path, columns: tuple) -> tuple[list[dict], str]:
    """Rows of a CSV file and the first of `columns` it has."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = next((k for k in columns if rows and k in rows[0]), None)
    if key is None:
        _fail(path, columns[0], f"a column {' or '.join(columns)} and rows", list(rows[0]) if rows else "no rows")
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


# ----------------------------------------------------------------------------- gene selection and targets

def select_genes(counts: list, genes: list[str], n: int, by: str = "hvg") -> list[str]:
    """Top-n genes of the given slides' raw counts (list of (N_i, G) arrays sharing `genes`), best first.
    by='mean': mean raw count. by='hvg': scanpy's 'seurat' flavour: normalise each spot to 1e4, log1p,
    mean and dispersion (var/mean) of the normalised counts, log, 20 equal-width bins of log1p(mean),
    dispersion z-scored within its bin (a bin with one gene scores 1); genes with zero dispersion never win."""
    x = np.concatenate([_np(c).astype(np.float64) for c in (counts if isinstance(counts, (list, tuple)) else [counts])])
    if x.shape[1] != len(genes):
        raise ValueError(f"select_genes: expected {len(genes)} count columns to match genes, found {x.shape[1]}")
    if by == "mean":
        score = x.mean(0)
    elif by == "hvg":
        total = x.sum(1, keepdims=True)
        x = np.expm1(np.log1p(x / np.where(total > 0, total, 1) * 1e4))  # scanpy works on expm1(log data)
        mean, var = x.mean(0), x.var(0, ddof=1)
        mean[mean == 0] = 1e-12
        disp = var / mean
        disp[disp == 0] = np.nan
        disp, logmean = np.log(disp), np.log1p(mean)
        edges = np.linspace(logmean.min(), logmean.max(), 21)
        edges[0] -= (logmean.max() - logmean.min()) * 1e-3   # pandas.cut: right-closed bins, widened left edge
        bins = np.clip(np.searchsorted(edges, logmean, side="left") - 1, 0, 19)
        score = np.full(len(genes), np.nan)
        for b in np.unique(bins):
            d = disp[bins == b]
            ok = d[~np.isnan(d)]
            avg, dev = (ok.mean(), ok.std(ddof=1)) if len(ok) > 1 else (0.0, ok.mean() if len(ok) else np.nan)
            score[bins == b] = (d - avg) / dev
    else:
        raise ValueError(f"select_genes: expected by='hvg' or 'mean', found {by!r}")
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return [genes[i] for i in order[:n] if not np.isnan(score[i])]


def log_targets(counts, library_size=None, normalize: bool = False) -> torch.Tensor:
    """Regression targets: log1p(counts), or log1p(counts / library_size * 1e4) when normalize."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    if not normalize:
        return torch.log1p(counts)
    lib = counts.sum(1) if library_size is None else torch.as_tensor(library_size, dtype=torch.float32)
    return torch.log1p(counts / lib.clamp_min(1e-8)[:, None] * 1e4)


# ----------------------------------------------------------------------------- folds

def make_folds(slide_ids, patients, k: int, seed: int = 0, assign: str = "balanced") -> list[tuple[list[str], list[str]]]:
    """k folds grouped by patient (no patient in both train and test), each slide tested once.
    assign='balanced': patients are shuffled by `seed` and dealt, largest first, to the fold with fewest
    slides; 'kfold': scikit-learn's shuffled KFold over the sorted patients (MERGE, FEAST); 'hist': HiST's
    split (kfold_groups, hist_groups). k=-1 gives leave-one-patient-out. `patients` is aligned with
    slide_ids, or a dict slide id -> patient; pass the slide ids themselves to split by slide."""
    ids = [str(s) for s in slide_ids]
    pat = [str(patients[s]) for s in ids] if isinstance(patients, dict) else [str(p) for p in patients]
    if len(pat) != len(ids) or len(set(ids)) != len(ids):
        raise ValueError(f"make_folds: expected unique slide ids with one patient each, found {len(ids)} ids "
                         f"({len(set(ids))} unique) and {len(pat)} patients")
    of = dict(sorted(zip(ids, pat)))
    people = sorted(set(pat))
    k = len(people) if k == -1 else k
    if k < 2 or k > len(people):
        raise ValueError(f"make_folds: expected 2 <= k <= {len(people)} (the number of patients) or k=-1, found k={k}")
    if assign in ("kfold", "hist"):
        tests = (kfold_groups if assign == "kfold" else hist_groups)(people, k, seed)
        return [([s for s in of if of[s] not in t], [s for s in of if of[s] in t]) for t in map(set, tests)]
    if assign != "balanced":
        raise ValueError(f"make_folds: expected assign balanced, kfold or hist, found {assign!r}")
    rng = np.random.default_rng(seed)
    people = [people[i] for i in rng.permutation(len(people))]
    size = {p: sum(v == p for v in of.values()) for p in people}
    folds = [[] for _ in range(k)]
    for p in sorted(people, key=lambda p: -size[p]):  # stable: shuffled order breaks ties
        min(folds, key=lambda fold: sum(size[q] for q in fold)).append(p)
    return [([s for s in of if of[s] not in f], [s for s in of if of[s] in f]) for f in folds]


# ----------------------------------------------------------------------------- paper protocols
# What the papers' own code does to slides, folds, gene names and targets, as pure functions
# (REPRODUCE.md says which paper uses which; each is tested against a reference written in its test).

PROTOCOLS = Path(__file__).with_name("configs") / "protocols"


def expand_slide_ranges(items: list, where="") -> list[str]:
    """Slide ids from ids and inclusive ranges as papers print them: ["NCBI628-NCBI641", "NCBI599"]."""
    out = []
    for item in items:
        a, sep, b = str(item).partition("-")
        if not sep:
            out.append(a)
            continue
        pa, pb = a.rstrip("0123456789"), b.rstrip("0123456789")
        if pa != pb or not a[len(pa):] or not b[len(pb):] or int(a[len(pa):]) > int(b[len(pb):]):
            raise CacheError(f"{where}: expected an id range like NCBI628-NCBI641, found {item!r}")
        out += [f"{pa}{i}" for i in range(int(a[len(pa):]), int(b[len(pb):]) + 1)]
    return out


def read_slide_lists(path) -> dict[str, list[str]]:
    """A paper's datasets and their slide ids (configs/protocols/<paper>_slides.yaml): {key: [ids]}.
    Each entry's expanded ranges must give its printed count `n`, and no slide may be in two datasets."""
    import yaml  # only for this file format; the cache format needs no yaml
    table = yaml.safe_load(Path(path).read_text())
    lists, owner = {}, {}
    for key, entry in table.items():
        ids = expand_slide_ranges(entry["slides"], f"{path}: {key}")
        if "n" in entry and len(ids) != int(entry["n"]):
            raise CacheError(f"{path}: {key}: expected {entry['n']} slides as printed, found {len(ids)} in {entry['slides']}")
        twice = sorted({s for s in ids if s in owner} | {s for s, k in collections.Counter(ids).items() if k > 1})
        if twice:
            raise CacheError(f"{path}: slides listed in two datasets ({key} and {owner.get(twice[0], key)}): "
                             f"{', '.join(twice[:10])}")
        owner.update({s: key for s in ids})
        lists[key] = ids
    return lists


def dataset_slides(spec: str) -> tuple[Path, list[str]]:
    """'hist:brain' -> (configs/protocols/hist_slides.yaml, the ids of its dataset 'brain')."""
    paper, _, key = spec.partition(":")
    path = PROTOCOLS / f"{paper}_slides.yaml"
    if not path.exists():
        have = sorted(p.name.removesuffix("_slides.yaml") for p in PROTOCOLS.glob("*_slides.yaml"))
        raise CacheError(f"--dataset {spec}: expected <paper>:<dataset> with paper one of {have}, found no {path}")
    lists = read_slide_lists(path)
    if key not in lists:
        raise CacheError(f"{path}: expected a dataset {key!r}; it has {sorted(lists)}")
    return path, lists[key]


def harmonise_gene_names(genes) -> list[str]:
    """HiST A.1 (its preprocessing code): drop an assembly or species prefix (GRCh38_, GRCm39-, human_,
    mm10_, ...), drop everything from the first '.' (Ensembl version suffixes, and also the '.1' of
    clone-based names such as AC012345.1), upper-case. Duplicates that result are summed by the caller."""
    prefix = re.compile(r"^(GRCh38|GRCm39|human|mouse|HG38|MM10|GRCh37)[_|-]+", flags=re.IGNORECASE)
    return [prefix.sub("", str(g)).split(".")[0].upper() for g in genes]


def sum_duplicates(counts: np.ndarray, rows: list[str], cols: list[str]):
    """HiST A.1 (ii): sum the columns that share a gene name and the rows that share a barcode, keeping
    first-seen order. counts (N, G) -> (N', G'), rows', cols'."""
    def merge(names):
        first = list(dict.fromkeys(names))
        index = {n: i for i, n in enumerate(first)}
        return first, np.array([index[n] for n in names])
    cols2, ci = merge(list(cols))
    rows2, ri = merge(list(rows))
    out = np.zeros((len(rows2), len(cols2)), dtype=np.float64)
    np.add.at(out, (ri[:, None], ci[None, :]), np.asarray(counts, dtype=np.float64))
    return out, rows2, cols2


def kfold_groups(groups: list[str], k: int, seed: int) -> list[list[str]]:
    """The test groups of scikit-learn's KFold(n_splits=k, shuffle=True, random_state=seed) over the sorted
    group ids (MERGE and FEAST split their slide lists this way): a seeded permutation (numpy's legacy
    RandomState.shuffle) cut into k consecutive parts, the first n % k parts one longer."""
    ids = sorted(groups)
    if not 2 <= k <= len(ids):
        raise ValueError(f"folds: expected 2 <= k <= {len(ids)} (the number of groups), found k={k}")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = [len(ids) // k + (i < len(ids) % k) for i in range(k)]
    starts = np.cumsum([0] + sizes)
    return [sorted(ids[j] for j in order[starts[i]:starts[i + 1]]) for i in range(k)]


def hist_groups(groups: list[str], k: int, seed: int) -> list[list[str]]:
    """The test groups of HiST's split (its lib/utils/data.py): the slide list shuffled by numpy's global
    generator seeded with `seed` (HiST seeds 0), cut into k parts of n // k, the last taking the rest.
    HiST lists slide files in directory order; here the list is sorted, so the parts are reproducible."""
    ids = sorted(groups)
    if not 2 <= k <= len(ids):
        raise ValueError(f"folds: expected 2 <= k <= {len(ids)} (the number of groups), found k={k}")
    order = list(range(len(ids)))
    np.random.RandomState(seed).shuffle(order)
    size = len(ids) // k
    return [sorted(ids[j] for j in (order[i * size:(i + 1) * size] if i < k - 1 else order[i * size:]))
            for i in range(k)]


def spcs(expr, grid, alpha: float = 0.6, beta: float = 0.4, tau_p: int = 16, tau_s: int = 2,
         n_pcs: int = 10, hexagonal: bool = False, chunk: int = 2048) -> np.ndarray:
    """SPCS label smoothing (Liu et al., Brief. Bioinform. 2022), as MERGE and FEAST apply it to targets.
    expr (N, G) log expression of one slide, grid (N, 2) integer array positions of its spots.

        E' = (1 - alpha) E + alpha (beta S + (1 - beta) P)
    S: spatial neighbours, 0 < |di| + |dj| <= tau_s (2 tau_s on a hexagonal array), weights 1/distance;
    P: pattern neighbours, the tau_p spots with the largest exp(-4.5 d^2), d = 1 - Pearson correlation of
       the spots' first n_pcs principal-component scores (centred, unscaled), kept where d <= 1;
    each neighbour weight divided by (its spot's weight sum + 1e-8); a spot without neighbours gets 0.
    Component signs follow the largest-|score| entry of each component (R's randomised PCA leaves them
    arbitrary). Pattern neighbours are found `chunk` rows at a time (never N x N at once)."""
    x = np.asarray(expr, dtype=np.float64)
    g = np.asarray(grid, dtype=np.int64)
    n = len(x)
    # pattern neighbours
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    k = min(n_pcs, len(s))
    scores = u[:, :k] * s[:k]                                              # (N, k)
    scores *= np.sign(scores[np.abs(scores).argmax(0), np.arange(k)])     # sign convention
    z = scores - scores.mean(1, keepdims=True)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.where(norm > 0, z / np.where(norm > 0, norm, 1), 0.0)           # constant rows: no neighbours
    pattern = np.zeros_like(x)
    keep = min(tau_p, n) if tau_p > 0 else n
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        d = 1.0 - z[a:b] @ z.T                                             # (B, N) Pearson distance
        r = np.where((d <= 1.0) & (norm[a:b] > 0) & (norm.T > 0), np.exp(-4.5 * d * d), 0.0)
        r[np.arange(b - a), np.arange(a, b)] = 0.0
        top = np.argsort(-r, axis=1, kind="stable")[:, :keep]               # ties: lower index first
        w = np.take_along_axis(r, top, 1)
        w /= w.sum(1, keepdims=True) + 1e-8
        pattern[a:b] = np.einsum("bk,bkg->bg", w, x[top])
    # spatial neighbours on the integer array: a lookup table over the bounding box
    g = g - g.min(0)
    table = np.full(g.max(0) + 1, -1, dtype=np.int64)
    table[g[:, 0], g[:, 1]] = np.arange(n)
    if (table >= 0).sum() != n:
        raise ValueError(f"spcs: expected unique grid positions, found {n - int((table >= 0).sum())} repeated")
    t = 2 * tau_s if hexagonal else tau_s
    spatial, wsum = np.zeros_like(x), np.zeros(n)
    for di in range(-t, t + 1):
        for dj in range(-t, t + 1):
            dist = abs(di) + abs(dj)
            if not 0 < dist <= t:
                continue
            i, j = g[:, 0] + di, g[:, 1] + dj
            ok = (i >= 0) & (j >= 0) & (i < table.shape[0]) & (j < table.shape[1])
            nb = np.full(n, -1)
            nb[ok] = table[i[ok], j[ok]]
            has = nb >= 0
            spatial[has] += x[nb[has]] / dist
            wsum[has] += 1.0 / dist
    spatial /= wsum[:, None] + 1e-8
    return (1 - alpha) * x + alpha * (beta * spatial + (1 - beta) * pattern)


def eight_neighbour_mean(expr, grid) -> np.ndarray:
    """Each spot's mean over itself and its (up to) 8 array neighbours, |di|, |dj| <= 1 (MERGE's '8n')."""
    x = np.asarray(expr, dtype=np.float64)
    g = np.asarray(grid, dtype=np.int64)
    g = g - g.min(0)
    table = np.full(g.max(0) + 1, -1, dtype=np.int64)
    table[g[:, 0], g[:, 1]] = np.arange(len(x))
    total, count = np.zeros_like(x), np.zeros(len(x))
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            i, j = g[:, 0] + di, g[:, 1] + dj
            ok = (i >= 0) & (j >= 0) & (i < table.shape[0]) & (j < table.shape[1])
            nb = np.full(len(x), -1)
            nb[ok] = table[i[ok], j[ok]]
            total[nb >= 0] += x[nb[nb >= 0]]
            count[nb >= 0] += 1
    return total / count[:, None]


def minmax_to_range(x, lo: float, hi: float) -> np.ndarray:
    """Each column min-max scaled onto [lo, hi] (scikit-learn's MinMaxScaler(feature_range=(lo, hi)); a
    constant column becomes lo). MERGE's 'spcs_to_8n' targets: SPCS output onto the 8n range."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max(0) - x.min(0)
    return (x - x.min(0)) / np.where(span > 0, span, 1.0) * (hi - lo) + lo


# ----------------------------------------------------------------------------- coordinate augmentation

def augment_coords(xy: torch.Tensor, strength: float, generator: torch.Generator | None = None,
                   p_drop: float = 0.2, max_shear_deg: float = 15.0, max_rot_deg: float = 30.0):
    """HiST A.6/A.7: random mirror, shear (up to strength * max_shear_deg), rotation (a multiple of 90 deg
    plus up to strength * max_rot_deg) around the centroid, then spot drop with probability
    p_drop * strength (at least one spot stays). Mirror and right-angle turns are symmetries of the
    lattice, so they are drawn at any strength > 0; strength 0 is the identity. Features are untouched.
    Returns (keep (K,) long indices into xy, transformed xy[keep] (K, 2))."""
    n = xy.shape[0]
    if strength <= 0:
        return torch.arange(n), xy.clone()
    u = lambda: float(torch.rand((), generator=generator, dtype=torch.float64))  # noqa: E731
    mirror = -1.0 if u() < 0.5 else 1.0
    shear = math.tan(math.radians((2 * u() - 1) * strength * max_shear_deg))
    angle = math.pi / 2 * int(4 * u()) + math.radians((2 * u() - 1) * strength * max_rot_deg)
    c, s = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    A = rotate @ torch.tensor([[mirror, shear], [0.0, 1.0]], dtype=torch.float64)   # rotate . shear . mirror
    centre = xy.double().mean(0)
    out = ((xy.double() - centre) @ A.T + centre).to(xy.dtype)
    keep = torch.rand(n, generator=generator) >= p_drop * strength
    if not keep.any():
        keep[int(torch.randint(n, (1,), generator=generator))] = True
    keep = keep.nonzero().squeeze(1)
    return keep, out[keep]


# ----------------------------------------------------------------------------- placeholder encoder

# Ruifrok & Johnston (2001) optical-density colour vectors of haematoxylin and eosin (unit length).
STAINS = F.normalize(torch.tensor([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]]), dim=1)


@torch.no_grad()
def patch_statistics(images: torch.Tensor) -> torch.Tensor:
    """The built-in placeholder encoder: uint8 (B, H, W, 3) RGB patches -> (B, 48) float32 features.
    Eight maps at half resolution (R, G, B, haematoxylin and eosin optical density, gradient magnitude,
    nuclei mask, background mask) summarised over the whole patch and over 2x2 and 4x4 grids of
    sub-patches (HiFusion's intra-spot hierarchy): whole-patch mean and std, then per grid the mean std
    inside a sub-patch (texture) and the std of the sub-patch means (heterogeneity). A weak stand-in
    for a pathology foundation model; any callable with this signature can replace it (`--encoder`)."""
    x = F.avg_pool2d(images.permute(0, 3, 1, 2).float(), 2) / 255                    # (B, 3, H/2, W/2)
    od = -torch.log((x * 255 + 1) / 256)                                              # Beer-Lambert optical density
    stains = torch.einsum("bchw,sc->bshw", od, STAINS)                                # (B, 2, h, w)
    gray = x.mean(1, keepdim=True)
    grad = (F.pad(gray.diff(dim=3), (0, 1)) ** 2 + F.pad(gray.diff(dim=2), (0, 0, 0, 1)) ** 2).sqrt()
    maps = torch.cat([x, stains, grad, (stains[:, :1] > 0.5).float(), (gray > 0.85).float()], 1)  # (B, 8, h, w)
    cells = F.adaptive_avg_pool2d(torch.cat([maps, maps ** 2], 1), 4)               # (B, 16, 4, 4) moments
    feats = []
    for grid in (1, 2, 4):
        m = F.avg_pool2d(cells, 4 // grid)                                            # (B, 16, grid, grid)
        mean, std = m[:, :8], (m[:, 8:] - m[:, :8] ** 2).clamp_min(0).sqrt()
        feats += [mean.flatten(1), std.flatten(1)] if grid == 1 else [std.mean((2, 3)), mean.flatten(2).std(2)]
    return torch.cat(feats, 1)                                                        # (B, 48)


def load_encoder(spec: str | None):
    """'module:callable' (importable from the current folder) -> the callable; None -> patch_statistics."""
    if not spec:
        return patch_statistics
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--encoder: expected 'module:callable', found {spec!r}")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), name)


def embed_patches(patches_dir, out_dir, encoder: str | None = None, batch_size: int = 128,
                  overwrite: bool = False, log=print) -> list[Path]:
    """HEST patch files <id>.h5 (`img` (N, H, W, 3) uint8, `coords` (N, 2), `barcode` (N, 1)) -> one
    HEST-Benchmark embedding file <id>.h5 per slide (`embeddings`, `coords` copied, `barcodes`).
    `encoder` is 'module:callable' for your own encoder: it is called on uint8 tensors (B, H, W, 3) and
    returns (B, C) floats (e.g. a foundation model wrapped with its own resizing and normalisation);
    None uses the built-in patch_statistics."""
    not_an_input(out_dir, patches_dir)
    fn, written = load_encoder(encoder), []
    for path in sorted(Path(patches_dir).glob("*.h5")):
        t0, out = time.time(), Path(out_dir) / path.name
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out}: already exists; refusing to overwrite it (pass --overwrite)")
        with _open(path) as f:
            for key in ("img", "coords", "barcode"):
                if key not in f:
                    _fail(path, key, "a dataset (HEST patches file)", "no such key")
            img = f["img"]
            if img.ndim != 4 or img.shape[3] != 3 or img.dtype != np.uint8:
                _fail(path, "img", "uint8 (N, H, W, 3)", f"{img.dtype} {img.shape}")
            emb = torch.cat([torch.as_tensor(fn(torch.from_numpy(img[i:i + batch_size]))).float()
                             for i in range(0, img.shape[0], batch_size)]).numpy()
            coords, barcodes = f["coords"][()], _strings(f["barcode"]).reshape(-1)
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as g:
            g["embeddings"], g["coords"] = emb, coords
            g.create_dataset("barcodes", data=barcodes.astype(object), dtype=STR)
            g.attrs["encoder"] = encoder or "tessera-patch-statistics"
        log(f"embed {path.stem}: {len(emb)} patches -> {emb.shape[1]} features in {time.time() - t0:.1f} s")
        written.append(out)
    if not written:
        raise FileNotFoundError(f"{patches_dir}: expected HEST patch files *.h5, found none")
    return written


# ----------------------------------------------------------------------------- HEST import

def _read_embeddings(path) -> tuple[np.ndarray, np.ndarray, str]:
    """A HEST-Benchmark embedding file: `embeddings` (N, C), `barcodes` (N,) or (N, 1); -> (emb, barcodes, encoder)."""
    with _open(path) as f:
        for key in ("embeddings", "barcodes"):
            if key not in f and not (key == "barcodes" and "barcode" in f):
                _fail(path, key, "a dataset (HEST-Benchmark embedding file)", "no such key")
        emb = f["embeddings"][()]
        barcodes = _strings(f["barcodes" if "barcodes" in f else "barcode"]).reshape(-1)
        encoder = _attr(f, "encoder", Path(path).parent.name)
    if emb.ndim != 2 or len(emb) != len(barcodes):
        _fail(path, "embeddings", f"shape ({len(barcodes)}, C), one row per barcode", f"shape {emb.shape}")
    if len(set(barcodes)) < len(barcodes):
        _fail(path, "barcodes", "unique barcodes", f"{len(barcodes) - len(set(barcodes))} duplicates")
    return emb, barcodes, encoder


def _h5ad_gene_totals(path, harmonise: bool = False) -> dict[str, float]:
    """Total counts per gene of one h5ad, straight from the sparse arrays (harmonised names summed)."""
    with _open(path) as f:
        genes, _ = _h5ad_frame(f, "var")
        _, cols, values, _ = _h5ad_X(f)
    totals = {}
    for g, t in zip(harmonise_gene_names(genes) if harmonise else genes,
                    np.bincount(cols, weights=values, minlength=len(genes))):
        totals[g] = totals.get(g, 0.0) + t if harmonise else t
    return totals


def _h5ad_gene_names(path, harmonise: bool = False) -> set[str]:
    with _open(path) as f:
        genes = _h5ad_frame(f, "var")[0]
    return set(harmonise_gene_names(genes) if harmonise else genes)


def import_hest(st_dir, features_dir, out_dir, meta=None, genes=None, max_genes: int | None = None,
                overwrite: bool = False, log=print, dataset: str | None = None, harmonise: bool = False) -> list[Path]:
    """HEST-1k `st/<id>.h5ad` + HEST-Benchmark embedding files `<id>.h5` -> slide caches `<out>/<id>.h5`.
    Spots are joined by barcode (one line per slide reports the unmatched); centres come from the h5ad
    and become micrometres with the metadata's pixel_size_um_estimated; patient from its `patient`
    column (else the slide id); pitch from inter_spot_dist. All genes are kept unless `genes` (a gene
    list file) or `max_genes` (top by total counts over all slides) restricts them; library_size is
    always the total over all genes. `dataset` ('hist:brain') imports exactly the slides a paper lists
    (configs/protocols/<paper>_slides.yaml) and refuses, before writing anything, if any is missing;
    `harmonise` applies HiST's gene-name harmonisation (read_h5ad)."""
    not_an_input(out_dir, st_dir, features_dir)
    table = read_metadata(meta) if meta else {}
    pairs = [(p, Path(st_dir) / f"{p.stem}.h5ad") for p in sorted(Path(features_dir).glob("*.h5"))]
    if dataset:
        listing, ids = dataset_slides(dataset)
        have = {p.stem for p, st in pairs if st.exists()}
        missing = [s for s in ids if s not in have]
        if missing:
            raise CacheError(f"{listing}: {dataset}: {len(missing)} of {len(ids)} slides have no embedding file in "
                             f"{features_dir} or no expression file in {st_dir}: {', '.join(missing[:20])}"
                             f"{' ...' if len(missing) > 20 else ''}")
        pairs = [(p, st) for p, st in pairs if p.stem in set(ids)]
    if not pairs:
        raise FileNotFoundError(f"{features_dir}: expected embedding files *.h5, found none")
    for p, st in pairs:
        if not st.exists():
            log(f"{p.stem}: skipped, no expression file {st}")
    pairs = [(p, st) for p, st in pairs if st.exists()]
    wanted = read_gene_list(genes) if genes else None
    if max_genes:
        totals = {}
        for _, st in pairs:
            for g, t in _h5ad_gene_totals(st, harmonise).items():
                totals[g] = totals.get(g, 0.0) + t
        wanted = sorted(totals, key=lambda g: -totals[g])[:max_genes]
    written = []
    for p, st in pairs:
        sid, row = p.stem, table.get(p.stem, {})
        emb, feature_barcodes, encoder = _read_embeddings(p)
        have = _h5ad_gene_names(st, harmonise)
        h = read_h5ad(st, genes=None if wanted is None else [g for g in wanted if g in have], harmonise=harmonise)
        if h.xy is None:
            _fail(st, "obsm/spatial", "spot centres (obsm/spatial or obs pxl_col_in_fullres/pxl_row_in_fullres)",
                  "neither")
        row_of = {b: i for i, b in enumerate(feature_barcodes)}
        matched = np.array([b in row_of for b in h.barcodes], dtype=bool)
        rows = np.array([row_of[b] for b in h.barcodes[matched]], dtype=np.int64)
        px = float(row.get("pixel_size_um_estimated") or "nan")
        n = int(matched.sum())
        line = (f"{sid}: {n} spots matched, {len(matched) - n} only in st, {len(feature_barcodes) - n} only in "
                f"features; {len(h.genes)} genes" + (f" ({len(wanted) - len(h.genes)} of the list missing)"
                                                     if wanted is not None else ""))
        if not px > 0:
            px, line = 1.0, line + "; no pixel_size_um_estimated, coords stay in pixels"
        if n == 0:
            log(line + "; skipped (check that barcodes use the same format)")
            continue
        slide = Slide(sid, torch.from_numpy(emb[rows]).float(), torch.from_numpy(h.xy[matched] * px).float(),
                      h.barcodes[matched], patient=row.get("patient") or sid,
                      spot_pitch_um=float(row.get("inter_spot_dist") or "nan"), encoder=encoder,
                      counts=torch.from_numpy(h.counts[matched]), genes=h.genes,
                      library_size=torch.from_numpy(h.library_size[matched]).float())
        written.append(write_slide(Path(out_dir) / f"{sid}.h5", slide, overwrite))
        log(f"{line}; patient {slide.patient}{'' if row or not meta else ' (not in --meta)'} -> {written[-1]}")
    return written


# ----------------------------------------------------------------------------- synthetic slides

LAYOUTS = {"visium": (100.0, True), "square": (200.0, False), "hd": (8.0, False)}  # pitch in um, hexagonal
# Latent tissue programs: (name, kind, length scale of its smooth random field in spot pitches, or the
# region a margin surrounds). What the spot's own image features show of each kind:
#   region  - a thresholded field (tumour, gland): clearly visible
#   local   - visible under light noise
#   neigh   - visible only under heavy per-spot noise; smooth over several spots, so the mean of the
#             neighbours' features recovers it
#   inhibit - a pair visible locally whose expression is suppressed by the other one in the first ring
#   margin  - spots outside a region with the region in their two rings; invisible locally
PROGRAMS = (("TUMOUR", "region", 5), ("GLAND", "region", 8), ("CELLULARITY", "local", 4),
            ("LOCAL_A", "local", 2), ("LOCAL_B", "local", 3), ("LOCAL_C", "local", 6),
            ("NEIGH_A", "neigh", 3), ("NEIGH_B", "neigh", 4), ("NEIGH_C", "neigh", 4),
            ("NEIGH_D", "neigh", 5), ("NEIGH_E", "neigh", 6),
            ("INHIBIT_A", "inhibit", 2.5), ("INHIBIT_B", "inhibit", 2.5),
            ("TUMOUR_MARGIN", "margin", "TUMOUR"), ("GLAND_MARGIN", "margin", "GLAND"))
FIELDS = [p for p in PROGRAMS if p[1] != "margin"] + [("NUISANCE_A", "local", 2), ("NUISANCE_B", "local", 5)]
NOISE = {"region": 0.3, "local": 0.5, "neigh": 3.0, "inhibit": 0.5}   # feature noise per visible signal


def _random_fields(scales, rng, k=64):
    """Unit-variance Gaussian random fields with squared-exponential correlation (random Fourier
    features, k frequencies each); returns a function from points (M, 2) to values (M, len(scales))."""
    omega = (rng.standard_normal((len(scales), k, 2)) / np.asarray(scales, float)[:, None, None]).reshape(-1, 2)
    phase = rng.uniform(0, 2 * np.pi, len(scales) * k)
    return lambda xy: math.sqrt(2 / k) * np.cos((xy @ omega.T + phase).astype(np.float32)).reshape(
        len(xy), len(scales), k).sum(-1, dtype=np.float64)


def _neighbour_mean(v, mask, hexagonal, radius):
    """Mean of v (R, C, K) over the in-tissue lattice sites within `radius` pitches (not the site itself)."""
    hx, hy = (0.5, math.sqrt(3) / 2) if hexagonal else (1.0, 1.0)
    r = int(radius / hx) + 1
    total, count = np.zeros_like(v), np.zeros(mask.shape)
    for dr in range(-r, r + 1):
        for dc in range(-r, r + 1):
            if (hexagonal and (dr + dc) % 2) or not 0 < math.hypot(dr * hy, dc * hx) <= radius + 1e-6:
                continue
            dst = np.s_[max(0, -dr):mask.shape[0] - max(0, dr), max(0, -dc):mask.shape[1] - max(0, dc)]
            src = np.s_[max(0, dr):mask.shape[0] - max(0, -dr), max(0, dc):mask.shape[1] - max(0, -dc)]
            total[dst] += v[src] * mask[src][..., None]
            count[dst] += mask[src]
    return total / np.maximum(count, 1)[..., None]


def _region(z):
    return 1 / (1 + np.exp(-4 * (z - 0.5)))


def _visible(z, rng):
    """What the image shows of the latent fields z (M, len(FIELDS)): (M, len(FIELDS)) noisy signals."""
    sig = np.stack([_region(z[:, f]) if kind == "region" else z[:, f] for f, (_, kind, _) in enumerate(FIELDS)], 1)
    noise = np.array([NOISE[kind] for _, kind, _ in FIELDS])
    return sig + noise * rng.standard_normal(sig.shape)


def make_synthetic(out, n_slides: int = 12, seed: int = 0, layout: str = "visium", n_spots: int = 1500,
                   n_genes: int = 300, n_features: int = 64, pseudo: bool = False, overwrite: bool = False,
                   log=print) -> list[Path]:
    """Write a synthetic dataset of slide caches (see PROGRAMS) plus programs.gmt and metadata.csv.
    Deterministic for a seed: dataset-wide draws use seed, slide i draws use (seed, i)."""
    t0, out = time.time(), Path(out)
    pitch, hexagonal = LAYOUTS[layout]
    hx, hy = (0.5, math.sqrt(3) / 2) if hexagonal else (1.0, 1.0)
    rng = np.random.default_rng(seed)
    P, S = len(PROGRAMS), len(FIELDS)
    # genes: ~85% belong to one program (a quarter also weakly to a second), the rest to none
    n_free = round(0.15 * n_genes)
    primary = np.concatenate([rng.permutation(np.arange(n_genes - n_free) % P), -np.ones(n_free, int)])
    W = np.zeros((n_genes, P))
    for g in np.flatnonzero(primary >= 0):
        W[g, primary[g]] = rng.uniform(0.5, 1.0) * (-1 if rng.random() < 0.15 else 1)
        if rng.random() < 0.25:
            W[g, (primary[g] + rng.integers(1, P)) % P] = rng.uniform(0.2, 0.5)
    log_base = rng.normal(math.log(3), 1.0, n_genes)
    theta = rng.uniform(2, 10, n_genes)                                  # NB size; variance mu + mu^2/theta
    mix = rng.standard_normal((S, n_features)) / math.sqrt(S)            # visible signals -> features
    stain_shift, stain_gain = rng.standard_normal((3, n_features)), rng.standard_normal((3, n_features))
    patient_of = [p for p, size in enumerate([3, 2] * n_slides) for _ in range(size)][:n_slides]
    n_pat = patient_of[-1] + 1
    patient_offset = 0.4 * rng.standard_normal((n_pat, S))               # e.g. more tumour in a patient
    patient_stain = rng.standard_normal((n_pat, 3))
    genes = [f"G{g:03d}" for g in range(n_genes)]
    names = [f"P{p:02d}_{name}" for p, (name, _, _) in enumerate(PROGRAMS)]
    paths, rows, total = [], [], 0
    for i in range(n_slides):
        srng, pat = np.random.default_rng([seed, i]), patient_of[i]
        n = int(n_spots * srng.uniform(0.85, 1.15))
        side = math.sqrt(n / 0.3 * hx * hy * (2 if hexagonal else 1))    # box ~3x the tissue area
        R, C = int(side / hy) + 2, int(side / hx) + 2
        rr, cc = np.mgrid[0:R, 0:C]
        grid = np.stack([cc * hx, rr * hy], -1).reshape(-1, 2)           # (R*C, 2) in pitches
        fields = _random_fields([s for _, _, s in FIELDS] + [side / 4], srng)
        z = fields(grid)                                                 # (R*C, S+1)
        z[:, :S] += patient_offset[pat]
        # irregular tissue footprint: the n sites scoring best on a random ellipse plus a smooth field
        angle, aspect = srng.uniform(0, np.pi), srng.uniform(0.6, 1.0)
        u, v = ((grid - side / 2) @ np.array([[math.cos(angle), -math.sin(angle)],
                                              [math.sin(angle), math.cos(angle)]])).T
        score = -np.hypot(u, v / aspect) / side + 0.15 * z[:, S]
        if hexagonal:
            score[(rr + cc).reshape(-1) % 2 == 1] = -np.inf
        mask = np.zeros(R * C, bool)
        mask[np.argsort(-score, kind="stable")[:n]] = True
        # program activities, including the ones that depend on the neighbours
        idx = {name: f for f, (name, _, _) in enumerate(FIELDS)}
        zg, mg = z[:, :S].reshape(R, C, S), mask.reshape(R, C)
        ring1 = _neighbour_mean(zg, mg, hexagonal, 1.0).reshape(-1, S)
        ring2 = _neighbour_mean(_region(zg), mg, hexagonal, 2.0).reshape(-1, S)
        act = np.zeros((R * C, P))
        for p, (name, kind, arg) in enumerate(PROGRAMS):
            if kind == "margin":      # outside the region, with the region in the two rings around
                act[:, p] = 5 * ring2[:, idx[arg]] * (1 - _region(z[:, idx[arg]])) - 0.5
            elif kind == "inhibit":   # suppressed by the partner's level in the first ring
                partner = idx["INHIBIT_B" if name == "INHIBIT_A" else "INHIBIT_A"]
                act[:, p] = (z[:, idx[name]] - 0.8 * ring1[:, partner]) / 1.2
            else:
                act[:, p] = 2 * _region(z[:, idx[name]]) - 1 if kind == "region" else z[:, idx[name]]
        act = act[mask]                                                  # (N, P)
        # expression: NB counts around library size x exp(baseline + loadings . activities)
        lib = math.exp(srng.normal(0, 0.3)) * np.exp(0.4 * z[mask, idx["CELLULARITY"]] + 0.2 * srng.standard_normal(n))
        expected = lib[:, None] * np.exp(log_base + act @ W.T)           # (N, G)
        counts = srng.negative_binomial(theta, theta / (theta + expected)).astype(np.float32)
        # features: mixed visible signals + noise, then a per-slide affine stain shift
        stain = patient_stain[pat] + 0.5 * srng.standard_normal(3)
        embed = lambda vis: (vis @ mix + 0.3 * srng.standard_normal((len(vis), n_features))) \
            * np.exp(0.1 * stain @ stain_gain) + 0.35 * stain @ stain_shift  # noqa: E731
        offset = srng.uniform(0, 5000, 2)
        coords = grid[mask] * pitch + offset + 0.01 * pitch * srng.standard_normal((n, 2))
        slide = Slide(f"synth_{i:02d}", torch.tensor(embed(_visible(z[mask, :S], srng)), dtype=torch.float32),
                      torch.tensor(coords, dtype=torch.float32), np.array([f"s{i:02d}_{j:05d}" for j in range(n)]),
                      patient=f"P{pat:02d}", spot_pitch_um=pitch, encoder="synthetic",
                      counts=torch.from_numpy(counts), genes=genes, library_size=torch.from_numpy(counts.sum(1)),
                      expected=torch.tensor(expected, dtype=torch.float32))
        if pseudo:  # off-grid pseudo-spots at triangle (hex) or square centres inside the tissue (FEAST)
            if hexagonal:   # sites (r, c), (r, c+2), (r+1, c+1) form a triangle
                pr, pc = np.nonzero(mg[:-1, :-2] & mg[:-1, 2:] & mg[1:, 1:-1])
                pxy = np.stack([pc * hx + 0.5, pr * hy + hy / 3], 1)
            else:
                pr, pc = np.nonzero(mg[:-1, :-1] & mg[:-1, 1:] & mg[1:, :-1] & mg[1:, 1:])
                pxy = np.stack([pc + 0.5, pr + 0.5], 1)
            pz = fields(pxy)[:, :S] + patient_offset[pat]
            slide.pseudo_features = torch.tensor(embed(_visible(pz, srng)), dtype=torch.float32)
            slide.pseudo_coords = torch.tensor(pxy * pitch + offset, dtype=torch.float32)
        paths.append(write_slide(out / f"{slide.slide_id}.h5", slide, overwrite))
        rows.append(f"{slide.slide_id},{slide.patient},{layout},{n}")
        total += n
    (out / "programs.gmt").write_text("".join(
        f"{name}\tsynthetic:{kind}\t" + "\t".join(genes[g] for g in np.flatnonzero(W[:, p])) + "\n"
        for p, (name, (_, kind, _)) in enumerate(zip(names, PROGRAMS))))
    (out / "metadata.csv").write_text("id,patient,layout,n_spots\n" + "\n".join(rows) + "\n")
    log(f"synth: {n_slides} slides, {total} spots, {n_genes} genes, {n_features} features, {n_pat} patients "
        f"-> {out} in {time.time() - t0:.1f} s")
    return paths


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    ap = argparse.ArgumentParser(prog="data.py", description="Build tessera slide caches (DESIGN.md, 'Data contract').")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("synth", help="write a synthetic dataset (slides, programs.gmt, metadata.csv)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slides", type=int, default=12, help="number of slides (2-3 per patient)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="visium",
                   help="visium: hexagonal 100 um; square: 200 um (legacy ST); hd: square 8 um bins")
    p.add_argument("--spots", type=int, default=1500, help="spots per slide (+-15%%)")
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--pseudo", action="store_true", help="also write off-grid pseudo-spots (FEAST)")
    p = sub.add_parser("import-hest", help="HEST st/<id>.h5ad + embedding files <id>.h5 -> slide caches")
    p.add_argument("--st", required=True, help="folder of <id>.h5ad files")
    p.add_argument("--features", required=True, help="folder of <id>.h5 embedding files (embeddings, coords, barcodes)")
    p.add_argument("--out", required=True, help="output folder (never one of the inputs)")
    p.add_argument("--meta", help="metadata.csv with id, patient, pixel_size_um_estimated, inter_spot_dist")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--genes", help="gene list: JSON {\"genes\": [...]} or one gene per line")
    g.add_argument("--max-genes", type=int, help="keep the N genes with the most counts over all slides")
    p.add_argument("--dataset", help="import exactly the slides a paper lists, e.g. hist:brain "
                   "(configs/protocols/<paper>_slides.yaml); an id missing from the inputs is an error")
    p.add_argument("--harmonise", action="store_true", help="HiST's gene harmonisation: strip assembly prefixes "
                   "and '.' suffixes, upper-case, sum genes and barcodes that then repeat")
    p = sub.add_parser("embed", help="HEST patch files <id>.h5 -> embedding files <id>.h5 (placeholder encoder)")
    p.add_argument("--patches", required=True, help="folder of HEST patch files (img, coords, barcode)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", help="module:callable taking uint8 (B, H, W, 3) and returning (B, C) float; "
                   "default: the built-in colour/texture statistics (a weak stand-in for a foundation model)")
    p.add_argument("--batch-size", type=int, default=128)
    p = sub.add_parser("genes", help="select genes on the given slides only and write {\"genes\": [...]}")
    p.add_argument("--slides", required=True, help="folder of slide caches with counts")
    p.add_argument("--ids", nargs="*", help="only these slide ids (e.g. a fold's training slides)")
    p.add_argument("--n", type=int, default=250)
    p.add_argument("--by", choices=["hvg", "mean"], default="hvg")
    p.add_argument("--skip-empty", action="store_true", help="leave out spots without counts (HiST's preprocessing)")
    p.add_argument("--out", required=True, help="output JSON file")
    for name in ("synth", "import-hest", "embed"):
        sub.choices[name].add_argument("--overwrite", action="store_true", help="replace existing output files")
    a = ap.parse_args(argv)
    if a.cmd == "synth":
        make_synthetic(a.out, a.slides, a.seed, a.layout, a.spots, a.genes, a.features, a.pseudo, a.overwrite)
    elif a.cmd == "import-hest":
        import_hest(a.st, a.features, a.out, a.meta, a.genes, a.max_genes, a.overwrite, dataset=a.dataset,
                    harmonise=a.harmonise)
    elif a.cmd == "embed":
        embed_patches(a.patches, a.out, a.encoder, a.batch_size, a.overwrite)
    else:
        paths = [p for p in list_slides(a.slides) if (not a.ids or p.stem in a.ids) and read_slide_meta(p).genes]
        if not paths:
            raise SystemExit(f"{a.slides}: no slide with counts{' among --ids' if a.ids else ''}")
        metas = [read_slide_meta(p) for p in paths]
        common = [g for g in metas[0].genes if all(g in set(m.genes) for m in metas[1:])]
        counts = [read_slide(p, genes=common).counts for p in paths]
        if a.skip_empty:
            counts = [c[c.sum(1) > 0] for c in counts]
        chosen = select_genes(counts, common, a.n, a.by)
        with atomic_path(a.out) as tmp:
            Path(tmp).write_text(json.dumps({"genes": chosen}, indent=1) + "\n")
        print(f"genes: {len(chosen)} by {a.by} from {len(paths)} slides ({len(common)} genes in common) -> {a.out}")


if __name__ == "__main__":
    main()

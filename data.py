"""Slide feature caches and the small files training reads: what `train.py` turns into tensors.

Sections: cache format (write, read, validate; DATA.md) · gene selection and targets · folds
(balanced by patient, and the papers' own fold assignments) · sub-spot inputs · command line. Every
other file the project reads or writes (gene lists, gene sets, split CSVs, prediction files,
AnnData), and the rules every file follows (one writing helper, one decoding of text, errors naming
file and key, values checked block by block), are files.py's. The HEST import and placeholder
encoder are in hest.py, the papers' slide lists and label smoothing in protocols.py, the synthetic
generator in synthetic.py: each with its own command line.
    python data.py genes --slides DIR --n 250 --by hvg|mean --out genes.json [--ids ID ...]
                         [--skip-empty] [--overwrite]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

import lattice
from files import (CacheError, Outputs, atomic_path, check_finished, check_values, check_writable,
                   clashes, dataset, fail, h5_strings, listed, open_h5, refuse_existing, text_attr)

FORMAT_VERSION = 1
# data.check_writable and data.atomic_path are files.py's, imported for the programs that use them
_PROGRAMS_USE = (check_writable, atomic_path)


@dataclass
class Slide:
    """One slide in memory. Tensors are float32 on the CPU, except features (and pseudo_features)
    that the cache stores as float16: they stay float16 (half the memory of a Visium HD slide; the
    models standardise them in float32). N spots, C features, G genes."""
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
    expected: torch.Tensor | None = None          # (N, G) noise-free mean counts (synthetic only)
    pseudo_features: torch.Tensor | None = None   # (M, C) off-grid pseudo-spots (FEAST)
    pseudo_coords: torch.Tensor | None = None     # (M, 2)
    sub_features: torch.Tensor | None = None      # (N, S, C), S = r*r sub-patches, s = r * ix + iy
    sub_valid: torch.Tensor | None = None         # (N, S) bool: the sub-positions that exist
    sub_counts: torch.Tensor | None = None        # (N, S, G) truth at the sub scale (evaluation)
    sub_extent_um: float = float("nan")           # side of the square the r x r sub-patches tile

    @property
    def n_spots(self) -> int:
        return self.features.shape[0]


# ----------------------------------------------------------------------------- cache format
STR = h5py.string_dtype("utf-8")
ARRAY_KEYS = ("features", "coords", "barcodes", "counts", "genes", "library_size", "expected",
              "pseudo_features", "pseudo_coords", "sub_features", "sub_valid", "sub_counts")
STRING_KEYS = ("barcodes", "genes")


def _unique(path, key: str, x: np.ndarray) -> None:
    """No two values of a string array clash (files.clashes: repeats, or a difference in case only);
    np.unique first, so that a million distinct barcodes cost one sort."""
    values = np.unique(x)
    if len(values) == len(x) and len(np.unique(np.char.lower(values))) == len(values):
        return
    found = clashes(x.tolist())
    fail(path, key, "unique values", f"{len(found)} duplicated, e.g. {found[0]}")


def _check(path, a: dict, key: str, shape: tuple, kind: str) -> int:
    """One array (or h5py dataset): kind 'float' | 'number' | 'str', shape with None for any size;
    unique strings; the values (check_values, whose count of non-integer counts it returns)."""
    x = a[key]
    want = str(tuple("any" if s is None else s for s in shape)).replace("'", "")
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        fail(path, key, f"shape {want}", f"shape {tuple(x.shape)}")
    if kind == "str":
        if x.dtype.kind != "U":
            fail(path, key, "utf-8 strings", f"dtype {x.dtype}")
        _unique(path, key, x)
        return 0
    if x.dtype.kind not in ("f" if kind == "float" else "fiu"):
        fail(path, key, "float16/float32 values" if kind == "float" else "numeric values",
             f"dtype {x.dtype}")
    return check_values(path, key, x)


def _validate(path, a: dict) -> int:
    """Every key of the data contract (DATA.md); `a` maps keys to numpy arrays or h5py datasets
    (absent keys left out; strings as numpy str arrays). Returns the number of non-integer values in
    `counts`."""
    for key in ("features", "coords", "barcodes"):
        if key not in a:
            fail(path, key, "a dataset (required)", "no such key")
    _check(path, a, "features", (None, None), "float")
    n, c = a["features"].shape
    if c == 0:
        fail(path, "features", "at least one feature per spot", f"shape {(n, c)}")
    _check(path, a, "coords", (n, 2), "float")
    _check(path, a, "barcodes", (n,), "str")
    if "counts" in a and "genes" not in a:
        fail(path, "genes", "a gene list beside 'counts'", "no such key")
    if "genes" in a:
        _check(path, a, "genes", (None,), "str")
    g = len(a["genes"]) if "genes" in a else None
    fractional = 0
    for key, shape, kind in (("counts", (n, g), "number"), ("expected", (n, g), "float"),
                             ("library_size", (n,), "number"),
                             ("pseudo_features", (None, c), "float")):
        if key in a:
            fractional += _check(path, a, key, shape, kind)
    if ("pseudo_features" in a) != ("pseudo_coords" in a):
        fail(path, "pseudo_coords", "pseudo_features and pseudo_coords together",
             "only one of them")
    if "pseudo_coords" in a:
        _check(path, a, "pseudo_coords", (len(a["pseudo_features"]), 2), "float")
    _validate_sub(path, a, n, c, g)
    return fractional


def _validate_sub(path, a: dict, n: int, c: int, g: int | None):
    """The optional sub-spot keys: sub_features (N, S, C) with S = 4 or 16, sub_valid (N, S) bool
    with at least one true per spot, sub_counts (N, S, G); the attribute sub_extent_um > 0 beside
    them."""
    if "sub_features" not in a:
        for key in ("sub_valid", "sub_counts"):
            if key in a:
                fail(path, "sub_features", f"a dataset beside '{key}'", "no such key")
        return
    x = a["sub_features"]
    if x.ndim != 3 or x.shape[1] not in (4, 16) or x.shape[0] != n or x.shape[2] != c:
        fail(path, "sub_features", f"shape ({n}, 4 or 16, {c}): the features of 2 x 2 or 4 x 4 "
             "sub-patches of each spot, as many features as 'features'", f"shape {tuple(x.shape)}")
    S = x.shape[1]
    _check(path, a, "sub_features", (n, S, c), "float")
    if "sub_valid" in a:
        v = np.asarray(a["sub_valid"])
        if v.dtype != np.bool_ or v.shape != (n, S):
            fail(path, "sub_valid", f"bool shape ({n}, {S})", f"{v.dtype} shape {tuple(v.shape)}")
        empty = ~v.any(1)
        if empty.any():
            fail(path, "sub_valid", "at least one valid sub-position per spot",
                 f"{int(empty.sum())} spots with none, first spot {int(np.argmax(empty))}")
    if "sub_counts" in a:
        if g is None:
            fail(path, "genes", "a gene list beside 'sub_counts'", "no such key")
        _check(path, a, "sub_counts", (n, S, g), "number")
    extent = a.get("attrs/sub_extent_um", float("nan"))
    if not extent > 0 or not math.isfinite(extent):
        fail(path, "attrs/sub_extent_um",
             "the side in micrometres of the square the sub-patches tile (> 0)", extent)


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_slide(path, slide: Slide, overwrite: bool = False, where=None) -> Path:
    """Write one slide cache atomically; refuses to replace an existing file unless overwrite=True.
    Strings are written as they will be read (files.name: surrounding whitespace dropped). A slide
    read_slide would reject is an error naming `where` (the files it came from; default `path`)."""
    path = Path(path)
    refuse_existing([path], overwrite)
    a = {k: _np(getattr(slide, k)) for k in ARRAY_KEYS if getattr(slide, k) is not None}
    for k in STRING_KEYS:
        if k in a:
            a[k] = np.char.strip(a[k].astype(str))
    if "sub_features" in a:
        a["attrs/sub_extent_um"] = float(slide.sub_extent_um)
    _validate(where or path, a)  # never write a file that read_slide would reject
    extent = a.pop("attrs/sub_extent_um", None)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for k, x in a.items():
            if k in STRING_KEYS:
                f.create_dataset(k, data=x.astype(object), dtype=STR)
            elif k in ("counts", "expected") and x.size:  # (N, G) can be large: chunked, compressed
                f.create_dataset(k, data=x.astype(np.float32),
                                 chunks=(min(len(x), 1024), min(x.shape[1], 256)),
                                 compression="gzip", compression_opts=4, shuffle=True)
            elif k == "sub_counts":
                f.create_dataset(k, data=x.astype(np.float32),
                                 chunks=(min(len(x), 256), x.shape[1], min(x.shape[2], 256)),
                                 compression="gzip", compression_opts=4, shuffle=True)
            elif k == "sub_valid":
                f.create_dataset(k, data=x)
            else:
                f.create_dataset(k, data=x if x.dtype == np.float16 else x.astype(np.float32))
        f.attrs.update(slide_id=str(slide.slide_id).strip(),
                       patient=str(slide.patient or slide.slide_id).strip(),
                       spot_pitch_um=float(slide.spot_pitch_um), encoder=slide.encoder,
                       format_version=FORMAT_VERSION)
        if extent is not None:
            f.attrs["sub_extent_um"] = extent
    return path


def _number_attr(path, f, key: str, default):
    """A numeric attribute; one that is not a number is an error naming the file and the key."""
    value = f.attrs.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        fail(path, f"attrs/{key}", "a number", repr(value)[:60])


def _attrs(path, f) -> dict:
    version = _number_attr(path, f, "format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        fail(path, "attrs/format_version", f"<= {FORMAT_VERSION}",
             f"{int(version)} (written by a newer tessera)")
    sid = text_attr(f, "slide_id", Path(path).stem) or Path(path).stem
    return dict(slide_id=sid, patient=text_attr(f, "patient") or sid,
                encoder=text_attr(f, "encoder"),
                spot_pitch_um=_number_attr(path, f, "spot_pitch_um", float("nan")))


def _datasets(path, f, read: bool) -> dict:
    """The cache's keys of the data contract: strings read as numpy str arrays (files.h5_strings),
    numbers read (read=True) or left as h5py datasets; a key that is a group is an error naming
    it."""
    a = {}
    for k in ARRAY_KEYS:
        if k in f:
            x = dataset(path, f, k)
            text = h5py.check_string_dtype(x.dtype) or x.dtype.kind == "S"
            a[k] = h5_strings(x) if text else x[()] if read else x
    if "sub_extent_um" in f.attrs:
        a["attrs/sub_extent_um"] = _number_attr(path, f, "sub_extent_um", float("nan"))
    return a


def scan_slide(path) -> int:
    """Every check read_slide makes (_validate), reading the numeric arrays from the file in blocks
    of rows instead of holding the slide in memory: the checks before training, on every slide a run
    will read. Returns the number of non-integer values in `counts` (raw counts are integers)."""
    with open_h5(path) as f:
        return _validate(path, _datasets(path, f, read=False))


def _not_embeddings(path, f) -> None:
    """An embedding file (`embeddings`, as hest.py embed and HEST-Benchmark write them) where a
    cache was expected: the error says what builds caches from it."""
    if "features" not in f and "embeddings" in f:
        fail(path, "features", "a slide cache", "an embedding file (key 'embeddings'); build "
             "caches from it: python hest.py import-hest --st DIR --features "
             f"{Path(path).parent} --out DIR")


def read_slide(path, genes: list[str] | None = None, zero_fill: bool = False) -> Slide:
    """Read and validate one cache. `genes` selects and orders count columns; a gene the slide lacks
    is an error unless zero_fill=True (then its column is 0). Slides without counts ignore
    `genes`."""
    with open_h5(path) as f:
        _not_embeddings(path, f)
        a = _datasets(path, f, read=True)
        meta = _attrs(path, f)
    _validate(path, a)
    extent = a.pop("attrs/sub_extent_um", float("nan"))

    def dtype(k):
        half = k in ("features", "pseudo_features", "sub_features") and a[k].dtype == np.float16
        return np.float16 if half else np.float32
    t = {k: torch.from_numpy(np.ascontiguousarray(a[k], dtype=dtype(k)))
         for k in a if k not in STRING_KEYS + ("sub_valid",)}
    if "sub_valid" in a:
        t["sub_valid"] = torch.from_numpy(a["sub_valid"])
    genes_read = a["genes"].tolist() if "counts" in a else None
    slide = Slide(**meta, barcodes=a["barcodes"], genes=genes_read, sub_extent_um=extent, **t)
    return slide if genes is None else take_genes(slide, genes, zero_fill, path)


def case_hint(missing, have) -> str:
    """' (found X, which differs in case)' for the first missing name the slide has in another case:
    names are compared exactly everywhere (files.clashes)."""
    lower = {g.lower(): g for g in have}
    near = [(m, lower[m.lower()]) for m in missing if m.lower() in lower]
    return f" (found {near[0][1]!r} for {near[0][0]!r}: names differ in case)" if near else ""


def take_genes(slide: Slide, genes: list[str], zero_fill: bool = False, path=None) -> Slide:
    """The slide with its count columns (and `expected`, `sub_counts`) for `genes`, in that order; a
    gene the slide lacks is an error naming `path` unless zero_fill=True (then its column is 0). A
    slide without counts is returned as it is."""
    if slide.counts is None:
        return slide
    index = {g: i for i, g in enumerate(slide.genes)}
    missing = [g for g in genes if g not in index]
    if missing and not zero_fill:
        fail(path or slide.slide_id, "genes", f"all {len(genes)} requested genes",
             f"{len(missing)} missing: {listed(missing, 10)}{case_hint(missing, index)}"
             " (zero_fill=True fills them with zeros)")
    cols = torch.tensor([index.get(g, -1) for g in genes], dtype=torch.long)

    def pick(x):
        return None if x is None else torch.where(cols >= 0, x[..., cols.clamp(min=0)], 0.0)
    return dataclasses.replace(slide, genes=list(genes), counts=pick(slide.counts),
                               expected=pick(slide.expected), sub_counts=pick(slide.sub_counts))


@dataclass
class SlideMeta:
    slide_id: str
    patient: str
    n_spots: int
    n_features: int
    genes: list[str] | None        # None for a slide without counts
    spot_pitch_um: float
    encoder: str
    coords_extent: float = 0.0     # the larger spread (max - min) of x and y (0: all at one point)
    zero_library: int = 0          # spots whose library_size is 0 although their counts are not
    shared_position: int = 0       # spots at the position (x, y) of another spot
    library_size: bool = False     # the cache has library_size (data.normalize divides by it)
    sub_per_spot: int | None = None  # sub-patches per spot in sub_features; None without them


def read_slide_meta(path) -> SlideMeta:
    """Attributes, sizes and the gene list of a cache, reading only the (N,)- and (N, 2)-sized
    arrays (coords, library_size), never the features or the counts (fold building, checks before
    training)."""
    with open_h5(path) as f:
        _not_embeddings(path, f)
        a = {}
        for key in ARRAY_KEYS:
            if key in ("features", "coords") or key in f:
                required = key in ("features", "coords")
                dataset(path, f, key, "a dataset (required)" if required else "a dataset")
        if "counts" in f and "genes" not in f:
            fail(path, "genes", "a gene list beside 'counts'", "no such key")
        if f["features"].ndim != 2 or f["features"].shape[1] == 0:
            fail(path, "features", "shape (any, any) with at least one feature per spot",
                 f"shape {f['features'].shape}")
        n, c = f["features"].shape
        a["coords"] = f["coords"][()]
        _check(path, a, "coords", (n, 2), "float")
        zero = 0
        if "library_size" in f and "counts" in f:
            a["library_size"] = f["library_size"][()]
            _check(path, a, "library_size", (n,), "number")
            rows = np.flatnonzero(a["library_size"] == 0)
            if rows.size:   # the counts of those spots only
                zero = int((f["counts"][rows, :] > 0).any(1).sum())
        genes = None
        if "counts" in f and "genes" in f:
            a["genes"] = h5_strings(f["genes"])
            _check(path, a, "genes", (None,), "str")
            genes = a["genes"].tolist()
        extent = float(np.ptp(a["coords"], 0).max()) if n else 0.0
        _, at, many = np.unique(a["coords"], axis=0, return_inverse=True, return_counts=True)
        shared = int((many[at.reshape(-1)] > 1).sum())
        sub = f["sub_features"] if "sub_features" in f else None
        return SlideMeta(**_attrs(path, f), n_spots=n, n_features=c, genes=genes,
                         coords_extent=extent, zero_library=zero, shared_position=shared,
                         library_size="library_size" in f,
                         sub_per_spot=sub.shape[1] if sub is not None and sub.ndim == 3 else None)


def list_slides(root) -> list[Path]:
    """The slide caches of a dataset folder, sorted by name, hidden files left out; a folder a
    killed command left half written is refused (files.check_finished)."""
    root = Path(root)
    try:        # hidden files (macOS's ._<name>, a killed command's temporaries) are not caches
        paths = sorted(p for p in root.glob("*.h5") if not p.name.startswith(".")) \
            if root.is_dir() else []
    except (OSError, RuntimeError) as e:            # a link that loops
        raise FileNotFoundError(f"{root}: expected a folder of slide caches, found: {e}") from None
    if not paths:
        raise FileNotFoundError(f"{root}: expected slide caches *.h5, found none")
    check_finished(root)
    return paths


def check_slide_id(path, meta: SlideMeta) -> None:
    """A cache's attrs/slide_id is its file name: outputs are named after the file (a name the user
    chose by putting it there), never after a string inside it."""
    if meta.slide_id != Path(path).stem:
        fail(path, "attrs/slide_id", f"{Path(path).stem!r} (the file name)", repr(meta.slide_id))


# ----------------------------------------------------------------------------- genes and targets
def select_genes(counts: list, genes: list[str], n: int, by: str = "hvg") -> list[str]:
    """Top-n genes of the given slides' raw counts (list of (N_i, G) arrays sharing `genes`), best
    first. by='mean': mean raw count. by='hvg': scanpy's 'seurat' flavour: normalise each spot to
    1e4, log1p, mean and dispersion (var/mean) of the normalised counts, log, 20 equal-width bins of
    log1p(mean), dispersion z-scored within its bin (a bin with one gene scores 1); genes with zero
    dispersion never win."""
    parts = counts if isinstance(counts, (list, tuple)) else [counts]
    x = np.concatenate([_np(c).astype(np.float64) for c in parts])
    if x.shape[1] != len(genes):
        raise ValueError(f"select_genes: expected {len(genes)} count columns to match genes, found "
                         f"{x.shape[1]}")
    if by == "mean":
        score = x.mean(0)
    elif by == "hvg":
        total = x.sum(1, keepdims=True)
        # scanpy works on expm1(log data)
        x = np.expm1(np.log1p(x / np.where(total > 0, total, 1) * 1e4))
        mean, var = x.mean(0), x.var(0, ddof=1)
        mean[mean == 0] = 1e-12
        disp = var / mean
        disp[disp == 0] = np.nan
        disp, logmean = np.log(disp), np.log1p(mean)
        edges = np.linspace(logmean.min(), logmean.max(), 21)
        # pandas.cut: right-closed bins, widened left edge
        edges[0] -= (logmean.max() - logmean.min()) * 1e-3
        bins = np.clip(np.searchsorted(edges, logmean, side="left") - 1, 0, 19)
        score = np.full(len(genes), np.nan)
        for b in np.unique(bins):
            d = disp[bins == b]
            ok = d[~np.isnan(d)]
            if len(ok) > 1:
                avg, dev = ok.mean(), ok.std(ddof=1)
            else:
                avg, dev = 0.0, ok.mean() if len(ok) else np.nan
            score[bins == b] = (d - avg) / dev
    else:
        raise ValueError(f"select_genes: expected by='hvg' or 'mean', found {by!r}")
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return [genes[i] for i in order[:n] if not np.isnan(score[i])]


def shared_genes(gene_lists) -> list[str]:
    """The genes every list has, in the order of the first list (the genes a set of slides
    shares)."""
    gene_lists = [list(g) for g in gene_lists]
    if not gene_lists:
        return []
    others = [set(g) for g in gene_lists[1:]]
    return [g for g in gene_lists[0] if all(g in h for h in others)]


def log_targets(counts, library_size=None, normalize: bool = False) -> torch.Tensor:
    """Regression targets: log1p(counts), or log1p(counts / library_size * 1e4) when normalize."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    if not normalize:
        return torch.log1p(counts)
    lib = counts.sum(1) if library_size is None else \
        torch.as_tensor(library_size, dtype=torch.float32)
    return torch.log1p(counts / lib.clamp_min(1e-8)[:, None] * 1e4)


# ----------------------------------------------------------------------------- folds
def make_folds(slide_ids, patients, k: int, seed: int = 0, assign: str = "balanced"
               ) -> list[tuple[list[str], list[str]]]:
    """k folds grouped by patient (no patient in both train and test), each slide tested once.
    assign='balanced': patients are shuffled by `seed` and dealt, largest first, to the fold with
    fewest slides; 'kfold': scikit-learn's shuffled KFold over the sorted patients (MERGE, FEAST);
    'hist': HiST's split (kfold_groups, hist_groups). k=-1 gives leave-one-patient-out. `patients`
    is aligned with slide_ids, or a dict slide id -> patient; pass the slide ids themselves to split
    by slide."""
    ids = [str(s) for s in slide_ids]
    pat = [str(patients[s]) for s in ids] if isinstance(patients, dict) else \
        [str(p) for p in patients]
    if len(pat) != len(ids) or len(set(ids)) != len(ids):
        raise ValueError(f"make_folds: expected unique slide ids with one patient each, found "
                         f"{len(ids)} ids ({len(set(ids))} unique) and {len(pat)} patients")
    of = dict(sorted(zip(ids, pat)))
    people = sorted(set(pat))
    k = len(people) if k == -1 else k
    if k < 2 or k > len(people):
        raise ValueError(f"make_folds: expected 2 <= k <= {len(people)} (the number of patients) "
                         f"or k=-1, found k={k}")
    if assign in ("kfold", "hist"):
        tests = (kfold_groups if assign == "kfold" else hist_groups)(people, k, seed)
        return [([s for s in of if of[s] not in t], [s for s in of if of[s] in t])
                for t in map(set, tests)]
    if assign != "balanced":
        raise ValueError(f"make_folds: expected assign balanced, kfold or hist, found {assign!r}")
    rng = np.random.default_rng(seed)
    people = [people[i] for i in rng.permutation(len(people))]
    size = {p: sum(v == p for v in of.values()) for p in people}
    folds = [[] for _ in range(k)]
    for p in sorted(people, key=lambda p: -size[p]):  # stable: shuffled order breaks ties
        min(folds, key=lambda fold: sum(size[q] for q in fold)).append(p)
    return [([s for s in of if of[s] not in f], [s for s in of if of[s] in f]) for f in folds]


def kfold_groups(groups: list[str], k: int, seed: int) -> list[list[str]]:
    """The test groups of scikit-learn's KFold(n_splits=k, shuffle=True, random_state=seed) over the
    sorted group ids (MERGE and FEAST split their slide lists this way): a seeded permutation
    (numpy's legacy RandomState.shuffle) cut into k consecutive parts, the first n % k parts one
    longer."""
    ids = sorted(groups)
    if not 2 <= k <= len(ids):
        raise ValueError(f"folds: expected 2 <= k <= {len(ids)} (the number of groups), "
                         f"found k={k}")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = [len(ids) // k + (i < len(ids) % k) for i in range(k)]
    starts = np.cumsum([0] + sizes)
    return [sorted(ids[j] for j in order[starts[i]:starts[i + 1]]) for i in range(k)]


def hist_groups(groups: list[str], k: int, seed: int) -> list[list[str]]:
    """The test groups of HiST's split (its lib/utils/data.py): the slide list shuffled by numpy's
    global generator seeded with `seed` (HiST seeds 0), cut into k parts of n // k, the last taking
    the rest. HiST lists slide files in directory order; here the list is sorted, so the parts are
    reproducible."""
    ids = sorted(groups)
    if not 2 <= k <= len(ids):
        raise ValueError(f"folds: expected 2 <= k <= {len(ids)} (the number of groups), "
                         f"found k={k}")
    order = list(range(len(ids)))
    np.random.RandomState(seed).shuffle(order)
    size = len(ids) // k
    parts = [order[i * size:(i + 1) * size] if i < k - 1 else order[i * size:] for i in range(k)]
    return [sorted(ids[j] for j in part) for part in parts]


# ----------------------------------------------------------------------------- sub-spot inputs
def check_sub_levels(name, sub_levels: int, per_spot: int | None) -> None:
    """A slide (`name`) with `per_spot` sub-patches (None: no sub_features) can feed a model with
    `sub_levels` levels below the spot; an error naming the slide and the config key otherwise."""
    r = lattice.FACTOR ** sub_levels
    if sub_levels and per_spot != r * r:
        found = "none" if per_spot is None else f"{per_spot} per spot"
        raise CacheError(f"{name}: model.sub_levels = {sub_levels} needs sub_features with {r * r} "
                         f"sub-patches per spot ({r} x {r}: hest.py embed --sub {r}, hest.py bin "
                         f"--factor {r} or synthetic.py --sub {r}); found {found}")


def sub_inputs(slide: Slide, sub_levels: int) -> dict:
    """sub_features and sub_valid for a model with `sub_levels` levels below the spot; an error
    naming the slide and the config key when the cache does not have the r x r sub-patches it
    needs."""
    if not sub_levels:
        return {}
    sub = slide.sub_features
    check_sub_levels(slide.slide_id, sub_levels, None if sub is None else sub.shape[1])
    valid = slide.sub_valid if slide.sub_valid is not None else \
        torch.ones(sub.shape[:2], dtype=torch.bool)
    return {"sub_features": sub, "sub_valid": valid}


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    ap = argparse.ArgumentParser(prog="data.py",
                                 description="Gene lists from slide caches (DATA.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("genes", help="select genes on the given slides only and write "
                       "{\"genes\": [...]}")
    p.add_argument("--slides", required=True, help="folder of slide caches with counts")
    p.add_argument("--ids", nargs="*", help="only these slide ids (e.g. a fold's training slides)")
    p.add_argument("--n", type=int, default=250)
    p.add_argument("--by", choices=["hvg", "mean"], default="hvg")
    p.add_argument("--skip-empty", action="store_true",
                   help="leave out spots without counts (HiST's preprocessing)")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    a = ap.parse_args(argv)
    try:
        genes_command(a)
    except (ValueError, OSError) as e:  # the user's files or arguments: one line, no traceback
        raise SystemExit(" ".join(str(e).split())) from None


def genes_command(a):
    """`genes`: the top --n genes by --by on the chosen slides' counts, among the genes they all
    have. Every input is checked before --out is written; --out is never one of the slides."""
    if a.n < 1:
        raise ValueError(f"--n: expected an integer >= 1, found {a.n}")
    every = list_slides(a.slides)
    unknown = sorted(set(a.ids or []) - {p.stem for p in every})
    if unknown:
        raise ValueError(f"--ids: expected slide ids of {a.slides}, found no cache for "
                         f"{listed(unknown, 8)}")
    metas = {p: read_slide_meta(p) for p in every if not a.ids or p.stem in a.ids}
    paths = [p for p, m in metas.items() if m.genes]
    if not paths:
        raise ValueError(f"{a.slides}: no slide with counts{' among --ids' if a.ids else ''}")
    out = Path(a.out)
    with Outputs(out.parent, [out.name], a.overwrite, inputs=every, what="--out",
                 command=f"data.py genes --out {a.out}") as outputs:
        common = shared_genes([metas[p].genes for p in paths])
        counts = [read_slide(p, genes=common).counts for p in paths]
        if a.skip_empty:
            counts = [c[c.sum(1) > 0] for c in counts]
        chosen = select_genes(counts, common, a.n, a.by)
        outputs.path(out.name).write_text(json.dumps({"genes": chosen}, indent=1) + "\n")
    print(f"genes: {len(chosen)} by {a.by} from {len(paths)} slides ({len(common)} genes in "
          f"common) -> {a.out}")


if __name__ == "__main__":
    main()

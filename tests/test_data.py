"""Tests for data.py: cache format, h5ad reader, HEST import, placeholder encoder, gene selection,
folds, coordinate augmentation and synthetic slides. References are written independently here."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data
from data import CacheError, Slide

ROOT = Path(__file__).resolve().parents[1]
STR = h5py.string_dtype("utf-8")


# ----------------------------------------------------------------------------- helpers

def make_slide(n=7, c=5, g=4, m=3, seed=0) -> Slide:
    r = np.random.default_rng(seed)
    t = lambda *s: torch.from_numpy(r.standard_normal(s).astype(np.float32))  # noqa: E731
    counts = torch.from_numpy(r.poisson(3.0, (n, g)).astype(np.float32))
    return Slide("s1", t(n, c), t(n, 2) * 100, np.array([f"bc{i}" for i in range(n)]), patient="p1",
                 spot_pitch_um=100.0, encoder="enc", counts=counts, genes=[f"g{j}" for j in range(g)],
                 library_size=counts.sum(1) + 5, expected=counts + 0.5, pseudo_features=t(m, c),
                 pseudo_coords=t(m, 2))


def write_raw(path, arrays: dict, attrs=None):
    """A cache written with h5py alone, so that tests can build malformed files."""
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if isinstance(v, np.ndarray) and v.dtype.kind == "U":
                f.create_dataset(k, data=v.astype(object), dtype=STR)
            else:
                f[k] = v
        f.attrs.update(attrs or {"slide_id": "s1", "patient": "p1", "format_version": 1})


def raw_arrays(n=6, g=3):
    r = np.random.default_rng(1)
    return {"features": r.standard_normal((n, 4)).astype(np.float32),
            "coords": r.standard_normal((n, 2)).astype(np.float32),
            "barcodes": np.array([f"b{i}" for i in range(n)]),
            "counts": r.poisson(2.0, (n, g)).astype(np.float32),
            "genes": np.array([f"g{j}" for j in range(g)])}


# ----------------------------------------------------------------------------- cache format

def test_round_trip_is_exact(tmp_path):
    s = make_slide()
    data.write_slide(tmp_path / "s1.h5", s)
    r = data.read_slide(tmp_path / "s1.h5")
    for k in ("features", "coords", "counts", "library_size", "expected", "pseudo_features", "pseudo_coords"):
        assert getattr(r, k).dtype == torch.float32 and torch.equal(getattr(r, k), getattr(s, k)), k
    assert list(r.barcodes) == list(s.barcodes) and r.genes == s.genes
    assert (r.slide_id, r.patient, r.spot_pitch_um, r.encoder) == ("s1", "p1", 100.0, "enc")
    with h5py.File(tmp_path / "s1.h5") as f:
        assert f["counts"].compression == "gzip" and f["counts"].chunks is not None
        assert f.attrs["format_version"] == data.FORMAT_VERSION
    bare = Slide("bare", s.features, s.coords, s.barcodes)       # a slide to predict: no counts
    data.write_slide(tmp_path / "bare.h5", bare)
    r = data.read_slide(tmp_path / "bare.h5", genes=["g0"])
    assert r.counts is None and r.genes is None and r.patient == "bare" and math.isnan(r.spot_pitch_um)


def test_float16_features_stay_float16(tmp_path):
    """A cache with float16 features (Visium HD) reads back as float16, the rest as float32; every model
    standardises them in float32, so predictions equal those from the same values in float32."""
    from model import ModelConfig, build_model
    s = make_slide(n=40)
    s.features, s.pseudo_features = s.features.half(), s.pseudo_features.half()
    data.write_slide(tmp_path / "s1.h5", s)
    r = data.read_slide(tmp_path / "s1.h5")
    assert r.features.dtype == r.pseudo_features.dtype == torch.float16 and torch.equal(r.features, s.features)
    assert r.coords.dtype == r.counts.dtype == torch.float32
    for arch in ("tessera", "mlp", "ridge"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, dim=16, heads=2, depths=[1], decoder_depths=[])
        m = build_model(cfg, r.features.shape[1], 3).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(r.features, r.coords)["pred"], m(r.features.float(), r.coords)["pred"])


def test_write_refuses_overwrite_and_is_atomic(tmp_path):
    path = tmp_path / "s1.h5"
    data.write_slide(path, make_slide())
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        data.write_slide(path, make_slide(seed=1))
    bad = make_slide(seed=1)
    bad.features[0, 0] = float("nan")
    with pytest.raises(CacheError, match="features"):
        data.write_slide(path, bad, overwrite=True)          # rejected before anything is written
    assert torch.equal(data.read_slide(path).features, make_slide().features)
    data.write_slide(path, make_slide(seed=1), overwrite=True)
    assert torch.equal(data.read_slide(path).features, make_slide(seed=1).features)
    with pytest.raises(RuntimeError):
        with data.atomic_path(tmp_path / "x.h5") as tmp:
            Path(tmp).write_text("partial")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.h5"]


def _drop(key):
    return lambda a: a.pop(key)


def _set(key, value):
    return lambda a: a.__setitem__(key, value(a) if callable(value) else value)


def _poke(key, index, value):
    def f(a):
        a[key] = a[key].copy()
        a[key][index] = value
    return f


BAD = [  # (change to a valid file, key, what the message must say was expected, ... and found)
    (_drop("features"), "features", "a dataset (required)", "no such key"),
    (_drop("coords"), "coords", "a dataset (required)", "no such key"),
    (_drop("barcodes"), "barcodes", "a dataset (required)", "no such key"),
    (_set("features", lambda a: a["features"][:, 0]), "features", "shape (any, any)", "shape (6,)"),
    (_set("features", lambda a: a["features"].astype(np.int32)), "features", "float16/float32", "int32"),
    (_poke("features", (2, 1), np.nan), "features", "finite", "first at index (2, 1)"),
    (_poke("features", (0, 0), np.inf), "features", "finite", "1 bad values"),
    (_set("coords", lambda a: np.zeros((6, 3), np.float32)), "coords", "shape (6, 2)", "shape (6, 3)"),
    (_set("coords", lambda a: a["coords"][:5]), "coords", "shape (6, 2)", "shape (5, 2)"),
    (_set("coords", lambda a: np.full((6, 2), 1e39)), "coords", "finite float32", "12 bad values"),
    (_poke("barcodes", 3, "b0"), "barcodes", "unique values", "1 duplicated, e.g. 'b0'"),
    (_set("barcodes", lambda a: np.arange(6)), "barcodes", "utf-8 strings", "int64"),
    (_set("barcodes", lambda a: a["barcodes"][:4]), "barcodes", "shape (6,)", "shape (4,)"),
    (_drop("genes"), "genes", "a gene list beside 'counts'", "no such key"),
    (_poke("genes", 2, "g0"), "genes", "unique values", "'g0'"),
    (_set("counts", lambda a: a["counts"][:, :2]), "counts", "shape (6, 3)", "shape (6, 2)"),
    (_poke("counts", (1, 1), -2.0), "counts", "values >= 0", "first at index (1, 1)"),
    (_poke("counts", (4, 0), np.nan), "counts", "finite", "first at index (4, 0)"),
    (_set("library_size", lambda a: np.ones(5, np.float32)), "library_size", "shape (6,)", "shape (5,)"),
    (_set("expected", lambda a: -np.ones((6, 3), np.float32)), "expected", "values >= 0", "negative"),
    (_set("pseudo_features", lambda a: np.zeros((2, 4), np.float32)), "pseudo_coords", "together", "only one"),
    (lambda a: a.update(pseudo_features=np.zeros((2, 3), np.float32), pseudo_coords=np.zeros((2, 2), np.float32)),
     "pseudo_features", "shape (any, 4)", "shape (2, 3)"),
    (lambda a: a.update(pseudo_features=np.zeros((2, 4), np.float32), pseudo_coords=np.zeros((3, 2), np.float32)),
     "pseudo_coords", "shape (2, 2)", "shape (3, 2)"),
]


@pytest.mark.parametrize("change,key,expected,found", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_malformed_cache_is_rejected_with_a_clear_message(tmp_path, change, key, expected, found):
    a = raw_arrays()
    change(a)
    path = tmp_path / "bad.h5"
    write_raw(path, a)
    with pytest.raises(CacheError) as e:
        data.read_slide(path)
    msg = str(e.value)
    assert str(path) in msg and f"key '{key}'" in msg and expected in msg and found in msg, msg


def test_unreadable_files_are_rejected_with_a_clear_message(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CacheError, match=r"text\.h5: expected a readable HDF5"):
        data.read_slide(tmp_path / "text.h5")
    write_raw(tmp_path / "new.h5", raw_arrays(), {"format_version": 99})
    with pytest.raises(CacheError, match=r"new\.h5: key 'attrs/format_version': expected <= 1, found 99"):
        data.read_slide(tmp_path / "new.h5")
    with h5py.File(tmp_path / "group.h5", "w") as f:
        f.create_group("features")
    with pytest.raises(CacheError, match=r"group\.h5: key 'features': expected a dataset, found a group"):
        data.read_slide(tmp_path / "group.h5")


def test_gene_selection_on_read(tmp_path):
    path = tmp_path / "s1.h5"
    s = make_slide(g=4)
    data.write_slide(path, s)
    r = data.read_slide(path, genes=["g3", "g1"])
    assert r.genes == ["g3", "g1"] and torch.equal(r.counts, s.counts[:, [3, 1]])
    assert torch.equal(r.expected, s.expected[:, [3, 1]])
    want = ["g0"] + [f"x{i}" for i in range(12)]
    with pytest.raises(CacheError) as e:
        data.read_slide(path, genes=want)
    msg = str(e.value)
    assert "key 'genes'" in msg and "all 13 requested genes" in msg and "12 missing: x0, x1" in msg and "x9 ..." in msg
    r = data.read_slide(path, genes=["x0", "g2"], zero_fill=True)
    assert torch.equal(r.counts[:, 0], torch.zeros(7)) and torch.equal(r.counts[:, 1], s.counts[:, 2])
    t = data.take_genes(s, ["g2", "g0"])  # the same selection on a slide in memory (train.py: no re-read)
    assert t.genes == ["g2", "g0"] and torch.equal(t.counts, s.counts[:, [2, 0]])
    assert s.genes == [f"g{j}" for j in range(4)]  # the original is untouched
    with pytest.raises(CacheError, match="somewhere.h5: key 'genes'"):
        data.take_genes(s, ["x0"], path="somewhere.h5")


def test_meta_and_listing(tmp_path):
    for name in ("b", "a"):
        data.write_slide(tmp_path / f"{name}.h5", make_slide())
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in data.list_slides(tmp_path)] == ["a.h5", "b.h5"]
    m = data.read_slide_meta(tmp_path / "a.h5")
    assert (m.slide_id, m.patient, m.n_spots, m.n_features, m.genes) == ("s1", "p1", 7, 5, ["g0", "g1", "g2", "g3"])
    with pytest.raises(FileNotFoundError, match="found none"):
        data.list_slides(tmp_path / "empty")
    write_raw(tmp_path / "c.h5", {"coords": np.zeros((2, 2))})
    with pytest.raises(CacheError, match=r"c\.h5: key 'features': expected a dataset \(required\), found no such key"):
        data.read_slide_meta(tmp_path / "c.h5")


# ----------------------------------------------------------------------------- h5ad reader

def dense_from_csr(g):
    """Independent reference: fill a dense matrix row by row from the CSR arrays."""
    n, m = (int(v) for v in g.attrs["shape"])
    out = np.zeros((n, m), np.float64)
    data_, indices, indptr = g["data"][()], g["indices"][()], g["indptr"][()]
    for i in range(n):
        for j, v in zip(indices[indptr[i]:indptr[i + 1]], data_[indptr[i]:indptr[i + 1]]):
            out[i, j] += v
    return out


def test_h5ad_her2st_matches_csr_rebuilt_by_hand(shared_data):
    for sid in ("A1", "C3"):
        path = shared_data / "her2st" / "st" / f"{sid}.h5ad"
        h = data.read_h5ad(path)
        with h5py.File(path) as f:
            ref = dense_from_csr(f["X"])
            obs_index = [s.decode() for s in f["obs/_index"][()]]
            var_index = [s.decode() for s in f["var/_index"][()]]
            spatial = f["obsm/spatial"][()]
        assert np.array_equal(h.counts, ref.astype(np.float32))
        assert list(h.barcodes) == obs_index and h.genes == var_index
        assert np.array_equal(h.xy, spatial) and np.allclose(h.library_size, ref.sum(1))
        assert set(h.obs) == {"array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres"}
        pick = [var_index[5], var_index[0], var_index[-1]]
        sub = data.read_h5ad(path, genes=pick)
        assert sub.genes == pick and np.array_equal(sub.counts, ref[:, [5, 0, -1]].astype(np.float32))
        assert np.allclose(sub.library_size, ref.sum(1))  # library size is over all genes
    with pytest.raises(CacheError, match=r"key 'var': expected all 2 requested genes, found 1 missing: NOPE"):
        data.read_h5ad(path, genes=[var_index[0], "NOPE"])


def test_h5ad_dense_with_custom_index_and_obs_coordinates(shared_data):
    path = shared_data / "hest_samples" / "NCBI858.h5ad"
    h = data.read_h5ad(path)
    with h5py.File(path) as f:
        X = f["X"][()]
        cells = [s.decode() for s in f["obs/cell_id"][()]]
        x, y = f["obs/x_pixel"][()], f["obs/y_pixel"][()]
    assert h.counts.shape == (200, 338) and np.array_equal(h.counts, X.astype(np.float32))
    assert list(h.barcodes) == cells and np.array_equal(h.xy, np.stack([x, y], 1))
    assert h.obs["x_pixel"].shape == (200,)


def write_h5ad(path, X, obs_names, var_names, style, xy=None, group=None):
    """A small AnnData file in one of three on-disk encodings, written by hand with h5py."""
    with h5py.File(path, "w") as f:
        obs, var = f.create_group("obs"), f.create_group("var")
        if style == "current":       # anndata >= 0.8: CSR, string-array index, categorical group, obsm
            obs.attrs.update({"_index": "spot_id", "encoding-type": "dataframe"})
            obs.create_dataset("spot_id", data=np.array(obs_names, dtype=object), dtype=STR)
            var.attrs["_index"] = "_index"
            var.create_dataset("_index", data=np.array(var_names, dtype=object), dtype=STR)
            cat = obs.create_group("region")
            cat.attrs["encoding-type"] = "categorical"
            cats, codes = np.unique(group, return_inverse=True)
            cat.create_dataset("categories", data=cats.astype(object), dtype=STR)
            cat["codes"] = np.where(np.array(group) == "", -1, codes).astype(np.int8)
            rows, cols = np.nonzero(X)
            g = f.create_group("X")
            g.attrs.update({"encoding-type": "csr_matrix", "shape": X.shape})
            g["data"], g["indices"] = X[rows, cols].astype(np.float32), cols.astype(np.int32)
            g["indptr"] = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=X.shape[0]))]).astype(np.int64)
            f.create_group("obsm")["spatial"] = xy
        elif style == "legacy":      # anndata 0.7: old h5sparse CSC, vlen strings, codes + categories reference
            obs.attrs["_index"] = "index"
            obs.create_dataset("index", data=np.array(obs_names, dtype=object), dtype=h5py.string_dtype())
            var.attrs["_index"] = "index"
            var.create_dataset("index", data=np.array(var_names, dtype=object), dtype=h5py.string_dtype())
            cats, codes = np.unique(group, return_inverse=True)
            ref = obs.create_group("__categories").create_dataset("region", data=cats.astype(object),
                                                                   dtype=h5py.string_dtype())
            obs["region"] = codes.astype(np.int8)
            obs["region"].attrs["categories"] = ref.ref
            Xc = X.T
            rows, cols = np.nonzero(Xc)          # rows of X.T are columns of X
            g = f.create_group("X")
            g.attrs.update({"h5sparse_format": "csc", "h5sparse_shape": X.shape})
            g["data"], g["indices"] = Xc[rows, cols], cols.astype(np.int64)
            g["indptr"] = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=X.shape[1]))])
            obs["pxl_col_in_fullres"], obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
        else:                        # dense X, fixed-length byte strings, x/y columns
            obs.attrs["_index"] = "barcode"
            obs["barcode"] = np.array([s.encode() for s in obs_names], dtype="S")
            var.attrs["_index"] = "gene_ids"
            var["gene_ids"] = np.array([s.encode() for s in var_names], dtype="S")
            f["X"] = X.astype(np.int64)
            obs["x"], obs["y"] = xy[:, 0], xy[:, 1]
            obs["region"] = np.array(group, dtype="S")


@pytest.mark.parametrize("style", ["current", "legacy", "dense"])
def test_h5ad_encodings(tmp_path, style):
    r = np.random.default_rng(0)
    X = r.poisson(0.7, (9, 6)).astype(np.float64)
    barcodes, genes = [f"AC{i}-1" for i in range(9)], ["MT-1", "KRT5", "ÉPI", "CD74", "a", "b"]
    xy = r.uniform(0, 1000, (9, 2))
    group = ["tumour", "stroma", "tumour", "", "stroma", "tumour", "stroma", "stroma", "tumour"]
    if style != "current":
        group = [g or "stroma" for g in group]
    write_h5ad(tmp_path / "a.h5ad", X, barcodes, genes, style, xy, group)
    h = data.read_h5ad(tmp_path / "a.h5ad")
    assert np.array_equal(h.counts, X.astype(np.float32)) and h.counts.dtype == np.float32
    assert list(h.barcodes) == barcodes and h.genes == genes and np.allclose(h.xy, xy)
    assert np.array_equal(h.library_size, X.sum(1))
    decoded = [g if g is not None else "" for g in h.obs["region"]]
    assert decoded == group
    sub = data.read_h5ad(tmp_path / "a.h5ad", genes=["CD74", "MT-1"])
    assert np.array_equal(sub.counts, X[:, [3, 0]].astype(np.float32))


def _h5ad_del(key):
    return lambda f: f.__delitem__(key)


def _h5ad_attr(key, name, value):
    return lambda f: f[key].attrs.__setitem__(name, value)


def _h5ad_replace(key, value):
    def change(f):
        del f[key]
        f[key] = value
    return change


BAD_H5AD = [  # (change to a valid file, key, expected, found)
    (_h5ad_attr("X", "shape", (9, 7)), "X", "shape (9, 6) from obs and var", "(9, 7)"),
    (_h5ad_attr("X", "encoding-type", "coo_matrix"), "X", "dense, csr_matrix or csc_matrix", "'coo'"),
    (_h5ad_replace("obsm/spatial", np.zeros((9, 1))), "obsm/spatial", "shape (9, 2)", "(9, 1)"),
    (_h5ad_replace("var", np.zeros(3)), "var", "a dataframe group (anndata >= 0.7)", "a dataset"),
    (_h5ad_attr("obs/region", "encoding-type", "awkward-array"), "/obs/region", "an array or categorical",
     "encoding 'awkward-array'"),
]


@pytest.mark.parametrize("change,key,expected,found", BAD_H5AD, ids=[b[1] for b in BAD_H5AD])
def test_malformed_h5ad_is_rejected_with_a_clear_message(tmp_path, change, key, expected, found):
    path = tmp_path / "bad.h5ad"
    X = np.ones((9, 6))
    write_h5ad(path, X, [f"b{i}" for i in range(9)], list("abcdef"), "current", np.zeros((9, 2)), ["t"] * 9)
    with h5py.File(path, "a") as f:
        change(f)
    with pytest.raises(CacheError) as e:
        data.read_h5ad(path)
    msg = str(e.value)
    assert str(path) in msg and f"key '{key}'" in msg and expected in msg and found in msg, msg


# ----------------------------------------------------------------------------- small text formats

def test_hallmark_gmt(shared_data):
    hallmark = data.read_gmt(shared_data / "msigdb" / "h.all.v7.0.symbols.gmt")
    assert len(hallmark) == 50 and "JUNB" in hallmark["HALLMARK_TNFA_SIGNALING_VIA_NFKB"]
    assert sum(len(m) for m in hallmark.values()) > 4384      # 4,384 distinct genes, some in several sets


def test_gmt_gene_lists_and_split_files(tmp_path):
    (tmp_path / "bad.gmt").write_text("SET_A\turl\tG1\nSET_B\n")
    with pytest.raises(CacheError, match=r"bad\.gmt: line 2: expected 'name<TAB>url<TAB>genes...'"):
        data.read_gmt(tmp_path / "bad.gmt")
    (tmp_path / "g.json").write_text(json.dumps({"genes": ["A", "B"]}))
    (tmp_path / "g.txt").write_text("# header\nA\n\nB\n")
    assert data.read_gene_list(tmp_path / "g.json") == data.read_gene_list(tmp_path / "g.txt") == ["A", "B"]
    (tmp_path / "d.txt").write_text("A\nB\nA\n")
    with pytest.raises(CacheError, match=r"d\.txt: key 'genes': expected unique names, found duplicates \['A'\]"):
        data.read_gene_list(tmp_path / "d.txt")
    (tmp_path / "n.json").write_text(json.dumps({"genes": "A"}))
    with pytest.raises(CacheError, match=r"n\.json: key 'genes': expected a list of gene names, found str"):
        data.read_gene_list(tmp_path / "n.json")
    splits = tmp_path / "splits"
    splits.mkdir()
    for i, (tr, te) in enumerate([(["a", "b"], ["c"]), (["c"], ["a", "b"])]):
        (splits / f"train_{i}.csv").write_text("sample_id,patient\n" + "".join(f"{s},x\n" for s in tr))
        (splits / f"test_{i}.csv").write_text("sample_id\n" + "".join(f"{s}\n" for s in te))
    assert data.read_split_csvs(splits) == [(["a", "b"], ["c"]), (["c"], ["a", "b"])]
    (splits / "train_2.csv").write_text("sample_id\na\n")
    with pytest.raises(FileNotFoundError, match=r"test_2\.csv: expected beside its partner"):
        data.read_split_csvs(splits)
    (splits / "test_2.csv").write_text("id\na\n")
    with pytest.raises(CacheError, match=r"test_2\.csv: key 'sample_id': expected a column sample_id and rows"):
        data.read_split_csvs(splits)
    with pytest.raises(FileNotFoundError, match="expected train_0.csv"):
        data.read_split_csvs(tmp_path)
    (tmp_path / "m.csv").write_text("slide,patient\nx,y\n")
    with pytest.raises(CacheError, match=r"m\.csv: key 'id': expected a column id or sample_id"):
        data.read_metadata(tmp_path / "m.csv")


# ----------------------------------------------------------------------------- gene selection and targets

def hvg_reference(counts, n):
    """Seurat-flavour HVG written out step by step, one gene and one bin at a time."""
    x = counts.astype(np.float64)
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1e-300) * 10000.0)
    x = np.expm1(x)
    n_spots, n_genes = x.shape
    means, disps = [], []
    for j in range(n_genes):
        col = x[:, j]
        m = col.sum() / n_spots
        v = ((col - m) ** 2).sum() / (n_spots - 1)
        m = m if m != 0 else 1e-12
        d = v / m
        disps.append(math.log(d) if d != 0 else float("nan"))
        means.append(math.log1p(m))
    lo, hi = min(means), max(means)
    width = (hi - lo) / 20
    edges = [lo + i * width for i in range(21)]
    edges[0] = lo - (hi - lo) * 0.001
    bin_of = []
    for m in means:
        bin_of.append(next(b for b in range(20) if edges[b] < m <= edges[b + 1] or (b == 19 and m > edges[20])))
    score = {}
    for b in set(bin_of):
        members = [j for j in range(n_genes) if bin_of[j] == b]
        vals = [disps[j] for j in members if not math.isnan(disps[j])]
        if len(vals) > 1:
            avg = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - avg) ** 2 for v in vals) / (len(vals) - 1))
        else:
            avg, sd = 0.0, (vals[0] if vals else float("nan"))
        for j in members:
            score[j] = (disps[j] - avg) / sd
    ranked = sorted((j for j in score if not math.isnan(score[j])), key=lambda j: -score[j])
    return ranked[:n]


def test_hvg_matches_an_independent_implementation_on_her2st(shared_data):
    paths = [shared_data / "her2st" / "st" / f"{s}.h5ad" for s in ("B1", "B2", "B3")]
    genes = [data.read_h5ad(p, genes=[]).genes for p in paths[:0]] or None
    with h5py.File(paths[0]) as f:
        common = [s.decode() for s in f["var/_index"][()]]
    for p in paths[1:]:
        with h5py.File(p) as f:
            have = {s.decode() for s in f["var/_index"][()]}
        common = [g for g in common if g in have]
    counts = [data.read_h5ad(p, genes=common).counts for p in paths]
    chosen = data.select_genes(counts, common, 250, by="hvg")
    ref = [common[j] for j in hvg_reference(np.concatenate(counts), 250)]
    assert len(chosen) == 250 and genes is None
    assert len(set(chosen) & set(ref)) >= 245, len(set(chosen) & set(ref))
    top_mean = data.select_genes([torch.from_numpy(c) for c in counts], common, 10, by="mean")
    pooled = np.concatenate(counts).mean(0)
    assert top_mean == [common[j] for j in np.argsort(-pooled, kind="stable")[:10]]


def test_gene_selection_small_cases():
    r = np.random.default_rng(0)
    x = r.poisson(5.0, (200, 4)).astype(np.float32)
    x[:, 2] = r.choice([0, 60], 200)                      # bursty gene: the most variable
    x[:, 3] = 0                                           # silent gene: never chosen by hvg
    assert data.select_genes([x[:100], x[100:]], list("abcd"), 1, by="hvg") == ["c"]
    assert "d" not in data.select_genes(x, list("abcd"), 4, by="hvg")
    assert data.select_genes(x, list("abcd"), 2, by="mean")[0] == "c"
    with pytest.raises(ValueError, match="expected by='hvg' or 'mean', found 'var'"):
        data.select_genes(x, list("abcd"), 2, by="var")
    with pytest.raises(ValueError, match="expected 3 count columns to match genes, found 4"):
        data.select_genes(x, list("abc"), 2)


def test_log_targets():
    c = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    assert torch.allclose(data.log_targets(c), torch.log1p(c))
    assert torch.allclose(data.log_targets(c, normalize=True), torch.log1p(c / c.sum(1, keepdim=True) * 1e4))
    lib = torch.tensor([10.0, 4.0])
    assert torch.allclose(data.log_targets(c, lib, normalize=True), torch.log1p(c / lib[:, None] * 1e4))


# ----------------------------------------------------------------------------- folds

def test_folds_group_patients_and_are_seeded():
    ids = [f"s{i:02d}" for i in range(13)]
    patients = [f"p{i // 2}" for i in range(13)]          # 7 patients, 1-2 slides each
    of = dict(zip(ids, patients))
    for k in (2, 3, 7, -1):
        folds = data.make_folds(ids[::-1], patients[::-1], k, seed=1)
        assert len(folds) == (7 if k == -1 else k)
        tested = [s for _, te in folds for s in te]
        assert sorted(tested) == ids                     # every slide tested exactly once
        for tr, te in folds:
            assert not {of[s] for s in tr} & {of[s] for s in te} and sorted(tr + te) == ids
    assert data.make_folds(ids, patients, 3, 5) == data.make_folds(ids, dict(zip(ids, patients)), 3, 5)
    assert len({str(data.make_folds(ids, patients, 3, seed)) for seed in range(6)}) > 1
    sizes = [len(te) for _, te in data.make_folds(ids, patients, 3, 0)]
    assert max(sizes) - min(sizes) <= 2
    with pytest.raises(ValueError, match=r"expected 2 <= k <= 7 \(the number of patients\) or k=-1, found k=8"):
        data.make_folds(ids, patients, 8, 0)
    with pytest.raises(ValueError, match="found k=1"):
        data.make_folds(ids, patients, 1, 0)
    with pytest.raises(ValueError, match="expected unique slide ids"):
        data.make_folds(["a", "a"], ["p", "q"], 2, 0)


# ----------------------------------------------------------------------------- coordinate augmentation

def pairwise(xy):
    return torch.cdist(xy.double(), xy.double())


def test_augment_coords():
    xy = torch.rand(300, 2) * 5000
    keep, out = data.augment_coords(xy, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(keep, torch.arange(300)) and torch.equal(out, xy)
    angles = set()
    for seed in range(8):     # mirror and rotation only: distances and the centroid are preserved
        keep, out = data.augment_coords(xy, 1.0, torch.Generator().manual_seed(seed), p_drop=0.0, max_shear_deg=0)
        assert len(keep) == 300 and torch.allclose(pairwise(out), pairwise(xy), atol=0.05)
        assert torch.allclose(out.mean(0), xy.mean(0), atol=0.05)
        v0, v1 = xy[1] - xy[0], out[1] - out[0]
        angles.add(round(math.degrees(math.atan2(v1[1], v1[0]) - math.atan2(v0[1], v0[0])) % 360 / 45))
    assert len(angles) > 2
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = data.augment_coords(xy, 0.7, g1), data.augment_coords(xy, 0.7, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    keep, out = data.augment_coords(xy, 1.0, torch.Generator().manual_seed(1), max_rot_deg=0, max_shear_deg=15)
    assert keep.dtype == torch.long and out.shape == (len(keep), 2) and 150 < len(keep) < 300
    assert torch.equal(keep, keep.sort().values)
    sheared = [not torch.allclose(pairwise(data.augment_coords(xy, 1.0, torch.Generator().manual_seed(s), p_drop=0)[1]),
                                  pairwise(xy), atol=0.05) for s in range(4)]
    assert any(sheared)
    keep, out = data.augment_coords(xy[:3], 1.0, torch.Generator().manual_seed(0), p_drop=1.0)
    assert len(keep) == 1 and out.shape == (1, 2)


# ----------------------------------------------------------------------------- placeholder encoder

def test_patch_statistics_against_a_direct_computation():
    r = np.random.default_rng(0)
    img = r.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    img[1] = 255                                              # a blank (white) patch
    f = data.patch_statistics(torch.from_numpy(img))
    assert f.shape == (3, 48) and f.dtype == torch.float32 and torch.isfinite(f).all()
    half = img.astype(np.float64).reshape(3, 8, 2, 12, 2, 3).mean((2, 4)) / 255   # 2x2 average, (B, 8, 12, 3)
    assert np.allclose(f[:, :3].numpy(), half.mean((1, 2)), atol=1e-5)             # whole-patch RGB means
    assert np.allclose(f[:, 8:11].numpy(), half.std((1, 2)), atol=1e-3)            # ... and stds
    quads = half.reshape(3, 2, 4, 2, 6, 3).mean((2, 4)).reshape(3, 4, 3)          # 2x2 grid cell means
    assert np.allclose(f[:, 24:27].numpy(), quads.std(1, ddof=1), atol=1e-4)       # heterogeneity between cells
    assert f[1, 7] == 1.0 and f[1, 5] == 0.0 and f[1, 16:].abs().max() < 1e-3      # background 1, no gradient


def test_embed_custom_encoder_and_errors(tmp_path, monkeypatch):
    patches, out = tmp_path / "patches", tmp_path / "emb"
    patches.mkdir()
    with h5py.File(patches / "s1.h5", "w") as f:
        f["img"] = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
        f["coords"] = np.arange(10).reshape(5, 2)
        f["barcode"] = np.array([[f"b{i}".encode()] for i in range(5)])
    (tmp_path / "my_encoder.py").write_text(
        "import torch\ndef mean_rgb(x):\n    return x.float().mean((1, 2))\n")
    monkeypatch.chdir(tmp_path)
    lines = []
    data.embed_patches(patches, out, encoder="my_encoder:mean_rgb", batch_size=2, log=lines.append)
    with h5py.File(out / "s1.h5") as f:
        with h5py.File(patches / "s1.h5") as p:
            assert np.allclose(f["embeddings"][()], p["img"][()].astype(np.float32).mean((1, 2)))
            assert np.array_equal(f["coords"][()], p["coords"][()])
        assert list(f["barcodes"].asstr()[()]) == [f"b{i}" for i in range(5)]
        assert f.attrs["encoder"] == "my_encoder:mean_rgb"
    assert "s1: 5 patches -> 3 features" in lines[0]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        data.embed_patches(patches, out, log=lines.append)
    with pytest.raises(ValueError, match="expected 'module:callable', found 'my_encoder'"):
        data.load_encoder("my_encoder")
    with h5py.File(patches / "s1.h5", "a") as f:
        del f["barcode"]
    with pytest.raises(CacheError, match=r"s1\.h5: key 'barcode': expected a dataset \(HEST patches file\)"):
        data.embed_patches(patches, tmp_path / "emb2", log=lines.append)


# ----------------------------------------------------------------------------- HEST import

def test_embed_and_import_her2st_end_to_end(shared_data, tmp_path, capsys):
    her2st = shared_data / "her2st"
    t0 = time.time()
    data.main(["embed", "--patches", str(her2st / "patches"), "--out", str(tmp_path / "emb")])
    seconds = time.time() - t0
    data.main(["import-hest", "--st", str(her2st / "st"), "--features", str(tmp_path / "emb"),
               "--out", str(tmp_path / "caches"), "--meta", str(her2st / "metadata.csv")])
    out = capsys.readouterr().out
    assert "B4: 283 spots matched, 0 only in st, 0 only in features" in out, out
    paths = data.list_slides(tmp_path / "caches")
    assert [p.stem for p in paths] == ["B4", "C2", "C3", "C4", "C5", "C6"] and seconds < 60
    s = data.read_slide(paths[0])
    meta = data.read_metadata(her2st / "metadata.csv")["B4"]
    h = data.read_h5ad(her2st / "st" / "B4.h5ad")
    assert (s.patient, s.spot_pitch_um, s.features.shape) == ("B", 200.0, (283, 48))
    with h5py.File(her2st / "patches" / "B4.h5") as f:
        assert list(s.barcodes) == [b[0].decode() for b in f["barcode"][()]]   # same spots, h5ad order
    assert list(s.barcodes) == list(h.barcodes) and s.genes == h.genes
    assert torch.allclose(s.coords, torch.from_numpy(h.xy * float(meta["pixel_size_um_estimated"])).float())
    assert torch.equal(s.counts, torch.from_numpy(h.counts)) and torch.equal(s.library_size, s.counts.sum(1))
    d = torch.cdist(s.coords, s.coords) + torch.eye(283) * 1e9
    assert 150 < d.min(1).values.median() < 250               # ST spots ~200 um apart once in micrometres
    assert torch.isfinite(s.features).all() and (s.features.std(0) > 0).all()


def test_import_hest_joins_by_barcode_and_reports(tmp_path):
    st, feats, out = tmp_path / "st", tmp_path / "feats", tmp_path / "out"
    st.mkdir(), feats.mkdir()
    r = np.random.default_rng(0)
    X = r.poisson(2.0, (10, 5)).astype(np.float64)
    xy = r.uniform(0, 500, (10, 2))
    genes = ["A", "B", "C", "D", "E"]
    write_h5ad(st / "s1.h5ad", X, [f"b{i}" for i in range(10)], genes, "current", xy, ["t"] * 10)
    feature_barcodes = [f"b{i}" for i in (5, 2, 11, 7, 3, 4, 12, 6, 8, 9, 10)]   # b0, b1 missing; 3 extra
    emb = r.standard_normal((11, 4)).astype(np.float32)
    with h5py.File(feats / "s1.h5", "w") as f:
        f["embeddings"], f["coords"] = emb, np.zeros((11, 2))
        f["barcodes"] = np.array([[b.encode()] for b in feature_barcodes])        # (N, 1) bytes, as HEST
    with h5py.File(feats / "lonely.h5", "w") as f:
        f["embeddings"], f["barcodes"] = emb, np.array([b.encode() for b in feature_barcodes])
    (tmp_path / "meta.csv").write_text("id,patient,pixel_size_um_estimated,inter_spot_dist\ns1,P7,0.5,100\n")
    (tmp_path / "genes.txt").write_text("C\nA\nZZ\n")
    lines = []
    paths = data.import_hest(st, feats, out, tmp_path / "meta.csv", genes=tmp_path / "genes.txt", log=lines.append)
    assert "lonely: skipped, no expression file" in lines[0]
    assert lines[1].startswith("s1: 8 spots matched, 2 only in st, 3 only in features; 2 genes (1 of the list missing)")
    s = data.read_slide(paths[0])
    rows = [feature_barcodes.index(f"b{i}") for i in range(2, 10)]
    assert list(s.barcodes) == [f"b{i}" for i in range(2, 10)] and s.genes == ["C", "A"]
    assert torch.equal(s.features, torch.from_numpy(emb[rows]))
    assert torch.allclose(s.coords, torch.from_numpy(xy[2:] * 0.5).float())
    assert torch.equal(s.counts, torch.from_numpy(X[2:][:, [2, 0]]).float())
    assert torch.equal(s.library_size, torch.from_numpy(X[2:].sum(1)).float())   # over all genes
    assert (s.patient, s.spot_pitch_um) == ("P7", 100.0)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        data.import_hest(st, feats, out, log=lines.append)
    lines.clear()
    (paths,) = [data.import_hest(st, feats, tmp_path / "out2", max_genes=2, log=lines.append)]
    s = data.read_slide(paths[0])
    top = [genes[j] for j in np.argsort(-X.sum(0), kind="stable")[:2]]
    assert s.genes == top and s.patient == "s1" and math.isnan(s.spot_pitch_um)
    assert "no pixel_size_um_estimated, coords stay in pixels" in lines[1]
    with h5py.File(feats / "s1.h5", "a") as f:
        del f["embeddings"]
    with pytest.raises(CacheError, match=r"s1\.h5: key 'embeddings': expected a dataset"):
        data.import_hest(st, feats, tmp_path / "out3", log=lines.append)


# ----------------------------------------------------------------------------- synthetic slides

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The demo dataset (12 slides of ~1,500 spots), generated once and timed."""
    out = tmp_path_factory.mktemp("synth")
    cpu, wall = time.process_time(), time.time()
    paths = data.make_synthetic(out, log=lambda s: None)
    return out, paths, time.process_time() - cpu, time.time() - wall


def test_synthetic_dataset_is_fast_valid_and_grouped(synth):
    out, paths, cpu_seconds, wall_seconds = synth
    assert cpu_seconds < 10, f"12 slides took {cpu_seconds:.1f} s of CPU ({wall_seconds:.1f} s wall)"
    assert len(paths) == 12 and data.list_slides(out) == paths
    slides = [data.read_slide(p) for p in paths]              # read_slide validates every key
    assert all(1275 <= s.n_spots <= 1725 and s.features.shape[1] == 64 and len(s.genes) == 300 for s in slides)
    assert all(s.expected is not None and torch.equal(s.library_size, s.counts.sum(1)) for s in slides)
    per_patient = {}
    for s in slides:
        per_patient[s.patient] = per_patient.get(s.patient, 0) + 1
    assert sorted(per_patient.values()) == [2, 2, 2, 3, 3]     # slides grouped 2-3 per patient
    s = slides[0]
    d = torch.cdist(s.coords, s.coords) + torch.eye(s.n_spots) * 1e9
    nearest = d.min(1).values
    assert abs(nearest.median() - 100) < 3 and ((d < 103).sum(1) == 6).float().mean() > 0.7   # hexagonal, 100 um
    lib = s.library_size
    assert lib.std() / lib.mean() > 0.2                        # library size varies from spot to spot
    slide_means = torch.stack([t.features.mean(0) for t in slides])
    assert slide_means.std(0).mean() > 0.3                     # a per-slide stain shift on the features
    programs = data.read_gmt(out / "programs.gmt")
    assert 10 <= len(programs) <= 20 and all(set(m) <= set(s.genes) for m in programs.values())
    member = {g for m in programs.values() for g in m}
    assert 0.05 < 1 - len(member) / 300 < 0.3                  # some genes belong to no program
    meta = data.read_metadata(out / "metadata.csv")
    assert meta["synth_00"]["patient"] == s.patient


def r2_held_out(x, y, train):
    """Least squares (normal equations) with an intercept on the train spots; R^2 per column on the others."""
    x1 = np.c_[x, np.ones(len(x))]
    beta = np.linalg.solve(x1[train].T @ x1[train] + 1e-6 * np.eye(x1.shape[1]), x1[train].T @ y[train])
    res = y[~train] - x1[~train] @ beta
    return 1 - (res ** 2).sum(0) / ((y[~train] - y[~train].mean(0)) ** 2).sum(0)


def test_synthetic_neighbourhood_signal_is_real(synth):
    """For 'neigh' programs the spot's own features explain little of the expected expression and the
    mean of the neighbours' features (within two rings) explains much more; 'local' programs are
    mostly explained by the spot's own features."""
    out, paths, _, _ = synth
    programs = data.read_gmt(out / "programs.gmt")
    for path in paths[:2]:
        s = data.read_slide(path)
        x, xy = s.features.double().numpy(), s.coords.double().numpy()
        dist = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
        ring = (dist > 0) & (dist <= 2.1 * s.spot_pitch_um)
        neighbours = ring @ x / ring.sum(1, keepdims=True).clip(1)
        y = np.log(s.expected.double().numpy())
        train = np.random.default_rng(0).random(len(x)) < 0.5
        for kind, own_range, min_gain in (("NEIGH", (0.0, 0.45), 0.3), ("LOCAL", (0.5, 1.0), 0.0)):
            cols = [s.genes.index(g) for name, m in programs.items() if f"_{kind}_" in name for g in m]
            own = r2_held_out(x, y[:, cols], train).mean()
            both = r2_held_out(np.c_[x, neighbours], y[:, cols], train).mean()
            assert own_range[0] < own < own_range[1] and both > own + min_gain, (kind, own, both)


def test_synthetic_is_deterministic_and_has_layouts(tmp_path):
    kw = dict(n_slides=2, n_spots=200, n_genes=40, n_features=16, log=lambda s: None)
    a = data.make_synthetic(tmp_path / "a", seed=3, pseudo=True, **kw)
    b = data.make_synthetic(tmp_path / "b", seed=3, pseudo=True, **kw)
    c = data.make_synthetic(tmp_path / "c", seed=4, pseudo=True, **kw)
    for pa, pb in zip(a, b):
        sa, sb = data.read_slide(pa), data.read_slide(pb)
        for k in ("features", "coords", "counts", "expected", "pseudo_features", "pseudo_coords"):
            assert torch.equal(getattr(sa, k), getattr(sb, k)), k
    assert (tmp_path / "a" / "programs.gmt").read_text() == (tmp_path / "b" / "programs.gmt").read_text()
    assert not torch.equal(data.read_slide(a[0]).features[:5], data.read_slide(c[0]).features[:5])
    s = data.read_slide(a[0])
    assert s.pseudo_features.shape[1] == 16 and 0.5 * s.n_spots < len(s.pseudo_coords) < 2 * s.n_spots
    gap = torch.cdist(s.pseudo_coords, s.coords).min(1).values
    assert ((gap > 40) & (gap < 70)).all()                      # triangle centres: 100 / sqrt(3) um away
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        data.make_synthetic(tmp_path / "a", seed=3, **kw)
    for layout, pitch in (("square", 200.0), ("hd", 8.0)):
        p = data.make_synthetic(tmp_path / layout, layout=layout, pseudo=True, **dict(kw, n_slides=1))
        s = data.read_slide(p[0])
        d = torch.cdist(s.coords, s.coords) + torch.eye(s.n_spots) * 1e9
        assert s.spot_pitch_um == pitch and abs(d.min(1).values.median() / pitch - 1) < 0.05
        assert ((d < 1.05 * pitch).sum(1) == 4).float().mean() > 0.6    # square lattice
        gap = torch.cdist(s.pseudo_coords, s.coords).min(1).values / pitch
        assert ((gap > 0.6) & (gap < 0.8)).all()                # square centres: pitch / sqrt(2) away


# ----------------------------------------------------------------------------- command line

def test_command_line(tmp_path, synth):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "data.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path)
    r = run("synth", "--out", "ds", "--slides", "2", "--spots", "150", "--seed", "1", "--layout", "square")
    assert r.returncode == 0 and "synth: 2 slides" in r.stdout, r.stderr
    assert len(data.list_slides(tmp_path / "ds")) == 2
    r = run("import-hest", "--help")
    assert r.returncode == 0 and "--max-genes" in r.stdout and "--meta" in r.stdout
    out, paths, _, _ = synth
    ids = [p.stem for p in paths[:3]]
    data.main(["genes", "--slides", str(out), "--n", "25", "--by", "hvg", "--out", str(tmp_path / "g.json"),
               "--ids", *ids])
    chosen = data.read_gene_list(tmp_path / "g.json")
    counts = [data.read_slide(p).counts for p in paths[:3]]
    assert chosen == data.select_genes(counts, data.read_slide_meta(paths[0]).genes, 25, "hvg")


def test_import_and_embed_error_paths(tmp_path):
    st, feats = tmp_path / "st", tmp_path / "feats"
    st.mkdir(), feats.mkdir()
    X = np.ones((4, 2))
    write_h5ad(st / "s1.h5ad", X, ["a", "b", "c", "d"], ["G1", "G2"], "current", np.zeros((4, 2)), ["t"] * 4)

    def features(barcodes, n_rows=None):
        with h5py.File(feats / "s1.h5", "w") as f:
            f["embeddings"] = np.zeros((n_rows or len(barcodes), 3), np.float32)
            f["barcodes"] = np.array([b.encode() for b in barcodes])
    lines = []
    features(["a", "b", "c"], n_rows=2)
    with pytest.raises(CacheError, match=r"s1\.h5: key 'embeddings': expected shape \(3, C\), one row per barcode"):
        data.import_hest(st, feats, tmp_path / "o1", log=lines.append)
    features(["a", "a", "b"])
    with pytest.raises(CacheError, match=r"s1\.h5: key 'barcodes': expected unique barcodes, found 1 duplicates"):
        data.import_hest(st, feats, tmp_path / "o2", log=lines.append)
    features(["x-1", "y-1"])
    assert data.import_hest(st, feats, tmp_path / "o3", log=lines.append) == []
    assert lines[-1].endswith("skipped (check that barcodes use the same format)")
    with h5py.File(st / "s1.h5ad", "a") as f:
        del f["obsm"]
    with pytest.raises(CacheError, match=r"s1\.h5ad: key 'obsm/spatial': expected spot centres"):
        data.import_hest(st, feats, tmp_path / "o4", log=lines.append)
    with pytest.raises(FileNotFoundError, match=r"expected embedding files \*\.h5, found none"):
        data.import_hest(st, tmp_path / "none", tmp_path / "o5", log=lines.append)
    patches = tmp_path / "patches"
    patches.mkdir()
    with h5py.File(patches / "p.h5", "w") as f:
        f["img"], f["coords"] = np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 2))
        f["barcode"] = np.array([b"a", b"b"])
    with pytest.raises(CacheError, match=r"p\.h5: key 'img': expected uint8 \(N, H, W, 3\), found float32 \(2, 8, "):
        data.embed_patches(patches, tmp_path / "e", log=lines.append)
    with pytest.raises(FileNotFoundError, match=r"expected HEST patch files \*\.h5, found none"):
        data.embed_patches(tmp_path / "st", tmp_path / "e", log=lines.append)
    for call in (lambda: data.embed_patches(patches, patches, overwrite=True),
                 lambda: data.import_hest(st, feats, feats, overwrite=True)):
        with pytest.raises(ValueError, match="expected an output folder other than the inputs, found an input"):
            call()


# ----------------------------------------------------------------------------- paper protocols

def test_slide_lists_expand_the_printed_ranges_and_counts():
    lists = data.read_slide_lists(ROOT / "configs/protocols/hist_slides.yaml")
    assert lists["kidney"][:4] == ["NCBI538", "NCBI539", "NCBI540", "NCBI562"] and "NCBI599" in lists["kidney"]
    assert lists["heart"][35:37] == ["MISC136", "MISC138"]            # MISC137 is not in Table 4
    assert sum(map(len, lists.values())) == 14 + 41 + 41 + 34 + 14 + 20 + 27 + 59 + 15 + 104 + 4
    path, ids = data.dataset_slides("hist:lung_ncbi")
    assert ids == ["NCBI534", "NCBI535", "NCBI536", "NCBI537"] and path.name == "hist_slides.yaml"
    with pytest.raises(CacheError, match=r"expected a dataset 'lung'; it has \["):
        data.dataset_slides("hist:lung")


def test_slide_lists_refuse_a_slide_in_two_datasets_and_a_wrong_count(tmp_path):
    p = tmp_path / "x_slides.yaml"
    p.write_text("a: {n: 3, slides: [S1-S3]}\nb: {n: 2, slides: [S3, S9]}\n")
    with pytest.raises(CacheError, match=r"x_slides\.yaml: slides listed in two datasets \(b and a\): S3"):
        data.read_slide_lists(p)
    p.write_text("a: {n: 4, slides: [S1-S3]}\n")
    with pytest.raises(CacheError, match=r"x_slides\.yaml: a: expected 4 slides as printed, found 3"):
        data.read_slide_lists(p)
    p.write_text("a: {slides: [S3-T5]}\n")
    with pytest.raises(CacheError, match=r"expected an id range like NCBI628-NCBI641, found 'S3-T5'"):
        data.read_slide_lists(p)


@pytest.mark.parametrize("n,k,seed", [(36, 8, 3927), (12, 8, 3927), (68, 8, 3927), (9, 4, 1)])
def test_kfold_groups_are_scikit_learns_shuffled_kfold(n, k, seed):
    ids = [f"s{i:03d}" for i in range(n)][::-1]                       # any order in: sorted inside
    # reference: sklearn's KFold(shuffle=True) = a RandomState permutation cut into k consecutive parts,
    # the first n % k one longer, each part's ids in index order
    perm = np.random.RandomState(seed).permutation(n)
    expect, start = [], 0
    for i in range(k):
        size = n // k + (1 if i < n % k else 0)
        expect.append([sorted(ids)[j] for j in sorted(perm[start:start + size])])
        start += size
    assert data.kfold_groups(ids, k, seed) == expect
    try:
        from sklearn.model_selection import KFold
    except ImportError:
        return
    s = np.array(sorted(ids))
    assert [s[t].tolist() for _, t in KFold(k, shuffle=True, random_state=seed).split(s)] == expect


@pytest.mark.parametrize("n,k", [(14, 4), (41, 4), (4, 4), (15, 4)])
def test_hist_groups_are_hists_split(n, k):
    ids = [f"NCBI{600 + i}" for i in range(n)]
    # reference: HiST's lib/utils/data.py split_datasets with numpy's global generator seeded 0
    np.random.seed(0)
    shuffled = sorted(ids)
    np.random.shuffle(shuffled)
    size = len(shuffled) // k
    expect = [sorted(shuffled[i * size:(i + 1) * size] if i < k - 1 else shuffled[i * size:]) for i in range(k)]
    assert data.hist_groups(ids, k, 0) == expect
    folds = data.make_folds(ids, ids, k, 0, assign="hist")
    assert [te for _, te in folds] == expect and all(not set(tr) & set(te) for tr, te in folds)


def test_make_folds_by_slide_and_by_patient_with_kfold():
    ids = [f"{p}{i}" for p in "ABCDEFGH" for i in range(1, 4)]
    by_patient = data.make_folds(ids, [s[0] for s in ids], 4, 3927, assign="kfold")
    tests = [te for _, te in by_patient]
    assert sorted(s for t in tests for s in t) == sorted(ids)
    assert all(len({s[0] for s in t}) == 2 and len(t) == 6 for t in tests)      # whole patients
    expect = data.kfold_groups(list("ABCDEFGH"), 4, 3927)
    assert [sorted({s[0] for s in t}) for t in tests] == expect
    with pytest.raises(ValueError, match="expected assign balanced, kfold or hist"):
        data.make_folds(ids, ids, 4, 0, assign="random")


def spcs_reference(E, grid, alpha, beta, tau_p, tau_s, n_pcs, hexagonal):
    """SPCS written from its definition: eigen-decomposed covariance, explicit loops over spot pairs."""
    N = len(E)
    Ec = E - E.mean(0)
    evals, evecs = np.linalg.eigh(Ec.T @ Ec)
    V = evecs[:, ::-1][:, :n_pcs]
    S = Ec @ V
    for c in range(S.shape[1]):
        if S[np.argmax(np.abs(S[:, c])), c] < 0:
            S[:, c] = -S[:, c]
    pattern, spatial = np.zeros_like(E), np.zeros_like(E)
    t = 2 * tau_s if hexagonal else tau_s
    for i in range(N):
        cand = []
        for j in range(N):
            if j != i:
                d = 1 - np.corrcoef(S[i], S[j])[0, 1]
                if d <= 1:
                    cand.append((-math.exp(-4.5 * d * d), j))
        chosen = sorted(cand)[:tau_p]
        total = sum(-w for w, _ in chosen)
        pattern[i] = sum(-w * E[j] for w, j in chosen) / (total + 1e-8)
        near = [(1 / dist, j) for j in range(N)
                if 0 < (dist := abs(grid[i][0] - grid[j][0]) + abs(grid[i][1] - grid[j][1])) <= t]
        total = sum(w for w, _ in near)
        spatial[i] = sum(w * E[j] for w, j in near) / (total + 1e-8)
    return (1 - alpha) * E + alpha * (beta * spatial + (1 - beta) * pattern)


@pytest.mark.parametrize("tau_p,tau_s,hexagonal,chunk", [(16, 2, False, 2048), (5, 1, True, 7), (100, 3, False, 13)])
def test_spcs_matches_its_definition(tau_p, tau_s, hexagonal, chunk):
    r = np.random.default_rng(tau_p)
    sites = r.choice(12 * 12, 60, replace=False)
    grid = np.stack([sites // 12, sites % 12], 1)
    E = np.log1p(r.poisson(r.gamma(1.0, 3.0, (1, 15)) * r.gamma(2.0, 0.5, (60, 1)), (60, 15)).astype(float))
    got = data.spcs(E, grid, 0.6, 0.4, tau_p, tau_s, 10, hexagonal, chunk=chunk)
    np.testing.assert_allclose(got, spcs_reference(E, grid, 0.6, 0.4, tau_p, tau_s, 10, hexagonal), atol=1e-10)
    with pytest.raises(ValueError, match="expected unique grid positions, found 1 repeated"):
        data.spcs(E[:3], np.array([[0, 0], [0, 1], [0, 1]]))


def test_eight_neighbour_mean_and_minmax_rescale():
    r = np.random.default_rng(3)
    grid = np.array([[0, 0], [0, 1], [1, 1], [3, 3], [2, 2]])
    x = r.normal(size=(5, 4))
    expect = np.stack([x[[j for j in range(5) if np.abs(grid[j] - grid[i]).max() <= 1]].mean(0) for i in range(5)])
    np.testing.assert_allclose(data.eight_neighbour_mean(x, grid), expect)
    x[:, 2] = 7.0                                                   # a constant column maps to lo
    y = data.minmax_to_range(x, -1.0, 2.0)
    for c in (0, 1, 3):
        np.testing.assert_allclose(y[:, c], -1 + 3 * (x[:, c] - x[:, c].min()) / (x[:, c].max() - x[:, c].min()))
    assert (y[:, 2] == -1).all()


def test_harmonised_h5ad_sums_renamed_genes_and_repeated_barcodes(tmp_path):
    p = tmp_path / "h.h5ad"
    var = np.array(["GRCh38_ERBB2", "erbb2", "ENSG00000141736.14", "human-ACTB", "AC012345.1"])
    obs = np.array(["b1", "b2", "b1"])
    X = np.array([[1, 2, 0, 4, 1], [0, 1, 3, 0, 0], [5, 0, 1, 1, 2]], dtype=np.float32)
    with h5py.File(p, "w") as f:
        f.create_dataset("X", data=X)
        for name, index in (("obs", obs), ("var", var)):
            g = f.create_group(name)
            g.attrs["_index"] = "_index"
            g.create_dataset("_index", data=index.astype(object), dtype=STR)
        f.create_dataset("obsm/spatial", data=np.array([[0, 0], [1, 0], [9, 9]], dtype=np.float64))
    assert data.harmonise_gene_names(var) == ["ERBB2", "ERBB2", "ENSG00000141736", "ACTB", "AC012345"]
    h = data.read_h5ad(p, harmonise=True)
    assert h.genes == ["ERBB2", "ENSG00000141736", "ACTB", "AC012345"] and list(h.barcodes) == ["b1", "b2"]
    np.testing.assert_array_equal(h.counts, [[1 + 2 + 5 + 0, 0 + 1, 4 + 1, 1 + 2], [0 + 1, 3, 0, 0]])
    np.testing.assert_array_equal(h.library_size, [8 + 9, 4])
    np.testing.assert_array_equal(h.xy, [[0, 0], [1, 0]])
    h = data.read_h5ad(p, genes=["ACTB"], harmonise=True)
    np.testing.assert_array_equal(h.counts, [[5], [0]])
    assert data.read_h5ad(p).genes == list(var)                       # without harmonise: names as stored

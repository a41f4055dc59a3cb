"""Tests for data.py: cache format, small text formats, gene selection and targets, folds, command
line. References are written independently here."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data
import files
import hest
import synthetic
from data import CacheError, Slide

ROOT = Path(__file__).resolve().parents[1]
STR = h5py.string_dtype("utf-8")


# ----------------------------------------------------------------------------- helpers

def make_slide(n=7, c=5, g=4, m=3, seed=0) -> Slide:
    r = np.random.default_rng(seed)
    t = lambda *s: torch.from_numpy(r.standard_normal(s).astype(np.float32))  # noqa: E731
    counts = torch.from_numpy(r.poisson(3.0, (n, g)).astype(np.float32))
    return Slide("s1", t(n, c), t(n, 2) * 100, np.array([f"bc{i}" for i in range(n)]), patient="p1",
                 spot_pitch_um=100.0, encoder="enc", counts=counts,
                 genes=[f"g{j}" for j in range(g)], library_size=counts.sum(1) + 5,
                 expected=counts + 0.5, pseudo_features=t(m, c), pseudo_coords=t(m, 2))


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
    for k in ("features", "coords", "counts", "library_size", "expected", "pseudo_features",
              "pseudo_coords"):
        assert getattr(r, k).dtype == torch.float32 and torch.equal(getattr(r, k), getattr(s, k)), k
    assert list(r.barcodes) == list(s.barcodes) and r.genes == s.genes
    assert (r.slide_id, r.patient, r.spot_pitch_um, r.encoder) == ("s1", "p1", 100.0, "enc")
    with h5py.File(tmp_path / "s1.h5") as f:
        assert f["counts"].compression == "gzip" and f["counts"].chunks is not None
        assert f.attrs["format_version"] == data.FORMAT_VERSION
    bare = Slide("bare", s.features, s.coords, s.barcodes)       # a slide to predict: no counts
    data.write_slide(tmp_path / "bare.h5", bare)
    r = data.read_slide(tmp_path / "bare.h5", genes=["g0"])
    assert (r.counts is None and r.genes is None and r.patient == "bare"
            and math.isnan(r.spot_pitch_um))


def test_float16_features_stay_float16(tmp_path):
    """A cache with float16 features (Visium HD) reads back as float16, the rest as float32; every
    model standardises them in float32, so predictions equal those from the same values in
    float32."""
    from model import ModelConfig, build_model
    s = make_slide(n=40)
    s.features, s.pseudo_features = s.features.half(), s.pseudo_features.half()
    data.write_slide(tmp_path / "s1.h5", s)
    r = data.read_slide(tmp_path / "s1.h5")
    assert (r.features.dtype == r.pseudo_features.dtype == torch.float16
            and torch.equal(r.features, s.features))
    assert r.coords.dtype == r.counts.dtype == torch.float32
    for arch in ("tessera", "mlp", "ridge"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, dim=16, heads=2, depths=[1], decoder_depths=[])
        m = build_model(cfg, r.features.shape[1], 3).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(r.features, r.coords)["pred"],
                                       m(r.features.float(), r.coords)["pred"])


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
        with files.atomic_path(tmp_path / "x.h5") as tmp:
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
    (_set("features", lambda a: a["features"].astype(np.int32)), "features",
     "float16/float32", "int32"),
    (_poke("features", (2, 1), np.nan), "features", "finite", "first at index (2, 1)"),
    (_poke("features", (0, 0), np.inf), "features", "finite", "1 bad values"),
    (_set("coords", lambda a: np.zeros((6, 3), np.float32)), "coords", "shape (6, 2)",
     "shape (6, 3)"),
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
    (_set("library_size", lambda a: np.ones(5, np.float32)), "library_size", "shape (6,)",
     "shape (5,)"),
    (_set("expected", lambda a: -np.ones((6, 3), np.float32)), "expected",
     "values >= 0", "negative"),
    (_set("pseudo_features", lambda a: np.zeros((2, 4), np.float32)), "pseudo_coords",
     "together", "only one"),
    (lambda a: a.update(pseudo_features=np.zeros((2, 3), np.float32),
                        pseudo_coords=np.zeros((2, 2), np.float32)),
     "pseudo_features", "shape (any, 4)", "shape (2, 3)"),
    (lambda a: a.update(pseudo_features=np.zeros((2, 4), np.float32),
                        pseudo_coords=np.zeros((3, 2), np.float32)),
     "pseudo_coords", "shape (2, 2)", "shape (3, 2)"),
]


@pytest.mark.parametrize("change,key,expected,found", BAD,
                         ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_malformed_cache_is_rejected_with_a_clear_message(tmp_path, change, key, expected, found):
    a = raw_arrays()
    change(a)
    path = tmp_path / "bad.h5"
    write_raw(path, a)
    with pytest.raises(CacheError) as e:
        data.read_slide(path)
    msg = str(e.value)
    assert str(path) in msg and f"key '{key}'" in msg and expected in msg and found in msg, msg


def sub_arrays(n=6, g=3, S=4):
    a = raw_arrays(n, g)
    r = np.random.default_rng(2)
    a["sub_features"] = r.standard_normal((n, S, 4)).astype(np.float32)
    a["sub_valid"] = r.random((n, S)) < 0.7
    a["sub_valid"][:, 1] = True
    a["sub_counts"] = r.poisson(1.0, (n, S, g)).astype(np.float32)
    return a


SUB_ATTRS = {"slide_id": "s1", "patient": "p1", "format_version": 1, "sub_extent_um": 55.0}
BAD_SUB = [  # sub-spot keys (HiFusion / binned data): change, key, expected, found
    (_set("sub_features", lambda a: a["sub_features"][:, :3]), "sub_features",
     "shape (6, 4 or 16, 4)", "shape (6, 3, 4)"),
    (_set("sub_features", lambda a: np.zeros((6, 9, 4), np.float32)), "sub_features", "4 or 16",
     "shape (6, 9, 4)"),
    (_set("sub_features", lambda a: a["sub_features"][..., :3]), "sub_features", "as many features",
     "shape (6, 4, 3)"),
    (_set("sub_features", lambda a: a["sub_features"][:5]), "sub_features", "shape (6, 4 or 16, 4)",
     "shape (5, 4, 4)"),
    (_poke("sub_features", (3, 2, 1), np.nan), "sub_features", "finite",
     "first at index (3, 2, 1)"),
    (_poke("sub_valid", (4, slice(None)), False), "sub_valid", "at least one valid sub-position",
     "first spot 4"),
    (_set("sub_valid", lambda a: a["sub_valid"].astype(np.uint8)), "sub_valid",
     "bool shape (6, 4)", "uint8"),
    (_set("sub_counts", lambda a: a["sub_counts"][..., :2]), "sub_counts", "shape (6, 4, 3)",
     "shape (6, 4, 2)"),
    (_poke("sub_counts", (0, 0, 0), -1.0), "sub_counts", "values >= 0", "negative"),
    (_drop("sub_features"), "sub_features", "a dataset beside", "no such key"),
]


@pytest.mark.parametrize("change,key,expected,found", BAD_SUB,
                         ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_SUB)])
def test_malformed_sub_spot_keys_are_rejected_with_a_clear_message(tmp_path, change, key,
                                                                   expected, found):
    a = sub_arrays()
    change(a)
    path = tmp_path / "bad.h5"
    write_raw(path, a, SUB_ATTRS)
    with pytest.raises(CacheError) as e:
        data.read_slide(path)
    msg = str(e.value)
    assert str(path) in msg and f"key '{key}'" in msg and expected in msg and found in msg, msg


def test_sub_spot_keys_round_trip_and_follow_gene_selection(tmp_path):
    a = sub_arrays(S=16)
    a["sub_valid"] = np.ones((6, 16), bool)
    write_raw(tmp_path / "ok.h5", a, SUB_ATTRS)
    s = data.read_slide(tmp_path / "ok.h5")
    assert s.sub_valid.dtype == torch.bool and s.sub_extent_um == 55.0
    assert torch.equal(s.sub_features, torch.from_numpy(a["sub_features"]))
    data.write_slide(tmp_path / "again.h5", s)
    r = data.read_slide(tmp_path / "again.h5", genes=["g2", "g0"])
    assert torch.equal(r.sub_counts, torch.from_numpy(a["sub_counts"][..., [2, 0]]))
    assert torch.equal(r.sub_valid, s.sub_valid) and r.sub_extent_um == 55.0
    write_raw(tmp_path / "noext.h5", a)                      # sub-patches without their extent
    with pytest.raises(CacheError, match=r"noext\.h5: key 'attrs/sub_extent_um'"):
        data.read_slide(tmp_path / "noext.h5")
    half = dict(a, sub_features=a["sub_features"].astype(np.float16),
                features=a["features"].astype(np.float16))
    write_raw(tmp_path / "half.h5", half, SUB_ATTRS)
    assert data.read_slide(tmp_path / "half.h5").sub_features.dtype == torch.float16


def test_unreadable_files_are_rejected_with_a_clear_message(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CacheError, match=r"text\.h5: expected a readable HDF5"):
        data.read_slide(tmp_path / "text.h5")
    write_raw(tmp_path / "new.h5", raw_arrays(), {"format_version": 99})
    with pytest.raises(CacheError,
                       match=r"new\.h5: key 'attrs/format_version': expected <= 1, found 99"):
        data.read_slide(tmp_path / "new.h5")
    with h5py.File(tmp_path / "group.h5", "w") as f:
        f.create_group("features")
    with pytest.raises(CacheError,
                       match=r"group\.h5: key 'features': expected a dataset, found a group"):
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
    assert ("key 'genes'" in msg and "all 13 requested genes" in msg and "12 missing: x0, x1" in msg
            and "x9 ..." in msg)
    r = data.read_slide(path, genes=["x0", "g2"], zero_fill=True)
    assert (torch.equal(r.counts[:, 0], torch.zeros(7))
            and torch.equal(r.counts[:, 1], s.counts[:, 2]))
    # the same selection on a slide in memory (train.py: no re-read)
    t = data.take_genes(s, ["g2", "g0"])
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
    assert ((m.slide_id, m.patient, m.n_spots, m.n_features, m.genes)
            == ("s1", "p1", 7, 5, ["g0", "g1", "g2", "g3"]))
    xy = make_slide().coords.numpy()
    assert m.coords_extent == pytest.approx(
        max(xy[:, 0].max() - xy[:, 0].min(), xy[:, 1].max() - xy[:, 1].min()))
    s = make_slide()
    s.counts[1] = 0
    s.library_size[:3] = 0                      # spots 0 and 2 have counts, spot 1 has none
    data.write_slide(tmp_path / "z.h5", s)
    assert data.read_slide_meta(tmp_path / "z.h5").zero_library == 2 and m.zero_library == 0
    with pytest.raises(FileNotFoundError, match="found none"):
        data.list_slides(tmp_path / "empty")
    write_raw(tmp_path / "c.h5", {"coords": np.zeros((2, 2))})
    with pytest.raises(CacheError, match=r"c\.h5: key 'features': expected a dataset \(required\), "
                                         r"found no such key"):
        data.read_slide_meta(tmp_path / "c.h5")


# ----------------------------------------------------------------------------- small text formats

def test_hallmark_gmt(shared_data):
    hallmark = files.read_gmt(shared_data / "msigdb" / "h.all.v7.0.symbols.gmt")
    assert len(hallmark) == 50 and "JUNB" in hallmark["HALLMARK_TNFA_SIGNALING_VIA_NFKB"]
    # 4,384 distinct genes, some in several sets
    assert sum(len(m) for m in hallmark.values()) > 4384


def test_gmt_gene_lists_and_split_files(tmp_path):
    (tmp_path / "bad.gmt").write_text("SET_A\turl\tG1\nSET_B\n")
    with pytest.raises(CacheError, match=r"bad\.gmt: line 2: expected 'name<TAB>url<TAB>genes...'"):
        files.read_gmt(tmp_path / "bad.gmt")
    (tmp_path / "g.json").write_text(json.dumps({"genes": ["A", "B"]}))
    (tmp_path / "g.txt").write_text("# header\nA\n\nB\n")
    assert (files.read_gene_list(tmp_path / "g.json") == files.read_gene_list(tmp_path / "g.txt")
            == ["A", "B"])
    (tmp_path / "d.txt").write_text("A\nB\nA\n")
    with pytest.raises(CacheError, match=r"d\.txt: key 'genes': expected unique names, found "
                                         r"duplicates 'A' twice"):
        files.read_gene_list(tmp_path / "d.txt")
    (tmp_path / "n.json").write_text(json.dumps({"genes": "A"}))
    with pytest.raises(CacheError,
                       match=r"n\.json: key 'genes': expected a list of gene names, found str"):
        files.read_gene_list(tmp_path / "n.json")
    splits = tmp_path / "splits"
    splits.mkdir()
    for i, (tr, te) in enumerate([(["a", "b"], ["c"]), (["c"], ["a", "b"])]):
        (splits / f"train_{i}.csv").write_text("sample_id,patient\n"
                                               + "".join(f"{s},x\n" for s in tr))
        (splits / f"test_{i}.csv").write_text("sample_id\n" + "".join(f"{s}\n" for s in te))
    assert files.read_split_csvs(splits) == [(["a", "b"], ["c"]), (["c"], ["a", "b"])]
    (splits / "train_2.csv").write_text("sample_id\na\n")
    with pytest.raises(FileNotFoundError, match=r"test_2\.csv: expected beside its partner"):
        files.read_split_csvs(splits)
    (splits / "test_2.csv").write_text("id\na\n")
    with pytest.raises(CacheError,
                       match=r"test_2\.csv: key 'sample_id': expected a column sample_id and rows"):
        files.read_split_csvs(splits)
    with pytest.raises(FileNotFoundError, match="expected train_0.csv"):
        files.read_split_csvs(tmp_path)
    (tmp_path / "m.csv").write_text("slide,patient\nx,y\n")
    with pytest.raises(CacheError, match=r"m\.csv: key 'id': expected a column id or sample_id"):
        files.read_metadata(tmp_path / "m.csv")


# ----------------------------------------------------------------------- gene selection and targets

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
        bin_of.append(next(b for b in range(20)
                           if edges[b] < m <= edges[b + 1] or (b == 19 and m > edges[20])))
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
    genes = [files.read_h5ad(p, genes=[]).genes for p in paths[:0]] or None
    with h5py.File(paths[0]) as f:
        common = [s.decode() for s in f["var/_index"][()]]
    for p in paths[1:]:
        with h5py.File(p) as f:
            have = {s.decode() for s in f["var/_index"][()]}
        common = [g for g in common if g in have]
    counts = [files.read_h5ad(p, genes=common).counts for p in paths]
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
    assert torch.allclose(data.log_targets(c, normalize=True),
                          torch.log1p(c / c.sum(1, keepdim=True) * 1e4))
    lib = torch.tensor([10.0, 4.0])
    assert torch.allclose(data.log_targets(c, lib, normalize=True),
                          torch.log1p(c / lib[:, None] * 1e4))


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
    assert (data.make_folds(ids, patients, 3, 5)
            == data.make_folds(ids, dict(zip(ids, patients)), 3, 5))
    assert len({str(data.make_folds(ids, patients, 3, seed)) for seed in range(6)}) > 1
    sizes = [len(te) for _, te in data.make_folds(ids, patients, 3, 0)]
    assert max(sizes) - min(sizes) <= 2
    with pytest.raises(ValueError,
                       match=r"expected 2 <= k <= 7 \(the number of patients\) or k=-1, found k=8"):
        data.make_folds(ids, patients, 8, 0)
    with pytest.raises(ValueError, match="found k=1"):
        data.make_folds(ids, patients, 1, 0)
    with pytest.raises(ValueError, match="expected unique slide ids"):
        data.make_folds(["a", "a"], ["p", "q"], 2, 0)


@pytest.mark.parametrize("n,k,seed", [(36, 8, 3927), (12, 8, 3927), (68, 8, 3927), (9, 4, 1)])
def test_kfold_groups_are_scikit_learns_shuffled_kfold(n, k, seed):
    ids = [f"s{i:03d}" for i in range(n)][::-1]                       # any order in: sorted inside
    # reference: sklearn's KFold(shuffle=True) = a RandomState permutation cut into k consecutive
    # parts, the first n % k one longer, each part's ids in index order
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
    expect = [sorted(shuffled[i * size:(i + 1) * size] if i < k - 1 else shuffled[i * size:])
              for i in range(k)]
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


# ----------------------------------------------------------------------------- command line

def test_sub_inputs_name_the_slide_and_the_config_key():
    s = make_slide()
    assert data.sub_inputs(s, 0) == {}
    with pytest.raises(ValueError, match=r"s1: model\.sub_levels = 1 needs sub_features with 4 "
                                         r"sub-patches.*found none"):
        data.sub_inputs(s, 1)
    s.sub_features, s.sub_extent_um = torch.zeros(7, 16, 5), 50.0
    with pytest.raises(ValueError, match=r"sub_levels = 1 needs .* found 16 per spot"):
        data.sub_inputs(s, 1)
    got = data.sub_inputs(s, 2)
    assert got["sub_valid"].shape == (7, 16) and got["sub_valid"].all()


def test_genes_command_line(tmp_path):
    paths = synthetic.make_synthetic(tmp_path / "ds", n_slides=4, n_spots=200, n_genes=60,
                                     log=lambda s: None)
    ids = [p.stem for p in paths[:3]]
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "genes", "--slides", "ds", "--n",
                        "25", "--by", "hvg", "--out", "g.json", "--ids", *ids], capture_output=True,
                       text=True, cwd=tmp_path)
    assert (r.returncode == 0
            and "genes: 25 by hvg from 3 slides (60 genes in common)" in r.stdout), r.stderr
    chosen = files.read_gene_list(tmp_path / "g.json")
    counts = [data.read_slide(p).counts for p in paths[:3]]
    assert chosen == data.select_genes(counts, data.read_slide_meta(paths[0]).genes, 25, "hvg")
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "genes", "--slides", "ds", "--n",
                        "0", "--out", "h.json"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert (r.returncode == 1 and r.stderr == "--n: expected an integer >= 1, found 0\n"
            and not (tmp_path / "h.json").exists())


def test_each_command_is_in_the_file_that_does_the_work(capsys):
    """data.py runs `genes` only: the cache-building commands are hest.py's and synthetic.py's, not
    forwarded."""
    for cmd in ("synth", "bin", "embed", "import-hest"):
        with pytest.raises(SystemExit) as e:
            data.main([cmd, "--out", "x"])
        assert e.value.code == 2 and f"invalid choice: '{cmd}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data.main(["--help"])
    listed = capsys.readouterr().out
    assert ("    genes " in listed
            and not any(f"    {n} " in listed for n in ("embed", "import-hest", "bin", "synth")))
    with pytest.raises(SystemExit):
        hest.main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {name} " in listed for name in ("embed", "import-hest", "bin")), listed


def test_shared_genes_keep_the_first_lists_order():
    assert data.shared_genes([["c", "a", "b"], ["a", "b", "c", "d"], ["b", "c"]]) == ["c", "b"]
    assert data.shared_genes([["a"]]) == ["a"] and data.shared_genes([]) == []


def test_a_full_disk_in_atomic_path_names_the_file_and_keeps_the_old_one(tmp_path):
    import errno
    path = tmp_path / "x.h5"
    path.write_bytes(b"old")
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  OSError("Can't write data (file write failed: errno = 28, error message = 'No "
                          "space left on device')")):
        with pytest.raises(files.DiskFull, match=r"x\.h5: disk full"):
            with files.atomic_path(path) as tmp:
                tmp.write_bytes(b"partial")
                raise error
        assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.h5"]
    with pytest.raises(PermissionError):                 # any other error passes through as it is
        with files.atomic_path(path):
            raise PermissionError(13, "denied")


# ----------------------------------------------------------------------------- one writing helper
def test_outputs_refuse_names_links_inputs_and_existing_files(tmp_path):
    out = tmp_path / "out"
    for bad, why in (("../x.h5", "a path"), ("", "empty"), ("..", "'.' or '..'"), (".x.h5",
                                                                                   "hidden"),
                     ("a\\b", "a path"), ("a\x00b", "control"), ("x" * 201, "longer than 200")):
        with pytest.raises(CacheError, match="expected a plain file name") as e:
            files.Outputs(out, ["ok.h5", bad])
        assert why in str(e.value)
    for names, found in ((["a.h5", "a.h5"], "'a.h5' twice"), (["A.h5", "a.h5"], "differ only in "
                                                                                "case")):
        with pytest.raises(CacheError, match=found):
            files.Outputs(out, names)
    out.mkdir()
    (out / "mine.h5").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"mine\.h5: already exists \(1 of the 2 "
                                              r"outputs.*--overwrite"):
        files.Outputs(out, ["new.h5", "mine.h5"])
    (tmp_path / "target").write_bytes(b"theirs")
    (out / "link.h5").symlink_to(tmp_path / "target")
    for overwrite in (False, True):
        with pytest.raises(CacheError, match=r"link\.h5: found a symbolic link"):
            files.Outputs(out, ["link.h5"], overwrite)
    with pytest.raises(ValueError, match=r"mine\.h5: --out: expected an output that is not one of "
                                         r"the inputs"):
        files.Outputs(out, ["mine.h5"], True, inputs=[out / "mine.h5"])
    with pytest.raises(ValueError, match="expected an output folder other than the inputs"):
        files.Outputs(out, ["x.h5"], inputs=[tmp_path / "out"])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plots").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CacheError, match=r"plots: found a symbolic link"):
        files.Outputs(tmp_path / "run" / "plots", ["a.png"], named=tmp_path / "run")
    # the folder the user named may be a link
    files.Outputs(tmp_path / "run" / "plots", ["a.png"])
    assert (tmp_path / "target").read_bytes() == b"theirs"
    assert (out / "mine.h5").read_bytes() == b"mine"


def test_outputs_write_all_or_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with files.Outputs(out, ["x.txt", "y.txt"]) as o:
            o.path("x.txt").write_text("x")
            assert not out.exists()                       # a new folder appears whole, at the end
            raise RuntimeError("the second input is bad")
    # nothing left, not even the folders it made
    assert not (tmp_path / "a").exists()
    with files.Outputs(out, ["x.txt", "y.txt"]) as o:
        o.path("x.txt").write_text("x")
        o.path("y.txt").write_text("y")
        with pytest.raises(ValueError, match="not one of the outputs"):
            o.path("z.txt")
    assert sorted(p.name for p in out.iterdir()) == ["x.txt",
                                                     "y.txt"] and (out / "y.txt").read_text() == "y"
    with files.Outputs(out, ["x.txt"], overwrite=True) as o:
        o.path("x.txt").write_text("new")
        assert (out / "x.txt").read_text() == "x"         # an existing folder: replaced at the end
    assert (out / "x.txt").read_text() == "new" and sorted(p.name for p in tmp_path.rglob("*")) == \
        ["a", "b", "x.txt", "y.txt"]


KILLED_COMMIT = """
import os, sys
sys.path.insert(0, {root!r})
import files
renames = []
def replace(a, b):
    renames.append(b)
    if len(renames) == 3:      # the marker, then the first output: killed before the second
        os._exit(9)
    os.rename(a, b)
files.os.replace = replace
with files.Outputs({out!r}, ["a.h5", "b.h5"], command="demo.py") as o:
    o.path("a.h5").write_text("a")
    o.path("b.h5").write_text("b")
"""


def test_a_kill_during_the_renames_is_refused_by_readers_and_finished_by_the_same_command(tmp_path):
    out = tmp_path / "out"
    out.mkdir()                         # an existing folder: its outputs are renamed one by one
    code = KILLED_COMMIT.format(root=str(Path(__file__).resolve().parents[1]), out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert (out / "a.h5").exists() and not (out / "b.h5").exists()
    assert (out / files.WRITING).exists()
    with pytest.raises(CacheError, match=r"out is unfinished: `demo.py` was interrupted"):
        data.list_slides(out)                             # a reader does not take half a dataset
    with pytest.raises(CacheError, match="unfinished"):
        files.Outputs(out, ["a.h5", "b.h5"], command="other.py")
    notes = []
    with files.Outputs(out, ["a.h5", "b.h5"], command="demo.py", log=notes.append) as o:
        o.path("a.h5").write_text("a")
        o.path("b.h5").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "b.h5"]
    assert any("was interrupted while renaming" in n for n in notes)
    assert any("removed 1 unfinished file(s)" in n for n in notes)   # b.h5's pending file


def test_atomic_path_refuses_a_link_and_keeps_the_mode_a_new_file_gets(tmp_path):
    (tmp_path / "target").write_bytes(b"theirs")
    (tmp_path / "x.h5").symlink_to(tmp_path / "target")
    with pytest.raises(CacheError, match="symbolic link"):
        with files.atomic_path(tmp_path / "x.h5") as tmp:
            tmp.write_bytes(b"mine")
    assert (tmp_path / "target").read_bytes() == b"theirs"
    with files.atomic_path(tmp_path / "y.h5") as tmp:
        tmp.write_bytes(b"y")
    (tmp_path / "z").write_bytes(b"z")                    # as open() would create it (umask)
    assert (tmp_path / "y.h5").stat().st_mode == (tmp_path / "z").stat().st_mode


# ----------------------------------------------------------------------------- one decoding of text
def test_text_is_read_one_way_bom_line_endings_and_bytes_that_are_not_utf8(tmp_path):
    body = "# genes\nACTB\nERBB2 \n\n GAPDH\n"
    for name, raw in (("unix.txt", body.encode()), ("bom.txt", b"\xef\xbb\xbf" + body.encode()),
                      ("crlf.txt", body.replace("\n", "\r\n").encode()),
                      ("cr.txt", body.replace("\n", "\r").encode())):
        (tmp_path / name).write_bytes(raw)
        assert files.read_gene_list(tmp_path / name) == ["ACTB", "ERBB2", "GAPDH"], name
    (tmp_path / "latin1.txt").write_bytes(b"ACTB\nCAF\xc9\n")
    with pytest.raises(CacheError, match=r"latin1\.txt: line 2, column 4: expected UTF-8 text, "
                                         r"found byte "
                       r"0xc9"):
        files.read_gene_list(tmp_path / "latin1.txt")
    (tmp_path / "u16.txt").write_bytes("ACTB\n".encode("utf-16"))
    with pytest.raises(CacheError, match="UTF-16"):
        files.read_gene_list(tmp_path / "u16.txt")
    (tmp_path / "g.json").write_bytes(b'\xef\xbb\xbf{"genes": ["ACTB", " ERBB2"]}\r\n')
    assert files.read_gene_list(tmp_path / "g.json") == ["ACTB", "ERBB2"]
    for text, found in (('{"genes": ["A",]}', "line 1, column 16: expected JSON"),
                        ('["A", null]', "None at position 1"), ('["A", "a"]',
                                                                "differ only in case"),
                        ('["A", "A "]', "'A' twice")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(CacheError, match=found):
            files.read_gene_list(tmp_path / "bad.json")


def test_gmt_and_csv_are_read_as_every_text_is(tmp_path):
    (tmp_path / "s.gmt").write_bytes(b"\xef\xbb\xbfSET_A\turl\tG1\tG2 \tG1\r\nSET_B\turl\tG3\r\n")
    assert files.read_gmt(tmp_path / "s.gmt") == {"SET_A": ["G1", "G2"], "SET_B": ["G3"]}
    (tmp_path / "t.gmt").write_text("SET_A\turl\tG1\nset_a\turl\tG2\n")
    with pytest.raises(CacheError, match=r"t\.gmt: line 2: expected each gene set once, found "
                                         r"'set_a'"):
        files.read_gmt(tmp_path / "t.gmt")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfid , patient\r\n s1 ,P1\r\n\r\ns2,P2\r\n")
    assert files.read_metadata(tmp_path / "m.csv") == {"s1": {"id": "s1", "patient": "P1"},
                                                       "s2": {"id": "s2", "patient": "P2"}}
    (tmp_path / "d.csv").write_text("id,patient\ns1,P1\nS1,P2\n")
    with pytest.raises(CacheError, match=r"d\.csv: key 'id': expected unique names, found 1 "
                                         r"clashing: 's1' and "
                       r"'S1' \(differ only in case\)"):
        files.read_metadata(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("id,patient\ns1,P1\n,P2\n")
    with pytest.raises(CacheError, match=r"e\.csv: key 'id': expected an id in every row, found an "
                                         r"empty cell "
                       r"in row 3"):
        files.read_metadata(tmp_path / "e.csv")


def test_hdf5_strings_and_attributes_are_decoded_one_way(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("ok", data=[b" b0", "b1\r".encode(), b"\xef\xbb\xbfb2"],
                         dtype=h5py.string_dtype("utf-8"))
        f["fixed"] = np.array([b"x ", b"y"], dtype="S2")
        f.create_dataset("bad", data=[b"ok", b"caf\xe9"], dtype=h5py.string_dtype("ascii"))
        f.attrs.create("bytes", b"caf\xc3\xa9 ", dtype=h5py.string_dtype("utf-8"))
        f.attrs.create("broken", b"caf\xe9", dtype=h5py.string_dtype("utf-8"))
        f.attrs["number"] = 3
    with h5py.File(path) as f:
        assert files.h5_strings(f["ok"]).tolist() == ["b0", "b1", "b2"]
        assert files.h5_strings(f["fixed"]).tolist() == ["x", "y"]
        with pytest.raises(CacheError, match=r"s\.h5: key 'bad', row 1: expected UTF-8 text, found "
                                             r"byte 0xe9"):
            files.h5_strings(f["bad"])
        assert files.text_attr(f, "bytes") == "café" and files.text_attr(f, "number") == "3"
        with pytest.raises(CacheError, match=r"s\.h5: key 'attrs/broken': expected UTF-8 text, "
                                             r"found byte 0xe9"):
            files.text_attr(f, "broken")


def test_clashes_against_a_loop_over_pairs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        names = ["".join(rng.choice(list("aAbB"), 2)) for _ in range(rng.integers(0, 6))]
        expected = set()
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if a == b:
                    expected.add(("same", a))
                elif a.lower() == b.lower():
                    expected.add(("case", frozenset((a, b))))
        found = files.clashes(names)
        assert bool(found) == bool(expected), (names, found)
        for kind, what in expected:
            case = [f for f in found if "differ only in case" in f]
            named = [f for f in found if f"{what!r} " in f] if kind == "same" else \
                [f for f in case if all(repr(n) in f for n in what)]
            assert named, (names, found)


def test_memory_and_disk_refusals_name_the_figure_and_what_fits():
    with pytest.raises(files.TooLarge, match=r"x needs about 2\.0 GiB of memory, found 1\.0 GiB "
                                             r"available on "
                       r"cpu; y=3 would fit"):
        files.check_memory(2 * 2 ** 30, "x", "y=3 would fit", available=2 ** 30)
    files.check_memory(2 ** 30, "x", "", available=2 ** 30)
    with pytest.raises(files.TooLarge, match=r"x needs about 4\.0 GiB of disk, found 1\.0 GiB free "
                                             r"at /d"):
        files.check_disk(4 * 2 ** 30, "/d", "x", "", available=2 ** 30)
    for budget in (0, 1, 7, 99, 10 ** 6):
        size = lambda n: 3 * n * n + 1  # noqa: E731
        want = max([n for n in range(1, 1001) if size(n) <= budget], default=0)
        assert files.largest_fitting(size, 1, 1000, budget) == want


def test_what_a_killed_writer_left_is_removed_and_named_by_the_next_one(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()                                            # a process id that no longer runs
    (tmp_path / f".out.{dead.pid}.0123abcd.pending").mkdir()
    (tmp_path / f".out.{dead.pid}.0123abcd.pending" / "a.h5").write_text("half")
    (tmp_path / f".out.{os.getpid()}.0123abcd.pending").mkdir()          # a live writer's: kept
    (tmp_path / "keep.h5").write_text("mine")
    notes = []
    with files.Outputs(tmp_path / "out", ["a.h5"], log=notes.append) as o:
        o.path("a.h5").write_text("a")
    assert notes == [f"note: {tmp_path / 'out'}: removed 1 unfinished file(s) an interrupted "
                     "command left "
                     f"(.out.{dead.pid}.0123abcd.pending)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.{os.getpid()}.0123abcd.pending",
                                                          "keep.h5", "out"]

"""Tests for hest.py: the h5ad reader, the placeholder encoder and the HEST import, against files
written by hand here and the real her2st data."""
import importlib.util
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
import files
import protocols
import hest
from data import CacheError

ROOT = Path(__file__).resolve().parents[1]
STR = h5py.string_dtype("utf-8")


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
        h = files.read_h5ad(path)
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
        sub = files.read_h5ad(path, genes=pick)
        assert sub.genes == pick and np.array_equal(sub.counts,
                                                    ref[:, [5, 0, -1]].astype(np.float32))
        assert np.allclose(sub.library_size, ref.sum(1))  # library size is over all genes
    with pytest.raises(CacheError,
                       match=r"key 'var': expected all 2 requested genes, found 1 missing: NOPE"):
        files.read_h5ad(path, genes=[var_index[0], "NOPE"])


def test_h5ad_dense_with_custom_index_and_obs_coordinates(shared_data):
    path = shared_data / "hest_samples" / "NCBI858.h5ad"
    h = files.read_h5ad(path)
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
        if style == "current":  # anndata >= 0.8: CSR, string-array index, categorical group, obsm
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
            g["indptr"] = np.concatenate(
                [[0], np.cumsum(np.bincount(rows, minlength=X.shape[0]))]).astype(np.int64)
            f.create_group("obsm")["spatial"] = xy
        # anndata 0.7: old h5sparse CSC, vlen strings, codes + categories reference
        elif style == "legacy":
            obs.attrs["_index"] = "index"
            obs.create_dataset("index", data=np.array(obs_names, dtype=object),
                               dtype=h5py.string_dtype())
            var.attrs["_index"] = "index"
            var.create_dataset("index", data=np.array(var_names, dtype=object),
                               dtype=h5py.string_dtype())
            cats, codes = np.unique(group, return_inverse=True)
            ref = obs.create_group("__categories").create_dataset("region",
                                                                  data=cats.astype(object),
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
    h = files.read_h5ad(tmp_path / "a.h5ad")
    assert np.array_equal(h.counts, X.astype(np.float32)) and h.counts.dtype == np.float32
    assert list(h.barcodes) == barcodes and h.genes == genes and np.allclose(h.xy, xy)
    assert np.array_equal(h.library_size, X.sum(1))
    decoded = [g if g is not None else "" for g in h.obs["region"]]
    assert decoded == group
    sub = files.read_h5ad(tmp_path / "a.h5ad", genes=["CD74", "MT-1"])
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


def _h5ad_poke(key, index, value):
    def change(f):
        x = f[key][()]
        x[index] = value
        del f[key]
        f[key] = x
    return change


BAD_H5AD = [  # (change to a valid file, key, expected, found)
    (_h5ad_attr("X", "shape", (9, 7)), "X", "shape (9, 6) from obs and var", "(9, 7)"),
    (_h5ad_attr("X", "encoding-type", "coo_matrix"), "X",
     "dense, csr_matrix or csc_matrix", "'coo'"),
    (_h5ad_replace("obsm/spatial", np.zeros((9, 1))), "obsm/spatial", "shape (9, 2)", "(9, 1)"),
    (_h5ad_replace("var", np.zeros(3)), "var", "a dataframe group (anndata >= 0.7)", "a dataset"),
    (_h5ad_attr("obs/region", "encoding-type", "awkward-array"), "/obs/region",
     "an array or categorical", "encoding 'awkward-array'"),
    (_h5ad_poke("X/indices", 0, -1), "X/indices", "indices from 0 to 5", "first -1 at entry 0"),
    (_h5ad_poke("X/indices", 1, 6), "X/indices", "indices from 0 to 5", "first 6 at entry 1"),
    (_h5ad_poke("X/indptr", 2, 0), "X/indptr", "10 non-decreasing offsets from 0 to", "decreasing"),
    (_h5ad_replace("X/indptr", np.arange(9)), "X/indptr", "10 non-decreasing offsets", "9 offsets"),
    (_h5ad_replace("X/data", np.ones(3)), "X/data", "one value per entry of 'X/indices'", "shape "
                                                                                          "(3,)"),
    (_h5ad_poke("X/data", 2, -1.0), "X/data", "values >= 0", "first at index (2,)"),
    (_h5ad_poke("X/data", 3, np.nan), "X/data", "finite", "first at index (3,)"),
    (_h5ad_attr("X", "shape", np.array([9.5, 6])), "X", "the attribute shape (rows, columns)",
     "[9.5, 6.0]"),
    (_h5ad_poke("obsm/spatial", (4, 1), np.nan), "obsm/spatial", "finite spot centres", "first row "
                                                                                        "4"),
    (_h5ad_replace("obs/region/codes", np.full(9, 7, dtype=np.int8)), "obs/region",
     "categorical codes from -1 to 0", "codes up to 7"),
    (_h5ad_replace("var/_index", h5py.SoftLink("/nowhere")), "var/_index", "a dataset",
     "a link that leads nowhere"),
]


@pytest.mark.parametrize("change,key,expected,found", BAD_H5AD, ids=[b[1] for b in BAD_H5AD])
def test_malformed_h5ad_is_rejected_with_a_clear_message(tmp_path, change, key, expected, found):
    path = tmp_path / "bad.h5ad"
    X = np.ones((9, 6))
    write_h5ad(path, X, [f"b{i}" for i in range(9)], list("abcdef"), "current",
               np.zeros((9, 2)), ["t"] * 9)
    with h5py.File(path, "a") as f:
        change(f)
    with pytest.raises(CacheError) as e:
        files.read_h5ad(path, counts=True)
    msg = str(e.value)
    assert str(path) in msg and f"key '{key}'" in msg and expected in msg and found in msg, msg
    with pytest.raises(CacheError) as e:  # binning a cell table reads it with the same checks
        hest.bin_cells(path, 10.0, tmp_path / "out", log=lambda m: None)
    assert str(e.value) == msg and not (tmp_path / "out").exists()


def test_embed_refuses_a_batch_the_memory_cannot_hold_with_one_that_fits():
    per = hest.ENCODER_BYTES_PER_PIXEL * 224 * 224
    with pytest.raises(files.TooLarge) as e:
        hest.check_embed_memory(10 ** 6, 224 * 224, None, available=2 ** 30)
    fit = int(str(e.value).split("--batch-size ")[-1].split()[0])
    assert "--batch-size 1000000 of 50176 pixels per patch needs about" in str(e.value)
    assert fit * per <= 2 ** 30 < (fit + 1) * per
    hest.check_embed_memory(128, 224 * 224, None, available=2 ** 30)


def test_bin_cells_refuses_bins_beyond_64_bit_numbers(tmp_path):
    r = np.random.default_rng(0)
    write_h5ad(tmp_path / "c.h5ad", r.poisson(1.0, (9, 3)).astype(np.float64),
               [f"c{i}" for i in range(9)],
               ["A", "B", "C"], "current", r.uniform(0, 1000, (9, 2)), ["t"] * 9)
    with pytest.raises(ValueError, match=r"c\.h5ad: bin --bin-um 1e-09: the cells span .* more "
                                         r"than 2\^30 bins "
                       r"a side; --bin-um .* would fit"):
        hest.bin_cells(tmp_path / "c.h5ad", 1e-9, tmp_path / "out", log=lambda m: None)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="expected positive, finite micrometres"):
            hest.bin_cells(tmp_path / "c.h5ad", bad, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- placeholder encoder

def test_patch_statistics_against_a_direct_computation():
    r = np.random.default_rng(0)
    img = r.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    img[1] = 255                                              # a blank (white) patch
    f = hest.patch_statistics(torch.from_numpy(img))
    assert f.shape == (3, 48) and f.dtype == torch.float32 and torch.isfinite(f).all()
    # 2x2 average, (B, 8, 12, 3)
    half = img.astype(np.float64).reshape(3, 8, 2, 12, 2, 3).mean((2, 4)) / 255
    assert np.allclose(f[:, :3].numpy(), half.mean((1, 2)), atol=1e-5)  # whole-patch RGB means
    assert np.allclose(f[:, 8:11].numpy(), half.std((1, 2)), atol=1e-3)            # ... and stds
    quads = half.reshape(3, 2, 4, 2, 6, 3).mean((2, 4)).reshape(3, 4, 3)  # 2x2 grid cell means
    # heterogeneity between cells
    assert np.allclose(f[:, 24:27].numpy(), quads.std(1, ddof=1), atol=1e-4)
    # background 1, no gradient
    assert f[1, 7] == 1.0 and f[1, 5] == 0.0 and f[1, 16:].abs().max() < 1e-3


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
    hest.embed_patches(patches, out, encoder="my_encoder:mean_rgb", batch_size=2, log=lines.append)
    with h5py.File(out / "s1.h5") as f:
        with h5py.File(patches / "s1.h5") as p:
            assert np.allclose(f["embeddings"][()], p["img"][()].astype(np.float32).mean((1, 2)))
            assert np.array_equal(f["coords"][()], p["coords"][()])
        assert list(f["barcodes"].asstr()[()]) == [f"b{i}" for i in range(5)]
        assert f.attrs["encoder"] == "my_encoder:mean_rgb"
    assert "s1: 5 patches -> 3 features" in lines[0]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        hest.embed_patches(patches, out, log=lines.append)
    with pytest.raises(ValueError, match="expected 'module:callable', found 'my_encoder'"):
        hest.load_encoder("my_encoder")
    with h5py.File(patches / "s1.h5", "a") as f:
        del f["barcode"]
    with pytest.raises(CacheError,
                       match=r"s1\.h5: key 'barcode': expected a dataset \(HEST patches file\)"):
        hest.embed_patches(patches, tmp_path / "emb2", log=lines.append)


@pytest.mark.parametrize("r", [2, 4])
def test_embed_sub_patches_are_the_image_blocks_and_import_carries_them(tmp_path, monkeypatch, r):
    patches, emb_dir = tmp_path / "patches", tmp_path / "emb"
    patches.mkdir()
    img = np.random.default_rng(r).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    with h5py.File(patches / "s1.h5", "w") as f:
        f["img"], f["coords"] = img, np.arange(10).reshape(5, 2) * 50.0
        f["barcode"] = np.array([[f"b{i}".encode()] for i in range(5)])
    (tmp_path / "enc.py").write_text("import torch\ndef stats(x):\n    x = x.float()\n"
                                     "    return torch.cat([x.mean((1, 2)), x[:, 0, 0], "
                                     "x[:, -1, -1]], 1)\n")
    monkeypatch.chdir(tmp_path)
    hest.main(["embed", "--patches", str(patches), "--out", str(emb_dir), "--encoder", "enc:stats",
               "--sub", str(r), "--batch-size", "3"])
    with h5py.File(emb_dir / "s1.h5") as f:
        sub, size = f["sub_embeddings"][()], f.attrs["patch_size_px"]
    assert sub.shape == (5, r * r, 9) and size == 16
    h = 16 // r
    for n in range(5):
        for s in range(r * r):
            ix, iy = s // r, s % r
            # rows = y, columns = x
            block = img[n, iy * h:(iy + 1) * h, ix * h:(ix + 1) * h].astype(np.float32)
            want = np.concatenate([block.mean((0, 1)), block[0, 0], block[-1, -1]])
            np.testing.assert_allclose(sub[n, s], want, rtol=1e-6)
    st = tmp_path / "st"
    st.mkdir()
    write_h5ad(st / "s1.h5ad", np.ones((5, 2)), [f"b{i}" for i in range(5)], ["A", "B"], "current",
               np.arange(10).reshape(5, 2) * 50.0, ["t"] * 5)
    (tmp_path / "meta.csv").write_text("id,patient,pixel_size_um_estimated,inter_spot_dist\n"
                                       "s1,P,0.5,100\n")
    (path,) = hest.import_hest(st, emb_dir, tmp_path / "caches", tmp_path / "meta.csv",
                               log=lambda s: None)
    slide = data.read_slide(path)
    # 16 px x 0.5 um
    assert torch.equal(slide.sub_features, torch.from_numpy(sub)) and slide.sub_extent_um == 8.0
    with pytest.raises(CacheError, match=r"key 'img': expected patches whose height and width "
                                         r"divide by --sub 3"):
        hest.embed_patches(patches, tmp_path / "e3", sub=3, log=lambda s: None)
    with h5py.File(patches / "s2.h5", "w") as f:                       # 16 x 12 patches: not square
        f["img"], f["coords"] = np.zeros((2, 16, 12, 3), np.uint8), np.zeros((2, 2))
        f["barcode"] = np.array([[b"a"], [b"b"]])
    with pytest.raises(CacheError, match=r"s2.h5: key 'img': expected .* and are equal .* found "
                                         r"shape \(2, 16, 12, 3\)"):
        hest.embed_patches(patches, tmp_path / "e4", sub=2, log=lambda s: None)


# ----------------------------------------------------------------------------- HEST import

def test_embed_and_import_her2st_end_to_end(shared_data, tmp_path, capsys):
    her2st = shared_data / "her2st"
    t0 = time.time()
    hest.main(["embed", "--patches", str(her2st / "patches"), "--out", str(tmp_path / "emb")])
    seconds = time.time() - t0
    hest.main(["import-hest", "--st", str(her2st / "st"), "--features", str(tmp_path / "emb"),
               "--out", str(tmp_path / "caches"), "--meta", str(her2st / "metadata.csv")])
    out = capsys.readouterr().out
    assert "B4: 283 spots matched, 0 only in st, 0 only in features" in out, out
    paths = data.list_slides(tmp_path / "caches")
    assert [p.stem for p in paths] == ["B4", "C2", "C3", "C4", "C5", "C6"] and seconds < 60
    s = data.read_slide(paths[0])
    meta = files.read_metadata(her2st / "metadata.csv")["B4"]
    h = files.read_h5ad(her2st / "st" / "B4.h5ad")
    assert (s.patient, s.spot_pitch_um, s.features.shape) == ("B", 200.0, (283, 48))
    with h5py.File(her2st / "patches" / "B4.h5") as f:
        # same spots, h5ad order
        assert list(s.barcodes) == [b[0].decode() for b in f["barcode"][()]]
    assert list(s.barcodes) == list(h.barcodes) and s.genes == h.genes
    assert torch.allclose(s.coords,
                          torch.from_numpy(h.xy * float(meta["pixel_size_um_estimated"])).float())
    assert (torch.equal(s.counts, torch.from_numpy(h.counts))
            and torch.equal(s.library_size, s.counts.sum(1)))
    d = torch.cdist(s.coords, s.coords) + torch.eye(283) * 1e9
    assert 150 < d.min(1).values.median() < 250  # ST spots ~200 um apart once in micrometres
    assert torch.isfinite(s.features).all() and (s.features.std(0) > 0).all()


def test_import_hest_joins_by_barcode_and_reports(tmp_path):
    st, feats, out = tmp_path / "st", tmp_path / "feats", tmp_path / "out"
    st.mkdir(), feats.mkdir()
    r = np.random.default_rng(0)
    X = r.poisson(2.0, (10, 5)).astype(np.float64)
    xy = r.uniform(0, 500, (10, 2))
    genes = ["A", "B", "C", "D", "E"]
    write_h5ad(st / "s1.h5ad", X, [f"b{i}" for i in range(10)], genes, "current", xy, ["t"] * 10)
    # b0, b1 missing; 3 extra
    feature_barcodes = [f"b{i}" for i in (5, 2, 11, 7, 3, 4, 12, 6, 8, 9, 10)]
    emb = r.standard_normal((11, 4)).astype(np.float32)
    corner = (np.array([xy[int(b[1:])] if int(b[1:]) < 10 else (0, 0) for b in feature_barcodes])
              - 56)  # as HEST
    with h5py.File(feats / "s1.h5", "w") as f:
        f["embeddings"], f["coords"] = emb, corner
        f["barcodes"] = np.array([[b.encode()] for b in feature_barcodes])  # (N, 1) bytes, as HEST
    with h5py.File(feats / "lonely.h5", "w") as f:
        f["embeddings"], f["barcodes"] = emb, np.array([b.encode() for b in feature_barcodes])
    (tmp_path / "meta.csv").write_text("id,patient,pixel_size_um_estimated,inter_spot_dist\n"
                                       "s1,P7,0.5,100\n")
    (tmp_path / "genes.txt").write_text("C\nA\nZZ\n")
    lines = []
    paths = hest.import_hest(st, feats, out, tmp_path / "meta.csv", genes=tmp_path / "genes.txt",
                             log=lines.append)
    assert lines[0].startswith("import-hest: skipped 1 embedding file(s) of ")
    assert lines[0].endswith(": lonely")
    assert lines[1].startswith("s1: 8 spots matched, 2 only in st, 3 only in features; 2 genes (1 "
                               "of the list missing)")
    s = data.read_slide(paths[0])
    rows = [feature_barcodes.index(f"b{i}") for i in range(2, 10)]
    assert list(s.barcodes) == [f"b{i}" for i in range(2, 10)] and s.genes == ["C", "A"]
    assert torch.equal(s.features, torch.from_numpy(emb[rows]))
    assert torch.allclose(s.coords, torch.from_numpy(xy[2:] * 0.5).float())
    assert torch.equal(s.counts, torch.from_numpy(X[2:][:, [2, 0]]).float())
    assert torch.equal(s.library_size, torch.from_numpy(X[2:].sum(1)).float())   # over all genes
    assert (s.patient, s.spot_pitch_um) == ("P7", 100.0)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        hest.import_hest(st, feats, out, log=lines.append)
    lines.clear()
    (paths,) = [hest.import_hest(st, feats, tmp_path / "out2", max_genes=2, log=lines.append)]
    s = data.read_slide(paths[0])
    top = [genes[j] for j in np.argsort(-X.sum(0), kind="stable")[:2]]
    assert s.genes == top and s.patient == "s1" and math.isnan(s.spot_pitch_um)
    assert "no pixel_size_um_estimated, coords stay in pixels" in lines[1]
    with h5py.File(feats / "s1.h5", "a") as f:
        del f["embeddings"]
    with pytest.raises(CacheError, match=r"s1\.h5: key 'embeddings': expected a dataset"):
        hest.import_hest(st, feats, tmp_path / "out3", log=lines.append)


# ----------------------------------------------------------------------------- command line


def test_import_hest_says_in_one_line_which_sections_it_skipped_and_why(tmp_path):
    """Sections of --st without an embedding file (no H&E image to embed) are counted in one line,
    with how many the metadata marks as imageless; the imported ones get their own line each."""
    st, feats, out = tmp_path / "st", tmp_path / "feats", tmp_path / "out"
    st.mkdir(), feats.mkdir()
    r = np.random.default_rng(0)
    xy = r.uniform(0, 500, (6, 2))
    barcodes = [f"b{i}" for i in range(6)]
    for sid in ("A1", "A2", "B1", "C1"):
        counts = r.poisson(2.0, (6, 3)).astype(np.float64)
        write_h5ad(st / f"{sid}.h5ad", counts, barcodes, ["X", "Y", "Z"], "current", xy, ["t"] * 6)
    with h5py.File(feats / "B1.h5", "w") as f:
        f["embeddings"], f["coords"] = r.standard_normal((6, 4)).astype(np.float32), xy - 56
        f["barcodes"] = np.array([b.encode() for b in barcodes])
    rows = ["id,patient,pixel_size_um_estimated,has_image", "A1,A,0.5,False", "A2,A,0.5,False",
            "B1,B,0.5,True", "C1,C,0.5,True"]
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    lines = []
    hest.import_hest(st, feats, out, tmp_path / "meta.csv", log=lines.append)
    assert len(lines) == 2 and lines[1].startswith("B1: 6 spots matched")
    assert lines[0] == (f"import-hest: skipped 3 of the 4 sections of {st}: no embedding file "
                        f"<id>.h5 in {feats}; 2 of them have no H&E image (has_image false in "
                        "--meta): A1, A2, C1")

def test_command_line_help():
    r = subprocess.run([sys.executable, str(ROOT / "hest.py"), "import-hest", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--max-genes" in r.stdout and "--meta" in r.stdout


def test_import_and_embed_error_paths(tmp_path):
    st, feats = tmp_path / "st", tmp_path / "feats"
    st.mkdir(), feats.mkdir()
    X = np.ones((4, 2))
    write_h5ad(st / "s1.h5ad", X, ["a", "b", "c", "d"], ["G1", "G2"], "current",
               np.zeros((4, 2)), ["t"] * 4)

    def features(barcodes, n_rows=None):
        with h5py.File(feats / "s1.h5", "w") as f:
            f["embeddings"] = np.zeros((n_rows or len(barcodes), 3), np.float32)
            f["barcodes"] = np.array([b.encode() for b in barcodes])
    lines = []
    features(["a", "b", "c"], n_rows=2)
    with pytest.raises(CacheError, match=r"s1\.h5: key 'embeddings': expected shape \(3, C\), one "
                                         r"row per barcode"):
        hest.import_hest(st, feats, tmp_path / "o1", log=lines.append)
    features(["a", "a", "b"])
    with pytest.raises(CacheError, match=r"s1\.h5: key 'barcodes': expected unique barcodes, found "
                                         r"1 duplicates"):
        hest.import_hest(st, feats, tmp_path / "o2", log=lines.append)
    features(["x-1", "y-1"])
    assert hest.import_hest(st, feats, tmp_path / "o3", log=lines.append) == []
    assert lines[-1].endswith("skipped (check that barcodes use the same format)")
    with h5py.File(st / "s1.h5ad", "a") as f:
        del f["obsm"]
    with pytest.raises(CacheError, match=r"s1\.h5ad: key 'obsm/spatial': expected spot centres"):
        hest.import_hest(st, feats, tmp_path / "o4", log=lines.append)
    with pytest.raises(FileNotFoundError, match=r"expected embedding files \*\.h5, found none"):
        hest.import_hest(st, tmp_path / "none", tmp_path / "o5", log=lines.append)
    patches = tmp_path / "patches"
    patches.mkdir()
    with h5py.File(patches / "p.h5", "w") as f:
        f["img"], f["coords"] = np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 2))
        f["barcode"] = np.array([b"a", b"b"])
    with pytest.raises(CacheError, match=r"p\.h5: key 'img': expected uint8 \(N, H, W, 3\), found "
                                         r"float32 \(2, 8, "):
        hest.embed_patches(patches, tmp_path / "e", log=lines.append)
    with pytest.raises(FileNotFoundError, match=r"expected HEST patch files \*\.h5, found none"):
        hest.embed_patches(tmp_path / "st", tmp_path / "e", log=lines.append)
    for call in (lambda: hest.embed_patches(patches, patches, overwrite=True),
                 lambda: hest.import_hest(st, feats, feats, overwrite=True)):
        with pytest.raises(ValueError,
                           match="expected an output folder other than the inputs, found an input"):
            call()



def test_max_genes_below_one_is_refused(tmp_path):
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"--max-genes: expected an integer >= 1, found {n}"):
            hest.import_hest(tmp_path / "st", tmp_path / "feats", tmp_path / "out", max_genes=n)
    r = subprocess.run([sys.executable, str(ROOT / "hest.py"), "import-hest", "--st", "st",
                        "--features", "f", "--out", "o", "--max-genes", "0"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert (r.returncode == 1
            and r.stderr == "--max-genes: expected an integer >= 1, found 0\n"), r.stderr
    assert not (tmp_path / "o").exists()


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
    assert protocols.harmonise_gene_names(var) == ["ERBB2", "ERBB2", "ENSG00000141736",
                                                   "ACTB", "AC012345"]
    h = files.read_h5ad(p, rename=protocols.harmonise_gene_names)
    assert (h.genes == ["ERBB2", "ENSG00000141736", "ACTB", "AC012345"]
            and list(h.barcodes) == ["b1", "b2"])
    np.testing.assert_array_equal(h.counts,
                                  [[1 + 2 + 5 + 0, 0 + 1, 4 + 1, 1 + 2], [0 + 1, 3, 0, 0]])
    np.testing.assert_array_equal(h.library_size, [8 + 9, 4])
    np.testing.assert_array_equal(h.xy, [[0, 0], [1, 0]])
    h = files.read_h5ad(p, genes=["ACTB"], rename=protocols.harmonise_gene_names)
    np.testing.assert_array_equal(h.counts, [[5], [0]])
    with pytest.raises(CacheError, match=r"h\.h5ad: key 'obs/_index': expected unique names .*'b1' "
                                         r"twice"):
        # without harmonise a repeated barcode would lose a spot
        files.read_h5ad(p)
    with h5py.File(p, "a") as f:
        del f["obs/_index"]
        f.create_dataset("obs/_index", data=np.array(["b1", "b2", "b3"]).astype(object), dtype=STR)
    assert files.read_h5ad(p).genes == list(var)  # without harmonise: names as stored


def test_import_of_one_papers_dataset_refuses_missing_slides_and_harmonises(tmp_path):
    st, feats = tmp_path / "st", tmp_path / "feats"
    st.mkdir(), feats.mkdir()
    r, counts = np.random.default_rng(2), {}
    for sid in ("NCBI534", "NCBI535", "NCBI536", "NCBI999"):  # Lung (NCBI) lists NCBI534-NCBI537
        X = counts[sid] = r.poisson(2.0, (6, 3)).astype(np.float64)
        write_h5ad(st / f"{sid}.h5ad", X, [f"b{i}" for i in range(6)],
                   ["GRCh38_A", "a", "B.2"], "current", r.uniform(0, 500, (6, 2)), ["t"] * 6)
        with h5py.File(feats / f"{sid}.h5", "w") as f:
            f["embeddings"] = r.standard_normal((6, 4)).astype(np.float32)
            f["barcodes"] = np.array([f"b{i}".encode() for i in range(6)])
    with pytest.raises(CacheError, match=r"hist_slides\.yaml: hist:lung_ncbi: 1 of 4 slides have "
                                         r"no embedding file in .*feats or no expression file in "
                                         r".*st: NCBI537$"):
        hest.import_hest(st, feats, tmp_path / "out", dataset="hist:lung_ncbi", log=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing written before the check
    with h5py.File(feats / "NCBI537.h5", "w") as f:
        f["embeddings"], f["barcodes"] = np.zeros((1, 4), np.float32), np.array([b"b0"])
    write_h5ad(st / "NCBI537.h5ad", np.ones((1, 3)), ["b0"], ["GRCh38_A", "a", "B.2"], "current",
               np.zeros((1, 2)), ["t"])
    paths = hest.import_hest(st, feats, tmp_path / "out", dataset="hist:lung_ncbi", harmonise=True,
                             log=lambda m: None)
    # NCBI999 left out
    assert [p.stem for p in paths] == ["NCBI534", "NCBI535", "NCBI536", "NCBI537"]
    s, X = data.read_slide(paths[0]), counts["NCBI534"]
    assert (s.genes == ["A", "B"]
            and torch.equal(s.counts, torch.from_numpy(
                np.stack([X[:, 0] + X[:, 1], X[:, 2]], 1)).float()))


# ----------------------------------------------------------------------------- binning square grids

def grid_slide(rng, side=24, pitch=8.0, degrees=0.0, jitter=0.03, gap=0.3, C=3, G=4):
    """A slide on a square grid with gaps, jittered and rotated; returns it and the grid positions
    ij."""
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    ij = np.stack([i.ravel(), j.ravel()], 1)
    ij = ij[rng.random(len(ij)) > gap]
    t = math.radians(degrees)
    R = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    xy = ij * pitch @ R.T + [500.0, 300.0] + rng.normal(0, jitter * pitch, ij.shape)
    n = len(ij)
    counts = rng.poisson(2.0, (n, G)).astype(np.float32)
    slide = data.Slide("g1", torch.tensor(rng.normal(size=(n, C)), dtype=torch.float32),
                       torch.tensor(xy, dtype=torch.float32), np.array([f"b{k}" for k in range(n)]),
                       patient="p", spot_pitch_um=pitch, counts=torch.from_numpy(counts),
                       genes=[f"g{k}" for k in range(G)],
                       library_size=torch.from_numpy(counts.sum(1) + 3),
                       expected=torch.from_numpy(counts + 0.25))
    return slide, ij, R


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("degrees, jitter", [(0.0, 0.0), (0.0, 0.04), (8.0, 0.03)])
def test_bin_equals_a_loop_over_blocks(factor, degrees, jitter):
    rng = np.random.default_rng(factor + int(degrees))
    pitch = 8.0
    slide, ij, R = grid_slide(rng, pitch=pitch, degrees=degrees, jitter=jitter)
    out = hest.bin_slide(slide, factor)
    ij = ij - ij.min(0)
    blocks = {}                                                    # (bi, bj) -> [(spot, ix, iy)]
    for k, (i, j) in enumerate(ij.tolist()):
        blocks.setdefault((i // factor, j // factor), []).append((k, i % factor, j % factor))
    # row-major lattice parents
    assert out.barcodes.tolist() == [f"x{i}_y{j}" for i, j in sorted(blocks)]
    assert out.sub_features.shape == (len(blocks), factor * factor, 3)
    assert out.spot_pitch_um == pytest.approx(factor * pitch, rel=0.01)
    assert out.sub_extent_um == out.spot_pitch_um
    origin = slide.coords.double().numpy() - ij * pitch @ R.T       # per spot: origin + jitter
    origin = origin.mean(0)
    for row, key in enumerate(sorted(blocks)):
        members = blocks[key]
        spots = [k for k, _, _ in members]
        assert torch.equal(out.counts[row], slide.counts[spots].sum(0))
        assert torch.allclose(out.library_size[row], slide.library_size[spots].sum(0))
        assert torch.allclose(out.expected[row], slide.expected[spots].sum(0))
        assert torch.allclose(out.features[row], slide.features[spots].mean(0), atol=1e-6)
        want_valid = torch.zeros(factor * factor, dtype=torch.bool)
        for k, ix, iy in members:
            s = factor * ix + iy
            want_valid[s] = True
            assert torch.equal(out.sub_features[row, s], slide.features[k])
            assert torch.equal(out.sub_counts[row, s], slide.counts[k])
        assert torch.equal(out.sub_valid[row], want_valid)
        assert (out.sub_features[row, ~want_valid].abs().sum() == 0
                and out.sub_counts[row, ~want_valid].sum() == 0)
        centre = origin + (np.array(key) * factor + (factor - 1) / 2) * pitch @ R.T
        np.testing.assert_allclose(out.coords[row].double().numpy(), centre, atol=0.1 * pitch)


@pytest.mark.usefixtures("one_thread")
def test_bin_composes_and_round_trips(tmp_path):
    slide, _, _ = grid_slide(np.random.default_rng(5), side=32, jitter=0.02)
    four = hest.bin_slide(slide, 4)
    twice = hest.bin_slide(hest.bin_slide(slide, 2), 2)              # 8 um -> 16 um -> 32 um
    assert twice.barcodes.tolist() == four.barcodes.tolist()
    assert (torch.equal(twice.counts, four.counts)
            and torch.allclose(twice.coords, four.coords, atol=0.5))
    data.write_slide(tmp_path / "g1.h5", slide)
    hest.main(["bin", "--slides", str(tmp_path), "--factor", "2", "--out", str(tmp_path / "b")])
    r = data.read_slide(tmp_path / "b" / "g1.h5")
    assert r.sub_valid.sum() == slide.n_spots and r.counts.sum() == slide.counts.sum()
    with pytest.raises(ValueError, match="output folder other than the inputs"):
        hest.bin_slides(tmp_path, 2, tmp_path)


@pytest.mark.usefixtures("one_thread")
def test_bin_refuses_a_layout_that_is_not_a_square_grid(tmp_path):
    i, j = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    # Visium
    xy = np.stack([j.ravel() * 100 + (i.ravel() % 2) * 50, i.ravel() * 100 * math.sqrt(3) / 2], 1)
    n = len(xy)
    slide = data.Slide("hex", torch.zeros(n, 2), torch.tensor(xy, dtype=torch.float32),
                       np.array([f"b{k}" for k in range(n)]))
    data.write_slide(tmp_path / "hex.h5", slide)
    with pytest.raises(CacheError, match=r"hex\.h5: key 'coords': .*do not lie on a square grid"):
        hest.bin_slides(tmp_path, 2, tmp_path / "out")
    with pytest.raises(ValueError, match="expected 2 or 4"):
        hest.bin_slide(slide, 3)


@pytest.mark.usefixtures("one_thread")
def test_bin_of_real_her2st_geometry_loses_no_spot_and_no_count(shared_data):
    """All 36 her2st sections (legacy ST, 200 um grid with real registration jitter) by 2, every
    sixth by 4 too."""
    meta = files.read_metadata(shared_data / "her2st" / "metadata.csv")
    for number, path in enumerate(sorted((shared_data / "her2st" / "st").glob("*.h5ad"))):
        h = files.read_h5ad(path)
        keep = np.argsort(-h.counts.sum(0))[:50]                     # 50 genes: every count of them
        n = len(h.barcodes)
        slide = data.Slide(path.stem, torch.zeros(n, 1),
                           torch.tensor(h.xy * float(meta[path.stem]["pixel_size_um_estimated"])),
                           h.barcodes, counts=torch.from_numpy(h.counts[:, keep]),
                           genes=[h.genes[k] for k in keep],
                           library_size=torch.from_numpy(h.library_size).float())
        for factor in (2, 4) if number % 6 == 0 else (2,):
            out = hest.bin_slide(slide, factor)
            assert int(out.sub_valid.sum()) == n, path.stem               # every spot is one child
            assert torch.equal(out.counts.sum(0), slide.counts.sum(0)), path.stem
            assert (float(out.library_size.sum())
                    == pytest.approx(float(slide.library_size.sum()), rel=1e-6))
            got = out.sub_counts[out.sub_valid]  # (N, G): the spots, in block order
            assert (sorted(map(tuple, got.tolist()))
                    == sorted(map(tuple, slide.counts.tolist()))), path.stem
            assert out.spot_pitch_um == pytest.approx(200.0 * factor, rel=0.02)


@pytest.mark.usefixtures("one_thread")
def test_bin_cells_against_a_loop_over_cells(shared_data, tmp_path):
    """The real HEST-derived cell table (200 cells, dense X, coordinates in obs
    x_pixel / y_pixel)."""
    src = shared_data / "hest_samples" / "NCBI858.h5ad"
    cells = files.read_h5ad(src)
    px, side = 0.5, 20.0
    hest.main(["bin", "--cells", str(src), "--bin-um", str(side), "--pixel-size", str(px), "--out",
               str(tmp_path)])
    got = files.read_h5ad(tmp_path / "NCBI858.h5ad")
    lo = (cells.xy * px).min(0)
    want = {}
    for k in range(len(cells.barcodes)):                               # one cell at a time
        i, j = (int(math.floor(v)) for v in ((cells.xy[k] * px - lo) / side))
        want.setdefault((i, j), np.zeros(len(cells.genes)))
        want[(i, j)] += cells.counts[k]
    assert (got.genes == cells.genes
            and sorted(got.barcodes) == sorted(f"x{i}_y{j}" for i, j in want))
    for b, row, xy, col, rr in zip(got.barcodes, got.counts, got.xy, got.obs["array_col"],
                                   got.obs["array_row"]):
        i, j = (int(v) for v in b[1:].split("_y"))
        np.testing.assert_allclose(row, want[(i, j)], rtol=1e-6)
        np.testing.assert_allclose(xy * px, lo + (np.array([i, j]) + 0.5) * side, rtol=1e-9)
        assert (col, rr) == (i, j)
    assert got.counts.sum() == pytest.approx(cells.counts.sum(), rel=1e-6)
    assert int(got.obs["n_cells"].sum()) == len(cells.barcodes)
    if importlib.util.find_spec("anndata"):  # optional: anndata reads it the same
        import anndata
        ad = anndata.read_h5ad(tmp_path / "NCBI858.h5ad")
        assert list(ad.obs_names) == list(got.barcodes) and list(ad.var_names) == got.genes
        np.testing.assert_allclose(ad.X.toarray(), got.counts, rtol=1e-6)
        np.testing.assert_allclose(ad.obsm["spatial"], got.xy, rtol=1e-9)
        np.testing.assert_array_equal(ad.obs["n_cells"].to_numpy(), got.obs["n_cells"])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        hest.bin_cells(src, side, tmp_path, px, log=lambda s: None)


# ---------------------------------------------------------------------------- checks before writing
def test_encoder_mistakes_name_the_encoder(tmp_path):
    with pytest.raises(ValueError,
                       match=r"--encoder nosuchmod:fn: expected an importable module:callable"):
        hest.load_encoder("nosuchmod:fn")
    with pytest.raises(ValueError, match=r"--encoder math:nosuchfn"):
        hest.load_encoder("math:nosuchfn")
    images = torch.zeros(5, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError,
                       match=r"p\.h5: --encoder enc:nan: expected finite features, found 8 NaN"):
        hest.encode(lambda x: torch.full((len(x), 4), float("nan")).index_fill_(
                        0, torch.tensor([1, 2, 3]), 0),
                    images, "enc:nan", "p.h5")
    with pytest.raises(ValueError,
                       match=r"expected \(5, C\) features for 5 patches, found shape \(4, 4\)"):
        hest.encode(lambda x: torch.zeros(len(x) - 1, 4), images, "enc:short", "p.h5")
    assert hest.encode(hest.patch_statistics, images, None, "p.h5").shape == (5, 48)


def test_import_refuses_swapped_embedding_files_and_gene_lists_that_keep_nothing(tmp_path):
    """Two slides with the same barcodes (as Visium) at different places: the embedding files' patch
    corners (HEST: centre - 56 px) must sit on their own slide's spots; a small jitter and one shift
    are fine."""
    st, feats = tmp_path / "st", tmp_path / "feats"
    st.mkdir(), feats.mkdir()
    r = np.random.default_rng(0)
    grid = np.array([[100.0 * (i % 6), 100.0 * (i // 6)] for i in range(30)])
    places = {"a": grid, "b": grid[r.permutation(30)]}
    for sid, xy in places.items():
        write_h5ad(st / f"{sid}.h5ad", r.poisson(2.0, (30, 3)).astype(np.float64),
                   [f"b{i}" for i in range(30)], ["A", "B", "C"], "current", xy, ["t"] * 30)

    def embeddings(swap):
        for sid in places:
            with h5py.File(feats / f"{sid}.h5", "w") as f:
                f["embeddings"] = r.standard_normal((30, 4)).astype(np.float32)
                xy = places[{"a": "b", "b": "a"}[sid] if swap else sid]
                f["coords"] = np.round(xy - 56 + r.uniform(-0.5, 0.5, xy.shape))
                f["barcodes"] = np.array([f"b{i}".encode() for i in range(30)])
    embeddings(swap=True)
    with pytest.raises(CacheError,
                       match=r"a\.h5: key 'coords': .* of 30 shared barcodes elsewhere"):
        hest.import_hest(st, feats, tmp_path / "out", log=lambda s: None)
    (tmp_path / "genes.txt").write_text("X\nY\n")
    embeddings(swap=False)
    with pytest.raises(CacheError,
                       match=r"genes\.txt: expected genes that .*a\.h5ad has, found none of the 2"):
        hest.import_hest(st, feats, tmp_path / "out", genes=tmp_path / "genes.txt",
                         log=lambda s: None)
    assert not (tmp_path / "out").exists()
    assert len(hest.import_hest(st, feats, tmp_path / "out", log=lambda s: None)) == 2

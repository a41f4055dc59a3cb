"""HEST-1k to slide caches: an h5ad reader (h5py only), the placeholder patch encoder and the import.

    python hest.py embed --patches DIR --out DIR [--encoder module:callable]
    python hest.py import-hest --st DIR --features DIR --out DIR [--meta CSV] [--genes FILE | --max-genes N]
                               [--dataset hist:brain] [--harmonise]
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from data import (STR, CacheError, Slide, atomic_path, dataset_slides, fail, h5_strings, harmonise_gene_names,
                  not_an_input, open_h5, read_gene_list, read_metadata, write_slide)


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
        return h5_strings(node)
    else:
        return node[()]
    out = np.asarray(cats, dtype=object)[np.maximum(codes, 0)]
    out[codes < 0] = None
    return out


def _h5ad_frame(f, name) -> tuple[np.ndarray, dict]:
    """(index, columns) of obs or var; the index dataset is whichever `_index` names."""
    g = f[name]
    if not isinstance(g, h5py.Group):
        fail(f.filename, name, "a dataframe group (anndata >= 0.7)", "a dataset (re-save with a newer anndata)")
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
    with open_h5(path) as f:
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
        fail(path, "X", f"shape ({n}, {len(var_names)}) from obs and var", f"{shape}")
    if xy is not None and xy.shape != (n, 2):
        fail(path, "obsm/spatial", f"shape ({n}, 2)", f"{xy.shape}")
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
        fail(path, "var", f"all {len(genes)} requested genes", f"{len(missing)} missing: {', '.join(missing[:10])}")
    column_of = np.full(len(var_names), -1)
    for j, g in enumerate(genes):
        column_of[index[g]] = j
    keep = column_of[cols] >= 0
    counts = np.zeros((len(barcodes), len(genes)), dtype=np.float64)
    np.add.at(counts, (row_of[rows[keep]], column_of[cols[keep]]), values[keep])  # duplicates sum, as in scipy
    library = np.bincount(row_of[rows], weights=values, minlength=len(barcodes))
    return H5ad(counts.astype(np.float32), barcodes, genes, xy, obs, library)


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
        with open_h5(path) as f:
            for key in ("img", "coords", "barcode"):
                if key not in f:
                    fail(path, key, "a dataset (HEST patches file)", "no such key")
            img = f["img"]
            if img.ndim != 4 or img.shape[3] != 3 or img.dtype != np.uint8:
                fail(path, "img", "uint8 (N, H, W, 3)", f"{img.dtype} {img.shape}")
            emb = torch.cat([torch.as_tensor(fn(torch.from_numpy(img[i:i + batch_size]))).float()
                             for i in range(0, img.shape[0], batch_size)]).numpy()
            coords, barcodes = f["coords"][()], h5_strings(f["barcode"]).reshape(-1)
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
    with open_h5(path) as f:
        for key in ("embeddings", "barcodes"):
            if key not in f and not (key == "barcodes" and "barcode" in f):
                fail(path, key, "a dataset (HEST-Benchmark embedding file)", "no such key")
        emb = f["embeddings"][()]
        barcodes = h5_strings(f["barcodes" if "barcodes" in f else "barcode"]).reshape(-1)
        encoder = _attr(f, "encoder", Path(path).parent.name)
    if emb.ndim != 2 or len(emb) != len(barcodes):
        fail(path, "embeddings", f"shape ({len(barcodes)}, C), one row per barcode", f"shape {emb.shape}")
    if len(set(barcodes)) < len(barcodes):
        fail(path, "barcodes", "unique barcodes", f"{len(barcodes) - len(set(barcodes))} duplicates")
    return emb, barcodes, encoder


def _h5ad_gene_totals(path, harmonise: bool = False) -> dict[str, float]:
    """Total counts per gene of one h5ad, straight from the sparse arrays (harmonised names summed)."""
    with open_h5(path) as f:
        genes, _ = _h5ad_frame(f, "var")
        _, cols, values, _ = _h5ad_X(f)
    totals = {}
    for g, t in zip(harmonise_gene_names(genes) if harmonise else genes,
                    np.bincount(cols, weights=values, minlength=len(genes))):
        totals[g] = totals.get(g, 0.0) + t if harmonise else t
    return totals


def _h5ad_gene_names(path, harmonise: bool = False) -> set[str]:
    with open_h5(path) as f:
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
    if max_genes is not None and max_genes < 1:
        raise ValueError(f"--max-genes: expected an integer >= 1, found {max_genes}")
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
    if max_genes is not None:
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
            fail(st, "obsm/spatial", "spot centres (obsm/spatial or obs pxl_col_in_fullres/pxl_row_in_fullres)",
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



# ----------------------------------------------------------------------------- command line

def main(argv=None):
    ap = argparse.ArgumentParser(prog="hest.py", description="Build tessera slide caches from HEST-1k (DATA.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
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
    for name in ("import-hest", "embed"):
        sub.choices[name].add_argument("--overwrite", action="store_true", help="replace existing output files")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "import-hest":
            import_hest(a.st, a.features, a.out, a.meta, a.genes, a.max_genes, a.overwrite,
                        dataset=a.dataset, harmonise=a.harmonise)
        else:
            embed_patches(a.patches, a.out, a.encoder, a.batch_size, a.overwrite)
    except (ValueError, OSError) as e:  # the user's files or arguments: one line, no traceback
        raise SystemExit(" ".join(str(e).split())) from None


if __name__ == "__main__":
    main()

"""HEST-1k to slide caches: the placeholder patch encoder, the import, and the binning of square
grids and cell tables (the h5ad reader is files.py's).

    python hest.py embed --patches DIR --out DIR [--encoder module:callable] [--sub 2|4]
    python hest.py import-hest --st DIR --features DIR --out DIR [--meta CSV]
                               [--genes FILE | --max-genes N] [--dataset hist:brain] [--harmonise]
    python hest.py bin --slides DIR --factor 2|4 --out DIR
    python hest.py bin --cells FILE.h5ad --bin-um 8 --out DIR [--pixel-size UM]
"""
from __future__ import annotations

import argparse
import importlib
import os
import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

import files
from predict import set_threads
import lattice
from data import STR, Slide, list_slides, read_slide, read_slide_meta, write_slide
from files import (CacheError, Outputs, available_memory, check_finished, check_memory,
                   check_values, dataset, fail,
                   h5_strings, h5ad_frame, h5ad_matrix, h5ad_xy, listed, open_h5, read_gene_list,
                   read_h5ad, read_h5ad_sparse, read_metadata, text_attr)
from protocols import dataset_slides, harmonise_gene_names


# ----------------------------------------------------------------------------- placeholder encoder

# Ruifrok & Johnston (2001) optical-density colour vectors of haematoxylin and eosin (unit length).
STAINS = F.normalize(torch.tensor([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]]), dim=1)


@torch.no_grad()
def patch_statistics(images: torch.Tensor) -> torch.Tensor:
    """The built-in placeholder encoder: uint8 (B, H, W, 3) RGB patches -> (B, 48) float32 features.
    Eight maps at half resolution (R, G, B, haematoxylin and eosin optical density, gradient
    magnitude, nuclei mask, background mask) summarised over the whole patch and over 2x2 and 4x4
    grids of sub-patches (HiFusion's intra-spot hierarchy): whole-patch mean and std, then per grid
    the mean std inside a sub-patch (texture) and the std of the sub-patch means (heterogeneity). A
    weak stand-in for a pathology foundation model; any callable with this signature can replace it
    (`--encoder`)."""
    x = F.avg_pool2d(images.permute(0, 3, 1, 2).float(), 2) / 255  # (B, 3, H/2, W/2)
    od = -torch.log((x * 255 + 1) / 256)  # Beer-Lambert optical density
    stains = torch.einsum("bchw,sc->bshw", od, STAINS)                                # (B, 2, h, w)
    gray = x.mean(1, keepdim=True)
    grad = (F.pad(gray.diff(dim=3), (0, 1)) ** 2
            + F.pad(gray.diff(dim=2), (0, 0, 0, 1)) ** 2).sqrt()
    # (B, 8, h, w)
    maps = torch.cat([x, stains, grad, (stains[:, :1] > 0.5).float(), (gray > 0.85).float()], 1)
    cells = F.adaptive_avg_pool2d(torch.cat([maps, maps ** 2], 1), 4)  # (B, 16, 4, 4) moments
    feats = []
    for grid in (1, 2, 4):
        m = F.avg_pool2d(cells, 4 // grid)  # (B, 16, grid, grid)
        mean, std = m[:, :8], (m[:, 8:] - m[:, :8] ** 2).clamp_min(0).sqrt()
        feats += ([mean.flatten(1), std.flatten(1)] if grid == 1
                  else [std.mean((2, 3)), mean.flatten(2).std(2)])
    return torch.cat(feats, 1)                                                        # (B, 48)


def load_encoder(spec: str | None):
    """'module:callable' (importable from the current folder) -> the callable;
    None -> patch_statistics."""
    if not spec:
        return patch_statistics
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--encoder: expected 'module:callable', found {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"--encoder {spec}: expected an importable module:callable, found: {e}") from None
    if not callable(fn):
        raise ValueError(f"--encoder {spec}: expected a callable, found {type(fn).__name__}")
    return fn


def encode(fn, images: torch.Tensor, spec: str | None, path) -> torch.Tensor:
    """fn(images) as (B, C) float32, checked: one finite row per image (an encoder's mistake named
    with it)."""
    name = spec or "tessera-patch-statistics"
    try:
        out = torch.as_tensor(fn(images)).float()
    except Exception as e:  # noqa: BLE001 (a user's encoder can raise anything: named in one line)
        raise ValueError(f"{path}: --encoder {name}: failed on a batch of {len(images)} patches of "
                         f"{tuple(images.shape[1:3])} pixels: {type(e).__name__}: {e}") from None
    if out.ndim != 2 or len(out) != len(images):
        raise ValueError(f"{path}: --encoder {name}: expected ({len(images)}, C) features for "
                         f"{len(images)} patches, found shape {tuple(out.shape)}")
    bad = ~torch.isfinite(out)
    if bad.any():
        raise ValueError(f"{path}: --encoder {name}: expected finite features, found "
                         f"{int(bad.sum())} NaN or inf values in a batch of {len(images)} patches")
    return out


def sub_patches(images: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, W, 3) -> (B, r*r, H/r, W/r, 3): sub-patch s = r * ix + iy is the block
    images[:, iy*H/r:(iy+1)*H/r, ix*W/r:(ix+1)*W/r] (ix along x = columns, iy along y = rows)."""
    B, H, W, c = images.shape
    x = images.view(B, r, H // r, r, W // r, c)                   # (B, iy, h, ix, w, 3)
    return x.permute(0, 3, 1, 2, 4, 5).reshape(B, r * r, H // r, W // r, c)


def _check_patch_file(path, f, sub: int, builtin: bool = True) -> None:
    """A HEST patch file: `img` uint8 (N, H, W, 3) (square patches dividing by `sub` when given; at
    least 2 pixels per (sub-)patch side for the built-in encoder, which halves them first), `coords`
    (N, 2) and `barcode` (N,) or (N, 1)."""
    what = "a dataset (HEST patches file)"
    img, coords, barcode = (dataset(path, f, key, what) for key in ("img", "coords", "barcode"))
    if img.ndim != 4 or img.shape[3] != 3 or img.dtype != np.uint8:
        fail(path, "img", "uint8 (N, H, W, 3)", f"{img.dtype} {img.shape}")
    if sub and (img.shape[1] % sub or img.shape[2] % sub or img.shape[1] != img.shape[2]):
        fail(path, "img", f"patches whose height and width divide by --sub {sub} and are equal "
                          "(sub-spots tile a square)",
             f"shape {img.shape}")
    side = 2 * max(sub, 1)
    if builtin and min(img.shape[1:3]) < side:
        fail(path, "img", f"patches of at least {side} x {side} pixels for the built-in encoder"
             f"{f' with --sub {sub}' if sub else ''}", f"shape {img.shape}")
    if coords.shape != (len(img), 2):
        fail(path, "coords", f"shape ({len(img)}, 2), one row per patch", f"shape {coords.shape}")
    if barcode.shape not in ((len(img),), (len(img), 1)):
        fail(path, "barcode", f"shape ({len(img)},) or ({len(img)}, 1), one per patch",
             f"shape {barcode.shape}")


def embed_patches(patches_dir, out_dir, encoder: str | None = None, batch_size: int = 128,
                  overwrite: bool = False, log=print, sub: int = 0) -> list[Path]:
    """HEST patch files <id>.h5 (`img` (N, H, W, 3) uint8, `coords` (N, 2), `barcode` (N, 1)) -> one
    HEST-Benchmark embedding file <id>.h5 per slide (`embeddings`, `coords` copied, `barcodes`).
    `encoder` is 'module:callable' for your own encoder: it is called on uint8 tensors (B, H, W, 3)
    and returns (B, C) floats (e.g. a foundation model wrapped with its own resizing and
    normalisation); None uses the built-in patch_statistics. `sub` = 2 or 4 also embeds the r x r
    sub-patches of every patch with the same encoder (HiFusion's intra-spot hierarchy):
    `sub_embeddings` (N, r*r, C) in sub_patches order, and the attribute `patch_size_px` (W) from
    which import-hest derives sub_extent_um."""
    fn, written = load_encoder(encoder), []
    paths = inputs(patches_dir, "HEST patch files")
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, found {batch_size}")
    outputs = Outputs(out_dir, [p.name for p in paths], overwrite, inputs=[patches_dir, *paths],
                      command="hest.py embed", log=log)
    largest = 0
    for path in paths:                            # every patch file's layout before the first write
        with open_h5(path) as f:
            _check_patch_file(path, f, sub, builtin=encoder is None)
            largest = max(largest, int(np.prod(f["img"].shape[1:3])))
    check_embed_memory(batch_size, largest, encoder)
    with outputs:
        for path in paths:
            written.append(_embed_file(path, outputs, fn, encoder, batch_size, sub, log))
    return [Path(out_dir) / p.name for p in written]


# bytes per pixel of a batch in patch_statistics: the uint8 patches, their float copy, the half-size
# optical densities, stains, gradient and masks, and the 16 moment maps (about 52 B, rounded up)
ENCODER_BYTES_PER_PIXEL = 64


def check_embed_memory(batch_size: int, pixels: int, encoder: str | None, available=None) -> None:
    """Refuse a --batch-size whose batch of the largest patches does not fit in memory (a user's
    encoder: its input and a float copy, 15 bytes per pixel; the built-in one:
    ENCODER_BYTES_PER_PIXEL), with the --batch-size that would fit."""
    per = (15 if encoder else ENCODER_BYTES_PER_PIXEL) * pixels
    free = available_memory() if available is None else available
    fit = int(free // per)
    check_memory(batch_size * per, f"hest.py embed: --batch-size {batch_size} of {pixels} pixels "
                 "per patch", f"--batch-size {fit} would fit" if fit >= 1 else
                 "the patches are too large", available=free)


def inputs(folder, what: str) -> list[Path]:
    """The HDF5 files *.h5 of an input folder, sorted, leaving out hidden files (macOS's ._<name>
    resource forks, a killed command's temporaries); none is an error naming `what` was expected,
    and a folder a killed command left half written is refused (files.check_finished)."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".")) \
        if folder.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"{folder}: expected {what} *.h5, found none")
    check_finished(folder)
    return paths


def _embed_file(path, outputs, fn, encoder, batch_size, sub, log) -> Path:
    """One patch file -> its embedding file, written through `outputs` (embed_patches)."""
    t0, out = time.time(), outputs.path(path.name)
    with open_h5(path) as f:
        img = f["img"]
        size_px = img.shape[2]
        emb = torch.cat([encode(fn, torch.from_numpy(img[i:i + batch_size]), encoder, path)
                         for i in range(0, img.shape[0], batch_size)]).numpy()
        if sub:
            step = max(1, batch_size // (sub * sub))
            sub_emb = torch.cat([
                encode(fn, sub_patches(torch.from_numpy(img[i:i + step]), sub).flatten(0, 1),
                       encoder, path).view(-1, sub * sub, emb.shape[1])
                for i in range(0, img.shape[0], step)]).numpy()
        coords, barcodes = f["coords"][()], h5_strings(f["barcode"]).reshape(-1)
    with h5py.File(out, "w") as g:
        g["embeddings"], g["coords"] = emb, coords
        g.create_dataset("barcodes", data=barcodes.astype(object), dtype=STR)
        g.attrs["encoder"] = encoder or "tessera-patch-statistics"
        g.attrs["patch_size_px"] = size_px
        if sub:
            g["sub_embeddings"] = sub_emb
    log(f"embed {path.stem}: {len(emb)} patches -> {emb.shape[1]} features in "
        f"{time.time() - t0:.1f} s")
    return path


# ----------------------------------------------------------------------------- HEST import

def _check_embedding_file(path) -> tuple[np.ndarray, np.ndarray | None]:
    """A HEST-Benchmark embedding file, checked without holding it: `embeddings` (N, C) finite and
    within files.FEATURE_BOUND, `barcodes` (or `barcode`) (N,) or (N, 1) unique, optional `coords`
    (N, 2) and `sub_embeddings` (N, S, C). Returns (barcodes, coords or None) for
    _check_positions."""
    with open_h5(path) as f:
        emb = dataset(path, f, "embeddings", "a dataset (HEST-Benchmark embedding file)")
        barcodes = h5_strings(dataset(
            path, f, "barcodes" if "barcodes" in f or "barcode" not in f else "barcode",
            "a dataset (HEST-Benchmark embedding file)")).reshape(-1)
        if emb.ndim != 2 or len(emb) != len(barcodes):
            fail(path, "embeddings", f"shape ({len(barcodes)}, C), one row per barcode",
                 f"shape {emb.shape}")
        if len(set(barcodes)) < len(barcodes):
            fail(path, "barcodes", "unique barcodes",
                 f"{len(barcodes) - len(set(barcodes))} duplicates")
        check_values(path, "embeddings", emb)
        if "sub_embeddings" in f:
            sub = dataset(path, f, "sub_embeddings")
            if sub.ndim != 3 or sub.shape[0] != len(emb) or sub.shape[2] != emb.shape[1]:
                fail(path, "sub_embeddings",
                     f"shape ({len(emb)}, S, {emb.shape[1]}) beside 'embeddings'",
                     f"shape {sub.shape}")
            check_values(path, "sub_embeddings", sub)
        coords = None
        if "coords" in f:
            coords = dataset(path, f, "coords")[()]
            if coords.shape != (len(emb), 2):
                fail(path, "coords", f"shape ({len(emb)}, 2), one row per barcode",
                     f"shape {coords.shape}")
    return barcodes, coords


def _read_embeddings(path) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None, float]:
    """A HEST-Benchmark embedding file that _check_embedding_file accepted: `embeddings` (N, C),
    `barcodes`, optional `sub_embeddings` (N, S, C) and attribute patch_size_px; -> (emb, barcodes,
    encoder, sub, patch_size_px)."""
    with open_h5(path) as f:
        emb = f["embeddings"][()]
        barcodes = h5_strings(
            f["barcodes" if "barcodes" in f or "barcode" not in f else "barcode"]).reshape(-1)
        encoder = text_attr(f, "encoder", Path(path).parent.name)
        sub = f["sub_embeddings"][()] if "sub_embeddings" in f else None
        patch_px = float(f.attrs.get("patch_size_px", float("nan")))
    return emb, barcodes, encoder, sub, patch_px


def _h5ad_gene_totals(path, harmonise: bool = False) -> dict[str, float]:
    """Total counts per gene of one h5ad, straight from the sparse arrays (harmonised names
    summed)."""
    with open_h5(path, "AnnData file") as f:
        genes, _ = h5ad_frame(f, "var")
        _, cols, values, _ = h5ad_matrix(f)
    totals = {}
    for g, t in zip(harmonise_gene_names(genes) if harmonise else genes,
                    np.bincount(cols, weights=values, minlength=len(genes))):
        totals[g] = totals.get(g, 0.0) + t if harmonise else t
    return totals


def _h5ad_gene_names(path, harmonise: bool = False) -> set[str]:
    with open_h5(path, "AnnData file") as f:
        genes = h5ad_frame(f, "var")[0]
    return set(harmonise_gene_names(genes) if harmonise else genes)


def _check_positions(emb_path, st_path, emb_barcodes, coords) -> None:
    """The embedding file belongs to the expression file: for the barcodes both have, the patch
    centres (`coords`, pixels) sit where the spots are, up to one shift for the whole slide (HEST
    stores a patch's corner, half a patch from the spot). Barcodes repeat across Visium slides, so a
    swapped pair of files still joins; their positions do not. Refused when over 1% of the shared
    spots are off by more than a quarter of the spot spacing (files without `coords` are not
    checked)."""
    if coords is None:
        return
    coords = np.asarray(coords, dtype=np.float64)
    with open_h5(st_path, "AnnData file") as f:
        barcodes, obs = h5ad_frame(f, "obs")
        xy = h5ad_xy(f, obs)
    if xy is None or len(xy) != len(barcodes):
        return                                  # reported by the import itself
    row_of = {b: i for i, b in enumerate(emb_barcodes)}
    both = [(i, row_of[b]) for i, b in enumerate(barcodes) if b in row_of]
    if len(both) < 2:
        return
    spot, patch = (np.array(x) for x in zip(*both))
    shift = coords[patch] - xy[spot]
    off = np.linalg.norm(shift - np.median(shift, 0), axis=1)
    spacing = lattice.median_nn_distance(torch.from_numpy(xy[spot]))
    far = off > max(0.25 * spacing, 1.0)
    if far.mean() > 0.01:
        fail(emb_path, "coords",
             f"the patch positions of the spots of {st_path} (the same barcodes at the same "
             "places, up to one shift)",
             f"{int(far.sum())} of {len(both)} shared barcodes elsewhere, up to "
             f"{off.max():.0f} px off (spot spacing {spacing:.0f} px): embedding files swapped "
             "between slides?")


def _check_import(pairs, wanted, genes_source, harmonise: bool) -> None:
    """Before the first file is written: every expression file passes read_h5ad's checks (its
    sparse arrays, counts, centres and names), every slide keeps a gene, every embedding file is
    whole (_check_embedding_file) and its patches lie on its expression file's spots."""
    for p, st in pairs:
        read_h5ad(st, genes=[], rename=harmonise_gene_names if harmonise else None,
                  counts=True)                  # its arrays, counts, centres and names
        if wanted is not None:
            have = _h5ad_gene_names(st, harmonise)
            if not any(g in have for g in wanted):
                raise CacheError(f"{genes_source}: expected genes that {st} has, found none of the "
                                 f"{len(wanted)} ({listed(wanted)}): the cache would have 0 genes")
        _check_positions(p, st, *_check_embedding_file(p))


def skipped(pairs, st_dir, features_dir, table: dict, log, every_section: bool = True) -> None:
    """One line for the embedding files without an expression file, one for the sections of --st
    without an embedding file (`every_section`: when the import takes every section it finds); with
    the metadata's has_image, how many of those have no H&E image to embed."""
    no_st = [p.stem for p, st in pairs if not st.exists()]
    if no_st:
        log(f"import-hest: skipped {len(no_st)} embedding file(s) of {features_dir} without an "
            f"expression file <id>.h5ad in {st_dir}: {listed(no_st)}")
    sections = sorted(s.stem for s in Path(st_dir).glob("*.h5ad"))
    embedded = {p.stem for p, _ in pairs}
    no_features = [s for s in sections if s not in embedded] if every_section else []
    if no_features:
        blank = [s for s in no_features if str(table.get(s, {}).get("has_image", "")).lower() in
                 ("false", "0", "no")]
        why = f"; {len(blank)} of them have no H&E image (has_image false in --meta)" * bool(blank)
        log(f"import-hest: skipped {len(no_features)} of the {len(sections)} sections of {st_dir}: "
            f"no embedding file <id>.h5 in {features_dir}{why}: {listed(no_features)}")


def import_hest(st_dir, features_dir, out_dir, meta=None, genes=None, max_genes: int | None = None,
                overwrite: bool = False, log=print, dataset: str | None = None,
                harmonise: bool = False) -> list[Path]:
    """HEST-1k `st/<id>.h5ad` + HEST-Benchmark embedding files `<id>.h5` -> slide caches
    `<out>/<id>.h5`. Spots are joined by barcode (one line per slide reports the unmatched); centres
    come from the h5ad and become micrometres with the metadata's pixel_size_um_estimated; patient
    from its `patient` column (else the slide id); pitch from inter_spot_dist. All genes are kept
    unless `genes` (a gene list file) or `max_genes` (top by total counts over all slides) restricts
    them; library_size is always the total over all genes. `dataset` ('hist:brain') imports exactly
    the slides a paper lists (configs/protocols/<paper>_slides.yaml) and refuses, before writing
    anything, if any is missing; `harmonise` applies HiST's gene-name harmonisation (read_h5ad).
    `sub_embeddings` (embed --sub) become sub_features, with sub_extent_um = patch_size_px x the
    pixel size."""
    if max_genes is not None and max_genes < 1:
        raise ValueError(f"--max-genes: expected an integer >= 1, found {max_genes}")
    table = read_metadata(meta) if meta else {}
    pairs = [(p, Path(st_dir) / f"{p.stem}.h5ad") for p in inputs(features_dir, "embedding files")]
    if dataset:
        listing, ids = dataset_slides(dataset)
        have = {p.stem for p, st in pairs if st.exists()}
        missing = [s for s in ids if s not in have]
        if missing:
            raise CacheError(f"{listing}: {dataset}: {len(missing)} of {len(ids)} slides have no "
                             f"embedding file in {features_dir} or no expression file in {st_dir}: "
                             f"{listed(missing, 20)}")
        pairs = [(p, st) for p, st in pairs if p.stem in set(ids)]
    if not pairs:
        raise FileNotFoundError(f"{features_dir}: expected embedding files *.h5, found none")
    skipped(pairs, st_dir, features_dir, table, log, dataset is None)
    pairs = [(p, st) for p, st in pairs if st.exists()]
    wanted = read_gene_list(genes) if genes else None
    if max_genes is not None:
        totals = {}
        for _, st in pairs:
            for g, t in _h5ad_gene_totals(st, harmonise).items():
                totals[g] = totals.get(g, 0.0) + t
        wanted = sorted(totals, key=lambda g: -totals[g])[:max_genes]
    outputs = Outputs(out_dir, [f"{p.stem}.h5" for p, _ in pairs], overwrite,
                      inputs=[st_dir, features_dir, *(p for pair in pairs for p in pair)],
                      command="hest.py import-hest", log=log)
    _check_import(pairs, wanted, genes or f"--max-genes {max_genes}", harmonise)
    with outputs:
        written = [w for p, st in pairs for w in _import_one(p, st, outputs, table, meta, wanted,
                                                             harmonise, overwrite, log)]
    return [Path(out_dir) / w.name for w in written]


def _meta_number(meta, sid: str, row: dict, key: str) -> float:
    """A number of --meta's row of a slide (NaN when the cell is empty or absent); a cell that is
    not a number is an error naming the file, the column and the slide."""
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        fail(meta, key, f"a number for slide {sid}", repr(row.get(key))[:40])


def _import_one(p, st, outputs, table, meta, wanted, harmonise, overwrite, log) -> list[Path]:
    """One embedding file and its expression file -> [its cache] (or [] when no barcode matches),
    written through `outputs` (import_hest)."""
    sid, row = p.stem, table.get(p.stem, {})
    emb, feature_barcodes, encoder, sub_emb, patch_px = _read_embeddings(p)
    have = _h5ad_gene_names(st, harmonise)
    h = read_h5ad(st, genes=None if wanted is None else [g for g in wanted if g in have],
                  rename=harmonise_gene_names if harmonise else None, counts=True)
    if h.xy is None:
        fail(st, "obsm/spatial",
             "spot centres (obsm/spatial or obs pxl_col_in_fullres/pxl_row_in_fullres)", "neither")
    row_of = {b: i for i, b in enumerate(feature_barcodes)}
    matched = np.array([b in row_of for b in h.barcodes], dtype=bool)
    rows = np.array([row_of[b] for b in h.barcodes[matched]], dtype=np.int64)
    px = _meta_number(meta, sid, row, "pixel_size_um_estimated")
    n = int(matched.sum())
    line = (f"{sid}: {n} spots matched, {len(matched) - n} only in st, "
            f"{len(feature_barcodes) - n} only in features; {len(h.genes)} genes"
            + ("" if wanted is None else f" ({len(wanted) - len(h.genes)} of the list missing)"))
    if not px > 0:
        px, line = 1.0, line + "; no pixel_size_um_estimated, coords stay in pixels"
    if n == 0:
        log(line + "; skipped (check that barcodes use the same format)")
        return []
    slide = Slide(sid, torch.from_numpy(emb[rows]).float(),
                  torch.from_numpy(h.xy[matched] * px).float(),
                  h.barcodes[matched], patient=row.get("patient") or sid,
                  spot_pitch_um=_meta_number(meta, sid, row, "inter_spot_dist"), encoder=encoder,
                  counts=torch.from_numpy(h.counts[matched]), genes=h.genes,
                  library_size=torch.from_numpy(h.library_size[matched]).float())
    if sub_emb is not None:
        if not patch_px > 0:
            fail(p, "attrs/patch_size_px", "the patch width in pixels beside 'sub_embeddings'",
                 patch_px)
        slide.sub_features = torch.from_numpy(sub_emb[rows]).float()
        slide.sub_extent_um = patch_px * px
    write_slide(outputs.path(f"{sid}.h5"), slide, overwrite=True, where=f"{st} with {p}")
    known = '' if row or not meta else ' (not in --meta)'
    log(f"{line}; patient {slide.patient}{known} -> {outputs.folder / f'{sid}.h5'}")
    return [outputs.folder / f"{sid}.h5"]


# ----------------------------------------------------------------------------- binning square grids

def bin_slide(slide: Slide, factor: int, path=None) -> Slide:
    """A slide whose spots lie on a square grid (Visium HD bins, legacy ST) -> the slide at `factor`
    (2 or 4) times the pitch. The grid is the lattice with unit = the pitch (lattice.square_grid:
    gaps, jitter and a rotated image are fine); a coarse spot is one lattice parent, lattice.coarsen
    applied log2(factor) times. Counts, library_size and expected are summed over the children,
    features averaged; the children become sub_features / sub_valid / sub_counts at sub-position
    s = factor * ix + iy ((ix, iy) = the child's site modulo factor, ix along the grid axis nearest
    to x), and sub_extent_um = factor * pitch. A coarse spot's centre is the centre of its block of
    the fitted grid. The input's own sub-spot keys and pseudo-spots are not carried over."""
    if factor not in (2, 4):
        raise ValueError("bin --factor: expected 2 or 4 (sub_features hold 2 x 2 or 4 x 4 "
                         f"sub-patches), found {factor}")
    try:
        site, A, b = lattice.square_grid(slide.coords)
    except ValueError as e:
        raise CacheError(f"{path or slide.slide_id}: key 'coords': {e}") from None
    parent_site, parent = site, None
    for _ in range(factor.bit_length() - 1):                       # 2 -> once, 4 -> twice
        parent_site, up, _ = lattice.coarsen(parent_site)
        parent = up if parent is None else up[parent]
    ix, iy = (site % factor).unbind(1)
    m, S = len(parent_site), factor * factor
    flat = parent * S + factor * ix + iy                           # (N,) row of (parent, s); unique
    valid = torch.zeros(m * S, dtype=torch.bool)
    valid[flat] = True

    def place(x):  # (N, ...) -> (M, S, ...), zeros elsewhere
        return None if x is None else x.new_zeros(m * S, *x.shape[1:]).index_copy_(0, flat, x).view(
            m, S, *x.shape[1:])

    def total(x):  # (N, ...) -> (M, ...) summed over children
        return None if x is None else x.new_zeros(m, *x.shape[1:]).index_add_(0, parent, x)

    sub_features = place(slide.features)
    features = sub_features.float().sum(1) / valid.view(m, S).sum(1, keepdim=True)
    pitch = float(A.norm(dim=0).mean())
    centre = (factor * parent_site.double() + (factor - 1) / 2) @ A.T + b
    return Slide(slide.slide_id, features.to(slide.features.dtype), centre.float(),
                 np.array([f"x{i}_y{j}" for i, j in parent_site.tolist()]), patient=slide.patient,
                 spot_pitch_um=factor * pitch, encoder=slide.encoder, counts=total(slide.counts),
                 genes=slide.genes, library_size=total(slide.library_size),
                 expected=total(slide.expected), sub_features=sub_features,
                 sub_valid=valid.view(m, S), sub_counts=place(slide.counts),
                 sub_extent_um=factor * pitch)


def bin_slides(slides_dir, factor: int, out_dir, overwrite: bool = False, log=print) -> list[Path]:
    """`bin_slide` on every cache of a folder; one cache per slide in out_dir (never the input
    folder), all or nothing (files.Outputs), after a memory check on the largest slide
    (bin_memory)."""
    paths = list_slides(slides_dir)
    outputs = Outputs(out_dir, [p.name for p in paths], overwrite, inputs=[slides_dir, *paths],
                      command="hest.py bin --slides", log=log)
    if factor not in (2, 4):
        raise ValueError(f"bin --factor: expected 2 or 4, found {factor}")
    metas = [read_slide_meta(p) for p in paths]
    n, c, g, path = max((m.n_spots, m.n_features, len(m.genes or []), p)
                        for m, p in zip(metas, paths))
    need = bin_memory(n, c, g, factor)
    fits = "--factor 2 would fit" if factor == 4 and bin_memory(n, c, g, 2) <= available_memory() \
        else "no --factor fits: bin on a machine with more memory"
    check_memory(need, f"hest.py bin --factor {factor}: {path} ({n} spots, {c} features, "
                 f"{g} genes)", fits)
    with outputs:
        for path in paths:
            t0, slide = time.time(), read_slide(path)
            coarse = bin_slide(slide, factor, path)
            write_slide(outputs.path(path.name), coarse, overwrite=True, where=path)
            log(f"bin {slide.slide_id}: {slide.n_spots} spots at "
                f"{coarse.spot_pitch_um / factor:.1f} um -> {coarse.n_spots} at "
                f"{coarse.spot_pitch_um:.1f} um in {time.time() - t0:.1f} s -> "
                f"{outputs.folder / path.name}")
    return [outputs.folder / p.name for p in paths]


def bin_memory(n: int, c: int, g: int, factor: int) -> float:
    """Bytes bin_slide may hold for a slide of n spots, c features and g genes: the slide in
    float32, its lattice (a few int64 per spot), and the coarse slide, whose sub-spot arrays have
    factor^2 slots per coarse spot: at most n x factor^2 slots when every spot lands in its own
    parent (the bound); doubled for the copies torch makes while placing, summing and writing."""
    slots = n * factor * factor
    return 2 * 4 * (n * (c + 2 * g + 64) + slots * (c + g + 1) + n * (c + 2 * g)) + 2 ** 26


def bin_cells(path, bin_um: float, out_dir, pixel_size_um: float = 1.0, overwrite: bool = False,
              log=print) -> Path:
    """A cell table (Xenium-like h5ad: one row per cell, counts, centres in obsm/spatial or obs x/y
    columns, in pixels of `pixel_size_um`) -> the same layout with one row per square bin of side
    `bin_um` micrometres, `<out>/<name>.h5ad`: counts summed over the bin's cells (sparse
    throughout), centre of the bin in pixels (obsm/spatial), grid position obs array_col /
    array_row, cell count n_cells. Bins are anchored at the smallest cell coordinate. import-hest
    then joins the bins with features embedded from patches at their centres, and `bin --slides`
    coarsens them further. A bin side so small that the grid's bin numbers would not fit in 64-bit
    integers is refused with one that would."""
    if not 0 < bin_um < float("inf") or not 0 < pixel_size_um < float("inf"):
        raise ValueError(f"bin --bin-um {bin_um} --pixel-size {pixel_size_um}: expected positive, "
                         "finite micrometres")
    path = Path(path)
    outputs = Outputs(out_dir, [f"{path.stem}.h5ad"], overwrite, inputs=[path.parent, path],
                      command="hest.py bin --cells", log=log)
    t0 = time.time()
    cells, obs, genes, (rows, cols, values), xy = read_h5ad_sparse(path, counts=True)
    if xy is None:
        fail(path, "obsm/spatial", "cell centres (obsm/spatial or obs x/y columns)", "neither")
    if len(cells) == 0:
        fail(path, "obs", "at least one cell", "none")
    um = np.asarray(xy, dtype=np.float64) * pixel_size_um
    lo, span = um.min(0), np.ptp(um, 0)
    if not np.isfinite(span).all() or (span / bin_um >= 2 ** 30).any():
        fit = float(span.max()) / 2 ** 30 * 1.01 if np.isfinite(span).all() else float("nan")
        raise ValueError(f"{path}: bin --bin-um {bin_um:g}: the cells span {span[0]:.4g} x "
                         f"{span[1]:.4g} um, more than 2^30 bins a side; --bin-um {fit:.3g} would "
                         "fit")
    ij = np.floor((um - lo) / bin_um).astype(np.int64)              # (cells, 2) bin of each cell
    keys, bin_of = np.unique(ij[:, 0] * (ij[:, 1].max() + 1) + ij[:, 1], return_inverse=True)
    bins = np.stack([keys // (ij[:, 1].max() + 1), keys % (ij[:, 1].max() + 1)], 1)
    pair, summed = np.unique(bin_of[rows] * len(genes) + cols, return_inverse=True)
    total = np.bincount(summed, weights=values)                     # counts summed per (bin, gene)
    centre = ((bins + 0.5) * bin_um + lo) / pixel_size_um           # back to pixels, as the input
    row, col = pair // len(genes), pair % len(genes)                # sorted by (bin, gene):
                                                                    # CSR order
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=len(bins)))])
    X = files.CSR(total.astype(np.float32), col.astype(np.int32), indptr.astype(np.int64),
                  (len(bins), len(genes)))
    with outputs:
        files.write_anndata(outputs.path(f"{path.stem}.h5ad"), X,
                            [f"x{i}_y{j}" for i, j in bins.tolist()], genes,
                            obsm={"spatial": centre},
                            obs={"array_col": bins[:, 0], "array_row": bins[:, 1],
                                 "n_cells": np.bincount(bin_of)})
    out = outputs.folder / f"{path.stem}.h5ad"
    log(f"bin {path.stem}: {len(cells)} cells -> {len(bins)} bins of {bin_um:g} um in "
        f"{time.time() - t0:.1f} s -> {out}")
    return out


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    ap = argparse.ArgumentParser(prog="hest.py",
                                 description="Build tessera slide caches from HEST-1k (DATA.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import-hest",
                       help="HEST st/<id>.h5ad + embedding files <id>.h5 -> slide caches")
    p.add_argument("--st", required=True, help="folder of <id>.h5ad files")
    p.add_argument("--features", required=True,
                   help="folder of <id>.h5 embedding files (embeddings, coords, barcodes)")
    p.add_argument("--out", required=True, help="output folder (never one of the inputs)")
    p.add_argument("--meta",
                   help="metadata.csv with id, patient, pixel_size_um_estimated, inter_spot_dist")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--genes", help="gene list: JSON {\"genes\": [...]} or one gene per line")
    g.add_argument("--max-genes", type=int,
                   help="keep the N genes with the most counts over all slides")
    p.add_argument("--dataset", help="import exactly the slides a paper lists, e.g. hist:brain "
                   "(configs/protocols/<paper>_slides.yaml); an id missing from the inputs is "
                   "an error")
    p.add_argument("--harmonise", action="store_true",
                   help="HiST's gene harmonisation: strip assembly prefixes "
                   "and '.' suffixes, upper-case, sum genes and barcodes that then repeat")
    p = sub.add_parser("embed", help="HEST patch files <id>.h5 -> embedding files <id>.h5 "
                                     "(placeholder encoder)")
    p.add_argument("--patches", required=True,
                   help="folder of HEST patch files (img, coords, barcode)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", help="module:callable taking uint8 (B, H, W, 3) and returning "
                   "(B, C) float; default: the built-in colour/texture statistics (a weak "
                   "stand-in for a foundation model)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sub", type=int, default=0, choices=[0, 2, 4],
                   help="also embed the 2 x 2 or 4 x 4 sub-patches of every patch (sub_embeddings)")
    p = sub.add_parser("bin", help="caches on a square grid -> caches at factor x the pitch, "
                                   "children as sub-spots")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--slides", help="folder of slide caches whose spots lie on a square grid")
    g.add_argument("--cells",
                   help="a cell table .h5ad (Xenium-like) to bin into squares of --bin-um")
    p.add_argument("--factor", type=int, default=2, choices=[2, 4],
                   help="--slides: bin side in grid pitches")
    p.add_argument("--bin-um", type=float, help="--cells: bin side in micrometres")
    p.add_argument("--pixel-size", type=float, default=1.0,
                   help="--cells: micrometres per coordinate unit")
    p.add_argument("--out", required=True, help="output folder (never the input folder)")
    for name in ("import-hest", "embed", "bin"):
        sub.choices[name].add_argument("--overwrite", action="store_true",
                                       help="replace existing output files")
        sub.choices[name].add_argument("--threads", type=int, default=0,
                                       help="CPU threads for torch (0: the default, threads.py)")
    a = ap.parse_args(argv)
    try:
        set_threads(a.threads)
        if a.cmd == "import-hest":
            import_hest(a.st, a.features, a.out, a.meta, a.genes, a.max_genes, a.overwrite,
                        dataset=a.dataset, harmonise=a.harmonise)
        elif a.cmd == "bin" and a.cells:
            if not a.bin_um:
                ap.error("bin --cells needs --bin-um")
            bin_cells(a.cells, a.bin_um, a.out, a.pixel_size, a.overwrite)
        elif a.cmd == "bin":
            bin_slides(a.slides, a.factor, a.out, a.overwrite)
        else:
            embed_patches(a.patches, a.out, a.encoder, a.batch_size, a.overwrite, sub=a.sub)
    except (ValueError, OSError) as e:  # the user's files or arguments: one line, no traceback
        raise SystemExit(" ".join(str(e).split())) from None


if __name__ == "__main__":
    main()

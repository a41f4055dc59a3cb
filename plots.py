"""Pictures of a run: spatial maps of measured, predicted, std, interval width and error per slide
and gene, the per-gene PCC histogram, a predicted-vs-measured density, the intervals' calibration
(nominal vs observed coverage), and one spot's signed attention over its neighbours (FEAST's
excitatory / inhibitory maps) for any attention mode.

Separate from eval.py because matplotlib is an optional dependency, imported only when a picture is
drawn (`_pyplot`). The attention of one spot is computed here too (torch only), since only the
attention command needs it.

    python plots.py plot runs/demo [--slide ID] [--genes G ... | --top K]
        -> runs/demo/plots/*.png
    python plots.py attention runs/demo --slide ID --spot BARCODE [--block K]
        -> runs/demo/attention/*.h5, .png
"""
from __future__ import annotations

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import hashlib
import math
import re
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

import checks
import conformal
import data
import eval as evaluation
from eval import choose_genes, fold_gene_scores, gene_scores  # the genes a map shows: by PCC
import files
import predict
import lattice
from attention import SpotAttention, signed_softmax

# longest side of a rasterised map: a 1M-bin slide costs one image, not 1M patches
MAX_PIXELS = 1200


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("pictures need matplotlib, which is not installed: pip "
                          "install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    """The figure as a PNG whose text chunk `Description` holds every title, legend and note drawn
    on it (one per line): what the picture says can be read from the file without looking."""
    text = "\n".join(picture_text(fig))
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Description": text})
    _pyplot().close(fig)
    return path


def picture_text(fig) -> list[str]:
    """The figure's title, then per panel its title, its legend's entries and its notes."""
    lines = [fig._suptitle.get_text()] if fig._suptitle is not None else []  # get_suptitle: 3.8+
    for ax in fig.axes:
        legend = ax.get_legend()
        lines += [t for t in [ax.get_title(), *(x.get_text() for x in ax.texts),
                              *(x.get_text() for x in (legend.get_texts() if legend else []))] if t]
    return lines


def _safe(name: str) -> str:
    """A name as a file name: characters outside [A-Za-z0-9._-] become "_", and a name that changed
    gets 8 hex digits of its hash, so that "A/B" and "A_B" never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(name))
    digest = hashlib.sha1(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return safe if safe == str(name) else f"{safe}-{digest}"


# ---------------------------------------------------------------- rasterised spots
def pitch_um(coords) -> float:
    """Spot pitch: the median distance to the nearest other spot (lattice.default_unit is
    that / 1.8)."""
    return 1.8 * lattice.default_unit(torch.as_tensor(np.asarray(coords, dtype=np.float64)))


def raster(coords, values, pitch: float, bounds=None, max_pixels: int = MAX_PIXELS):
    """Spots as discs of diameter `pitch` on an image, NaN where there is no spot. coords (N, 2) in
    um, values (N,). bounds (x0, x1, y0, y1) in um (default: the spots' extent plus half a pitch).
    Returns the image (rows = y) and its extent for imshow. Vectorised: one assignment per pixel
    offset of a disc."""
    xy, values = np.asarray(coords, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if bounds is None:
        bounds = (xy[:, 0].min() - pitch / 2, xy[:, 0].max() + pitch / 2,
                  xy[:, 1].min() - pitch / 2, xy[:, 1].max() + pitch / 2)
    x0, x1, y0, y1 = bounds
    px = max((x1 - x0) / max_pixels, (y1 - y0) / max_pixels, pitch / 16, 1e-9)  # um per pixel
    w, h = max(1, int(np.ceil((x1 - x0) / px))), max(1, int(np.ceil((y1 - y0) / px)))
    img = np.full((h, w), np.nan)
    ix, iy = ((xy[:, 0] - x0) / px).astype(np.int64), ((xy[:, 1] - y0) / px).astype(np.int64)
    r = pitch / 2 / px
    d = np.arange(-int(np.ceil(r)), int(np.ceil(r)) + 1)
    dx, dy = np.meshgrid(d, d)
    disc = (dx ** 2 + dy ** 2 <= max(r, 0.5) ** 2)
    for ox, oy in zip(dx[disc], dy[disc]):
        jx, jy = ix + ox, iy + oy
        ok = (jx >= 0) & (jx < w) & (jy >= 0) & (jy < h)
        img[jy[ok], jx[ok]] = values[ok]
    return img, (x0, x0 + w * px, y0 + h * px, y0)  # y down, as in the image of the slide


def _panel(fig, ax, img, extent, title, cmap, vmin, vmax, label):
    cm = _pyplot().get_cmap(cmap).with_extremes(bad=(0, 0, 0, 0))  # no spot: transparent
    im = ax.imshow(np.ma.masked_invalid(img), extent=extent, cmap=cm, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    ax.set_xlabel("x (µm)", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(label, fontsize=8)


# ---------------------------------------------------------------- maps of a run
def map_figure(slide_id, gene, coords, pred, true=None, std=None, path=None, n_models=None,
               level="", width=None, interval=None):
    """Measured, predicted, std, interval width (upper - lower of the `interval` interval) and error
    of one gene on one slide, side by side on the spot geometry.
    Measured and predicted share one colour scale; the error (predicted - measured) is centred on 0.
    `n_models`: the fold models behind the gene (in the title); one model without dropout passes has
    no spread (a std of zeros, or none), so its std panel is a note instead of a map. `level`: e.g.
    "level -1" (sub-spots)."""
    plt = _pyplot()
    pitch = pitch_um(coords)
    panels = []
    both = pred if true is None else np.concatenate([pred, true])
    lo, hi = np.percentile(both, [1, 99])
    hi = hi if hi > lo else lo + 1e-6
    if true is not None:
        panels.append((true, "measured", "viridis", lo, hi, "log1p expression"))
    panels.append((pred, "predicted", "viridis", lo, hi, "log1p expression"))
    if std is not None or (n_models == 1 and not level):  # one model, no dropout passes: no spread
        spread = std is not None and (n_models != 1 or np.any(std > 0))
        panels.append((std if spread else "one model: no spread", "std (uncertainty)", "magma", 0,
                       max(float(np.percentile(std, 99)), 1e-6) if spread else 1.0, "std"))
    # the full width; inf (too few calibration spots for the level) left out of the scale
    if width is not None:
        panels.append((width, f"{100 * interval:g}% interval width", "magma", 0,
                       max(float(np.percentile(np.nan_to_num(width, posinf=0.0), 99)), 1e-6),
                       "upper - lower"))
    if true is not None:
        err = pred - true
        e = max(float(np.percentile(np.abs(err), 99)), 1e-6)
        panels.append((err, "error (predicted - measured)", "RdBu_r", -e, e, "error"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False,
                             layout="constrained")
    for ax, (values, title, cmap, vmin, vmax, label) in zip(axes[0], panels):
        if isinstance(values, str):    # a note instead of a map of zeros
            ax.text(0.5, 0.5, values, ha="center", va="center", fontsize=11, transform=ax.transAxes)
            ax.set_title(title, fontsize=10)
            ax.set_axis_off()
            continue
        img, extent = raster(coords, values, pitch)
        _panel(fig, ax, img, extent, title, cmap, vmin, vmax, label)
    axes[0][0].set_ylabel("y (µm)", fontsize=8)
    pcc = ("" if true is None
           else f", PCC {evaluation.per_gene_pcc(pred[:, None], true[:, None])[0]:.3f}")
    models = "" if n_models is None else f", n_models {int(n_models)}"
    where = f"slide {slide_id}" + (f", {level}" if level else "")
    fig.suptitle(f"{gene} on {where}{pcc}{models} ({len(pred):,} spots)", fontsize=12)
    return _save(fig, path) if path else fig


def pcc_histogram(fold_scores: dict, run_name: str, path, where: str = "all slides"):
    """PCC of each gene in each fold (`fold_scores`: fold -> {gene: PCC}, eval.fold_gene_scores);
    the dashed line is pcc_gene as results.md gives it: the mean over folds of each fold's mean over
    genes."""
    v = np.array([x for scores in fold_scores.values() for x in scores.values()])
    pcc = float(np.mean([np.mean(list(s.values())) for s in fold_scores.values()]))
    n_genes, k = len({g for s in fold_scores.values() for g in s}), len(fold_scores)
    fig, ax = _pyplot().subplots(figsize=(6, 4), layout="constrained")
    ax.hist(v, bins=min(40, max(5, len(v) // 5)), color="#4c72b0", edgecolor="white")
    folds = f"{k} fold{'s' * (k > 1)}"
    ax.axvline(pcc, color="black", linestyle="--",
               label=f"pcc_gene {evaluation.number(pcc)} (mean over {folds} of the mean over "
                     "genes)")
    ax.axvline(np.median(v), color="#dd8452", linestyle=":",
               label=f"median {evaluation.number(np.median(v))}")
    ax.set(xlabel=f"PCC per gene and fold, over the fold's test spots ({where})",
           ylabel="genes x folds", title=f"{run_name}: per-gene PCC, {n_genes} genes, {folds}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def calibration_plot(curve: dict, run_name: str, path):
    """Nominal level vs observed test coverage (conformal.calibration_curve), and the constant
    width's."""
    fig, ax = _pyplot().subplots(figsize=(4.8, 4.4), layout="constrained")
    lo = min(curve["levels"] + curve["observed"] + curve["observed_constant"]) - 0.05
    ax.plot(curve["levels"], curve["observed"], "o-", curve["levels"], curve["observed_constant"],
            "s:", [lo, 1], [lo, 1], "k--")
    ax.set(xlim=(lo, 1), ylim=(lo, 1), xlabel="nominal level (calibration slides)",
           ylabel="observed coverage (test slides)",
           title=f"{run_name}: split-conformal calibration")
    ax.legend([f"sigma {curve['sigma']}", "constant width", "nominal"], fontsize=8,
              loc="upper left")
    return _save(fig, path)


def density_plot(pred, true, run_name: str, path, bins: int = 120):
    """2-D histogram of (measured, predicted) over every test spot and gene, log colour scale."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    lo, hi = float(min(pred.min(), true.min())), float(max(pred.max(), true.max()))
    hist, xe, ye = np.histogram2d(true, pred, bins=bins, range=[[lo, hi], [lo, hi]])
    fig, ax = plt.subplots(figsize=(5.6, 4.8), layout="constrained")
    im = ax.imshow(np.ma.masked_equal(hist.T, 0), origin="lower",
                   extent=(xe[0], xe[-1], ye[0], ye[-1]), norm=LogNorm(), cmap="viridis",
                   aspect="equal", interpolation="nearest")
    ax.plot([lo, hi], [lo, hi], color="red", linewidth=0.8, label="predicted = measured")
    r = evaluation.per_gene_pcc(pred[:, None], true[:, None])[0]
    ax.set(xlabel="measured (log1p)", ylabel="predicted (log1p)")
    ax.set_title(f"{run_name}: {len(pred):,} values, PCC {r:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.colorbar(im, ax=ax, label="spot x gene values")
    return _save(fig, path)


def plot_run(run, slide=None, genes=None, top=None) -> list[Path]:
    """Maps for each slide and gene (and each other level the run predicts: sub-spots, coarser
    bins), a PCC histogram and a density plot (with truth) in RUN/plots/. Genes are ranked over the
    slides drawn; a chosen gene that a slide's fold did not predict is named in one line; nothing
    drawn is an error."""
    import sys
    _pyplot()  # without matplotlib: its one-line hint before anything else is said
    run = Path(run)
    files.refuse_links(run / "plots", run)       # RUN/plots is this command's folder: never a link
    data.check_writable(run / "plots", "the plots folder")
    paths = evaluation.prediction_files(run)
    # every prediction file is read whole, and pred and true concatenated once more (density_plot)
    need = sum(2 * files.h5_bytes(p) for p in paths)
    files.check_memory(need, f"plots.py plot: the {len(paths)} prediction files of {run}",
                       "draw one slide at a time (--slide ID)")
    predictions = [files.read_predictions(p) for p in paths]
    if slide is not None:
        ids = [f["slide_id"] for f in predictions]
        if slide not in ids:
            raise ValueError(f"slide {slide}: not among the {len(ids)} slides of {run} "
                             f"({files.listed(ids, 8)})")
        paths, predictions = zip(*[(p, f) for p, f in zip(paths, predictions)
                                   if f["slide_id"] == slide])
    fold_scores = fold_gene_scores(predictions, [p.parent for p in paths])
    scores = gene_scores(fold_scores)
    chosen = choose_genes(scores, genes, top)
    out, written, maps, lacking = run / "plots", [], 0, {}
    for f in predictions:
        column = {g: i for i, g in enumerate(f["genes"])}
        for g in chosen:   # genes are chosen per fold: a slide's fold may not predict one
            if g not in column:
                lacking.setdefault(g, []).append(f["slide_id"])
        for g in (g for g in chosen if g in column):
            i = column[g]
            n_models = None if f["n_models"] is None else int(f["n_models"][i])
            col = lambda k: None if f[k] is None else f[k][:, i]  # noqa: E731
            written.append(map_figure(f["slide_id"], g, f["coords"], f["pred"][:, i],
                                      col("true"), col("std"),
                                      out / f"{_safe(f['slide_id'])}__{_safe(g)}.png", n_models,
                                      width=None if f["lower"] is None
                                      else col("upper") - col("lower"),
                                      interval=f["interval"]))
            # model.out_levels: sub-spots (k < 0), bins (k > 0)
            for k, level in sorted(f["levels"].items()):
                written.append(map_figure(f["slide_id"], g, level["coords"], level["pred"][:, i],
                                          level["true"][:, i] if "true" in level else None, None,
                                          out / f"{_safe(f['slide_id'])}__{_safe(g)}__level{k}.png",
                                          n_models,
                                          f"level {k} "
                                          f"({'sub-spots' if k < 0 else 'coarser bins'})"))
            maps += 1
    if lacking:
        print("plots.py plot: not drawn where a slide's fold chose other genes: " + "; ".join(
            f"{g} not on {files.listed(s, 8)}" for g, s in list(lacking.items())[:8])
            + (" ..." if len(lacking) > 8 else ""), file=sys.stderr)
    if not maps:
        raise ValueError(f"no map drawn: none of {files.listed(chosen, 8)} is predicted on "
                         f"{'slide ' + slide if slide else 'any slide'} of {run}")
    labelled = [f for f in predictions if f["true"] is not None]
    if labelled:
        written.append(pcc_histogram(fold_scores, run.name, out / "pcc_hist.png",
                                     f"slide {slide}" if slide else "all slides"))
        written.append(density_plot(np.concatenate([f["pred"].ravel() for f in labelled]),
                                    np.concatenate([f["true"].ravel() for f in labelled]), run.name,
                                    out / "density.png"))
        if any(run.glob("fold_*/calibration.h5")):
            written.append(calibration_plot(conformal.calibration_curve(run), run.name,
                                            out / "calibration.png"))
    return written


# ---------------------------------------------------------------- one spot's signed attention
class _Captured(Exception):
    """Raised by the hook once the block's input is captured: the rest of the forward is not
    needed."""


def attention_blocks(model) -> list[tuple[str, SpotAttention]]:
    """The spot-to-spot attention modules of a model, in forward order (local stage, encoder,
    decoder)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, SpotAttention) and m.mode != "none"]


def _capture(model, module, slide, use_pseudo):
    """The input x (n, dim), level and knn_index of `module` in the model's forward on `slide`,
    taken by a forward pre-hook. Grad mode (with frozen parameters, so nothing is kept for a
    backward) makes the blocks call the module itself rather than the fast kernels' inference
    path."""
    seen = {}

    def hook(mod, args, kwargs):
        names = ("h", "level", "knn_index")
        seen.update({**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}})
        raise _Captured

    args, sub = predict.model_inputs(model, slide, use_pseudo, slide.features.device)
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    frozen = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        with torch.enable_grad():
            model(*args, **sub)
    except _Captured:
        pass
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
    if "h" not in seen:
        raise ValueError("the chosen attention block was not called in the forward")
    return seen["h"].detach(), seen["level"], seen.get("knn_index")


@torch.no_grad()
def query_attention(module: SpotAttention, x, level, row: int, knn_index=None) -> dict:
    """The signed attention weights of one query token `row` over its keys, with the module's own
    projections and bias (module.bias, the builder the model uses), without any other query: keys
    (K,) token rows, excitatory softmax(S + B) and inhibitory beta * softmax((-S + B) / tau) (H, K),
    attends (H, K): which heads see each key (split windows: a half of the heads per partition)."""
    H, dim = module.heads, module.dim
    Wq, Wk = module.qkv.weight[:dim], module.qkv.weight[dim:2 * dim]
    bq, bk = module.qkv.bias[:dim], module.qkv.bias[dim:2 * dim]
    keys, offsets, attends = module.query_keys(level, row, knn_index)
    q = F.linear(x[row], Wq, bq).view(H, 1, -1)                          # (H, 1, D)
    k = F.linear(x[keys], Wk, bk).view(len(keys), H, -1).transpose(0, 1)  # (H, K, D)
    s = (q @ k.transpose(-1, -2))[:, 0] / math.sqrt(q.shape[-1])         # (H, K)
    b = module.bias(offsets)                                             # (H, K) or None
    exc = signed_softmax(s, b, attends)
    inh = module.beta * signed_softmax(-s / module.tau, None if b is None else b / module.tau,
                                       attends) if module.beta else torch.zeros_like(exc)
    return {"keys": keys, "excitatory": exc * attends, "inhibitory": inh * attends,
            "attends": attends}


def _site_key(s: torch.Tensor) -> torch.Tensor:
    return s[:, 0] * (1 << 32) + s[:, 1]


def spot_attention(model, slide, barcode: str, block: int = 0, use_pseudo: bool = True) -> dict:
    """One spot's attention in one block of a tessera model: the query (the spot, or at a coarse
    level the region that holds it) and its keys with coordinates in um, labels (barcode, `token
    <row>` for a coarse region, `pseudo <j>` for an off-grid pseudo-spot), excitatory and inhibitory
    weights per head. Memory O(N): nothing is built over pairs of spots."""
    hits = np.flatnonzero(np.asarray(slide.barcodes) == barcode)
    if not len(hits):
        raise ValueError(f"spot {barcode}: no such barcode in slide {slide.slide_id} "
                         f"(e.g. {files.listed(slide.barcodes, 3)})")
    i = int(hits[0])
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError("the model has no spot-to-spot attention (a per-spot baseline, or "
                         "model.attention = none)")
    if not 0 <= block < len(blocks):
        raise ValueError(
            f"--block {block}: expected 0 ... {len(blocks) - 1} "
            f"({', '.join(f'{k}: {n} ({m.mode})' for k, (n, m) in enumerate(blocks))})")
    name, module = blocks[block]
    x, level, knn_index = _capture(model, module, slide, use_pseudo)
    coords = slide.coords.double()
    unit = model.cfg.unit_um or lattice.default_unit(slide.coords)
    # a pyramid level: its sites are the spot sites coarsened `scale` times
    if hasattr(level, "windows"):
        sites0, want = (lattice.to_lattice(slide.coords, unit),
                        torch.sort(_site_key(level.sites)).values)
        for scale in range(64):
            anc = torch.div(sites0, lattice.FACTOR ** scale, rounding_mode="floor")
            if torch.equal(torch.unique(_site_key(anc)), want):
                break
        else:
            raise ValueError(f"block {name}: its level's sites are not coarsened spot sites")
        order = torch.argsort(_site_key(level.sites))
        # (N,) each spot's token
        rows = order[torch.searchsorted(_site_key(level.sites)[order], _site_key(anc))]
        n_tok = len(level.sites)
        xy = torch.zeros(n_tok, 2, dtype=torch.float64).index_add_(0, rows, coords)
        # a token at the mean of its spots
        xy /= torch.bincount(rows, minlength=n_tok).clamp(min=1)[:, None]
        query, level_name = int(rows[i]), f"level {scale}"
        w = query_attention(module, x, level, query, knn_index)
        spot_of = torch.full((n_tok,), -1, dtype=torch.long)
        if scale == 0:
            spot_of[rows] = torch.arange(len(rows))
        labels = [f"token {k}" if spot_of[k] < 0 else str(slide.barcodes[spot_of[k]])
                  for k in w["keys"].tolist()]
    else:  # the k-NN local stage: rows are the spots (in the model's order), then the pseudo-spots
        xy, n = level.sites.double() * unit, len(coords)
        query, level_name = (int((xy - coords[i]).pow(2).sum(1).argmin()),
                             "local stage (spots + pseudo-spots)")
        w = query_attention(module, x, level, query, knn_index)
        labels = [f"pseudo {k - n}" if k >= n
                  else str(slide.barcodes[int((coords - xy[k]).pow(2).sum(1).argmin())])
                  for k in w["keys"].tolist()]
    keys = w["keys"]
    return {"slide_id": slide.slide_id, "barcode": barcode, "block": block, "block_name": name,
            "mode": module.mode, "level": level_name, "beta": float(module.beta),
            "tau": float(module.tau), "query_row": query, "query_xy": xy[query].float(),
            "keys": keys, "keys_xy": xy[keys].float(), "keys_label": np.array(labels, dtype=str),
            "excitatory": w["excitatory"], "inhibitory": w["inhibitory"], "attends": w["attends"],
            "spots_xy": slide.coords, "captured": (module, x, level, knn_index)}


def write_attention(result: dict, path) -> Path:
    """The h5 of one spot's attention: per head excitatory / inhibitory weights over the keys, keys'
    coordinates (um) and labels, which keys each head attends to, the query and the block."""
    strings = h5py.string_dtype("utf-8")
    with data.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for k in ("excitatory", "inhibitory", "attends", "keys_xy", "query_xy", "keys"):
            f[k] = result[k].numpy()
        f.create_dataset("keys_label", data=list(result["keys_label"]), dtype=strings)
        f.attrs.update({k: result[k]
                        for k in ("slide_id", "barcode", "block", "block_name", "mode", "level",
                                  "beta", "tau")})
        f.attrs["signed"] = "signed = excitatory - inhibitory (FEAST); rows: heads"
    return Path(path)


def attention_figure(result: dict, path) -> Path:
    """Per head, the excitatory and the inhibitory weights of the query over its keys, on the slide:
    all spots in grey, keys coloured, the query marked."""
    plt = _pyplot()
    H = result["excitatory"].shape[0]
    rows = 2 if result["beta"] else 1
    fig, axes = plt.subplots(rows, H, figsize=(3.6 * H + 0.4, 3.3 * rows + 0.8), squeeze=False,
                             layout="constrained")
    kxy, qxy, spots = (result["keys_xy"].numpy(), result["query_xy"].numpy(),
                       result["spots_xy"].numpy())
    pitch = pitch_um(kxy) if len(kxy) > 1 else pitch_um(spots)
    pad = 1.5 * pitch
    bounds = (kxy[:, 0].min() - pad, kxy[:, 0].max() + pad, kxy[:, 1].min() - pad,
              kxy[:, 1].max() + pad)
    grey, extent = raster(spots, np.ones(len(spots)), pitch_um(spots), bounds)
    branches = [("excitatory", "Reds")] + ([("inhibitory", "Blues")] if rows == 2 else [])
    for r, (branch, cmap) in enumerate(branches):
        w = result[branch].numpy()
        for h in range(H):
            ax = axes[r][h]
            ax.imshow(np.ma.masked_invalid(grey), extent=extent, cmap="Greys", vmin=0, vmax=4,
                      interpolation="nearest")
            seen = result["attends"][h].numpy()
            img, _ = raster(kxy[seen], w[h][seen], pitch, bounds)
            vmax = max(float(w[h][seen].max()) if seen.any() else 0.0, 1e-9)
            _panel(fig, ax, img, extent, f"head {h}: {branch}", cmap, 0.0, vmax, "weight")
            ax.plot(*qxy, marker="*", color="black", markersize=11, markeredgecolor="white")
    axes[0][0].set_ylabel("y (µm)", fontsize=8)
    signed = f"signed, beta {result['beta']:g}, tau {result['tau']:g}" if rows == 2 else "unsigned"
    fig.suptitle(f"spot {result['barcode']} on slide {result['slide_id']}, attention block "
                 f"{result['block']}\n{result['block_name']}: {result['mode']}, "
                 f"{result['level']}, {signed}", fontsize=10)
    return _save(fig, path)


def attention_command(run, slide_id, barcode, block=0, fold=None, slides_dir=None) -> list[Path]:
    """plots.py attention: RUN/attention/<slide>__<barcode>__block<K>.h5 and .png (the h5 first, so
    that the weights are there even without matplotlib)."""
    run = Path(run)
    files.refuse_links(run / "attention", run)
    data.check_writable(run / "attention", "the attention folder")
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}/config.yaml: not found; is this a run folder "
                                "(runs/<name>)?")
    cfg = predict.run_config(run)
    root = Path(slides_dir or cfg["data"]["root"])
    path = root / f"{slide_id}.h5"
    if not path.exists():
        known = sorted(p.stem for p in root.glob("*.h5"))
        raise ValueError(f"slide {slide_id}: no {path} (slides there: "
                         f"{files.listed(known, 8) or 'none'})")
    if fold is None:  # the fold that tested the slide, else the first finished one
        tested = [int(p.parts[-3][5:]) for p in run.glob(f"fold_*/pred/{slide_id}.h5")]
        fold = tested[0] if tested else predict.run_folds(run, partial=True)[0]
    fold = predict.run_folds(run, fold)[0]
    model, genes = predict.load_fold_models(run, "cpu", [fold])[0]
    meta = data.read_slide_meta(path)
    checks.check_inference_memory(model.cfg, meta.n_features, len(genes), meta.n_spots,
                                  f"plots.py attention: slide {slide_id}")
    result = spot_attention(model, data.read_slide(path), barcode, block, cfg["data"]["pseudo"])
    stem = run / "attention" / f"{_safe(slide_id)}__{_safe(barcode)}__block{block}"
    written = [write_attention(result, stem.with_name(stem.name + ".h5"))]
    try:
        return written + [attention_figure(result, stem.with_name(stem.name + ".png"))]
    except ImportError as e:
        raise ImportError(f"{written[0]} written; the PNG not: {e}") from None


def run_threads(run) -> int:
    """The run's run.threads (0 when the folder is not a run, e.g. a folder of prediction files)."""
    if not (Path(run) / "config.yaml").exists():
        return 0
    return (predict.run_config(run).get("run") or {}).get("threads", 0)


def main(argv: list[str] | None = None) -> None:
    """plots.py plot ... / plots.py attention ...: one-line errors, no traceback."""
    import argparse
    ap = argparse.ArgumentParser(prog="plots.py", description="Pictures of a run (matplotlib).")
    sub = ap.add_subparsers(dest="command", required=True)
    text = ("maps (measured, predicted, std, interval width, error) per slide and gene, PCC "
            "histogram, density, calibration")
    p = sub.add_parser("plot", help=text, description=text[0].upper() + text[1:] + ".")
    p.add_argument("run", help="run folder (fold_<k>/pred/*.h5) or a folder of prediction files")
    p.add_argument("--slide", help="one slide id (default: every slide)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--genes", nargs="+",
                   help="genes to map (default: best, median and worst by PCC)")
    g.add_argument("--top", type=int, help="the K best genes by PCC")
    p = sub.add_parser("attention", help="one spot's signed attention over its neighbours",
                       description="One spot's signed attention over its neighbours (FEAST "
                                   "excitatory / inhibitory maps).")
    p.add_argument("run", help="run folder")
    p.add_argument("--slide", required=True,
                   help="slide id, read from the run's data.root (or --slides)")
    p.add_argument("--spot", required=True, help="barcode of the query spot")
    p.add_argument("--block", type=int, default=0,
                   help="attention block, in forward order (default 0)")
    p.add_argument("--fold", type=int, default=None,
                   help="fold model (default: the fold that tested the slide)")
    p.add_argument("--slides", help="folder of slide caches (default: the run's data.root)")
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: the run's run.threads; 0 = "
                            "threads.py's default)")
    a = ap.parse_args(argv)
    try:
        predict.set_threads(run_threads(a.run) if a.threads is None else a.threads)
        written = plot_run(a.run, a.slide, a.genes, a.top) if a.command == "plot" else \
            attention_command(a.run, a.slide, a.spot, a.block, a.fold, a.slides)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, files.DiskFull) as e:
        raise SystemExit(f"plots.py {a.command}: {e}") from None
    for path in written:
        print(path)


if __name__ == "__main__":
    main()

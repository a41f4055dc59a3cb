"""Prediction with a trained run: the fold models of a run on slide caches (counts not needed),
their average, and how sure it is (the spread of the fold models and of Monte-Carlo dropout passes,
accumulated by Welford's update), written as h5 prediction files and / or AnnData .h5ad (files.py's
writers).

    python predict.py --run runs/<name> --slides DIR --out DIR [--mc N] [--format h5 h5ad]
train.py uses `write_slide_predictions` for a fold's test slides, so that test and new slides are
predicted the same way, and `calibrate_model` for a fold's split-conformal intervals; with one fold
(--fold, or a one-fold run) and the run's eval.mc_samples as --mc, new slides get that fold's
intervals too.
"""
from __future__ import annotations

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

import data
import lattice
from checks import (check_inference_memory, has_dropout, sized_model,
                    window_table_bytes)
from conformal import calibrate, read_calibration, write_calibration
from eval import expected_folds, level_outputs
from files import (DiskFull, Outputs, TooLarge, _array, check_memory, listed, not_an_input,
                   read_text, write_h5ad, write_predictions)
from model import ModelConfig, build_model


# ---------------------------------------------------------------- prediction with uncertainty
class Welford:
    """Running mean and spread of samples of an (N, G) array (Welford 1962): memory two (N, G)
    arrays whatever the number of samples, never one per sample. A sample may cover some columns
    only (`cols`: a fold model that predicts a subset of the genes); `count` (G,) says how many
    samples each column had."""

    def __init__(self, n: int, g: int, dtype=torch.float32):
        self.count = torch.zeros(g, dtype=torch.long)
        self.mean, self.m2 = torch.zeros(n, g, dtype=dtype), torch.zeros(n, g, dtype=dtype)

    def add(self, x: torch.Tensor, cols=None) -> None:
        cols = slice(None) if cols is None else torch.as_tensor(cols, dtype=torch.long)
        self.count[cols] += 1
        mean = self.mean[:, cols]  # a view (every column) or a copy (some)
        delta = x.to(mean.dtype) - mean
        mean += delta / self.count[cols]
        self.mean[:, cols] = mean
        self.m2[:, cols] += delta * (x - mean)

    def std(self) -> torch.Tensor:
        """Population standard deviation (numpy's default ddof=0) of each entry over its samples."""
        return (self.m2 / self.count.clamp(min=1)).sqrt()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run.device = cuda but no CUDA device is available")
    return torch.device(name)


# Visium's fiducial / spot diameter (spaceranger: fiducial_diameter_fullres / spot_diameter_fullres)
FIDUCIAL_PER_SPOT = 1.615
HIRES_PIXELS = 500  # longest side of the background image: small, the spots are drawn on top of it


def visium_spatial(slide_id: str, coords, spot_diameter_um: float) -> dict:
    """uns['spatial'] as spaceranger / scanpy.read_visium lay it out, so that sc.pl.spatial and
    squidpy draw a slide without arguments: {slide_id: {images: {hires}, scalefactors, metadata}}.
    Full-resolution pixels are micrometres here (obsm['spatial'] is in um: 1 um = 1 full-res unit).
    There is no H&E in a slide cache, so `hires` is a plain light background sized to the slide's
    extent at tissue_hires_scalef (sc.pl.spatial takes the spot size and the scale from an
    image)."""
    # (x, y) um from the origin
    far = np.maximum(_array(coords).max(0, initial=0.0), 1.0) + spot_diameter_um
    scalef = HIRES_PIXELS / float(far.max())
    w, h = (int(np.ceil(v * scalef)) + 1 for v in far)
    return {str(slide_id): {"images": {"hires": np.full((h, w, 3), 240, dtype=np.uint8)},
        "scalefactors": {"spot_diameter_fullres": float(spot_diameter_um),
                         "fiducial_diameter_fullres": float(spot_diameter_um * FIDUCIAL_PER_SPOT),
                         "tissue_hires_scalef": float(scalef),
                         "tissue_lowres_scalef": float(scalef) * 0.3},
        "metadata": {"source_image_path": "none: a plain background (no H&E in the slide cache)"}}}


def set_threads(n: int | None) -> None:
    """torch's CPU threads for this process: n > 0, or 0 / None = the default (threads.py). More
    threads than cores are refused: each costs a stack and a share of the cores, and torch crashes
    (segmentation fault) when asked for about a million."""
    cores = os.cpu_count() or 1
    if n is not None and not 0 <= n <= cores:
        raise ValueError(f"--threads {n}: expected a number of threads >= 0 and at most {cores} "
                         "(this machine's cores; 0: the default)")
    if n:
        torch.set_num_threads(int(n))


def target_floor(cfg: dict) -> float | None:
    """The least value a prediction of the run may take: 0 where the targets are log1p of counts,
    raw or per 1e4 (no count is below 0, and raising a value below 0 to 0 only moves it toward every
    possible truth); None for smoothed targets (data.smooth: a paper's own space, scored as it
    is) and where eval.floor is false (the predictions as the model gives them)."""
    smooth, floor = cfg["data"].get("smooth"), (cfg.get("eval") or {}).get("floor", True)
    return None if smooth or not floor else 0.0


def floored(out: dict, floor: float | None) -> dict:
    """A model output with "pred" and every other level's prediction raised to `floor` (in
    place)."""
    if floor is not None:
        for pred in [out["pred"], *out.get("levels", {}).values()]:
            pred.clamp_(min=floor)
    return out


@torch.no_grad()
def predict_slide(model, slide, use_pseudo: bool, device, dtype=torch.float32,
                  mc_seed: int | None = None, floor: float | None = None) -> torch.Tensor:
    """Log-space prediction (N, G) for one Slide, on the CPU, as `dtype`; bf16 autocast on CUDA.
    The model runs its low-memory inference path (eval, no grad). With `mc_seed`, one Monte-Carlo
    dropout pass: the same path with only the dropout layers (and attention dropout) switched to
    training, random numbers seeded by `mc_seed` so that reruns are identical, the global random
    state left as it was. `floor`: the least value a prediction may take (`target_floor`)."""
    return predict_outputs(model, slide, use_pseudo, device, dtype, mc_seed, floor=floor)["pred"]


def model_inputs(model, slide, use_pseudo: bool, device) -> tuple[list, dict]:
    """The model's arguments for one Slide, on `device`: [features, coords, pseudo-features,
    pseudo-coords] (pseudo-spots only with use_pseudo and when the slide has them) and the sub-spot
    inputs its model.sub_levels needs (data.sub_inputs)."""
    pseudo = use_pseudo and slide.pseudo_features is not None
    args = [slide.features, slide.coords, slide.pseudo_features if pseudo else None,
            slide.pseudo_coords if pseudo else None]
    sub = data.sub_inputs(slide, getattr(model.cfg, "sub_levels", 0))
    return ([None if a is None else a.to(device) for a in args],
            {k: v.to(device) for k, v in sub.items()})


@torch.no_grad()
def predict_outputs(model, slide, use_pseudo: bool, device, dtype=torch.float32,
                    mc_seed: int | None = None, inputs: tuple | None = None,
                    floor: float | None = None) -> dict:
    """`predict_slide`'s whole model output, on the CPU: "pred" (N, G) and, with model.out_levels,
    the other levels ("levels", "parents", "sub_index"; see `level_outputs`). `inputs`: model_inputs
    of the slide, already on the device (an ensemble moves a slide there once, not once per sample).
    Every prediction that is written or scored passes here, raised to `floor` (`target_floor`)."""
    args, sub = inputs or model_inputs(model, slide, use_pseudo, device)
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else [],
                               enabled=mc_seed is not None):
        if mc_seed is not None:
            torch.manual_seed(mc_seed)
        model.eval()
        if mc_seed is not None:   # dropout on, everything else in eval: the low-memory path stays
            for m in model.modules():
                m.train(isinstance(m, torch.nn.Dropout) or hasattr(m, "attn_drop"))
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = _to_cpu(model(*args, out_dtype=dtype, **sub))
        finally:
            model.eval()
    return floored(out, floor)


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return [_to_cpu(v) for v in x] if isinstance(x, (list, tuple)) else x


def _ensemble(models, slide, use_pseudo: bool, device, mc: int = 0, seed: int = 0, floor=None):
    """One pass over the samples (each fold model, times mc seeded dropout passes) accumulating the
    spot level and every other level of model.out_levels: genes (union, first-seen order), the spot
    level's Welford, {level: Welford} and the levels' geometry ("parents", "sub_index"; the same for
    all folds); `acc.variance`: a Welford of the predicted variances exp(log_var) (model.head_var),
    else None."""
    genes = list(dict.fromkeys(g for _, gs in models for g in gs))
    column = {g: i for i, g in enumerate(genes)}
    acc, levels, geometry = Welford(slide.n_spots, len(genes)), {}, {}
    acc.variance = None
    # the fold models share one config
    inputs = model_inputs(models[0][0], slide, use_pseudo, device)
    for m, (model, gs) in enumerate(models):
        cols = None if gs == genes else [column[g] for g in gs]
        for j in range(max(mc, 1)):
            out = predict_outputs(model, slide, use_pseudo, device, inputs=inputs, floor=floor,
                                  mc_seed=(seed * 1000003 + m * 1009 + j) if mc else None)
            acc.add(out["pred"], cols)
            if "log_var" in out:  # mean predicted variance over the samples
                if acc.variance is None:
                    acc.variance = Welford(slide.n_spots, len(genes))
                acc.variance.add(out["log_var"].float().exp(), cols)
            for k, v in out.get("levels", {}).items():
                levels.setdefault(k, Welford(len(v), len(genes))).add(v.float(), cols)
            geometry.update({key: out[key] for key in ("parents", "sub_index") if key in out})
    return genes, acc, levels, geometry


def predict_with_std(models, slide, use_pseudo: bool, device, mc: int = 0, seed: int = 0,
                     floor=None):
    """Mean and spread over the samples of the fold models (the ensemble) and, with mc > 0, of mc
    Monte-Carlo dropout passes per model (each seeded). `models`: [(model, genes)]; a gene is
    averaged over the models that predict it. Returns genes (union, first-seen order), mean (N, G),
    std (N, G) (population std over the samples) and n_models (G,) (models behind each gene)."""
    genes, acc, _, _ = _ensemble(models, slide, use_pseudo, device, mc, seed, floor)
    return genes, acc.mean, acc.std(), acc.count // max(mc, 1)


def predictive_std(acc: Welford, n_samples: int) -> torch.Tensor | None:
    """The predictive std of an ensemble: sqrt(mean predicted variance (model.head_var) + variance
    of the samples' means (folds, dropout passes)), the law of total variance; None where there is
    neither."""
    var = acc.variance.mean.clone() if acc.variance is not None else None
    if n_samples > 1:
        var = acc.std() ** 2 if var is None else var.add_(acc.std() ** 2)
    return None if var is None else var.sqrt_()


def sigma_kind(model_cfg, n_samples: int) -> str:
    """What the interval's sigma is: predicted | ensemble | predicted+ensemble | constant."""
    kinds = (["predicted"] * bool(getattr(model_cfg, "head_var", False))
             + ["ensemble"] * (n_samples > 1))
    return "+".join(kinds) or "constant"


def predict_spread(models, slide, use_pseudo: bool, device, mc: int = 0, seed: int = 0, floor=None):
    """genes, mean (N, G), predictive std (N, G) or None (`predictive_std`), n_models (G,)."""
    genes, acc, _, _ = _ensemble(models, slide, use_pseudo, device, mc, seed, floor)
    return genes, acc.mean, predictive_std(acc, len(models) * max(mc, 1)), acc.count // max(mc, 1)


def write_slide_predictions(models, slide, cfg: dict, device, out_dir, true=None,
                            fold="", mc: int = 0, formats=("h5",), seed: int = 0,
                            calibration: dict | None = None,
                            outputs: Outputs | None = None) -> None:
    """Predict one slide (every level in one pass over the samples) and write <slide>.h5 and/or
    <slide>.h5ad in out_dir; `std` (`predictive_std`) only where there is a spread (a variance head,
    several models or mc > 0). `true` (N, G): measured values on the models' genes (their union,
    first-seen order). The other levels of model.out_levels go to the h5 file (`level_outputs`).
    `calibration` {"q" (G,), "level"} (files.read_calibration): the split-conformal interval
    pred -+ q std (q alone for constant width) as `lower`, `upper`. `outputs` (files.Outputs of
    out_dir): the files go through it (all or nothing)."""
    genes, acc, level_acc, geometry = _ensemble(models, slide, cfg["data"]["pseudo"], device, mc,
                                                seed, target_floor(cfg))
    pred, n_models = acc.mean, acc.count // max(mc, 1)
    std = predictive_std(acc, len(models) * max(mc, 1))
    lower = upper = level = None
    if calibration is not None:
        half = torch.as_tensor(calibration["q"], dtype=pred.dtype)       # (G,)
        half = half if std is None else half * std                      # (N, G)
        lower, upper, level = pred - half, pred + half, calibration["level"]
    space = "log1p(counts / library_size * 1e4)" if cfg["data"]["normalize"] else "log1p(counts)"
    out = Path(out_dir) / slide.slide_id
    # model.ood_fallback: every model predicted the slide by its spatial ridge alone
    alone = all(getattr(m, "unlike_training", lambda f: False)(slide.features) for m, _ in models)

    def target(ext: str):
        return outputs.path(f"{slide.slide_id}.{ext}") if outputs is not None else f"{out}.{ext}"
    if "h5" in formats:
        levels = (level_outputs({"pred": pred, "levels": {k: a.mean for k, a in level_acc.items()},
                                 **geometry},
                                slide, cfg["data"]["normalize"], true is not None)
                  if level_acc else {})
        write_predictions(target("h5"), pred, genes, slide.barcodes, slide.coords, true=true,
                          slide_id=slide.slide_id, std=std, n_models=n_models.numpy(),
                          levels=levels, lower=lower, upper=upper, interval=level,
                          ridge_alone=alone)
    if "h5ad" in formats:
        import yaml
        in_training = any(slide.slide_id in (getattr(m, "trained_on", None) or ())
                          for m, _ in models)
        unit = lattice.default_unit(slide.coords)          # a nearest-neighbour pass: once
        pitch = slide.spot_pitch_um if slide.spot_pitch_um > 0 else 1.8 * unit
        uns = {"tessera": {"run": str(cfg["run"]["name"]), "fold": str(fold),
                           "slide_id": slide.slide_id, "X": f"predicted expression, {space}",
                           "mc_samples": int(mc), "in_training": int(in_training),
                           "ridge_alone": int(alone),
                           **({} if level is None else {"interval": float(level)}),
                           "spatial_units": "obsm['spatial'] in micrometres; uns['spatial'] "
                                            "full-res pixels are micrometres (1 um = 1 full-res "
                                            "unit); spot diameter = 0.55 x the spot pitch (Visium: "
                                            "55 um spots at 100 um)",
                           "config": yaml.safe_dump(cfg, sort_keys=False)},
               "spatial": visium_spatial(slide.slide_id, slide.coords, 0.55 * pitch)}
        # array_row / array_col: the spots' lattice sites
        # (lattice.py), as Visium's integer array positions
        sites = lattice.to_lattice(slide.coords, unit).numpy()
        n = slide.n_spots
        obs = {"slide": np.full(n, slide.slide_id, dtype=object), "array_row": sites[:, 1],
               "array_col": sites[:, 0], "in_tissue": np.ones(n, dtype=np.int64),
               "fold": np.full(n, str(fold), dtype=object), "in_training": np.full(n, in_training)}
        write_h5ad(target("h5ad"), pred, genes, slide.barcodes, slide.coords, std=std, true=true,
                   n_models=n_models.numpy(), uns=uns, obs=obs, lower=lower, upper=upper)


def calibrate_model(model, genes, slides, trues, cfg: dict, device, path) -> dict:
    """Split-conformal calibration of a fold's model on held-out slides (never its test slides),
    predicted as its test slides will be (same eval.mc_samples and seed): per-gene quantiles of
    |y - pred| / sigma at eval.interval (conformal.calibrate), saved with the scores to `path`
    (files.write_calibration); returns {"q", "level", "sigma"} for write_slide_predictions."""
    level, mc, seed = cfg["eval"]["interval"], cfg["eval"]["mc_samples"], cfg["train"]["seed"]
    preds, stds = [], []
    for s in slides:
        _, pred, std, _ = predict_spread([(model, genes)], s, cfg["data"]["pseudo"], device, mc,
                                         seed, target_floor(cfg))
        preds.append(pred)
        stds.append(std)
    sigma = sigma_kind(model.cfg, max(mc, 1))
    c = calibrate(preds, trues, None if stds[0] is None else stds, level)
    write_calibration(path, genes, level, sigma, c["q"], c["q_constant"], c["scores"],
                      c["scores_constant"], slides=[s.slide_id for s in slides])
    return {"q": c["q"], "level": level, "sigma": sigma}


# ---------------------------------------------------------------- prediction of new slides
def load_fold_models(run_dir, device="cpu", folds=None) -> list[tuple[torch.nn.Module, list[str]]]:
    """The model of every finished fold of a run (or of the given fold numbers), with its gene
    list."""
    models = []
    paths = sorted(Path(run_dir).glob("fold_*/model.pt")) if folds is None else \
        [Path(run_dir) / f"fold_{k}" / "model.pt" for k in folds]
    for path in paths:
        # weights_only: a shared or downloaded run folder
        # can hold tensors, numbers and strings, never code
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (pickle and zip errors have no common base class)
            raise ValueError(f"{path}: not loaded: expected a tessera model file of tensors, "
                             f"numbers and strings, found {str(e).splitlines()[0]}") from None
        model = _model_of(path, ck)
        model.trained_on = training_slides(path.parent)
        models.append((model.to(device).eval(), ck["genes"]))
    if not models:
        raise FileNotFoundError(f"{run_dir}: no fold_<k>/model.pt; is this a finished run "
                                "(runs/<name>)?")
    return models


def _model_of(path, ck) -> torch.nn.Module:
    """The model a loaded model file describes, its tensors checked against its model_config before
    the model is built (a downloaded run's model_config cannot make this process allocate more than
    the file holds): a mismatch is an error naming the file."""
    try:
        mc = ModelConfig.from_dict(ck["model_config"])
        in_dim, n_genes, state = int(ck["in_dim"]), len(ck["genes"]), ck["model"]
        # built with the model, and for a large w too large even for the meta device's sizes
        check_memory(window_table_bytes(mc), f"model.w = {mc.w}: window attention's slot-pair "
                     "tables", "a smaller model.w would fit")
        shell = sized_model(mc, in_dim, n_genes)        # on the meta device when large: no memory
        want = {k: v.numel() for k, v in shell.state_dict().items()}
        have = {k: v.numel() for k, v in state.items()}
    except TooLarge as e:                               # a model_config too large to build
        raise TooLarge(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: expected a tessera model file (model, model_config, in_dim, "
                         f"genes), found: {type(e).__name__}: {e}") from None
    # building the model never allocates more than the file holds (a buffer that grows when loaded,
    # such as the training slides' means of model.ood_fallback, starts empty)
    larger = [k for k in want if want[k] > have.get(k, 0)]
    if set(want) != set(have) or larger:
        diff = sorted(set(want) ^ set(have)) or larger
        raise ValueError(f"{path}: key 'model': expected the tensors its model_config describes, "
                         f"found others ({listed(diff, 3)})")
    meta = any(t.device.type == "meta" for t in shell.parameters())
    if meta:  # its own tensors, the buffers built from model_config (window slot tables) included
        size = sum(t.numel() * t.element_size() for t in [*shell.parameters(), *shell.buffers()])
        check_memory(size, f"{path}: the model its model_config describes",
                     "a smaller model.w or model.dim would fit")
    model = build_model(mc, in_dim, n_genes) if meta else shell
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: key 'model': expected the tensors its model_config describes, "
                         f"found: {str(e).splitlines()[-1].strip()}") from None
    return model


def training_slides(fold_dir: Path) -> list[str]:
    """The slides a fold's model trained on (its training and validation slides): from the run's
    folds.json (runs.py), or, for a run written before it, the slides the run's other folds tested
    (cross-validation trains each fold on the others' test slides)."""
    import json
    record, k = fold_dir.parent / "folds.json", int(fold_dir.name.split("_")[1])
    if record.exists():
        fold = json.loads(record.read_text())["folds"][k]
        return list(fold["train"]) + list(fold["val"])
    own = {p.stem for p in fold_dir.glob("pred/*.h5")}
    return sorted({p.stem for p in fold_dir.parent.glob("fold_*/pred/*.h5")} - own)


def out_of_fold(models, slide_id: str) -> list:
    """The models that did not train on `slide_id` (out-of-fold prediction); none is an error naming
    it."""
    unseen = [(m, gs) for m, gs in models if slide_id not in (getattr(m, "trained_on", None) or ())]
    if not unseen:
        raise ValueError(f"--exclude-training: slide {slide_id} was in the training set of "
                         "every fold model of the run, so no model can predict it out of fold")
    return unseen


def run_folds(run_dir, fold: int | None = None, partial: bool = False) -> list[int]:
    """The fold numbers to use: `fold`, or every fold of the run; an unknown fold, an unfinished
    one, or a partial run (unless `partial`) is an error that names the folds."""
    run = Path(run_dir)
    expected = expected_folds(run)
    have = [k for k in expected if (run / f"fold_{k}" / "model.pt").exists()]
    if fold is not None:
        if fold not in expected:
            raise ValueError(f"--fold {fold}: expected a fold number 0 ... "
                             f"{len(expected) - 1} of {run}")
        if fold not in have:
            raise FileNotFoundError(f"--fold {fold}: {run / f'fold_{fold}' / 'model.pt'} "
                                    "does not exist (unfinished fold)")
        return [fold]
    missing = [f"fold_{k}" for k in expected if k not in have]
    if not have:
        raise FileNotFoundError(f"{run}: no fold_<k>/model.pt; is this a finished run "
                                "(runs/<name>)?")
    if missing and not partial:
        raise FileNotFoundError(f"{run}: partial run, {', '.join(missing)} not finished; pass "
                                f"--partial to predict with the {len(have)} finished fold(s)")
    return have


def check_outputs(run_dir, out_dir, device) -> None:
    """What predict_run needs before any work: a usable --device, and an --out folder (or a place to
    make one) that is writable and outside every run folder: predicting into RUN/fold_<k>/pred would
    replace the fold's test predictions, which eval.py reads."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:<k>, found {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; pass "
                         "--device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    out, run = Path(out_dir).resolve(), Path(run_dir).resolve()
    # a run folder: folds.json, or config.yaml beside fold_<k> folders
    for place in (out, *out.parents):
        if place == run or (place / "folds.json").exists() or \
                ((place / "config.yaml").exists() and any(place.glob("fold_*"))):
            raise ValueError(f"{out_dir}: --out: expected a folder outside run folders, found one "
                             f"inside the run folder {place} (its predictions are eval.py's input)")
    data.check_writable(out_dir, "--out")


def predict_run(run_dir, slides_dir, out_dir, fold: int | None = None, device="cpu",
                overwrite: bool = False, mc: int = 0, formats=("h5",), partial: bool = False,
                seed: int = 0, threads: int | None = None,
                exclude_training: bool = False) -> list[Path]:
    """Predict every slide cache in `slides_dir` with the run's fold models (each gene averaged over
    the folds that predict it, `std` over the folds and mc dropout passes), or with one fold; one
    prediction file per slide and format in `out_dir`. Says which slides each fold model trained on
    and warns when a slide to predict is one of them (in-sample); `exclude_training`: each slide
    predicted only by the models that did not train on it. A slide with counts gets its measured
    values as `true` (`with_truth`). Every check runs before anything is written."""
    # before anything is read: inputs are never written over
    not_an_input(out_dir, slides_dir, run_dir)
    check_outputs(run_dir, out_dir, device)
    if not (Path(run_dir) / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}/config.yaml: not found; is this a run folder "
                                "(runs/<name>)?")
    cfg = run_config(run_dir)
    set_threads(cfg["run"].get("threads", 0) if threads is None else threads)
    folds = run_folds(run_dir, fold, partial)
    models = load_fold_models(run_dir, device, folds)
    if mc and not any(has_dropout(m) for m, _ in models):
        raise ValueError(f"--mc {mc}: the models of {run_dir} have no dropout (model.dropout and "
                         "model.attn_dropout are 0), so Monte-Carlo passes would all be equal")
    paths = data.list_slides(slides_dir)
    outputs = Outputs(out_dir, [f"{p.stem}.{ext}" for p in paths for ext in formats], overwrite,
                      inputs=[slides_dir, run_dir, *paths], command="predict.py")
    width, metas = models[0][0].feat_mean.shape[0], [data.read_slide_meta(p) for p in paths]
    for path, meta in zip(paths, metas):
        data.check_slide_id(path, meta)       # outputs are named after the file, never its content
        if meta.n_features != width:
            raise ValueError(f"{path}: features have {meta.n_features} columns, the models "
                             f"of {run_dir} expect {width} (another encoder?)")
        data.scan_slide(path)                 # every value, before the first slide is predicted
    n_genes = len({g for _, gs in models for g in gs})
    largest = max(metas, key=lambda m: m.n_spots)
    check_inference_memory(models[0][0].cfg, width, n_genes, largest.n_spots,
                           f"slide {largest.slide_id}", device)
    chosen = {meta.slide_id: out_of_fold(models, meta.slide_id) if exclude_training else models
              for meta in metas}
    for k, (m, _) in zip(folds, models):
        print(f"fold {k} model trained on {len(m.trained_on)} slide(s): {listed(m.trained_on, 12)}")
    for meta in metas:
        seen = [str(k) for k, (m, _) in zip(folds, models) if meta.slide_id in m.trained_on]
        if seen and not exclude_training:
            print(f"predict.py: warning: slide {meta.slide_id} was in the training set of "
                  f"fold model(s) {', '.join(seen)}: its prediction is in-sample "
                  "(--exclude-training predicts it out of fold)",
                  file=sys.stderr)
    # conformal intervals hold for the model they were
    # calibrated for: one fold's, as trained (same mc)
    cal_path = Path(run_dir) / f"fold_{folds[0]}" / "calibration.h5"
    calibration = read_calibration(cal_path) if len(folds) == 1 and cal_path.exists() and \
        mc == cfg["eval"]["mc_samples"] else None
    with outputs:                     # all or nothing: an error or a kill half-way leaves no file
        for path in paths:
            slide = data.read_slide(path)
            use = chosen[slide.slide_id]
            used = [k for k, m in zip(folds, models) if any(m[0] is u for u, _ in use)]
            slide, true = with_truth(slide, list(dict.fromkeys(g for _, gs in use for g in gs)),
                                     cfg)
            write_slide_predictions(use, slide, cfg, device, out_dir, true=true,
                                    fold=",".join(map(str, used)), mc=mc, formats=formats,
                                    seed=seed, calibration=calibration, outputs=outputs)
            unlike = [str(k) for k, (m, _) in zip(used, use)
                      if hasattr(m, "unlike_training") and m.unlike_training(slide.features)]
            ridge = (f"; unlike the training slides of fold {', '.join(unlike)}: predicted there "
                     "by the spatial ridge alone") if unlike else ""
            passes = f", {mc} dropout passes each" if mc else ""
            measured = "; measured values as true" if true is not None else ""
            print(f"{Path(out_dir) / slide.slide_id} ({', '.join('.' + f for f in formats)}): "
                  f"{slide.n_spots} spots ({len(use)} fold model(s){passes}{ridge}{measured})")
    return [outputs.folder / n for n in outputs.names]


def run_config(run_dir) -> dict:
    """The run's config.yaml (train.py writes it with every key; a run of an older tessera may
    lack the newer ones, which the readers here take at their defaults)."""
    import yaml
    return yaml.safe_load(read_text(Path(run_dir) / "config.yaml"))


def with_truth(slide, genes: list[str], cfg: dict):
    """(slide, true): for a slide with counts of every gene in `genes`, the slide on those genes and
    its measured values in the run's target space (N, G), as the fold's test predictions hold them;
    else (slide, None): no counts, a gene missing, smoothed targets (data.smooth, a step of
    training), or depth-normalised targets without the spots' library_size."""
    norm = cfg["data"]["normalize"]
    if slide.counts is None or cfg["data"].get("smooth") or not set(genes) <= set(slide.genes) or \
            (norm and slide.library_size is None):
        return slide, None
    slide = data.take_genes(slide, genes)
    return slide, data.log_targets(slide.counts, slide.library_size, normalize=norm)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="predict.py",
                                description="Predict slide caches (counts not needed) with a "
                                            "finished run's fold models.")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/demo")
    p.add_argument("--slides", required=True, help="folder of <slide>.h5 caches")
    p.add_argument("--out", required=True, help="output folder for the prediction files")
    p.add_argument("--fold", type=int, default=None,
                   help="use one fold's model instead of the ensemble")
    p.add_argument("--mc", type=int, default=0, help="Monte-Carlo dropout passes per model (std)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo dropout passes")
    p.add_argument("--format", choices=["h5", "h5ad"], nargs="+", default=["h5"],
                   help="h5 prediction files and/or AnnData .h5ad")
    p.add_argument("--partial", action="store_true",
                   help="predict with the finished folds of a partial run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
    p.add_argument("--exclude-training", action="store_true",
                   help="predict each slide only with the fold models that did not train on it "
                        "(out of fold)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: the run's run.threads; 0 = "
                        "threads.py's default)")
    a = p.parse_args(argv)
    try:
        for flag, value in (("--mc", a.mc), ("--seed", a.seed)):   # torch.manual_seed takes < 2^64
            if not 0 <= value < 2 ** 32:
                raise ValueError(f"{flag} {value}: expected an integer from 0 to 2^32 - 1")
        predict_run(a.run, a.slides, a.out, a.fold, a.device, a.overwrite, a.mc, tuple(a.format),
                    a.partial, a.seed, a.threads, a.exclude_training)
    except (FileNotFoundError, FileExistsError, ValueError, DiskFull) as e:
        sys.exit(f"predict.py: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()

"""Split-conformal prediction intervals per spot and gene (Vovk et al. 2005; Lei et al. 2018): the
per-gene quantile of normalised scores |y - pred| / sigma on held-out calibration slides, the
coverage and width of the intervals pred +- q sigma, and the calibration curve of a run (nominal vs
observed coverage at several levels, from the scores each fold saved in fold_<k>/calibration.h5).
predict.py calibrates a fold's model with `calibrate`, eval.py reports `interval_entries`, plots.py
draws the curve.
"""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np

from files import _array, atomic_path, read_predictions


def conformal_quantile(scores, level: float) -> np.ndarray:
    """Per column of scores (n, G) the split-conformal quantile at nominal coverage `level` (Vovk
    2005; Lei et al. 2018): the k-th smallest score, k = ceil((n + 1) level), i.e. the empirical
    quantile at ceil((n + 1) level) / n, the finite-sample correction that makes coverage >= level
    for an exchangeable new value; inf where k > n (too few calibration values for that level)."""
    s = np.sort(_array(scores), axis=0)
    n = s.shape[0]
    # the tolerance: (n + 1) * 0.9 is not exact in floating point
    k = max(1, math.ceil((n + 1) * level - 1e-9))
    return s[k - 1] if k <= n else np.full(s.shape[1], np.inf)


def calibration_split(slides: list, n: int, by_patient: bool, keep: int = 1) -> tuple[list, list]:
    """(training, calibration) slides of a fold: the last n held out to calibrate. With folds
    grouped by patient (`by_patient`), every slide of those slides' patients is held out, so that
    calibration meets patients the model has not seen, as the test fold does (a section whose
    neighbours trained the model would give too narrow intervals); unless that leaves fewer than
    `keep` slides to train on, when the n slides alone are held out."""
    held = set(range(max(0, len(slides) - n), len(slides)))
    if by_patient and held:
        patients = {slides[i].patient for i in held}
        whole = {i for i, s in enumerate(slides) if s.patient in patients}
        held = whole if len(slides) - len(whole) >= keep else held
    return ([s for i, s in enumerate(slides) if i not in held],
            [s for i, s in enumerate(slides) if i in held])


def held_out(slides: list, cfg: dict) -> tuple[list, list, list]:
    """(train, validation, calibration) slides of a fold (objects with .patient, in the fold's
    order): the last eval.calibration_slides calibrate, then the last train.val_slides of the rest
    validate; each with its whole patients when folds group by patient (`calibration_split`), so
    that both meet patients the model has not seen, as the test fold does; validation keeps at least
    half of the slides for training. train.val_slides auto: one whole patient validates where folds
    group by patient and 3 or more patients train the fold (patients to spare); otherwise nothing
    validates."""
    by_patient, n_val = cfg["data"]["group"] == "patient", cfg["train"]["val_slides"]
    auto = n_val == "auto"
    train, cal = calibration_split(slides, cfg["eval"]["calibration_slides"], by_patient,
                                   keep=(1 if auto else n_val) + 1)
    if auto:
        n_val = int(by_patient and len({s.patient for s in train}) >= 3)
    train, val = calibration_split(train, n_val, by_patient, keep=(len(train) + 1) // 2)
    return train, val, cal


def interval_level_name(level: float) -> str:
    """The percent a metric name carries: 0.9 -> "90", 0.975 -> "97.5"."""
    return f"{100 * level:g}"


def calibrate(preds, trues, sigmas, level: float) -> dict:
    """Split-conformal calibration on held-out slides (lists of (N_i, G) arrays; sigmas
    None = constant width): normalised scores |y - pred| / sigma and constant-width scores
    |y - pred| (n, G), and their per-gene quantiles q, q_constant at `level`. An interval is then
    pred +- q sigma."""
    res = np.abs(np.concatenate([_array(t) for t in trues])
                 - np.concatenate([_array(p) for p in preds]))
    scores = (res if sigmas is None
              else res / np.maximum(np.concatenate([_array(s) for s in sigmas]), 1e-12))
    return {"level": level, "scores": scores.astype(np.float32),
            "scores_constant": res.astype(np.float32), "q": conformal_quantile(scores, level),
            "q_constant": conformal_quantile(res, level)}


def interval_metrics(lower, upper, true) -> dict:
    """Share of the true values inside [lower, upper] and the mean width upper - lower (N, G
    arrays)."""
    lo, hi, t = _array(lower), _array(upper), _array(true)
    return {"coverage": float(np.mean((t >= lo) & (t <= hi))), "width": float(np.mean(hi - lo))}


def interval_entries(ps, ts, intervals) -> dict:
    """coverage@<level>, width@<level> of the intervals over the pooled slides; with the
    constant-width interval of the same calibration (`q_constant`) also its coverage and width and
    the width ratio."""
    name = interval_level_name(intervals["level"])
    t = np.concatenate(ts)
    m = interval_metrics(np.concatenate(intervals["lower"]), np.concatenate(intervals["upper"]), t)
    out = {f"coverage@{name}": m["coverage"], f"width@{name}": m["width"]}
    if intervals.get("q_constant") is not None:
        p, q = np.concatenate(ps), np.asarray(intervals["q_constant"], dtype=np.float64)
        c = interval_metrics(p - q, p + q, t)
        out.update({f"coverage@{name}_constant": c["coverage"],
                    f"width@{name}_constant": c["width"],
                    f"width_ratio@{name}": m["width"] / c["width"] if c["width"] > 0
                    else float("nan")})
    return out


def calibration_curve(run_dir, levels=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> dict:
    """Nominal level vs observed coverage on the test slides, pooled over the folds that have a
    calibration.h5 and prediction files with truth: at each level the conformal quantile of the
    saved calibration scores, then the share of test values with |y - pred| <= q sigma (sigma = the
    files' std, or 1 for constant width); the same for the constant-width interval. {"levels",
    "observed", "observed_constant", "sigma"}."""
    inside, inside_c, total, sigma = np.zeros(len(levels)), np.zeros(len(levels)), 0, None
    for fold in sorted(Path(run_dir).glob("fold_*")):
        if not (fold / "calibration.h5").exists():
            continue
        cal = read_calibration(fold / "calibration.h5")
        sigma = cal["sigma"]
        q = [(conformal_quantile(cal["scores"], a), conformal_quantile(cal["scores_constant"], a))
             for a in levels]
        for f in map(read_predictions, sorted((fold / "pred").glob("*.h5"))):
            if f["true"] is None:
                continue
            res = np.abs(f["true"].astype(np.float64) - f["pred"])
            s = f["std"] if sigma != "constant" else np.ones_like(res)
            for i, (qa, qa_constant) in enumerate(q):
                inside[i] += np.sum(res <= qa * s)
                inside_c[i] += np.sum(res <= qa_constant)
            total += res.size
    if not total:
        raise FileNotFoundError(f"{run_dir}: no fold with calibration.h5 and prediction "
                                "files with truth (train with eval.calibration_slides or "
                                "train.val_slides > 0)")
    return {"levels": list(levels), "observed": (inside / total).tolist(),
            "observed_constant": (inside_c / total).tolist(), "sigma": sigma}


# ---- a fold's calibration file (fold_<k>/calibration.h5) -----------------------------------------
def write_calibration(path, genes, level: float, sigma: str, q, q_constant, scores, scores_constant,
                      slides=()) -> None:
    """A fold's split-conformal calibration (conformal.calibrate): the level, what sigma was
    (predicted, ensemble, both, constant), per-gene quantiles q and q_constant (G,), the scores
    |y - pred| / sigma, |y - pred| (n, G) and the ids of the slides they came from."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, names in (("genes", genes), ("slides", slides)):
            f.create_dataset(key, data=[str(x) for x in names], dtype=h5py.string_dtype("utf-8"))
        for key, v in (("q", q), ("q_constant", q_constant), ("scores", scores),
                       ("scores_constant", scores_constant)):
            f[key] = _array(v, np.float32)
        f.attrs["level"], f.attrs["sigma"] = float(level), str(sigma)


def read_calibration(path) -> dict:
    """Inverse of write_calibration: {genes, slides, level, sigma, q, q_constant, scores,
    scores_constant}."""
    with h5py.File(path, "r") as f:
        return {"genes": list(f["genes"].asstr()[:]), "level": float(f.attrs["level"]),
                "sigma": str(f.attrs["sigma"]),
                "slides": list(f["slides"].asstr()[:]) if "slides" in f else [],
                **{k: f[k][:] for k in ("q", "q_constant", "scores", "scores_constant")}}


def fold_intervals(fold: Path, files: list[dict]) -> dict | None:
    """The intervals of a fold's prediction files for compute_metrics, when every file has them,
    with the constant-width quantiles of the fold's calibration.h5 when it is there (same genes)."""
    if not files or any(f["lower"] is None for f in files):
        return None
    levels = {f["interval"] for f in files}
    if len(levels) != 1:
        raise ValueError(f"{fold / 'pred'}: prediction files with intervals of different levels "
                         f"{sorted(levels)}")
    out = {"level": levels.pop(), "lower": [f["lower"] for f in files],
           "upper": [f["upper"] for f in files]}
    if (fold / "calibration.h5").exists():
        cal = read_calibration(fold / "calibration.h5")
        if cal["genes"] == files[0]["genes"] and cal["level"] == out["level"]:
            out["q_constant"] = cal["q_constant"]
    return out

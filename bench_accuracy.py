"""Accuracy on real tissue geometry: her2st sections with stand-in image features, leave-one-patient-out.

    python bench_accuracy.py                                   # every model, 3 seeds, both noise levels
    python bench_accuracy.py --patients A D --seeds 0 --models ridge_spatial hist
    python bench_accuracy.py --models mine=my.yaml --set mine:train.epochs=20   # any config, any override
    python bench_accuracy.py --report                          # the tables of what has run so far

Real spot layouts and real counts (36 sections, 8 patients), but the image features are a stand-in built
from the expression of other genes, so that how much a model gains from context can be measured where
the geometry is real and the signal is known to be there:
  targets   the 250 most expressed genes (log1p counts);
  features  the log-normalised expression of the next 1,000 most expressed genes (disjoint from the targets),
            standardised, projected to 32 dimensions by a fixed random matrix, plus per-spot Gaussian noise
            of `sigma` times the signal's standard deviation (weak: 2.0, strong: 0.5), plus a per-section
            affine "stain" shift (a random near-identity mixing, per-channel scale and offset).
Caches are built once (data.write_slide) under --cache. Every model is trained in-process, one thread,
on the same folds; per patient the table gives the mean over seeds and the standard deviation over seeds.
Results are appended to <out>/results.jsonl as each fold finishes, so a killed run continues.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import data
import eval as evaluation
import files
import hest
import train

NOISE = {"weak": 2.0, "strong": 0.5}      # noise standard deviation / signal standard deviation
# the same targets for every model (log1p counts, no normalisation or smoothing), its own patient split
COMMON = ["run.threads=1", "eval.save_predictions=true", "data.synthetic=null", "data.gmt=null",
          "data.pseudo=false", "data.folds=-1", "data.normalize=false", "data.smooth=null"]
# name -> (config file, overrides): widths and epochs a CPU trains in the benchmark's time
NARROW = ["model.dim=32", "model.heads=2", "train.epochs=6", "train.lr=1e-3"]
MODELS = {
    "ridge": ("ridge.yaml", []),
    "ridge_spatial": ("ridge_spatial.yaml", []),
    "ridge_spatial_norm": ("ridge_spatial.yaml", ["model.slide_norm=true"]),
    "mlp": ("mlp.yaml", ["train.epochs=20"]),
    "hist": ("hist.yaml", NARROW),                                   # tessera's recommended start
    "hist_plain": ("hist.yaml", NARROW + ["model.slide_norm=false", "model.spatial_start=false"]),
    "default": ("default.yaml", NARROW),
    "feast": ("feast.yaml", NARROW),
}
DETERMINISTIC = {"ridge", "ridge_spatial", "ridge_spatial_norm"}


# ---- the stand-in dataset -------------------------------------------------------------------------
def build_caches(her2st: Path, cache: Path, level: str, n_targets=250, n_source=1000, dim=32, seed=0) -> Path:
    """One cache folder per noise level (skipped when it exists). Returns the folder."""
    out = cache / level
    if (out / "genes.txt").exists():
        return out
    meta = files.read_metadata(her2st / "metadata.csv")
    paths = sorted((her2st / "st").glob("*.h5ad"))
    totals = [hest._h5ad_gene_totals(p) for p in paths]
    rank = sorted(data.shared_genes(totals), key=lambda g: (-sum(t[g] for t in totals), g))  # a total order
    targets, source = rank[:n_targets], rank[n_targets:n_targets + n_source]
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(n_source, dim)) / np.sqrt(n_source)
    slides, signals = [], []
    for p in paths:
        h = files.read_h5ad(p, genes=targets + source)
        lib = np.maximum(h.library_size, 1)[:, None]
        signals.append(np.log1p(h.counts[:, n_targets:] / lib * 1e4))
        xy = h.xy * float(meta[p.stem]["pixel_size_um_estimated"])
        slides.append((p.stem, meta[p.stem]["patient"], h, xy))
    allx = np.concatenate(signals)
    mu, sd = allx.mean(0), allx.std(0) + 1e-6
    proj_all = ((allx - mu) / sd) @ proj
    scale = proj_all.std(0)
    out.mkdir(parents=True, exist_ok=True)
    noise_rng = np.random.default_rng(seed + {"weak": 1, "strong": 2}.get(level, 3))
    for (sid, patient, h, xy), x in zip(slides, signals):
        signal = ((x - mu) / sd) @ proj / scale                                  # (N, dim), unit variance
        f = signal + NOISE[level] * noise_rng.normal(size=signal.shape)
        mix = np.eye(dim) + 0.2 * noise_rng.normal(size=(dim, dim)) / np.sqrt(dim)   # per-section stain
        f = (f @ mix) * np.exp(0.2 * noise_rng.normal(size=dim)) + 0.5 * noise_rng.normal(size=dim)
        data.write_slide(out / f"{sid}.h5", data.Slide(
            slide_id=sid, features=torch.tensor(f, dtype=torch.float32), coords=torch.tensor(xy, dtype=torch.float32),
            barcodes=h.barcodes, patient=patient, spot_pitch_um=200.0, encoder=f"standin-{level}",
            counts=torch.tensor(h.counts[:, :n_targets]), genes=targets,
            library_size=torch.tensor(h.library_size, dtype=torch.float32)), overwrite=True)
    with data.atomic_path(out / "genes.txt") as tmp:
        tmp.write_text("\n".join(targets) + "\n")
    return out


# ---- running the folds ----------------------------------------------------------------------------
def run_one(name, config, overrides, root: Path, seed: int, patient: str, out: Path) -> dict:
    """Train / fit one model on every patient but `patient`, predict that patient's sections."""
    path = Path(config) if Path(config).exists() else Path(__file__).with_name("configs") / config
    cfg = train.load_config(path, COMMON + overrides + [
        f"data.root={root}", f"data.genes={root / 'genes.txt'}", f"train.seed={seed}", f"run.name={name}"])
    metas = {m.slide_id: m.patient for m in map(data.read_slide_meta, data.list_slides(root))}
    test = sorted(s for s, p in metas.items() if p == patient)
    trainset = sorted(s for s, p in metas.items() if p != patient)
    run_dir = out / "runs" / root.name / f"{name}-s{seed}-{patient}"
    lines = []
    t0 = time.time()
    train.run_fold(0, trainset, test, cfg, root, run_dir, torch.device("cpu"), lines.append, lambda: "")
    written = [files.read_predictions(f) for f in sorted((run_dir / "fold_0" / "pred").glob("*.h5"))]
    pred = np.concatenate([f["pred"] for f in written])
    true = np.concatenate([f["true"] for f in written])
    return {"pcc_gene": evaluation.pcc_gene(pred, true),
            "pcc_gene_slide": evaluation.pcc_gene_slide([f["pred"] for f in written], [f["true"] for f in written]),
            "seconds": time.time() - t0, "log": lines[-1] if lines else ""}


def table(rows: list[dict], level: str, models, patients) -> str:
    """Markdown: per patient mean over seeds (std over seeds), the mean over patients, the largest std."""
    head = "| model | seeds | mean pcc_gene | " + " | ".join(patients) + " | largest seed std |"
    out = [f"**{level}** features (noise {NOISE[level]} x signal)", "", head,
           "|" + " --- |" * (len(patients) + 4)]
    for m in models:
        cell, stds, means = [], [], []
        seeds = len({r["seed"] for r in rows if r["level"] == level and r["model"] == m})
        for p in patients:
            v = [r["pcc_gene"] for r in rows if r["level"] == level and r["model"] == m and r["patient"] == p]
            if not v:
                cell.append("")
                continue
            means.append(np.mean(v))
            stds.append(np.std(v) if len(v) > 1 else 0.0)
            cell.append(f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 and m not in DETERMINISTIC else ""))
        if means:
            mean = f"{np.mean(means):.3f}" + (f" ({len(means)} of {len(patients)} patients)" if len(means) < len(patients) else "")
            out.append(f"| {m} | {'-' if m in DETERMINISTIC else seeds} | {mean} | " + " | ".join(cell) + f" | {max(stds):.3f} |")
    out.append("")
    out += [line for m in models if m != "ridge_spatial" for line in [against(rows, level, m, patients)] if line]
    return "\n".join(out) + "\n"


def against(rows, level, model, patients, base="ridge_spatial") -> str:
    """The acceptance figures of `model` against the spatial ridge, over the patients both have."""
    def per_patient(m):
        got = {p: [r["pcc_gene"] for r in rows if (r["level"], r["model"], r["patient"]) == (level, m, p)]
               for p in patients}
        return {p: v for p, v in got.items() if v}
    a, b = per_patient(model), per_patient(base)
    both = [p for p in patients if p in a and p in b]
    if not both:
        return ""
    diff = {p: np.mean(a[p]) - np.mean(b[p]) for p in both}
    worst = min(both, key=diff.get)
    return (f"- {model}: mean - {base} {np.mean([diff[p] for p in both]):+.3f} over {len(both)} patients; "
            f"worst patient {worst} {diff[worst]:+.3f}; largest seed std {max(np.std(a[p]) for p in both):.3f} "
            f"(seeds: {min(len(a[p]) for p in both)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--her2st", default="../shared/data/her2st", help="folder with st/*.h5ad and metadata.csv")
    p.add_argument("--cache", default="caches/accuracy", help="where the stand-in caches are built once")
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument("--levels", nargs="+", default=list(NOISE), choices=list(NOISE))
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {list(MODELS)} or name=config.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="MODEL:key=value", help="extra overrides for one model")
    p.add_argument("--patients", nargs="+", default=None, help="default: every patient")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--report", action="store_true", help="only print the tables of <out>/results.jsonl")
    args = p.parse_args(argv)
    her2st = Path(args.her2st)
    if not (her2st / "metadata.csv").exists():
        print(f"{her2st}: no her2st data (metadata.csv, st/*.h5ad); skipping the accuracy benchmark")
        return None
    torch.set_num_threads(1)
    models = dict(MODELS)
    for m in args.models:
        if "=" in m:
            name, config = m.split("=", 1)
            models[name] = (config, [])
        elif m not in models:
            raise SystemExit(f"--models: unknown model {m!r}; expected one of {list(MODELS)} or name=config.yaml")
    names = [m.split("=", 1)[0] for m in args.models]
    for item in args.set:
        name, _, kv = item.partition(":")
        if name not in models or "=" not in kv:
            raise SystemExit(f"--set {item!r}: expected MODEL:key=value with MODEL one of {names}")
        models[name] = (models[name][0], models[name][1] + [kv])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "results.jsonl"
    rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    done = {(r["level"], r["model"], r["seed"], r["patient"]) for r in rows}
    if args.report:
        shown = list(dict.fromkeys(r["model"] for r in rows)) if args.models == list(MODELS) else names
        for level in args.levels:
            print(table(rows, level, shown, args.patients or sorted({r["patient"] for r in rows})))
        return rows
    for level in args.levels:
        root = build_caches(her2st, Path(args.cache), level)
        all_patients = sorted({m.patient for m in map(data.read_slide_meta, data.list_slides(root))})
        patients = args.patients or all_patients
        for name in names:
            config, overrides = models[name]
            for seed in args.seeds:
                for patient in patients:
                    if (level, name, seed, patient) in done:
                        continue
                    if name in DETERMINISTIC and seed != args.seeds[0]:   # same fit for every seed
                        first = next(r for r in rows if (r["level"], r["model"], r["patient"]) ==
                                     (level, name, patient) and r["seed"] == args.seeds[0])
                        r = dict(first, seed=seed)
                    else:
                        r = dict(level=level, model=name, seed=seed, patient=patient,
                                 overrides=overrides, **run_one(name, config, overrides, root, seed, patient, out))
                    rows.append(r)
                    done.add((level, name, seed, patient))
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
                    print(f"{level} {name} seed {seed} patient {patient}: pcc_gene {r['pcc_gene']:.4f} "
                          f"({r.get('seconds', 0):.0f}s)", flush=True)
        print(table(rows, level, names, patients))
    return rows


if __name__ == "__main__":
    main()

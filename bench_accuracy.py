"""Accuracy on real tissue: her2st's real H&E, and its real geometry with stand-in features.

    python bench_accuracy.py                           # every case, every model, 3 seeds
    python bench_accuracy.py --cases real-section --seeds 0 --models ridge_spatial hist
    python bench_accuracy.py --models mine=my.yaml --set mine:train.epochs=20   # any config
    python bench_accuracy.py --encoder my_module:my_encoder    # the real H&E cases, your encoder
    python bench_accuracy.py --report                  # the tables of what has run so far
    python bench_accuracy.py --normalize --out runs/accuracy_norm    # targets per 10,000 counts

Cases (targets: log1p counts of 250 genes, no smoothing; normalised by each spot's depth with
--normalize):
  real-section  the six her2st sections with an H&E image (patients B, C) through
                `hest.py embed --sub 2` (the built-in encoder unless --encoder) and
                `import-hest`; leave one section out; the 250 genes of highest mean on each
                fold's training sections
  real-patient  the same caches, leave one patient out (train on B4 alone, or on C2-C6)
  weak, strong  real geometry and counts of all 36 sections (8 patients), stand-in features: the
                log-normalised expression of the next 1,000 most expressed genes (disjoint from
                the 250 targets), standardised, projected to 32 dimensions by a fixed random
                matrix, plus per-spot Gaussian noise of 2.0 (weak) or 0.5 (strong) times the
                signal, plus a per-section affine "stain" shift; leave one patient out
  nonlinear     as strong, but the projection passes a fixed random saturating layer first
                (tanh of a gain-3 projection, then a second random projection), so that no linear
                read-out of the features recovers the expression
  noshift       as strong, without the per-section stain shift (per-slide standardisation has
                nothing to fix)
Caches are built once under --cache. Every model is trained in-process, one thread, on the same
folds; per held-out group the table gives the mean over seeds and the standard deviation over
seeds. Results are appended to <out>/results.jsonl as each fold finishes, so a killed run
continues.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import numpy as np
import torch

import data
import eval as evaluation
from eval import number
import files
import hest
import train

# stand-in cases: noise / signal, per-section stain shift, saturating layer before the projection
STANDIN = {"weak": (2.0, True, False), "strong": (0.5, True, False),
           "nonlinear": (0.5, True, True), "noshift": (0.5, False, False)}
REAL = {"real-section": "slide", "real-patient": "patient"}        # real H&E: what a fold holds out
CASES = list(REAL) + list(STANDIN)
# the same targets for every model (log1p counts, no normalisation or smoothing), its own split
COMMON = ["run.threads=1", "eval.save_predictions=true", "data.synthetic=null", "data.gmt=null",
          "data.pseudo=false", "data.normalize=false", "data.smooth=null"]
# name -> (config file, overrides): widths and epochs a CPU trains in the benchmark's time
NARROW = ["model.dim=64", "model.heads=2", "train.epochs=30", "train.lr=1e-3"]
MODELS = {
    "ridge": ("ridge.yaml", []),
    "ridge_spatial": ("ridge_spatial.yaml", []),  # penalty and slide_norm chosen by the data
    "ridge_spatial_fixed": ("ridge_spatial.yaml",
                            ["model.ridge_cv=false", "model.slide_norm=false"]),
    "ridge_spatial_norm": ("ridge_spatial.yaml", ["model.ridge_cv=false", "model.slide_norm=true"]),
    "mlp": ("mlp.yaml", ["train.epochs=30", "train.lr=1e-3"]),
    "tessera": ("tessera.yaml", NARROW),  # the network for your own data
    "tessera_net": ("tessera.yaml", NARROW + ["model.spatial_start=false",
                                              "model.ood_fallback=false"]),  # its network alone
    "hist": ("hist.yaml", NARROW),                                    # the papers' recipes
    "default": ("default.yaml", NARROW),
    "feast": ("feast.yaml", NARROW),
}
CLOSED_FORM = ["ridge", "ridge_spatial", "ridge_spatial_fixed", "ridge_spatial_norm"]
DETERMINISTIC = set(CLOSED_FORM)              # closed forms: one seed is every seed


# ---- the caches ----------------------------------------------------------------------------------
def build_real(her2st: Path, cache: Path, encoder: str | None = None) -> Path:
    """The her2st sections with an H&E image, embedded with 2 x 2 sub-patches and imported
    (once)."""
    name = ("real" if encoder is None
            else "real-" + "".join(c if c.isalnum() else "_" for c in encoder))
    out = cache / name
    if not out.exists():
        feats = cache / (name + "_features")
        if not feats.exists():
            hest.embed_patches(her2st / "patches", feats, encoder=encoder, sub=2,
                               log=lambda m: None)
        hest.import_hest(her2st / "st", feats, out, meta=her2st / "metadata.csv",
                         log=lambda m: None)
    return out


def build_standin(her2st: Path, cache: Path, case: str, n_targets=250, n_source=1000, dim=32,
                  seed=0) -> Path:
    """One cache folder per stand-in case (skipped when it exists). Returns the folder."""
    noise, shift, saturate = STANDIN[case]
    out = cache / case
    if (out / "genes.txt").exists():
        return out
    meta = files.read_metadata(her2st / "metadata.csv")
    paths = sorted((her2st / "st").glob("*.h5ad"))
    totals = [hest._h5ad_gene_totals(p) for p in paths]
    # a total order
    rank = sorted(data.shared_genes(totals), key=lambda g: (-sum(t[g] for t in totals), g))
    targets, source = rank[:n_targets], rank[n_targets:n_targets + n_source]
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(n_source, dim)) / np.sqrt(n_source)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)  # the saturating layer's read-out
    slides, signals = [], []
    for p in paths:
        h = files.read_h5ad(p, genes=targets + source)
        lib = np.maximum(h.library_size, 1)[:, None]
        signals.append(np.log1p(h.counts[:, n_targets:] / lib * 1e4))
        xy = h.xy * float(meta[p.stem]["pixel_size_um_estimated"])
        slides.append((p.stem, meta[p.stem]["patient"], h, xy))
    allx = np.concatenate(signals)
    mu, sd = allx.mean(0), allx.std(0) + 1e-6

    def latent(x):  # (N, dim), unit variance over all spots
        z = ((x - mu) / sd) @ proj
        return np.tanh(3.0 * z / scale0) @ mix if saturate else z

    scale0 = (((allx - mu) / sd) @ proj).std(0)
    scale = latent(allx).std(0)
    out.mkdir(parents=True, exist_ok=True)
    noise_rng = np.random.default_rng(seed + {"weak": 1, "strong": 2}.get(case, 3))
    for (sid, patient, h, xy), x in zip(slides, signals):
        signal = latent(x) / scale
        f = signal + noise * noise_rng.normal(size=signal.shape)
        # per-section stain
        stain = np.eye(dim) + 0.2 * noise_rng.normal(size=(dim, dim)) / np.sqrt(dim)
        gain, offset = np.exp(0.2 * noise_rng.normal(size=dim)), 0.5 * noise_rng.normal(size=dim)
        if shift:
            f = (f @ stain) * gain + offset
        data.write_slide(out / f"{sid}.h5", data.Slide(
            slide_id=sid, features=torch.tensor(f, dtype=torch.float32),
            coords=torch.tensor(xy, dtype=torch.float32), barcodes=h.barcodes, patient=patient,
            spot_pitch_um=200.0, encoder=f"standin-{case}",
            counts=torch.tensor(h.counts[:, :n_targets]), genes=targets,
            library_size=torch.tensor(h.library_size, dtype=torch.float32)), overwrite=True)
    with data.atomic_path(out / "genes.txt") as tmp:
        tmp.write_text("\n".join(targets) + "\n")
    return out


def groups(root: Path, case: str) -> dict[str, list[str]]:
    """Held-out group -> its slides: sections (real-section) or patients (every other case)."""
    metas = {m.slide_id: m.patient for m in map(data.read_slide_meta, data.list_slides(root))}
    by = REAL.get(case, "patient")
    out: dict[str, list[str]] = {}
    for s, patient in sorted(metas.items()):
        out.setdefault(s if by == "slide" else patient, []).append(s)
    return out


# ---- running the folds ---------------------------------------------------------------------------
def run_one(name, config, overrides, root: Path, seed: int, test: list[str], out: Path,
            case: str) -> dict:
    """Train / fit one model on every slide but `test`, predict the `test` slides."""
    path = Path(config) if Path(config).exists() else Path(__file__).with_name("configs") / config
    genes = ([f"data.genes={root / 'genes.txt'}"] if (root / "genes.txt").exists()
             else ["data.genes={by: mean, n: 250}"])
    cfg = train.load_config(path, COMMON + overrides + genes + [
        f"data.root={root}", f"train.seed={seed}", f"run.name={name}"])
    trainset = sorted(s.stem for s in data.list_slides(root) if s.stem not in test)
    run_dir = out / "runs" / case / f"{name}-s{seed}-{'+'.join(test)}"
    lines = []
    t0 = time.time()
    train.run_fold(0, trainset, sorted(test), cfg, root, run_dir, torch.device("cpu"), lines.append)
    written = [files.read_predictions(f)
               for f in sorted((run_dir / "fold_0" / "pred").glob("*.h5"))]
    pred = np.concatenate([f["pred"] for f in written])
    true = np.concatenate([f["true"] for f in written])
    return {"pcc_gene": evaluation.pcc_gene(pred, true),
            "pcc_gene_slide": evaluation.pcc_gene_slide([f["pred"] for f in written],
                                                        [f["true"] for f in written]),
            "beyond_range": float(pred.max() - true.max()),
            "seconds": time.time() - t0, "log": lines[-1] if lines else ""}


def per_group(rows, case, model) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {}
    for r in rows:
        if (r["level"], r["model"]) == (case, model):
            got.setdefault(r["patient"], []).append(r["pcc_gene"])
    return got


def table(rows: list[dict], case: str, models, held) -> str:
    """Markdown: per held-out group mean over seeds (std over seeds), the mean over groups, the
    largest std."""
    what = (f"real H&E, held out by {REAL[case]}" if case in REAL else
            f"stand-in features, noise {STANDIN[case][0]} x signal"
            + ("" if STANDIN[case][1] else ", no stain shift")
            + (", saturating" if STANDIN[case][2] else ""))
    out = [f"**{case}** ({what})", "",
           "| model | seeds | mean pcc_gene | " + " | ".join(held) + " | largest seed std |",
           "|" + " --- |" * (len(held) + 4)]
    for m in models:
        got = per_group(rows, case, m)
        if not got:
            continue
        cell = [(number(np.mean(got[g]), 3) + (f" ± {number(np.std(got[g]), 3)}" if len(got[g]) > 1
                                               and m not in DETERMINISTIC
                                               else "")) if g in got else "" for g in held]
        means = [np.mean(got[g]) for g in held if g in got]
        mean = (number(np.mean(means), 3)
                + (f" ({len(means)} of {len(held)})" if len(means) < len(held) else ""))
        seeds = len({r["seed"] for r in rows if (r["level"], r["model"]) == (case, m)})
        out.append(f"| {m} | {'-' if m in DETERMINISTIC else seeds} | {mean} | " + " | ".join(cell)
                   + f" | {number(max(np.std(v) for v in got.values()), 3)} |")
    out.append("")
    out += [line for m in models if m not in CLOSED_FORM
            for line in [against(rows, case, m, held)] if line]
    return "\n".join(out) + "\n"


def against(rows, case, model, held) -> str:
    """The acceptance figures of `model` against the best closed form (by mean over the groups both
    have)."""
    a = per_group(rows, case, model)
    bases = {b: per_group(rows, case, b) for b in CLOSED_FORM}
    both = [g for g in held if g in a and all(g in v for v in bases.values() if v)]
    bases = {b: v for b, v in bases.items() if v}
    if not both or not bases:
        return ""
    best = max(bases, key=lambda b: np.mean([np.mean(bases[b][g]) for g in both]))
    diff = {g: np.mean(a[g]) - np.mean(bases[best][g]) for g in both}
    worst = min(both, key=diff.get)
    return (f"- {model}: mean - {best} (best closed form) {np.mean([diff[g] for g in both]):+.3f} "
            f"over {len(both)}; worst {worst} {diff[worst]:+.3f}; largest seed std "
            f"{max(np.std(a[g]) for g in both):.3f} (seeds: {min(len(a[g]) for g in both)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--her2st", default="../shared/data/her2st",
                   help="folder with st/*.h5ad, patches/ and metadata.csv")
    p.add_argument("--cache", default="caches/accuracy", help="where the caches are built once")
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument("--cases", "--levels", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--encoder",
                   help="module:callable for the real H&E cases (hest.py embed --encoder)")
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help=f"any of {list(MODELS)} or name=config.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="MODEL:key=value",
                   help="extra overrides for one model")
    p.add_argument("--groups", "--patients", nargs="+", default=None,
                   help="held-out groups (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--report", action="store_true",
                   help="only print the tables of <out>/results.jsonl")
    p.add_argument("--normalize", action="store_true",
                   help="targets log1p(counts / library size * 1e4)")
    args = p.parse_args(argv)
    her2st = Path(args.her2st)
    if not (her2st / "metadata.csv").exists():
        print(f"{her2st}: no her2st data (metadata.csv, st/*.h5ad); skipping the "
              "accuracy benchmark")
        return None
    torch.set_num_threads(1)
    models = dict(MODELS)
    for m in args.models:
        if "=" in m:
            name, config = m.split("=", 1)
            models[name] = (config, [])
        elif m not in models:
            raise SystemExit(f"--models: unknown model {m!r}; expected one of {list(MODELS)} or "
                             "name=config.yaml")
    names = [m.split("=", 1)[0] for m in args.models]
    for item in args.set:
        name, _, kv = item.partition(":")
        if name not in models or "=" not in kv:
            raise SystemExit(f"--set {item!r}: expected MODEL:key=value with MODEL one of {names}")
        models[name] = (models[name][0], models[name][1] + [kv])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "results.jsonl"
    rows = ([json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists()
            else [])
    done = {(r["level"], r["model"], r["seed"], r["patient"]) for r in rows}
    if any(r.get("normalize", False) != args.normalize for r in rows):
        raise SystemExit(f"{log_path}: holds results on "
                         f"{'raw' if args.normalize else 'normalised'} targets; use another --out "
                         "(--normalize exactly when the results there are normalised)")
    models = {n: (c, o + ["data.normalize=true"] if args.normalize else o)
              for n, (c, o) in models.items()}
    if args.report:
        shown = (list(dict.fromkeys(r["model"] for r in rows)) if args.models == list(MODELS)
                 else names)
        for case in args.cases:
            held = args.groups or sorted({r["patient"] for r in rows if r["level"] == case})
            if held:
                print(table(rows, case, shown, held))
        return rows
    for case in args.cases:
        if case in REAL and not (her2st / "patches").exists():
            print(f"{her2st / 'patches'}: no H&E patches; skipping {case}")
            continue
        root = build_real(her2st, Path(args.cache), args.encoder) if case in REAL else \
            build_standin(her2st, Path(args.cache), case)
        held = {g: v for g, v in groups(root, case).items() if not args.groups or g in args.groups}
        for name in names:
            config, overrides = models[name]
            for seed in args.seeds:
                for g, test in held.items():
                    if (case, name, seed, g) in done:
                        continue
                    if name in DETERMINISTIC and seed != args.seeds[0]:   # same fit for every seed
                        first = next(r for r in rows if (r["level"], r["model"], r["patient"]) ==
                                     (case, name, g) and r["seed"] == args.seeds[0])
                        r = dict(first, seed=seed)
                    else:
                        r = dict(level=case, model=name, seed=seed, patient=g, overrides=overrides,
                                 normalize=args.normalize,
                                 **run_one(name, config, overrides, root, seed, test, out, case))
                    rows.append(r)
                    done.add((case, name, seed, g))
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
                    print(f"{case} {name} seed {seed} {g}: pcc_gene {r['pcc_gene']:.4f} "
                          f"({r.get('seconds', 0):.0f}s)", flush=True)
        print(table(rows, case, names, list(held)))
    return rows


if __name__ == "__main__":
    main()

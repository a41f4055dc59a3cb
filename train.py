"""Cross-validation of one config on a folder of slide caches, one slide per step, on one GPU or the
CPU.

    python train.py                          # the demo: synthetic slides + configs/default.yaml
    python train.py configs/hist.yaml data.root=caches/her2st run.name=hist
    python train.py configs/hist.yaml run.name=hist --resume  # continue a killed run
    python train.py configs/hist.yaml run.name=hist --fold 2  # one fold; other processes: others

Outputs in runs/<name>/: config.yaml, folds.json, log.txt, fold_<k>/model.pt,
fold_<k>/pred/<slide>.h5, results.json, per_gene.csv, results.md (docs/running.md). The config, the
files it names, every slide's header, the folds and the run folder are checked before anything is
written (checks.py); a mistake ends the program with one line. Who may write the run folder, and
with which data, is runs.py's. The losses it minimises are in losses.py.
"""
from __future__ import annotations

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import argparse
import copy
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch
import yaml

import augment
import checks
import data
import runs
import eval as evaluation
import files
import predict
import lattice
from conformal import held_out
from losses import compute_loss, start_variance
from model import ModelConfig, build_model

# protocols.py (data.smooth) and synthetic.py (data.synthetic) are programs a fork may delete:
# training imports them when they are there and names the missing file only when a config asks for
# what they do.
try:
    import protocols
except ModuleNotFoundError:
    protocols = None
try:
    import synthetic
except ModuleNotFoundError:  # synthetic.py, or hest.py whose binning it uses
    synthetic = None

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"

# Every key a config may set, with its default. A config file or a `key.sub=value` override may only
# set keys that exist here (model keys: see model.ModelConfig).
DEFAULTS = {
    "data": {
        "root": "data/synthetic",     # folder of <slide>.h5 caches
        "synthetic": None,            # e.g. {slides: 12, seed: 0, spots: 1500}: generate root if
                                      # missing
        "folds": 4,                   # k folds grouped by patient; -1 = leave one patient out
        "group": "patient",           # patient | slide: what no fold may split (HiST, MERGE, FEAST:
                                      # slide)
        "assign": "balanced",         # balanced | kfold (MERGE, FEAST) | hist: how groups go to
                                      # folds
        "fold_seed": None,            # seed of the fold assignment; null = train.seed
        "split_dir": None,            # HEST-Benchmark splits/ folder (train_i.csv / test_i.csv)
                                      # instead
        "genes": {"by": "hvg", "n": 250},  # a gene list file, {by: hvg|mean, n: N}, or null =
                                           # all genes
        "normalize": False,           # targets log1p(counts / library_size * 1e4) instead of
                                      # log1p(counts)
        "gmt": None,                  # pathway gene sets (MSigDB GMT) for pathway tokens / head /
                                      # loss
        "pseudo": True,               # use off-grid pseudo-spots when the caches have them
        "smooth": None,               # label smoothing of every slide's targets: {method: spcs,
                                      # ...} (protocols.SMOOTH)
    },
    "model": dataclasses.asdict(ModelConfig()),
    "train": {
        "epochs": 30,                 # passes over the training slides, per fold
        "lr": 1e-3,                   # AdamW peak learning rate
        "weight_decay": 1e-4,         # AdamW decoupled weight decay
        "warmup_epochs": 1,           # linear warm-up, then cosine to zero (per step)
        "clip": 1.0,                  # gradient norm clipping
        "loss": "mse",                # mse | pcc | mse_pcc | zinb | gaussian (beta-NLL,
                                      # model.head_var)
        "nll_beta": 0.5,              # gaussian: beta of beta-NLL (0 = plain NLL, 1 = MSE's
                                      # gradient on the mean)
        "pcc_alpha": 1.0,             # mse_pcc = mse + alpha (1 - pcc)
        "pathway_lambda": 0.0,        # auxiliary pathway loss weight (STF)
        "level_weights": None,        # one weight per model.out_levels entry (default 1 each)
        "consistency_lambda": 0.0,    # MagNet: predicted parent vs its predicted children, summed
                                      # in counts
        "align_lambda": 0.0,          # HiFusion: pooled sub-tokens vs the spot's own embedding
        "augment": {"start": 1.0, "end": 0.2, "p_drop": 0.2, "shear_deg": 15.0, "rot_deg": 30.0},
                                      # HiST A.6/A.7: strength start -> end (cosine), spot drop,
                                      # shear, rotation
        "val_slides": 0,              # >0: keep the epoch best on this many held-out training
                                      # slides; auto: conformal.held_out
        "skip_unused": True,          # model.ood_fallback: a fold whose every test slide gets the
                                      # ridge alone trains no network (false: trains it anyway)
        "ema": 0.0,                   # >0: predict with an exponential moving average of the
                                      # weights (decay per step)
        "checkpoint_every": 1,        # epochs between atomic checkpoints (for --resume)
        "seed": 0,                    # seeds initialisation, augmentation, dropout and (by default)
                                      # folds
    },
    "eval": {
        "save_predictions": True,     # write fold_<k>/pred/<slide>.h5 for the test slides
        "mc_samples": 0,              # >0: Monte-Carlo dropout passes per test slide: `std`,
                                      # unc_spearman, coverage
        "save_h5ad": False,           # also write fold_<k>/pred/<slide>.h5ad (AnnData) for scanpy /
                                      # squidpy
        "calibration_slides": 0,      # intervals: last training slides (by patient: their patients)
                                      # held out to calibrate; 0: val_slides
        "interval": 0.9,              # the intervals' nominal coverage
        "floor": True,                # raise predictions of log1p targets to 0 (no count is
                                      # below 0); false: score them as the model gives them
    },
    "run": {
        "name": "demo",               # the run folder's name: run.dir/run.name
        "dir": "runs",                # folder of run folders
        "device": "auto",             # auto (cuda when available) | cuda | cpu
        "threads": 0,                 # CPU threads for torch; 0 = the default of threads.py
    },
}


# ---- config -----------------------------------------------------------------------------------
def keys_table() -> str:
    """Every config key, its default and its comment in DEFAULTS above (model keys: the ModelConfig
    field comments), read from the source so that each meaning is written once (--keys). A comment
    goes on in the comment-only lines below its key that start in its column (below a key line
    without a comment: further in than the key)."""
    import inspect
    import re
    text, rows = inspect.getsource(sys.modules[__name__]), []
    for section, keys in DEFAULTS.items():
        src = (inspect.getsource(ModelConfig) if section == "model"
               else text[text.index(f'    "{section}": '):])
        for key, value in keys.items():
            hit = re.search(rf'^(\s*)"?{key}"?:([^\n#]*)(#?)(.*)$', src, flags=re.M)
            words, column = [], None
            if hit:
                words = [hit.group(4).strip()] if hit.group(3) else []
                column = hit.start(3) - hit.start() if hit.group(3) else None
                for line in src[hit.end():].split("\n")[1:]:
                    indent = len(line) - len(line.lstrip())
                    if line.lstrip()[:1] != "#" or indent != (column or indent) \
                            or indent <= len(hit.group(1)):
                        break
                    column = indent
                    words.append(line.strip().lstrip("#").strip())
            default = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10 ** 6)
            rows.append((f"{section}.{key} = {default.strip().removesuffix('...').strip()}",
                         " ".join(words)))
    return "\n".join(f"{a:<40} # {b}" for a, b in rows)


def merge(base: dict, new: dict, where: str = "") -> dict:
    """Deep-merge `new` into a copy of `base`; a key `base` does not have is an error naming the
    valid ones."""
    out = copy.deepcopy(base)
    for key, value in (new or {}).items():
        if key not in base:
            raise ValueError(f"unknown config key '{where}{key}'; valid keys here: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key not in ("synthetic",
                                                                                    "genes"):
            out[key] = merge(base[key], value, f"{where}{key}.")
        elif not where and isinstance(base[key], dict) and value is None:  # `eval:` left empty
            out[key] = copy.deepcopy(base[key])
        elif isinstance(base[key], dict) and key not in ("synthetic", "genes", "smooth"):
            raise ValueError(f"key '{where}{key}': expected a mapping, found {value!r}")
        elif (isinstance(base[key], float) and isinstance(value, (str, int))
              and not isinstance(value, bool)):
            try:  # YAML 1.1 reads 3e-4 as a string
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"key '{where}{key}': expected a number, found {value!r}") \
                    from None
        else:
            out[key] = value
    return out


def load_config(path, overrides=()) -> dict:
    """The config file merged over DEFAULTS, then the `key.sub=value` overrides; every key checked
    (checks.check_config). A mistake ends the program with one line naming where it is (the file, or
    the override on the command line that set the key) and the key."""
    path = Path(path)
    try:
        cfg = checks.load_yaml(files.read_text(path)) or {}
    except files.CacheError as e:                         # not found, not readable, not UTF-8
        raise SystemExit(" ".join(str(e).replace(f"{path}: ", f"{path}: cannot read the config: ",
                                                 1).split()))
    except yaml.YAMLError as e:
        raise SystemExit(" ".join(f"{path}: cannot read the config: {e}".split()))
    where = str(path)
    try:
        if not isinstance(cfg, dict):
            raise ValueError("expected a mapping of sections (data, model, train, eval, run), "
                             f"found {cfg!r}")
        cfg = merge(DEFAULTS, cfg)
        for item in overrides:
            where = f"command line '{item}'"
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError("expected key.sub=value")
            try:
                nested = checks.load_yaml(value)
            except yaml.YAMLError as e:
                raise ValueError(f"expected a YAML value, found: {e}") from None
            for part in reversed(key.split(".")):
                nested = {part: nested}
            cfg = merge(cfg, nested)
        where = str(path)
        checks.check_config(cfg, DEFAULTS)
        if cfg["data"]["smooth"] is not None:           # its keys are checked: fill in the others
            if protocols is None:
                raise ValueError("key 'data.smooth': needs protocols.py (the papers' label "
                                 "smoothing), which this copy does not have")
            cfg["data"]["smooth"] = {**protocols.SMOOTH, **cfg["data"]["smooth"]}
    except ValueError as e:
        raise SystemExit(" ".join(f"{_set_by(str(e), overrides) or where}: {e}".split())) from None
    return cfg


def _set_by(message: str, overrides) -> str | None:
    """The command-line override that set the key a config error names (`key 'a.b'`), if one did."""
    import re
    named = re.search(r"key '([^']+)'", message)
    for item in reversed(overrides):
        key = item.partition("=")[0]
        if named and (named.group(1) == key or named.group(1).startswith(key + ".")):
            return f"command line '{item}'"
    return None


# ---- data of one fold ---------------------------------------------------------------------------
def slide_targets(slide: data.Slide, cfg: dict) -> torch.Tensor:
    """(N, G) regression targets of a slide with counts: log1p (data.normalize: of counts per 1e4),
    then the label smoothing of data.smooth on the slide's spot array (MERGE, FEAST)."""
    y = data.log_targets(slide.counts, slide.library_size, normalize=cfg["data"]["normalize"])
    if not (sm := cfg["data"]["smooth"]):
        return y
    # integer array positions: the lattice of the spot pitch (a hexagonal array: half a pitch
    # across, a row height down, as Visium's array_col and array_row)
    pitch = (slide.spot_pitch_um if slide.spot_pitch_um > 0
             else 1.8 * lattice.default_unit(slide.coords))
    step = torch.tensor([pitch / 2, pitch * math.sqrt(3) / 2] if sm["hexagonal"]
                        else [pitch, pitch])
    grid = lattice.to_lattice(slide.coords.double() / step, 1.0).numpy()
    out = protocols.spcs(y.numpy(), grid, sm["alpha"], sm["beta"], sm["tau_p"], sm["tau_s"],
                         sm["pcs"], sm["hexagonal"])
    if sm["rescale"]:
        eight = protocols.eight_neighbour_mean(y.numpy() / math.log(10), grid)
        out = protocols.minmax_to_range(out, eight.min(), eight.max())
    return torch.from_numpy(out).float()


def prepare(slide: data.Slide, cfg: dict, unit_um) -> dict:
    """Tensors the model and the losses need, for one slide, on the CPU."""
    counts = slide.counts
    lib = slide.library_size if slide.library_size is not None else (
        counts.sum(1) if counts is not None else None)
    b = {"slide": slide, "features": slide.features, "coords": slide.coords,
         "unit": unit_um or lattice.default_unit(slide.coords)}
    if counts is not None:
        b["counts"], b["library_size"] = counts, lib.clamp_min(1)
        b["target"] = slide_targets(slide, cfg)
    if cfg["data"]["pseudo"] and slide.pseudo_features is not None:
        b["pseudo_features"], b["pseudo_coords"] = slide.pseudo_features, slide.pseudo_coords
    b.update(data.sub_inputs(slide, cfg["model"].get("sub_levels", 0)))
    return b


def forward(model, b, device, **kw):
    args = {k: (b[k].to(device, non_blocking=True) if k in b else None)
            for k in ("features", "coords", "pseudo_features", "pseudo_coords")}
    sub = {k: b[k].to(device) for k in ("sub_features", "sub_valid") if k in b}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(args["features"], args["coords"], args["pseudo_features"],
                     args["pseudo_coords"], unit=b["unit"], **sub, **kw)


def choose_genes(cfg, train_slides, root: Path, gene_lists=()) -> list[str]:
    """The fold's genes: a given list, or top-n by HVG / mean on the training slides' counts only,
    among the genes that every slide of the fold has (`gene_lists`: the test slides' gene names, no
    counts)."""
    spec = cfg["data"]["genes"]
    shared = data.shared_genes([s.genes for s in train_slides] + list(gene_lists))
    if spec is None:
        return shared
    if isinstance(spec, str):
        return files.read_gene_list(checks.data_file(cfg, "genes", root))
    counts = []
    for s in train_slides:
        index = {g: i for i, g in enumerate(s.genes)}
        counts.append(s.counts[:, [index[g] for g in shared]].numpy())
    return data.select_genes(counts, shared, n=int(spec["n"]), by=spec.get("by", "hvg"))


def membership(cfg, genes: list[str], n_pathways: int,
               root: Path = Path(".")) -> torch.Tensor | None:
    """(P, G) 0/1: gene g is in the p-th set of data.gmt (looked for as checks.data_file says)."""
    if not n_pathways:
        return None
    m = torch.zeros(n_pathways, len(genes))
    if cfg["data"]["gmt"]:
        index = {g: i for i, g in enumerate(genes)}
        sets = list(files.read_gmt(checks.data_file(cfg, "gmt", root)).values())[:n_pathways]
        for p, members in enumerate(sets):
            m[p, [index[g] for g in members if g in index]] = 1.0
    return m


# ---- training ---------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def save_atomic(obj, path: Path):
    """torch.save through data.atomic_path: a kill or a full disk (files.DiskFull) leaves the old
    file whole."""
    with data.atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Diverged(checks.ConfigError):
    """Training produced a non-finite loss or non-finite weights; main prints it as one line."""


def finite_weights(model) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def ema_update(avg: dict, model, decay: float, step: int) -> None:
    """avg <- d avg + (1 - d) weights, d = min(decay, (1 + step) / (10 + step)): early weights do
    not dominate."""
    d = min(decay, (1 + step) / (10 + step))
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            avg[name].mul_(d).add_(value.detach(), alpha=1 - d)
        else:
            avg[name].copy_(value)


def val_score(model, val_b, cfg, device) -> float:
    """pcc_gene of the model's predictions over the validation slides, pooled (train.val_slides),
    predicted as the test slides are (predict.target_floor)."""
    floor, pseudo = predict.target_floor(cfg), cfg["data"]["pseudo"]
    pred = [predict.predict_slide(model, b["slide"], pseudo, device, floor=floor) for b in val_b]
    return evaluation.pcc_gene(torch.cat(pred), torch.cat([b["target"] for b in val_b]))


def weights(model) -> dict:
    """A copy of the model's weights on the CPU."""
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def one_fold(train_b, val_b, test, epochs) -> runs.Progress:
    """The time-left estimate of a fold trained on its own (no run around it: tests, benchmarks)."""
    spots = lambda batches: [len(b["features"]) for b in batches]    # noqa: E731
    test = [len(s.features) for s in test]                           # data.Slide, not prepared
    progress = runs.Progress([{"train": spots(train_b), "val": spots(val_b), "test": test,
                               "read": sum(spots(train_b) + spots(val_b) + test)}], epochs)
    progress.start_fold()
    return progress


def adamw(params, lr, weight_decay):
    """torch.optim.AdamW, fused (one kernel per parameter) where this torch has it for the device:
    the same update; on a CPU the per-parameter loop of a small model takes 3x as long."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):   # torch < 2.4 on a CPU: no fused AdamW
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def clip_gradients(params, max_norm):
    """torch.nn.utils.clip_grad_norm_, in one call over all gradients where this torch can on the
    device (foreach): the same norm and scaling; on a CPU the loop over parameters is slower."""
    params = [p for p in params if p.grad is not None]
    try:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    except RuntimeError:   # "can't use the foreach API on cpu tensors" (older torch)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def train_fold(k, train_b, val_b, cfg, model, device, fold_dir: Path, log, progress=None):
    """Train the fold's model on its slides `train_b` (prepared), keeping the epoch best on `val_b`
    if any; `progress` (runs.Progress) times the steps and epochs for the estimate of time left."""
    tc = cfg["train"]
    progress = progress or one_fold(train_b, val_b, [], tc["epochs"])
    epochs, steps_per_epoch = tc["epochs"], len(train_b)
    opt = adamw(model.parameters(), tc["lr"], tc["weight_decay"])
    total, warmup = epochs * steps_per_epoch, tc["warmup_epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    start, best = 0, (-math.inf, None)
    avg = {n: t.detach().clone() for n, t in model.state_dict().items()} if tc["ema"] else None
    ckpt = fold_dir / "checkpoint.pt"
    if ckpt.exists():  # --resume: continue after the last finished epoch
        # tensors, numbers and strings only
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, best = state["epoch"] + 1, state["best"]
        avg = state.get("ema", avg)
        log(f"fold {k}: resumed after epoch {start}")
    progress.begin_epochs(epochs - start)
    last = "none"   # the last finite epoch loss, for the message if training diverges
    if val_b and start == 0 and cfg["model"].get("spatial_start"):
        best = (val_score(model, val_b, cfg, device), weights(model))  # the closed form competes
        log(f"fold {k} epoch 0 (the spatial ridge alone) val_pcc_gene {best[0]:.4f}")

    def diverged(what):  # the last checkpoint (if any) stays as it was: a NaN model is never saved
        kept = ckpt if ckpt.exists() else "no checkpoint"
        return Diverged(f"fold {k} epoch {epoch + 1}: {what}; stopped, {kept} kept as it was: "
                        f"lower train.lr ({tc['lr']}) or train.clip ({tc['clip']})")
    for epoch in range(start, epochs):
        t0 = time.time()
        # dropout: the same stream after a resume
        torch.manual_seed(tc["seed"] * 100003 + k * 1009 + epoch)
        gen = torch.Generator().manual_seed(tc["seed"] * 100003 + k * 1009 + epoch)
        strength = augment.aug_strength(epoch, epochs, tc["augment"])
        model.train()
        total_loss = torch.zeros((), device=device)
        for i in torch.randperm(len(train_b), generator=gen).tolist():
            t_step = time.time()
            b = augment.augmented(train_b[i], strength, tc["augment"], gen)
            out = forward(model, b, device)
            loss = compute_loss(out, {key: v.to(device) for key, v in b.items()
                                      if isinstance(v, torch.Tensor)}, cfg, model)
            if not torch.isfinite(loss):   # stop at once: every later step would be NaN
                raise diverged(f"the loss is {loss.item()} (last finite epoch loss {last})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), tc["clip"])
            opt.step()
            sched.step()
            if avg is not None:
                ema_update(avg, model, tc["ema"], sched.last_epoch - 1)
            total_loss += loss.detach()
            progress.step(len(train_b[i]["features"]), time.time() - t_step)
        mean_loss = total_loss.item() / len(train_b)
        if not finite_weights(model):       # a finite loss, then a step to non-finite weights
            raise diverged(f"the weights are no longer finite (epoch loss {mean_loss:.4f})")
        last = f"{mean_loss:.4f} at epoch {epoch + 1}"
        line = f"fold {k} epoch {epoch + 1}/{epochs} loss {mean_loss:.4f}"
        if val_b:
            live = weights(model) if avg is not None else None
            if avg is not None:                  # score the weights that would be kept
                model.load_state_dict(avg)
            score = val_score(model, val_b, cfg, device)
            line += f" val_pcc_gene {score:.4f}"
            if score > best[0]:
                best = (score, weights(model))
            if live is not None:
                model.load_state_dict(live)
        seconds = time.time() - t0
        if (epoch + 1) % tc["checkpoint_every"] == 0 and epoch + 1 < epochs:
            # before the line: a kill after it loses nothing
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "epoch": epoch, "best": best, "ema": avg},
                        ckpt)
        log(f"{line} {seconds:.1f}s/epoch eta {progress.epoch(seconds)}")
    if best[1] is not None or avg is not None:  # the best validation epoch, else the weight average
        model.load_state_dict(best[1] if best[1] is not None else avg)


def run_fold(k, train_ids, test_ids, cfg, root: Path, run_dir: Path, device, log, progress=None):
    """Fold k: its genes, its model (closed-form fits first), training unless no test slide would
    use the network, then its test predictions; `progress` (runs.Progress, started on this fold)
    times it."""
    tc, mc = cfg["train"], ModelConfig.from_dict(cfg["model"])
    fold_dir = run_dir / f"fold_{k}"
    train_slides = [data.read_slide(root / f"{s}.h5") for s in train_ids]
    test_genes = [data.read_slide_meta(root / f"{s}.h5").genes for s in test_ids]
    genes = choose_genes(cfg, train_slides, root, [g for g in test_genes if g is not None])
    train_slides = [data.take_genes(s, genes, path=root / f"{i}.h5")
                    for s, i in zip(train_slides, train_ids)]
    test_slides = [data.read_slide(root / f"{s}.h5", genes=genes, zero_fill=False)
                   for s in test_ids]
    train_slides, val_slides, cal_slides = held_out(train_slides, cfg)    # neither trains the model
    train_b = [prepare(s, cfg, mc.unit_um) for s in train_slides]
    val_b = [prepare(s, cfg, mc.unit_um) for s in val_slides]
    progress = progress or one_fold(train_b, val_b, test_slides, tc["epochs"])
    feats = torch.cat([b["features"] for b in train_b]).float()
    targets = torch.cat([b["target"] for b in train_b])
    torch.manual_seed(tc["seed"] * 100003 + k)
    model = build_model(mc, feats.shape[1], len(genes))
    n_pathways = mc.pathway_tokens if mc.arch == "tessera" else 0
    model.init_from_data(feats.mean(0), feats.std(0), targets.mean(0),
                         membership(cfg, genes, n_pathways, root))
    if mc.head_var:  # the predicted spread starts at each gene's training variance
        start_variance((model.net if hasattr(model, "net") else model).var_head, targets.var(0))
    model.to(device)
    if mc.arch == "ridge":
        model.fit(feats.to(device), targets.to(device))
        log(f"fold {k}: ridge fitted on {feats.shape[0]} spots")
    elif hasattr(model, "fit_slides"):  # the spatial ridge, alone or as tessera's start
        model.cpu().fit_slides(train_b)
        model.to(device)
        log(f"fold {k}: closed-form spatial ridge fitted on {feats.shape[0]} spots"
            + (f"; chosen on the training slides: {model.chosen}" if model.chosen else ""))
    # model.ood_fallback: which test slides the ridge alone predicts is known now, before training
    alone = [s.slide_id for s in test_slides
             if mc.ood_fallback and model.unlike_training(s.features)]
    for s in alone:
        log(f"fold {k}: {s} is unlike every training slide: predicted by the spatial ridge alone")
    unused = bool(test_slides) and len(alone) == len(test_slides)   # the network would serve none
    trained = mc.arch not in ("ridge", "ridge_spatial") and not (unused and tc["skip_unused"])
    if mc.arch not in ("ridge", "ridge_spatial"):
        n_params = sum(p.numel() for p in model.parameters())
        log(f"fold {k}: {len(train_slides)} train / {len(val_slides)} val / {len(test_slides)} "
            f"test slides, {len(genes)} genes, {n_params / 1e6:.2f}M parameters, device {device}")
    if unused:
        log(f"fold {k}: every test slide is predicted by the spatial ridge alone: "
            + ("the network is trained anyway (train.skip_unused=false)" if trained else
               "the network is not trained (train.skip_unused=false trains it anyway)"))
    if trained:
        train_fold(k, train_b, val_b, cfg, model, device, fold_dir, log, progress)
    else:
        progress.begin_epochs(0)
    save_atomic({"model": model.state_dict(), "model_config": dataclasses.asdict(mc),
                 "genes": genes, "in_dim": feats.shape[1], "normalize": cfg["data"]["normalize"],
                 "trained": trained}, fold_dir / "model.pt")
    # the fold's own held-out slides, never its test slides
    held, calibration = cal_slides or val_slides, None
    if held:
        calibration = predict.calibrate_model(model, genes, held,
                                              [slide_targets(s, cfg) for s in held], cfg, device,
                                              fold_dir / "calibration.h5")
        q = float(torch.as_tensor(calibration["q"]).median())
        log(f"fold {k}: split-conformal {100 * calibration['level']:g}% intervals from {len(held)} "
            f"held-out slide(s), sigma {calibration['sigma']}, median q {q:.3f}")
    for s in test_slides:
        target = slide_targets(s, cfg) if s.counts is not None else None
        predict.write_slide_predictions([(model, genes)], s, cfg, device, fold_dir / "pred",
                                        true=target, fold=k, mc=cfg["eval"]["mc_samples"],
                                        seed=tc["seed"], calibration=calibration,
                                        formats=("h5", "h5ad") if cfg["eval"]["save_h5ad"]
                                        else ("h5",))
    (fold_dir / "checkpoint.pt").unlink(missing_ok=True)
    with data.atomic_path(fold_dir / "done") as tmp:
        tmp.write_text("finished\n")


def main(argv=None):
    """The command line; a user's mistake (config, files, caches, run folder) ends it with one
    line."""
    try:
        return run(argv)
    except (checks.ConfigError, data.CacheError, files.DiskFull, files.TooLarge) as e:
        raise SystemExit(" ".join(str(e).split())) from None


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                   help="YAML config (default: the demo)")
    p.add_argument("overrides", nargs="*", help="key.sub=value (value parsed as YAML)")
    p.add_argument("--resume", action="store_true", help="continue runs/<name> where it stopped")
    p.add_argument("--fold", action="append", default=[], metavar="K",
                   help="train only fold K (repeat, or K,L); other processes may train other folds "
                        "of the run")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch: the same as run.threads=N")
    p.add_argument("--keys", action="store_true",
                   help="list every config key with its default and meaning, and exit")
    args = p.parse_intermixed_args(argv)
    if args.keys:
        print(keys_table())
        return {}
    if args.threads is not None:
        args.overrides.append(f"run.threads={args.threads}")
    if "=" in args.config:  # `python train.py key=value`: overrides on the default config
        args.overrides.insert(0, args.config)
        args.config = str(DEFAULT_CONFIG)
    cfg = load_config(args.config, args.overrides)
    run_dir = runs.check_run_dir(cfg)
    device = predict.resolve_device(cfg["run"]["device"])
    root = Path(cfg["data"]["root"])
    notes = []
    if not root.exists() and cfg["data"]["synthetic"] and root == checks.DEMO_ROOT:
        if synthetic is None:
            raise checks.ConfigError(f"key 'data.synthetic': data.root {root} is missing and "
                                     "synthetic.py (with hest.py), which makes the demo dataset, "
                                     "is not in this copy")
        syn, t0 = cfg["data"]["synthetic"], time.time()
        synthetic.make_synthetic(root, n_slides=syn.get("slides", 12), seed=syn.get("seed", 0),
                                 n_spots=syn.get("spots", 1500), pseudo=syn.get("pseudo", True))
        notes.append(f"data.root {root} was missing: generated the synthetic dataset of "
                     f"data.synthetic there ({time.time() - t0:.1f}s)")
    folds = checks.check_data(cfg, root, log=notes.append)
    checks.check_folds(cfg, folds, root)
    wanted = runs.fold_numbers(args.fold, len(folds))
    record = runs.fold_record(cfg, folds, root)
    notes += runs.open_run(run_dir, cfg, record, args.resume, joining=bool(wanted))
    todo, claimed = runs.claim_folds(run_dir, wanted or list(range(len(folds))), args.resume)
    try:
        return train_folds(run_dir, cfg, folds, todo, notes + claimed, args.config, root, device,
                           runs.fold_sizes(record, root))
    finally:
        runs.release_folds(run_dir, todo)


def train_folds(run_dir: Path, cfg: dict, folds, todo: list[int], notes: list[str], config, root,
                device, sizes: list[dict]):
    """Train the folds this process holds the locks of (`sizes`: what each fold of the run does,
    runs.fold_sizes); the results once every fold of the run is done."""
    logfile = open(run_dir / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        try:
            logfile.write(msg + "\n")
            logfile.flush()
        except OSError as e:
            raise files.disk_full(run_dir / "log.txt", e) from None

    for note in filter(None, notes):
        log(note)
    predict.set_threads(cfg["run"]["threads"])
    started = time.time()
    progress = runs.Progress([sizes[k] for k in todo], cfg["train"]["epochs"])

    log(f"run {run_dir}: {len(folds)} folds, training {', '.join(map(str, todo)) or 'none'}, "
        f"config {config}")
    for k in todo:
        progress.start_fold()
        run_fold(k, *folds[k], cfg, root, run_dir, device, log, progress)
        total, in_epochs, epochs = progress.end_fold()
        log(f"fold {k}: done in {total:.1f}s, of which {in_epochs:.1f}s in {epochs} epoch(s)")
        runs.release_folds(run_dir, [k])
    missing = [f"fold_{k}" for k in range(len(folds))
               if not (run_dir / f"fold_{k}" / "done").exists()]
    if missing:
        log(f"finished in {time.time() - started:.0f}s; results wait for {', '.join(missing)} "
            f"(train them with --fold, then: python eval.py {run_dir})")
        return None
    results = evaluation.evaluate_run(run_dir)   # every fold is done: the last process writes them
    log(f"finished in {time.time() - started:.0f}s\n{(run_dir / 'results.md').read_text()}")
    return results


if __name__ == "__main__":
    # SIGTERM (a job scheduler's stop) unwinds like an exception: this process's locks are released
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()

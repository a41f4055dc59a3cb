"""Every mistake a user can make in a config, the files it names and the slide caches, caught before
any fold trains: one line naming the file or key, what was expected and what was found. train.py
calls, in order: check_config (types and ranges of every key, pure), runs.check_run_dir (where the
run folder may be), check_data (data.root, slide headers via data.read_slide_meta, every value of
every slide the run reads via data.scan_slide, gene list, GMT, folds, the memory the largest slide
needs), check_folds (no slide or patient in training and test). Nothing here writes a file; the run
folder is runs.py's.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import yaml

import data
import files
import lattice
from model import ModelConfig, build_model, check_config as check_model

# the only folder train.py fills with the synthetic dataset (data.synthetic)
DEMO_ROOT = Path("data/synthetic")


class ConfigError(ValueError):
    """A user's mistake in the config, its files or the run folder; train.main prints it as one
    line."""


def _fail(key, expected, found):
    raise ConfigError(f"key '{key}': expected {expected}, found {found!r}")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key written twice in one mapping (YAML would keep the last
    silently)."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor`: construct_mapping merges it
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                problem=f"found the key {key!r} twice in one mapping (line "
                f"{key_node.start_mark.line + 1}); expected each key once")
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.1 reads 1e-6 (no dot) as a string; YAML 1.2 and every user read it as a number
UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                      re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                      list("-+0123456789"))


def load_yaml(text: str):
    """YAML text -> Python values, as yaml.safe_load, but a duplicated key is a yaml.YAMLError."""
    return yaml.load(text, Loader=UniqueKeyLoader)


# ---- types and ranges -------------------------------------------------------------------------
KIND_TEXT = {"bool": "true or false", "int": "an integer", "number": "a number", "str": "a string",
             "count": "an integer or auto", "ints": "a list of integers",
             "numbers": "a list of numbers", "mapping": "a mapping",
             "switch": "true, false or auto"}
# keys whose default is None (any kind allowed there but this one, or null)
NULLABLE = {"data.split_dir": "str", "data.gmt": "str", "data.fold_seed": "int",
            "model.unit_um": "number", "model.ridge_alpha": "number"}
KINDS = {"model.radii": "numbers", "model.slide_norm": "switch", "train.val_slides": "count"}


def at_least(lo):
    return (lambda v: v >= lo), f">= {lo}"


def above(lo):
    return (lambda v: v > lo), f"> {lo}"


def one_of(*choices):
    return (lambda v: v in choices), f"(one of {', '.join(map(str, choices))})"


PROBABILITY = (lambda v: 0 <= v < 1), "in [0, 1)"
RANGES = {
    "data.folds": ((lambda v: v == -1 or v >= 2), ">= 2, or -1 (leave one patient out)"),
    "data.group": one_of("patient", "slide"), "data.assign": one_of("balanced", "kfold", "hist"),
    "model.dim": at_least(1), "model.heads": at_least(1), "model.dropout": PROBABILITY,
    "model.attn_dropout": PROBABILITY, "model.ffn_ratio": at_least(1), "model.unit_um": above(0),
    "model.w": at_least(1), "model.depths": ((lambda v: len(v) > 0 and min(v) >= 1),
                                             "with one entry >= 1 per level"),
    "model.decoder_depths": ((lambda v: all(d >= 1 for d in v)), "with entries >= 1"),
    "model.beta": at_least(0), "model.tau": above(0), "model.knn_k": at_least(1),
    "model.local_blocks": at_least(0), "model.calibration_tokens": at_least(0),
    "model.pathway_tokens": at_least(0), "model.hidden": at_least(1), "model.pca": at_least(1),
    "model.ridge_alpha": above(0),
    "model.radii": ((lambda v: len(v) > 0 and min(v) > 0),
                    "with at least one radius, each > 0 (spot pitches)"),
    "train.ema": PROBABILITY, "train.epochs": at_least(1), "train.lr": above(0),
    "train.weight_decay": at_least(0), "train.warmup_epochs": at_least(0), "train.clip": above(0),
    "train.loss": one_of("mse", "pcc", "mse_pcc", "zinb", "gaussian"),
    "train.pcc_alpha": at_least(0), "train.pathway_lambda": at_least(0),
    "train.val_slides": ((lambda v: v == "auto" or v >= 0), ">= 0"),
    "train.nll_beta": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "train.consistency_lambda": at_least(0), "train.align_lambda": at_least(0),
    "eval.interval": ((lambda v: 0 < v < 1), "in (0, 1)"), "train.checkpoint_every": at_least(1),
    "train.augment.start": at_least(0), "train.augment.end": at_least(0),
    "train.augment.p_drop": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "train.augment.shear_deg": at_least(0), "train.augment.rot_deg": at_least(0),
    "eval.mc_samples": at_least(0), "eval.calibration_slides": at_least(0),
    "run.threads": ((lambda v: 0 <= v <= (os.cpu_count() or 1)),
                    f"from 0 to {os.cpu_count() or 1} (this machine's cores)"),
    "run.name": ((lambda v: v.strip() != "" and "/" not in v),
                 "(a folder name, not empty, no '/')"),
    # numpy's RandomState (data.assign kfold, hist) takes seeds below 2^32
    "train.seed": ((lambda v: 0 <= v < 2 ** 32), "from 0 to 2^32 - 1"),
    "data.fold_seed": ((lambda v: 0 <= v < 2 ** 32), "from 0 to 2^32 - 1"),
}


ANY = lambda v: True  # noqa: E731
# data.smooth (protocols.SMOOTH, protocols.spcs): kind, range, what the error says was expected
SMOOTH_KEYS = {
    "method": ("str", lambda v: v == "spcs", "spcs"),
    "alpha": ("number", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "beta": ("number", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "tau_p": ("int", lambda v: v >= 0, "an integer >= 0"),
    "tau_s": ("int", lambda v: v >= 1, "an integer >= 1"),
    "pcs": ("int", lambda v: v >= 1, "an integer >= 1"),
    "hexagonal": ("bool", ANY, "true or false"), "rescale": ("bool", ANY, "true or false")}


def _number(value) -> bool:
    """An int or a finite float (nan and inf are never a sensible setting: they turn training into
    NaN)."""
    return ((isinstance(value, int) and not isinstance(value, bool))
            or (isinstance(value, float) and math.isfinite(value)))


def _kind(value, kind) -> bool:
    integer = isinstance(value, int) and not isinstance(value, bool)
    return {"bool": isinstance(value, bool), "int": integer, "str": isinstance(value, str),
            "mapping": isinstance(value, dict),
            "switch": isinstance(value, bool) or value == "auto", "number": _number(value),
            "count": integer or value == "auto",
            "ints": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                    for v in value),
            "numbers": isinstance(value, list) and all(_number(v) for v in value)}[kind]


def _kind_of(default) -> str | None:
    for kind, t in (("bool", bool), ("int", int), ("number", float), ("str", str), ("ints", list),
                    ("mapping", dict)):
        if isinstance(default, t):
            return kind
    return None


def _check_value(name, value, default):
    nullable = NULLABLE.get(name)
    kind = nullable or KINDS.get(name) or _kind_of(default)
    if kind is None or (nullable and value is None):
        return
    if not _kind(value, kind):
        values = value if isinstance(value, list) else [value]
        text = KIND_TEXT[kind]
        if (kind in ("number", "numbers")
            and any(isinstance(v, float) and not math.isfinite(v) for v in values)):
            text = text.replace("a number", "a finite number").replace("of numbers",
                                                                       "of finite numbers")
        if kind == "str" and isinstance(value, bool):  # YAML 1.1: yes, no, on, off are booleans
            text += f" (YAML reads an unquoted yes/no/on/off as {str(value).lower()}: quote it)"
        _fail(name, text + (" or null" if nullable else ""), value)
    if name in RANGES:
        ok, text = RANGES[name]
        if not ok(value):
            _fail(name, f"{KIND_TEXT[kind]} {text}", value)


def check_types(cfg: dict, defaults: dict, prefix: str = "") -> None:
    """Every key has the kind of its default (an integer where the default is one, ...) and a value
    in its range (RANGES). data.genes and data.synthetic take several forms: check_config."""
    for key, default in defaults.items():
        name, value = prefix + key, cfg[key]
        if name in ("data.genes", "data.synthetic"):
            continue
        if isinstance(default, dict):
            if not isinstance(value, dict):
                _fail(name, "a mapping", value)
            check_types(value, default, name + ".")
        else:
            _check_value(name, value, default)


def check_config(cfg: dict, defaults: dict) -> None:
    """The whole config, before anything is read or written: kinds, ranges, and the combinations
    that cannot work (model.check_config, zinb)."""
    check_types(cfg, defaults)
    genes = cfg["data"]["genes"]
    if isinstance(genes, dict):
        if set(genes) - {"by", "n"} or "n" not in genes:
            _fail("data.genes", "{by: hvg|mean, n: N}", genes)
        if genes.get("by", "hvg") not in ("hvg", "mean"):
            _fail("data.genes.by", "hvg or mean", genes["by"])
        if not _kind(genes["n"], "int") or genes["n"] < 1:
            _fail("data.genes.n", "an integer >= 1", genes["n"])
    elif not (genes is None or isinstance(genes, str)):
        _fail("data.genes", "a gene list file, {by: hvg|mean, n: N} or null", genes)
    smooth = cfg["data"]["smooth"]
    if smooth is not None:
        if not isinstance(smooth, dict) or set(smooth) - set(SMOOTH_KEYS):
            _fail("data.smooth", f"null or a mapping with {', '.join(SMOOTH_KEYS)}", smooth)
        for key, value in smooth.items():
            kind, ok, text = SMOOTH_KEYS[key]
            if not (_kind(value, kind) and ok(value)):
                _fail(f"data.smooth.{key}", text, value)
    syn = cfg["data"]["synthetic"]
    if syn is not None:
        if not isinstance(syn, dict) or set(syn) - {"slides", "seed", "spots", "pseudo"}:
            _fail("data.synthetic", "null or a mapping with slides, seed, spots, pseudo", syn)
        for key, value in syn.items():
            lowest = 0 if key == "seed" else 1
            if key == "pseudo" and not _kind(value, "bool"):
                _fail("data.synthetic.pseudo", "true or false", value)
            if key != "pseudo" and not (_kind(value, "int") and value >= lowest):
                _fail(f"data.synthetic.{key}", f"an integer >= {lowest}", value)
    device = cfg["run"]["device"]
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device):
        _fail("run.device", "auto, cpu, cuda or cuda:<index>", device)
    expand_paths(cfg)
    try:
        mc = ModelConfig.from_dict(cfg["model"])
        check_model(mc)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mc_samples = cfg["eval"]["mc_samples"]
    if mc_samples and not has_dropout(sized_model(mc, 1, 1)):
        raise ConfigError("key 'eval.mc_samples': expected 0 for a model without dropout "
                          f"(model.arch = {mc.arch}, model.dropout = {mc.dropout}, "
                          f"model.attn_dropout = {mc.attn_dropout}): Monte-Carlo passes would all "
                          f"be equal; found {mc_samples}")
    if ((cfg["train"]["loss"] == "zinb") != (mc.head == "zinb")
        or (cfg["train"]["loss"] == "gaussian") != mc.head_var):
        raise ConfigError("train.loss = zinb and model.head = zinb go together, as do train.loss = "
                          "gaussian and model.head_var = true")
    if cfg["train"]["loss"] == "zinb" and not cfg["data"]["normalize"]:
        raise ConfigError("train.loss = zinb predicts counts per 1e4 (library size as offset): "
                          "set data.normalize=true so that metrics compare like with like")
    check_levels(cfg, mc)


PATH_KEYS = ("data.root", "data.gmt", "data.genes", "data.split_dir", "run.dir")


def expand_paths(cfg: dict) -> None:
    """The path keys (PATH_KEYS) as a shell expands them: ~ to the home folder, $VAR and ${VAR} to
    the environment's values, in place (config.yaml records the expanded path). A variable that is
    not set, or a path whose symbolic links loop, is refused naming the key."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = cfg[section][name]
        if not isinstance(value, str):
            continue
        expanded = os.path.expandvars(os.path.expanduser(value))
        unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
        if unset:
            _fail(key, f"a path (${unset.group(1)} is not set in the environment)", value)
        try:
            Path(expanded).resolve()
        except (OSError, RuntimeError):
            raise ConfigError(f"key '{key}': expected a path whose symbolic links lead somewhere, "
                              f"found {value!r}, whose links loop") from None
        cfg[section][name] = expanded


def check_levels(cfg: dict, mc: ModelConfig) -> None:
    """The keys of the pyramid below and above the spot (HiFusion, MagNet) that only work together;
    model.check_config has already put model.out_levels inside the pyramid."""
    levels, tc = list(mc.out_levels), cfg["train"]
    if (mc.sub_levels or levels != [0]) and cfg["data"]["normalize"]:
        raise ConfigError(f"model.out_levels = {levels} / model.sub_levels = {mc.sub_levels}: "
                          "levels are tied by summing counts over children, which needs raw log1p "
                          "targets: set data.normalize=false")
    weights = tc["level_weights"]
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(levels)
                                or not all(_kind(w, "number") and w >= 0 for w in weights)):
        _fail("train.level_weights",
              f"null or one number >= 0 per model.out_levels entry ({levels})", weights)
    if tc["align_lambda"] and not mc.sub_levels:
        raise ConfigError("train.align_lambda needs model.sub_levels >= 1 (sub-tokens to align "
                          "with the spot)")


# ---- data: files, slide headers, folds --------------------------------------------------------
def data_file(cfg: dict, key: str, root: Path, folder: bool = False) -> Path:
    """The file (or folder) a `data.<key>` names: as given when absolute, else inside data.root,
    else relative to the working folder."""
    given = Path(cfg["data"][key])
    places = [given] if given.is_absolute() else [root / given, given]
    for p in places:
        if p.is_dir() if folder else p.is_file():
            return p
    raise ConfigError(f"key 'data.{key}': expected {'a folder' if folder else 'a file'}, "
                      f"found none at {' or '.join(str(p) for p in places)}")


def _check_headers(paths: list[Path], metas: list[data.SlideMeta], training: set[str],
                   normalize: bool, sub_levels: int = 0, log=print):
    """Every slide's header: equal feature widths, spots, spread coordinates (at most half of the
    spots at a position another spot has: the default lattice unit is the median spacing), slide
    id = file name, counts on training slides, and library sizes that normalisation can divide
    by."""
    first = metas[0]
    summed = [p.name for p, m in zip(paths, metas)
              if normalize and m.genes is not None and not m.library_size]
    if summed:
        log(f"note: data.normalize=true: {len(summed)} slides have no library_size "
            f"({data.listed(summed)}); their counts summed over the genes of the cache "
            "stand in for it")
    for p, m in zip(paths, metas):
        if m.slide_id != p.stem:
            raise data.CacheError(f"{p}: key 'attrs/slide_id': expected {p.stem!r} (the "
                                  f"file name), found {m.slide_id!r}")
        if m.n_spots == 0:
            raise data.CacheError(f"{p}: key 'features': expected at least one spot, found 0 rows")
        if m.n_features != first.n_features:
            raise data.CacheError(f"{p}: key 'features': expected {first.n_features} features "
                                  f"per spot like {paths[0].name}, found {m.n_features}")
        if m.n_spots > 1 and m.coords_extent == 0:
            raise data.CacheError(f"{p}: key 'coords': expected spots at different "
                                  f"positions, found all {m.n_spots} at one point")
        if 2 * m.shared_position > m.n_spots:
            raise data.CacheError(f"{p}: key 'coords': expected spots at distinct positions, found "
                                  f"{m.shared_position} of {m.n_spots} at a position another spot "
                                  "has (collapsed coordinates; the lattice unit, the median "
                                  "spacing of the spots, would be 0)")
        data.check_sub_levels(p, sub_levels, m.sub_per_spot)
        if m.genes is None and p.stem in training:
            raise data.CacheError(f"{p}: key 'counts': expected counts on a training "
                                  "slide, found none (a slide without counts can only be "
                                  "predicted: predict.py)")
        if normalize and m.zero_library:
            raise data.CacheError(f"{p}: key 'library_size': expected the total counts of "
                                  f"each spot for data.normalize=true, found {m.zero_library} "
                                  "spots with library_size 0 and counts > 0")


def _check_gmt(cfg: dict, root: Path, genes: list[str], log) -> None:
    """The GMT parses; the pathway sets the model uses share genes with the data (a warning per set
    otherwise), and at least one does when the pathway head is built from them."""
    path = data_file(cfg, "gmt", root)
    sets = files.read_gmt(path)
    mc = ModelConfig.from_dict(cfg["model"])
    if mc.arch == "tessera" and mc.pathway_tokens > len(sets):
        log(f"note: {path}: model.pathway_tokens = {mc.pathway_tokens} but data.gmt has "
            f"{len(sets)} sets: {mc.pathway_tokens - len(sets)} tokens have no gene set (learned "
            "freely; the pathway loss skips them)")
    used = list(sets.items())[:mc.pathway_tokens if mc.arch == "tessera" else 0]
    have = set(genes)
    overlap = [(name, len(have.intersection(members)), len(members)) for name, members in used]
    empty = sum(k == 0 for _, k, _ in overlap)
    if not empty:
        return
    table = ", ".join(f"{name} {k}/{n}" for name, k, n in overlap)
    if empty == len(overlap) and mc.head == "pathway":
        raise ConfigError(f"{path}: key 'data.gmt': expected pathway sets sharing genes with "
                          f"the data for model.head = pathway, found none of the {len(overlap)} "
                          f"used sets does ({table})")
    log(f"warning: {path}: {empty} of the {len(overlap)} pathway sets used share no gene "
        f"with the data's {len(genes)} genes; genes in the data per set: {table}")


def check_data(cfg: dict, root: Path, log=print) -> list[tuple[list[str], list[str]]]:
    """data.root and every slide header, the gene list and GMT files, and the folds; returns the
    folds."""
    dc, tc = cfg["data"], cfg["train"]
    if not root.is_dir():
        hint = (f" (the synthetic dataset of data.synthetic is generated only at {DEMO_ROOT}; "
                f"`python synthetic.py --out {root}` makes one elsewhere)" if dc["synthetic"]
                else "")
        raise ConfigError("key 'data.root': expected a folder of slide caches, found no folder "
                          f"{root}{hint}")
    files.check_finished(root)
    if dc["split_dir"]:
        try:
            folds = files.read_split_csvs(data_file(cfg, "split_dir", root, folder=True))
        except FileNotFoundError as e:
            raise ConfigError(f"key 'data.split_dir': {e}") from None
        have = {p.stem for p in root.glob("*.h5")}
        for k, fold in enumerate(folds):
            for part, split_ids in zip(("train", "test"), fold):
                split = data_file(cfg, "split_dir", root, folder=True) / f"{part}_{k}.csv"
                for s in split_ids:     # an id is a file name inside data.root, never a path
                    files.plain_name(s, f"{split}: key 'sample_id'")
                missing = [s for s in split_ids if not (root / f"{s}.h5").is_file()]
                if missing:
                    hint = data.case_hint(missing, have)
                    raise ConfigError(f"{split}: key 'data.split_dir': expected a cache <id>.h5 in "
                                      f"{root} for every sample id, found none for {len(missing)}: "
                                      f"{data.listed(missing)}{hint}")
        ids = sorted({s for train, test in folds for s in train + test})
        paths = [root / f"{s}.h5" for s in ids]
        metas = [data.read_slide_meta(p) for p in paths]
    else:
        paths = sorted(p for p in root.glob("*.h5") if not p.name.startswith("."))   # not ._<name>
        if not paths:
            raise ConfigError("key 'data.root': expected slide caches <slide>.h5 in "
                              f"{root}, found none")
        metas = [data.read_slide_meta(p) for p in paths]
        groups = [p.stem for p in paths] if dc["group"] == "slide" else [m.patient for m in metas]
        try:
            folds = data.make_folds([p.stem for p in paths], groups, dc["folds"],
                                    tc["seed"] if dc["fold_seed"] is None else dc["fold_seed"],
                                    dc["assign"])
        except ValueError:
            raise ConfigError("key 'data.folds': expected -1 or an integer from 2 to "
                              f"{len(set(groups))} (the number of {dc['group']}s in {root}), found "
                              f"{dc['folds']}") from None
    training = {s for train, _ in folds for s in train}
    _check_headers(paths, metas, training, dc["normalize"], cfg["model"]["sub_levels"], log)
    for k, (train, _) in enumerate(folds):
        if len(train) <= ((tc["val_slides"] != "auto" and tc["val_slides"])
                          + (cal := cfg["eval"]["calibration_slides"])):
            raise ConfigError(f"key 'train.val_slides'{' + eval.calibration_slides' * bool(cal)}: "
                              f"expected fewer than the {len(train)} training slides of fold {k}, "
                              f"found {tc['val_slides']}{f' + {cal}' * bool(cal)}")
    counted = [(p, m) for p, m in zip(paths, metas) if m.genes is not None]
    genes = data.shared_genes([m.genes for _, m in counted])
    if not genes:
        raise ConfigError(f"{root}: expected genes that every slide with counts has, found "
                          "none in common")
    if isinstance(dc["genes"], str):
        path = data_file(cfg, "genes", root)
        wanted = files.read_gene_list(path)
        if not wanted:
            raise ConfigError(f"{path}: key 'data.genes': expected a list of genes, found "
                              "an empty one")
        for p, m in counted:
            missing = sorted(set(wanted) - set(m.genes))
            if missing:
                raise ConfigError(f"{path}: key 'data.genes': expected genes the slides "
                                  f"have, found {len(missing)} missing from {p}: "
                                  f"{data.listed(missing)}{data.case_hint(missing, m.genes)}")
        genes = wanted
    if dc["gmt"]:
        _check_gmt(cfg, root, genes, log)
    # every value of every slide the run reads, in blocks of rows (read_slide's own checks)
    for p in paths:
        fractional = data.scan_slide(p)
        if fractional and p.stem in training:
            log(f"warning: {p}: key 'counts': {fractional} non-integer values on a training slide: "
                "raw counts are integers; counts already log-transformed or normalised would be "
                "transformed twice")
    n_genes = len(genes) if not isinstance(dc["genes"], dict) else min(dc["genes"]["n"], len(genes))
    largest = max((m.n_spots, str(p)) for p, m in zip(paths, metas) if p.stem in training)
    check_memory(cfg, metas[0].n_features, n_genes, *largest)
    return folds


def check_folds(cfg: dict, folds: list[tuple[list[str], list[str]]], root: Path) -> None:
    """No fold tests a slide it trains on (train.val_slides are taken from the training slides), and
    when folds group patients (data.group = patient) no patient is in both training and test of a
    fold. Split files (data.split_dir) can break both; check_data has made sure every slide
    exists."""
    dc = cfg["data"]
    split = data_file(cfg, "split_dir", root, folder=True) if dc["split_dir"] else None
    where = (lambda k: f"{split / f'test_{k}.csv'}: key 'data.split_dir'" if split  # noqa: E731
             else "key 'data.folds'")
    # each slide's header once
    ids = {s for train_ids, test_ids in folds for s in train_ids + test_ids}
    patients = ({s: data.read_slide_meta(root / f"{s}.h5").patient for s in ids}
                if dc["group"] == "patient" else {})
    for k, (train_ids, test_ids) in enumerate(folds):
        both = sorted(set(train_ids) & set(test_ids))
        if both:
            raise ConfigError(f"{where(k)}: expected test slides that fold {k} does not "
                              f"train on, found {len(both)} in both train_{k} and test_{k}: "
                              f"{', '.join(both[:10])}")
        if not patients:
            continue
        trained = {}
        for s in train_ids:
            trained.setdefault(patients[s], []).append(s)
        shared = [(p, trained[p], [s for s in test_ids if patients[s] == p])
                  for p in sorted({patients[s] for s in test_ids} & set(trained))]
        if shared:
            listed = "; ".join(f"patient {p}: train {', '.join(a)}, test {', '.join(b)}"
                               for p, a, b in shared[:5])
            raise ConfigError(f"{where(k)}: expected no patient in both training and test "
                              f"of fold {k} (data.group = patient), found {len(shared)}: {listed}; "
                              "set data.group=slide if the folds are meant to split patients")


# ---- memory -------------------------------------------------------------------------------------
def has_dropout(model: torch.nn.Module) -> bool:
    """Whether Monte-Carlo dropout can vary this model's output (a dropout or an attention dropout
    above 0)."""
    return any((isinstance(m, torch.nn.Dropout) and m.p > 0) or getattr(m, "attn_drop", 0) > 0
               for m in model.modules())


def window_table_bytes(mc: ModelConfig) -> int:
    """A bound on the bytes of window attention's slot-pair tables, which every block builds from
    model.w with the model (allowed (S, S') bool and offsets (S, S', 2) int64, 17 bytes a pair,
    S = (2w)^2, S' <= (4w)^2): a model_config's w is checked with it before the model is built."""
    blocks = mc.local_blocks + sum(mc.depths) + sum(mc.decoder_depths) + mc.sub_levels + 4
    return 17 * (2 * mc.w) ** 2 * (4 * mc.w) ** 2 * blocks


def sized_model(mc: ModelConfig, in_dim: int, n_genes: int) -> torch.nn.Module:
    """The model, for its sizes: built for real when a generous bound on its tensors is small
    (milliseconds), else with its tensors on the meta device (no memory, but seconds: torch imports
    its meta kernels)."""
    blocks = mc.local_blocks + sum(mc.depths) + sum(mc.decoder_depths) + mc.sub_levels + 4
    width = max(mc.dim, mc.hidden)
    bound = (blocks * (6 + 2 * mc.ffn_ratio) * width ** 2 + window_table_bytes(mc)
             + mc.heads * (4 * mc.w) ** 2
             + (in_dim + n_genes + mc.pathway_tokens + mc.calibration_tokens + mc.pca
                + 4) * width * 4)
    if bound < 50_000_000:
        return build_model(mc, in_dim, n_genes)
    with torch.device("meta"):
        return build_model(mc, in_dim, n_genes)


def tokens_at(n_spots: int, level: int) -> float:
    """Tokens of pyramid level `level` of a slide of n_spots (generous): n_spots F^-2l below the
    spot (F = lattice.FACTOR, F^-l x F^-l sub-spots per spot), n_spots 1.8^2 / F^2l above it (the
    default lattice unit puts spots about 1.8 sites apart, a level-l site covers F^l x F^l sites),
    at least 1."""
    per_site = lattice.FACTOR ** (2 * level)
    if level <= 0:
        return n_spots / per_site
    return max(1.0, n_spots * min(1.0, 1.8 ** 2 / per_site))


def window_keys(mc: ModelConfig) -> float:
    """Key slots per query of window attention: (2w)^2 in the standard windows; with
    model.windows = union (HiST eq. 2) a window's keys are its own and the shifted windows' that
    overlap it, a (3w)^2 square."""
    return (3 * mc.w) ** 2 if mc.windows == "union" else (2 * mc.w) ** 2


def memory_estimate(mc: ModelConfig, in_dim: int, n_genes: int, n_spots: int,
                    value_bytes: int = 4) -> dict:
    """Bytes that one training step on a slide of n_spots needs, by part. Simple and deliberately
    generous:
    - state: parameters and buffers, plus per parameter its gradient and AdamW's two moments (fp32);
    - activations kept for the backward, per token and block: (24 + 4 ffn_ratio) d values (norms, q,
      k, v, attention output, projection, residuals, the FFN's hidden layers, dropout masks,
      copies), plus twice the attention weights (scores and weights): H window_keys per token for
      window attention, H k for k-NN, H per global token; doubled again when signed (two
      softmaxes); tokens at level l: tokens_at. With model.checkpoint, a block keeps only its input
      (d per token) and one block's activations are live;
    - full attention (FEAST, the coarsest level when model.coarse_attention = full, or every level
      when model.attention = full): per block the (H, M, M) bias and, per softmax branch, scores and
      weights;
    - stem and heads: N (C + d + 3 G).
    `value_bytes`: 2 under CUDA autocast (bf16), 4 on the CPU. Measured on the CPU with the demo
    config (growth of the resident memory over two training steps): 0.55 GiB for a 6k-spot slide and
    2.8 GiB for a 21k-spot one, where this gives 0.52 and 2.6 GiB."""
    model = sized_model(mc, in_dim, n_genes)
    params = sum(p.numel() for p in model.parameters())
    state = 16 * params + sum(b.numel() * b.element_size() for b in model.buffers())
    spots = n_spots * (in_dim + mc.dim + 3 * n_genes) * value_bytes
    if mc.arch != "tessera":
        return {"state": state, "activations": spots + n_spots * 2 * mc.hidden * value_bytes,
                "full attention": 0}
    L, d, H, sign = len(mc.depths), mc.dim, mc.heads, 2 if mc.signed else 1
    tokens = mc.calibration_tokens + mc.pathway_tokens

    blocks = [(0, "knn")] * mc.local_blocks  # (level, spot attention) of every block
    for level in range(L):
        mode = ("full"
                if level == L - 1 and mc.coarse_attention == "full" and mc.attention != "none"
                else mc.attention)
        blocks += [(level, mode)] * (mc.depths[level]
                                     + (mc.decoder_depths[L - 2 - level] if level < L - 1 else 0))
    blocks += [(-k, mc.attention) for k in range(1, mc.sub_levels + 1)]
    slots = {"window": H * window_keys(mc), "knn": H * mc.knn_k, "full": 0, "none": 0}
    kept = [tokens_at(n_spots, lv) * ((24 + 4 * mc.ffn_ratio) * d
                                      + 2 * sign * (slots[mode] + H * tokens)) * value_bytes
            for lv, mode in blocks]
    full = [H * tokens_at(n_spots, lv) ** 2 * (1 + 2 * sign) * value_bytes
            for lv, mode in blocks if mode == "full"]
    if mc.checkpoint:
        kept = [tokens_at(n_spots, lv) * d * value_bytes for lv, _ in blocks] + [max(kept)]
        full = full[:1]
    return {"state": state, "activations": spots + sum(kept), "full attention": sum(full)}


def inference_estimate(mc: ModelConfig, in_dim: int, n_genes: int, n_spots: int,
                       value_bytes: int = 4) -> dict:
    """Bytes one forward without gradients (predict.py, plots.py attention) needs on a slide of
    n_spots, by part, with memory_estimate's token counts per level. Generous, as memory_estimate:
    - model: parameters and buffers (no gradients, no optimizer);
    - activations: the slide's inputs (features, coordinates), the skips the decoder keeps (d per
      token of every encoder level), and the largest block's working set, (12 + 2 ffn_ratio) d
      values per token (9 d more with union windows: their keys' k and v) plus its attention
      weights (window: H window_keys, k-NN: H k, global tokens: H each), doubled when signed;
      non-tessera models: the inputs and two hidden layers per spot;
    - full attention: the largest block's (H, M, M) bias, scores and weights;
    - outputs (on the CPU, float32): 16 (N, G) arrays: the ensemble's running mean and spread and
      the predicted variance's (predict.Welford), the interval, and the copies the writers make.
    Measured on the CPU (tests/test_checks.py), peak resident growth of a forward on 5k to 40k
    spots: default.yaml 131 MB to 2.4 GB (estimate 201 MB to 6.0 GB), hist.yaml 222 to 623 MB
    (439 MB to 1.35 GB)."""
    model = sized_model(mc, in_dim, n_genes)
    state = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    inputs = n_spots * (in_dim + 4) * value_bytes
    outputs = 16 * 4 * n_spots * n_genes
    if mc.arch != "tessera":
        return {"model": state, "activations": inputs + n_spots * 2 * mc.hidden * value_bytes,
                "full attention": 0, "outputs": outputs}
    L, d, H, sign = len(mc.depths), mc.dim, mc.heads, 2 if mc.signed else 1
    tokens = mc.calibration_tokens + mc.pathway_tokens

    blocks = [(0, "knn")] * mc.local_blocks
    blocks += [(-k, mc.attention) for k in range(1, mc.sub_levels + 1)]
    for level in range(L):
        full = level == L - 1 and mc.coarse_attention == "full" and mc.attention != "none"
        blocks.append((level, "full" if full else mc.attention))
    slots = {"window": H * window_keys(mc), "knn": H * mc.knn_k, "full": 0, "none": 0}
    # union windows: k and v of a group of windows' union keys (up to (3w)^2 a window), a bound
    per_token = (12 + 2 * mc.ffn_ratio + (9 if mc.windows == "union" else 0)) * d
    work = max(tokens_at(n_spots, lv) * (per_token + 2 * sign * (slots[mode] + H * tokens))
               for lv, mode in blocks)
    skips = sum(tokens_at(n_spots, lv) * d for lv in range(-mc.sub_levels, L))
    full = max([H * tokens_at(n_spots, lv) ** 2 * (1 + 2 * sign) for lv, mode in blocks
                if mode == "full"],
               default=0)
    return {"model": state, "activations": inputs + (work + skips) * value_bytes,
            "full attention": full * value_bytes, "outputs": outputs}


def check_inference_memory(mc: ModelConfig, in_dim: int, n_genes: int, n_spots: int, where: str,
                           device="cpu", available: int | None = None) -> None:
    """Refuse, before a model runs on a whole slide, a slide whose forward cannot fit in the memory
    of `device` (inference_estimate: on CUDA the model's parts in bf16 on the GPU, the outputs on
    the CPU), with the figure and the largest slide that would fit."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    parts = lambda n: inference_estimate(mc, in_dim, n_genes, n, 2 if cuda else 4)  # noqa: E731
    places = [(device, ("model", "activations", "full attention"))] if cuda else []
    places.append((torch.device("cpu"), ("outputs",) if cuda else
                   ("model", "activations", "full attention", "outputs")))
    for place, keys in places:
        free = files.available_memory(place) if available is None else available
        if free is None:
            continue
        need = lambda n: sum(parts(n)[k] for k in keys)  # noqa: E731
        if need(n_spots) > free:
            fit = files.largest_fitting(need, 1, n_spots, free)
            detail = ", ".join(f"{k} {files.gib(parts(n_spots)[k])}" for k in keys)
            files.check_memory(need(n_spots), f"{where}: a forward over {n_spots} spots ({detail})",
                               f"slides of up to {fit} spots fit" if fit >= 1 else
                               "no slide fits: a smaller model.dim or model.w", place, free)


def check_memory(cfg: dict, in_dim: int, n_genes: int, n_spots: int, where: str,
                 available: int | None = None):
    """Refuse a config whose training step on the largest training slide cannot fit
    (memory_estimate), naming the size and the keys that would fit."""
    mc = ModelConfig.from_dict(cfg["model"])
    name = cfg["run"]["device"]
    device = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto"
              else torch.device(name))
    value_bytes = 2 if device.type == "cuda" else 4
    available = files.available_memory(device) if available is None else available
    if available is None:   # no such device: predict.resolve_device says so
        return
    parts = memory_estimate(mc, in_dim, n_genes, n_spots, value_bytes)
    need = sum(parts.values())
    if need <= available:
        return
    gib = lambda b: f"{b / 2 ** 30:.1f} GiB"  # noqa: E731
    fits = []
    for keys in ({"checkpoint": True}, {"coarse_attention": "same"},
                 {"checkpoint": True, "coarse_attention": "same"}):
        change = {k: v for k, v in keys.items() if getattr(mc, k) != v}
        other = ModelConfig.from_dict({**cfg["model"], **keys})
        if (change and mc.arch == "tessera"
            and sum(memory_estimate(other, in_dim, n_genes, n_spots, value_bytes).values())
            <= available):
            fits.append(" ".join(f"model.{k}={str(v).lower()}" for k, v in change.items()))
    hint = (f"would fit: {' or '.join(fits)}" if fits else
            "none of model.checkpoint=true, model.coarse_attention=same fits: lower "
            "model.dim, model.w, model.depths or model.pathway_tokens")
    raise ConfigError(f"{where}: {n_spots} spots need about {gib(need)} to train with this config "
                      f"(model.dim = {mc.dim}, model.w = {mc.w}, model.heads = {mc.heads}; " +
                      ", ".join(f"{k} {gib(v)}" for k, v in parts.items()) +
                      f"), found {gib(available)} available on {device}; {hint}")

"""A table of bad inputs, each run as the user would run it (a subprocess on tiny data): every one
ends the program with a non-zero status and exactly one line naming the file or key, no traceback,
and writes nothing (no run folder; every file in the working folder byte-identical before and
after)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import data
import files
from test_checks import write
from test_hest import write_h5ad

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # ~30 subprocesses, each importing torch


# ---- builders: each makes the bad input in tmp (the working folder) and returns the command line
def caches(tmp: Path) -> Path:
    root = tmp / "caches"
    for i in range(4):
        write(root, i)
    return root


def replace(tmp, slide, key, change, dtype=None):
    """Slide s<slide>'s dataset `key` replaced by change(old values) (read_slide would refuse to
    write it)."""
    with h5py.File(caches(tmp) / f"s{slide}.h5", "a") as f:
        old = files.h5_strings(f[key]) if key in data.STRING_KEYS else f[key][()]
        del f[key]
        new = change(old)
        f.create_dataset(key, data=new.astype(object) if key in data.STRING_KEYS else new,
                         dtype=data.STR if key in data.STRING_KEYS else dtype)


def at(x, index, value):
    x = x.copy()
    x[index] = value
    return x


def train(*overrides, config=None):
    return [str(ROOT / "train.py"), config or str(ROOT / "configs/default.yaml"),
            "data.root=caches", "data.folds=2", "data.genes={by: mean, n: 5}", "data.gmt=null",
            "run.name=t", "run.dir=runs", *overrides]


def bad_slide(slide, key, change, dtype=None):
    def build(tmp):
        replace(tmp, slide, key, change, dtype)
        return train()
    return build


def features_group(tmp):
    with h5py.File(caches(tmp) / "s1.h5", "a") as f:
        del f["features"]
        f.create_group("features")["x"] = np.zeros(3)
    return train()


def config_file(text):
    def build(tmp):
        caches(tmp)
        (tmp / "cfg.yaml").write_text(text)
        return train(config="cfg.yaml")
    return build


def overrides(*items):
    def build(tmp):
        caches(tmp)
        return train(*items)
    return build


def patches(tmp, n=5):
    (tmp / "patches").mkdir()
    with h5py.File(tmp / "patches" / "p1.h5", "w") as f:
        f["img"] = np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
        f["coords"] = np.arange(2 * n).reshape(n, 2) * 50.0
        f["barcode"] = np.array([[f"b{i}".encode()] for i in range(n)])


ENCODERS = ("import torch\n"
            "def nan(x):\n    return torch.full((len(x), 4), float('nan'))\n"
            "def short(x):\n    return torch.zeros(len(x) - 1, 4)\n")


def patch_img_group(tmp):
    with h5py.File(tmp / "patches" / "p1.h5", "a") as f:
        del f["img"]
        f.create_group("img")


def patch_coords_rows(tmp):
    with h5py.File(tmp / "patches" / "p1.h5", "a") as f:
        del f["coords"]
        f["coords"] = np.zeros((7, 2))


def embed(encoder, existing=False, spoil=None, extra=()):
    def build(tmp):
        patches(tmp)
        if spoil:
            spoil(tmp)
        (tmp / "enc.py").write_text(ENCODERS)
        if existing:
            (tmp / "emb").mkdir()
            (tmp / "emb" / "p1.h5").write_bytes(b"mine")
        return [str(ROOT / "hest.py"), "embed", "--patches", "patches", "--out", "emb",
                *(["--encoder", encoder] if encoder else []), *extra]
    return build


def hest_inputs(tmp, swap=False):
    """Two slides s1, s2 with the same barcodes (as Visium) at different places; embedding files
    with the patch corners (HEST: centre - half a patch), swapped between the slides when swap."""
    r = np.random.default_rng(1)
    (tmp / "st").mkdir(), (tmp / "emb").mkdir()
    barcodes = [f"b{i}" for i in range(30)]
    grid = np.array([[100.0 * (i % 6), 100.0 * (i // 6)] for i in range(30)])
    places = {"s1": grid + 1000, "s2": grid[r.permutation(30)] + 1000}
    for sid, xy in places.items():
        write_h5ad(tmp / "st" / f"{sid}.h5ad", r.poisson(2.0, (30, 4)).astype(np.float64), barcodes,
                   ["A", "B", "C", "D"], "current", xy, ["t"] * 30)
    for sid in places:
        with h5py.File(tmp / "emb" / f"{sid}.h5", "w") as f:
            f["embeddings"] = r.standard_normal((30, 4)).astype(np.float32)
            f["coords"] = places[{"s1": "s2", "s2": "s1"}[sid] if swap else sid] - 56
            f["barcodes"] = np.array([[b.encode()] for b in barcodes])


def emb_group(tmp):
    with h5py.File(tmp / "emb" / "s2.h5", "a") as f:
        del f["embeddings"]
        f.create_group("embeddings")


def emb_nan(tmp):
    with h5py.File(tmp / "emb" / "s2.h5", "a") as f:
        f["embeddings"][3, 1] = np.nan


def no_obs(tmp):
    with h5py.File(tmp / "st" / "s2.h5ad", "a") as f:
        del f["obs"]


def import_hest(*extra, swap=False, existing=False, spoil=None):
    def build(tmp):
        hest_inputs(tmp, swap)
        if spoil:
            spoil(tmp)
        (tmp / "genes.txt").write_text("ZZ\nYY\n")
        if existing:
            (tmp / "out").mkdir()
            (tmp / "out" / "s2.h5").write_bytes(b"mine")
        return [str(ROOT / "hest.py"), "import-hest", "--st", "st", "--features", "emb", "--out",
                "out", *extra]
    return build


def fake_run(tmp, test=("s0", "s1"), preds=("s0", "s1")) -> Path:
    """A finished-looking run folder: config.yaml, folds.json (one fold testing `test`) and
    fold_0/pred files with measured values for `preds` (what eval.py and plots.py read; predict.py
    checks before its models)."""
    run = tmp / "run"
    (run / "fold_0" / "pred").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  folds: 1\n  pseudo: false\n  normalize: true\nrun:\n"
                                     "  name: run\n")
    (run / "folds.json").write_text(
        json.dumps({"folds": [{"train": [], "val": [], "test": list(test)}]}))
    r = np.random.default_rng(0)
    for s in preds:
        files.write_predictions(run / "fold_0" / "pred" / f"{s}.h5",
                                r.random((6, 3)).astype(np.float32), ["A", "B", "C"],
                                [f"b{i}" for i in range(6)], r.random((6, 2)) * 100,
                                true=r.random((6, 3)).astype(np.float32), slide_id=s)
    return run


def fold_model(run: Path) -> None:
    """A small model of the caches' 6 feature columns as fold_0/model.pt (as train.py saves one), so
    that predict.py would predict."""
    import dataclasses
    import torch
    from model import ModelConfig, build_model
    mc = ModelConfig(dim=16, heads=2, hidden=16, pca=0)
    torch.save({"model": build_model(mc, 6, 3).state_dict(), "model_config": dataclasses.asdict(mc),
                "genes": ["A", "B", "C"], "in_dim": 6}, run / "fold_0" / "model.pt")


def predict_into(out, *extra):
    def build(tmp):
        fold_model(fake_run(tmp))
        caches(tmp)
        (tmp / "out.txt").write_bytes(b"mine")
        return [str(ROOT / "predict.py"), "--run", "run", "--slides", "caches", "--out",
                out, *extra]
    return build


def truncate(tmp):
    path = fake_run(tmp) / "fold_0" / "pred" / "s1.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_genes(tmp):
    with h5py.File(fake_run(tmp) / "fold_0" / "pred" / "s1.h5", "a") as f:
        del f["genes"]


def run_program(program, *args, spoil=None, **run):
    def build(tmp):
        (spoil or (lambda t: fake_run(t, **run)))(tmp)
        return [str(ROOT / program), *args]
    return build


def plots_into_proc(tmp):
    (fake_run(tmp) / "plots").symlink_to("/proc")


# ---- names from data, links, existing files, inputs as outputs -------------------------------
def set_attr(tmp, slide, key, value):
    with h5py.File(tmp / "caches" / f"s{slide}.h5", "a") as f:
        f.attrs[key] = value


def predict_slide_id(value, *extra):
    """predict.py on caches of which s1's attrs/slide_id is `value` (a path, another slide's id)."""
    def build(tmp):
        argv = predict_into("pred", *extra)(tmp)
        set_attr(tmp, 1, "slide_id", value)
        return argv
    return build


def predict_case_twins(tmp):
    argv = predict_into("pred")(tmp)
    data.write_slide(tmp / "caches" / "S1.h5", data.read_slide(tmp / "caches" / "s0.h5"),
                     overwrite=True)
    set_attr(tmp, 0, "slide_id", "s0")
    with h5py.File(tmp / "caches" / "S1.h5", "a") as f:
        f.attrs["slide_id"] = "S1"
    return argv


def predict_huge_window(tmp):
    """A run whose model windows are 2 x 10^5 sites wide: its forward needs terabytes."""
    import dataclasses
    import torch
    from model import ModelConfig, build_model
    argv = predict_into("pred")(tmp)
    mc = ModelConfig(dim=16, heads=2, hidden=16, pca=0, w=3, bias="none")
    # the window's slot tables are buffers built from w, not saved: the state of a small window
    # is the state of a wide one, which cannot be built here
    huge = dataclasses.replace(mc, w=10 ** 5)
    torch.save({"model": build_model(mc, 6, 3).state_dict(),
                "model_config": dataclasses.asdict(huge), "genes": ["A", "B", "C"], "in_dim": 6},
               tmp / "run" / "fold_0" / "model.pt")
    return argv


def predict_model_mismatch(tmp):
    argv = predict_into("pred")(tmp)
    import torch
    ck = torch.load(tmp / "run" / "fold_0" / "model.pt", weights_only=True)
    # a downloaded run that would make us allocate 10^9 x d
    ck["in_dim"] = 10 ** 9
    torch.save(ck, tmp / "run" / "fold_0" / "model.pt")
    return argv


def predict_over_link(tmp):
    argv = predict_into("pred", "--overwrite")(tmp)
    (tmp / "pred").mkdir()
    (tmp / "pred" / "s2.h5").symlink_to("../out.txt")
    return argv


def predict_bad_second_slide(tmp):
    """The third cache has a NaN feature: predict.py writes nothing, not the first two slides."""
    argv = predict_into("pred")(tmp)
    with h5py.File(tmp / "caches" / "s2.h5", "a") as f:
        f["features"][3, 1] = np.nan
    return argv


def synthetic_into(setup, *extra):
    def build(tmp):
        (tmp / "ds").mkdir()
        setup(tmp)
        return [str(ROOT / "synthetic.py"), "--out", "ds", "--slides", "2", "--spots", "50", *extra]
    return build


def gmt_link(tmp):
    (tmp / "target.txt").write_bytes(b"mine")
    (tmp / "ds" / "programs.gmt").symlink_to("../target.txt")


def metadata_there(tmp):
    (tmp / "ds" / "metadata.csv").write_bytes(b"id,patient\nmine,me\n")


def plots_link(tmp):
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "mine.png").write_bytes(b"mine")
    (fake_run(tmp) / "plots").symlink_to("../elsewhere")


def genes_out(out, *extra):
    def build(tmp):
        caches(tmp)
        return [str(ROOT / "data.py"), "genes", "--slides", "caches", "--n", "3", "--out", out,
                *extra]
    return build


def genes_there(tmp):
    (tmp / "g.json").write_bytes(b"mine")
    return genes_out("g.json")(tmp)


# ---- data lost in silence --------------------------------------------------------------------
def h5ad_change(change):
    def spoil(tmp):
        with h5py.File(tmp / "st" / "s2.h5ad", "a") as f:
            change(f)
    return spoil


def _same_gene(f):
    names = files.h5_strings(f["var/_index"])
    del f["var/_index"]
    names[2] = names[1]
    f.create_dataset("var/_index", data=names.astype(object), dtype=data.STR)


def _negative_index(f):
    f["X/indices"][0] = -1


def _decreasing_indptr(f):
    x = f["X/indptr"][()]
    x[3], x[4] = x[4], x[3] - 1
    del f["X/indptr"]
    f["X/indptr"] = x


def _latin1_gene(f):
    names = [n.encode() for n in files.h5_strings(f["var/_index"])]
    names[0] = b"caf\xe9"
    del f["var/_index"]
    f.create_dataset("var/_index", data=np.array(names, dtype=object),
                     dtype=h5py.string_dtype("ascii"))


def cells(change):
    def build(tmp):
        r = np.random.default_rng(0)
        xy = r.uniform(0, 100, (20, 2))
        change(xy)
        write_h5ad(tmp / "cells.h5ad", r.poisson(1.0, (20, 3)).astype(np.float64),
                   [f"c{i}" for i in range(20)], ["A", "B", "C"], "current", xy, ["t"] * 20)
        return [str(ROOT / "hest.py"), "bin", "--cells", "cells.h5ad", "--bin-um", "10", "--out",
                "out"]
    return build


def no_feature_columns(tmp):
    replace(tmp, 0, "features", lambda x: x[:, :0])
    return train()


def latin1_genes(tmp):
    with h5py.File(caches(tmp) / "s1.h5", "a") as f:
        names = [g.encode() for g in files.h5_strings(f["genes"])]
        names[3] = b"G\xe93"
        del f["genes"]
        f.create_dataset("genes", data=np.array(names, dtype=object),
                         dtype=h5py.string_dtype("ascii"))
    return train()


def dangling_link(tmp):
    with h5py.File(caches(tmp) / "s2.h5", "a") as f:
        del f["coords"]
        f["coords"] = h5py.SoftLink("/nowhere")
    return train()


def splits(*rows):
    def build(tmp):
        caches(tmp)
        (tmp / "splits").mkdir()
        (tmp / "splits" / "train_0.csv").write_text("sample_id\n" + "".join(f"{r}\n" for r in rows))
        (tmp / "splits" / "test_0.csv").write_text("sample_id\ns3\n")
        return train("data.split_dir=splits")
    return build


def marked_root(tmp):
    caches(tmp)
    (tmp / "caches" / files.WRITING).write_text(json.dumps({"command": "synthetic.py", "pid": 0}))
    return train()


def patches_of(side):
    def build(tmp):
        patches(tmp)
        with h5py.File(tmp / "patches" / "p1.h5", "a") as f:
            del f["img"]
            f["img"] = np.zeros((5, side, side, 3), dtype=np.uint8)
        return [str(ROOT / "hest.py"), "embed", "--patches", "patches", "--out", "emb"]
    return build


def gene_list(text):
    def build(tmp):
        caches(tmp)
        (tmp / "genes.json").write_bytes(text)
        return train("data.genes=genes.json")
    return build


def gmt_file(text):
    def build(tmp):
        caches(tmp)
        (tmp / "sets.gmt").write_bytes(text)
        return train("data.gmt=sets.gmt")
    return build


def config_bytes(text):
    def build(tmp):
        caches(tmp)
        (tmp / "cfg.yaml").write_bytes(text)
        return train(config="cfg.yaml")
    return build


def loop_root(tmp):
    caches(tmp)
    (tmp / "loop").symlink_to("loop")
    return train("data.root=loop")


def protocols_bad_paper(tmp):
    run = fake_run(tmp)
    (run / "results.json").write_bytes(b"mine")
    return [str(ROOT / "protocols.py"), "run", "--paper", "nope"]


def import_meta(text):
    def build(tmp):
        argv = import_hest()(tmp)
        (tmp / "meta.csv").write_bytes(text)
        return [*argv, "--meta", "meta.csv"]
    return build


# ---- the table: (case, builder -> argv, words the one line must contain) -------------------------
CASES = [
    ("nan feature", bad_slide(1, "features", lambda x: at(x, (3, 2), np.nan)),
     ["s1.h5", "'features'", "finite"]),
    ("inf count", bad_slide(2, "counts", lambda x: at(x, (0, 0), np.inf)),
     ["s2.h5", "'counts'", "finite"]),
    ("negative count", bad_slide(3, "counts", lambda x: at(x, (5, 1), -1)),
     ["s3.h5", "'counts'", ">= 0"]),
    ("duplicate barcode", bad_slide(0, "barcodes", lambda x: at(x, 1, x[0])),
     ["s0.h5", "'barcodes'", "unique"]),
    ("duplicate gene", bad_slide(1, "genes", lambda x: at(x, 1, x[0])),
     ["s1.h5", "'genes'", "unique"]),
    ("integer features", bad_slide(2, "features", lambda x: (x * 10).astype(np.int32)),
     ["s2.h5", "'features'", "float16/float32", "int32"]),
    ("features as a group", features_group, ["s1.h5", "'features'", "a group"]),
    ("collapsed coordinates", bad_slide(3, "coords", lambda x: at(x, slice(0, 25), 0.0)),
     ["s3.h5", "'coords'", "25 of 40"]),
    ("absurd feature", bad_slide(1, "features", lambda x: at(x, (0, 0), 3e38)),
     ["s1.h5", "'features'", "magnitude"]),
    ("lr inf", overrides("train.lr=inf"), ["'train.lr'", "finite number", "inf"]),
    ("lr nan", overrides("train.lr=.nan"), ["'train.lr'", "finite number", "nan"]),
    ("beta inf in a file", config_file("model:\n  beta: .inf\n"),
     ["cfg.yaml", "'model.beta'", "finite"]),
    ("dim too large", overrides("model.dim=100000"), ["s", "GiB", "model.dim = 100000"]),
    ("window too large", overrides("model.w=1000"), ["GiB", "model.w = 1000"]),
    ("duplicate yaml key", config_file("train:\n  lr: 0.001\n  epochs: 2\n  lr: 0.002\n"),
     ["cfg.yaml", "'lr' twice", "line 4"]),
    ("mc without dropout", overrides("eval.mc_samples=4", "model.dropout=0",
                                     "model.attn_dropout=0"),
     ["'eval.mc_samples'", "without dropout"]),
    ("sub-levels without sub-patches", overrides("model.sub_levels=1"),
     ["s0.h5", "model.sub_levels = 1", "found none"]),
    ("override that is not YAML", overrides("model.depths=[1, 2"),
     ["command line 'model.depths=[1, 2'"]),
    ("read-only run.dir", overrides("run.dir=/proc/tessera-runs"),
     ["/proc", "'run.dir'", "cannot be written"]),
    ("encoder not importable", embed("nosuchmod:fn"), ["--encoder nosuchmod:fn", "nosuchmod"]),
    ("encoder returns NaN", embed("enc:nan"), ["p1.h5", "--encoder enc:nan", "finite"]),
    ("encoder returns too few rows", embed("enc:short"),
     ["p1.h5", "--encoder enc:short", "(5, C)", "(4, 4)"]),
    ("embed over an existing file", embed(None, existing=True), ["p1.h5", "--overwrite"]),
    ("patch images as a group", embed(None, spoil=patch_img_group), ["p1.h5", "'img'", "a group"]),
    ("patch coords of other rows", embed(None, spoil=patch_coords_rows),
     ["p1.h5", "'coords'", "(5, 2)"]),
    ("batch size 0", embed(None, extra=["--batch-size", "0"]), ["--batch-size", "found 0"]),
    ("embeddings as a group", import_hest(spoil=emb_group), ["s2.h5", "'embeddings'", "a group"]),
    ("a NaN embedding", import_hest(spoil=emb_nan), ["s2.h5", "'embeddings'", "finite"]),
    ("h5ad without obs", import_hest(spoil=no_obs), ["s2.h5ad", "'obs'", "no such key"]),
    ("import keeps no gene", import_hest("--genes", "genes.txt"), ["genes.txt", "0 genes"]),
    ("embedding files swapped", import_hest(swap=True), ["s1.h5", "'coords'", "swapped"]),
    ("import over an existing file", import_hest(existing=True), ["s2.h5", "--overwrite"]),
    ("predict into a file", predict_into("out.txt"), ["out.txt", "--out", "found a file"]),
    ("predict into a run's fold", predict_into("run/fold_0/pred", "--overwrite"),
     ["run/fold_0/pred", "--out", "inside the run folder"]),
    ("predict on a missing CUDA device", predict_into("pred", "--device", "cuda:99"),
     ["--device cuda:99", "CUDA"]),
    ("predict into a read-only folder", predict_into("/proc/tessera-pred"),
     ["/proc", "--out", "cannot be written"]),
    ("eval without a test slide's predictions", run_program("eval.py", "run", preds=("s0",)),
     ["fold_0/pred", "s1", "folds.json", "--partial"]),
    ("eval a truncated prediction file", run_program("eval.py", "run", spoil=truncate),
     ["s1.h5", "readable HDF5 prediction file"]),
    ("eval a prediction file without genes", run_program("eval.py", "run", spoil=drop_genes),
     ["s1.h5", "'genes'"]),
    ("plots into a read-only folder through a link", run_program("plots.py", "plot", "run",
                                                                 spoil=plots_into_proc),
     ["run/plots", "symbolic link (to /proc)"]),
    # every path is decided by the user, never by a file's content
    ("predict: a slide id that leaves --out", predict_slide_id("../escaped_dir/owned"),
     ["s1.h5", "'attrs/slide_id'", "'s1' (the file name)"]),
    ("predict: an absolute slide id, --overwrite", predict_slide_id(str(Path("/tmp/owned")),
                                                                    "--overwrite"),
     ["s1.h5", "'attrs/slide_id'"]),
    ("predict: two caches with one slide id", predict_slide_id("s0"), ["s1.h5", "'attrs/slide_id'",
                                                                       "'s0'"]),
    ("predict: caches whose names differ in case only", predict_case_twins,
     ["pred", "'S1.h5' and 's1.h5'", "differ only in case"]),
    ("predict over a link, --overwrite", predict_over_link, ["pred/s2.h5", "symbolic link"]),
    ("synthetic: programs.gmt is a link", synthetic_into(gmt_link), ["ds/programs.gmt", "symbolic "
                                                                                        "link"]),
    ("synthetic: metadata.csv exists", synthetic_into(metadata_there), ["ds/metadata.csv",
                                                                        "--overwrite"]),
    ("plots: the plots folder is a link", run_program("plots.py", "plot", "run", spoil=plots_link),
     ["run/plots", "symbolic link"]),
    ("genes --out is an input slide", genes_out("caches/s1.h5"), ["caches/s1.h5", "--out",
                                                                  "input"]),
    ("genes --out is an input slide, --overwrite", genes_out("caches/s1.h5", "--overwrite"),
     ["caches/s1.h5", "--out", "input"]),
    ("genes --out exists", genes_there, ["g.json", "--overwrite"]),
    # nothing lost in silence
    ("import: two genes of one name", import_hest(spoil=h5ad_change(_same_gene)),
     ["s2.h5ad", "'var/_index'", "unique", "twice", "--harmonise"]),
    ("import: a negative CSR index", import_hest(spoil=h5ad_change(_negative_index)),
     ["s2.h5ad", "'X/indices'", "-1"]),
    ("import: CSR offsets that decrease", import_hest(spoil=h5ad_change(_decreasing_indptr)),
     ["s2.h5ad", "'X/indptr'", "decreasing"]),
    ("import: a gene name that is not UTF-8", import_hest(spoil=h5ad_change(_latin1_gene)),
     ["s2.h5ad", "'var/_index'", "row 0", "UTF-8", "0xe9"]),
    ("import: metadata with an id twice", import_meta(b"id,patient\ns1,a\ns1,b\n"),
     ["meta.csv", "'id'", "'s1' twice"]),
    ("import: a pixel size that is not a number",
     import_meta(b"id,pixel_size_um_estimated\ns1,big\n"),
     ["meta.csv", "'pixel_size_um_estimated'", "slide s1", "'big'"]),
    ("bin --cells: a NaN centre", cells(lambda xy: xy.__setitem__((4, 1), np.nan)),
     ["cells.h5ad", "'obsm/spatial'", "finite", "row 4"]),
    ("bin --cells: a bin of 1e-30 um", lambda tmp: [*cells(lambda xy: None)(tmp)[:5], "1e-30",
                                                    "--out", "out"],
     ["cells.h5ad", "--bin-um 1e-30", "would fit"]),
    ("features with zero columns", no_feature_columns, ["s0.h5", "'features'", "at least one "
                                                                               "feature"]),
    ("a cache gene that is not UTF-8", latin1_genes, ["s1.h5", "'genes'", "row 3", "UTF-8",
                                                      "0xe9"]),
    ("cache genes that differ in case only", bad_slide(2, "genes", lambda x: at(x, 1,
                                                                                x[0].lower())),
     ["s2.h5", "'genes'", "differ only in case"]),
    ("a split file lists a slide twice", splits("s0", "s1", "s0"), ["train_0.csv", "'sample_id'",
                                                                    "'s0' twice"]),
    ("a split id outside data.root", splits("s0", "../caches/s1"),
     ["train_0.csv", "'sample_id'", "plain file name", "'../caches/s1'"]),
    ("a GMT with a set twice", gmt_file(b"SET_A\turl\tG1\nSET_B\turl\tG2\nSET_A\turl\tG3\n"),
     ["sets.gmt", "line 3", "'SET_A' again", "line 1"]),
    # crashes and exhaustion
    ("a config that is not UTF-8", config_bytes(b"train:\n  lr: 0.01 # caf\xe9\n"),
     ["cfg.yaml", "line 2, column 17", "UTF-8", "0xe9"]),
    ("a UTF-16 config", config_bytes("train:\n  lr: 0.01\n".encode("utf-16")), ["cfg.yaml",
                                                                                "UTF-16"]),
    ("synthetic --spots 10^8", lambda tmp: [str(ROOT / "synthetic.py"), "--out", "ds", "--spots",
                                            "100000000"],
     ["--spots 100000000", "GiB of memory", "available", "would fit"]),
    ("synthetic --slides 10^8", lambda tmp: [str(ROOT / "synthetic.py"), "--out", "ds", "--slides",
                                             "100000000"],
     ["--slides 100000000", "GiB of disk", "would fit"]),
    ("synthetic --seed -1", lambda tmp: [str(ROOT / "synthetic.py"), "--out", "ds", "--seed", "-1"],
     ["seed >= 0", "seed -1"]),
    ("predict: a forward of terabytes", predict_huge_window, ["predict.py", "GiB of memory",
                                                              "fit"]),
    ("predict: a model file unlike its config", predict_model_mismatch, ["model.pt", "'model'",
                                                                         "model_config"]),
    ("predict --seed 2^40", predict_into("pred", "--seed", str(2 ** 40)), ["--seed", "2^32"]),
    ("predict --threads 10^6", predict_into("pred", "--threads", "1000000"), ["--threads 1000000",
                                                                              "cores"]),
    ("embed --threads 10^6", embed(None, extra=["--threads", "1000000"]), ["--threads 1000000",
                                                                           "cores"]),
    ("embed --batch-size 10^12", embed(None, extra=["--batch-size", str(10 ** 12)]),
     ["--batch-size 1000000000000", "GiB of memory", "would fit"]),
    ("embed 1-pixel patches", patches_of(1), ["p1.h5", "'img'", "at least 2 x 2 pixels"]),
    ("bench --mem-limit-gb 10^6", lambda tmp: [str(ROOT / "bench.py"), "--mem-limit-gb", "1e6"],
     ["--mem-limit-gb 1e+06", "available", "would fit"]),
    # the poor ones: one clear line instead of a traceback or a misleading message
    ("a dangling link in a cache", dangling_link, ["s2.h5", "'coords'", "leads nowhere"]),
    ("a list where a section belongs", config_file("data: [1, 2]\n"), ["cfg.yaml", "'data'",
                                                                       "a mapping"]),
    ("a symlink loop as data.root", loop_root, ["'data.root'", "loop"]),
    ("a gene list that is bad JSON", gene_list(b'{"genes": ["G1", "G2",]}'),
     ["genes.json", "line 1", "expected JSON"]),
    ("a gene list of numbers", gene_list(b'{"genes": ["G1", 7]}'), ["genes.json",
                                                                    "7 at position 1"]),
    ("run.device=meta", overrides("run.device=meta"), ["'run.device'", "'meta'"]),
    ("run.name=no", overrides("run.name=no"), ["'run.name'", "quote it"]),
    ("an unset $VAR in run.dir", overrides("run.dir=$TESSERA_NO_SUCH_VAR/runs"),
     ["'run.dir'", "TESSERA_NO_SUCH_VAR is not set"]),
    ("train.seed=2^40", overrides(f"train.seed={2 ** 40}"), ["'train.seed'", "2^32"]),
    ("a data.root a killed command left", marked_root, ["caches", "unfinished", "synthetic.py"]),
    ("predict: the third slide is bad", predict_bad_second_slide, ["s2.h5", "'features'",
                                                                   "finite"]),
    ("protocols.py --paper nope", protocols_bad_paper, ["papers.yaml", "'nope'"]),
]


def snapshot(folder: Path) -> dict:
    """Every file (its bytes' hash), folder and link (its target, never followed) under `folder`."""
    return {p.relative_to(folder): f"link to {os.readlink(p)}" if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if "__pycache__" not in p.parts}


@pytest.mark.parametrize("case,build,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_line_and_writes_nothing(tmp_path, case, build, words):
    argv = build(tmp_path)
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                    "MKL_NUM_THREADS": "1",
                                                    "PYTHONDONTWRITEBYTECODE": "1"})
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0, (case, r.stdout, r.stderr)
    assert len(lines) == 1 and "Traceback" not in lines[0], (case, lines)
    for word in words:
        assert word in lines[0], (case, word, lines[0])
    assert not (tmp_path / "runs").exists()
    assert snapshot(tmp_path) == before          # nothing written, nothing changed

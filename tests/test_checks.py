"""checks.py through train.main: every mistake in a config, the files it names, the slide caches or
the run folder ends the program before any fold trains, with one line naming the file or key, what
was expected and what was found, and leaves no run folder behind."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import checks
from model import ModelConfig
import data
import files
import runs
import train

ROOT = Path(__file__).resolve().parents[1]
GENES = [f"G{j}" for j in range(12)]


def write(root, i, patient=None, n=40, c=6, counts=True, slide_id=None, coords=None, library=None):
    """Slide s<i> (patients: s0, s1 -> A; s2, s3 -> B) on a square 100 um grid."""
    r = np.random.default_rng(i)
    x = torch.from_numpy(r.poisson(3.0, (n, len(GENES))).astype(np.float32))
    xy = torch.tensor([[100.0 * (j % 8), 100.0 * (j // 8)] for j in range(n)]).reshape(n, 2)
    s = data.Slide(slide_id or f"s{i}", torch.randn(n, c), xy if coords is None else coords,
                   np.array([f"b{j}" for j in range(n)]), patient=patient or "AB"[i // 2],
                   spot_pitch_um=100.0, counts=x if counts else None,
                   genes=GENES if counts else None,
                   library_size=(x.sum(1) if library is None else library) if counts else None)
    data.write_slide(root / f"s{i}.h5", s, overwrite=True)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """Four small slides of two patients and a GMT in tmp_path/caches; the working folder is
    tmp_path."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "caches"
    for i in range(4):
        write(root, i)
    (root / "sets.gmt").write_text("SET_A\turl\tG0\tG1\tG2\nSET_B\turl\tG3\tG4\n")
    return root


def base(root):
    return [str(ROOT / "configs/default.yaml"), f"data.root={root}", "data.folds=2",
            "data.genes={by: mean, n: 5}", "data.gmt=sets.gmt", "run.name=t"]


def refused(args, tmp_path, capsys) -> str:
    """train.main(args) ends with one line (SystemExit with a message: Python prints it to stderr
    and exits with status 1), nothing else on stderr, and no run folder."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        train.main(args)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and "Traceback" not in msg, msg
    assert capsys.readouterr().err == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    return msg


def expect(msg, *parts):
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


CONFIG_CASES = [  # (overrides, parts of the message)
    (["train.epochs=abc"], ["command line 'train.epochs=abc': key 'train.epochs': expected an "
                            "integer", "found 'abc'"]),
    (["train.epochs=0"], ["key 'train.epochs': expected an integer >= 1, found 0"]),
    (["model.dim=-5"], ["key 'model.dim': expected an integer >= 1, found -5"]),
    (["model.depths=3"], ["key 'model.depths': expected a list of integers, found 3"]),
    (["model.depths=[]"], ["key 'model.depths': expected a list of integers with one entry "
                           ">= 1 per level"]),
    (["train.checkpoint_every=0"],
     ["key 'train.checkpoint_every': expected an integer >= 1, found 0"]),
    (["train.lr=fast"], ["key 'train.lr': expected a number, found 'fast'"]),
    (["train.loss=l1"], ["key 'train.loss': expected a string (one of mse, pcc, mse_pcc, zinb, "
                         "gaussian), found 'l1'"]),
    (["model.dropout=1.5"], ["key 'model.dropout': expected a number in [0, 1), found 1.5"]),
    (["data.normalize=yes please"],
     ["key 'data.normalize': expected true or false, found 'yes please'"]),
    (["data.genes={by: hvg, n: 0}"], ["key 'data.genes.n': expected an integer >= 1, found 0"]),
    (["data.genes={by: top, n: 5}"], ["key 'data.genes.by': expected hvg or mean, found 'top'"]),
    (["data.genes=5"], ["key 'data.genes': expected a gene list file, {by: hvg|mean, n: N} or "
                        "null, found 5"]),
    (["train=5"], ["key 'train': expected a mapping, found 5"]),
    (["data.synthetic={slides: 0}"],
     ["key 'data.synthetic.slides': expected an integer >= 1, found 0"]),
    (["run.device=gpu"], ["key 'run.device': expected auto, cpu, cuda or "
                          "cuda:<index>, found 'gpu'"]),
    (["model.heads=3"], ["model.dim = 64 must be divisible by model.heads = 3"]),
    (["model.dimm=3"], ["command line 'model.dimm=3': unknown config key 'model.dimm'; valid"]),
    (["train.loss=zinb"], ["train.loss = zinb and model.head = zinb go together"]),
    (["run.threads=100000"], ["key 'run.threads': expected an integer from 0 to", "found 100000"]),
    (["run.device=meta"], ["key 'run.device': expected auto, cpu, cuda or cuda:<index>, found "
                           "'meta'"]),
    (["run.name=no"], ["key 'run.name': expected a string (YAML reads an unquoted yes/no/on/off as "
                       "false: "
                       "quote it), found False"]),
    (["train.seed=-1"], ["key 'train.seed': expected an integer from 0 to 2^32 - 1, found -1"]),
    (["data.fold_seed=4294967296"],
     ["key 'data.fold_seed': expected an integer from 0 to 2^32 - 1"]),
    (["run.dir=$TESSERA_UNSET_FOR_A_TEST/runs"],
     ["key 'run.dir': expected a path ($TESSERA_UNSET_FOR_A_TEST is not set in the environment)"]),
    (["data=[1, 2]"], ["key 'data': expected a mapping, found [1, 2]"]),
]


@pytest.mark.parametrize("overrides,parts", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_config_mistakes(root, tmp_path, capsys, overrides, parts):
    expect(refused([*base(root), *overrides], tmp_path, capsys), *parts)


def test_unreadable_config_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("train: {epochs: 3\nmodel: [\n")
    expect(refused(["bad.yaml"], tmp_path, capsys), "bad.yaml: cannot read the config")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    expect(refused(["list.yaml"], tmp_path, capsys), "list.yaml: expected a mapping of sections")
    expect(refused(["missing.yaml"], tmp_path, capsys), "missing.yaml: cannot read the config")


def test_a_config_mistake_is_named_where_it_was_made(tmp_path, capsys, monkeypatch):
    """In the file: the file; on the command line: the override, also when the file has the key."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("train: {epoch: 5}\n")
    expect(refused(["mine.yaml"], tmp_path, capsys), "mine.yaml: unknown config key 'train.epoch'")
    (tmp_path / "mine.yaml").write_text("train: {epochs: 5}\n")
    expect(refused(["mine.yaml", "train.epoch=5"], tmp_path, capsys),
           "command line 'train.epoch=5': unknown config key 'train.epoch'")
    expect(refused(["mine.yaml", "train.epochs=0"], tmp_path, capsys),
           "command line 'train.epochs=0': key 'train.epochs': expected an integer >= 1, found 0")
    (tmp_path / "mine.yaml").write_text("train: {epochs: 0}\n")
    expect(refused(["mine.yaml", "train.lr=0.1"], tmp_path, capsys),
           "mine.yaml: key 'train.epochs': expected an integer >= 1, found 0")


def test_missing_files_name_where_they_were_looked_for(root, tmp_path, capsys):
    msg = refused([*base(root), "data.genes=nope.json"], tmp_path, capsys)
    expect(msg,
           f"key 'data.genes': expected a file, found none at {root / 'nope.json'} or nope.json")
    msg = refused([*base(root), "data.gmt=nope.gmt"], tmp_path, capsys)
    expect(msg, f"key 'data.gmt': expected a file, found none at {root / 'nope.gmt'} or nope.gmt")
    msg = refused([*base(root), "data.split_dir=splits"], tmp_path, capsys)
    expect(msg, "key 'data.split_dir': expected a folder, found none at")
    (tmp_path / "genes.txt").write_text("G1\nG2\nNOPE\n")
    msg = refused([*base(root), "data.genes=genes.txt"], tmp_path, capsys)
    expect(msg, "genes.txt: key 'data.genes': expected genes the slides have, found 1 missing from",
           "NOPE")


def test_relative_data_files_are_found_in_data_root_then_the_working_folder(root, tmp_path):
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [f"data.root={root}", "data.gmt=sets.gmt"])
    assert checks.data_file(cfg, "gmt", root) == root / "sets.gmt"
    (tmp_path / "here.gmt").write_text("S\turl\tG0\n")
    cfg["data"]["gmt"] = "here.gmt"
    assert checks.data_file(cfg, "gmt", root) == Path("here.gmt")
    # default.yaml's GMT is the one the synthetic generator writes into data.root, wherever that is
    cfg = train.load_config(ROOT / "configs/default.yaml", [f"data.root={root}"])
    (root / "programs.gmt").write_text("S\turl\tG0\n")
    assert checks.data_file(cfg, "gmt", root) == root / "programs.gmt"


SLIDE_CASES = [  # (change to the dataset, extra overrides, parts of the message)
    (lambda r: write(r, 3, counts=False), [],
     ["s3.h5: key 'counts': expected counts on a training slide, found none"]),
    (lambda r: write(r, 3, c=7), [],
     ["s3.h5: key 'features': expected 6 features per spot like s0.h5, found 7"]),
    (lambda r: write(r, 3, n=0), [],
     ["s3.h5: key 'features': expected at least one spot, found 0 rows"]),
    (lambda r: write(r, 3, coords=torch.full((40, 2), 5.0)), [],
     ["s3.h5: key 'coords': expected spots at different positions, found all 40 at one point"]),
    (lambda r: write(r, 3, slide_id="s9"), [],
     ["s3.h5: key 'attrs/slide_id': expected 's3' (the file name), found 's9'"]),
    (lambda r: write(r, 3, library=torch.zeros(40)), ["data.normalize=true"],
     ["s3.h5: key 'library_size': expected the total counts of each spot for data.normalize=true, "
      "found 40 spots"]),
    (lambda r: (r / "s3.h5").write_text("not hdf5"), [],
     ["s3.h5: expected a readable HDF5 slide cache"]),
    (lambda r: None, ["data.folds=3"],
     ["key 'data.folds': expected -1 or an integer from 2 to 2 (the number of "
      "patients in", "found 3"]),
    (lambda r: None, ["train.val_slides=2"],
     ["key 'train.val_slides': expected fewer than the 2 training slides"]),
    (lambda r: [p.unlink() for p in r.glob("*.h5")], [],
     ["key 'data.root': expected slide caches <slide>.h5 in"]),
]


@pytest.mark.parametrize("change,overrides,parts", SLIDE_CASES,
                         ids=[c[2][0][:40] for c in SLIDE_CASES])
def test_dataset_mistakes(root, tmp_path, capsys, change, overrides, parts):
    change(root)
    expect(refused([*base(root), *overrides], tmp_path, capsys), *parts)


def test_a_zero_library_size_is_fine_without_normalisation(root):
    write(root, 3, library=torch.zeros(40))
    cfg = train.load_config(ROOT / "configs/default.yaml", base(root)[1:])
    assert len(checks.check_data(cfg, root)) == 2


def test_gmt_without_shared_genes_warns_per_set_and_refuses_a_pathway_head(root, tmp_path, capsys):
    (root / "sets.gmt").write_text("SET_A\turl\tG0\tX1\nSET_B\turl\tX2\tX3\n")
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [*base(root)[1:], "model.pathway_tokens=2"])
    lines = []
    checks.check_data(cfg, root, log=lines.append)
    assert len(lines) == 1 and "1 of the 2 pathway sets used share no gene" in lines[0], lines
    assert "SET_A 1/2, SET_B 0/2" in lines[0]
    (root / "sets.gmt").write_text("SET_A\turl\tX1\nSET_B\turl\tX2\tX3\n")
    msg = refused([*base(root), "model.head=pathway"], tmp_path, capsys)
    expect(msg, "sets.gmt: key 'data.gmt': expected pathway sets sharing genes with the data for "
                "model.head = pathway, found none of the 2 used sets does (SET_A 0/1, SET_B 0/2)")


def test_a_data_root_typo_generates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = refused([str(ROOT / "configs/default.yaml"), "data.root=data/synthtic"], tmp_path, capsys)
    expect(msg, "key 'data.root': expected a folder of slide caches, found no folder data/synthtic",
           "generated only at data/synthetic")


def test_a_data_root_of_embedding_files_says_to_import_them(tmp_path, capsys):
    """hest.py embed's output (or HEST-Benchmark's embeddings) where caches were expected: the line
    names the file and the key, and the command that builds caches from them."""
    import h5py
    folder = tmp_path / "caches" / "her2st_features"
    folder.mkdir(parents=True)
    with h5py.File(folder / "B4.h5", "w") as f:
        f["embeddings"], f["coords"] = np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32)
        f["barcodes"] = np.array([b"a", b"b", b"c"])
    args = [str(ROOT / "configs/default.yaml"), f"data.root={folder}", "run.name=t"]
    expect(refused(args, tmp_path, capsys),
           f"{folder / 'B4.h5'}: key 'features': expected a slide cache, found an embedding file",
           f"python hest.py import-hest --st DIR --features {folder} --out DIR")


def test_run_folders(root, tmp_path, capsys):
    cfg = train.load_config(ROOT / "configs/default.yaml", base(root)[1:])
    run = tmp_path / "runs" / "t"
    (run / "fold_0").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "fold_0" / "done").write_text("finished\n")
    msg = refused(base(root), tmp_path, capsys)
    expect(msg, "runs/t holds this run already: pass --resume to continue it, or choose "
                "another run.name")
    msg = refused([*base(root), "train.epochs=3", "model.dim=32", "--resume"], tmp_path, capsys)
    expect(msg, "runs/t/config.yaml: --resume expected the config the run started with, found "
                "other values for model.dim (run 64, given 32); train.epochs (run 25, given 3)")
    msg = refused([*base(root), "train.epochs=3"], tmp_path, capsys)
    expect(msg, "runs/t holds a run of another config (train.epochs (run 25, given 3)): choose "
                "another run.name")
    assert runs.check_run_dir(cfg) == run.relative_to(tmp_path)
    (run / "config.yaml").unlink()
    expect(refused(base(root), tmp_path, capsys),
           "runs/t: expected a new run folder, found fold_0 and no config.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device(root, tmp_path, capsys):
    expect(refused([*base(root), "run.device=cuda"], tmp_path, capsys),
           "run.device = cuda but no CUDA device")


@pytest.mark.slow
def test_the_command_prints_one_line_and_no_traceback(root, tmp_path):
    write(root, 3, c=7)
    for extra, part in ((["train.epochs=abc"], "key 'train.epochs'"),
                        ([], "s3.h5: key 'features'")):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *base(root), *extra],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and part in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert (len(r.stderr.strip().splitlines()) == 1
                and not (tmp_path / "runs").exists()), r.stderr


# ---- every value of every slide, before anything is written -------------------------------------
def test_scan_reads_in_blocks_and_names_the_first_bad_value(root, monkeypatch):
    """scan_slide reads a dataset in blocks of rows (a few rows here) and reports the same count and
    first index as a look at the whole array (numpy reference)."""
    monkeypatch.setattr(files, "BLOCK", 3 * len(GENES))          # 3 rows of counts per block
    import h5py
    with h5py.File(root / "s1.h5", "a") as f:
        x = f["counts"][()]
        x[[7, 20, 31], [2, 0, 5]] = [-1, -2, -3]
        del f["counts"]
        f["counts"] = x
    reads = []
    real = files._blocks
    monkeypatch.setattr(files, "_blocks", lambda d: [reads.append(b[0]) or b for b in real(d)])
    with pytest.raises(data.CacheError) as e:
        data.scan_slide(root / "s1.h5")
    first = tuple(int(i) for i in np.argwhere(x < 0)[0])
    assert (f"negative values: {int((x < 0).sum())} bad values, first at index {first}"
            in str(e.value)), str(e.value)
    assert first == (7, 2) and max(reads) > 0  # found in a later block, with the right offset


def test_non_integer_counts_warn_once_per_training_slide(root):
    import h5py
    with h5py.File(root / "s2.h5", "a") as f:
        x = np.log1p(f["counts"][()])
        del f["counts"]
        f["counts"] = x
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [*base(root)[1:], "model.pathway_tokens=2"])
    lines = []
    checks.check_data(cfg, root, log=lines.append)
    warned = [line for line in lines if "non-integer" in line]
    assert (len(warned) == 1 and "s2.h5" in warned[0]
            and f"{int((x != np.round(x)).sum())} non-integer" in warned[0])


def test_normalize_without_library_size_says_what_stands_in(root):
    import h5py
    for i in (0, 3):
        with h5py.File(root / f"s{i}.h5", "a") as f:
            del f["library_size"]
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [*base(root)[1:], "model.pathway_tokens=2",
                             "data.normalize=true"])
    lines = []
    checks.check_data(cfg, root, log=lines.append)
    (note,) = [line for line in lines if "library_size" in line]
    assert "2 slides have no library_size (s0.h5, s3.h5)" in note and "counts summed" in note


@pytest.mark.parametrize("shared", [18, 20, 21, 22, 40])
def test_collapsed_coordinates_are_refused_exactly_when_the_lattice_unit_would_be_0(root, shared):
    """The header check and lattice.default_unit (the reference) agree: refused iff the median
    spacing is 0."""
    import lattice
    xy = torch.tensor([[100.0 * (j % 8), 100.0 * (j // 8)] for j in range(40)])
    xy[:shared] = xy[0] if shared < 40 else torch.tensor([5.0, 5.0])
    # two crowded places, not one
    xy[:shared // 2] = xy[39] if 2 < shared < 40 else xy[:shared // 2]
    write(root, 1, coords=xy)
    try:
        lattice.default_unit(xy)
        fails = False
    except ValueError:
        fails = True
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [*base(root)[1:], "model.pathway_tokens=2"])
    if fails:
        with pytest.raises(data.CacheError, match=r"s1\.h5: key 'coords': expected spots at"):
            checks.check_data(cfg, root, log=lambda s: None)
    else:
        checks.check_data(cfg, root, log=lambda s: None)


def test_more_pathway_tokens_than_sets_warns(root):
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [*base(root)[1:], "model.pathway_tokens=50"])
    lines = []
    checks.check_data(cfg, root, log=lines.append)
    assert any("model.pathway_tokens = 50 but data.gmt has 2 sets: 48 tokens have no gene set" in s
               for s in lines)


def test_duplicate_yaml_keys_are_refused_in_files_and_overrides(root, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model:\n  dim: 32\ntrain: {epochs: 2}\nmodel:\n  dim: 16\n")
    expect(refused(["c.yaml"], tmp_path, capsys), "c.yaml: cannot read the config",
           "'model' twice", "line 4")
    expect(refused([*base(root), "train.augment={p_drop: 0.1, p_drop: 0.3}"], tmp_path, capsys),
           "'p_drop' twice")
    assert checks.load_yaml("a: {b: 1, c: 2}") == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize("item",
                         ["train.lr=inf", "train.lr=.nan", "model.beta=-.inf",
                          "model.radii=[1.0, .inf]", "train.level_weights=[.nan]",
                          "data.smooth={alpha: .nan}"])
def test_config_numbers_must_be_finite(root, tmp_path, capsys, item):
    msg = refused([*base(root), item], tmp_path, capsys)
    expect(msg, f"key '{item.split('=')[0]}")


def test_list_truncation_says_so():
    assert files.listed(["a", "b"]) == "a, b" and files.listed(range(7), 5) == "0, 1, 2, 3, 4 ..."


# ---- memory ------------------------------------------------------------------------------------
def test_memory_estimate_counts_the_real_parameters():
    """The meta-device model has exactly the parameters of the real one (the reference): 16 bytes
    each."""
    from model import ModelConfig, build_model
    mc = ModelConfig(dim=32, heads=4, pathway_tokens=3)
    real = sum(p.numel() for p in build_model(mc, 12, 7).parameters())
    buffers = sum(b.numel() * b.element_size() for b in build_model(mc, 12, 7).buffers())
    assert checks.memory_estimate(mc, 12, 7, 100)["state"] == 16 * real + buffers


def test_memory_check_refuses_with_the_keys_that_would_fit():
    """A 100k-spot slide with the demo config against a fake 16 GiB: the coarsest level's full
    attention does not fit, another model.coarse_attention does; against 1 TiB everything fits."""
    cfg = train.load_config(ROOT / "configs/default.yaml", ["run.device=cpu"])
    parts = checks.memory_estimate(ModelConfig.from_dict(cfg["model"]), 48, 250, 100_000)
    m = 100_000 * 1.8 ** 2 / 16                                 # tokens at level 2
    # H M^2 (1 + 2 branches x 2) fp32
    assert parts["full attention"] == pytest.approx(4 * m * m * 5 * 4)
    with pytest.raises(checks.ConfigError) as e:
        checks.check_memory(cfg, 48, 250, 100_000, "big.h5", available=16 * 2 ** 30)
    msg = str(e.value)
    expect(msg, "big.h5: 100000 spots need about", "found 16.0 GiB available on cpu",
           "model.coarse_attention=same")
    checks.check_memory(cfg, 48, 250, 100_000, "big.h5", available=2 ** 40)
    with pytest.raises(checks.ConfigError,
                       match="none of model.checkpoint=true, model.coarse_attention=same fits"):
        checks.check_memory(cfg, 48, 250, 100_000, "big.h5", available=2 ** 20)


def test_memory_grows_with_every_size_key():
    small = sum(checks.memory_estimate(ModelConfig(), 48, 250, 5000).values())
    for change in ({"dim": 256}, {"w": 6}, {"pathway_tokens": 500}, {"depths": [2, 2, 2]}):
        assert (sum(checks.memory_estimate(ModelConfig(**change), 48, 250, 5000).values())
                > small), change
    assert sum(checks.memory_estimate(ModelConfig(), 48, 250, 10000).values()) > small
    assert sum(checks.memory_estimate(ModelConfig(checkpoint=True), 48, 250, 5000).values()) < small


def test_an_override_that_is_not_yaml_is_one_line(root, tmp_path, capsys):
    expect(refused([*base(root), "model.depths=[1, 2"], tmp_path, capsys),
           "command line 'model.depths=[1, 2'", "expected a YAML value")


def test_the_model_for_its_sizes_is_the_real_one_whether_built_or_on_the_meta_device(monkeypatch):
    from model import build_model
    mc = ModelConfig(dim=32, heads=4, w=2, pathway_tokens=3)
    real = checks.sized_model(mc, 12, 7)
    assert all(p.device.type == "cpu" for p in real.parameters())
    with torch.device("meta"):
        meta = build_model(mc, 12, 7)
    assert ([(n, p.shape) for n, p in real.named_parameters()]
            == [(n, p.shape) for n, p in meta.named_parameters()])
    assert all(p.device.type == "meta"
               for p in checks.sized_model(ModelConfig(w=200), 12, 7).parameters())


def test_exponents_without_a_dot_are_numbers(root):
    """YAML 1.1 reads 1e-6 as a string (model.unit_um, whose default is null, then refused it)."""
    assert checks.load_yaml("a: 1e-6\nb: -2E+3\nc: 1.5e-3\nd: '1e-6'\ne: 12") == {
        "a": 1e-6, "b": -2000.0, "c": 1.5e-3, "d": "1e-6", "e": 12}
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            ["model.unit_um=1e-2", "model.ridge_alpha=3e2"])
    assert cfg["model"]["unit_um"] == 0.01 and cfg["model"]["ridge_alpha"] == 300.0


def test_sub_levels_need_sub_patches_on_every_slide_before_anything_is_written(
        root, tmp_path, capsys):
    expect(refused([*base(root), "model.sub_levels=1"], tmp_path, capsys),
           "s0.h5: model.sub_levels = 1 needs sub_features with 4 sub-patches per spot",
           "found none")


def test_configs_a_user_would_expect_to_work(root, tmp_path, monkeypatch):
    """YAML merge keys, an empty section, ~ and $VAR in paths, a byte-order mark and Windows line
    endings: read as a user means them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TESSERA_DATA", str(root))
    text = ("\ufefftrain:\n  <<: {lr: 0.002, epochs: 3}\n  ema: 0.5\neval:\ndata:\n  root: "
            "$TESSERA_DATA\n"
            "run:\n  dir: ~/runs\n").replace("\n", "\r\n")
    (tmp_path / "c.yaml").write_bytes(text.encode())
    cfg = train.load_config(tmp_path / "c.yaml")
    assert (cfg["train"]["lr"], cfg["train"]["epochs"], cfg["train"]["ema"]) == (0.002, 3, 0.5)
    assert cfg["eval"] == train.DEFAULTS["eval"]
    assert cfg["data"]["root"] == str(root) and cfg["run"]["dir"] == str(tmp_path / "home" / "runs")
    (tmp_path / "d.yaml").write_text("train:\n  <<: {lr: 0.002}\n  lr: 0.003\n  lr: 0.004\n")
    # merged keys are not repeats
    with pytest.raises(SystemExit, match="found the key 'lr' twice"):
        train.load_config(tmp_path / "d.yaml")


def test_a_split_file_cannot_reach_outside_data_root_or_list_a_slide_twice(root, tmp_path, capsys):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "test_0.csv").write_text("sample_id\ns3\n")
    for rows, parts in ((["s0", "../caches/s1"], ["train_0.csv: key 'sample_id': expected a plain "
                                                  "file name",
                                                   "'../caches/s1' (a path"]),
                        (["s0", "s1", "s0 "],
                         ["train_0.csv: key 'sample_id': expected unique names", "'s0' twice"]),
                        (["s0", "S1"], ["found none for 1: S1 (found 's1' for 'S1': names differ "
                                        "in case)"])):
        (splits / "train_0.csv").write_text("sample_id\n" + "".join(f"{r}\n" for r in rows))
        expect(refused([*base(root), f"data.split_dir={splits}"], tmp_path, capsys), *parts)


INFERENCE_PEAK = """
import sys
def hwm():   # this process's peak resident set (getrusage's includes the parent's, across exec)
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
sys.path.insert(0, {root!r})
import numpy as np, torch
import checks, data, predict, train
from model import ModelConfig, build_model
cfg = train.load_config({config!r})
mc, n, C, G = ModelConfig.from_dict(cfg["model"]), {n}, 64, 250
model = build_model(mc, C, G).eval()
side = int(np.ceil(np.sqrt(n)))
grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
xy = torch.tensor(grid * 100.0, dtype=torch.float32)
pseudo = cfg["data"]["pseudo"]
slide = data.Slide("x", torch.randn(n, C), xy, np.array([str(i) for i in range(n)]),
                   pseudo_features=torch.randn(n, C) if pseudo else None,
                   pseudo_coords=xy + 50 if pseudo else None)
base = hwm()
predict.predict_with_std([(model, [str(g) for g in range(G)])], slide, pseudo, "cpu")
print(hwm() - base, sum(checks.inference_estimate(mc, C, G, n).values()))
"""


@pytest.mark.parametrize("config", ["default", "hist"])
def test_the_inference_estimate_bounds_the_measured_peak(config):
    """checks.inference_estimate against the growth of the resident set of a fresh process
    predicting one slide of 8,000 spots (/proc/self/status VmHWM): generous, within a factor 4."""
    code = INFERENCE_PEAK.format(root=str(ROOT), config=str(ROOT / "configs" / f"{config}.yaml"),
                                 n=8000)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    measured, estimate = (float(x) for x in r.stdout.split()[-2:])
    assert measured <= estimate <= 4 * measured + 2 ** 27, (measured, estimate)


def test_inference_memory_is_refused_with_the_largest_slide_that_fits():
    mc = ModelConfig(dim=32, heads=2)
    size = lambda n: sum(checks.inference_estimate(mc, 48, 250, n).values())  # noqa: E731
    with pytest.raises(files.TooLarge) as e:
        checks.check_inference_memory(mc, 48, 250, 10 ** 6, "slide big", available=2 ** 30)
    msg = str(e.value)
    fit = int(msg.split("slides of up to ")[1].split()[0])
    assert msg.startswith("slide big: a forward over 1000000 spots (model")
    assert "found 1.0 GiB available" in msg
    assert size(fit) <= 2 ** 30 < size(fit + 1)
    checks.check_inference_memory(mc, 48, 250, 1000, "slide small", available=2 ** 30)


@pytest.mark.parametrize("windows", ["split", "union"])
def test_the_window_table_bound_covers_the_tables_a_model_builds(windows):
    """checks.window_table_bytes bounds the slot-pair buffers (allowed, offsets) the built model
    holds, summed over its modules, for both window forms."""
    from model import build_model
    mc = ModelConfig(dim=16, heads=2, w=2, windows=windows, pathway_tokens=2)
    model = build_model(mc, 6, 3)
    tables = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                 if name.endswith(("allowed", "offsets")))
    assert 0 < tables <= checks.window_table_bytes(mc)

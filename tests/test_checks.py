"""checks.py through train.main: every mistake in a config, the files it names, the slide caches or the
run folder ends the program before any fold trains, with one line naming the file or key, what was
expected and what was found, and leaves no run folder behind."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import checks
import data
import train

ROOT = Path(__file__).resolve().parents[1]
GENES = [f"G{j}" for j in range(12)]


def write(root, i, patient=None, n=40, c=6, counts=True, slide_id=None, coords=None, library=None):
    """Slide s<i> (patients: s0, s1 -> A; s2, s3 -> B) on a square 100 um grid."""
    r = np.random.default_rng(i)
    x = torch.from_numpy(r.poisson(3.0, (n, len(GENES))).astype(np.float32))
    xy = torch.tensor([[100.0 * (j % 8), 100.0 * (j // 8)] for j in range(n)]).reshape(n, 2)
    s = data.Slide(slide_id or f"s{i}", torch.randn(n, c), xy if coords is None else coords,
                   np.array([f"b{j}" for j in range(n)]), patient=patient or "AB"[i // 2], spot_pitch_um=100.0,
                   counts=x if counts else None, genes=GENES if counts else None,
                   library_size=(x.sum(1) if library is None else library) if counts else None)
    data.write_slide(root / f"s{i}.h5", s, overwrite=True)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """Four small slides of two patients and a GMT in tmp_path/caches; the working folder is tmp_path."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "caches"
    for i in range(4):
        write(root, i)
    (root / "sets.gmt").write_text("SET_A\turl\tG0\tG1\tG2\nSET_B\turl\tG3\tG4\n")
    return root


def base(root):
    return [str(ROOT / "configs/default.yaml"), f"data.root={root}", "data.folds=2", "data.genes={by: mean, n: 5}",
            "data.gmt=sets.gmt", "run.name=t"]


def refused(args, tmp_path, capsys) -> str:
    """train.main(args) ends with one line (SystemExit with a message: Python prints it to stderr and exits
    with status 1), nothing else on stderr, and no run folder."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        train.main(args)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and "Traceback" not in msg, msg
    assert capsys.readouterr().err == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before   # nothing written
    return msg


def expect(msg, *parts):
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


CONFIG_CASES = [  # (overrides, parts of the message)
    (["train.epochs=abc"], ["default.yaml: key 'train.epochs': expected an integer", "found 'abc'"]),
    (["train.epochs=0"], ["key 'train.epochs': expected an integer >= 1, found 0"]),
    (["model.dim=-5"], ["key 'model.dim': expected an integer >= 1, found -5"]),
    (["model.depths=3"], ["key 'model.depths': expected a list of integers, found 3"]),
    (["model.depths=[]"], ["key 'model.depths': expected a list of integers with one entry >= 1 per level"]),
    (["train.checkpoint_every=0"], ["key 'train.checkpoint_every': expected an integer >= 1, found 0"]),
    (["train.lr=fast"], ["key 'train.lr': expected a number, found 'fast'"]),
    (["train.loss=l1"], ["key 'train.loss': expected a string (one of mse, pcc, mse_pcc, zinb), found 'l1'"]),
    (["model.dropout=1.5"], ["key 'model.dropout': expected a number in [0, 1), found 1.5"]),
    (["data.normalize=yes please"], ["key 'data.normalize': expected true or false, found 'yes please'"]),
    (["data.genes={by: hvg, n: 0}"], ["key 'data.genes.n': expected an integer >= 1, found 0"]),
    (["data.genes={by: top, n: 5}"], ["key 'data.genes.by': expected hvg or mean, found 'top'"]),
    (["data.genes=5"], ["key 'data.genes': expected a gene list file, {by: hvg|mean, n: N} or null, found 5"]),
    (["train=5"], ["key 'train': expected a mapping, found 5"]),
    (["data.synthetic={slides: 0}"], ["key 'data.synthetic.slides': expected an integer >= 1, found 0"]),
    (["run.device=gpu"], ["key 'run.device': expected auto, cpu, cuda or cuda:<index>, found 'gpu'"]),
    (["model.heads=3"], ["model.dim = 64 must be divisible by model.heads = 3"]),
    (["model.dimm=3"], ["unknown config key 'model.dimm'; valid keys here"]),
    (["train.loss=zinb"], ["train.loss = zinb and model.head = zinb go together"]),
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


def test_missing_files_name_where_they_were_looked_for(root, tmp_path, capsys):
    msg = refused([*base(root), "data.genes=nope.json"], tmp_path, capsys)
    expect(msg, f"key 'data.genes': expected a file, found none at {root / 'nope.json'} or nope.json")
    msg = refused([*base(root), "data.gmt=nope.gmt"], tmp_path, capsys)
    expect(msg, f"key 'data.gmt': expected a file, found none at {root / 'nope.gmt'} or nope.gmt")
    msg = refused([*base(root), "data.split_dir=splits"], tmp_path, capsys)
    expect(msg, "key 'data.split_dir': expected a folder, found none at")
    (tmp_path / "genes.txt").write_text("G1\nG2\nNOPE\n")
    msg = refused([*base(root), "data.genes=genes.txt"], tmp_path, capsys)
    expect(msg, "genes.txt: key 'data.genes': expected genes the slides have, found 1 missing from", "NOPE")


def test_relative_data_files_are_found_in_data_root_then_the_working_folder(root, tmp_path):
    cfg = train.load_config(ROOT / "configs/default.yaml", [f"data.root={root}", "data.gmt=sets.gmt"])
    assert checks.data_file(cfg, "gmt", root) == root / "sets.gmt"
    (tmp_path / "here.gmt").write_text("S\turl\tG0\n")
    cfg["data"]["gmt"] = "here.gmt"
    assert checks.data_file(cfg, "gmt", root) == Path("here.gmt")
    # default.yaml's GMT is the one the synthetic generator writes into data.root, wherever that is
    cfg = train.load_config(ROOT / "configs/default.yaml", [f"data.root={root}"])
    (root / "programs.gmt").write_text("S\turl\tG0\n")
    assert checks.data_file(cfg, "gmt", root) == root / "programs.gmt"


SLIDE_CASES = [  # (change to the dataset, extra overrides, parts of the message)
    (lambda r: write(r, 3, counts=False), [], ["s3.h5: key 'counts': expected counts on a training slide, found none"]),
    (lambda r: write(r, 3, c=7), [], ["s3.h5: key 'features': expected 6 features per spot like s0.h5, found 7"]),
    (lambda r: write(r, 3, n=0), [], ["s3.h5: key 'features': expected at least one spot, found 0 rows"]),
    (lambda r: write(r, 3, coords=torch.full((40, 2), 5.0)), [],
     ["s3.h5: key 'coords': expected spots at different positions, found all 40 at one point"]),
    (lambda r: write(r, 3, slide_id="s9"), [],
     ["s3.h5: key 'attrs/slide_id': expected 's3' (the file name), found 's9'"]),
    (lambda r: write(r, 3, library=torch.zeros(40)), ["data.normalize=true"],
     ["s3.h5: key 'library_size': expected the total counts of each spot for data.normalize=true, found 40 spots"]),
    (lambda r: (r / "s3.h5").write_text("not hdf5"), [], ["s3.h5: expected a readable HDF5 slide cache"]),
    (lambda r: None, ["data.folds=3"], ["key 'data.folds': expected -1 or an integer from 2 to 2 (the number of "
                                        "patients in", "found 3"]),
    (lambda r: None, ["train.val_slides=2"], ["key 'train.val_slides': expected fewer than the 2 training slides"]),
    (lambda r: [p.unlink() for p in r.glob("*.h5")], [], ["key 'data.root': expected slide caches <slide>.h5 in"]),
]


@pytest.mark.parametrize("change,overrides,parts", SLIDE_CASES, ids=[c[2][0][:40] for c in SLIDE_CASES])
def test_dataset_mistakes(root, tmp_path, capsys, change, overrides, parts):
    change(root)
    expect(refused([*base(root), *overrides], tmp_path, capsys), *parts)


def test_a_zero_library_size_is_fine_without_normalisation(root):
    write(root, 3, library=torch.zeros(40))
    cfg = train.load_config(ROOT / "configs/default.yaml", base(root)[1:])
    assert len(checks.check_data(cfg, root)) == 2


def test_gmt_without_shared_genes_warns_per_set_and_refuses_a_pathway_head(root, tmp_path, capsys):
    (root / "sets.gmt").write_text("SET_A\turl\tG0\tX1\nSET_B\turl\tX2\tX3\n")
    cfg = train.load_config(ROOT / "configs/default.yaml", base(root)[1:])
    lines = []
    checks.check_data(cfg, root, log=lines.append)
    assert len(lines) == 1 and "1 of the 2 pathway sets used share no gene" in lines[0], lines
    assert "SET_A 1/2, SET_B 0/2" in lines[0]
    (root / "sets.gmt").write_text("SET_A\turl\tX1\nSET_B\turl\tX2\tX3\n")
    msg = refused([*base(root), "model.head=pathway"], tmp_path, capsys)
    expect(msg, "sets.gmt: key 'data.gmt': expected pathway sets sharing genes with the data for model.head = "
                "pathway, found none of the 2 used sets does (SET_A 0/1, SET_B 0/2)")


def test_a_data_root_typo_generates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = refused([str(ROOT / "configs/default.yaml"), "data.root=data/synthtic"], tmp_path, capsys)
    expect(msg, "key 'data.root': expected a folder of slide caches, found no folder data/synthtic",
           "generated only at data/synthetic")


def test_run_folders(root, tmp_path, capsys):
    cfg = train.load_config(ROOT / "configs/default.yaml", base(root)[1:])
    run = tmp_path / "runs" / "t"
    (run / "fold_0").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "fold_0" / "done").write_text("finished\n")
    msg = refused(base(root), tmp_path, capsys)
    expect(msg, "runs/t holds this run already: pass --resume to continue it, or choose another run.name")
    msg = refused([*base(root), "train.epochs=3", "model.dim=32", "--resume"], tmp_path, capsys)
    expect(msg, "runs/t/config.yaml: --resume expected the config the run started with, found other values for "
                "model.dim (run 64, given 32); train.epochs (run 25, given 3)")
    msg = refused([*base(root), "train.epochs=3"], tmp_path, capsys)
    expect(msg, "runs/t holds a run of another config (train.epochs (run 25, given 3)): choose another run.name")
    assert checks.check_run_dir(cfg) == run.relative_to(tmp_path)
    (run / "config.yaml").unlink()
    expect(refused(base(root), tmp_path, capsys), "runs/t: expected a new run folder, found fold_0 and no config.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device(root, tmp_path, capsys):
    expect(refused([*base(root), "run.device=cuda"], tmp_path, capsys), "run.device = cuda but no CUDA device")


@pytest.mark.slow
def test_the_command_prints_one_line_and_no_traceback(root, tmp_path):
    write(root, 3, c=7)
    for extra, part in ((["train.epochs=abc"], "key 'train.epochs'"), ([], "s3.h5: key 'features'")):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *base(root), *extra], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and part in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists(), r.stderr

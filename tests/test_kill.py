"""A kill (SIGKILL) at a random moment of synthetic.py, hest.py import-hest, predict.py and a
training run, then the same command again (with --resume for training), gives the files an
uninterrupted run gives; in between, nothing a later command reads passes for complete
(files.Outputs writes all or nothing, and a folder whose renames were cut short is refused by its
readers until the command runs again)."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data
import files
import test_adversarial as adv

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow          # each command runs about seven times, each importing torch
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
SEEDS = (0, 1, 2)


def run(argv, cwd) -> float:
    """Run a command to its end; its wall time."""
    t0 = time.time()
    r = subprocess.run([sys.executable, *argv], cwd=cwd, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-2000:])
    return time.time() - t0


def kill_after(argv, cwd, seconds: float) -> None:
    """Start a command and SIGKILL it after `seconds` (if it is still running)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def visible(folder: Path) -> dict:
    """Every file a reader would see under `folder` (hidden names left out), and its bytes' hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def hidden(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")) if folder.exists() else []


def kill_and_rerun(tmp_path, build, argv, out: str, reader):
    """The reference run in a copy of the inputs, then for each seed: a kill at a random moment
    between the interpreter's start and the reference's end, what a reader sees, the same command
    again."""
    ref = tmp_path / "ref"
    ref.mkdir()
    build(ref)
    wall = run(argv, ref)
    want = visible(ref / out)
    assert want, "the reference run wrote nothing"
    for seed in SEEDS:
        work = tmp_path / f"kill{seed}"
        work.mkdir()
        build(work)
        moment = random.Random(seed).uniform(0.3, 1.0) * wall
        kill_after(argv, work, moment)
        seen = visible(work / out) if (work / out).exists() else {}
        marked = (work / out / files.WRITING).exists()
        # nothing half-done passes for complete: no file, every file, or a folder its readers refuse
        assert seen == {} or seen == want or marked, (seed, moment, sorted(seen))
        if seen and seen != want:
            with pytest.raises(Exception, match="unfinished"):
                reader(work / out)
        if seen == want and not marked:      # it had finished: run again, it refuses to overwrite
            again = subprocess.run([sys.executable, *argv], cwd=work, env=ENV, capture_output=True,
                                   text=True, timeout=600)
            assert again.returncode != 0 and "--overwrite" in again.stderr, again.stderr
        else:
            run(argv, work)
        assert visible(work / out) == want, (seed, moment)
        assert not [h for h in hidden(work / out) if h.endswith((".pending", ".tmp"))
                    or h == files.WRITING], (seed, hidden(work / out))


def test_synthetic_killed_then_run_again(tmp_path):
    argv = [str(ROOT / "synthetic.py"), "--out", "ds", "--slides", "4", "--spots", "400", "--seed",
            "3"]
    kill_and_rerun(tmp_path, lambda work: None, argv, "ds", data.list_slides)


def test_import_hest_killed_then_run_again(tmp_path):
    argv = [str(ROOT / "hest.py"), "import-hest", "--st", "st", "--features", "emb", "--out", "out"]
    kill_and_rerun(tmp_path, adv.hest_inputs, argv, "out", data.list_slides)


def test_predict_killed_then_run_again(tmp_path):
    def build(work):
        torch.manual_seed(0)                # the same model and caches in every copy of the inputs
        adv.fold_model(adv.fake_run(work))
        adv.caches(work)
    argv = [str(ROOT / "predict.py"), "--run", "run", "--slides", "caches", "--out", "pred",
            "--format",
            "h5", "h5ad"]
    kill_and_rerun(tmp_path, build, argv, "pred", lambda folder: files.check_finished(folder))


def _run_files(run: Path) -> dict:
    """What a training run leaves that a later command reads: the record and config, each fold's
    model tensors and prediction arrays, and the metrics (log.txt and results.md hold times: left
    out)."""
    out = {"folds.json": (run / "folds.json").read_text(),
           "config.yaml": (run / "config.yaml").read_text(),
           "metrics": json.loads((run / "results.json").read_text())["metrics"]}
    for model in sorted(run.glob("fold_*/model.pt")):
        out[str(model.relative_to(run))] = dict(torch.load(model, weights_only=True)["model"])
    for pred in sorted(run.glob("fold_*/pred/*.h5")):
        with h5py.File(pred) as f:
            arrays = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
            out[str(pred.relative_to(run))] = arrays
    return out


def _same(a, b, where=""):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def test_training_killed_then_resumed(tmp_path):
    import synthetic
    root = tmp_path / "synth"
    synthetic.make_synthetic(root, n_slides=4, seed=0, n_spots=200, log=lambda s: None)
    argv = [str(ROOT / "train.py"), str(ROOT / "configs/default.yaml"), f"data.root={root}",
            f"data.gmt={root / 'programs.gmt'}", "data.folds=2", "data.genes={by: hvg, n: 20}",
            "model.dim=16", "model.heads=2", "model.pathway_tokens=4", "train.epochs=3",
        "run.dir=runs"]
    wall = run([*argv, "run.name=ref"], tmp_path)
    want = _run_files(tmp_path / "runs" / "ref")
    for seed in SEEDS:
        name = f"killed{seed}"
        kill_after([*argv, f"run.name={name}"], tmp_path, random.Random(seed).uniform(0.3,
                                                                                      1.0) * wall)
        run([*argv, f"run.name={name}", "--resume"], tmp_path)
        got = _run_files(tmp_path / "runs" / name)
        for key in ("config.yaml",):     # the run's own name differs, nothing else
            got[key] = got[key].replace(name, "ref")
        _same(want, got, name)

"""A fork for one paper deletes the programs it does not need (README.md, "Files"): a copy of the
repository without hest.py, synthetic.py, plots.py, protocols.py, bench*.py and gpu_check.py still
trains and evaluates on slide caches it already has, and a config that asks for a deleted file's
work says so."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data

ROOT = Path(__file__).resolve().parents[1]
DELETED = ["hest.py", "synthetic.py", "plots.py", "protocols.py", "bench.py", "bench_accuracy.py",
           "bench_runs.py", "gpu_check.py"]


def tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (git ls-files), copied to `dest`, without DELETED."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    for name in names.decode().split("\0"):
        if name and (ROOT / name).is_file() and name not in DELETED:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def write_caches(root: Path, n_slides: int = 4, side: int = 8, n_genes: int = 12,
                 n_features: int = 6):
    """Slides on a square grid of 100 um pitch, one patient each, with counts driven by the
    features."""
    g = np.random.default_rng(0)
    mix = g.normal(size=(n_features, n_genes))
    xy = (np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
          * 100.0)
    for i in range(n_slides):
        features = g.normal(size=(len(xy), n_features)).astype(np.float32)
        counts = g.poisson(np.exp(np.clip(features @ mix * 0.5, -3, 3))).astype(np.float32)
        slide = data.Slide(slide_id=f"s{i}", features=torch.from_numpy(features),
                           coords=torch.tensor(xy, dtype=torch.float32),
                           barcodes=np.array([f"s{i}_{k}" for k in range(len(xy))]),
                           patient=f"p{i}", spot_pitch_um=100.0, encoder="test",
                           counts=torch.from_numpy(counts), genes=[f"G{j}" for j in range(n_genes)],
                           library_size=torch.from_numpy(counts.sum(1)))
        data.write_slide(root / f"s{i}.h5", slide)


def run(fork: Path, *args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=fork, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_fork_without_the_optional_programs_trains_and_evaluates(tmp_path):
    fork = tracked_copy(tmp_path / "fork")
    assert not any((fork / name).exists() for name in DELETED) and (fork / "train.py").exists()
    caches = tmp_path / "caches"
    write_caches(caches)
    keys = [f"data.root={caches}", "data.gmt=null", "data.folds=2", "data.genes={by: hvg, n: 8}",
            "model.dim=8", "model.heads=2", "model.pathway_tokens=0", "train.epochs=1",
            "run.threads=1", "run.name=fork"]
    r = run(fork, "train.py", "configs/default.yaml", *keys)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (sorted(p.name for p in (fork / "runs" / "fork").glob("fold_*/pred/*.h5"))
            == [f"s{i}.h5" for i in range(4)])
    r = run(fork, "eval.py", "runs/fork")
    assert r.returncode == 0 and "| fork | 2 |" in r.stdout, r.stderr[-3000:]
    # what the deleted files did: asked for, named in one line, nothing written
    r = run(fork, "train.py", "configs/default.yaml", *keys[:-1], "run.name=smooth",
            "data.smooth={method: spcs}")
    assert (r.returncode != 0 and "Traceback" not in r.stderr
            and "protocols.py" in r.stderr), r.stderr
    r = run(fork, "train.py", "configs/default.yaml", "data.root=data/synthetic", "run.name=demo")
    assert (r.returncode != 0 and "Traceback" not in r.stderr
            and "synthetic.py" in r.stderr), r.stderr
    assert sorted(p.name for p in (fork / "runs").iterdir()) == ["fork"]

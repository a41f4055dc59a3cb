"""Tests for synthetic.py: the demo dataset is valid, grouped by patient, deterministic, and its
neighbourhood signal is real (checked by least squares written here)."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import files
import lattice
import synthetic

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- synthetic slides

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The demo dataset (12 slides of ~1,500 spots), generated once and timed."""
    out = tmp_path_factory.mktemp("synth")
    cpu, wall = time.process_time(), time.time()
    paths = synthetic.make_synthetic(out, log=lambda s: None)
    return out, paths, time.process_time() - cpu, time.time() - wall


def test_synthetic_dataset_is_fast_valid_and_grouped(synth):
    out, paths, cpu_seconds, wall_seconds = synth
    assert cpu_seconds < 10, (f"12 slides took {cpu_seconds:.1f} s of CPU "
                              f"({wall_seconds:.1f} s wall)")
    assert len(paths) == 12 and data.list_slides(out) == paths
    slides = [data.read_slide(p) for p in paths]              # read_slide validates every key
    assert all(1275 <= s.n_spots <= 1725 and s.features.shape[1] == 64 and len(s.genes) == 300
               for s in slides)
    assert all(s.expected is not None and torch.equal(s.library_size, s.counts.sum(1))
               for s in slides)
    per_patient = {}
    for s in slides:
        per_patient[s.patient] = per_patient.get(s.patient, 0) + 1
    assert sorted(per_patient.values()) == [2, 2, 2, 3, 3]     # slides grouped 2-3 per patient
    s = slides[0]
    d = torch.cdist(s.coords, s.coords) + torch.eye(s.n_spots) * 1e9
    nearest = d.min(1).values
    # hexagonal, 100 um
    assert abs(nearest.median() - 100) < 3 and ((d < 103).sum(1) == 6).float().mean() > 0.7
    lib = s.library_size
    assert lib.std() / lib.mean() > 0.2  # library size varies from spot to spot
    slide_means = torch.stack([t.features.mean(0) for t in slides])
    assert slide_means.std(0).mean() > 0.3  # a per-slide stain shift on the features
    programs = files.read_gmt(out / "programs.gmt")
    assert 10 <= len(programs) <= 20 and all(set(m) <= set(s.genes) for m in programs.values())
    member = {g for m in programs.values() for g in m}
    assert 0.05 < 1 - len(member) / 300 < 0.3                  # some genes belong to no program
    meta = files.read_metadata(out / "metadata.csv")
    assert meta["synth_00"]["patient"] == s.patient


def r2_held_out(x, y, train):
    """Least squares (normal equations) with an intercept on the train spots; R^2 per column on the
    others."""
    x1 = np.c_[x, np.ones(len(x))]
    beta = np.linalg.solve(x1[train].T @ x1[train] + 1e-6 * np.eye(x1.shape[1]),
                           x1[train].T @ y[train])
    res = y[~train] - x1[~train] @ beta
    return 1 - (res ** 2).sum(0) / ((y[~train] - y[~train].mean(0)) ** 2).sum(0)


def test_synthetic_neighbourhood_signal_is_real(synth):
    """For 'neigh' programs the spot's own features explain little of the expected expression and
    the mean of the neighbours' features (within two rings) explains much more; 'local' programs are
    mostly explained by the spot's own features."""
    out, paths, _, _ = synth
    programs = files.read_gmt(out / "programs.gmt")
    for path in paths[:2]:
        s = data.read_slide(path)
        x, xy = s.features.double().numpy(), s.coords.double().numpy()
        dist = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
        ring = (dist > 0) & (dist <= 2.1 * s.spot_pitch_um)
        neighbours = ring @ x / ring.sum(1, keepdims=True).clip(1)
        y = np.log(s.expected.double().numpy())
        train = np.random.default_rng(0).random(len(x)) < 0.5
        for kind, own_range, min_gain in (("NEIGH", (0.0, 0.45), 0.3), ("LOCAL", (0.5, 1.0), 0.0)):
            cols = [s.genes.index(g) for name, m in programs.items() if f"_{kind}_" in name
                    for g in m]
            own = r2_held_out(x, y[:, cols], train).mean()
            both = r2_held_out(np.c_[x, neighbours], y[:, cols], train).mean()
            assert own_range[0] < own < own_range[1] and both > own + min_gain, (kind, own, both)


def test_synthetic_is_deterministic_and_has_layouts(tmp_path):
    kw = dict(n_slides=2, n_spots=200, n_genes=40, n_features=16, log=lambda s: None)
    a = synthetic.make_synthetic(tmp_path / "a", seed=3, pseudo=True, **kw)
    b = synthetic.make_synthetic(tmp_path / "b", seed=3, pseudo=True, **kw)
    c = synthetic.make_synthetic(tmp_path / "c", seed=4, pseudo=True, **kw)
    for pa, pb in zip(a, b):
        sa, sb = data.read_slide(pa), data.read_slide(pb)
        for k in ("features", "coords", "counts", "expected", "pseudo_features", "pseudo_coords"):
            assert torch.equal(getattr(sa, k), getattr(sb, k)), k
    assert ((tmp_path / "a" / "programs.gmt").read_text()
            == (tmp_path / "b" / "programs.gmt").read_text())
    assert not torch.equal(data.read_slide(a[0]).features[:5], data.read_slide(c[0]).features[:5])
    s = data.read_slide(a[0])
    assert (s.pseudo_features.shape[1] == 16
            and 0.5 * s.n_spots < len(s.pseudo_coords) < 2 * s.n_spots)
    gap = torch.cdist(s.pseudo_coords, s.coords).min(1).values
    assert ((gap > 40) & (gap < 70)).all()  # triangle centres: 100 / sqrt(3) um away
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        synthetic.make_synthetic(tmp_path / "a", seed=3, **kw)
    for layout, pitch in (("square", 200.0), ("hd", 8.0)):
        p = synthetic.make_synthetic(tmp_path / layout, layout=layout, pseudo=True,
                                     **dict(kw, n_slides=1))
        s = data.read_slide(p[0])
        d = torch.cdist(s.coords, s.coords) + torch.eye(s.n_spots) * 1e9
        assert s.spot_pitch_um == pitch and abs(d.min(1).values.median() / pitch - 1) < 0.05
        assert ((d < 1.05 * pitch).sum(1) == 4).float().mean() > 0.6    # square lattice
        gap = torch.cdist(s.pseudo_coords, s.coords).min(1).values / pitch
        assert ((gap > 0.6) & (gap < 0.8)).all()  # square centres: pitch / sqrt(2) away


@pytest.mark.usefixtures("one_thread")
def test_synthetic_sub_spots_are_a_fine_grid_binned(tmp_path):
    """--sub 2: sub-spot truth whose sum is the spot, sub-patch features that see their own
    sub-spot."""
    kw = dict(n_slides=2, n_spots=300, n_genes=40, n_features=16, log=lambda s: None,
              layout="square")
    paths = synthetic.make_synthetic(tmp_path / "a", seed=2, sub=2, **kw)
    again = synthetic.make_synthetic(tmp_path / "b", seed=2, sub=2, **kw)
    for p, q in zip(paths, again):
        s, t = data.read_slide(p), data.read_slide(q)
        assert (torch.equal(s.sub_features, t.sub_features)
                and torch.equal(s.sub_counts, t.sub_counts))
        assert (s.sub_features.shape == (s.n_spots, 4, 16)
                and s.sub_extent_um == pytest.approx(200.0, rel=0.01))
        assert torch.equal(s.sub_counts.sum(1), s.counts) and s.sub_valid.float().mean() > 0.8
        assert s.spot_pitch_um == pytest.approx(200.0, rel=0.01)
        sub = lattice.sub_coords(s.coords, 2, s.sub_extent_um)          # sub-spots 100 um apart
        d = (torch.cdist(sub[s.sub_valid], sub[s.sub_valid])
             + torch.eye(int(s.sub_valid.sum())) * 1e9)
        assert abs(d.min(1).values.median() / 100.0 - 1) < 0.05
        # each sub-patch's features track its own sub-spot's counts better than a sibling's do
        x, y = s.sub_features.double(), torch.log1p(s.sub_counts).double()
        both = s.sub_valid.all(1)
        proj = torch.linalg.lstsq(x[both].reshape(-1, 16), y[both].reshape(-1, 40)).solution
        fit = (x[both] @ proj)                                           # (n, 4, G)
        mine = np.mean([np.corrcoef(fit[:, 0, g], y[both, 0, g])[0, 1] for g in range(40)])
        sibling = np.mean([np.corrcoef(fit[:, 3, g], y[both, 0, g])[0, 1] for g in range(40)])
        assert mine > sibling + 0.02, (mine, sibling)
    with pytest.raises(ValueError, match="--sub 2 or 4 with a square layout"):
        synthetic.make_synthetic(tmp_path / "c", sub=2, **dict(kw, layout="visium"))


# ----------------------------------------------------------------------------- command line

def test_command_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "synthetic.py"), "--out", "ds", "--slides", "2",
                        "--spots", "150", "--seed", "1", "--layout", "square"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and "synth: 2 slides" in r.stdout, r.stderr
    assert len(data.list_slides(tmp_path / "ds")) == 2


def test_sizes_below_one_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected every size >= 1 and a seed >= 0, found "
                                         r"\{'slides': 0"):
        synthetic.make_synthetic(tmp_path / "x", n_slides=0, log=lambda s: None)
    r = subprocess.run([sys.executable, str(ROOT / "synthetic.py"), "--out", "x", "--spots", "0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert (r.returncode == 1 and len(r.stderr.splitlines()) == 1
            and "'spots': 0" in r.stderr), r.stderr
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- sizes that fit
PEAK = """
import json, sys, tempfile
def hwm():   # this process's peak resident set (getrusage's includes the parent's, across exec)
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
sys.path.insert(0, {root!r})
import synthetic
d = tempfile.mkdtemp()
synthetic.make_synthetic(d + "/warm", n_slides=1, n_spots=20, n_genes=5, n_features=4,
                         layout={layout!r}, sub={sub}, log=lambda s: None)
base = hwm()
synthetic.make_synthetic(d + "/x", n_slides=2, n_spots={spots}, n_genes={genes},
                         n_features={features}, layout={layout!r}, sub={sub}, log=lambda s: None)
print(hwm() - base)
"""


@pytest.mark.parametrize("spots,genes,features,layout,sub", [(6000, 20, 8, "visium", 0), (3000,
                                                                                          600, 8,
    "square", 0),
                                                              (1500, 20, 8, "square", 2)])
def test_the_memory_estimate_bounds_the_measured_peak(spots, genes, features, layout, sub):
    """slide_bytes against the growth of the resident set of a fresh process drawing two such slides
    (/proc/self/status VmHWM), generous but not absurd."""
    code = PEAK.format(root=str(ROOT), spots=spots, genes=genes, features=features, layout=layout,
                       sub=sub)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    measured, estimate = int(r.stdout.split()[-1]), synthetic.slide_bytes(spots, genes, features,
                                                                          layout, sub)[0]
    assert measured <= estimate <= 3 * measured + 2 ** 27, (measured, estimate)


def test_sizes_the_machine_cannot_hold_are_refused_with_a_size_that_fits(tmp_path):
    size = lambda n: synthetic.slide_bytes(n, 300, 64, "visium")  # noqa: E731
    with pytest.raises(files.TooLarge) as e:
        synthetic.check_sizes(tmp_path, 12, 10 ** 6, 300, 64, "visium", 0, memory=2 ** 30,
                              disk=10 ** 15)
    fit = int(str(e.value).split("--spots ")[-1].split()[0])
    assert "a slide of --spots 1000000 needs about" in str(e.value)
    assert "found 1.0 GiB available" in str(e.value)
    assert size(fit)[0] <= 2 ** 30 < size(fit + 1)[0]                 # the largest that fits
    with pytest.raises(files.TooLarge) as e:
        synthetic.check_sizes(tmp_path, 10 ** 6, 1500, 300, 64, "visium", 0, memory=10 ** 12,
                              disk=10 ** 10)
    fit = int(str(e.value).split("--slides ")[-1].split()[0])
    assert "of disk" in str(e.value) and fit * size(1500)[1] <= 10 ** 10 < (fit + 1) * size(1500)[1]
    synthetic.check_sizes(tmp_path, 12, 1500, 300, 64, "visium", 0, memory=2 ** 30, disk=10 ** 10)
    r = subprocess.run([sys.executable, str(ROOT / "synthetic.py"), "--out", "x", "--spots",
                        "100000000"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "would fit" in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_link_or_an_existing_file_in_out_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "theirs.gmt").write_text("theirs")
    (tmp_path / "ds" / "programs.gmt").symlink_to(tmp_path / "theirs.gmt")
    with pytest.raises(files.CacheError, match=r"programs\.gmt: found a symbolic link"):
        synthetic.make_synthetic(tmp_path / "ds", n_slides=2, n_spots=50, log=lambda s: None)
    (tmp_path / "ds" / "programs.gmt").unlink()
    (tmp_path / "ds" / "metadata.csv").write_text("mine")
    with pytest.raises(FileExistsError, match=r"metadata\.csv: already exists"):
        synthetic.make_synthetic(tmp_path / "ds", n_slides=2, n_spots=50, log=lambda s: None)
    assert (tmp_path / "theirs.gmt").read_text() == "theirs"
    assert (tmp_path / "ds" / "metadata.csv").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["metadata.csv"]

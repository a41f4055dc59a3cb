"""train.py: losses against direct formulas, schedules, config handling, end-to-end runs and --resume."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import data
import protocols
import synthetic
import train

ROOT = Path(__file__).resolve().parents[1]


# ---- losses -------------------------------------------------------------------------------------
def test_pcc_loss_matches_a_loop_and_has_correct_gradients():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 4, generator=g, dtype=torch.float64)
    ref = 0.0
    for j in range(4):
        a, b = pred[:, j].tolist(), y[:, j].tolist()
        ma, mb = sum(a) / 9, sum(b) / 9
        cov = sum((ai - ma) * (bi - mb) for ai, bi in zip(a, b))
        va = sum((ai - ma) ** 2 for ai in a) ** 0.5
        vb = sum((bi - mb) ** 2 for bi in b) ** 0.5
        ref += cov / (va * vb) / 4
    assert train.pcc_loss(pred, y).item() == pytest.approx(1 - ref, rel=1e-6)
    assert torch.autograd.gradcheck(lambda p: train.pcc_loss(p, y), (pred,))


def test_pcc_loss_gradient_is_finite_for_constant_columns():
    pred = torch.randn(6, 3, dtype=torch.float64)
    pred[:, 1] = 0.7                                  # e.g. a gene that no pathway reaches
    pred.requires_grad_(True)
    y = torch.randn(6, 3, dtype=torch.float64)
    y[:, 2] = 0.0                                     # a gene absent from the slide
    loss = train.pcc_loss(pred, y)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    a = [train.pearson_per_column(pred[:, [j]], y[:, [j]]).item() for j in range(3)]
    assert abs(a[1]) < 1e-9 and abs(a[2]) < 1e-9


def zinb_pmf(x, mu, theta, pi):
    """ZINB probability mass written out with lgamma, in plain Python."""
    log_nb = (math.lgamma(x + theta) - math.lgamma(theta) - math.lgamma(x + 1)
              + theta * math.log(theta / (theta + mu)) + x * math.log(mu / (theta + mu)))
    nb = math.exp(log_nb)
    return pi + (1 - pi) * nb if x == 0 else (1 - pi) * nb


@pytest.mark.parametrize("x,mu,theta,pi", [(0, 2.0, 1.5, 0.3), (3, 2.0, 1.5, 0.3), (0, 0.1, 10.0, 0.01),
                                           (17, 9.5, 0.7, 0.6), (1, 50.0, 3.0, 0.05)])
def test_zinb_nll_equals_the_pmf(x, mu, theta, pi):
    t = lambda v: torch.tensor([[float(v)]], dtype=torch.float64)
    logit = math.log(pi / (1 - pi))
    nll = train.zinb_nll(t(x), t(mu), t(theta), t(logit)).item()
    assert nll == pytest.approx(-math.log(zinb_pmf(x, mu, theta, pi)), rel=1e-6)


def test_pathway_loss_against_explicit_reference():
    g = np.random.default_rng(0)
    y = g.normal(size=(20, 5))
    scores = g.normal(size=(20, 3))
    member = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=float)
    z = (y - y.mean(0)) / y.std(0)
    pccs = []
    for p in (0, 2):  # pathway 1 has no member gene and is skipped
        act = np.array([np.mean([z[n, gi] for gi in range(5) if member[p, gi]]) for n in range(20)])
        pccs.append(np.corrcoef(scores[:, p], act)[0, 1])
    loss = train.pathway_loss(torch.tensor(scores), torch.tensor(y), torch.tensor(member))
    assert loss.item() == pytest.approx(1 - np.mean(pccs), rel=1e-5)


def test_schedules():
    total, warm = 100, 10
    lrs = [train.lr_factor(s, total, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert train.lr_factor(total, total, warm) == pytest.approx(0.0)
    aug = {"start": 1.0, "end": 0.2}
    assert train.aug_strength(0, 50, aug) == pytest.approx(1.0)
    assert train.aug_strength(49, 50, aug) == pytest.approx(0.2)


# ---- config -------------------------------------------------------------------------------------
def test_unknown_keys_are_refused_with_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochz: 3}\n")
    with pytest.raises(SystemExit, match="epochs"):
        train.load_config(bad)
    with pytest.raises(SystemExit, match="valid keys"):
        train.load_config(ROOT / "configs/default.yaml", ["model.dimm=3"])
    with pytest.raises(SystemExit, match="normalize"):
        train.load_config(ROOT / "configs/default.yaml", ["train.loss=zinb", "model.head=zinb"])
    with pytest.raises(SystemExit, match="go together"):
        train.load_config(ROOT / "configs/default.yaml", ["train.loss=zinb"])
    cfg = train.load_config(ROOT / "configs/default.yaml", ["train.epochs=7", "data.genes={by: mean, n: 5}"])
    assert cfg["train"]["epochs"] == 7 and cfg["data"]["genes"] == {"by": "mean", "n": 5}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.make_synthetic(root, n_slides=4, seed=0, n_spots=250, pseudo=True)
    return root


CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_trains_and_its_loss_decreases(name, tiny_root):
    cfg = train.load_config(ROOT / "configs" / name, [f"data.root={tiny_root}"])
    if cfg["data"]["gmt"]:
        cfg["data"]["gmt"] = str(tiny_root / "programs.gmt")
    cfg["data"]["genes"] = {"by": "hvg", "n": 40}
    cfg["model"]["dropout"] = 0.0
    from model import ModelConfig, build_model
    mc = ModelConfig.from_dict(cfg["model"])
    slide = data.read_slide(data.list_slides(tiny_root)[0])
    genes = train.choose_genes(cfg, [slide], tiny_root)
    slide = data.read_slide(data.list_slides(tiny_root)[0], genes=genes)
    b = train.prepare(slide, cfg, mc.unit_um)
    torch.manual_seed(0)
    model = build_model(mc, slide.features.shape[1], len(genes))
    model.init_from_data(b["features"].mean(0), b["features"].std(0), b["target"].mean(0),
                         train.membership(cfg, genes, mc.pathway_tokens))
    if mc.arch in ("ridge", "ridge_spatial"):
        before = torch.nn.functional.mse_loss(model(b["features"], b["coords"])["pred"], b["target"])
        model.fit(b["features"], b["target"]) if mc.arch == "ridge" else model.fit_slides([b])
        after = torch.nn.functional.mse_loss(model(b["features"], b["coords"])["pred"], b["target"])
        assert after < before
        return
    opt = torch.optim.AdamW(model.parameters(), lr=max(cfg["train"]["lr"], 3e-4))
    losses = []
    for _ in range(8):
        out = train.forward(model, b, torch.device("cpu"))
        loss = train.compute_loss(out, b, cfg, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_validation_slides_keep_the_best_epoch(tiny_root, tmp_path, monkeypatch):
    """train.val_slides: after every epoch the validation slides are scored (pcc_gene), and the fold ends
    with the weights of the best-scoring epoch, not the last. Scores are scripted: best at epoch 2."""
    cfg = train.load_config(ROOT / "configs/default.yaml", [f"data.root={tiny_root}", "train.epochs=4",
                                                               "model.dim=16", "model.heads=2"])
    from model import ModelConfig, build_model
    mc = ModelConfig.from_dict(cfg["model"])
    slides = [data.read_slide(p) for p in data.list_slides(tiny_root)[:3]]
    genes = train.choose_genes({**cfg, "data": {**cfg["data"], "genes": {"by": "mean", "n": 20}}}, slides, tiny_root)
    batches = [train.prepare(data.read_slide(p, genes=genes), cfg, mc.unit_um) for p in data.list_slides(tiny_root)[:3]]
    torch.manual_seed(0)
    model = build_model(mc, batches[0]["features"].shape[1], len(genes))
    scores, states = iter([0.1, 0.7, 0.3, 0.2]), []

    def scripted(pred, true):  # called once per epoch, after that epoch's training
        assert pred.shape == true.shape == (batches[2]["target"].shape[0], len(genes))
        states.append({n: t.clone() for n, t in model.state_dict().items()})
        return next(scores)
    monkeypatch.setattr(train.evaluation, "pcc_gene", scripted)
    lines = []
    train.train_fold(0, batches[:2], batches[2:], cfg, model, torch.device("cpu"), tmp_path, lines.append, lambda: "")
    assert len(states) == 4 and all("val_pcc_gene" in line for line in lines)
    for name, t in model.state_dict().items():
        assert torch.equal(t, states[1][name]), name
    assert not all(torch.equal(t, states[3][n]) for n, t in model.state_dict().items())


# ---- coordinate augmentation ----------------------------------------------------------------------

def pairwise(xy):
    return torch.cdist(xy.double(), xy.double())


def test_augment_coords():
    xy = torch.rand(300, 2) * 5000
    keep, out = train.augment_coords(xy, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(keep, torch.arange(300)) and torch.equal(out, xy)
    angles = set()
    for seed in range(8):     # mirror and rotation only: distances and the centroid are preserved
        keep, out = train.augment_coords(xy, 1.0, torch.Generator().manual_seed(seed), p_drop=0.0, max_shear_deg=0)
        assert len(keep) == 300 and torch.allclose(pairwise(out), pairwise(xy), atol=0.05)
        assert torch.allclose(out.mean(0), xy.mean(0), atol=0.05)
        v0, v1 = xy[1] - xy[0], out[1] - out[0]
        angles.add(round(math.degrees(math.atan2(v1[1], v1[0]) - math.atan2(v0[1], v0[0])) % 360 / 45))
    assert len(angles) > 2
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = train.augment_coords(xy, 0.7, g1), train.augment_coords(xy, 0.7, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    keep, out = train.augment_coords(xy, 1.0, torch.Generator().manual_seed(1), max_rot_deg=0, max_shear_deg=15)
    assert keep.dtype == torch.long and out.shape == (len(keep), 2) and 150 < len(keep) < 300
    assert torch.equal(keep, keep.sort().values)
    sheared = [not torch.allclose(pairwise(train.augment_coords(xy, 1.0, torch.Generator().manual_seed(s), p_drop=0)[1]),
                                  pairwise(xy), atol=0.05) for s in range(4)]
    assert any(sheared)
    keep, out = train.augment_coords(xy[:3], 1.0, torch.Generator().manual_seed(0), p_drop=1.0)
    assert len(keep) == 1 and out.shape == (1, 2)


# ---- end to end -----------------------------------------------------------------------------------
def run_train(args, cwd, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, **kw)


TINY = ["data.folds=2", "data.genes={by: hvg, n: 30}", "model.dim=16", "model.heads=2", "model.pathway_tokens=4",
        "train.epochs=2"]


@pytest.mark.slow
def test_train_end_to_end_writes_the_run(tiny_root, tmp_path):
    r = run_train([str(ROOT / "configs/default.yaml"), f"data.root={tiny_root}",
                   f"data.gmt={tiny_root / 'programs.gmt'}", "run.name=e2e", *TINY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "e2e"
    assert "fold 0 epoch 2/2" in r.stdout and "pcc_gene" in r.stdout
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2
    res = json.loads((run / "results.json").read_text())
    assert len(res["metrics"]["pcc_gene"]["folds"]) == 2
    predicted = []
    for k in (0, 1):
        assert (run / f"fold_{k}" / "model.pt").exists()
        predicted += [p.name for p in (run / f"fold_{k}" / "pred").glob("*.h5")]
    assert sorted(predicted) == sorted(p.name for p in data.list_slides(tiny_root))  # each slide tested once
    assert (run / "per_gene.csv").read_text().count("\n") >= 31
    # an existing run is never overwritten without --resume
    again = run_train([str(ROOT / "configs/default.yaml"), f"data.root={tiny_root}",
                       f"data.gmt={tiny_root / 'programs.gmt'}", "run.name=e2e", *TINY], cwd=tmp_path)
    assert again.returncode != 0 and "--resume" in again.stderr


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(tiny_root, tmp_path):
    args = [str(ROOT / "configs/default.yaml"), f"data.root={tiny_root}", f"data.gmt={tiny_root / 'programs.gmt'}",
            *TINY, "train.epochs=3"]
    full = run_train([*args, "run.name=full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "run.name=killed"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill it as soon as the first epoch of fold 1 is done
        if line.startswith("fold 1 epoch 1/3"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "killed"
    assert (run / "fold_0" / "done").exists() and not (run / "results.json").exists()
    resumed = run_train([*args, "run.name=killed", "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "fold 0: finished earlier, skipped" in resumed.stdout and "resumed after epoch 1" in resumed.stdout
    a = json.loads((tmp_path / "runs/full/results.json").read_text())["metrics"]
    b = json.loads((run / "results.json").read_text())["metrics"]
    for metric in a:
        np.testing.assert_allclose(a[metric]["folds"], b[metric]["folds"], rtol=1e-5, atol=1e-6)


def test_bad_split_ids_and_gene_lists_stop_before_training(tiny_root, tmp_path):
    ids = [p.stem for p in data.list_slides(tiny_root)]
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_0.csv").write_text("sample_id\n" + "".join(f"{s}\n" for s in ids[:2]) + "NOPE1\nNOPE2\n")
    (splits / "test_0.csv").write_text("sample_id\n" + "".join(f"{s}\n" for s in ids[2:]))
    r = run_train([str(ROOT / "configs/mlp.yaml"), f"data.root={tiny_root}", f"data.split_dir={splits}",
                   "run.name=bad-split", *TINY], cwd=tmp_path)
    assert r.returncode != 0
    assert (f"{splits / 'train_0.csv'}: key 'data.split_dir': expected a cache <id>.h5 in {tiny_root} for every "
            "sample id, found none for 2: NOPE1, NOPE2") == r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs" / "bad-split" / "fold_0").exists()
    (tmp_path / "genes.json").write_text(json.dumps({"genes": ["G000", "G001", "NOT_A_GENE"]}))
    r = run_train([str(ROOT / "configs/mlp.yaml"), f"data.root={tiny_root}", f"data.genes={tmp_path / 'genes.json'}",
                   "run.name=bad-genes", "data.folds=2"], cwd=tmp_path)
    assert r.returncode != 0 and not (tmp_path / "runs" / "bad-genes" / "fold_0").exists()
    assert (f"{tmp_path / 'genes.json'}: key 'data.genes': expected genes the slides have, found 1 missing from "
            f"{tiny_root / (ids[0] + '.h5')}: NOT_A_GENE") in r.stderr


def test_slide_targets_smooth_on_the_spot_array():
    r = np.random.default_rng(0)
    sites = r.choice(15 * 15, 80, replace=False)
    grid = np.stack([sites % 15, sites // 15], 1)                     # x, y array positions
    counts = torch.from_numpy(r.poisson(3.0, (80, 12)).astype(np.float32))
    coords = torch.from_numpy(grid * 200.0 + 1000 + r.normal(0, 15, (80, 2))).float()   # legacy ST, jittered
    slide = data.Slide("s", torch.zeros(80, 3), coords, np.array([f"b{i}" for i in range(80)]), spot_pitch_um=200.0,
                       counts=counts, genes=[f"g{j}" for j in range(12)], library_size=counts.sum(1) + 7)
    cfg = train.load_config(ROOT / "configs/feast.yaml", ["data.smooth=null"])
    y = data.log_targets(counts, slide.library_size, normalize=True)
    assert torch.equal(train.slide_targets(slide, cfg), y)
    cfg = train.load_config(ROOT / "configs/feast.yaml", ["data.smooth.rescale=false"])
    assert cfg["data"]["smooth"]["tau_p"] == 16 and cfg["data"]["smooth"]["alpha"] == 0.6
    np.testing.assert_allclose(train.slide_targets(slide, cfg).numpy(), protocols.spcs(y.numpy(), grid), rtol=1e-5, atol=1e-6)
    cfg = train.load_config(ROOT / "configs/feast.yaml")                # MERGE's spcs_to_8n labels
    t = train.slide_targets(slide, cfg).numpy()
    ln = y.numpy() / math.log(10)
    eight = np.stack([ln[np.abs(grid - grid[i]).max(1) <= 1].mean(0) for i in range(80)])
    np.testing.assert_allclose(t.min(0), eight.min(), rtol=1e-5)
    np.testing.assert_allclose(t.max(0), eight.max(), rtol=1e-5)
    with pytest.raises(SystemExit, match=r"unknown config key 'data\.smooth\.tau'"):
        train.load_config(ROOT / "configs/feast.yaml", ["data.smooth.tau=3"])
    with pytest.raises(SystemExit, match=r"key 'data.smooth.tau_s': expected an integer >= 1, found 0"):
        train.load_config(ROOT / "configs/default.yaml", ["data.smooth={tau_s: 0}"])
    assert train.load_config(ROOT / "configs/default.yaml", ["data.smooth={beta: 0.5}"])["data"]["smooth"] == \
        {**protocols.SMOOTH, "beta": 0.5}
    with pytest.raises(SystemExit, match=r"key 'data.group': expected a string \(one of patient, slide\), found 'donor'"):
        train.load_config(ROOT / "configs/feast.yaml", ["data.group=donor"])

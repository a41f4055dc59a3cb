"""train.py: schedules, config handling, end-to-end runs and --resume."""
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
import files
import lattice
import losses
import protocols
import synthetic
import train

ROOT = Path(__file__).resolve().parents[1]


# ---- schedules ----------------------------------------------------------------------------------
def test_schedules():
    total, warm = 100, 10
    lrs = [train.lr_factor(s, total, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert train.lr_factor(total, total, warm) == pytest.approx(0.0)


# ---- config -------------------------------------------------------------------------------------
def test_the_optimizer_and_clipping_are_adamw_and_clip_grad_norm_written_out():
    """train.adamw (fused where torch has it) and train.clip_gradients (foreach) against AdamW's
    update written out (Loshchilov & Hutter: decoupled decay) and the global-norm clip, 3 steps."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 7, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    want = [p.detach().clone() for p in params]
    m, v = [torch.zeros_like(w) for w in want], [torch.zeros_like(w) for w in want]
    lr, wd, (b1, b2), eps, clip = 1e-2, 1e-2, (0.9, 0.999), 1e-8, 1.0
    opt = train.adamw(params, lr, wd)
    for step in range(1, 4):
        grads = [torch.randn(s, generator=g) * 2 for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        norm = train.clip_gradients(params, clip)
        total = math.sqrt(sum(float((gr ** 2).sum()) for gr in grads))
        assert float(norm) == pytest.approx(total, rel=1e-6)
        scale = min(1.0, clip / (total + 1e-6))
        for p, gr in zip(params, grads):
            torch.testing.assert_close(p.grad, gr * scale)
        opt.step()
        for i, gr in enumerate(grads):
            gr = gr * scale
            want[i] = want[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr * gr
            m_hat, v_hat = m[i] / (1 - b1 ** step), v[i] / (1 - b2 ** step)
            want[i] = want[i] - lr * m_hat / (v_hat.sqrt() + eps)
        for p, w in zip(params, want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


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
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            ["train.epochs=7", "data.genes={by: mean, n: 5}"])
    assert cfg["train"]["epochs"] == 7 and cfg["data"]["genes"] == {"by": "mean", "n": 5}


@pytest.mark.parametrize("overrides, match", [
    (["model.out_levels=[0, 3]"], r"model\.out_levels = \[0, 3\].*\[0, 2\]"),
    (["model.out_levels=[-1, 0]"], r"model\.out_levels.*\[0, 2\]"),
    (["model.sub_levels=1", "model.out_levels=[-2, 0]"], r"model\.out_levels.*\[-1, 2\]"),
    (["model.out_levels=[1]"], r"0 among"),
    (["model.sub_levels=3"], r"model\.sub_levels = 3"),
    (["model.sub_pool=max"], r"model\.sub_pool"),
    (["model.out_levels=[0, 1]", "data.normalize=true"], r"data\.normalize=false"),
    (["model.out_levels=[0, 1]", "train.level_weights=[1.0]"], r"train\.level_weights"),
    (["train.align_lambda=1.0"], r"train\.align_lambda needs model\.sub_levels"),
])
def test_level_config_errors_name_the_key(overrides, match):
    with pytest.raises(SystemExit, match=match):
        train.load_config(ROOT / "configs/default.yaml", overrides)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.make_synthetic(root, n_slides=4, seed=0, n_spots=250, pseudo=True)
    return root


@pytest.fixture(scope="module")
def tiny_sub_root(tmp_path_factory):
    """Square slides with r x r sub-spots (synthetic --sub r), made on first use for r = 2 or 4."""
    roots = {}

    def get(r):
        if r not in roots:
            roots[r] = tmp_path_factory.mktemp(f"synth_sub{r}")
            synthetic.make_synthetic(roots[r], n_slides=4, seed=0, n_spots=240 // r,
                                     layout="square", sub=r, log=lambda s: None)
        return roots[r]
    return get


CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_trains_and_its_loss_decreases(name, tiny_root, tiny_sub_root):
    sub_levels = train.load_config(ROOT / "configs" / name)["model"]["sub_levels"]
    if sub_levels:  # HiFusion-like configs read sub-patch features
        tiny_root = tiny_sub_root(2 ** sub_levels)
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
        before = torch.nn.functional.mse_loss(model(b["features"], b["coords"])["pred"],
                                              b["target"])
        model.fit(b["features"], b["target"]) if mc.arch == "ridge" else model.fit_slides([b])
        after = torch.nn.functional.mse_loss(model(b["features"], b["coords"])["pred"], b["target"])
        assert after < before
        return
    opt = torch.optim.AdamW(model.parameters(), lr=max(cfg["train"]["lr"], 3e-4))
    history = []
    for _ in range(8):
        out = train.forward(model, b, torch.device("cpu"))
        loss = losses.compute_loss(out, b, cfg, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert np.mean(history[-2:]) < np.mean(history[:2]), history


def test_validation_slides_keep_the_best_epoch(tiny_root, tmp_path, monkeypatch):
    """train.val_slides: after every epoch the validation slides are scored (pcc_gene), and the fold
    ends with the weights of the best-scoring epoch, not the last. Scores are scripted: best at
    epoch 2."""
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [f"data.root={tiny_root}", "train.epochs=4",
                             "model.dim=16", "model.heads=2"])
    from model import ModelConfig, build_model
    mc = ModelConfig.from_dict(cfg["model"])
    slides = [data.read_slide(p) for p in data.list_slides(tiny_root)[:3]]
    genes = train.choose_genes({**cfg, "data": {**cfg["data"], "genes": {"by": "mean", "n": 20}}},
                               slides, tiny_root)
    batches = [train.prepare(data.read_slide(p, genes=genes), cfg, mc.unit_um)
               for p in data.list_slides(tiny_root)[:3]]
    torch.manual_seed(0)
    model = build_model(mc, batches[0]["features"].shape[1], len(genes))
    scores, states = iter([0.1, 0.7, 0.3, 0.2]), []

    def scripted(pred, true):  # called once per epoch, after that epoch's training
        assert pred.shape == true.shape == (batches[2]["target"].shape[0], len(genes))
        states.append({n: t.clone() for n, t in model.state_dict().items()})
        return next(scores)
    monkeypatch.setattr(train.evaluation, "pcc_gene", scripted)
    lines = []
    train.train_fold(0, batches[:2], batches[2:], cfg, model, torch.device("cpu"), tmp_path,
                     lines.append)
    assert len(states) == 4 and all("val_pcc_gene" in line for line in lines)
    for name, t in model.state_dict().items():
        assert torch.equal(t, states[1][name]), name
    assert not all(torch.equal(t, states[3][n]) for n, t in model.state_dict().items())


def test_with_a_spatial_start_the_start_itself_is_a_validation_candidate(tiny_root, tmp_path,
                                                                         monkeypatch):
    """With model.spatial_start, the closed-form start (the network's residual still zero) is scored
    before the first epoch; when no epoch beats it on the validation slides, the fold ends at the
    start: its prediction is the spatial ridge's. Scores are scripted: the start 0.9, every epoch
    less."""
    cfg = train.load_config(ROOT / "configs/tessera.yaml",
                            [f"data.root={tiny_root}", "train.epochs=3", "model.dim=16",
                             "model.heads=2", "data.genes={by: mean, n: 20}"])
    from model import ModelConfig, build_model
    mc = ModelConfig.from_dict(cfg["model"])
    slides = [data.read_slide(p) for p in data.list_slides(tiny_root)[:3]]
    genes = train.choose_genes(cfg, slides, tiny_root)
    batches = [train.prepare(data.read_slide(p, genes=genes), cfg, mc.unit_um)
               for p in data.list_slides(tiny_root)[:3]]
    torch.manual_seed(0)
    feats = torch.cat([b["features"] for b in batches[:2]])
    model = build_model(mc, feats.shape[1], len(genes))
    model.init_from_data(feats.mean(0), feats.std(0),
                         torch.cat([b["target"] for b in batches[:2]]).mean(0))
    model.fit_slides(batches[:2])
    with torch.no_grad():
        ridge = model.start(batches[2]["features"], batches[2]["coords"])["pred"]
    scores = iter([0.9, 0.1, 0.5, 0.2])
    monkeypatch.setattr(train.evaluation, "pcc_gene", lambda pred, true: next(scores))
    lines = []
    train.train_fold(0, batches[:2], batches[2:], cfg, model, torch.device("cpu"), tmp_path,
                     lines.append)
    assert (lines[0].startswith("fold 0 epoch 0 (the spatial ridge alone) val_pcc_gene 0.9000")
            and len(lines) == 4)
    # the residual's head: zero
    assert all(float(p.detach().abs().max()) == 0 for p in model.net.head.start().parameters())
    model.eval()
    with torch.no_grad():
        got = model(batches[2]["features"], batches[2]["coords"], unit=batches[2]["unit"])["pred"]
    torch.testing.assert_close(got, ridge)


def test_validation_and_calibration_hold_out_whole_patients_when_folds_group_by_patient():
    """conformal.held_out: calibration first (the last eval.calibration_slides and their patients),
    then validation from the rest (the last train.val_slides and their patients, unless fewer than
    half of the slides would be left to train on, when the slides alone validate)."""
    from types import SimpleNamespace
    from conformal import held_out
    slides = [SimpleNamespace(slide_id=n, patient=n[0])
              for n in ["A1", "A2", "B1", "C1", "C2", "D1", "D2", "D3"]]
    names = lambda part: [s.slide_id for s in part]                                  # noqa: E731
    cfg = lambda group, v, c: {"data": {"group": group}, "train": {"val_slides": v},   # noqa: E731
                               "eval": {"calibration_slides": c}}
    assert [names(p) for p in held_out(slides, cfg("patient", 1, 1))] == \
        [["A1", "A2", "B1"], ["C1", "C2"], ["D1", "D2", "D3"]]
    assert [names(p) for p in held_out(slides, cfg("slide", 1, 1))] == \
        [["A1", "A2", "B1", "C1", "C2", "D1"], ["D2"], ["D3"]]
    assert [names(p) for p in held_out(slides, cfg("patient", 1, 0))] == \
        [["A1", "A2", "B1", "C1", "C2"], ["D1", "D2", "D3"], []]
    # patient D would leave 2 of 5 slides to train on: slide D3 alone validates
    assert ([names(p) for p in held_out(slides[3:], cfg("patient", 1, 0))]
            == [["C1", "C2", "D1", "D2"], ["D3"], []])
    assert [names(p) for p in held_out(slides, cfg("patient", 0, 0))] == [names(slides), [], []]
    # auto: a whole patient where 3 or more patients
    # train the fold (after calibration), else nothing
    assert [names(p) for p in held_out(slides, cfg("patient", "auto", 0))] == \
        [["A1", "A2", "B1", "C1", "C2"], ["D1", "D2", "D3"], []]
    assert [names(p) for p in held_out(slides, cfg("patient", "auto", 1))] == \
        [["A1", "A2", "B1"], ["C1", "C2"], ["D1", "D2", "D3"]]
    assert ([names(p) for p in held_out(slides[3:], cfg("patient", "auto", 0))]
            == [names(slides[3:]), [], []])
    assert [names(p) for p in held_out(slides, cfg("slide", "auto", 0))] == [names(slides), [], []]


# ---- coordinate augmentation ---------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_runs_under_bf16_autocast(name, tiny_root, tiny_sub_root):
    """train.forward and predict.py run the model under bf16 autocast on CUDA; the CPU's bf16
    autocast casts the same kinds of ops (products to bf16, in-place ops left alone), so a dtype
    mismatch shows here without a GPU. Outputs within 3e-2 (relative, Frobenius) of float32, the
    backward runs and every gradient is finite (the tolerances on a GPU: tests/test_cuda.py)."""
    sub_levels = train.load_config(ROOT / "configs" / name)["model"]["sub_levels"]
    root = tiny_sub_root(2 ** sub_levels) if sub_levels else tiny_root
    cfg = train.load_config(ROOT / "configs" / name,
                            [f"data.root={root}", "data.genes={by: hvg, n: 20}",
                             "model.dim=16", "model.hidden=16", "model.pca=8"])
    from model import ModelConfig, build_model
    mc = ModelConfig.from_dict(cfg["model"])
    slide = data.read_slide(data.list_slides(root)[0])
    b = train.prepare(data.read_slide(data.list_slides(root)[0], genes=slide.genes[:20]),
                      cfg, mc.unit_um)
    torch.manual_seed(0)
    model = build_model(mc, slide.features.shape[1], 20).eval()         # eval: no dropout; grad on
    feats = b["features"].float()
    model.init_from_data(feats.mean(0), feats.std(0), b["target"].mean(0))
    if mc.arch == "ridge":
        model.fit(feats, b["target"])
    elif hasattr(model, "fit_slides"):
        model.fit_slides([b])
    ref = train.forward(model, b, torch.device("cpu"))["pred"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train.forward(model, b, torch.device("cpu"))
    pred = out["pred"].float()
    assert float((pred - ref).detach().norm() / ref.detach().norm()) <= 3e-2
    if any(p.requires_grad for p in model.parameters()):
        losses.compute_loss(out, b, cfg, model).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- end to end ----------------------------------------------------------------------------------
def run_train(args, cwd, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kw)


TINY = ["data.folds=2", "data.genes={by: hvg, n: 30}", "model.dim=16", "model.heads=2",
        "model.pathway_tokens=4", "train.epochs=2"]


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
    # each slide tested once
    assert sorted(predicted) == sorted(p.name for p in data.list_slides(tiny_root))
    assert (run / "per_gene.csv").read_text().count("\n") >= 31
    # an existing run is never overwritten without --resume
    again = run_train([str(ROOT / "configs/default.yaml"), f"data.root={tiny_root}",
                       f"data.gmt={tiny_root / 'programs.gmt'}", "run.name=e2e", *TINY],
                      cwd=tmp_path)
    assert again.returncode != 0 and "--resume" in again.stderr


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(tiny_root, tmp_path):
    args = [str(ROOT / "configs/default.yaml"), f"data.root={tiny_root}",
            f"data.gmt={tiny_root / 'programs.gmt'}", *TINY, "train.epochs=3"]
    full = run_train([*args, "run.name=full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "run.name=killed"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    assert ("fold 0: finished earlier, skipped" in resumed.stdout
            and "resumed after epoch 1" in resumed.stdout)
    assert ("fold_1/lock: took over the lock of pid" in resumed.stdout
            and not (run / "fold_1" / "lock").exists())
    a = json.loads((tmp_path / "runs/full/results.json").read_text())["metrics"]
    b = json.loads((run / "results.json").read_text())["metrics"]
    for metric in a:
        np.testing.assert_allclose(a[metric]["folds"], b[metric]["folds"], rtol=1e-5, atol=1e-6)


def test_bad_split_ids_and_gene_lists_stop_before_training(tiny_root, tmp_path):
    ids = [p.stem for p in data.list_slides(tiny_root)]
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_0.csv").write_text("sample_id\n" + "".join(f"{s}\n" for s in ids[:2])
                                        + "NOPE1\nNOPE2\n")
    (splits / "test_0.csv").write_text("sample_id\n" + "".join(f"{s}\n" for s in ids[2:]))
    r = run_train([str(ROOT / "configs/mlp.yaml"), f"data.root={tiny_root}",
                   f"data.split_dir={splits}", "run.name=bad-split", *TINY], cwd=tmp_path)
    assert r.returncode != 0
    assert ((f"{splits / 'train_0.csv'}: key 'data.split_dir': expected a cache <id>.h5 in "
             f"{tiny_root} for every sample id, found none for 2: NOPE1, NOPE2")
            == r.stderr.strip().splitlines()[-1])
    assert not (tmp_path / "runs" / "bad-split" / "fold_0").exists()
    (tmp_path / "genes.json").write_text(json.dumps({"genes": ["G000", "G001", "NOT_A_GENE"]}))
    r = run_train([str(ROOT / "configs/mlp.yaml"), f"data.root={tiny_root}",
                   f"data.genes={tmp_path / 'genes.json'}", "run.name=bad-genes", "data.folds=2"],
                  cwd=tmp_path)
    assert r.returncode != 0 and not (tmp_path / "runs" / "bad-genes" / "fold_0").exists()
    assert (f"{tmp_path / 'genes.json'}: key 'data.genes': expected genes the slides have, found 1 "
            f"missing from {tiny_root / (ids[0] + '.h5')}: NOT_A_GENE") in r.stderr


def test_slide_targets_smooth_on_the_spot_array():
    r = np.random.default_rng(0)
    sites = r.choice(15 * 15, 80, replace=False)
    grid = np.stack([sites % 15, sites // 15], 1)                     # x, y array positions
    counts = torch.from_numpy(r.poisson(3.0, (80, 12)).astype(np.float32))
    # legacy ST, jittered
    coords = torch.from_numpy(grid * 200.0 + 1000 + r.normal(0, 15, (80, 2))).float()
    slide = data.Slide("s", torch.zeros(80, 3), coords, np.array([f"b{i}" for i in range(80)]),
                       spot_pitch_um=200.0, counts=counts, genes=[f"g{j}" for j in range(12)],
                       library_size=counts.sum(1) + 7)
    cfg = train.load_config(ROOT / "configs/feast.yaml", ["data.smooth=null"])
    y = data.log_targets(counts, slide.library_size, normalize=True)
    assert torch.equal(train.slide_targets(slide, cfg), y)
    cfg = train.load_config(ROOT / "configs/feast.yaml", ["data.smooth.rescale=false"])
    assert cfg["data"]["smooth"]["tau_p"] == 16 and cfg["data"]["smooth"]["alpha"] == 0.6
    np.testing.assert_allclose(train.slide_targets(slide, cfg).numpy(),
                               protocols.spcs(y.numpy(), grid), rtol=1e-5, atol=1e-6)
    cfg = train.load_config(ROOT / "configs/feast.yaml")                # MERGE's spcs_to_8n labels
    t = train.slide_targets(slide, cfg).numpy()
    ln = y.numpy() / math.log(10)
    eight = np.stack([ln[np.abs(grid - grid[i]).max(1) <= 1].mean(0) for i in range(80)])
    np.testing.assert_allclose(t.min(0), eight.min(), rtol=1e-5)
    np.testing.assert_allclose(t.max(0), eight.max(), rtol=1e-5)
    with pytest.raises(SystemExit, match=r"unknown config key 'data\.smooth\.tau'"):
        train.load_config(ROOT / "configs/feast.yaml", ["data.smooth.tau=3"])
    with pytest.raises(SystemExit,
                       match=r"key 'data.smooth.tau_s': expected an integer >= 1, found 0"):
        train.load_config(ROOT / "configs/default.yaml", ["data.smooth={tau_s: 0}"])
    assert train.load_config(ROOT / "configs/default.yaml",
                             ["data.smooth={beta: 0.5}"])["data"]["smooth"] == \
        {**protocols.SMOOTH, "beta": 0.5}
    with pytest.raises(SystemExit, match=r"key 'data.group': expected a string \(one of patient, "
                                         r"slide\), found 'donor'"):
        train.load_config(ROOT / "configs/feast.yaml", ["data.group=donor"])


@pytest.mark.slow
def test_super_resolution_beats_copying_the_spot(tmp_path):
    """Trained on spot counts only, the sub-spot head must beat giving each sub-spot its spot's
    prediction (pcc_gene@-1_copy) on every fold of slides with sub-spot truth: the sub-patch
    features are read."""
    root = tmp_path / "sub"
    synthetic.make_synthetic(root, n_slides=4, seed=0, n_spots=300, layout="square", sub=2,
                             log=lambda s: None)
    r = run_train([str(ROOT / "configs/superres.yaml"), f"data.root={root}", "run.name=sr",
                   "data.folds=2", "data.genes={by: hvg, n: 50}", "model.dim=32", "train.epochs=30",
                   "run.threads=1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "runs" / "sr" / "results.json").read_text())["metrics"]
    gain = np.subtract(m["pcc_gene@-1"]["folds"], m["pcc_gene@-1_copy"]["folds"])
    assert len(gain) == 2 and (gain > 0.05).all(), gain


@pytest.mark.slow
def test_levels_end_to_end_train_evaluate_and_predict(tiny_sub_root, tmp_path):
    """superres.yaml on tiny 2 x 2 sub-spot slides, with a coarser head too: results per level with
    the copy baseline; predict.py writes every level of model.out_levels."""
    root = tiny_sub_root(2)
    r = run_train([str(ROOT / "configs/superres.yaml"), f"data.root={root}", "run.name=levels",
                   "data.folds=2", "data.genes={by: hvg, n: 20}", "model.dim=16", "model.heads=2",
                   "train.epochs=2", "model.out_levels=[-1, 0, 1]",
                   "train.level_weights=[1.0, 1.0, 0.5]", "train.consistency_lambda=0.5",
                   "train.align_lambda=0.5"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "runs" / "levels" / "results.json").read_text())
    for name in ("pcc_gene", "pcc_gene@-1", "mse@-1", "pcc_gene@-1_copy", "pcc_gene@1",
                 "r2_flat@1"):
        assert len(res["metrics"][name]["folds"]) == 2, name
    p = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--run",
                        "runs/levels", "--slides", str(root), "--out", "pred"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    slide = data.read_slide(data.list_slides(root)[0])
    f = files.read_predictions(tmp_path / "pred" / f"{slide.slide_id}.h5")
    assert sorted(f["levels"]) == [-1, 1]
    sub = f["levels"][-1]
    n_sub = int(slide.sub_valid.sum())
    assert sub["pred"].shape == (n_sub, len(f["genes"])) and sub["coords"].shape == (n_sub, 2)
    # (spot, s) order
    want = lattice.sub_coords(slide.coords, 2, slide.sub_extent_um)[slide.sub_valid]
    np.testing.assert_allclose(sub["coords"], want.numpy(), atol=1e-3)
    assert "copy" in sub  # and the truth where the slide has the run's genes
    assert "true" not in sub or sub["true"].shape == sub["pred"].shape
    fold = [files.read_predictions(q)
            for q in (tmp_path / "runs" / "levels").glob("fold_*/pred/*.h5")]
    assert all("true" in g["levels"][-1] and "true" in g["levels"][1] for g in fold)


# ---- non-finite training and a full disk --------------------------------------------------------
def fold_inputs(tiny_root, *overrides):
    cfg = train.load_config(ROOT / "configs/default.yaml",
                            [f"data.root={tiny_root}", "train.epochs=3",
                             "model.dim=16", "model.heads=2", *overrides])
    from model import ModelConfig, build_model
    mc = ModelConfig.from_dict(cfg["model"])
    paths = data.list_slides(tiny_root)[:2]
    genes = train.choose_genes({**cfg, "data": {**cfg["data"], "genes": {"by": "mean", "n": 10}}},
                               [data.read_slide(p) for p in paths], tiny_root)
    batches = [train.prepare(data.read_slide(p, genes=genes), cfg, mc.unit_um) for p in paths]
    torch.manual_seed(0)
    return cfg, build_model(mc, batches[0]["features"].shape[1], len(genes)), batches


class NanGradient(torch.autograd.Function):
    """The identity, whose gradient is NaN: a finite loss whose step leaves non-finite weights."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("bad_call, how, words", [
    (3, "nan loss", ["fold 0 epoch 2: the loss is nan", "last finite epoch loss", "at epoch 1"]),
    (4, "nan gradient", ["fold 0 epoch 2: the weights are no longer finite"]),
])
def test_a_non_finite_loss_stops_the_fold_and_keeps_the_last_good_checkpoint(
        tiny_root, tmp_path, monkeypatch,
        bad_call, how, words):
    """Two slides, so two steps per epoch: the scripted mistake comes in epoch 2 (its first step: a
    NaN loss; its last step: a finite loss whose gradient is NaN). Training stops with one message
    naming the fold, the epoch and the last finite loss; the checkpoint of epoch 1 stays, finite,
    and nothing later is saved."""
    cfg, model, batches = fold_inputs(tiny_root)
    calls = [0]

    def scripted(out, b, cfg, model):
        calls[0] += 1
        loss = losses.compute_loss(out, b, cfg, model)
        if calls[0] == bad_call:
            return loss * float("nan") if how == "nan loss" else NanGradient.apply(loss)
        return loss
    monkeypatch.setattr(train, "compute_loss", scripted)
    saved = []
    real_save = train.save_atomic
    monkeypatch.setattr(train, "save_atomic",
                        lambda obj, path: (saved.append(obj["epoch"]), real_save(obj, path)))
    with pytest.raises(train.Diverged) as e:
        train.train_fold(0, batches, [], cfg, model, torch.device("cpu"), tmp_path, lambda s: None)
    msg = str(e.value)
    for word in [*words, "checkpoint.pt kept", "train.lr"]:
        assert word in msg, (word, msg)
    assert saved == [0]                                    # epoch 1's checkpoint only
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(t).all() for t in state["model"].values()
                                       if t.is_floating_point())


def test_a_learning_rate_that_diverges_ends_the_run_with_one_line(tiny_root, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main([str(ROOT / "configs/default.yaml"), f"data.root={tiny_root}",
                    "run.name=lr", *TINY, "train.lr=1e6", "data.gmt=null"])
    msg = e.value.code
    assert (isinstance(msg, str) and "\n" not in msg and "fold 0 epoch" in msg
            and "train.lr (1000000.0)" in msg), msg
    print(msg)
    assert not list((tmp_path / "runs" / "lr").glob("fold_*/model.pt"))      # no NaN model saved


def test_a_full_disk_is_one_line_naming_the_file(tiny_root, tmp_path, monkeypatch):
    """torch.save (train's checkpoints and models, through data.atomic_path) runs out of space: one
    line '<file>: disk full', no partial file left, the old file untouched."""
    import errno

    def full(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(files.DiskFull, match=r"model\.pt: disk full"):
        train.save_atomic({"x": 1}, target)
    assert (target.read_bytes() == b"old"
            and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main([str(ROOT / "configs/default.yaml"), f"data.root={tiny_root}",
                    "run.name=full", *TINY, "data.gmt=null", "model.arch=ridge"])
    assert (isinstance(e.value.code, str)
            and e.value.code.endswith("model.pt: disk full (no space left on the "
                                      "device to write it)")), e.value.code

"""The spatial baseline, tessera's spatial start, per-slide standardisation, weight averaging and
the real-geometry accuracy benchmark, each against an independent reference written here."""
import numpy as np
import pytest
import torch

from baselines import neighbour_mean, radius_pairs
from model import ModelConfig, build_model

C, G = 5, 3


def grid_slide(n=9, pitch=200.0, seed=0, drop=0.2):
    """A jittered square grid with holes (legacy ST-like), features and targets, float32."""
    g = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    xy = np.stack([j.ravel(), i.ravel()], 1) * pitch + g.normal(scale=5.0, size=(n * n, 2))
    xy = xy[g.random(n * n) > drop]
    f = g.normal(size=(len(xy), C))
    y = g.normal(size=(len(xy), G)) + f[:, :G]
    return (torch.tensor(f, dtype=torch.float32), torch.tensor(xy, dtype=torch.float32),
            torch.tensor(y, dtype=torch.float32))


def ref_pitch(xy):
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.median(d.min(1))


def ref_neighbour_mean(x, xy, r):
    """Explicit loop over spot pairs."""
    out = np.empty_like(x)
    for a in range(len(x)):
        nb = [b for b in range(len(x)) if b != a and np.hypot(*(xy[a] - xy[b])) <= r]
        out[a] = x[nb].mean(0) if nb else x[a]
    return out


@pytest.mark.parametrize("radius", [0.5, 1.0, 2.3, 50.0])
def test_radius_pairs_are_exactly_the_pairs_within_the_radius(radius):
    g = np.random.default_rng(1)
    # with a duplicate
    xy = np.concatenate([g.uniform(0, 10, size=(150, 2)), [[3.0, 3.0], [3.0, 3.0]]])
    i, j = radius_pairs(torch.tensor(xy), radius)
    got = sorted(zip(i.tolist(), j.tolist()))
    ref = sorted((a, b) for a in range(len(xy)) for b in range(len(xy))
                 if a != b and np.hypot(*(xy[a] - xy[b])) <= radius)
    assert got == ref


@pytest.mark.parametrize("chunk", [7, 1 << 14])
def test_neighbour_mean_matches_an_explicit_loop(chunk, monkeypatch):
    import baselines
    monkeypatch.setattr(baselines, "CHUNK", chunk)       # many chunks of query spots, or one
    f, xy, _ = grid_slide(seed=2, drop=0.5)  # holes: some spots have no neighbour within 1 pitch
    for r in (150.0, 300.0, 600.0):
        np.testing.assert_allclose(neighbour_mean(f, xy, r).numpy(),
                                   ref_neighbour_mean(f.numpy().astype(np.float64),
                                                      xy.numpy().astype(np.float64), r),
                                   rtol=1e-5, atol=1e-5)


def ref_spatial_ridge(train, test, radii, alpha, slide_norm):
    """Independent spatial ridge: explicit neighbour loop, brute-force pitch, numpy lstsq with an
    unpenalised intercept ([X 1; sqrt(alpha) I 0] against [Y; 0])."""
    F = np.concatenate([f.numpy() for f, _, _ in train]).astype(np.float64)
    mean, std = F.mean(0), F.std(0, ddof=1)

    def design(f, xy):
        f, xy = f.numpy().astype(np.float64), xy.numpy().astype(np.float64)
        z = (f - f.mean(0)) / f.std(0) if slide_norm else (f - mean) / std
        p = ref_pitch(xy)
        return np.concatenate([z] + [ref_neighbour_mean(z, xy, r * p) for r in radii], 1)

    X = np.concatenate([design(f, xy) for f, xy, _ in train])
    Y = np.concatenate([y.numpy() for _, _, y in train]).astype(np.float64)
    D, G_ = X.shape[1], Y.shape[1]
    A = np.block([[X, np.ones((len(X), 1))], [np.sqrt(alpha) * np.eye(D), np.zeros((D, 1))]])
    W = np.linalg.lstsq(A, np.concatenate([Y, np.zeros((D, G_))]), rcond=None)[0]
    return np.concatenate([design(test[0], test[1]), np.ones((len(test[0]), 1))], 1) @ W


def fitted(cfg, train):
    feats = torch.cat([s[0] for s in train])
    m = build_model(cfg, C, G)
    m.init_from_data(feats.mean(0), feats.std(0), torch.cat([s[2] for s in train]).mean(0))
    m.fit_slides([{"features": f, "coords": xy, "target": y} for f, xy, y in train])
    return m.eval()


@pytest.mark.parametrize("slide_norm", [False, True])
@pytest.mark.parametrize("chunk", [1 << 14, 7])
def test_spatial_ridge_matches_explicit_neighbours_and_a_least_squares_solve(
        slide_norm, chunk, monkeypatch):
    """ridge_spatial: ridge with intercept on [z, mean z within r1 pitches, within r2 pitches], z
    the standardised features (training statistics, or the slide's own with slide_norm); predicted
    in one chunk of spots, or in chunks of 7 spots (and of 7 neighbour pairs)."""
    import baselines
    monkeypatch.setattr(baselines, "CHUNK", chunk)
    radii, alpha = [1.5, 3.0], 2.0
    slides = [grid_slide(seed=s) for s in range(3)]
    m = fitted(ModelConfig(arch="ridge_spatial", radii=radii, ridge_alpha=alpha,
                           slide_norm=slide_norm), slides[:2])
    ref = ref_spatial_ridge(slides[:2], slides[2], radii, alpha, slide_norm)
    np.testing.assert_allclose(m(slides[2][0], slides[2][1])["pred"].numpy(), ref,
                               rtol=1e-4, atol=1e-4)


TINY = dict(dim=8, heads=2, depths=[1, 1], decoder_depths=[1], dropout=0.0, attn_dropout=0.0, w=2,
            calibration_tokens=1, pathway_tokens=0)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_spatial_start_begins_at_the_spatial_ridge_and_then_learns_a_residual(head):
    radii, alpha = [1.5], 1.0
    slides = [grid_slide(seed=s) for s in range(3)]
    m = fitted(ModelConfig(spatial_start=True, slide_norm=True, radii=radii, ridge_alpha=alpha,
                           head=head, **TINY),
               slides[:2])
    ref = ref_spatial_ridge(slides[:2], slides[2], radii, alpha, slide_norm=True)
    with torch.no_grad():
        np.testing.assert_allclose(m(slides[2][0], slides[2][1])["pred"].numpy(), ref,
                                   rtol=1e-4, atol=1e-4)
    # the network's head gets a gradient at once; the frozen ridge is a buffer, not a parameter
    m.train()
    f, xy, y = slides[0]
    torch.nn.functional.mse_loss(m(f, xy)["pred"], y).backward()
    assert m.net.head.start().weight.grad.abs().sum() > 0
    assert all(not n.startswith("start.") for n, _ in m.named_parameters())


def test_spatial_start_is_the_ridge_plus_the_network_on_slide_standardised_spots_and_sub_patches(
        monkeypatch):
    """spatial_start + slide_norm with a sub-spot level: prediction = the spatial ridge (reference
    above) + the plain network on spot and sub-patch features standardised by the slide's spot
    statistics (numpy), in inference (chunks of 7 rows, the ridge added in place) as with grad."""
    import baselines
    import kernels
    radii, alpha = [1.5], 1.0
    slides = [grid_slide(seed=s) for s in range(3)]
    cfg = dict(TINY, sub_levels=1, coarse_attention="same")
    m = fitted(ModelConfig(spatial_start=True, slide_norm=True, radii=radii, ridge_alpha=alpha,
                           **cfg), slides[:2])
    with torch.no_grad():
        for p in m.net.parameters():                                  # a residual that is not zero
            p.add_(0.1 * torch.randn_like(p))
    plain = build_model(ModelConfig(**cfg), C, G).eval()
    plain.load_state_dict(m.net.state_dict())
    plain.feat_mean.zero_()
    plain.feat_std.fill_(1.0)
    f, xy, _ = slides[2]
    sub = f[:, None] + torch.randn(len(f), 4, C, generator=torch.Generator().manual_seed(0))
    F = f.numpy().astype(np.float64)
    mean, std = F.mean(0), F.std(0)
    z = torch.tensor((F - mean) / std, dtype=torch.float32)
    zs = torch.tensor((sub.numpy() - mean) / std, dtype=torch.float32)
    with torch.no_grad():
        want = ref_spatial_ridge(slides[:2], slides[2], radii, alpha, True) + \
            plain(z, xy, sub_features=zs)["pred"].numpy()
    with_grad = m(f, xy, sub_features=sub)["pred"]
    assert with_grad.requires_grad
    np.testing.assert_allclose(with_grad.detach().numpy(), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(baselines, "CHUNK", 7)
    monkeypatch.setattr(kernels, "CHUNK", 7)
    with torch.no_grad():
        np.testing.assert_allclose(m(f, xy, sub_features=sub)["pred"].numpy(), want,
                                   rtol=1e-4, atol=1e-4)


def test_slide_norm_is_the_plain_network_on_slide_standardised_features():
    """slide_norm: the network sees (f - slide mean) / slide std (numpy here); a per-channel affine
    stain shift of a slide's features then leaves its prediction unchanged."""
    f, xy, _ = grid_slide(seed=4)
    torch.manual_seed(0)
    m = build_model(ModelConfig(slide_norm=True, **TINY), C, G).eval()
    # ignored: the slide's own statistics
    m.init_from_data(f.mean(0) + 3, f.std(0) * 2, torch.zeros(G))
    plain = build_model(ModelConfig(**TINY), C, G).eval()
    plain.load_state_dict(m.net.state_dict())
    F = f.numpy().astype(np.float64)
    z = torch.tensor((F - F.mean(0)) / F.std(0), dtype=torch.float32)
    with torch.no_grad():
        out = m(f, xy)["pred"]
        torch.testing.assert_close(out, plain(z, xy)["pred"], rtol=1e-4, atol=1e-4)
        stained = f * torch.linspace(0.5, 2.0, C) + torch.arange(C) * 0.7
        torch.testing.assert_close(m(stained, xy)["pred"], out, rtol=1e-4, atol=1e-4)


def test_ema_keeps_the_moving_average_of_every_step(tmp_path):
    """train.ema: the fold ends with avg_t = d_t avg_(t-1) + (1 - d_t) w_t over the weights after
    every optimiser step, d_t = min(decay, (1 + t) / (10 + t)), avg_(-1) = the initial weights
    (reference: a plain loop over weights recorded by an optimiser hook)."""
    import train
    cfg = train.load_config(train.DEFAULT_CONFIG, ["train.epochs=2", "train.ema=0.8", "model.dim=8",
                                                   "model.heads=2", "model.pathway_tokens=0",
                                                   "data.gmt=null"])
    slides = [grid_slide(seed=s) for s in range(3)]
    batches = [{"features": f, "coords": xy, "target": y, "unit": None} for f, xy, y in slides]
    torch.manual_seed(0)
    m = build_model(ModelConfig.from_dict(cfg["model"]), C, G)
    initial = {n: t.detach().clone().double() for n, t in m.state_dict().items()}
    seen = []
    orig_init = torch.optim.AdamW.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        self.register_step_post_hook(lambda opt, args, kwargs: seen.append(
            {n: t.detach().clone().double() for n, t in m.state_dict().items()}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "__init__", init)
        train.train_fold(0, batches, [], cfg, m, torch.device("cpu"), tmp_path, lambda line: None)
    assert len(seen) == 6
    avg = initial
    for t, w in enumerate(seen):
        d = min(0.8, (1 + t) / (10 + t))
        avg = {n: d * avg[n] + (1 - d) * w[n] for n in avg}
    for n, value in m.state_dict().items():
        np.testing.assert_allclose(value.double().numpy(), avg[n].numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=n)
    # not the last step
    assert not torch.allclose(m.state_dict()["head.weight"], seen[-1]["head.weight"].float())


# ---- the real-geometry accuracy benchmark --------------------------------------------------------
def test_accuracy_benchmark_skips_cleanly_without_the_data(tmp_path, capsys):
    import bench_accuracy
    assert bench_accuracy.main(["--her2st", str(tmp_path / "absent"), "--out",
                                str(tmp_path / "out")]) is None
    assert "skipping" in capsys.readouterr().out


@pytest.mark.slow
def test_accuracy_benchmark_builds_standin_caches_from_real_her2st(shared_data, tmp_path):
    """Targets are the real counts of the 250 most expressed genes; features carry no target gene;
    every section keeps its real spot coordinates (micrometres) and patient; a ridge fold runs end
    to end."""
    import bench_accuracy
    import data
    import files
    her2st = shared_data / "her2st"
    root = bench_accuracy.build_standin(her2st, tmp_path / "cache", "strong")
    genes = (root / "genes.txt").read_text().split()
    slides = data.list_slides(root)
    assert len(genes) == 250 and len(slides) == 36
    s = data.read_slide(slides[0])
    h = files.read_h5ad(her2st / "st" / f"{s.slide_id}.h5ad", genes=genes)
    np.testing.assert_array_equal(s.counts.numpy(), h.counts)
    assert (s.genes == genes and s.features.shape == (len(h.barcodes), 32)
            and s.patient == s.slide_id[0])
    nn = torch.cdist(s.coords, s.coords).fill_diagonal_(float("inf")).amin(1).median()
    assert 150 < float(nn) < 250                                          # legacy ST: 200 um pitch
    rows = bench_accuracy.main(["--her2st", str(her2st), "--cache", str(tmp_path / "cache"),
                                "--cases", "strong", "--out", str(tmp_path / "out"), "--models",
                                "ridge", "--groups", "E", "--seeds", "0"])
    assert len(rows) == 1 and 0.1 < rows[0]["pcc_gene"] < 0.9
    # noshift: without the per-section stain offset, the sections' feature means spread less
    # (composition stays)
    noshift = bench_accuracy.build_standin(her2st, tmp_path / "cache", "noshift")
    spread = lambda folder: np.stack([data.read_slide(p).features.mean(0).numpy()  # noqa: E731
                                      for p in data.list_slides(folder)]).std(0).mean()
    assert spread(noshift) < 0.75 * spread(root)        # 0.35 against 0.64 when measured


@pytest.mark.slow
def test_accuracy_benchmark_real_he_holds_out_sections_and_patients(shared_data, tmp_path):
    """The six imaged her2st sections through embed --sub 2 and import-hest: by section 6 groups, by
    patient B (B4) and C (C2-C6); a closed-form fold runs end to end."""
    import bench_accuracy
    import data
    her2st = shared_data / "her2st"
    root = bench_accuracy.build_real(her2st, tmp_path / "cache")
    assert bench_accuracy.groups(root, "real-patient") == {"B": ["B4"],
                                                           "C": ["C2", "C3", "C4", "C5", "C6"]}
    assert list(bench_accuracy.groups(root, "real-section")) == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert data.read_slide(root / "B4.h5").sub_features.shape[1:] == (4, 48)
    rows = bench_accuracy.main(["--her2st", str(her2st), "--cache", str(tmp_path / "cache"),
                                "--cases", "real-section", "--out", str(tmp_path / "out"),
                                "--models", "ridge_spatial", "--groups", "C3", "--seeds", "0"])
    assert len(rows) == 1 and 0.4 < rows[0]["pcc_gene"] < 0.9
    with pytest.raises(SystemExit, match="raw targets"):  # one --out holds one kind of target
        bench_accuracy.main(["--her2st", str(her2st), "--cache", str(tmp_path / "cache"), "--out",
                             str(tmp_path / "out"), "--normalize", "--report"])
    # depth-normalised targets; B4, a patient the training sections (C) never showed, is unlike
    # every one of them: tessera.yaml predicts it by its spatial ridge alone (model.ood_fallback)
    rows = bench_accuracy.main(["--her2st", str(her2st), "--cache", str(tmp_path / "cache"),
                                "--cases", "real-section", "--out", str(tmp_path / "norm"),
                                "--models", "ridge_spatial", "tessera", "--groups", "B4", "--seeds",
                                "0", "--normalize", "--set", "tessera:train.epochs=1"])
    assert ([r["model"] for r in rows] == ["ridge_spatial", "tessera"]
            and all(r["normalize"] for r in rows))
    assert rows[1]["pcc_gene"] == pytest.approx(rows[0]["pcc_gene"], abs=1e-6)
    assert 0.05 < rows[0]["pcc_gene"] < 0.4  # normalised targets: 0.146 by section (BENCHMARKS.md)


@pytest.mark.parametrize("override,message",
                         [("model.radii=[]", "model.radii"),
                          ("model.radii=[1.5, 0]", "model.radii"),
                          ("model.radii=[a]", "list of numbers"), ("train.ema=1.0", "train.ema"),
                          ("model.slide_norm=maybe", "model.slide_norm"),
                          ("model.spatial_start=true", None), ("model.slide_norm=auto", None)])
def test_config_keys_of_the_spatial_start_are_checked(override, message):
    import train
    from conftest import ROOT
    if message is None:
        assert train.load_config(ROOT / "configs/hist.yaml",
                                 [override, "model.radii=[1, 2.5]"])["model"]["radii"] == [1, 2.5]
        return
    with pytest.raises(SystemExit, match=message):
        train.load_config(ROOT / "configs/hist.yaml", [override])

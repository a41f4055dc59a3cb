"""plots.py: one spot's attention against the dense matrix of signed weights built here by loops
over the windows / neighbours / all pairs, and against the module's own output; maps and figures on
a tiny run."""
import math
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import data
import files
import predict
import plots
import test_eval
from model import ModelConfig, build_model
from test_eval import ROOT

tiny_run = test_eval.tiny_run       # the module-scoped trained run, a fixture of test_eval.py

# ---------------------------------------------------------------- attention of one spot
CONFIGS = {  # every attention mode and bias, signed and not, at the spot level and coarser
    "window rpb, knn local stage, full coarse (signed)": dict(
        attention="window", bias="rpb", signed=True, local_blocks=1, depths=[1, 1],
        decoder_depths=[1]),
    "window alibi (unsigned)": dict(attention="window", bias="alibi", coarse_attention="same",
                                    depths=[1, 1], decoder_depths=[1]),
    "union windows rpb (signed), reference kernels": dict(
        attention="window", windows="union", bias="rpb", signed=True, coarse_attention="same",
        depths=[1, 1], decoder_depths=[1], kernels="reference"),
    "knn alibi at every level (signed)": dict(attention="knn", bias="alibi", signed=True,
                                              depths=[1, 1], decoder_depths=[1],
                                              coarse_attention="same"),
    "full, one level, no bias (signed)": dict(attention="full", bias="none", signed=True,
                                              depths=[1], decoder_depths=[]),
}


def hex_slide(n_side=11, pseudo=True, seed=0):
    """A small Visium-like slide: hexagonal grid, pitch 100 um, random features, pseudo-spots
    between."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    xy = torch.stack([j * 100.0 + (i % 2) * 50.0, i * 86.6], -1).reshape(-1, 2) + 1000
    feats = torch.randn(len(xy), 8, generator=g)
    extra = dict(pseudo_features=torch.randn(len(xy[::2]), 8, generator=g),
                 pseudo_coords=xy[::2] + torch.tensor([50.0, 28.9])) if pseudo else {}
    return data.Slide("hex", feats, xy, np.array([f"spot{k:03d}" for k in range(len(xy))]), **extra)


def dense_reference(module, x, level, knn_index):
    """The (H, n, n) signed weight matrix of every query over every token, built by explicit loops
    over the allowed pairs (windows of both partitions: split, a half of the heads each, or union,
    HiST eq. (2), every head both; k-NN lists; all pairs), the bias of each pair by definition from
    its lattice offset, and the softmaxes by hand."""
    n, H, w = x.shape[0], module.heads, module.w
    q, k, _ = module.qkv(x).double().view(n, 3, H, -1).unbind(1)
    allowed = torch.zeros(H, n, n, dtype=torch.bool)
    sites = level.sites.double()
    if module.mode == "window":
        split = module.windows == "split"
        for heads, rulebook in ((range(0, H // 2) if split else range(H), level.windows),
                                (range(H // 2, H) if split else range(H), level.shifted)):
            for row in rulebook.tolist():
                tokens = [t for t in row if t >= 0]
                for ta in tokens:
                    for tb in tokens:
                        allowed[list(heads), ta, tb] = True
    else:
        for i in range(n):
            allowed[:, i, knn_index[i] if module.mode == "knn" else slice(None)] = True
    bias = torch.zeros(H, n, n, dtype=torch.float64)
    r = range(-(2 * w - 1), 2 * w)
    entry = {o: e for e, o in enumerate((di, dj) for di in r for dj in r)}  # eq. (3)'s b(di, dj)
    for i, j in allowed.any(0).nonzero().tolist():
        offset = sites[i] - sites[j]
        if module.bias.kind == "rpb":
            bias[:, i, j] = module.bias.table[:, entry[tuple(int(o) for o in offset)]].double()
        elif module.bias.kind == "alibi":
            bias[:, i, j] = -module.bias.slopes.double() * math.hypot(*offset.tolist())
    s = q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) / math.sqrt(q.shape[-1])  # (H, n, n)

    def softmax(z):  # over the allowed keys of each row, by hand
        top = z.masked_fill(~allowed, -math.inf).amax(-1, keepdim=True)
        e = torch.where(allowed, torch.exp(z - top), 0)
        return e / e.sum(-1, keepdim=True)
    return softmax(s + bias) - module.beta * softmax((bias - s) / module.tau)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_spots_attention_is_the_row_of_the_dense_matrix_and_gives_the_modules_output(
        name, one_thread):
    torch.manual_seed(1)
    cfg = ModelConfig(dim=16, heads=4, knn_k=6, calibration_tokens=1, **CONFIGS[name])
    model = build_model(cfg, 8, 5).eval()
    slide = hex_slide()
    blocks = plots.attention_blocks(model)
    assert len(blocks) == (1 if cfg.local_blocks else 0) + sum(cfg.depths) + sum(cfg.decoder_depths)
    for block in range(len(blocks)):
        for barcode in ("spot000", "spot060", "spot097"):
            r = plots.spot_attention(model, slide, barcode, block)
            module, x, level, knn_index = r["captured"]
            # the captured input is what the module reads
            # (h of all rows) in a forward (a hook of this test)
            seen = []
            handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
            # grad mode without a graph: the blocks call the module itself
            model.requires_grad_(False)
            with torch.enable_grad():
                model(slide.features, slide.coords,
                      slide.pseudo_features if cfg.local_blocks else None,
                      slide.pseudo_coords if cfg.local_blocks else None)
            handle.remove()
            assert torch.equal(seen[0][0], x)
            dense = dense_reference(module, x, level, knn_index)[:, r["query_row"]]       # (H, n)
            signed = (r["excitatory"] - r["inhibitory"]).double()
            full = torch.zeros_like(dense)
            full[:, r["keys"]] = torch.where(r["attends"], signed, 0.0)
            torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-6)
            if not module.beta:
                assert torch.equal(r["inhibitory"], torch.zeros_like(r["inhibitory"]))
            # weights x values = the module's output for this query
            H = module.heads
            v = module.qkv(x).view(len(x), 3, H, -1)[:, 2].double()  # (n, H, D)
            out = torch.einsum("hn,nhd->hd", full, v).reshape(-1)
            torch.testing.assert_close(out, seen[0][1][r["query_row"]].double(),
                                       rtol=1e-4, atol=1e-5)


def test_attention_labels_and_coordinates():
    torch.manual_seed(2)
    model = build_model(ModelConfig(dim=16, heads=4, knn_k=6, local_blocks=1, depths=[1, 1],
                                    decoder_depths=[1]),
                        8, 5).eval()
    slide = hex_slide()
    r = plots.spot_attention(model, slide, "spot060", 0)            # the k-NN local stage
    assert r["level"].startswith("local") and len(r["keys"]) == 6
    index = {b: k for k, b in enumerate(slide.barcodes)}
    for label, xy in zip(r["keys_label"], r["keys_xy"]):
        want = (slide.coords[index[label]] if label in index
                else slide.pseudo_coords[int(label.split()[1])])
        torch.testing.assert_close(xy, want.float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(r["query_xy"], slide.coords[60].float(), rtol=0, atol=1e-3)
    r = plots.spot_attention(model, slide, "spot060", 1)  # window, spot level: keys are spots
    assert r["level"] == "level 0" and all(lab.startswith("spot") for lab in r["keys_label"])
    r = plots.spot_attention(model, slide, "spot060", 2)  # full at level 1: regions of spots
    assert (r["level"] == "level 1" and r["mode"] == "full"
            and all(lab.startswith("token") for lab in r["keys_label"]))
    assert r["attends"].all() and len(r["keys"]) < slide.n_spots


def test_attention_of_a_model_with_sub_spot_levels():
    """The forward gets the slide's sub-patch features (predict.model_inputs); a spot-level block
    gives spot keys, and a block below the spot says that its tokens are not spots."""
    torch.manual_seed(3)
    model = build_model(ModelConfig(dim=16, heads=2, depths=[1, 1], decoder_depths=[1],
                                    sub_levels=1, coarse_attention="same"), 8, 5).eval()
    slide = hex_slide()
    slide.sub_features = torch.randn(slide.n_spots, 4, 8)
    names = [n for n, _ in plots.attention_blocks(model)]
    r = plots.spot_attention(model, slide, "spot060", names.index("encoder.0.0.spot"))
    assert r["level"] == "level 0" and all(lab.startswith("spot") for lab in r["keys_label"])
    with pytest.raises(ValueError, match="not coarsened spot sites"):
        plots.spot_attention(model, slide, "spot060", names.index("sub_encoder.0.spot"))


def test_attention_bad_input():
    model = build_model(ModelConfig(dim=16, heads=2, depths=[1], decoder_depths=[]), 8, 5).eval()
    with pytest.raises(ValueError, match="spot nope: no such barcode"):
        plots.spot_attention(model, hex_slide(), "nope")
    with pytest.raises(ValueError,
                       match=r"--block 3: expected 0 \.\.\. 0 \(0: encoder.0.0.spot \(full\)\)"):
        plots.spot_attention(model, hex_slide(), "spot000", 3)
    with pytest.raises(ValueError, match="no spot-to-spot attention"):
        plots.spot_attention(build_model(ModelConfig(arch="mlp"), 8, 5), hex_slide(), "spot000")


# ---------------------------------------------------------------- pictures
def image(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_raster_puts_each_spot_at_its_position():
    slide = hex_slide(pseudo=False)
    values = np.arange(slide.n_spots, dtype=np.float64)
    img, (x0, x1, y1, y0) = plots.raster(slide.coords.numpy(), values, 100.0)
    px = (x1 - x0) / img.shape[1]
    # the pixel under each spot centre holds its value
    for (x, y), v in zip(slide.coords.tolist(), values):
        assert img[int((y - y0) / px), int((x - x0) / px)] == v
    assert np.isnan(img).any() and set(np.unique(img[~np.isnan(img)])) == set(values)
    # Visium HD scale: one bounded image
    many = np.random.default_rng(0).uniform(0, 8000, size=(1_000_000, 2))
    img, _ = plots.raster(many, np.ones(len(many)), 8.0)
    assert max(img.shape) <= plots.MAX_PIXELS


def test_plot_run_writes_maps_histogram_and_density(tiny_run, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    written = plots.plot_run(tiny_run, slide="synth_00")
    names = sorted(p.name for p in written)
    assert "pcc_hist.png" in names and "density.png" in names
    maps = [p for p in written if p.name.startswith("synth_00__")]
    assert 1 <= len(maps) <= 3 and all(p.parent == tiny_run / "plots" for p in written)
    for p in written:
        img = image(p)
        # 4 panels
        want = {"pcc_hist.png": (400, 600), "density.png": (480, 560)}.get(p.name, (420, 1680))
        assert img.shape[:2] == want, p.name
        assert img[..., :3].var() > 0, p.name
    genes = files.read_predictions(tiny_run / "fold_0" / "pred" / "synth_00.h5")["genes"]
    written = plots.plot_run(tiny_run, slide="synth_00", genes=genes[:2])
    assert {p.name for p in written} >= {f"synth_00__{g}.png" for g in genes[:2]}
    assert len([p for p in plots.plot_run(tiny_run, slide="synth_01", top=4)
                if "synth_01__" in p.name]) <= 4
    paths = plots.evaluation.prediction_files(tiny_run)
    scores = plots.gene_scores(plots.fold_gene_scores([files.read_predictions(p) for p in paths],
                                                      [p.parent for p in paths]))
    per_fold = {}  # reference: np.corrcoef per gene over each fold's spots
    for fold in sorted({p.parent for p in paths}):
        fs = [files.read_predictions(p) for p in paths if p.parent == fold]
        pred, true = (np.concatenate([f[k] for f in fs]).astype(np.float64)
                      for k in ("pred", "true"))
        for g, name in enumerate(fs[0]["genes"]):
            per_fold.setdefault(name, []).append(np.corrcoef(pred[:, g], true[:, g])[0, 1])
    assert scores.keys() == per_fold.keys()
    for name, values in per_fold.items():
        assert scores[name] == pytest.approx(np.mean(values), abs=1e-9), name
    ranked = sorted(scores, key=lambda g: -scores[g])
    assert plots.choose_genes(scores) == [ranked[0], ranked[len(ranked) // 2], ranked[-1]]
    assert plots.choose_genes(scores, top=2) == ranked[:2]


def png_text(path) -> str:
    """The text a picture says (titles, legends, notes), read from its PNG's `Description` chunk."""
    from PIL import Image
    with Image.open(path) as im:
        return im.text.get("Description", "")


def test_pictures_say_what_the_tables_say(tiny_run):  # noqa: F811
    """Each map: measured, predicted, std, error panels, the gene's PCC on the slide (numpy) and
    n_models in the title; pcc_hist.png: its mean is results.md's pcc_gene, word for word."""
    pytest.importorskip("matplotlib")
    written = plots.plot_run(tiny_run)
    md = (tiny_run / "results.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| pcc_gene |"))
    mean = row.split("|")[2].split("±")[0].strip()
    hist = png_text(tiny_run / "plots" / "pcc_hist.png")
    assert f"pcc_gene {mean} (mean over 2 folds of the mean over genes)" in hist
    maps = [p for p in written if "__" in p.name]
    assert maps
    for p in maps:
        slide, gene = p.stem.split("__")
        f = files.read_predictions(next(tiny_run.glob(f"fold_*/pred/{slide}.h5")))
        i = f["genes"].index(gene)
        r = np.corrcoef(f["pred"][:, i], f["true"][:, i].astype(np.float64))[0, 1]
        lines = png_text(p).splitlines()
        spots = f"{len(f['pred']):,} spots"
        assert lines[0] == f"{gene} on slide {slide}, PCC {r:.3f}, n_models 1 ({spots})"
        assert lines[1:] == ["measured", "predicted", "std (uncertainty)",
                             "error (predicted - measured)"]


def test_a_one_model_prediction_has_a_std_panel_that_says_so(tiny_run, tmp_path):  # noqa: F811
    """Out-of-fold prediction without dropout passes: one model per slide, no std in the files; the
    maps still show the std panel, as a note (README: "one model: no spread")."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "oof"
    slides = tiny_run.parents[1] / "data" / "synthetic"
    r = test_eval.predict_cli("--run", tiny_run, "--slides", slides, "--out", out,
                              "--exclude-training", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(files.read_predictions(p)["std"] is None for p in out.glob("*.h5"))
    written = plots.plot_run(out, slide="synth_00", top=1)
    drawn = next(p for p in written if p.name.startswith("synth_00__"))
    assert png_text(drawn).splitlines()[1:] == ["measured", "predicted", "std (uncertainty)",
                                                "one model: no spread",
                                                "error (predicted - measured)"]
    assert image(drawn).shape[:2] == (420, 1680)                    # 4 panels


def test_gene_scores_average_folds_that_share_their_genes():
    """Folds with the same gene list (a gene-list file) are still scored apart, then averaged."""
    g = np.random.default_rng(0)
    files, folds, want = [], [], {"a": [], "b": []}
    for fold in range(2):
        true = g.normal(size=(30, 2))
        pred = true * [1.0, 0.2] + g.normal(size=(30, 2)) * (fold + 1)
        files.append({"genes": ["a", "b"], "pred": pred, "true": true})
        folds.append(f"fold_{fold}")
        for k, name in enumerate("ab"):
            want[name].append(np.corrcoef(pred[:, k], true[:, k])[0, 1])
    scores = plots.gene_scores(plots.fold_gene_scores(files, folds))
    assert scores == pytest.approx({name: np.mean(v) for name, v in want.items()}, abs=1e-12)


def run_plots(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "plots.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_line_error(r, message):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def in_process_error(args, message):
    """plots.main exits with a one-line message (what the command line prints, without a
    traceback)."""
    with pytest.raises(SystemExit) as e:
        plots.main([str(a) for a in args])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_plot_and_attention_bad_input(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    in_process_error(["plot", tiny_run, "--genes", "NOPE"], "gene NOPE: not among the 21 predicted")
    in_process_error(["plot", tiny_run, "--slide", "nope"], "slide nope: not among the 4 slides")
    in_process_error(["plot", tmp_path], "no prediction files")
    monkeypatch.chdir(tiny_run.parents[1])  # the run's data.root is relative
    in_process_error(["attention", tiny_run, "--slide", "nope", "--spot", "x"],
                     "slide nope: no data/synthetic/nope.h5")
    in_process_error(["attention", tiny_run, "--slide", "synth_00", "--spot", "x"],
                     "spot x: no such barcode in slide synth_00")
    in_process_error(["attention", tiny_run, "--slide", "synth_00", "--spot", "s00_00003",
                      "--block", "7"],
                     "--block 7: expected 0 ... 3")
    assert not (tiny_run / "attention").exists() and not (tmp_path / "plots").exists()
    code = ("import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, sys.argv[1]); "
            "import plots; plots.main(['plot', sys.argv[2]])")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tiny_run)],
                       capture_output=True, text=True)
    one_line_error(r, "pip install matplotlib")


def test_attention_command_writes_h5_and_png(tiny_run):  # noqa: F811
    pytest.importorskip("matplotlib")
    r = run_plots("attention", tiny_run, "--slide", "synth_01", "--spot", "s01_00007",
                  "--block", "1", cwd=tiny_run.parents[1])
    assert r.returncode == 0, r.stderr
    h5, png = (tiny_run / "attention" / f"synth_01__s01_00007__block1.{e}" for e in ("h5", "png"))
    model, _ = predict.load_fold_models(tiny_run, folds=[0])[0]  # synth_01 was tested by fold 0
    want = plots.spot_attention(model,
                                data.read_slide(tiny_run.parents[1] / "data" / "synthetic"
                                                / "synth_01.h5"),
                                "s01_00007", 1)
    with h5py.File(h5, "r") as f:
        for k in ("excitatory", "inhibitory", "attends", "keys_xy", "keys"):
            np.testing.assert_array_equal(f[k][:], want[k].numpy())
        assert list(f["keys_label"].asstr()[:]) == want["keys_label"].tolist()
        assert f.attrs["mode"] == "window" and f.attrs["barcode"] == "s01_00007"
    img = image(png)
    # 2 heads x (excitatory, inhibitory)
    assert img.shape[:2] == (740, 760) and img[..., :3].var() > 0


def test_file_names_of_two_names_that_differ_only_in_unsafe_characters_differ():
    from plots import _safe
    assert _safe("HLA-DRA") == "HLA-DRA" and _safe("s01_00007") == "s01_00007"
    names = ["A/B", "A_B", "A B", "A:B", "../A_B"]
    assert len({_safe(n) for n in names}) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", _safe(n)) for n in names)

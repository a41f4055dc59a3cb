"""docs/walkthrough.md is true: its ```python blocks and the commands of its ```bash blocks run in
order in one namespace, in a temporary folder (docs/walkthrough_figures.run_blocks); what each block
prints is what the ```text block after it shows; and what the text says of the lattice, the windows
of HiST eq. (2), the coarsening of eq. (4), FEAST's signed attention and the run folder is checked
here against references written with loops, dicts, scipy and numpy on the namespace's own inputs.
The page is run once for the module (about 20 s on one CPU thread)."""
import dataclasses
import importlib
import math
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import walkthrough_figures as walkthrough  # noqa: E402

import model  # noqa: E402
import train  # noqa: E402

PAGE = ROOT / "docs" / "walkthrough.md"
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


# ---------------------------------------------------------------- comparing printed and shown text
def matches(shown: str, printed: str, numbers: bool = True) -> bool:
    """Whether `printed` is what `shown` shows: the same lines, a line `...` standing for any lines.
    numbers: integers equal, decimals within one unit of their last shown digit (plus 0.1%); else
    any number stands for any number (a command's timings and losses differ between machines)."""
    pattern, expected = "", []
    for line in shown.strip("\n").splitlines():
        if line.strip() == "...":
            pattern += r"(?:[^\n]*\n)*?"
            continue
        pieces = re.split(f"({NUMBER})", line.rstrip())
        pattern += "".join(f"({NUMBER})" if k % 2 else re.escape(p) for k, p in enumerate(pieces))
        pattern += r"[ \t]*\n"
        expected += pieces[1::2]
    text = "".join(line.rstrip() + "\n" for line in printed.strip("\n").splitlines())
    found = re.fullmatch(pattern, text)
    if found is None or not numbers:
        return found is not None
    for want, got in zip(expected, found.groups()):
        if not re.search(r"[.e]", want):
            if want != got:
                return False
            continue
        decimals = len(want.split("e")[0].partition(".")[2])
        exponent = int(want.split("e")[1]) if "e" in want else 0
        if abs(float(got) - float(want)) > 10.0 ** (exponent - decimals) + 1e-3 * abs(float(want)):
            return False
    return True


def test_the_comparison_finds_a_changed_line_word_or_number():
    shown = "spot 137 at [17, 14]\nslopes [0.25, 0.0039]\n"
    assert matches(shown, "spot 137 at [17, 14]\nslopes [0.25, 0.0039]\n")
    assert matches(shown, "spot 137 at [17, 14]  \nslopes [0.2501, 0.0040]")  # last digit, spaces
    assert not matches(shown, "spot 138 at [17, 14]\nslopes [0.25, 0.0039]\n")    # an integer
    assert not matches(shown, "spot 137 at [17, 14]\nslopes [0.27, 0.0039]\n")    # a decimal
    assert not matches(shown, "spot 137 in [17, 14]\nslopes [0.25, 0.0039]\n")    # a word
    assert not matches(shown, "spot 137 at [17, 14]\n")                           # a line
    assert not matches(shown, shown + "one more\n")
    assert matches("x 3.925e-04", "x 3.926e-04") and not matches("x 3.925e-04", "x 3.925e-03")
    run = "fold 0 epoch 1/2 loss 1.0104 0.8s/epoch\n...\nfinished in 12s\n"
    printed = "fold 0 epoch 1/2 loss 0.9 0.5s/epoch\nfold 0 epoch 2/2\nnote\nfinished in 7s\n"
    assert matches(run, printed, numbers=False) and not matches(run, printed)
    assert not matches(run, printed.replace("finished", "stopped"), numbers=False)
    assert matches("a\n...\nb", "a\nb") and not matches("a\n...\nb", "a\nc")


# ---------------------------------------------------------------- the page, run once
@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """(folder, namespace, printed): the page run in a fresh folder on one thread."""
    folder = tmp_path_factory.mktemp("walkthrough")
    threads, heads = torch.get_num_threads(), dict(model.HEADS)
    torch.set_num_threads(1)
    try:
        namespace, printed = walkthrough.run_blocks(folder)
    finally:
        torch.set_num_threads(threads)
        model.HEADS.clear()
        model.HEADS.update(heads)       # the page adds a head; other tests see the usual ones
    return folder, namespace, printed


def test_every_block_prints_what_the_page_shows(tour):
    _, _, printed = tour
    found = walkthrough.blocks(PAGE.read_text())
    ran = [lang for lang, _ in found if lang in ("python", "bash")]
    assert len(ran) == len(printed)
    shown, k = 0, -1
    for (lang, code), previous in zip(found, [None] + found[:-1]):
        if lang in ("python", "bash"):
            k += 1
        elif lang == "text":
            assert previous is not None and previous[0] in ("python", "bash"), \
                f"a ```text block follows no code block:\n{code}"
            out = printed[k]
            if previous[0] == "bash":   # the machine's device, not the page's
                out = re.sub(r"device cuda(:\d+)?", "device cpu", out)
            assert matches(code, out, numbers=previous[0] == "python"), \
                f"block {k + 1} printed\n{out}\nbut the page shows\n{code}"
            shown += 1
    assert shown >= 9


def test_the_sites_are_the_rounded_positions_in_row_major_order(tour):
    _, ns, _ = tour
    xy, sites, unit = ns["xy"].numpy(), ns["sites"].numpy(), ns["unit"]
    d, _ = cKDTree(xy).query(xy, k=2)
    assert unit == pytest.approx(np.median(d[:, 1]) / 1.8) == pytest.approx(100 / 1.8)
    rounded = np.round(xy / unit).astype(np.int64)
    assert (sites == rounded - rounded.min(0)).all()         # no two spots meet on this slide
    assert len({tuple(s) for s in sites.tolist()}) == len(sites)
    assert (np.lexsort((sites[:, 1], sites[:, 0])) == np.arange(len(sites))).all()
    assert 200 <= len(xy) <= 400                             # "a few hundred spots"
    # "neighbouring spots land one or two sites apart along each axis, most sites stay empty"
    pairs = np.array(sorted(cKDTree(xy).query_pairs(101.0)))    # neighbours: 100 um apart
    assert len(pairs) > 2 * len(xy)
    steps = np.abs(sites[pairs[:, 0]] - sites[pairs[:, 1]])
    assert set(steps.ravel().tolist()) <= {0, 1, 2} and (steps.max(1) >= 1).all()
    assert len(sites) < 0.5 * (sites[:, 0].max() + 1) * (sites[:, 1].max() + 1)


def test_the_keys_of_every_spot_are_the_union_of_its_two_windows(tour):
    """HiST eq. (2) by its definition: token m is a key of token n when both lie in one window of
    the standard partition (keys (i // 2w, j // 2w)) or of the shifted one ((i + w) // 2w, ...)."""
    _, ns, _ = tour
    w, sites = ns["w"], ns["sites"].tolist()
    union, allowed, windows = ns["union"], ns["allowed"], ns["windows"]
    standard_key = [(i // (2 * w), j // (2 * w)) for i, j in sites]
    shifted_key = [((i + w) // (2 * w), (j + w) // (2 * w)) for i, j in sites]
    for n in range(len(sites)):
        expected = {m for m in range(len(sites)) if standard_key[m] == standard_key[n]
                    or shifted_key[m] == shifted_key[n]}
        W, a = (windows == n).nonzero()[0].tolist()
        row = union[W]
        assert set(row[allowed[a] & (row >= 0)].tolist()) == expected, n
    q = ns["q"]
    assert ns["standard"] == {m for m in range(len(sites)) if standard_key[m] == standard_key[q]}
    assert ns["shift"] == {m for m in range(len(sites)) if shifted_key[m] == shifted_key[q]}
    assert len(ns["standard"] | ns["shift"]) == len(ns["eq2"])
    # the text: a slot may attend to 36 + 36 - 9 = 63 slots of the 4 x 36 of its row
    assert allowed.shape == (36, 144) and (allowed.sum(1) == 2 * (2 * w) ** 2 - w ** 2).all()


def test_the_coarsening_puts_each_site_in_its_parents_slot(tour):
    """HiST eq. (4)'s indices: parent (i // 2, j // 2), slot 2 (i % 2) + (j % 2), at most four
    children; the pyramid's sizes are those of repeated coarsening (a dict of parents per level)."""
    _, ns, _ = tour
    sites, parent_sites = ns["sites"].tolist(), ns["parent_sites"].tolist()
    parent, slot = ns["parent"].tolist(), ns["slot"].tolist()
    children = {}
    for n, (i, j) in enumerate(sites):
        children.setdefault((i // 2, j // 2), []).append(n)
        assert tuple(parent_sites[parent[n]]) == (i // 2, j // 2)
        assert slot[n] == 2 * (i % 2) + (j % 2)
    assert len(children) == len(parent_sites) and max(map(len, children.values())) <= 4
    assert sorted(children) == [tuple(s) for s in parent_sites]           # row-major
    level, sizes = {tuple(s) for s in sites}, []
    for _ in range(3):
        sizes.append(len(level))
        level = {(i // 2, j // 2) for i, j in level}
    assert [len(lv.sites) for lv in ns["levels"]] == sizes
    # the text: most parents of the first step have one child; the next step divides by 3 to 4
    ones = sum(len(c) == 1 for c in children.values())
    assert ones > len(children) / 2 and 3 <= sizes[1] / sizes[2] <= 4


def test_the_signed_attention_is_feasts(tour):
    """FEAST's weights of the spot over its keys, from the block's own projections and input, in
    float64 numpy: excitatory softmax(S + B), inhibitory beta softmax((-S + B) / tau), B the ALiBi
    bias -m_h * distance with m_h = 2^(-8h/H) (H = 4: a power of two)."""
    _, ns, _ = tour
    result, cfg, q = ns["result"], ns["cfg"], ns["q"]
    spot, x, level, _ = result["captured"]
    keys = sorted(ns["standard"] | ns["shift"])
    assert result["keys"].tolist() == keys
    H, dim = cfg.heads, cfg.dim
    W, b = spot.qkv.weight.detach().double().numpy(), spot.qkv.bias.detach().double().numpy()
    qkv = x.double().numpy() @ W.T + b
    Q = qkv[q, :dim].reshape(H, -1)
    K = qkv[keys, dim:2 * dim].reshape(len(keys), H, -1)
    S = np.einsum("hd,khd->hk", Q, K) / math.sqrt(dim // H)
    s = ns["sites"].double().numpy()
    dist = np.sqrt(((s[q] - s[keys]) ** 2).sum(1))
    slopes = np.array([2.0 ** (-8 * h / H) for h in range(1, H + 1)])
    B = -slopes[:, None] * dist[None]

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    excitatory = softmax(S + B)
    inhibitory = cfg.beta * softmax((-S + B) / cfg.tau)
    np.testing.assert_allclose(result["excitatory"].numpy(), excitatory, atol=1e-5)
    np.testing.assert_allclose(result["inhibitory"].numpy(), inhibitory, atol=1e-5)
    np.testing.assert_allclose((excitatory - inhibitory).sum(1), 1 - cfg.beta)   # the text's sum
    np.testing.assert_allclose(ns["A"].numpy(), excitatory - inhibitory, atol=1e-5)
    # what the text reads in the weights: head 0 (steepest slope) puts its two largest weights of
    # both branches on the spot and a neighbour (2 or sqrt(5) sites away on this lattice), and its
    # branches correlate; head 3's branches anti-correlate; the inhibitory branch is more peaked
    for branch in (excitatory, inhibitory):
        assert (dist[np.argsort(-branch[0])[:2]] <= math.sqrt(5) + 1e-9).all()
    correlation = [np.corrcoef(excitatory[h], inhibitory[h])[0, 1] for h in range(H)]
    assert correlation[0] > 0 and correlation[3] < -0.9

    def entropy(p):
        p = p / p.sum(1, keepdims=True)
        return -(p * np.log(p)).sum(1)

    assert (entropy(inhibitory) < entropy(excitatory)).all()


def test_the_run_folder_has_what_the_page_says(tour):
    folder, ns, _ = tour
    run = folder / "runs" / "tour"
    folds = ns["folds"]
    assert len(folds) == 2
    tested = sorted(s for f in folds for s in f["test"])
    assert tested == [f"synth_{k:02d}" for k in range(4)]                 # each slide once
    for k, fold in enumerate(folds):
        assert not set(fold["train"]) & set(fold["test"])
        assert (run / f"fold_{k}" / "done").is_file() and (run / f"fold_{k}" / "model.pt").is_file()
        for slide in fold["test"]:
            with h5py.File(run / f"fold_{k}" / "pred" / f"{slide}.h5", "r") as f:
                assert f["pred"].shape == f["true"].shape == (len(f["barcodes"]), 50)
    metrics = ns["results"]["metrics"]
    assert {"pcc_gene", "mse"} <= set(metrics) and len(metrics["pcc_gene"]["folds"]) == 2


def test_the_commands_refuse_a_second_time_in_one_line(tour, monkeypatch):
    """The text: run again, the commands refuse to overwrite, naming --overwrite and run.name."""
    folder, _, _ = tour
    monkeypatch.chdir(folder)
    found = walkthrough.blocks(PAGE.read_text())
    cmds = [c for lang, code in found if lang == "bash" for c in walkthrough.commands(code)]
    assert [c.split()[1] for c in cmds] == ["synthetic.py", "train.py"]
    for command, hint in zip(cmds, ("--overwrite", "run.name")):
        with pytest.raises(RuntimeError) as refused:
            walkthrough.run_command(command)
        message = str(refused.value)
        assert hint in message and "\n" not in message, message


def test_the_new_head_and_the_kernels_switch(tour):
    _, ns, _ = tour
    assert ns["same"] is True
    assert type(ns["net"].head).__name__ == "LowRankHead" and ns["net"].head.start() is \
        ns["net"].head[-1]
    assert "lowrank" not in model.HEADS                                   # put back after the run


def test_the_pictures_are_drawn_committed_and_small(tour):
    folder, _, _ = tour
    text = PAGE.read_text()
    shown = re.findall(r"!\[[^\]]*\]\(walkthrough/([\w-]+\.png)\)", text)
    drawn = sorted(p.name for p in (folder / "tour").glob("*.png"))
    assert sorted(shown) == drawn and len(drawn) == 4
    for name in shown:
        png = ROOT / "docs" / "walkthrough" / name
        head = png.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", png
        assert png.stat().st_size < 150_000, f"{png}: {png.stat().st_size} bytes"


def test_the_page_links_files_that_exist_and_keeps_lines_short():
    text = PAGE.read_text()
    targets = re.findall(r"\]\(([\w./-]+)(?:#[\w-]+)?\)", text)
    assert {"../README.md", "design.md", "outputs.md"} <= set(targets)
    for target in targets:
        assert (PAGE.parent / target).exists(), target
    for path in (PAGE, ROOT / "docs" / "walkthrough_figures.py", Path(__file__)):
        long = [n for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
        assert not long, f"{path.name}: lines {long} are over 100 characters"


def test_every_name_the_page_cites_exists():
    """`lattice.x`, `attention.x`, `pyramid.x`, `plots.x`, `model.x` and `train.x` in the page's
    text are names of those files or, for model and train, config keys."""
    text = PAGE.read_text()
    found = re.findall(r"(?<![/\w])(lattice|attention|pyramid|plots|model|train)\.(\w+)", text)
    cited = {(module, name) for module, name in found if name not in ("py", "png")}
    keys = {"model": {f.name for f in dataclasses.fields(model.ModelConfig)},
            "train": set(train.DEFAULTS["train"])}               # config keys model.w, train.epochs
    assert len(cited) > 20
    for module, name in sorted(cited):
        found = hasattr(importlib.import_module(module), name)
        assert found or name in keys.get(module, ()), f"{module}.{name}"
    for name in ("run_fold", "attend", "signed_softmax", "PairBias", "Block", "Tessera", "HEADS"):
        assert re.search(rf"`[\w.]*\b{name}\b[\w.]*`", text), name


def test_the_figures_program_copies_what_a_page_draws(tmp_path, monkeypatch, capsys):
    """`python docs/walkthrough_figures.py --out DIR` on a page of one block (main with the page
    swapped): its picture lands in DIR, and the program names it."""
    page = tmp_path / "page.md"
    page.write_text("```python\nfrom pathlib import Path\nimport torch\n"
                    "import walkthrough_figures as draw\n"
                    "Path('tour').mkdir()\n"
                    "xy = torch.tensor([[0.0, 0.0], [100.0, 0.0], [50.0, 86.6]])\n"
                    "draw.lattice(xy, torch.tensor([[0, 0], [2, 0], [1, 2]]), 'tour/tiny.png')\n"
                    "print('drawn')\n```\n")
    monkeypatch.setattr(walkthrough, "PAGE", page)
    assert walkthrough.redraw(tmp_path / "first") == ["drawn\n"]
    walkthrough.main(["--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "tiny.png" in capsys.readouterr().out

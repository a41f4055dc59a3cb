"""The README and the pages under docs/ are true, and the README teaches first.

Every `python ...` command in their bash blocks runs, in order, in one fresh folder: README.md
first, then the docs/ pages in PAGES order, then any other page (a command ending in `\\` goes on
on the next line; a command already run by an earlier page is not run again). Training commands get
`train.epochs=1` appended so the test stays short; CI (.ci/run) also runs the demo and the
results-table commands in full. Commands that read ../shared/data skip when it is absent. Blocks
fenced as ```sh (a SLURM script, one fold per GPU) need a cluster or GPUs: they are shown, not run.

README's first screen holds the paper-to-code map and the reading order; every function the map
names exists; the reading order's line counts are what tests/reading.py measures, within 10%.
"""
import importlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

import reading
from conftest import ROOT, SHARED

README = ROOT / "README.md"
PAGES = ["running.md", "outputs.md", "own-data.md", "scales.md"]   # the order their commands run in
FIRST_SCREEN = 80                                                  # lines
TRACE_ROWS = {"one forward": "forward", "one training step": "step", "one fold": "fold"}


def page_commands(text: str) -> list[str]:
    """The `python ...` commands of a page's ```bash blocks, continuation lines joined."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python "):
                cmds.append(" ".join(line.split()))
    return cmds


def pages() -> list:
    docs = ROOT / "docs"
    rest = sorted(p.name for p in docs.glob("*.md") if p.name not in PAGES)
    return [README] + [docs / name for name in PAGES + rest]


def readme_commands() -> list[str]:
    return page_commands(README.read_text())


def documented_commands() -> list[str]:
    """Every page's commands in running order, each once."""
    return list(dict.fromkeys(c for page in pages() for c in page_commands(page.read_text())))


def section(name: str) -> tuple[int, list[str]]:
    """(1-based line of README's `## name` heading, the section's lines up to the next heading)."""
    lines = README.read_text().splitlines()
    start = lines.index(f"## {name}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start + 1, lines[start:end]


def table_rows(lines: list[str]) -> list[list[str]]:
    """The body rows of the markdown tables in `lines`, as lists of stripped cells."""
    rows = [line for line in lines if line.startswith("|") and not line.startswith("| ---")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    return [row for row, prev in zip(cells, [None] + cells) if prev is not None and any(row)]


# ------------------------------------------------------------ the collector, on pages made here
def test_commands_are_collected_from_bash_blocks_with_continuations():
    text = textwrap.dedent("""\
        Text with `python inline.py` is not a command.
        ```bash
        pip install -r requirements.txt
        python a.py --x 1 \\
          --y 2
        python b.py "k={by: mean, n: 3}"
        ```
        ```sh
        python on_a_cluster.py
        ```
        ```bash
        python c.py
        ```
        """)
    assert page_commands(text) == ["python a.py --x 1 --y 2", 'python b.py "k={by: mean, n: 3}"',
                                   "python c.py"]


def test_every_docs_page_is_collected_and_linked_from_the_readme():
    text = README.read_text()
    found = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert set(PAGES) <= set(found), f"PAGES names pages docs/ lacks: {set(PAGES) - set(found)}"
    assert [p.name for p in pages()[1:]] == PAGES + sorted(set(found) - set(PAGES))
    for name in found:
        assert f"(docs/{name}" in text, f"README does not link docs/{name}"


def test_the_readme_and_docs_have_the_main_commands():
    cmds = readme_commands()
    assert "python train.py" in cmds and 'python -m pytest -q -m "not slow"' in cmds
    assert any(c.startswith("python hest.py import-hest") for c in cmds)
    every = documented_commands()
    assert any(c.startswith("python predict.py") for c in every)
    assert any(c.startswith("python plots.py") for c in every)


# ---------------------------------------------------------------- the commands run
@pytest.mark.slow
def test_every_documented_command_runs(tmp_path):
    cmds = [c for c in documented_commands() if not c.startswith("python -m pytest")]  # CI's
    if any("../shared" in c for c in cmds) and not SHARED.is_dir():
        cmds = [c for c in cmds if "../shared" not in c and "her2st" not in c]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for cmd in cmds:
        args = shlex.split(cmd.replace("../shared", str(SHARED.parent)))
        args[1] = str(ROOT / args[1])                       # the script, from the checkout
        if args[1].endswith("train.py"):
            args += ["train.epochs=1"]
        r = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def test_the_quick_subset_command_selects_the_not_slow_tests():
    """README's quick-subset command, collected (not run: running it is most of the suite again): it
    exits 0, leaves out the slow tests and keeps the rest."""
    quick = [c for c in readme_commands() if c.startswith("python -m pytest") and "not slow" in c]
    assert len(quick) == 1
    args = shlex.split(quick[0])[1:]                       # -m pytest -q -m "not slow"

    def collected(*extra) -> str:
        r = subprocess.run([sys.executable, *extra, "--collect-only"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    quick_out, every_out = collected(*args), collected(*args[:-2])
    def count(out: str) -> int:
        return int(re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", out).group(1))

    assert 0 < count(quick_out) < count(every_out)
    slow, every = count(every_out) - count(quick_out), count(every_out)
    running = (ROOT / "docs" / "running.md").read_text()
    said = re.search(r"the `slow` tests \((\d+) of (\d+)\)", running)
    assert said, "docs/running.md no longer says how many tests are slow"
    assert abs(int(said[1]) - slow) <= 0.1 * slow and abs(int(said[2]) - every) <= 0.1 * every, (
        f"docs/running.md: {said[1]} of {said[2]} tests slow; collected: {slow} of {every}")
    assert "test_every_documented_command_runs" not in quick_out
    assert "test_every_documented_command_runs" in every_out


# ---------------------------------------------------------------- the README teaches first
def test_the_readme_is_short_with_the_map_and_the_reading_order_on_its_first_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md: {len(lines)} lines, expected at most 200"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:4] == ["## Install and run", "## Paper to code", "## Reading order",
                            "## Where tessera differs from the papers"]
    for name, rows in (("Paper to code", 20), ("Reading order", 3)):
        start, body = section(name)
        last = start + max(i for i, line in enumerate(body) if line.startswith("|"))
        assert last <= FIRST_SCREEN, f"README's {name!r} ends on line {last}, after {FIRST_SCREEN}"
        assert len(table_rows(body)) >= rows


def map_names() -> list[str]:
    _, body = section("Paper to code")
    names = [n for row in table_rows(body) for n in re.findall(r"`([\w.]+)`", row[-1])]
    assert names, "README's paper-to-code map names no code"
    return list(dict.fromkeys(names))


@pytest.mark.parametrize("name", map_names())
def test_the_map_names_code_that_exists(name):
    module, *attrs = name.split(".")
    assert (ROOT / f"{module}.py").is_file(), f"README's map: {name}: no {module}.py"
    obj = importlib.import_module(module)
    for i, attr in enumerate(attrs):
        owner = ".".join([module, *attrs[:i]])
        assert hasattr(obj, attr), f"README's map: {name}: {owner} has no {attr}"
        obj = getattr(obj, attr)


def stated_traces() -> dict[str, tuple[int, int]]:
    """{trace: (lines, files)} as README's reading order states them."""
    _, body = section("Reading order")
    assert any("`configs/hist.yaml`" in line for line in body)   # the config the traces measure
    stated = {TRACE_ROWS[row[0]]: (int(row[-2]), int(row[-1])) for row in table_rows(body)
              if row[0] in TRACE_ROWS}
    assert sorted(stated) == sorted(TRACE_ROWS.values())
    return stated


@pytest.mark.parametrize("trace", [
    "forward", "step", pytest.param("fold", marks=pytest.mark.slow)])
def test_the_reading_order_states_the_measured_lengths(trace):
    lines, files = stated_traces()[trace]
    rows = reading.measure("configs/hist.yaml", [trace])[trace]
    measured = reading.total(rows)
    assert abs(lines - measured) <= 0.1 * measured, (
        f"README's reading order: one {trace} reads {lines} lines; the trace measures {measured} "
        f"(python tests/reading.py prints them per file)")
    assert files == len(rows), (
        f"README: {files} files for one {trace}; the trace enters {sorted(rows)}")


# ------------------------------------------------------------ the line counter, on code made here
def test_the_trace_counts_the_lines_of_every_function_entered(tmp_path):
    """A small module written here: what ran and what a reader reads, counted by hand."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "m.py").write_text(textwrap.dedent('''\
        import os                       # line 1: a module body, not counted


        def f(x):                       # line 4: f is lines 4-10
            """Doc."""

            if x > 0:
                return h(x)
            y = x * 2
            return y
            # line 11: a comment after f's last statement


        def g():                        # line 14: never called
            return 1


        def h(x):                       # line 18: h is lines 18-19
            return -x
        '''))
    (tmp_path / "tests" / "t.py").write_text("def helper():\n    return 3\n")
    sys.path.insert(0, str(tmp_path))
    sys.path.insert(0, str(tmp_path / "tests"))
    try:
        m, t = importlib.import_module("m"), importlib.import_module("t")
        rows = reading.traced(lambda: (m.f(1), t.helper()), root=tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
        sys.path.remove(str(tmp_path / "tests"))
        sys.modules.pop("m", None)
        sys.modules.pop("t", None)
    # read: f's lines 4-10 but the blank 6 (6 lines) and h's 18-19 (2); ran: 7, 8 and 19.
    # The module body, g, the comment after f and tests/t.py are not counted.
    assert rows == {"m.py": (3, 6 + 2)}


# ---- what README says about files, pictures and printed lines ------------------------------------
def readme_text() -> str:
    """README.md and the pages under docs/ it links: a claim may sit on either."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(p.read_text() for p in pages)


def test_every_output_folder_of_the_readme_is_ignored_by_git():
    """Folders the README's commands write (runs/, caches/, predictions/, data/) never show as
    changes."""
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    outs = {"runs"}                                                   # run.dir's default
    for cmd in documented_commands():
        args = shlex.split(cmd)
        outs |= {args[i + 1].split("/")[0] for i, a in enumerate(args[:-1]) if a == "--out"}
        outs |= {a.split("=", 1)[1].split("/")[0] for a in args if a.startswith("data.root=")}
    assert outs >= {"runs", "caches", "predictions", "data"} and outs <= ignored, outs - ignored


def test_the_readme_states_what_the_files_and_pictures_hold():
    """The phrases the tests of the files check (test_predict, test_plots, test_eval) are README's
    own."""
    text = " ".join(readme_text().split())
    for phrase in ["layers `std` where there is a spread", "`true` for slides with counts",
                   'says "one model: no spread"',
                   "its dashed line is the `pcc_gene` of `results.md`",
                   "`--shared-genes` scores every run on the genes all of them predicted in each "
                   "fold",
                   "is named, with the slides, in one line", "raised to 0 as it is made",
                   "in one line how many sections of `--st` it skipped"]:
        assert phrase in text, phrase


def her2st_run(cwd, *args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.mark.slow
def test_the_her2st_commands_give_what_readme_says(shared_data, tmp_path):
    """README's her2st path (embed, import-hest, tessera.yaml and ridge_spatial.yaml on two folds,
    eval, predict out of fold as AnnData, plots): the printed lines, the files and the figures it
    states."""
    import json
    her2st, py = shared_data / "her2st", lambda name: ROOT / name  # noqa: E731
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    her2st_run(tmp_path, py("hest.py"), "embed", "--patches", her2st / "patches", "--out",
               "caches/her2st_features")
    r = her2st_run(tmp_path, py("hest.py"), "import-hest", "--st", her2st / "st", "--features",
                   "caches/her2st_features", "--meta", her2st / "metadata.csv", "--out",
                   "caches/her2st")
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"import-hest: skipped 30 of the 36 sections of {her2st / 'st'}: no "
                               "embedding file")
    assert "30 of them have no H&E image" in lines[0]
    assert [x.split(":")[0] for x in lines[1:]] == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert all(" spots matched, 0 only in st, 0 only in features; " in x for x in lines[1:])
    common = ["data.root=caches/her2st", "data.folds=2", "train.epochs=1"]
    her2st_run(tmp_path, py("train.py"), "configs/tessera.yaml", *common, "run.name=her2st-tessera")
    her2st_run(tmp_path, py("train.py"), "configs/ridge_spatial.yaml", *common,
               "run.name=her2st-ridge-spatial")
    run = tmp_path / "runs" / "her2st-tessera"
    for name in ["config.yaml", "log.txt", "results.json", "per_gene.csv", "results.md"]:
        assert (run / name).is_file(), name
    for k in (0, 1):
        assert (run / f"fold_{k}" / "model.pt").is_file()
        assert list((run / f"fold_{k}" / "pred").glob("*.h5"))
    # README: on this split tessera.yaml gives the ridge's figures (every test slide falls back)
    said = re.search(r"`tessera.yaml` gives the ridge's `pcc_gene` ([0-9.]+) with `r2_flat` "
                     r"([0-9.]+)", " ".join(readme_text().split()))
    results = json.loads((run / "results.json").read_text())
    for metric, value in zip(["pcc_gene", "r2_flat"], said.groups()):
        assert f"{results['metrics'][metric]['mean']:.{len(value.split('.')[1])}f}" == value, metric
    ridge = json.loads((tmp_path / "runs" / "her2st-ridge-spatial" / "results.json").read_text())
    assert ridge["metrics"]["pcc_gene"] == results["metrics"]["pcc_gene"]
    r = her2st_run(tmp_path, py("eval.py"), "runs/her2st-tessera", "runs/her2st-ridge-spatial")
    assert "warning" not in r.stderr and "| her2st-tessera | 2 | " in r.stdout
    # out of fold, as AnnData: X and `true` (every section has counts), no `std` (one model a slide)
    her2st_run(tmp_path, py("predict.py"), "--run", "runs/her2st-tessera", "--slides",
               "caches/her2st", "--out", "predictions/her2st", "--exclude-training", "--format",
               "h5", "h5ad")
    import h5py
    for p in sorted((tmp_path / "predictions" / "her2st").glob("*.h5ad")):
        with h5py.File(p) as f:
            assert set(f["layers"]) == {"true"} and f["X"][()].min() >= 0, p.name
    pytest.importorskip("matplotlib")
    r = her2st_run(tmp_path, py("plots.py"), "plot", "runs/her2st-tessera", "--top", "1")
    assert len(r.stderr.strip().splitlines()) <= 1
    from PIL import Image
    with Image.open(run / "plots" / "pcc_hist.png") as im:
        mean = results["metrics"]["pcc_gene"]["mean"]
        assert f"pcc_gene {mean:.4f} " in im.text["Description"]

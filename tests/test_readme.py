"""The README is true: every `python ...` command in its bash blocks runs, in order, in a fresh folder.

Training commands get `train.epochs=1` appended so the test stays short; CI (.ci/run) also runs the
demo and the results-table commands in full. Commands that read ../shared/data skip when it is absent.
Blocks fenced as ```sh (a SLURM script, one fold per GPU) need a cluster or GPUs: they are shown, not run.
"""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("python ")]


def test_the_readme_has_the_main_commands():
    cmds = readme_commands()
    assert "python train.py" in cmds and "python -m pytest -q" in cmds
    assert any(c.startswith("python hest.py import-hest") for c in cmds)
    assert any(c.startswith("python predict.py") for c in cmds)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    cmds = [c for c in readme_commands() if not c.startswith("python -m pytest")]  # that one is CI's
    if any("../shared" in c for c in cmds) and not SHARED.is_dir():
        cmds = [c for c in cmds if "../shared" not in c and "her2st" not in c]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for cmd in cmds:
        args = shlex.split(cmd.replace("../shared", str(SHARED.parent)))
        args[1] = str(ROOT / args[1])                       # the script, from the checkout
        if args[1].endswith("train.py"):
            args += ["train.epochs=1"]
        r = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def test_the_quick_subset_command_selects_the_not_slow_tests():
    """README's quick-subset command, collected (not run: running it is most of the suite again): it exits 0,
    leaves out the slow tests and keeps the rest."""
    quick = [c for c in readme_commands() if c.startswith("python -m pytest") and "not slow" in c]
    assert len(quick) == 1
    args = shlex.split(quick[0])[1:]                       # -m pytest -q -m "not slow"

    def collected(*extra) -> str:
        r = subprocess.run([sys.executable, *extra, "--collect-only"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    quick_out, every_out = collected(*args), collected(*args[:-2])
    count = lambda out: int(re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", out).group(1))  # noqa: E731
    assert 0 < count(quick_out) < count(every_out)
    assert "test_every_readme_command_runs" not in quick_out and "test_every_readme_command_runs" in every_out


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
    for cmd in readme_commands():
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

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

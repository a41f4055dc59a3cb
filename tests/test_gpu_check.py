"""gpu_check.py's parts that need no GPU: arguments, the torch-build decision, per-part time limits,
the JSON."""
import json
import sys

import pytest

import gpu_check
from gpu_check import Part


def test_arguments_parse_and_unknown_parts_are_refused(tmp_path, capsys):
    a = gpu_check.parse_args(["--out", str(tmp_path / "o"), "--parts", "tests,bench",
                              "--limit", "tests=300", "--limit", "hd_1m=20", "--no-install"])
    assert a.out == (tmp_path / "o").resolve() and a.parts == ["tests", "bench"] and a.no_install
    assert a.limit == {"tests": 300.0, "hd_1m": 20.0}
    d = gpu_check.parse_args([])
    assert d.parts is None and d.limit == {} and not d.no_install
    names = [p.name for p in gpu_check.plan(a)]
    assert names == ["tests", "demo", "bench", "data36", "hist_full", "hd_1m"]
    assert {p.name: p.limit for p in gpu_check.plan(a)}["tests"] == 300.0
    for bad in (["--parts", "tests,gpu"], ["--limit", "nope=3"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
        assert "unknown part(s)" in capsys.readouterr().err


def test_the_plan_runs_the_projects_own_commands(tmp_path):
    parts = {p.name: p for p in gpu_check.plan(gpu_check.parse_args(["--out", str(tmp_path)]))}
    assert parts["tests"].cmd[-3:] == ["-m", "cuda", "tests/test_cuda.py"]
    assert parts["demo"].cmd[1:4] == ["train.py", "run.device=cuda", "run.name=demo-gpu"]
    run_dirs = {c for p in parts.values() for c in p.cmd if c.startswith("run.dir=")}
    assert len(run_dirs) == 1 and "/runs-" in run_dirs.pop()            # one fresh folder per check
    hist = parts["hist_full"].cmd
    assert hist[1:3] == ["train.py", "configs/hist.yaml"] and "run.device=cuda" in hist
    assert "model.checkpoint=true" in parts["hd_1m"].cmd and "1M" in parts["hd_1m"].cmd
    one_m = parts["hd_1m"].cmd
    # bench.py's CPU cap would leave 1M out
    assert one_m[one_m.index("--max-n") + 1] == "hist.train=1M"
    import train
    cfg = train.load_config(gpu_check.ROOT / "configs/hist.yaml", [a for a in hist[3:] if "=" in a])
    assert cfg["model"]["dim"] == 512 and cfg["run"]["device"] == "cuda"


@pytest.mark.parametrize("info,install", [
    ({"version": "2.13.0+cpu", "cuda": None, "devices": 0}, True),       # a CPU build: install
    ({"version": "2.13.0", "cuda": "12.8", "devices": 1}, False),  # a CUDA build with a device
    # CUDA build, no device: not torch's fault
    ({"version": "2.13.0+cu128", "cuda": "12.8", "devices": 0}, False),
    ({"version": None, "cuda": None, "devices": 0, "error": "No module named torch"}, True)])
def test_a_cuda_build_is_installed_only_in_place_of_a_cpu_one(info, install):
    cmds = gpu_check.install_commands(info, python="py")
    assert bool(cmds) == install
    if install:
        # else 2.13.0+cpu satisfies torch==2.13.0
        assert cmds[0] == ["py", "-m", "pip", "uninstall", "-y", "torch"]
        assert cmds[1][:4] == ["py", "-m", "pip", "install"]
        assert cmds[1][4] == ("torch==2.13.0" if info["version"] else "torch")


def test_the_probe_reads_this_torch():
    info = gpu_check.probe_torch()
    import torch
    assert info["version"] == torch.__version__ and info["cuda"] == torch.version.cuda


def test_a_part_past_its_limit_is_killed_and_the_next_still_runs(tmp_path):
    parts = [Part("sleeper", 1.0,
                  [sys.executable, "-c", "import time; print('going to sleep', flush=True); "
                                         "time.sleep(60)"],
                  lambda out: {"saw": out.count("sleep")}),
             Part("fails", 30, [sys.executable, "-c",
                                "import sys; print('figure 42'); sys.exit(3)"],
                  lambda out: {"figure": int(out.split()[-1])}),
             Part("skipped", 30, [sys.executable, "-c", "pass"], skip="already there"),
             Part("broken summary", 30, [sys.executable, "-c", "print('ok')"], lambda out: 1 / 0)]
    result = gpu_check.run_parts(parts, tmp_path / "out", meta={"gpu": "fake"})
    r = result["parts"]
    assert r["sleeper"]["timed_out"] and r["sleeper"]["rc"] is None and r["sleeper"]["seconds"] < 30
    assert r["sleeper"]["saw"] == 1  # its output up to the kill is kept
    assert not r["fails"]["timed_out"] and r["fails"]["rc"] == 3 and r["fails"]["figure"] == 42
    assert r["skipped"]["skipped"] == "already there" and "rc" not in r["skipped"]
    assert (r["broken summary"]["rc"] == 0
            and "ZeroDivisionError" in r["broken summary"]["summary_error"])
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert written == json.loads(json.dumps(result)) and written["meta"] == {"gpu": "fake"}
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "going to sleep" in log and "=== sleeper: timed out" in log and "=== fails: rc 3" in log


def test_summaries_read_the_parts_outputs(tmp_path):
    lines = ("fold 0 epoch 1/3 loss 0.9 9.0s/epoch eta 1m\n"
             "fold 0 epoch 2/3 loss 0.8 val_pcc_gene 0.1 3.0s/epoch eta 5s\n"
             "fold 0 epoch 3/3 loss 0.7 4.0s/epoch eta 0s\n")
    s = gpu_check.epochs_summary(lines)
    assert s["s_per_epoch"] == [9.0, 3.0, 4.0] and s["median_s_per_epoch"] == 4.0
    assert s["protocol_h"] == round(4.0 * 400 / 3600, 2)
    assert gpu_check.tests_summary("3 passed, 1 failed, 2 skipped in 9s")["pytest"] == \
        {"passed": 3, "failed": 1, "skipped": 2}
    rows = [dict(name="hist", mode="train", layout="visium", n=4000, time_s=0.5, peak_mb=2048,
                 reserved_mb=4096),
            dict(name="hist", mode="infer", layout="visium", n=4000, time_s=0.1, peak_mb=512,
                 reserved_mb=1024),
            dict(name="default", mode="train", layout="visium", n=4000, error="out of memory")]
    (tmp_path / "b.json").write_text(json.dumps({"rows": rows}))
    table = gpu_check.bench_summary(tmp_path / "b.json")("")["table"].splitlines()
    assert table[2] == gpu_check.HIST_TABLE1
    assert table[3] == "| tessera hist.yaml, N 4000 | 0.5 | 0.1 | 2.00 (0.50) | 4.00 (1.00) |"
    assert len(table) == 4                                         # a failed row adds nothing
    demo = gpu_check.demo_summary(tmp_path / "runs")("finished in 77s")
    assert demo["seconds"] == 77 and demo["gpu_table"] is None
    assert (demo["cpu_table_readme"].startswith("| run | pcc_gene")
            and "tessera (`default.yaml`)" in demo["cpu_table_readme"])


def test_no_gpu_means_nothing_to_check(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "probe_torch",
                        lambda python=None: {"version": "2.13.0+cpu", "cuda": None, "devices": 0})
    monkeypatch.setattr(gpu_check, "_nvidia_smi", lambda: None)
    with pytest.raises(SystemExit, match="no NVIDIA GPU"):
        gpu_check.main(["--out", str(tmp_path)])
    assert not (tmp_path / "gpu_check.json").exists()

"""bench_runs.py: its tables and sums against numbers worked out here, its synthetic caches read
back by data.py, and README's and BENCHMARKS.md's commands run at a tiny size. Timings are never
asserted."""
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest

import bench_runs
import data
import threads
from conftest import ROOT

LOG = """run runs/x: 2 folds, training 0, 1, config configs/hist.yaml
fold 0: closed-form spatial ridge fitted on 283 spots
fold 0 epoch 1/2 loss 0.7451 2.6s/epoch eta 0m50s
fold 0 epoch 2/2 loss 0.7464 2.4s/epoch eta 0m46s
fold 0: done in 10.0s, of which 5.0s in 2 epoch(s)
fold 1 epoch 1/2 loss 0.9056 10.7s/epoch eta 0m37s
fold 1 epoch 2/2 loss 0.8935 10.3s/epoch eta 0m25s
fold 1: done in 30.0s, of which 21.0s in 2 epoch(s)
finished in 41s
"""


def test_the_log_gives_each_folds_epochs_and_times():
    folds = bench_runs.parse_log(LOG)
    assert folds == {0: {"epochs": [2.6, 2.4], "total": 10.0, "inside": 5.0},
                     1: {"epochs": [10.7, 10.3], "total": 30.0, "inside": 21.0}}


def test_the_protocol_adds_the_configs_epochs_at_the_epochs_after_the_first():
    per_epoch, whole = bench_runs.protocol_time(bench_runs.parse_log(LOG), wall=43.0, epochs=100)
    assert per_epoch == pytest.approx((2.4 + 10.3) / 2)
    # start and end of the process 43 - 40; fold 0: 5 s outside + 100 x 2.4; fold 1: 9 + 100 x 10.3
    assert whole == pytest.approx(3.0 + 5.0 + 240.0 + 9.0 + 1030.0)


def test_a_run_without_epochs_is_its_measured_time():
    log = ("fold 0: done in 2.0s, of which 0.0s in 0 epoch(s)\n"
           "fold 1: done in 3.0s, of which 0.0s in 0 epoch(s)\n")
    assert bench_runs.protocol_time(bench_runs.parse_log(log), wall=7.5, epochs=100) == (None, 7.5)


def test_the_times_table_has_readmes_columns():
    rows = [{"size": "her2st", "config": "hist", "s_per_epoch": 2.5, "protocol_s": 600.0,
             "not_trained": 0, "folds": 2},
            {"size": "hest", "config": "hist", "error": "train.py: exit code 1"},
            {"size": "her2st", "config": "tessera", "s_per_epoch": None, "protocol_s": 12.0,
             "not_trained": 2, "folds": 2},
            {"size": "hest", "config": "tessera", "s_per_epoch": 3.0, "protocol_s": 5400.0,
             "not_trained": 1, "folds": 2}]
    table = bench_runs.times_table(rows, ["her2st", "hest"])
    assert table.splitlines() == [
        "| config | her2st epoch | her2st protocol | HEST epoch | HEST protocol |",
        "| --- | --- | --- | --- | --- |",
        "| `hist.yaml` | 2.5 s | 10.0 min | failed |  |",
        "| `tessera.yaml` | - | 12.0 s (no network trained) | 3.0 s | "
        "1.5 h (1 of 2 folds without a network) |"]


def test_readmes_table_lists_the_configs_and_columns_the_command_prints():
    text = (ROOT / "README.md").read_text()
    header = bench_runs.times_table([], list(bench_runs.SIZES)).splitlines()[0]
    assert header in text
    table = text[text.index(header):].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)\.yaml` \| (?:[\d.]+ s|-) \|", table, flags=re.M)
    assert rows == bench_runs.CONFIGS, "README's times table: one measured row per config"


def test_the_thread_table_compares_each_candidate_with_the_fastest():
    rows = [dict(command="train", situation="quiet", candidate=c, wall_s=w, cpu_s=w)
            for c, ws in (("passive", [10.0, 12.0, 11.0]), ("free", [8.0, 9.0, 8.5]))
            for w in ws]
    rows += [dict(command="train", situation="busy", candidate=c, wall_s=w, cpu_s=1.0)
             for c, w in (("passive", 20.0), ("free", 23.0))]
    rows += [dict(command="wait", situation="quiet", candidate="spin", wall_s=1, cpu_s=1,
                  wait_cpu_ms=m, threads=2) for m in (0.5, 0.7, 0.6)]
    table = bench_runs.thread_table(rows, default="free")
    assert "| train | quiet | passive | 11.00 | 11.00 | 1.294 |" in table       # 11 / 8.5
    assert "| train | quiet | free (default) | 8.50 | 8.50 | 1.000 |" in table
    assert "| wait | quiet | spin | CPU ms per 20 ms pause: 0.60 (2 threads) | | |" in table
    assert "train, quiet: fastest free; the default free at 1.000x (target at most 1.05x): met" \
        in table
    assert "train, busy: fastest passive; the default free at 1.150x (target at most 1.2x): met" \
        in table


def test_timed_commands_run_at_once_and_report_their_own_figures(tmp_path):
    sleep = [sys.executable, "-c", "import time; time.sleep(0.5); print('slept')"]
    fail = [sys.executable, "-c", "import sys; sys.exit('no')"]
    a, b = bench_runs.timed([sleep, fail], dict(os.environ), tmp_path)
    assert a["rc"] == 0 and a["wall_s"] >= 0.5 and "slept" in a["output"] and a["cpu_s"] >= 0
    assert b["rc"] == 1 and "no" in b["output"] and b["wall_s"] < a["wall_s"]


def test_a_childs_environment_names_the_candidate_and_nothing_else(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    monkeypatch.setattr(threads, "USER", {"OMP_NUM_THREADS": "3"})
    env = bench_runs.environment("active")
    assert env["TESSERA_THREADS"] == "active" and not set(threads.OWN) & set(env)
    env = bench_runs.environment(None)
    assert env["OMP_NUM_THREADS"] == "3" and "OMP_WAIT_POLICY" not in env


@pytest.mark.parametrize("size,sub", [("her2st", 0), ("visium4k", 16)])
def test_the_synthetic_caches_have_the_sizes_shape(tmp_path, size, sub):
    shape = dict(bench_runs.SIZES[size], spots=[40] * len(bench_runs.SIZES[size]["spots"]))
    shape["spots"][0] = 55
    bench_runs.fake_dataset(tmp_path, shape, sub)
    metas = [data.read_slide_meta(p) for p in sorted(tmp_path.glob("*.h5"))]
    assert [m.n_spots for m in metas] == shape["spots"]
    assert "".join(m.patient for m in metas) == shape["patients"]
    assert all(m.n_features == shape["features"] and len(m.genes) == bench_runs.GENES
               and m.sub_per_spot == (sub or None) for m in metas)
    coords = data.read_slide(tmp_path / "S0.h5").coords.numpy()
    nearest = np.sort(np.linalg.norm(coords[:, None] - coords[None], axis=-1), 1)[:, 1]
    pitch = 200.0 if shape["layout"] == "st" else 100.0
    assert abs(np.median(nearest) - pitch) < 0.05 * pitch
    assert (tmp_path / "programs.gmt").read_text().count("\n") == 50


def commands(path, program) -> list[str]:
    text = (ROOT / path).read_text()
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith(f"python {program}")]


TINY = {"times": ["--scale", "0.02", "--features", "16", "--epochs", "1", "--threads", "1",
                  "--configs", "tessera,hifusion"],
        "demo": ["train.epochs=1", "data.synthetic={slides: 4, seed: 0, spots: 60, pseudo: true}",
                 "data.folds=2", "run.threads=1"],
        "threads": ["--pairs", "1", "--candidates", "passive,free", "--situations", "quiet,busy",
                    "--commands", "wait,train", "--slides", "4", "--spots", "60", "--epochs", "1"]}


@pytest.mark.slow
def test_the_documented_commands_run_at_a_tiny_size(tmp_path):
    """README's times and demo commands and BENCHMARKS.md's threads command, each with its options
    for a tiny size: they finish, and their JSON has a figure for every row."""
    found = commands("README.md", "bench_runs.py") + commands("BENCHMARKS.md", "bench_runs.py")
    assert {shlex.split(c)[2] for c in found} >= {"times", "demo", "threads"}
    for i, cmd in enumerate(found):
        args = shlex.split(cmd)[2:]
        part = args[0]
        out = tmp_path / f"{part}{i}.json"
        args = [a for a in args if a != "--json" and not a.endswith(".json")]
        rows = bench_runs.main(args + TINY[part] + ["--json", str(out),
                                                    "--work", str(tmp_path / f"{part}{i}")])
        saved = json.loads(out.read_text())["rows"]
        assert len(saved) == len(rows) > 0
        assert all("error" not in r for r in saved), [r.get("error") for r in saved]
        if part == "times":
            assert {(r["size"], r["config"]) for r in saved} == \
                {(s, c) for s in bench_runs.SIZES for c in TINY["times"][-1].split(",")}
            assert all(r["protocol_s"] > 0 for r in saved)

"""threads.py: every command sets the thread default before torch loads, from one place; the user's
environment and TESSERA_THREADS win; the free cores are counted from /proc/stat as written here."""
import ast
import os
import subprocess
import sys

import pytest

import threads
from conftest import ROOT

ENTRY_POINTS = ["train.py", "predict.py", "plots.py", "eval.py", "protocols.py", "hest.py",
                "synthetic.py", "bench.py", "bench_accuracy.py"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_import_threads_before_anything_that_loads_torch(name):
    """OpenMP reads its environment once, when torch loads it: `import threads` comes before every
    other import at the top of the file (the standard library's os, sys, ... aside)."""
    tree = ast.parse((ROOT / name).read_text())
    project = {p.stem for p in ROOT.glob("*.py")}
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.append(node.module.split(".")[0])
    loads_torch = [n for n in names if n in project | {"torch", "numpy", "h5py"}]
    assert loads_torch[0] == "threads", loads_torch[:3]


def in_fresh_process(env_extra: dict, code: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in threads.OWN + ("TESSERA_THREADS",)}
    code = ("import os, sys; sys.argv = ['x']; import predict, threads; " + code +
            "print(threads.CHOSEN, *(os.environ.get(k, '-') for k in threads.OWN))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**env, **env_extra})


def test_the_default_is_the_chosen_candidate_and_the_users_environment_wins():
    r = in_fresh_process({})
    expected = [threads.CANDIDATES[threads.CHOICE].get(k, "-") for k in threads.OWN]
    assert r.returncode == 0 and r.stdout.split()[0] == threads.CHOICE, r.stderr[-2000:]
    if threads.CHOICE != "free":
        assert r.stdout.split()[1:] == expected
    r = in_fresh_process({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "7"})
    assert r.stdout.split()[1:3] == ["ACTIVE", "7"]


@pytest.mark.parametrize("choice", ["torch", "passive", "spin", "active"])
def test_tessera_threads_picks_a_candidate(choice):
    r = in_fresh_process({"TESSERA_THREADS": choice})
    assert r.returncode == 0, r.stderr[-2000:]
    expected = [threads.CANDIDATES[choice].get(k, "-") for k in threads.OWN]
    assert r.stdout.split() == [choice] + expected


def test_free_sets_the_thread_count_unless_the_user_did():
    r = in_fresh_process({"TESSERA_THREADS": "free"},
                         "import torch; print(torch.get_num_threads()); ")
    count, line = r.stdout.split("\n")[:2]
    assert r.returncode == 0 and line.split()[0] == "free", r.stderr[-2000:]
    assert 1 <= int(line.split()[3]) == int(count) <= len(os.sched_getaffinity(0))
    r = in_fresh_process({"TESSERA_THREADS": "free", "OMP_NUM_THREADS": "1"})
    assert r.stdout.split()[3] == "1"


def test_an_unknown_candidate_is_one_line():
    r = in_fresh_process({"TESSERA_THREADS": "fastest"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("TESSERA_THREADS=fastest: expected one of "
                                + ", ".join(threads.CANDIDATES))


def test_apply_sets_only_what_the_environment_does_not():
    env = {"TESSERA_THREADS": "passive", "OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.apply(env) == "passive" and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {"TESSERA_THREADS": "spin"}
    threads.apply(env)
    assert env == {"TESSERA_THREADS": "spin", "GOMP_SPINCOUNT": threads.SPIN}


STAT = """cpu  {total}
cpu0 {c0}
cpu1 {c1}
cpu2 {c2}
intr 1 2 3
"""


def ticks(user, idle, iowait=0, system=0):
    return f"{user} 0 {system} {idle} {iowait} 0 0 0 0 0"


def test_free_cores_counts_the_idle_ticks_of_the_cpus_the_process_may_use(monkeypatch, tmp_path):
    """Three CPUs, the process may use 0 and 2: over the sample cpu0 is busy 75 of its 85 ticks,
    cpu2 idle for all its 100 (iowait counts as idle), cpu1 (not ours) busy: 2 x (1 - 75 / 185) =
    1.19 idle cores -> 1."""
    before = STAT.format(total="0", c0=ticks(100, 100), c1=ticks(0, 0), c2=ticks(10, 10))
    after = STAT.format(total="0", c0=ticks(160, 110, system=15), c1=ticks(100, 0),
                        c2=ticks(10, 80, iowait=30))
    files = iter([before, after])
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/stat":
            f = tmp_path / "stat"
            f.write_text(next(files))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})
    busy = (160 + 15 - 100) + 0            # cpu0: user and system ticks over the sample; cpu2: none
    total = (160 + 110 + 15 - 200) + (10 + 80 + 30 - 20)
    assert threads.free_cores(0.0) == max(1, round(2 * (1 - busy / total)))


def test_free_cores_without_proc_stat_uses_the_load_average(monkeypatch):
    def missing(cpus):
        raise OSError("no /proc/stat")
    monkeypatch.setattr(threads, "_busy_ticks", missing)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.free_cores(0.0) == 5
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert threads.free_cores(0.0) == 1

"""The run folder protects itself: it stays inside run.dir and apart from the data, it records the
folds and the data it started with, and locks keep two processes from writing the same config or
fold; folds train as independent jobs (--fold) into one run, with the results of a single
process."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import checks
import data
import eval as evaluation
import runs
import synthetic
import train
from test_checks import expect, refused, root, write  # noqa: F401 (root: the fixture)

ROOT = Path(__file__).resolve().parents[1]


def linear(root, *extra):
    """A fast run: the per-spot linear baseline, 2 folds by patient, one epoch."""
    return [str(ROOT / "configs/linear.yaml"), f"data.root={root}", "data.folds=2",
            "data.genes={by: mean, n: 5}", "train.epochs=1", "run.name=t", "run.threads=1", *extra]


def tree(folder: Path) -> dict:
    """Every file under folder with its bytes: what a refusal must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_here(args, tmp_path, capsys) -> str:
    """train.main refuses with one line and changes no file under tmp_path (the run folder
    included)."""
    before = tree(tmp_path)
    msg = refused(args, tmp_path, capsys)
    assert tree(tmp_path) == before
    return msg


# ---- where a run folder may be -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", ".hidden", "/etc", " "])
def test_run_names_that_leave_run_dir_are_refused(root, tmp_path, capsys, name):
    msg = refused_here(linear(root, f"run.name={name}"), tmp_path, capsys)
    expect(msg, "run.name")


def test_a_run_folder_that_is_a_link_out_of_run_dir_is_refused(root, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "t").symlink_to(tmp_path / "elsewhere")
    expect(refused_here(linear(root), tmp_path, capsys), "runs/t", "outside", "run.dir")


def test_a_run_folder_in_or_around_the_data_is_refused(root, tmp_path, capsys):
    # the data folder itself, a folder inside it, and a folder that holds it
    for extra in ([f"run.dir={tmp_path}", "run.name=caches"], [f"run.dir={root}", "run.name=x"],
                  [f"data.root={tmp_path / 'runs' / 't' / 'caches'}"]):
        if extra[0].startswith("data.root"):
            (tmp_path / "runs" / "t").mkdir(parents=True, exist_ok=True)
            os.replace(root, tmp_path / "runs" / "t" / "caches")
        expect(refused_here([*linear(root), *extra], tmp_path, capsys), "data.root")


# ---- the folds and the data a run started with ---------------------------------------------------
def test_the_fold_record_holds_every_slide_and_its_sha1(root, tmp_path):
    train.main(linear(root, "train.val_slides=1"))
    record = json.loads((tmp_path / "runs" / "t" / "folds.json").read_text())
    cfg = train.load_config(ROOT / "configs/linear.yaml", linear(root, "train.val_slides=1")[1:])
    folds = checks.check_data(cfg, root)
    assert len(record["folds"]) == 2
    for fold, (train_ids, test_ids) in zip(record["folds"], folds):
        assert (fold["test"] == test_ids and fold["train"] + fold["val"] == train_ids
                and len(fold["val"]) == 1)
    for i in range(4):
        blob = (root / f"s{i}.h5").read_bytes()
        assert record["slides"][f"s{i}"] == {"bytes": len(blob),
                                             "sha1": hashlib.sha1(blob).hexdigest()}


def test_resume_refuses_changed_data_naming_the_change(root, tmp_path, capsys):
    train.main(linear(root))
    (tmp_path / "runs" / "t" / "results.json").unlink()       # as if the run had not ended
    kept = {p.name: p.read_bytes() for p in root.glob("*.h5")}
    write(root, 4, patient="B")
    expect(refused_here(linear(root, "--resume"), tmp_path, capsys), "folds.json",
           "--resume", "added: s4")
    (root / "s4.h5").unlink()
    (root / "s1.h5").unlink()
    expect(refused_here(linear(root, "--resume"), tmp_path, capsys), "removed: s1")
    (root / "s1.h5").write_bytes(kept["s1.h5"])                # the same file back: accepted again
    s = data.read_slide(root / "s2.h5")
    s.counts = s.counts + 1                                     # same shapes, other values
    data.write_slide(root / "s2.h5", s, overwrite=True)
    expect(refused_here(linear(root, "--resume"), tmp_path, capsys), "s2.h5", "content changed")
    (root / "s2.h5").write_bytes(kept["s2.h5"])
    assert train.main(linear(root, "--resume")) is not None


def test_resume_refuses_other_folds(root, tmp_path, capsys):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_0.csv").write_text("sample_id\ns0\ns1\n")
    (splits / "test_0.csv").write_text("sample_id\ns2\ns3\n")
    args = linear(root, f"data.split_dir={splits}", "data.group=slide")
    train.main(args)
    (splits / "train_0.csv").write_text("sample_id\ns0\ns2\n")  # same config, other split files
    (splits / "test_0.csv").write_text("sample_id\ns1\ns3\n")
    msg = refused_here([*args, "train.epochs=2", "--resume"], tmp_path, capsys)
    expect(msg, "train.epochs")                                # the config differs first
    msg = refused_here([*args, "--resume"], tmp_path, capsys)
    expect(msg, "fold 0", "test", "s1", "s2")
    # a fold job with a conflicting assignment
    msg = refused_here([*args, "--fold", "0"], tmp_path, capsys)
    expect(msg, "folds.json: --fold expected the folds and data the run started with",
           "fold 0 train slides differ")


# ---- leaking folds -------------------------------------------------------------------------------
def test_a_slide_in_train_and_test_is_refused_before_the_run_folder(root, tmp_path, capsys):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_0.csv").write_text("sample_id\ns0\ns1\ns2\n")
    (splits / "test_0.csv").write_text("sample_id\ns2\ns3\n")
    msg = refused_here(linear(root, f"data.split_dir={splits}", "data.group=slide"),
                       tmp_path, capsys)
    expect(msg, "test_0.csv", "data.split_dir", "s2")
    assert not (tmp_path / "runs").exists()


def test_a_patient_in_train_and_test_is_refused_when_folds_group_patients(root, tmp_path, capsys):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_0.csv").write_text("sample_id\ns0\ns2\n")   # patients A, B
    (splits / "test_0.csv").write_text("sample_id\ns1\ns3\n")    # patients A, B
    msg = refused_here(linear(root, f"data.split_dir={splits}"), tmp_path, capsys)
    expect(msg, "test_0.csv", "patient A", "s0", "s1", "data.group")
    cfg = train.load_config(ROOT / "configs/linear.yaml", linear(root, f"data.split_dir={splits}",
                                                                  "data.group=slide")[1:])
    checks.check_folds(cfg, checks.check_data(cfg, root), root)  # grouped by slide: allowed


# ---- locks and joins -----------------------------------------------------------------------------
def lock_as(path: Path, pid: int, host: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                "started": "2026-01-01 00:00:00"}))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_an_existing_run_never_continues_without_resume(root, tmp_path, capsys):
    """A start that failed before any fold finished leaves config.yaml: the same config
    needs --resume, another config another run.name."""
    args = linear(root)
    train.main(args)
    run = tmp_path / "runs" / "t"
    for p in list(run.rglob("*")):                              # as if killed in the first epoch
        if p.is_file() and p.name not in ("config.yaml", "folds.json", "log.txt"):
            p.unlink()
    expect(refused_here(args, tmp_path, capsys), "runs/t", "--resume", "run.name")
    expect(refused_here([*args, "model.arch=mlp"], tmp_path, capsys), "runs/t",
           "model.arch", "run.name")
    expect(refused_here([*args, "model.arch=mlp", "--resume"], tmp_path, capsys), "model.arch")
    assert train.main([*args, "--resume"]) is not None and (run / "results.json").exists()


def test_fold_jobs_join_a_run_and_results_wait_for_every_fold(root, tmp_path, capsys):
    args = linear(root)
    assert train.main([*args, "--fold", "0"]) is None
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "t"
    assert ("fold_1" in out and not (run / "results.json").exists()
            and (run / "fold_0" / "done").exists())
    assert not (run / "fold_0" / "lock").exists() and not (run / "lock").exists()
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "runs/t"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert (r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
            and "fold_1" in r.stderr), r.stderr
    assert not (run / "results.json").exists()
    expect(refused_here([*args, "model.arch=mlp", "--fold", "1"], tmp_path, capsys), "model.arch")
    expect(refused_here([*args, "--fold", "2"], tmp_path, capsys), "--fold", "2", "0, 1")
    lock_as(run / "fold_1" / "lock", os.getpid())               # a live process trains fold 1
    expect(refused_here([*args, "--fold", "1"], tmp_path, capsys), "fold_1/lock", str(os.getpid()))
    lock_as(run / "fold_1" / "lock", os.getpid(), host="another-host")
    expect(refused_here([*args, "--fold", "1"], tmp_path, capsys), "another-host", "delete")
    pid = dead_pid()
    lock_as(run / "fold_1" / "lock", pid)                       # a killed process left its lock
    assert train.main([*args, "--fold", "0,1"]) is not None
    out = capsys.readouterr().out
    assert f"pid {pid}" in out and "no longer running" in out and "fold 0: finished earlier" in out
    assert (run / "results.json").exists() and not (run / "fold_1" / "lock").exists()
    (run / "fold_1" / "done").unlink()  # fold 1 predicting again: its files are not final
    lock_as(run / "fold_1" / "lock", os.getpid())
    with pytest.raises(FileNotFoundError, match="fold_1 missing"):
        evaluation.evaluate_run(run, partial=False)
    assert evaluation.evaluate_run(run)["missing_folds"] == ["fold_1"]


def test_a_run_lock_of_a_dead_process_is_taken_over(root, tmp_path, capsys):
    pid = dead_pid()
    lock_as(tmp_path / "runs" / "t" / "lock", pid)
    assert train.main(linear(root)) is not None
    assert (f"pid {pid}" in capsys.readouterr().out
            and not (tmp_path / "runs" / "t" / "lock").exists())


def test_fold_arguments(root, tmp_path, capsys):
    expect(refused_here(linear(root, "--fold", "x"), tmp_path, capsys), "--fold", "'x'")
    expect(refused_here(linear(root, "--fold", "-1"), tmp_path, capsys), "--fold")
    assert runs.fold_numbers(["0,2", "3", "2"], 4) == [0, 2, 3]


@pytest.mark.slow
def test_a_stopped_fold_job_leaves_no_lock(root, tmp_path):
    """SIGTERM (a scheduler's stop, scancel) releases the fold's lock: a later --resume on any host
    finds the fold free and continues it."""
    job = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                            *linear(root, "train.epochs=200", "--fold", "1")],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in job.stdout:
        if line.startswith("fold 1 epoch 1/200"):
            assert (tmp_path / "runs" / "t" / "fold_1" / "lock").exists()
            job.terminate()
            break
    out, err = job.communicate(timeout=60)
    assert (job.returncode == 143 and not (tmp_path / "runs" / "t" / "fold_1" / "lock").exists()), (
        job.returncode, err)
    assert (tmp_path / "runs" / "t" / "fold_1" / "checkpoint.pt").exists()


def predictions(run: Path) -> dict:
    return {p.relative_to(run): evaluation.read_predictions(p)
            for p in sorted(run.glob("fold_*/pred/*.h5"))}


@pytest.mark.slow
def test_folds_as_concurrent_jobs_give_the_single_process_results(tmp_path):
    """Two folds of a small tessera trained in one process, then as two concurrent `--fold`
    processes into another run: the same metrics and the same predictions, bit for bit."""
    synthetic.make_synthetic(tmp_path / "syn", n_slides=4, seed=0, n_spots=120, pseudo=True,
                             log=lambda s: None)
    args = [str(ROOT / "train.py"), str(ROOT / "configs/default.yaml"),
            f"data.root={tmp_path / 'syn'}", "data.folds=2", "data.genes={by: hvg, n: 10}",
            "model.dim=8", "model.heads=2", "model.pathway_tokens=4", "train.epochs=2",
            "run.threads=1"]
    one = subprocess.run([sys.executable, *args, "run.name=one"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    jobs = [subprocess.Popen([sys.executable, *args, "run.name=jobs", "--fold", str(k)],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for k in (0, 1)]
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    a, b = (json.loads((tmp_path / "runs" / n / "results.json").read_text())
            for n in ("one", "jobs"))
    assert a["metrics"] == b["metrics"] and a["slides"] == b["slides"]
    pa, pb = predictions(tmp_path / "runs" / "one"), predictions(tmp_path / "runs" / "jobs")
    assert sorted(pa) == sorted(pb) and len(pa) == 4
    for name in pa:
        for key in ("pred", "true", "coords"):
            assert np.array_equal(pa[name][key], pb[name][key]), (name, key)
    assert yaml.safe_load((tmp_path / "runs/one/folds.json").read_text())["folds"] == \
        yaml.safe_load((tmp_path / "runs/jobs/folds.json").read_text())["folds"]


def test_locks_are_exclusive_and_a_broken_one_is_named(tmp_path):
    path = tmp_path / "lock"
    assert runs.take(path) == (None, None)
    owner = json.loads(path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert runs.take(path) == (owner, None)  # held: by this very process, which runs
    runs.release(path)
    assert not path.exists()
    path.write_text("")  # created, never written: its owner died there
    os.utime(path, (time.time() - 60, time.time() - 60))
    holder, note = runs.take(path)
    assert holder == {} and note is None
    assert "delete it if no process holds it" in runs.held(path, holder,
                                                           "fold 0 is being trained by")
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(),
                                "started": "then"}))
    holder, note = runs.take(path)
    assert (holder is None and "no longer running" in note
            and json.loads(path.read_text())["pid"] == os.getpid())


# ---- the time left of a run -------------------------------------------------------------------
def test_step_fit_is_the_least_squares_line_of_numpy():
    g = np.random.default_rng(3)
    n = g.integers(100, 5000, size=40)
    t = 0.08 + 3e-4 * n + g.normal(0, 0.01, size=40)
    b, a = np.polyfit(n, t, 1)
    assert runs.step_fit(list(zip(n.tolist(), t.tolist()))) == pytest.approx((a, b), rel=1e-9)
    same = [(500, 1.0), (510, 1.2), (495, 0.8)]                  # one size: seconds per spot alone
    assert runs.step_fit(same) == pytest.approx((0.0, 3.0 / 1505))
    assert runs.step_fit([(100, 2.0), (1000, 1.0)])[1] == 0.0      # no negative slope


def scripted_run(folds: list[dict], epochs: int, seed: int = 0, noise: float = 0.05):
    """A cross-validation on a fake clock whose costs follow a model of their own, not the one
    Progress assumes, in the proportions measured for configs/tessera.yaml on the her2st sections
    (train.py's log, 2-core VM: an epoch of one 283-spot slide 2.3 s, of five ~180-spot slides
    10.7 s, a fold's set-up about 5 s, a test slide's forward pass about 0.6 of a step): a training
    step 1.78 s + 1.05e-3 n^1.1 s (n spots), a forward pass (validation, test) 0.6 of that, set-up
    2 s + 2.5e-3 s per spot read, 0.5 s of files after the epochs; each duration times a random
    factor exp(noise * z). Returns (fold, epoch, estimate, truth) at the end of every epoch, truth
    being the sum of the durations still to come."""
    step = lambda n: 1.78 + 1.05e-3 * n ** 1.1                          # noqa: E731
    g = np.random.default_rng(seed)
    jitter = lambda s: s * float(np.exp(noise * g.standard_normal()))   # noqa: E731
    script = []                                   # (what, fold, spots, seconds)
    for k, f in enumerate(folds):
        script.append(("setup", k, None, jitter(2.0 + 2.5e-3 * f["read"])))
        for e in range(epochs):
            for i in g.permutation(len(f["train"])):
                n = f["train"][i]
                script.append(("step", k, n, jitter(step(n))))
            script.append(("val", k, e, jitter(sum(0.6 * step(n) for n in f["val"]))))
        script.append(("after", k, None, jitter(0.5 + sum(0.6 * step(n) for n in f["test"]))))
    now = [0.0]
    progress = runs.Progress(folds, epochs, clock=lambda: now[0])
    out, epoch_s = [], 0.0
    for i, (what, k, n, seconds) in enumerate(script):
        if what == "setup":
            progress.start_fold()
        now[0] += seconds
        if what == "setup":
            progress.begin_epochs(epochs)
        elif what == "step":
            progress.step(n, seconds)
            epoch_s += seconds
        elif what == "val":
            progress.epoch(epoch_s + seconds)
            out.append((k, n, progress.seconds_left(), sum(s for *_, s in script[i + 1:])))
            epoch_s = 0.0
        else:
            progress.end_fold()
    assert progress.seconds_left() == 0
    return out


def fold(train, test, val=()):
    return {"train": list(train), "val": list(val), "test": list(test),
            "read": sum(train) + sum(val) + sum(test)}


HER2ST = [283, 187, 180, 184, 181, 178]          # B4, C2 ... C6: two folds by patient
UNEQUAL = {
    "her2st, B first": [fold(HER2ST[:1], HER2ST[1:]), fold(HER2ST[1:], HER2ST[:1])],
    "her2st, C first": [fold(HER2ST[1:], HER2ST[:1]), fold(HER2ST[:1], HER2ST[1:])],
    "four folds of unequal slides": [fold([300, 900], [4000], val=[600]), fold([4000, 600, 2500],
                                     [300, 900]), fold([300, 900, 4000], [600, 2500], val=[1200]),
                                     fold([1200, 800], [300])],
    "one large fold among small ones": [fold([500, 500], [500]), fold([5000, 4000, 3000], [500]),
                                        fold([500], [500, 500])],
}


@pytest.mark.parametrize("case", sorted(UNEQUAL))
@pytest.mark.parametrize("seed", [0, 1])
def test_eta_at_the_first_epoch_of_the_second_fold_is_within_a_quarter(case, seed):
    """Folds of unequal size (spots and slides of their training, validation and test sets): the
    estimate printed at the first epoch of the second fold is within 25% of the time the run then
    takes."""
    rows = scripted_run(UNEQUAL[case], epochs=10, seed=seed)
    k, e, estimate, truth = next(r for r in rows if r[0] == 1)
    assert e == 0 and abs(estimate - truth) <= 0.25 * truth, (estimate, truth)


def test_eta_of_unequal_folds_stays_within_a_quarter_while_epochs_remain():
    """From the first epoch of the second fold on, while the run still has epochs to train."""
    folds = UNEQUAL["four folds of unequal slides"]
    rows = scripted_run(folds, epochs=10, seed=2)
    checked = [(est, truth) for k, e, est, truth in rows if k >= 1 and (k < 3 or e < 9)]
    errors = [abs(est - truth) / truth for est, truth in checked]
    assert len(errors) == 3 * 10 - 1 and max(errors) <= 0.25, max(errors)


def test_eta_of_equal_folds_is_within_a_quarter_after_the_first_fold():
    """Three folds alike, epochs of varying length: every estimate after the first fold is within
    25% of the time that really remains, the folds' time outside their epochs included."""
    rows = scripted_run([fold([1500] * 6, [1500] * 3)] * 3, epochs=10, seed=4, noise=0.2)
    errors = [abs(est - truth) / truth for k, _, est, truth in rows if k >= 1]
    assert len(errors) == 20 and max(errors) <= 0.25, max(errors)


def test_eta_of_a_resumed_fold_counts_only_the_epochs_left():
    now = [0.0]
    progress = runs.Progress([fold([100], [])], 10, clock=lambda: now[0])
    progress.start_fold()
    progress.begin_epochs(2)                    # resumed at epoch 8 of 10
    now[0] += 2.0
    progress.step(100, 2.0)
    assert progress.epoch(2.0) == "0m02s"      # one epoch of 2 s left, nothing to predict


def test_a_fold_that_trains_nothing_costs_its_set_up_and_predictions_only():
    now = [0.0]
    progress = runs.Progress([fold([300], [500]), fold([500], [300])], 10, clock=lambda: now[0])
    progress.start_fold()
    now[0] += 3.0
    progress.begin_epochs(0)                    # every test slide falls back: no network
    now[0] += 1.0
    assert progress.end_fold() == (4.0, 0.0, 0)
    # the second fold: no epochs, set-up at 3 s per 800 spots read; after: 1 s for 500 test spots
    # measured once, so the geometric mean of all fixed (1 s) and all per test spot (300 / 500 s)
    assert progress.seconds_left() == pytest.approx(3.0 + (1.0 * 1.0 / 500 * 300) ** 0.5)


def test_a_run_logs_each_folds_time(root, tmp_path):
    """train.py: one line per fold with its time and the part in epochs (bench_runs.py reads it)."""
    train.main(linear(root, f"run.dir={tmp_path}", "run.name=t"))
    log = (tmp_path / "t" / "log.txt").read_text()
    for k in range(2):
        line = next(x for x in log.splitlines() if x.startswith(f"fold {k}: done in "))
        words = line.split()
        total, in_epochs = float(words[4].rstrip("s,")), float(words[7].rstrip("s"))
        assert 0 <= in_epochs <= total and line.endswith("in 1 epoch(s)")

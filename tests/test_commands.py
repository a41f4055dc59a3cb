"""The command lines: threads, help, config keys, number formats in tables, the time-left estimate."""
import os
import subprocess
import sys

import pytest

import eval as evaluation
import runs
import train
from conftest import ROOT


# ---- the time left of a run ------------------------------------------------------------------------
def test_eta_is_within_a_quarter_of_the_truth_after_the_first_fold():
    """A scripted run on a fake clock: 3 folds, each a set-up, epochs of varying length and a prediction
    of the test slides. After the first fold every estimate is within 25% of the time that really remains
    (the sum of the scripted durations still to come), including the folds' time outside their epochs."""
    setup, predict_s, epochs = 20.0, 15.0, [3.0, 2.0, 2.5, 2.2, 2.8, 2.4, 2.6, 2.1, 2.5, 2.9]
    script = [("setup", setup)] + [("epoch", e) for e in epochs] + [("predict", predict_s)]
    script = script * 3
    now = [0.0]
    progress = runs.Progress([len(epochs)] * 3, clock=lambda: now[0])
    errors, fold, in_fold = [], 0, 0
    for i, (what, seconds) in enumerate(script):
        if what == "setup":
            progress.start_fold()
        now[0] += seconds
        if what == "epoch":
            in_fold += 1
            progress.epoch(seconds, len(epochs) - in_fold)
            truth = sum(s for _, s in script[i + 1:])
            if fold >= 1 and truth > 0:
                errors.append(abs(progress.seconds_left() - truth) / truth)
        if what == "predict":
            progress.end_fold()
            fold, in_fold = fold + 1, 0
    assert len(errors) == 2 * len(epochs) and max(errors) <= 0.25, errors
    assert progress.seconds_left() == 0


def test_eta_of_a_resumed_fold_counts_only_the_epochs_left():
    now = [0.0]
    progress = runs.Progress([10], clock=lambda: now[0])
    progress.start_fold()
    now[0] += 2.0
    assert progress.epoch(2.0, 1) == "0m02s"      # resumed at epoch 8 of 10: one epoch of 2 s left


# ---- numbers in tables -----------------------------------------------------------------------------
@pytest.mark.parametrize("x, text", [(0.61234, "0.6123"), (-8653974521745098899642646528.0, "-8.654e+27"),
                                     (0.0, "0.0000"), (2.5e-5, "2.500e-05"), (999999.0, "999999.0000"),
                                     (1e6, "1.000e+06"), (None, "n/a"), (-0.001, "-0.0010")])
def test_numbers_in_tables_are_readable(x, text):
    assert evaluation.number(x) == text


def test_a_diverged_metric_prints_in_scientific_notation_in_every_table():
    entry = {"mean": -8653974521745098899642646528.0, "std": 1.5e-7, "folds": [-8653974521745098899642646528.0]}
    results = {"run": "r", "n_folds": 1, "genes": 3, "slides_per_fold": [1], "fold_names": ["fold_0"],
               "metrics": {m: entry for m in evaluation.METRICS}, "zero_variance_genes": {"folds": [0]},
               "zero_variance_genes_slide": {"folds": [0]}, "slides_left_out": {}, "missing_folds": []}
    for table in (evaluation.format_table([results]), evaluation._run_markdown(results)):
        assert "-8.654e+27 ± 1.500e-07" in table and "8653974521745098899642646528" not in table


# ---- threads, help and config keys -----------------------------------------------------------------
ENTRY_POINTS = ["train.py", "predict.py", "plots.py", "eval.py", "protocols.py", "hest.py", "synthetic.py"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_make_openmp_wait_passively_unless_the_user_chose(name):
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the default must be set before any import
    that imports torch, and only when the user has not set it."""
    text = (ROOT / name).read_text()
    first_import = min(i for i in (text.find("\nimport torch"), text.find("\nimport data"), text.find("\nfrom data"),
                                   text.find("\nimport eval"), text.find("\nimport numpy")) if i >= 0)
    assert 0 <= text.find('os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")') < first_import


def test_the_wait_policy_is_set_only_when_the_user_has_not_set_it():
    code = "import os, sys; sys.argv = ['x']; import predict; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=env if given is None else {**env, "OMP_WAIT_POLICY": given})
        assert r.returncode == 0 and r.stdout.split()[-1] == expected, r.stderr[-2000:]


def help_text(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_lists_subcommands_and_the_threads_option(capsys):
    import hest
    import plots
    import predict
    assert all(w in help_text(train.run, ["--help"], capsys) for w in ("--threads", "--keys", "--resume"))
    assert "--threads" in help_text(predict.main, ["--help"], capsys)
    top = help_text(plots.main, ["--help"], capsys)
    assert "plot" in top and "attention" in top
    for command in ("plot", "attention"):
        assert "--threads" in help_text(plots.main, [command, "--help"], capsys)
    assert all(c in help_text(hest.main, ["--help"], capsys) for c in ("import-hest", "embed", "bin"))
    for command in ("import-hest", "embed", "bin"):
        assert "--threads" in help_text(hest.main, [command, "--help"], capsys)


def test_train_threads_option_is_run_threads(monkeypatch):
    seen = {}
    monkeypatch.setattr(train, "load_config", lambda path, overrides: seen.setdefault("o", list(overrides)) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.run(["--threads", "1"])
    assert seen["o"] == ["run.threads=1"]


def test_train_keys_lists_every_key_with_its_default_and_meaning(capsys):
    assert train.run(["--keys"]) == {}
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split(" = ")[0]: line for line in lines}
    expected = [f"{s}.{k}" for s, keys in train.DEFAULTS.items() for k in keys]
    assert list(listed) == expected
    for name, line in listed.items():
        default, meaning = line.split(" = ", 1)[1].split(" # ", 1)
        section, key = name.split(".")
        import yaml
        assert yaml.safe_load(default.strip()) == train.DEFAULTS[section][key], name
        assert meaning.strip(), f"{name}: no meaning"
    assert listed["data.root"].endswith("# folder of <slide>.h5 caches")
    assert listed["model.w"].endswith("# window half-size: windows are 2w x 2w sites (HiST)")
    assert listed["run.threads"].split(" # ")[1].startswith("CPU threads for torch")


def test_lists_cut_in_error_messages_end_with_an_ellipsis():
    import plots
    with pytest.raises(ValueError, match=r"G0, G1, G2, G3, G4 \.\.\.\)"):
        plots.choose_genes({f"G{i}": 0.0 for i in range(9)}, genes=["X"])


def test_a_negative_thread_count_is_one_line():
    import plots
    with pytest.raises(SystemExit, match=r"plots.py plot: --threads -1: expected a number of threads >= 0"):
        plots.main(["plot", "nowhere", "--threads", "-1"])

"""The command lines: help, config keys, number formats in tables (threads: test_threads.py; the
time-left estimate: test_runs.py)."""
import pytest

import eval as evaluation
import train


# ---- numbers in tables ---------------------------------------------------------------------------
@pytest.mark.parametrize("x, text",
                         [(0.61234, "0.6123"), (-8653974521745098899642646528.0, "-8.654e+27"),
                          (0.0, "0.0000"), (2.5e-5, "2.500e-05"), (999999.0, "999999.0000"),
                          (1e6, "1.000e+06"), (None, "n/a"), (-0.001, "-0.0010")])
def test_numbers_in_tables_are_readable(x, text):
    assert evaluation.number(x) == text


def test_a_diverged_metric_prints_in_scientific_notation_in_every_table():
    entry = {"mean": -8653974521745098899642646528.0, "std": 1.5e-7,
             "folds": [-8653974521745098899642646528.0]}
    results = {"run": "r", "n_folds": 1, "genes": 3, "slides_per_fold": [1],
               "fold_names": ["fold_0"], "metrics": {m: entry for m in evaluation.METRICS},
               "zero_variance_genes": {"folds": [0]}, "zero_variance_genes_slide": {"folds": [0]},
               "slides_left_out": {}, "missing_folds": []}
    for table in (evaluation.format_table([results]), evaluation._run_markdown(results)):
        assert "-8.654e+27 ± 1.500e-07" in table and "8653974521745098899642646528" not in table


# ---- help and config keys ------------------------------------------------------------------------
def help_text(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_lists_subcommands_and_the_threads_option(capsys):
    import hest
    import plots
    import predict
    assert all(w in help_text(train.run, ["--help"], capsys)
               for w in ("--threads", "--keys", "--resume"))
    assert "--threads" in help_text(predict.main, ["--help"], capsys)
    top = help_text(plots.main, ["--help"], capsys)
    assert "plot" in top and "attention" in top
    for command in ("plot", "attention"):
        assert "--threads" in help_text(plots.main, [command, "--help"], capsys)
    assert all(c in help_text(hest.main, ["--help"], capsys)
               for c in ("import-hest", "embed", "bin"))
    for command in ("import-hest", "embed", "bin"):
        assert "--threads" in help_text(hest.main, [command, "--help"], capsys)


def test_train_threads_option_is_run_threads(monkeypatch):
    seen = {}
    monkeypatch.setattr(train, "load_config",
                        lambda path, overrides: seen.setdefault("o", list(overrides)) and 1 / 0)
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
    with pytest.raises(SystemExit,
                       match=r"plots.py plot: --threads -1: expected a number of threads >= 0"):
        plots.main(["plot", "nowhere", "--threads", "-1"])

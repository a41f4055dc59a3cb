"""bench.py at tiny sizes: the edge-list and dense implementations agree with window_attention (a
correctness cross-check of all three), the layouts are what they say, the JSON is written, the
exponent fit recovers a known exponent. Timings are never asserted."""
import json
import math

import pytest
import torch

import attention
import bench
import kernels
import lattice


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("kind,pitch", [("visium", 100.0), ("hd", 8.0)])
def test_layout_has_n_spots_on_the_pitch_with_an_irregular_footprint(kind, pitch):
    xy = bench.layout(kind, 500)
    assert xy.shape == (500, 2) and len(torch.unique(xy.round(), dim=0)) == 500
    nn = torch.cdist(xy, xy).fill_diagonal_(float("inf")).amin(1)
    assert abs(float(nn.median()) - pitch) < 0.05 * pitch
    span = xy.amax(0) - xy.amin(0)
    # not a filled rectangle: tissue covers part of the box
    assert float(span.prod()) > 1.3 * 500 * pitch ** 2


@pytest.mark.parametrize("kind", ["visium", "hd"])
@pytest.mark.parametrize("shift", [False, True])
def test_edge_list_and_dense_equal_window_attention_with_gradients(kind, shift):
    n, H, D, S = 500, 3, 8, 4 * bench.W ** 2
    rulebook = lattice.window_rulebook(bench.sites_of(kind, n), bench.W, shift=shift)[0]
    q, k, v = (torch.randn(n, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(H, S, S, dtype=torch.float64, requires_grad=True)
    pairs, (win, slot) = bench.pair_list(rulebook), bench.token_windows(rulebook, n)
    # every ordered pair in a window
    assert len(pairs[0]) == int(((rulebook >= 0).sum(1) ** 2).sum())
    runs = {"tessera": lambda: kernels.window_attention(q, k, v, rulebook, rulebook, bias),
            "reference": lambda: attention.window_attention(q, k, v, rulebook, rulebook, bias),
            "edge": lambda: bench.edge_attention(q, k, v, *pairs, bias),
            "dense": lambda: bench.dense_attention(q, k, v, win, slot, bias)}
    cotangent = torch.randn(n, H, D, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(2))
    results = {}
    for name, fn in runs.items():
        out = fn()
        results[name] = [out] + list(torch.autograd.grad((out * cotangent).sum(), (q, k, v, bias)))
    for name in ("reference", "edge", "dense"):
        for a, b in zip(results[name], results["tessera"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_run_case_reports_agreement_and_memory_in_process():
    row = bench.run_case(dict(part="window", name="edge", mode="fwd+bwd", layout="hd", n=500,
                              device="cpu", repeats=1))
    assert row["max_err"] < 1e-5 and row["pairs"] > 500
    assert row["time_s"] > 0 and row["peak_mb"] > 0 and len(row["times"]) == 1


def test_child_process_measures_one_row():
    row = bench.measure(dict(part="pyramid", name="pyramid", mode="build", layout="visium", n=500,
                             device="cpu", repeats=1, mem_limit_gb=8, threads=1))
    assert "error" not in row, row
    assert row["peak_mb"] >= row["base_mb"] > 50  # a whole Python process with torch


def test_main_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--inprocess", "--sizes", "300,600", "--layouts", "hd", "--parts",
                       "pyramid,window,step", "--configs", "default", "--repeats", "1", "--fit-min",
                       "300", "--json", str(out)])
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["rows"]) == len(rows) == 2 * (1 + 8 + 2)   # window: 4 ways x fwd, fwd+bwd
    assert {r["part"] for r in data["rows"]} == {"pyramid", "window", "step"}
    assert all("time_s" in r for r in data["rows"]), [r.get("error") for r in data["rows"]]
    edge = [r for r in data["rows"] if r["name"] == "edge"]
    assert all(r["max_err"] < 1e-5 and r["time_ratio"] > 0 for r in edge)
    assert all(r["exponent"] is not None for r in data["rows"])
    assert table.count("\n") == len(rows) + 2 and "| window | dense | fwd+bwd | hd | 600 |" in table


def test_plan_respects_the_caps():
    ns = dict(device="cpu", repeats=1, mem_limit_gb=None, threads=None, overrides=[],
              features_dtype="float32", layouts=["hd"], sizes=[4000, 16000], memory_sizes=[],
              parts=["window", "step"], configs=["hist"],
              kernels=["fast", "reference"], flops=False, max_n={"dense": 8192, "hist.train": 4000})
    specs = bench.plan(type("Args", (), ns))
    names = {(s["name"], s["mode"], s["n"]) for s in specs}
    assert ("dense", "fwd", 4000) in names and ("dense", "fwd", 16000) not in names
    assert ("hist", "train", 4000) in names and ("hist", "train", 16000) not in names
    assert ("hist", "infer", 16000) in names and ("edge", "fwd+bwd", 16000) in names
    assert {s["kernels"] for s in specs if s["part"] == "step"} == {"fast", "reference"}


@pytest.mark.parametrize("exponent", [1.0, 1.15, 2.0])
def test_fit_exponent_recovers_a_known_exponent(exponent):
    g = torch.Generator().manual_seed(1)
    ns = [1000, 4000, 16000, 64000, 256000]
    ts = [3e-6 * n ** exponent * math.exp(0.02 * float(torch.randn(1, generator=g))) for n in ns]
    assert abs(bench.fit_exponent(ns, ts) - exponent) < 0.03
    assert bench.fit_exponent([1000], [1.0]) is None


def test_parse_n():
    assert ([bench.parse_n(s) for s in ("1k", "4K", "1M", "2.5k", "500")]
            == [1000, 4000, 1000000, 2500, 500])

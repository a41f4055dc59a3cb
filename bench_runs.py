"""Whole commands timed, as a user runs them: the thread candidates of threads.py side by side, the
seconds per epoch and per protocol of each config at three data sizes, and the demo from a clean
copy. Every timed command is a fresh `python train.py` / `python predict.py` process; its wall
time is measured around it, its CPU time (user + system) from the operating system (wait4).

    python bench_runs.py threads --json threads.json    # BENCHMARKS.md, "Threads"
    python bench_runs.py times --json times.json        # README, "Time to plan with"
    python bench_runs.py demo                           # README's demo time, from a clean copy

threads   train.py (2 folds x --epochs of configs/default.yaml on --slides synthetic slides of
          --spots spots) and predict.py (that run's fold models on the same slides), under each
          candidate of threads.CANDIDATES, in three situations: `quiet` (the command alone), `busy`
          (beside one CPU-bound process, a Python loop) and `pair` (two copies of the command at
          once, both timed). Paired: each round runs every candidate once, in an order reversed
          from round to round (A B C, C B A, ...), after one untimed warm-up. `wait` measures how
          long a waiting OpenMP thread spins: CPU milliseconds a process burns per 20 ms pause
          between two parallel operations.
times     each config on each size of SIZES (synthetic caches of those shapes, random features and
          counts: the time does not depend on the values), 2 folds by patient, --epochs epochs
          measured; seconds per epoch (the epochs after each fold's first, mean over the folds) and
          the whole protocol (each fold's time outside its epochs plus the config's train.epochs
          times its epoch, plus the process's own start and end) from train.py's log.
demo      `python train.py` in a fresh copy of the project's files (no data/, no runs/): the
          demo as a new user runs it, synthetic data generation included.
"""
from __future__ import annotations

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bench
import data
import synthetic
import train

ROOT = Path(__file__).resolve().parent
SITUATIONS = ("quiet", "busy", "pair")
TARGETS = {"quiet": 1.05, "busy": 1.2}      # the default against the fastest candidate, at most
# Data sizes a user plans with: her2st's six imaged sections (legacy ST, 200 um square grid, the
# spots README's recipe reads, hest.py's built-in encoder's 48 features); a task of HEST-Benchmark's
# shape (four Visium sections of two patients, UNI-sized 1,024 features); a Visium slide of 4,000
# spots (two of them, one per fold). Folds: 2, by patient.
SIZES = {
    "her2st": {"spots": [283, 187, 180, 184, 181, 178], "patients": "BCCCCC", "layout": "st",
               "features": 48},
    "hest": {"spots": [3000] * 4, "patients": "AABB", "layout": "visium", "features": 1024},
    "visium4k": {"spots": [4000] * 2, "patients": "AB", "layout": "visium", "features": 1024},
}
LABELS = {"her2st": "her2st", "hest": "HEST", "visium4k": "4k"}   # README's column names
GENES = 2000                               # genes in every synthetic cache (hist.yaml keeps 2,000)
CONFIGS = ["default", "tessera", "hist", "feast", "stf", "hifusion", "mlp", "linear", "ridge",
           "ridge_spatial"]


# ---- running commands -------------------------------------------------------------------------
def environment(candidate: str | None) -> dict:
    """This process's environment for a child, with `candidate` (threads.CANDIDATES) as its thread
    setting, the variables candidates set removed first; a candidate of None: the user's own
    (threads.USER: the child applies the default itself, as a command run by hand does)."""
    env = {k: v for k, v in os.environ.items() if k not in threads.OWN}
    if candidate is None:
        return {**env, **threads.USER}
    return {**env, "TESSERA_THREADS": candidate}


def timed(commands: list[list[str]], env: dict, cwd: Path) -> list[dict]:
    """Start the commands at once and wait for them all: each one's wall and CPU seconds, exit code,
    standard output and the end of its error output."""
    t0 = time.perf_counter()
    logs = [tempfile.TemporaryFile() for _ in commands]
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
             for c, log in zip(commands, logs)]
    out = [None] * len(procs)
    while any(o is None for o in out):
        for i, p in enumerate(procs):
            if out[i] is None:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    p.returncode = os.waitstatus_to_exitcode(status)
                    out[i] = {"wall_s": time.perf_counter() - t0, "rc": p.returncode,
                              "cpu_s": usage.ru_utime + usage.ru_stime}
        time.sleep(0.005)
    for o, log in zip(out, logs):
        log.seek(0)
        o["output"] = log.read().decode(errors="replace")
        log.close()
    return out


class Burner:
    """One CPU-bound process beside the measured commands (a Python loop), for `busy`."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def failed(result: dict, what: str) -> str:
    return f"{what}: exit code {result['rc']}: {result['output'].strip()[-300:]}"


# ---- threads: the candidates side by side ------------------------------------------------------
WAIT_CHILD = """
import os, resource, time, threads, torch
x = torch.randn(200000)
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
for _ in range(5):
    x.exp()
c0 = cpu()
for _ in range(100):
    x.exp()
    time.sleep(0.02)
print("wait_cpu_ms", 1e3 * (cpu() - c0) / 100, torch.get_num_threads())
"""


def thread_commands(work: Path, args) -> dict:
    """name -> a function of a trial number giving the command line(s) of one run."""
    syn = work / "syn"
    tr = lambda run_dir, name: [sys.executable, str(ROOT / "train.py"), f"data.root={syn}",  # noqa
                                "data.folds=2", f"train.epochs={args.epochs}",
                                "data.synthetic=null", f"run.dir={run_dir}", f"run.name={name}"]
    return {"train": lambda i: tr(work / "runs", f"t{i}"),
            "predict": lambda i: [sys.executable, str(ROOT / "predict.py"), "--run",
                                  str(work / "base" / "base"), "--slides", str(syn), "--out",
                                  str(work / "pred" / f"p{i}")],
            "wait": lambda i: [sys.executable, "-c", WAIT_CHILD],
            "_base": lambda i: tr(work / "base", "base")}


def measure_threads(args, work: Path) -> list[dict]:
    synthetic.make_synthetic(work / "syn", n_slides=args.slides, seed=0, n_spots=args.spots,
                             pseudo=True, log=lambda *a: None)
    cmds = thread_commands(work, args)
    base = timed([cmds["_base"](0)], environment(None), ROOT)[0]   # predict.py's run
    if base["rc"]:
        raise SystemExit(failed(base, "bench_runs.py threads: training the run predict.py uses"))
    rows, trial = [], 0
    plan = [(s, c) for s in args.situations for c in args.commands if c != "wait" or s == "quiet"]
    for situation, command in plan:
        copies = 2 if situation == "pair" else 1
        for rnd in range(args.pairs + 1):            # round 0: the untimed warm-up
            order = args.candidates if rnd % 2 else args.candidates[::-1]
            for candidate in order:
                trial += 1
                lines = [cmds[command](f"{trial}_{j}") for j in range(copies)]
                if situation == "busy":
                    with Burner():
                        got = timed(lines, environment(candidate), ROOT)
                else:
                    got = timed(lines, environment(candidate), ROOT)
                for r in got:
                    if r["rc"]:
                        raise SystemExit(failed(r, f"bench_runs.py threads: {command} with "
                                                   f"{candidate}, {situation}"))
                shutil.rmtree(work / "runs", ignore_errors=True)
                shutil.rmtree(work / "pred", ignore_errors=True)
                if rnd == 0:
                    continue
                for r in got:
                    row = {"command": command, "situation": situation, "candidate": candidate,
                           "round": rnd, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                           "load": os.getloadavg()[0]}
                    if command == "wait":
                        words = r["output"].split()
                        i = words.index("wait_cpu_ms")
                        row["wait_cpu_ms"], row["threads"] = float(words[i + 1]), int(words[i + 2])
                    rows.append(row)
                print(f"{situation} {command} {candidate} round {rnd}: "
                      + ", ".join(f"{r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU" for r in got),
                      file=sys.stderr, flush=True)
    return rows


def median(values: list[float]) -> float:
    return float(np.median(values))


def thread_table(rows: list[dict], default: str) -> str:
    """Per command and situation: each candidate's median wall and CPU seconds over the rounds and
    copies, its wall over the fastest candidate's, and the default's against the targets."""
    lines = ["| command | situation | candidate | wall s (median) | CPU s (median) | x fastest |",
             "| --- | --- | --- | --- | --- | --- |"]
    notes = []
    for command, situation in dict.fromkeys((r["command"], r["situation"]) for r in rows):
        block = [r for r in rows if (r["command"], r["situation"]) == (command, situation)]
        cands = list(dict.fromkeys(r["candidate"] for r in block))
        if command == "wait":
            for c in cands:
                got = [r for r in block if r["candidate"] == c]
                lines.append(f"| wait | {situation} | {c} | CPU ms per 20 ms pause: "
                             f"{median([r['wait_cpu_ms'] for r in got]):.2f} "
                             f"({got[0]['threads']} threads) | | |")
            continue
        wall = {c: median([r["wall_s"] for r in block if r["candidate"] == c]) for c in cands}
        cpu = {c: median([r["cpu_s"] for r in block if r["candidate"] == c]) for c in cands}
        fastest = min(wall, key=wall.get)
        for c in cands:
            mark = " (default)" if c == default else ""
            lines.append(f"| {command} | {situation} | {c}{mark} | {wall[c]:.2f} | {cpu[c]:.2f} | "
                         f"{wall[c] / wall[fastest]:.3f} |")
        if default in wall and situation in TARGETS:
            ratio = wall[default] / wall[fastest]
            notes.append(f"{command}, {situation}: fastest {fastest}; the default {default} at "
                         f"{ratio:.3f}x (target at most {TARGETS[situation]}x): "
                         f"{'met' if ratio <= TARGETS[situation] else 'NOT met'}")
    return "\n".join(lines + [""] + notes)


# ---- times: seconds per epoch and per protocol --------------------------------------------------
def fake_dataset(root: Path, size: dict, sub: int = 0, seed: int = 0) -> None:
    """Slide caches of the shape of `size` (SIZES): spots on the layout's grid, random features
    (float16 where the size has a foundation model's width, as HEST caches) shifted by one standard
    deviation per patient (patients differ more than one patient's sections, as her2st's do:
    model.ood_fallback decides as on real slides), Poisson counts of GENES genes around random
    means, each slide's patient; `sub` sub-patches per spot (HiFusion's sub_features) when a config
    needs them; and programs.gmt (sets of the genes) for pathway tokens."""
    g = np.random.default_rng(seed)
    genes = [f"G{i:04d}" for i in range(GENES)]
    means = np.exp(g.normal(0.0, 1.0, GENES)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    shift = {p: float(k) for k, p in enumerate(dict.fromkeys(size["patients"]))}
    for i, (n, patient) in enumerate(zip(size["spots"], size["patients"])):
        if size["layout"] == "st":          # legacy ST: a 200 um square grid
            xy, pitch = bench.layout("hd", n, seed=i) * 25.0, 200.0
        else:
            xy, pitch = bench.layout("visium", n, seed=i), 100.0
        c, dtype = size["features"], np.float16 if size["features"] >= 512 else np.float32
        counts = g.poisson(means * g.uniform(0.5, 2.0, (n, 1))).astype(np.float32)
        slide = data.Slide(slide_id=f"S{i}", features=torch.from_numpy(
            (g.standard_normal((n, c)) + shift[patient]).astype(dtype)), coords=xy.float(),
            barcodes=np.array([f"S{i}_{j}" for j in range(n)]), patient=patient,
            spot_pitch_um=pitch, encoder="random", counts=torch.from_numpy(counts), genes=genes,
            library_size=torch.from_numpy(counts.sum(1)))
        if sub:
            slide.sub_features = torch.from_numpy(
                (g.standard_normal((n, sub, c)) + shift[patient]).astype(dtype))
            slide.sub_extent_um = 0.55 * pitch
        data.write_slide(root / f"S{i}.h5", slide)
    sets = [f"SET{p}\tna\t" + "\t".join(genes[p::50]) for p in range(50)]
    (root / "programs.gmt").write_text("\n".join(sets) + "\n")


def parse_log(text: str) -> dict:
    """From train.py's log: each fold's epoch seconds, its total seconds and its seconds in epochs
    ("fold k: done in ...")."""
    folds = {}
    for k, e, s in re.findall(r"^fold (\d+) epoch (\d+)/\d+ .* ([\d.]+)s/epoch", text, re.M):
        folds.setdefault(int(k), {"epochs": []})["epochs"].append(float(s))
    for k, total, inside in re.findall(r"^fold (\d+): done in ([\d.]+)s, of which ([\d.]+)s",
                                       text, re.M):
        folds.setdefault(int(k), {"epochs": []}).update(total=float(total), inside=float(inside))
    return folds


def protocol_time(folds: dict, wall: float, epochs: int) -> tuple[float | None, float]:
    """(seconds per epoch, seconds of the whole protocol at `epochs` epochs) from `parse_log`."""
    per_fold = [f["epochs"][1:] or f["epochs"] for f in folds.values() if f["epochs"]]
    per_epoch = [sum(e) / len(e) for e in per_fold]
    process = wall - sum(f["total"] for f in folds.values())          # start, checks, results
    whole = process + sum(f["total"] - f["inside"] + (epochs * sum(f["epochs"][1:] or f["epochs"])
                                                      / len(f["epochs"][1:] or f["epochs"])
                                                      if f["epochs"] else 0.0)
                          for f in folds.values())
    return (sum(per_epoch) / len(per_epoch) if per_epoch else None), whole


def measure_times(args, work: Path) -> list[dict]:
    rows = []
    for size_name in args.sizes:
        size = dict(SIZES[size_name])
        size["spots"] = [max(30, round(n * args.scale)) for n in size["spots"]]
        size["features"] = args.features or size["features"]
        for name in args.configs:
            cfg = train.load_config(ROOT / "configs" / f"{name}.yaml")
            sub = 4 ** cfg["model"]["sub_levels"]
            root = work / f"{size_name}_{size['features']}_{sub}"
            if not root.exists():
                fake_dataset(root, size, sub if sub > 1 else 0)
            line = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / f"{name}.yaml"),
                    f"data.root={root}", "data.folds=2", "data.group=patient",
                    "data.assign=balanced", "data.split_dir=null", "data.synthetic=null",
                    f"train.epochs={args.epochs}", f"run.dir={work / 'runs'}",
                    f"run.name={name}-{size_name}"]
            line += ["data.gmt=programs.gmt"] if cfg["data"]["gmt"] else []
            line += [f"run.threads={args.threads}"] if args.threads is not None else []
            line += args.set
            got = timed([line], environment(None), ROOT)[0]
            if got["rc"]:
                rows.append({"size": size_name, "config": name, "error": failed(got, "train.py")})
                print(rows[-1]["error"], file=sys.stderr, flush=True)
                continue
            log = (work / "runs" / f"{name}-{size_name}" / "log.txt").read_text()
            per_epoch, whole = protocol_time(parse_log(log), got["wall_s"], cfg["train"]["epochs"])
            rows.append({"size": size_name, "config": name, "spots": size["spots"],
                         "epochs": cfg["train"]["epochs"], "s_per_epoch": per_epoch,
                         "protocol_s": whole, "measured_wall_s": got["wall_s"],
                         "cpu_s": got["cpu_s"], "folds": len(parse_log(log)),
                         "not_trained": log.count("the network is not trained")})
            print(f"{size_name} {name}: {per_epoch if per_epoch is None else round(per_epoch, 2)} "
                  f"s/epoch, protocol {whole:.0f} s ({got['wall_s']:.1f} s measured)",
                  file=sys.stderr, flush=True)
            shutil.rmtree(work / "runs", ignore_errors=True)
    return rows


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 \
        else f"{seconds / 3600:.1f} h"


def times_table(rows: list[dict], sizes: list[str]) -> str:
    """README's table: one row per config, per size its seconds per epoch and whole protocol."""
    head = "| config | " + " | ".join(f"{LABELS[s]} epoch | {LABELS[s]} protocol"
                                      for s in sizes) + " |"
    lines = [head, "| --- |" + " --- | --- |" * len(sizes)]
    for name in dict.fromkeys(r["config"] for r in rows):
        cells = []
        for s in sizes:
            r = next((r for r in rows if r["config"] == name and r["size"] == s), None)
            if r is None or "error" in r:
                cells += ["failed" if r else "", ""]
                continue
            note = ("" if not r["not_trained"] else " (no network trained)"
                    if r["not_trained"] == r["folds"]
                    else f" ({r['not_trained']} of {r['folds']} folds without a network)")
            cells += [clock(r["s_per_epoch"]), clock(r["protocol_s"]) + note]
        lines.append(f"| `{name}.yaml` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the demo from a clean copy ---------------------------------------------------------------
def project_files() -> list[Path]:
    """The files a clone has: git's list where this is a checkout, else every .py, configs/ and
    requirements.txt."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        return [ROOT / p for p in out]
    except (OSError, subprocess.CalledProcessError):
        return [*ROOT.glob("*.py"), *ROOT.glob("configs/**/*"), ROOT / "requirements.txt"]


def measure_demo(args, work: Path) -> list[dict]:
    rows = []
    for i in range(args.repeats):
        copy = work / f"clone{i}"
        for f in project_files():
            if f.is_file():
                (copy / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, copy / f.relative_to(ROOT))
        got = timed([[sys.executable, "train.py", *args.overrides]], environment(None), copy)[0]
        if got["rc"]:
            raise SystemExit(failed(got, "bench_runs.py demo: python train.py"))
        rows.append({"repeat": i, "wall_s": got["wall_s"], "cpu_s": got["cpu_s"],
                     "load": os.getloadavg()[0]})
        print(f"demo {i}: {got['wall_s']:.1f} s wall, {got['cpu_s']:.1f} s CPU", file=sys.stderr)
        shutil.rmtree(copy)
    return rows


# ---- the command line -------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    words = lambda s: [x for x in s.split(",") if x]               # noqa: E731
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("threads", help="the thread candidates side by side")
    t.add_argument("--candidates", type=words, default=list(threads.CANDIDATES))
    t.add_argument("--situations", type=words, default=list(SITUATIONS))
    t.add_argument("--commands", type=words, default=["wait", "train", "predict"])
    t.add_argument("--pairs", type=int, default=3, help="timed rounds per candidate")
    t.add_argument("--slides", type=int, default=4)
    t.add_argument("--spots", type=int, default=600)
    t.add_argument("--epochs", type=int, default=2)
    m = sub.add_parser("times", help="seconds per epoch and per protocol of each config")
    m.add_argument("--configs", type=words, default=CONFIGS)
    m.add_argument("--sizes", type=words, default=list(SIZES))
    m.add_argument("--epochs", type=int, default=2, help="epochs measured per fold")
    m.add_argument("--scale", type=float, default=1.0, help="spots per slide times this (tests)")
    m.add_argument("--features", type=int, help="features of every size instead of its own (tests)")
    m.add_argument("--threads", type=int, help="run.threads of every run (default: the default)")
    m.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. model.ood_fallback=false")
    d = sub.add_parser("demo", help="python train.py from a clean copy")
    d.add_argument("--repeats", type=int, default=1)
    d.add_argument("overrides", nargs="*", help="key.sub=value for train.py (tests)")
    for p in (t, m, d):
        p.add_argument("--json", type=Path, help="write every figure here")
        p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    bad = [w for w in getattr(args, "candidates", []) if w not in threads.CANDIDATES] + \
          [w for w in getattr(args, "situations", []) if w not in SITUATIONS] + \
          [w for w in getattr(args, "sizes", []) if w not in SIZES]
    if bad:
        raise SystemExit(f"bench_runs.py {args.part}: unknown {', '.join(bad)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.part == "threads":
            rows = measure_threads(args, work)
            print(thread_table(rows, threads.CHOICE))
        elif args.part == "times":
            rows = measure_times(args, work)
            print(times_table(rows, args.sizes))
        else:
            rows = measure_demo(args, work)
            print(f"demo: {median([r['wall_s'] for r in rows]):.1f} s wall (median of "
                  f"{len(rows)}), {median([r['cpu_s'] for r in rows]):.1f} s CPU")
    if args.json:
        meta = {"argv": sys.argv if argv is None else ["bench_runs.py", *argv],
                "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
                "default": threads.CHOICE, "machine": os.uname().machine}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""The GPU check: what a machine with one CUDA GPU measures of tessera, in about 8 minutes from a \
fresh clone.

    python gpu_check.py --out gpu_check                  # everything; results in gpu_check/
    python gpu_check.py --out gpu_check --no-install --parts tests,bench --limit tests=300

If the torch present is a CPU build, a CUDA build of the same version is installed first, and
requirements.txt if h5py, numpy, pyyaml or pytest is missing (the pip commands are
printed; --no-install skips this). Then each part runs in its own subprocess with its own time limit
(--limit; the limits add up to 9 minutes), so one failure or hang does not eat the rest:
  tests      the CUDA tests: python -m pytest -q -m cuda (tests/test_cuda.py)
  demo       the demo on the GPU (python train.py run.device=cuda run.name=demo-gpu), its table
             beside the README's CPU table
  bench      bench.py's step part on the GPU at the N of a Visium slide (4k spots): train and infer
             seconds per slide and GB (allocated, reserved) per 1k spots of hist.yaml and
             default.yaml, beside HiST Table 1
  data36     36 Visium-sized synthetic slides (4,000 spots, 1,024 features: a UNI-sized encoder, 300
             genes) in data/visium36, unless there already
  hist_full  configs/hist.yaml at full width (d 512), 4 folds, 3 epochs on them: seconds per epoch,
             and the time of HiST's protocol (4 folds x 100 epochs) they imply; the part is cut by
             its limit once fold 0 has logged its epochs
  hd_1m      one training step of hist.yaml with model.checkpoint=true, and one inference, on a
             1M-bin Visium HD-like slide with float16 features (bench.py): seconds and peak GB
Output in --out: gpu_check.json (every part's command, exit code, seconds, whether it timed out, and
its figures; rewritten after each part) and gpu_check.log (every part's output). BENCHMARKS.md, "GPU
check".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
PY = sys.executable
# HiST Table 1 (one GPU, per slide; BENCHMARKS.md, "CUDA with bf16 autocast, beside HiST Table 1")
HIST_TABLE1 = "| HiST (Table 1) | 0.10 | 0.07 | 1.21 (0.3) | 1.38 (0.4) |"
LIMITS = {"install": 400, "tests": 120, "demo": 80, "bench": 45, "data36": 90, "hist_full": 80,
          "hd_1m": 120}


@dataclass
class Part:
    name: str
    limit: float                                   # seconds
    cmd: list[str]
    # output -> figures for the JSON
    summary: Callable[[str], dict] = field(default=lambda output: {})
    skip: str | None = None                        # a reason to skip it


# ---- is the torch present CUDA-capable -----------------------------------------------------------
def probe_torch(python: str = PY) -> dict:
    """{"version", "cuda" (the build's CUDA version, None for a CPU build), "devices"} of `python`'s
    torch."""
    code = ("import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': "
            "torch.version.cuda, 'devices': torch.cuda.device_count() if "
            "torch.cuda.is_available() else 0}))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if r.returncode:
        return {"version": None, "cuda": None, "devices": 0, "error": r.stderr.strip()[-300:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def install_commands(info: dict, python: str = PY) -> list[list[str]]:
    """The pip commands that put a CUDA build of torch in place of a CPU one; none when the build
    has CUDA (a CUDA build that sees no device is a driver or machine problem that reinstalling does
    not fix). The CPU build is removed first: `torch==2.13.0` is already satisfied by 2.13.0+cpu, so
    pip would keep it. PyPI's Linux torch wheels are CUDA builds."""
    if info.get("cuda"):
        return []
    version = (info.get("version") or "").split("+")[0]
    return [[python, "-m", "pip", "uninstall", "-y", "torch"],
            [python, "-m", "pip", "install", f"torch=={version}" if version else "torch"]]


# ---- the parts ----------------------------------------------------------------------------------
def tests_summary(output: str) -> dict:
    counts = dict((k, int(n))
                  for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output))
    return {"pytest": counts}


def demo_summary(runs: Path) -> Callable[[str], dict]:
    def summary(output: str) -> dict:
        lines = (ROOT / "README.md").read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("| run | pcc_gene")),
                     len(lines))
        cpu = []
        for line in lines[start:]:                        # the README's demo table, as it stands
            if not line.startswith("|"):
                break
            cpu.append(line)
        results = runs / "demo-gpu" / "results.md"
        seconds = re.findall(r"finished in (\d+)s", output)
        return {"cpu_table_readme": "\n".join(cpu) or None,
                "gpu_table": results.read_text() if results.exists() else None,
                "seconds": int(seconds[-1]) if seconds else None}
    return summary


def bench_summary(path: Path) -> Callable[[str], dict]:
    """bench.py's rows as HiST Table 1 reads: train and infer s per slide, allocated and reserved GB
    (per 1k)."""
    def summary(output: str) -> dict:
        if not path.exists():
            return {}
        rows = [r for r in json.loads(path.read_text())["rows"] if "time_s" in r]
        lines = ["| method | train s/slide | infer s/slide | allocated GB (per 1k) | "
                 "reserved GB (per 1k) |",
                 "|---|---|---|---|---|", HIST_TABLE1]
        for name in dict.fromkeys(r["name"] for r in rows):
            by = {r["mode"]: r for r in rows if r["name"] == name}
            big = max(by.values(), key=lambda r: r["peak_mb"])
            gb = lambda mb, n: f"{mb / 1024:.2f} ({mb / 1024 / n * 1e3:.2f})"  # noqa: E731
            lines.append(f"| tessera {name}.yaml, N {big['n']} | "
                         + " | ".join(f"{by[m]['time_s']:.3g}" if m in by else "-"
                                      for m in ("train", "infer"))
                         + f" | {gb(big['peak_mb'], big['n'])} | "
                           f"{gb(big['reserved_mb'] or 0, big['n'])} |")
        return {"table": "\n".join(lines),
                "rows": [{k: r.get(k) for k in ("name", "mode", "layout", "n", "time_s",
                                                "peak_mb", "reserved_mb")} for r in rows]}
    return summary


def epochs_summary(output: str) -> dict:
    """Seconds per epoch from train.py's lines; the first epoch (warm-up, caches) is left out of the
    median."""
    times = [float(s) for s in re.findall(r"epoch \d+/\d+ loss \S+ "
                                          r"(?:val_pcc_gene \S+ )?([0-9.]+)s/epoch", output)]
    steady = sorted(times[1:] or times)
    median = steady[len(steady) // 2] if steady else None
    return {"s_per_epoch": times, "median_s_per_epoch": median,
            # 4 folds x 100 epochs
            "protocol_h": None if median is None else round(median * 100 * 4 / 3600, 2)}


def plan(args) -> list[Part]:
    out, lim = args.out, {**LIMITS, **args.limit}
    data36 = ROOT / "data" / "visium36"
    have36 = len(list(data36.glob("*.h5"))) >= 36
    runs = out / f"runs-{args.stamp}"                    # a rerun never meets a finished run folder
    return [
        Part("tests", lim["tests"], [PY, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"],
             tests_summary),
        Part("demo", lim["demo"], [PY, "train.py", "run.device=cuda", "run.name=demo-gpu",
                                   f"run.dir={runs}"],
             demo_summary(runs)),
        Part("bench", lim["bench"], [PY, "bench.py", "--device", "cuda", "--parts", "step",
                                     "--configs", "hist,default", "--layouts", "visium", "--sizes",
                                     "4k", "--json", str(out / "bench_cuda.json")],
             bench_summary(out / "bench_cuda.json")),
        Part("data36", lim["data36"],
             [PY, "synthetic.py", "--out", str(data36), "--slides", "36", "--spots", "4000",
              "--genes", "300", "--features", "1024"],
             skip=f"{data36} has 36 slides" if have36 else None),
        Part("hist_full", lim["hist_full"],
             [PY, "train.py", "configs/hist.yaml", f"data.root={data36}",
              "data.genes={by: hvg, n: 250}", "train.epochs=3", "run.device=cuda",
              "run.name=hist-full-gpu", f"run.dir={runs}"], epochs_summary),
        Part("hd_1m", lim["hd_1m"], [PY, "bench.py", "--device", "cuda", "--parts", "step",
                                     "--configs", "hist", "--layouts", "hd", "--sizes", "1M",
                                     "--max-n", "hist.train=1M", "--repeats", "0", "--set",
                                     "model.checkpoint=true", "--features-dtype", "float16",
                                     "--json", str(out / "hd_1m.json")],
             bench_summary(out / "hd_1m.json")),
    ]


# ---- running them -------------------------------------------------------------------------------
def run_part(part: Part, log) -> dict:
    """Run one part in its own process group, output appended to the log; past its limit the whole
    group is killed and the part recorded as timed out (its figures are read from what it wrote
    until then)."""
    print(f"=== {part.name} (limit {part.limit:.0f} s): {' '.join(part.cmd)}", file=log, flush=True)
    record = {"cmd": part.cmd, "limit_s": part.limit}
    if part.skip:
        print(f"=== {part.name}: skipped ({part.skip})", file=log, flush=True)
        return {**record, "skipped": part.skip}
    start, offset = time.time(), log.tell()
    proc = subprocess.Popen(part.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc, timed_out = proc.wait(timeout=part.limit), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)               # the part and every process it started
        proc.wait()
        rc, timed_out = None, True
    record.update(rc=rc, timed_out=timed_out, seconds=round(time.time() - start, 1))
    with open(log.name, "rb") as f:
        f.seek(offset)
        output = f.read().decode(errors="replace")
    try:
        record.update(part.summary(output))
    except Exception as e:  # noqa: BLE001  (a summary must never stop the check)
        record["summary_error"] = repr(e)
    print(f"=== {part.name}: {'timed out' if timed_out else f'rc {rc}'}, {record['seconds']} s",
          file=log, flush=True)
    return record


def run_parts(parts: list[Part], out: Path, meta: dict | None = None) -> dict:
    """Run the parts in order; gpu_check.json is rewritten after each, so a killed check keeps what
    it has."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta or {}, "parts": {}}
    with open(out / "gpu_check.log", "a") as log:
        for part in parts:
            result["parts"][part.name] = run_part(part, log)
            (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
            r = result["parts"][part.name]
            print(f"{part.name}: " + ("skipped" if "skipped" in r else "timed out" if r["timed_out"]
                                      else f"rc {r['rc']}") + f", {r.get('seconds', 0)} s",
                  flush=True)
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"),
                    help="folder for gpu_check.json and .log")
    ap.add_argument("--parts", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help="comma-separated subset of: "
                         + ", ".join(k for k in LIMITS if k != "install"))
    ap.add_argument("--limit", type=lambda s: {k: float(v) for k, v in [s.split("=", 1)]},
                    action="append", default=[], metavar="PART=SECONDS",
                    help="time limit of a part (repeatable)")
    ap.add_argument("--no-install", action="store_true", help="never install a CUDA build of torch")
    args = ap.parse_args(argv)
    args.limit = {k: v for d in args.limit for k, v in d.items()}
    args.out, args.stamp = args.out.resolve(), time.strftime("%Y%m%d-%H%M%S")
    unknown = sorted((set(args.parts or []) | set(args.limit)) - set(LIMITS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; expected some of {', '.join(LIMITS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    info = probe_torch()
    meta = {"torch": info, "gpu": _nvidia_smi(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not meta["gpu"] and not info.get("devices"):
        raise SystemExit("gpu_check.py: no NVIDIA GPU here (nvidia-smi finds none, torch sees "
                         "none); nothing to check")
    pre, cmds = [], [] if args.no_install else install_commands(info)
    if (not args.no_install
        and subprocess.run([PY, "-c", "import h5py, numpy, yaml, pytest"]).returncode):
        # a bare environment
        cmds.append([PY, "-m", "pip", "install", "-r", str(ROOT / "requirements.txt")])
    for i, cmd in enumerate(cmds):
        print("installing:", " ".join(cmd), flush=True)
        pre.append(Part(f"install{i}", args.limit.get("install", LIMITS["install"]), cmd))
    parts = [p for p in plan(args) if args.parts is None or p.name in args.parts]
    result = run_parts(pre + parts, args.out, meta)
    result["meta"]["torch_after"] = probe_torch() if pre else info
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"results: {args.out / 'gpu_check.json'}, log: {args.out / 'gpu_check.log'}")
    return result


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    main()

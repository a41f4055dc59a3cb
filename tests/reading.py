"""How much a reader reads to follow tessera: the lines of README's reading order, measured.

    python tests/reading.py [CONFIG]     # default configs/hist.yaml; the three traces, per file

Three traces, each under sys.settrace, of one config on the reference path (model.kernels =
reference: the papers' forms; kernels.py's fast path computes the same and is not reading):
  forward  one forward of the model in training mode on a 12 x 12 hexagonal slide of 144 spots
           with 32 random features (the model built from the config's `model` section first);
  step     the same forward, an MSE against random targets and its backward;
  fold     `train.py CONFIG ... --fold 0`, 1 epoch, the last fold of a 2-fold run on a tiny
           synthetic dataset (4 slides of 144 spots; the dataset and fold 1 made before tracing):
           config and data checks, training, prediction of the test slide, the run's results.
A trace counts, per project file (tests aside), the non-blank lines of every function the run
entered (from its `def` to its last statement: what a reader reads to follow it) and the non-blank
lines that ran. Module bodies (imports) are not counted: everything is imported before tracing.
"""
from __future__ import annotations

import collections
import contextlib
import io
import linecache
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

TRACES = ("forward", "step", "fold")
DROPPED = ("spatial_start", "ood_fallback", "ridge_cv")  # need training slides, which a step lacks


def traced(run, root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """Run `run()` under sys.settrace: {file under `root`, tests/ aside (relative path): (non-blank
    lines that ran, non-blank lines of the functions entered)}."""
    ran, spans = collections.defaultdict(set), collections.defaultdict(set)
    root, tests = Path(root).resolve(), str(Path(root).resolve() / "tests") + "/"
    top = str(root) + "/"

    def trace(frame, event, arg):
        name = frame.f_code.co_filename
        if not name.startswith(top) or name.startswith(tests):
            return None
        if event == "call" and frame.f_code.co_name != "<module>":
            lines = [line for _, _, line in frame.f_code.co_lines() if line]
            if lines:
                spans[name].update(range(frame.f_code.co_firstlineno, max(lines) + 1))
        elif event == "line":
            ran[name].add(frame.f_lineno)
        return trace

    before = sys.gettrace()                   # a coverage tool's tracer, say: put back afterwards
    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(before)
    def count(name, lines):
        return sum(1 for n in lines if linecache.getline(name, n).strip())
    return {str(Path(f).relative_to(root)): (count(f, ran[f]), count(f, spans[f])) for f in spans}


def hex_slide(n: int = 12, c: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """features (n*n, c) and coords (n*n, 2) in micrometres: a hexagonal slide of 100 um pitch."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    x = j.flatten() * 100.0 + (i.flatten() % 2) * 50.0
    y = i.flatten() * 100.0 * 3 ** 0.5 / 2
    xy = torch.stack([x, y], 1).float() + torch.rand(n * n, 2, generator=g) * 3
    return torch.randn(n * n, c, generator=g), xy


def model_of(config: Path, n_genes: int = 20, in_dim: int = 32):
    import model
    section = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    known = set(model.ModelConfig.__dataclass_fields__)
    kw = {k: v for k, v in section.items() if k in known and k not in DROPPED}
    kw["kernels"] = "reference"
    torch.manual_seed(0)
    return model.build_model(model.ModelConfig(**kw), in_dim, n_genes).train()


def trace_forward(config: Path) -> dict[str, tuple[int, int]]:
    net, (features, xy) = model_of(config), hex_slide()
    return traced(lambda: net(features, xy))


def trace_step(config: Path) -> dict[str, tuple[int, int]]:
    net, (features, xy) = model_of(config), hex_slide()
    target = torch.randn(features.shape[0], 20)

    def step():
        ((net(features, xy)["pred"] - target) ** 2).mean().backward()
    return traced(step)


def trace_fold(config: Path) -> dict[str, tuple[int, int]]:
    import synthetic
    import train
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "slides"
        synthetic.make_synthetic(root, n_slides=4, n_spots=144, n_genes=60, n_features=32,
                                 log=lambda *a: None)
        argv = [str(config), f"data.root={root}", f"run.dir={tmp}/runs", "run.name=read",
                "train.epochs=1", "run.threads=1", "data.folds=2", "data.genes={by: hvg, n: 20}",
                "data.synthetic=null", "model.kernels=reference"]
        threads, out = torch.get_num_threads(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                train.main(argv + ["--fold", "1"])                 # the other fold, not traced
                return traced(lambda: train.main(argv + ["--fold", "0"]))  # the last: then results
        except BaseException as e:                                  # SystemExit: one line, kept
            raise RuntimeError(f"train.py {' '.join(argv)}: {e}\n{out.getvalue()[-3000:]}") from e
        finally:
            torch.set_num_threads(threads)


def measure(config: str | Path = "configs/hist.yaml",
            which=TRACES) -> dict[str, dict[str, tuple[int, int]]]:
    """{trace: {file: (ran, read)}} for the traces named in `which`."""
    config = ROOT / config
    run = {"forward": trace_forward, "step": trace_step, "fold": trace_fold}
    return {name: run[name](config) for name in which}


def total(rows: dict[str, tuple[int, int]]) -> int:
    """Lines a reader reads for one trace: the non-blank lines of the project functions entered."""
    return sum(read for _, read in rows.values())


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    config = args[0] if args else "configs/hist.yaml"
    for name, rows in measure(config).items():
        print(f"{config} {name}: read {total(rows)} lines in {len(rows)} files "
              f"(ran {sum(r for r, _ in rows.values())})")
        for f, (n_ran, n_read) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
            print(f"  {f:<20} ran {n_ran:>5}   read {n_read:>5}")


if __name__ == "__main__":
    main()

"""Speed, memory and scaling of tessera, beside the edge-list and dense ways of computing window \
attention.

HiST sec. 4.3 and Table 1. Recorded tables, their machine and their commands: BENCHMARKS.md.

    python bench.py                                 # everything, CPU, N = 1k ... 256k (1M for some)
    python bench.py --parts window --sizes 4k,64k --layouts hd --json window.json
    python bench.py --device cuda                   # bf16 autocast, CUDA peak allocated / reserved

Parts (one row per part x name x layout x N; every row is measured in a fresh child process, so its
peak memory is its own):
  pyramid  lattice.to_lattice + lattice.build_pyramid (4 levels, w = 3, both rulebooks per level)
  window   one window_attention call, forward (fwd) and forward + backward (fwd+bwd), H = 8 heads of
           D = 32, w = 3, a (H, S, S) bias: `tessera` (kernels.py, the fast path), `reference`
           (attention.py, padded windows and autograd), `edge` (explicit (query, key) pair list,
           per-query softmax with scatter_reduce('amax') / exp / index_add_, as graph libraries
           compute it) and `dense` (masked N x N attention, as in FEAST / SpatialTranscriptFormer,
           up to --max-n). The geometry (rulebook and its window batches, pair list, window ids) is
           built before the timed call for all three.
  step     one training step (forward + MSE + backward + clip + AdamW, train.py's loop) and one
           inference pass (eval, no_grad: the low-memory path, float16 outputs) of configs/hist.yaml
           and configs/default.yaml on one synthetic slide (--set changes their configs), once per
           --kernels path (model.kernels: fast, reference), side by side
  memory   window_attention and knn_attention (K = 16) forward + backward from N = 10k to 160k, at
           the demo's width (4 heads of 16), to show memory linear in N

Time: median of --repeats runs (as many as fit in a minute, at least one) after an untimed warm-up;
a run over two minutes is timed once, without warm-up.
Memory on the CPU: peak resident set of the child (getrusage ru_maxrss after resetting the
high-water mark through /proc/self/clear_refs once the inputs exist); `peak` is the whole process,
`work` is peak minus the resident set just before the measured calls. On CUDA:
max_memory_allocated / reserved. The exponent of each row is the least-squares slope of log time
over log N for N >= --fit-min.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import torch
import torch.nn.functional as F

import attention
import files
import kernels
import lattice
import train
from losses import compute_loss
from model import ModelConfig, build_model

ROOT = Path(__file__).resolve().parent
H, D, W, LEVELS = 8, 32, 3, 4          # window part: 256 channels per call, as hist.yaml gives each
                                       # window partition (d = 512, 4 heads of 64 each); w; pyramid
                                       # levels
MEMORY_HEADS = (4, 16)                 # memory part: heads, head dim of
                                       # configs/default.yaml (d = 64)
# Largest N per row on this 23 GB, 2-core machine: dense (H, N, N) scores are 2 GiB at 8k; the edge
# list's (pairs, H, D) gathers ~1 GiB each at 64k; window_attention forward + backward keeps ~7 MB
# and hist.yaml training ~0.3 GB per 1k spots (64 MB with --set model.checkpoint=true); the demo's
# k-NN stage is brute force, O(N^2). See --max-n.
MAX_N = "dense=8k,edge=64k,tessera=256k,hist.train=32k,default=64k"
# (C, G): UNI-sized features (hist, tessera) / the demo's synthetic
FEATURES = {"hist": (1024, 2000), "tessera": (1024, 2000), "default": (64, 250)}


def parse_n(s):
    s = s.strip().lower()
    return int(float(s[:-1]) * {"k": 1e3, "m": 1e6}[s[-1]]) if s[-1] in "km" else int(s)


# ---- synthetic slides ----------------------------------------------------------------------------
def layout(kind, n, seed=0):
    """(n, 2) float32 spot centres in micrometres on an irregular tissue footprint:
    'visium' = hexagonal grid of 100 um pitch, 'hd' = square grid of 8 um bins. The footprint is the
    n grid sites scoring best on an elliptical distance plus a smooth random field, which gives a
    wavy, blobby outline."""
    g = torch.Generator().manual_seed(seed)
    hexagonal = kind == "visium"
    if kind not in ("visium", "hd"):
        raise ValueError(f"layout must be visium or hd, got {kind!r}")
    pitch, (hx, hy) = (100.0, (0.5, 3 ** 0.5 / 2)) if hexagonal else (8.0, (1.0, 1.0))
    side = math.sqrt(n / 0.5 * hx * hy * (2 if hexagonal else 1))      # tissue covers ~half the box
    r, c = torch.meshgrid(torch.arange(int(side / hy) + 2), torch.arange(int(side / hx) + 2),
                          indexing="ij")
    if hexagonal:                                                      # hexagonal: (r + c) even
        r, c = r[(r + c) % 2 == 0], c[(r + c) % 2 == 0]
    xy = torch.stack([c.flatten() * hx, r.flatten() * hy], 1).float()  # (M, 2) in pitches
    omega = torch.randn(32, 2, generator=g) * 6 / side                 # random Fourier features
    field = torch.cos(xy @ omega.T + 2 * math.pi * torch.rand(32, generator=g)).sum(1) / 4
    u = (xy - side / 2) / side
    score = -torch.hypot(u[:, 0], u[:, 1] / 0.7) + 0.1 * field
    keep = score.topk(min(n, len(xy))).indices.sort().values
    return xy[keep] * pitch + 0.01 * pitch * torch.randn(len(keep), 2, generator=g)


def sites_of(kind, n):
    xy = layout(kind, n)
    return lattice.to_lattice(xy, lattice.default_unit(xy))


# ---- the two common ways to compute the same window attention ------------------------------------
def pair_list(rulebook):
    """Every (query, key) pair sharing a window, with their slots: (qi, ki, slot_q, slot_k), each
    (E,)."""
    both = (rulebook[:, :, None] >= 0) & (rulebook[:, None, :] >= 0)   # (W, S, S)
    w_, a, b = torch.nonzero(both, as_tuple=True)
    return rulebook[w_, a], rulebook[w_, b], a, b


def edge_attention(q, k, v, qi, ki, sq, sk, bias):
    """Attention over an explicit edge list, computed as graph libraries do (PyG TransformerConv
    with utils.softmax): a score per (edge, head), a scatter max per query (detached), exp, a
    scatter sum gathered back to normalise every edge, then the messages alpha * v_j summed per
    query. q, k, v (N, H, D); qi, ki, sq, sk (E,) from pair_list; bias (H, S, S) -> (N, H, D)."""
    N, Hh, Dh = q.shape
    e = (q[qi] * k[ki]).sum(-1) / Dh ** 0.5 + bias[:, sq, sk].T             # (E, H)
    m = e.new_full((N, Hh), float("-inf")).scatter_reduce(0, qi[:, None].expand_as(e),
                                                          e.detach(), "amax")
    p = torch.exp(e - m[qi])
    # softmax over each query's edges
    alpha = p / (p.new_zeros(N, Hh).index_add_(0, qi, p)[qi] + 1e-16)
    return q.new_zeros(N, Hh, Dh).index_add_(0, qi, alpha[..., None] * v[ki])


def token_windows(rulebook, n):
    """Window row and slot of every token: (n,), (n,)."""
    w_, s = torch.nonzero(rulebook >= 0, as_tuple=True)
    win, slot = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    win[rulebook[w_, s]], slot[rulebook[w_, s]] = w_, s
    return win, slot


def dense_attention(q, k, v, win, slot, bias):
    """Dense N x N attention with the windows as a mask and the bias spread over all pairs (H, N,
    N)."""
    b = bias[:, slot[:, None], slot[None, :]].masked_fill(win[:, None] != win[None, :],
                                                          float("-inf"))
    t = lambda x: x.transpose(0, 1)  # (N, H, D) <-> (H, N, D)
    return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=b.to(q.dtype)))


# ---- one measurement (runs in a child process) ---------------------------------------------------
def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _timed(fn, repeats, sync):
    def once():
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    first = once()                       # warm-up; also the only run when it is slow
    if first > 120 or repeats < 1:
        return first, [first]
    times = sorted(once() for _ in range(max(1, min(repeats, int(60 / first)))))
    return times[len(times) // 2], times


def _window_case(spec, dev):
    n, impl, kind = spec["n"], spec["name"], spec["layout"]
    rulebook = lattice.window_rulebook(sites_of(kind, n), W)[0].to(dev)
    cache = {}
    kernels.window_batches(rulebook, rulebook, cache)                 # built before the timed calls
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, H, D, generator=g).to(dev).requires_grad_() for _ in range(3))
    bias = (0.5 * torch.randn(H, 4 * W * W, 4 * W * W, generator=g)).to(dev).requires_grad_()
    ours = lambda: kernels.window_attention(q, k, v, rulebook, rulebook, bias, cache=cache)
    if impl == "reference":
        f = lambda: attention.window_attention(q, k, v, rulebook, rulebook, bias)
    elif impl == "edge":
        pairs = [t.to(dev) for t in pair_list(rulebook.cpu())]
        f = lambda: edge_attention(q, k, v, *pairs, bias)
    elif impl == "dense":
        win, slot = (t.to(dev) for t in token_windows(rulebook.cpu(), n))
        f = lambda: dense_attention(q, k, v, win, slot, bias)
    else:
        f = ours
    extra = {"pairs": int(((rulebook >= 0).sum(1) ** 2).sum())}
    # agreement with window_attention in float32, output and all four gradients
    if impl != "tessera":
        def grads(fn):
            out = fn()
            return [out.detach()] + list(
                torch.autograd.grad((out * v.detach()).sum(), (q, k, v, bias)))
        # largest difference relative to the largest magnitude
        # of each tensor (BENCHMARKS.md's 1e-5 target)
        extra["max_err"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1))
                               for a, b in zip(grads(f), grads(ours)))
    return (lambda: f().sum().backward()) if spec["mode"] == "fwd+bwd" else no_grad(f), extra


def _memory_case(spec, dev):
    """Forward + backward of window_attention and knn_attention (K = 16) at the demo's width."""
    n, (h, d), g = spec["n"], MEMORY_HEADS, torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, d, generator=g).to(dev).requires_grad_() for _ in range(3))
    if spec["name"] == "window_attention":
        book, cache = lattice.window_rulebook(sites_of(spec["layout"], n), W)[0].to(dev), {}
        kernels.window_batches(book, book, cache)
        bias = torch.randn(h, 4 * W * W, 4 * W * W, generator=g).to(dev).requires_grad_()
        return lambda: kernels.window_attention(q, k, v, book, book, bias,
                                                cache=cache).sum().backward(), {}
    # K = 16 keys per query: a band of row-major neighbours (local, like k-NN; memory does not
    # depend on which keys, and attention.knn itself is brute force, O(N^2), too slow to build at
    # 160k)
    index = (torch.arange(n)[:, None] + torch.arange(-8, 8)).clamp(0, n - 1).to(dev)
    bias = torch.randn(h, n, 16, generator=g).to(dev).requires_grad_()
    return lambda: kernels.knn_attention(q, k, v, index, bias).sum().backward(), {}


def _step_case(spec, dev):
    overrides = [*spec.get("overrides", ()), f"model.kernels={spec.get('kernels', 'fast')}"]
    cfg = train.load_config(ROOT / "configs" / f"{spec['name']}.yaml", overrides)
    C, G = FEATURES[spec["name"]]
    n, g = spec["n"], torch.Generator().manual_seed(0)
    xy = layout(spec["layout"], n)
    features = torch.randn(n, C, generator=g).to(
        getattr(torch, spec.get("features_dtype", "float32")))
    b = {"features": features, "coords": xy, "unit": lattice.default_unit(xy)}
    # --set model.sub_levels=1: 2 x 2 sub-patch features per spot
    S = 4 ** cfg["model"]["sub_levels"]
    if S > 1:
        b["sub_features"] = torch.randn(n, S, C, generator=g).to(features.dtype)
        b["sub_valid"] = torch.ones(n, S, dtype=torch.bool)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(cfg["model"]), C, G).to(dev)
    if spec["mode"] == "infer":            # predict.predict_slide without the copy to the host
        model.eval()
        return no_grad(lambda: train.forward(model, b, dev, out_dtype=torch.float16)), {}
    b["target"] = torch.randn(n, G, generator=g)
    opt = train.adamw(model.parameters(), 1e-4, 1e-4)
    batch = {"target": b["target"].to(dev)}

    def step():                           # train.train_fold's inner loop, without augmentation
        model.train()
        loss = compute_loss(train.forward(model, b, dev), batch, cfg, model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec["mode"] == "grad":            # forward, loss, backward: what FLOPs are counted over
            return
        train.clip_gradients(model.parameters(), cfg["train"]["clip"])
        opt.step()
    return step, {}


def flop_time(fn, threads):
    """FLOPs of one call of fn (torch's FlopCounterMode: matrix products and fused attention) and
    the seconds they take at the rate of one 1024 x 1024 float32 matmul on the same threads (best
    of 10): the time a call would take if all of it ran at the matmul rate."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as count:
        fn()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = math.inf
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    rate = 2 * 1024 ** 3 / best
    return {"gflop": count.get_total_flops() / 1e9, "matmul_gflops": rate / 1e9,
            "flop_s": count.get_total_flops() / rate}


def _pyramid_case(spec, dev):
    xy = layout(spec["layout"], spec["n"]).to(dev)
    unit = lattice.default_unit(xy)
    return lambda: lattice.build_pyramid(lattice.to_lattice(xy, unit), LEVELS, W), {"unit_um": unit}


CASES = {"pyramid": _pyramid_case, "window": _window_case, "step": _step_case,
         "memory": _memory_case}


def run_case(spec):
    """Build the inputs of one row, then time it and record its peak memory. Returns a dict of
    figures."""
    dev = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    fn, extra = CASES[spec["part"]](spec, dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16,
                         enabled=cuda and spec["part"] in ("window", "memory"))
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    else:
        # hand the set-up's freed heap back, so it is not reused
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:  # reset the resident high-water mark so the peak is that of the measured calls
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _rss_mb()
    with amp:
        t, times = _timed(fn, spec["repeats"], sync)
    if cuda:
        peak, reserved = (torch.cuda.max_memory_allocated() / 2 ** 20,
                          torch.cuda.max_memory_reserved() / 2 ** 20)
    else:
        peak, reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None
    if spec.get("flops") and spec["part"] == "step" and not cuda:
        extra = dict(extra, **flop_time(fn, torch.get_num_threads()))
        extra["x_flop"] = t / extra["flop_s"]
    return dict(spec, time_s=t, times=times, peak_mb=peak, base_mb=base, work_mb=peak - base,
                reserved_mb=reserved, load=os.getloadavg()[0],
                **dict(extra, threads=torch.get_num_threads()))


def measure(spec, isolate=True):
    """run_case in a fresh `python bench.py --_child` process (isolate) or in this one."""
    if not isolate:
        return run_case(spec)
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child",
                        json.dumps(spec)],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit code {p.returncode}"]
        return dict(spec, error=tail[0][:200])
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- scaling fit and the table -------------------------------------------------------------------
def fit_exponent(ns, ts):
    """Least-squares slope of log t over log n; None with fewer than two distinct n."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts) if t and t > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def summarise(rows, fit_min):
    """Add per-1k figures, the ratio to tessera's window_attention, and each row group's
    exponent."""
    group = lambda r: (r["part"], name_of(r), r["mode"], r["layout"])
    ok = [r for r in rows if "time_s" in r]
    ref = {(r["mode"], r["layout"], r["n"]): r for r in ok
           if r["part"] == "window" and r["name"] == "tessera"}
    for r in ok:
        r["s_per_1k"], r["mb_per_1k"] = r["time_s"] / r["n"] * 1e3, r["work_mb"] / r["n"] * 1e3
        t = ref.get((r["mode"], r["layout"], r["n"])) if r["part"] == "window" else None
        if t:
            r["time_ratio"], r["mem_ratio"] = (r["time_s"] / t["time_s"],
                                               r["work_mb"] / max(t["work_mb"], 1e-9))
    fits = {}
    for r in ok:
        if r["n"] >= fit_min:
            fits.setdefault(group(r), []).append((r["n"], r["time_s"]))
    for r in rows:
        pts = fits.get(group(r), [])
        r["exponent"] = fit_exponent([n for n, _ in pts], [t for _, t in pts])
    return rows


def name_of(r):
    """A row's name; a step row's with its kernels path (model.kernels)."""
    return f"{r['name']} ({r['kernels']})" if "kernels" in r else r["name"]


def table(rows, cuda=False):
    mem = ("alloc MB", "resv MB") if cuda else ("peak MB", "work MB")
    head = ("part", "name", "mode", "layout", "N", "time s", "s/1k", *mem, "MB/1k",
            "x time", "x mem", "max err", "exp", "GFLOP", "x flop")
    f = lambda x, p: "" if x is None else f"{x:.{p}g}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append((r["part"], name_of(r), r["mode"], r["layout"], str(r["n"]),
                          "failed: " + r["error"]))
            continue
        m2 = r["reserved_mb"] if cuda else r["work_mb"]
        lines.append((r["part"], name_of(r), r["mode"], r["layout"], str(r["n"]), f(r["time_s"], 4),
                      f(r["s_per_1k"], 3), f"{r['peak_mb']:.0f}", f"{m2:.0f}", f(r["mb_per_1k"], 3),
                      f(r.get("time_ratio"), 3), f(r.get("mem_ratio"), 3), f(r.get("max_err"), 2),
                      f(r["exponent"], 3), f(r.get("gflop"), 3), f(r.get("x_flop"), 3)))
    return "\n".join("| " + " | ".join(line) + " |" + ("\n|" + "---|" * len(head) if i == 0 else "")
                     for i, line in enumerate(lines))


def plan(args):
    """The rows to measure, in order; a row whose N is above its --max-n cap is left out."""
    specs, base = [], dict(device=args.device, repeats=args.repeats, mem_limit_gb=args.mem_limit_gb,
                           threads=args.threads, overrides=args.overrides,
                           features_dtype=args.features_dtype, flops=getattr(args, "flops", False))
    fits = lambda key, n: n <= min(args.max_n.get(k, n) for k in (key, key.split(".")[0]))
    for part in args.parts:
        for kind in args.layouts:
            for n in args.memory_sizes if part == "memory" else args.sizes:
                rows = {"pyramid": [("pyramid", "build")],
                        "window": [(impl, m) for m in ("fwd", "fwd+bwd")
                                   for impl in ("tessera", "reference", "edge", "dense")],
                        "step": [(cfg, m) for cfg in args.configs
                                 for m in ("train", "infer") + (("grad",) if args.flops else ())],
                        "memory": [("window_attention", "fwd+bwd"),
                                   ("knn_attention", "fwd+bwd")]}[part]
                paths = args.kernels if part == "step" else [None]
                specs += [dict(base, part=part, name=name, mode=mode, layout=kind, n=n,
                               **({"kernels": path} if path else {}))
                          for name, mode in rows for path in paths if fits(f"{name}.{mode}", n)]
    return specs


def check_limits(args) -> None:
    """Before any row: --threads within the cores, and --mem-limit-gb (the address space each row
    may take) within the memory this machine has available now, so that no row can exhaust it; with
    --inprocess the limit applies to this process."""
    cores, free = os.cpu_count() or 1, files.available_memory("cpu") / 2 ** 30
    if args.threads is not None and not 1 <= args.threads <= cores:
        raise SystemExit(f"bench.py: --threads {args.threads}: expected 1 to {cores} (this "
                         "machine's cores)")
    if args.mem_limit_gb is None:
        args.mem_limit_gb = min(16.0, free)
    elif args.mem_limit_gb == 0:             # all the memory available now, never more
        args.mem_limit_gb = free
    elif not 0 < args.mem_limit_gb <= free:
        raise SystemExit(f"bench.py: --mem-limit-gb {args.mem_limit_gb:g}: expected a limit above "
                         f"0 and at most the {free:.1f} GiB available on this machine; "
                         f"--mem-limit-gb {math.floor(free * 10) / 10:g} would fit")
    if args.inprocess and args.device == "cpu":
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        status = Path("/proc/self/status").read_text().splitlines()
        size = next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:")),
                    now)
        limit = size + int(args.mem_limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = lambda s: [parse_n(x) for x in s.split(",") if x]
    words = lambda s: [x for x in s.split(",") if x]
    caps = lambda s: {k: parse_n(v) for k, v in (x.split("=") for x in words(s))}
    ap.add_argument("--sizes", type=sizes, default=sizes("1k,4k,16k,64k,256k,1M"))
    ap.add_argument("--memory-sizes", type=sizes, default=sizes("10k,20k,40k,80k,160k"))
    ap.add_argument("--layouts", type=words, default=["visium", "hd"])
    ap.add_argument("--parts", type=words, default=["pyramid", "window", "step", "memory"])
    ap.add_argument("--configs", type=words, default=["hist", "default"])
    ap.add_argument("--flops", action="store_true",
                    help="step part: also a `grad` row (forward, loss, backward) and, "
                         "per step row, its FLOPs and the time they take at this machine's matmul "
                         "rate (x flop)")
    ap.add_argument("--kernels", type=words, default=["fast"],
                    help="step part: model.kernels paths to measure side by side (fast,reference)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the step part, as train.py takes them "
                         "(model.checkpoint=true)")
    ap.add_argument("--features-dtype", default="float32", choices=["float32", "float16"],
                    help="step part: dtype of the slide's features (float16 = a float16 cache, as "
                         "for Visium HD)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads per child (default: threads.py's)")
    ap.add_argument("--max-n", type=caps, default=caps(MAX_N),
                    help=f"largest N per name or name.mode (default {MAX_N})")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="address-space limit of each row (default 16, or the memory available "
                    "if less; 0: the memory available): a row that needs more fails instead of "
                    "swapping; more than is available is refused")
    ap.add_argument("--fit-min", type=parse_n, default=4000, help="smallest N in the exponent fits")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ap.add_argument("--inprocess", action="store_true",
                    help="measure in this process (fast; memory not isolated)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        spec = json.loads(args._child)
        # fail with an error, not the OOM killer
        if spec["device"] == "cpu" and spec.get("mem_limit_gb"):
            limit = int(spec["mem_limit_gb"] * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_case(spec)))
        return None
    check_limits(args)
    outputs = None
    if args.json:   # checked before the first row: a long benchmark never fails at its end
        try:
            outputs = files.Outputs(args.json.parent, [args.json.name], args.overwrite,
                                    what="--json", command="bench.py")
        except (ValueError, OSError) as e:
            raise SystemExit(f"bench.py: {e}") from None
    rows, t0 = [], time.time()
    for spec in plan(args):
        rows.append(measure(spec, isolate=not args.inprocess))
        r = rows[-1]
        print(f"[{time.time() - t0:7.1f}s] {r['part']} {name_of(r)} {r['mode']} {r['layout']} "
              f"N={r['n']}: "
              + (f"{r['time_s']:.4g} s, peak {r['peak_mb']:.0f} MB" if "time_s" in r
                 else r["error"]),
              file=sys.stderr, flush=True)
    summarise(rows, args.fit_min)
    print(table(rows, cuda=args.device == "cuda"))
    if args.json:
        meta = dict(argv=sys.argv if argv is None else ["bench.py", *argv], torch=torch.__version__,
                    threads=args.threads or torch.get_num_threads(), cpus=os.cpu_count(),
                    gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
        with outputs:
            outputs.path(args.json.name).write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

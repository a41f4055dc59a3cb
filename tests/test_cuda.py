"""tessera on a CUDA device against the CPU: every config's forward and backward, a training run,
prediction, checkpointing, the memory of a 1M-bin inference and the absence of host-device copies
inside the blocks.

Skipped as a whole where torch sees no CUDA device (`pytest -m cuda` selects these tests; `python
gpu_check.py` runs them with the other GPU measurements). Tiny widths (d = 32) and slides of ~200
spots, so the file runs in a minute or two on one GPU; the 1M-bin test is marked slow.

Tolerances, and why:
  float64  the model in float64 on both devices, autocast off: every output and gradient within 1e-6
           of its tensor's largest magnitude. Not 1e-12, because a few inputs are float32 by design
           on both devices (the sinusoidal position code, the slide statistics of model.slide_norm,
           the spatial ridge's neighbour-mean designs) and CUDA's float32 sin / sqrt / sums may
           differ from the CPU's in the last bit (~6e-8 relative).
  bf16     train.forward's bf16 autocast on the GPU against the CPU in float64: relative error in
           the Frobenius norm at most 3e-2 for each output, 5e-2 for all parameter gradients
           together (one vector), and 0.5 for each gradient tensor on its own. bf16 keeps 8
           significant bits (unit roundoff 2^-9 = 2e-3); a forward rounds inputs and results of some
           10 to 20 products and sums, whose errors add like a random walk (~1e-2); a gradient
           passes the forward's rounded activations and the backward's own products, about twice as
           many. A bias or LayerNorm gradient is a sum over all spots of terms of both signs that
           mostly cancel, so its relative error is far larger than its terms' (0.29 seen for
           HiFusion's sub-level LayerNorm bias under the CPU's bf16 autocast, with 6e-3 on the
           outputs and 2e-2 on all gradients): the per-tensor bound only catches a gradient path
           that is missing or wrong (an error of 1 or more).
"""
import copy
import math
import re

import pytest
import torch

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

import data  # noqa: E402
import predict  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from conftest import ROOT  # noqa: E402
from model import Block, ModelConfig, build_model  # noqa: E402

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
TINY = {"model.dim": 32, "model.hidden": 32, "model.pca": 16, "model.dropout": 0.0,
        "model.attn_dropout": 0.0}
F64_TOL, BF16_OUT, BF16_GRADS, BF16_GRAD = 1e-6, 3e-2, 5e-2, 0.5


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny synthetic datasets: Visium-like with pseudo-spots, and square ones with 2 x 2 / 4 x 4
    sub-spots."""
    out = {0: tmp_path_factory.mktemp("synth")}
    synthetic.make_synthetic(out[0], n_slides=4, seed=0, n_spots=200, pseudo=True,
                             log=lambda s: None)
    for r in (2, 4):
        out[r] = tmp_path_factory.mktemp(f"synth_sub{r}")
        synthetic.make_synthetic(out[r], n_slides=2, seed=0, n_spots=160 // r,
                                 layout="square", sub=r, log=lambda s: None)
    return out


def tiny_case(name, roots, overrides=()):
    """(cfg, CPU float32 model fitted / initialised as train.py does, prepared batch of one slide).
    Every parameter gets a small random nudge, so zero-initialised heads (model.spatial_start) let
    gradients through."""
    cfg = train.load_config(ROOT / "configs" / name)
    root = roots[2 ** cfg["model"]["sub_levels"] if cfg["model"]["sub_levels"] else 0]
    cfg = train.load_config(ROOT / "configs" / name,
                            [f"data.root={root}", "data.genes={by: hvg, n: 24}",
                             *(f"{k}={v}" for k, v in TINY.items()), *overrides])
    if cfg["data"]["gmt"]:
        cfg["data"]["gmt"] = str(root / "programs.gmt")
    mc = ModelConfig.from_dict(cfg["model"])
    path = data.list_slides(root)[0]
    genes = train.choose_genes(cfg, [data.read_slide(path)], root)
    b = train.prepare(data.read_slide(path, genes=genes), cfg, mc.unit_um)
    torch.manual_seed(0)
    model = build_model(mc, b["features"].shape[1], len(genes))
    feats = b["features"].float()
    model.init_from_data(feats.mean(0), feats.std(0), b["target"].mean(0),
                         train.membership(cfg, genes,
                                          mc.pathway_tokens if mc.arch == "tessera" else 0, root))
    if mc.arch == "ridge":
        model.fit(feats, b["target"])
    elif hasattr(model, "fit_slides"):
        model.fit_slides([b])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return cfg, model, b


def leaves(out, name="out"):
    """(name, tensor) of every tensor in a model output (dicts, lists, tuples), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, dict):
        return [x for k in sorted(out, key=str) for x in leaves(out[k], f"{name}.{k}")]
    if isinstance(out, (list, tuple)):
        return [x for i, v in enumerate(out) for x in leaves(v, f"{name}.{i}")]
    return []


def run(model, b, device, dtype=torch.float64, autocast=False, train_mode=False):
    """The outputs and parameter gradients of model on one slide, on `device`. The loss is a fixed
    random weighting of every floating output, so every output's gradient path is checked.
    autocast=True goes through train.forward (bf16 autocast on CUDA), else the model is called in
    `dtype` without autocast."""
    model = copy.deepcopy(model).to(device, dtype).train(train_mode)
    if autocast:
        out = train.forward(model, b, device)
    else:
        kw = {k: b[k].to(device, dtype) for k in ("features", "pseudo_features", "sub_features")
              if k in b}
        # float32, as read
        kw.update({k: b[k].to(device) for k in ("coords", "pseudo_coords") if k in b})
        out = model(kw["features"], kw["coords"], kw.get("pseudo_features"),
                    kw.get("pseudo_coords"), unit=b["unit"],
                    **({"sub_features": kw["sub_features"], "sub_valid": b["sub_valid"].to(device)}
                       if "sub_features" in kw else {}))
    outs = leaves(out)
    g = torch.Generator().manual_seed(2)
    loss = sum((t.double()
                * torch.randn(t.shape, generator=g, dtype=torch.float64).to(device)).sum()
               for _, t in outs if t.is_floating_point())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True) if params else []
    grads = [(f"grad.{n}", torch.zeros_like(p) if gr is None else gr)
             for (n, p), gr in zip(params, grads)]
    return [(n, t.detach().cpu()) for n, t in outs], [(n, t.cpu()) for n, t in grads]


def max_rel(a, b):
    """Largest difference relative to the reference's largest magnitude."""
    return (float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
            if b.numel() else 0.0)


def norm_rel(a, b, floor=0.0):
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), floor, 1e-30))


def assert_same_structure(got, ref):
    assert [n for n, _ in got] == [n for n, _ in ref]
    for (n, a), (_, b) in zip(got, ref):
        assert a.shape == b.shape, n
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{n}: integer outputs differ between the devices"


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_and_backward_in_float64_equal_the_cpu(name, roots):
    _, model, b = tiny_case(name, roots)
    (out_g, grad_g), (out_c, grad_c) = run(model, b, CUDA), run(model, b, CPU)
    assert_same_structure(out_g + grad_g, out_c + grad_c)
    errors = {n: max_rel(a, r) for (n, a), (_, r) in zip(out_g + grad_g, out_c + grad_c)
              if r.is_floating_point()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= F64_TOL, (f"{name}: {worst} differs by {errors[worst]:.2e} of its "
                                      "largest magnitude")


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_autocast_stays_within_its_tolerance(name, roots):
    _, model, b = tiny_case(name, roots)
    (out_g, grad_g), (out_c, grad_c) = (run(model, b, CUDA, torch.float32, autocast=True),
                                        run(model, b, CPU))
    assert_same_structure(out_g + grad_g, out_c + grad_c)
    for (n, a), (_, r) in zip(out_g, out_c):
        if r.is_floating_point():
            assert norm_rel(a, r) <= BF16_OUT, (f"{name}: output {n}: relative error "
                                                f"{norm_rel(a, r):.2e}")
    if not grad_c:  # the closed forms have no parameters
        return
    every = norm_rel(torch.cat([a.flatten() for _, a in grad_g]),
                     torch.cat([r.flatten() for _, r in grad_c]))
    assert every <= BF16_GRADS, f"{name}: all gradients together: relative error {every:.2e}"
    scale = max(float(r.norm()) for _, r in grad_c)
    # a gradient far below the largest is judged against 1e-3 of it
    for (n, a), (_, r) in zip(grad_g, grad_c):
        err = norm_rel(a, r, 1e-3 * scale)
        assert err <= BF16_GRAD, f"{name}: {n}: relative error {err:.2e}"


@pytest.mark.parametrize("name,dtype,tol",
                         [("hist.yaml", torch.float64, 1e-9), ("magnet.yaml", torch.float64, 1e-9),
                          ("hifusion.yaml", torch.float64, 1e-9),
                          ("hist.yaml", torch.float32, 1e-2)])
def test_checkpointing_gives_the_same_gradients(name, dtype, tol, roots):
    """model.checkpoint recomputes each step in the backward, with the random state of its forward
    (attention dropout on, training mode): the gradients equal those of the plain backward, to 1e-9
    of each tensor's largest magnitude in float64. float32 runs under bf16 autocast (train.forward),
    which the recomputation must reproduce too: each gradient within 1e-2 of its norm (bf16 sums in
    another order differ by an ulp)."""
    results = []
    for flag in ("false", "true"):
        _, model, b = tiny_case(name, roots, [f"model.checkpoint={flag}", "model.attn_dropout=0.1"])
        torch.manual_seed(3)
        results.append(run(model, b, CUDA, dtype, autocast=dtype == torch.float32,
                           train_mode=True)[1])
    scale = max(float(r.norm()) for _, r in results[0])
    # only the order of atomic additions (index_add_) may differ
    for (n, a), (_, r) in zip(*results):
        err = max_rel(a, r) if dtype == torch.float64 else norm_rel(a, r, 1e-3 * scale)
        assert err <= tol, f"{name}: {n} differs by {err:.2e} with model.checkpoint=true"


def test_a_training_run_on_the_gpu_follows_the_cpu(roots, tmp_path):
    """train.train_fold (the per-epoch loop of train.py: augmentation, AdamW, warm-up and cosine
    schedule, clipping) for 3 epochs on 3 slides, on the GPU (bf16 autocast) and on the CPU
    (float32): the logged epoch losses agree to 2e-2 in the first epoch (mostly the initial weights)
    and 1e-1 after; the weights stay finite and on the device."""
    cfg, model, _ = tiny_case("default.yaml", roots, ["train.epochs=3"])
    paths = data.list_slides(roots[0])[:3]
    genes = train.choose_genes(cfg, [data.read_slide(p) for p in paths], roots[0])
    batches = [train.prepare(data.read_slide(p, genes=genes), cfg, None) for p in paths]
    losses = []
    for device in (CPU, CUDA):
        lines, m = [], copy.deepcopy(model).to(device)
        train.train_fold(0, batches, [], cfg, m, device, tmp_path / device.type, lines.append)
        losses.append([float(x) for line in lines for x in re.findall(r" loss ([0-9.]+)", line)])
        assert all(p.device.type == device.type and torch.isfinite(p).all() for p in m.parameters())
    cpu, gpu = losses
    assert len(cpu) == len(gpu) == 3 and all(math.isfinite(v) for v in gpu)
    assert abs(gpu[0] - cpu[0]) <= 2e-2 * cpu[0], losses
    assert all(abs(g - c) <= 1e-1 * c for g, c in zip(gpu, cpu)), losses


@pytest.mark.parametrize("name", ["default.yaml", "hist.yaml", "superres.yaml"])
def test_prediction_on_the_gpu_equals_the_cpu(name, roots, tmp_path):
    """predict.predict_slide in float64 (autocast leaves float64 alone) equals the CPU's to 1e-6;
    the files of write_slide_predictions (bf16 autocast on the GPU) hold the same genes, barcodes
    and coordinates and predictions within the bf16 tolerance."""
    from eval import read_predictions
    cfg, model, _ = tiny_case(name, roots)
    model.eval()
    root = roots[2 ** cfg["model"]["sub_levels"] if cfg["model"]["sub_levels"] else 0]
    slide = data.read_slide(data.list_slides(root)[1])
    slide64 = copy.copy(slide)
    for key in ("features", "pseudo_features", "sub_features"):
        if getattr(slide, key, None) is not None:
            setattr(slide64, key, getattr(slide, key).double())
    preds = [predict.predict_slide(copy.deepcopy(model).to(d, torch.float64), slide64,
                                   cfg["data"]["pseudo"], d, dtype=torch.float64)
             for d in (CUDA, CPU)]
    assert max_rel(*preds) <= F64_TOL
    genes = [f"g{i}" for i in range(preds[0].shape[1])]
    files = []
    for d in (CUDA, CPU):
        predict.write_slide_predictions([(copy.deepcopy(model).to(d), genes)], slide, cfg, d,
                                        tmp_path / d.type)
        files.append(read_predictions(tmp_path / d.type / f"{slide.slide_id}.h5"))
    gpu, cpu = files
    assert gpu["genes"] == cpu["genes"] and (gpu["barcodes"] == cpu["barcodes"]).all()
    assert (gpu["coords"] == cpu["coords"]).all()
    assert norm_rel(torch.from_numpy(gpu["pred"]), torch.from_numpy(cpu["pred"])) <= BF16_OUT
    for k, level in cpu["levels"].items():
        assert norm_rel(torch.from_numpy(gpu["levels"][k]["pred"]),
                        torch.from_numpy(level["pred"])) <= BF16_OUT


@pytest.mark.parametrize("name",
                         ["default.yaml", "hist.yaml", "feast.yaml", "stf.yaml", "hifusion.yaml"])
def test_no_host_device_copy_inside_the_blocks(name, roots):
    """Every Block call of a training forward and of an inference forward runs with CUDA's sync
    debug mode set to "error": any operation that waits for the GPU (a device-to-host copy, .item(),
    .tolist(), nonzero, a blocking host-to-device copy) raises there. The guard itself is checked:
    .item() raises inside it. Then each block call is replayed under torch.profiler (CUDA activity)
    and its memcpy events counted: none may be host-to-device or device-to-host (the profiler also
    sees non-blocking copies, which sync debug mode does not); a deliberate .cpu() is counted, so
    the counter is not blind."""
    from torch.profiler import ProfilerActivity, profile

    def copies(fn):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events()
                   if "Memcpy" in e.name and ("HtoD" in e.name or "DtoH" in e.name))

    calls, real = [], Block.forward

    def guarded(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with pytest.raises(RuntimeError):  # the guard sees a sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.ones(1, device=CUDA).item()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert copies(lambda: torch.ones(4, device=CUDA).cpu()) >= 1

    _, model, b = tiny_case(name, roots)
    model = model.to(CUDA)
    Block.forward = guarded
    try:
        model.train()
        train.forward(model, b, CUDA)["pred"].float().sum().backward()
        model.eval()
        with torch.no_grad():
            train.forward(model, b, CUDA)
    finally:
        Block.forward = real
    assert calls, f"{name}: no Block was called"
    with torch.no_grad():  # the inference calls (the last ones), replayed one by one
        n_inference = len(calls) // 2
        for block, args, kwargs in calls[-n_inference:]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                assert copies(lambda: real(block, *args, **kwargs)) == 0, (
                    f"{name}: a block copies to or from the host")


@pytest.mark.slow
def test_a_1m_bin_inference_stays_under_the_cpu_memory_figure():
    """hist.yaml inference (eval, no grad, float16 outputs) of a 1M-bin Visium HD-like slide with
    float16 features, as bench.py's step part runs it: torch.cuda.max_memory_allocated stays under
    the 10,278 MB peak of the same inference on the CPU (BENCHMARKS.md, 1M-spot HD-like inference;
    interpreter and torch included there): features on the device (2 GB), two (N, 512) float32
    tensors, float16 predictions (4 GB) and chunk temporaries."""
    import bench
    spec = dict(part="step", name="hist", mode="infer", layout="hd", n=1_000_000,
                features_dtype="float16")
    fn, _ = bench._step_case(spec, CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    assert peak_mb < 10278, f"1M-bin inference allocated {peak_mb:.0f} MB on the GPU"

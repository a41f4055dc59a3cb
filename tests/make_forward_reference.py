"""Writes tests/forward_reference.pt: for every configs/*.yaml (and a few switches no config turns
on), a tiny float64 model on a fixed random slide, its state_dict, its inputs and everything its
forward returns, in eval (the fast kernels' inference path) and in training (dropout on, seeded; the
gradients of every parameter too). tests/test_forward_reference.py loads each state_dict into the
model the current code builds and asks for the same numbers on both kernel paths: a rewrite of the
forward must not change them, and checkpoints saved before it must still load.

    OMP_NUM_THREADS=1 python tests/make_forward_reference.py
        # only when the model is meant to change
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lattice  # noqa: E402
from model import ModelConfig, build_model  # noqa: E402

OUT = ROOT / "tests" / "forward_reference.pt"
C, G, SIDE = 6, 5, 9  # feature width, genes, spots per side of the slide (before some are dropped)
TINY = dict(dim=8, heads=2, hidden=8, pca=4, ffn_ratio=1)
# float32 cases (bit for bit all the same)
FLOAT32 = {"stf_bottleneck", "default_bf16", "hifusion_bf16", "magnet_bf16"}
EXTRA = {  # switches no config file turns on, on top of a config
    "hist_checkpoint": ("hist", dict(checkpoint=True)),
    "default_knn_zinb": ("default",
                         dict(attention="knn", bias="alibi", head="zinb", pos_encoding=True)),
    "default_mlp_alibi": ("default", dict(head="mlp", bias="alibi", coarse_attention="same")),
    "stf_bottleneck": ("stf", dict(attention="none")),   # float32: h2h off adds float32 zeros
    "hifusion_linear_pool": ("hifusion",
                             dict(sub_pool="linear", out_levels=[-1, 0, 1], checkpoint=True)),
    # float32, and eval under the CPU's bf16 autocast
    "default_bf16": ("default", dict(pos_encoding=True)),
    "hifusion_bf16": ("hifusion", {}),
    "magnet_bf16": ("magnet", {}),
    "hist_split_linear": ("hist", dict(windows="split", uncoarsen="linear")),  # tessera's forms
    "default_union_alibi": ("default", dict(windows="union", bias="alibi", slopes="feast")),
}


def configs() -> dict[str, dict]:
    """name -> the model section of the config, shrunk to tiny widths."""
    out = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        m = dict(yaml.safe_load(path.read_text())["model"])
        m.update(TINY)
        if "pathway_tokens" in m:
            m["pathway_tokens"] = min(m["pathway_tokens"], 4)
        out[path.stem] = m
    for name, (base, kw) in EXTRA.items():
        out[name] = {**out[base], **kw}
    return out


def slide_inputs(m: dict, seed: int) -> dict:
    """A jittered square grid with holes at the config's pitch, features, pseudo-spots,
    sub-patches."""
    g = torch.Generator().manual_seed(seed)
    pitch = m.get("unit_um") or 100.0
    i, j = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    xy = torch.stack([i.flatten(), j.flatten()], 1).double() * pitch
    keep = torch.rand(len(xy), generator=g) > 0.15
    xy = xy[keep] + torch.rand(int(keep.sum()), 2, generator=g, dtype=torch.float64) * pitch * 0.05
    N = len(xy)
    b = {"features": torch.randn(N, C, generator=g, dtype=torch.float64) * 2 + 1, "coords": xy,
         "unit": m.get("unit_um") or lattice.default_unit(xy)}
    if m.get("local_blocks", 0):  # FEAST pseudo-spots: off the grid, between spots
        M = N // 3
        b["pseudo_coords"] = xy[:M] + pitch / 2
        b["pseudo_features"] = torch.randn(M, C, generator=g, dtype=torch.float64)
    if m.get("sub_levels", 0):
        r = 2 ** m["sub_levels"]
        b["sub_features"] = torch.randn(N, r * r, C, generator=g, dtype=torch.float64)
        b["sub_valid"] = torch.rand(N, r * r, generator=g) > 0.2
        # >= 1 per spot
        b["sub_valid"][torch.arange(N), torch.randint(r * r, (N,), generator=g)] = True
    return b


def build(m: dict, dtype=torch.float64) -> torch.nn.Module:
    return build_model(ModelConfig.from_dict(m), C, G).to(dtype)


def call(model, b: dict, **kw):
    """As train.forward and predict.predict_outputs call a model."""
    sub = {k: b[k] for k in ("sub_features", "sub_valid") if k in b}
    return model(b["features"], b["coords"], b.get("pseudo_features"), b.get("pseudo_coords"),
                 unit=b["unit"], **sub, **kw)


def flatten(x, prefix: str, out: dict) -> dict:
    """Nested dicts / lists of tensors -> {"a/b/0": tensor} (graph kept); other leaves (window
    names) skipped."""
    if isinstance(x, torch.Tensor):
        out[prefix] = x
    elif isinstance(x, dict):
        for k, v in x.items():
            flatten(v, f"{prefix}/{k}", out)
    elif isinstance(x, (list, tuple)):
        for k, v in enumerate(x):
            flatten(v, f"{prefix}/{k}", out)
    return out


def run(model, b: dict) -> dict:
    """Every output of the forward: eval (no grad; a float32 model also under bf16 autocast), then
    training with dropout, seeded, and the gradients of a fixed random weighting of every float
    output."""
    out = {}
    model.eval()
    with torch.no_grad():
        flatten(call(model, b), "eval", out)
        if b["features"].dtype == torch.float32:  # as train.forward and predict.py run it on CUDA
            with torch.autocast("cpu", dtype=torch.bfloat16):
                flatten(call(model, b), "eval_bf16", out)
    model.train()
    torch.manual_seed(1)
    live = flatten(call(model, b), "train", {})
    out.update(live)
    terms = [v for _, v in sorted(live.items()) if v.requires_grad]
    if terms:
        g = torch.Generator().manual_seed(2)
        loss = sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum() for v in terms)
        model.zero_grad(set_to_none=True)
        loss.backward()
        out.update({f"grad/{name}": p.grad for name, p in model.named_parameters()
                    if p.grad is not None})
    model.eval()
    return {k: v.detach().clone() for k, v in out.items()}


def make_case(m: dict, seed: int, dtype=torch.float64) -> dict:
    torch.manual_seed(seed)
    model = build(m, dtype)
    b = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
         for k, v in slide_inputs(m, seed).items()}
    g = torch.Generator().manual_seed(seed + 100)
    target = torch.rand(len(b["features"]), G, generator=g, dtype=torch.float64).to(dtype) * 3
    membership = (torch.rand(m.get("pathway_tokens", 0), G, generator=g) > 0.5).to(dtype) \
        if m.get("pathway_tokens", 0) else None
    model.init_from_data(b["features"].mean(0), b["features"].std(0), target.mean(0), membership)
    if hasattr(model, "fit"):
        model.fit(b["features"], target)
    elif hasattr(model, "fit_slides"):
        model.fit_slides([{"features": b["features"], "coords": b["coords"], "target": target}])
    # away from the identity / zero initialisations, so every path shows in the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return {"model": m, "dtype": str(dtype).removeprefix("torch."),
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "inputs": b, "outputs": run(model, b)}


def main():
    cases = {name: make_case(m, seed, torch.float32 if name in FLOAT32 else torch.float64)
             for seed, (name, m) in enumerate(configs().items())}
    tmp = OUT.with_suffix(".tmp")
    torch.save(cases, tmp)
    tmp.replace(OUT)
    for name, c in cases.items():
        print(f"{name}: {len(c['state'])} state tensors, {len(c['outputs'])} outputs")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()

"""The synthetic demo dataset: slide caches whose expression depends on the spot and its
neighbourhood.

    python synthetic.py --out DIR
        [--slides 12 --seed 0 --layout visium|square|hd --spots 1500 --pseudo]
    python synthetic.py --out DIR --layout square --sub 2    # sub-spot truth for super-resolution
"""
from __future__ import annotations

import threads  # noqa: F401  first: the thread defaults, set before torch loads (threads.py)
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import files
from data import Slide, write_slide
# a sub-spot dataset is a fine dataset binned, by the one binning there is
from hest import bin_slide


# ----------------------------------------------------------------------------- synthetic slides

# pitch in um, hexagonal
LAYOUTS = {"visium": (100.0, True), "square": (200.0, False), "hd": (8.0, False)}
# Latent tissue programs: (name, kind, length scale of its smooth random field in spot pitches, or
# the region a margin surrounds). What the spot's own image features show of each kind:
#   region  - a thresholded field (tumour, gland): clearly visible
#   local   - visible under light noise
#   neigh   - visible only under heavy per-spot noise; smooth over several spots, so the mean of the
#             neighbours' features recovers it
#   inhibit - a pair visible locally whose expression is suppressed by the other one in the first
#             ring
#   margin  - spots outside a region with the region in their two rings; invisible locally
PROGRAMS = (("TUMOUR", "region", 5), ("GLAND", "region", 8), ("CELLULARITY", "local", 4),
            ("LOCAL_A", "local", 2), ("LOCAL_B", "local", 3), ("LOCAL_C", "local", 6),
            ("NEIGH_A", "neigh", 3), ("NEIGH_B", "neigh", 4), ("NEIGH_C", "neigh", 4),
            ("NEIGH_D", "neigh", 5), ("NEIGH_E", "neigh", 6),
            ("INHIBIT_A", "inhibit", 2.5), ("INHIBIT_B", "inhibit", 2.5),
            ("TUMOUR_MARGIN", "margin", "TUMOUR"), ("GLAND_MARGIN", "margin", "GLAND"))
FIELDS = [p for p in PROGRAMS if p[1] != "margin"] + [("NUISANCE_A", "local", 2),
                                                      ("NUISANCE_B", "local", 5)]
# feature noise per visible signal
NOISE = {"region": 0.3, "local": 0.5, "neigh": 3.0, "inhibit": 0.5}


def _random_fields(scales, rng, k=64):
    """Unit-variance Gaussian random fields with squared-exponential correlation (random Fourier
    features, k frequencies each); returns a function from points (M, 2) to values (M,
    len(scales))."""
    omega = (rng.standard_normal((len(scales), k, 2))
             / np.asarray(scales, float)[:, None, None]).reshape(-1, 2)
    phase = rng.uniform(0, 2 * np.pi, len(scales) * k)
    return lambda xy: math.sqrt(2 / k) * np.cos((xy @ omega.T + phase).astype(np.float32)).reshape(
        len(xy), len(scales), k).sum(-1, dtype=np.float64)


def _neighbour_mean(v, mask, hexagonal, radius):
    """Mean of v (R, C, K) over the in-tissue lattice sites within `radius` pitches (not the site
    itself)."""
    hx, hy = (0.5, math.sqrt(3) / 2) if hexagonal else (1.0, 1.0)
    r = int(radius / hx) + 1
    total, count = np.zeros_like(v), np.zeros(mask.shape)
    for dr in range(-r, r + 1):
        for dc in range(-r, r + 1):
            if ((hexagonal and (dr + dc) % 2)
                or not 0 < math.hypot(dr * hy, dc * hx) <= radius + 1e-6):
                continue
            dst = np.s_[max(0, -dr):mask.shape[0] - max(0, dr),
                        max(0, -dc):mask.shape[1] - max(0, dc)]
            src = np.s_[max(0, dr):mask.shape[0] - max(0, -dr),
                        max(0, dc):mask.shape[1] - max(0, -dc)]
            total[dst] += v[src] * mask[src][..., None]
            count[dst] += mask[src]
    return total / np.maximum(count, 1)[..., None]


def _region(z):
    return 1 / (1 + np.exp(-4 * (z - 0.5)))


def _visible(z, rng, clarity=1.0):
    """What the image shows of the latent fields z (M, len(FIELDS)): (M, len(FIELDS)) noisy signals,
    the noise divided by `clarity`."""
    sig = np.stack([_region(z[:, f]) if kind == "region" else z[:, f]
                    for f, (_, kind, _) in enumerate(FIELDS)], 1)
    noise = np.array([NOISE[kind] for _, kind, _ in FIELDS]) / clarity
    return sig + noise * rng.standard_normal(sig.shape)


def _sites(n: int, hexagonal: bool) -> int:
    """Lattice sites of the box a slide of n spots is drawn in (make_synthetic: ~3x the tissue)."""
    hx, hy = (0.5, math.sqrt(3) / 2) if hexagonal else (1.0, 1.0)
    side = math.sqrt(n / 0.3 * hx * hy * (2 if hexagonal else 1))
    return (int(side / hy) + 2) * (int(side / hx) + 2)


def slide_bytes(n_spots: int, n_genes: int, n_features: int, layout: str, sub: int = 0) -> tuple:
    """(memory, disk) in bytes for one slide of make_synthetic at most: the largest slide (n_spots x
    1.15, x sub^2 sub-spots) times, in memory, 18 kB per site of its box (the random fields' (sites,
    18 x 64) Fourier features in float64 and float32: the peak) plus 48 bytes per spot and gene or
    feature; on disk 4.5 bytes per spot and gene or feature (float32, compressed counts), times 1 +
    sub^2 with sub-spots. Measured as the peak resident set (tests/test_synthetic.py): 16.6 kB per
    site."""
    n = int(n_spots * (sub * sub if sub else 1) * 1.15) + 1
    memory = 18_000 * _sites(n, LAYOUTS[layout][1]) + 48 * n * (n_genes + n_features) + 2 ** 26
    disk = n * (4.5 * (n_genes + n_features) + 150) * (1 + sub * sub) / (sub * sub if sub else 1)
    return memory, disk


def check_sizes(out, n_slides: int, n_spots: int, n_genes: int, n_features: int, layout: str,
                sub: int, memory: int | None = None, disk: int | None = None) -> None:
    """Refuse sizes whose largest slide does not fit in the machine's free memory, or whose dataset
    does not fit on the disk of `out`, with the figure and a --spots or --slides that would fit."""
    size = lambda n: slide_bytes(n, n_genes, n_features, layout, sub)  # noqa: E731
    free = files.available_memory() if memory is None else memory
    need = size(n_spots)[0]
    if need > free:
        fit = files.largest_fitting(lambda n: size(n)[0], 1, n_spots, free)
        hint = f"--spots {fit} would fit" if fit >= 1 else "lower --genes or --features"
        files.check_memory(need, f"synthetic.py: a slide of --spots {n_spots}", hint,
                           available=free)
    total = n_slides * size(n_spots)[1]
    free = files.free_disk(out) if disk is None else disk
    per_slide = size(n_spots)[1]
    fit = int(free // per_slide)
    files.check_disk(total, out, f"synthetic.py: --slides {n_slides} of --spots {n_spots}",
                     f"--slides {fit} would fit" if fit >= 1 else "lower --spots", available=free)


def make_synthetic(out, n_slides: int = 12, seed: int = 0, layout: str = "visium",
                   n_spots: int = 1500, n_genes: int = 300, n_features: int = 64,
                   pseudo: bool = False, overwrite: bool = False, log=print,
                   sub: int = 0) -> list[Path]:
    """Write a synthetic dataset of slide caches (see PROGRAMS) plus programs.gmt and metadata.csv.
    Deterministic for a seed: dataset-wide draws use seed, slide i draws use (seed, i). `sub` = 2 or
    4: the tissue is simulated at sub-spot resolution (a square grid of pitch / sub, the programs'
    length scales shortened, features clearer), then binned into spots of the layout's pitch
    (hest.bin_slide): each sub-patch's features show its own sub-spot, and sub_counts hold the
    sub-spot truth. Every size is checked against the machine's memory and disk before anything is
    drawn, and the files are written all or nothing (files.Outputs)."""
    sizes = dict(slides=n_slides, spots=n_spots, genes=n_genes, features=n_features)
    if min(sizes.values()) < 1 or seed < 0:
        raise ValueError(f"make_synthetic: expected every size >= 1 and a seed >= 0, found "
                         f"{sizes}, seed {seed}")
    if layout not in LAYOUTS:
        raise ValueError(f"make_synthetic: expected a layout of {sorted(LAYOUTS)}, found "
                         f"{layout!r}")
    t0, out = time.time(), Path(out)
    pitch, hexagonal = LAYOUTS[layout]
    if sub:
        if hexagonal or pseudo or sub not in (2, 4):
            raise ValueError(f"synth --sub {sub}: expected --sub 2 or 4 with a square layout "
                             "(square, hd) and no --pseudo (sub-spots are a square grid binned "
                             f"into spots), found layout {layout}"
                             f"{' with --pseudo' if pseudo else ''}")
    check_sizes(out, n_slides, n_spots, n_genes, n_features, layout, sub)
    names = [f"synth_{i:02d}.h5" for i in range(n_slides)] + ["programs.gmt", "metadata.csv"]
    with files.Outputs(out, names, overwrite, command="synthetic.py", log=log) as outputs:
        paths, total, n_pat = _draw(outputs, n_slides, seed, layout, n_spots, n_genes, n_features,
                                    pseudo, sub)
    log(f"synth: {n_slides} slides, {total} spots, {n_genes} genes, {n_features} features, {n_pat} "
        f"patients -> {out} in {time.time() - t0:.1f} s")
    return paths


def _draw(outputs, n_slides, seed, layout, n_spots, n_genes, n_features, pseudo, sub):
    """make_synthetic's slides, programs.gmt and metadata.csv, written through `outputs`."""
    pitch, hexagonal = LAYOUTS[layout]
    if sub:
        pitch, n_spots = pitch / sub, n_spots * sub * sub
    # sub: programs vary over a quarter of their usual length (in sub-spot pitches) and a sub-patch
    # shows its sub-spot with a third of the usual noise, so that the sub-spots of one spot differ,
    # visibly. (With the usual lengths, even a ridge fitted on the sub-spot truth beats copying the
    # spot into its sub-spots by only ~0.02 PCC: count noise hides what little differs inside a
    # spot.)
    scale, clarity = (0.25, 3.0) if sub else (1.0, 1.0)
    hx, hy = (0.5, math.sqrt(3) / 2) if hexagonal else (1.0, 1.0)
    rng = np.random.default_rng(seed)
    P, S = len(PROGRAMS), len(FIELDS)
    # genes: ~85% belong to one program (a quarter also weakly to a second), the rest to none
    n_free = round(0.15 * n_genes)
    primary = np.concatenate([rng.permutation(np.arange(n_genes - n_free) % P),
                              -np.ones(n_free, int)])
    W = np.zeros((n_genes, P))
    for g in np.flatnonzero(primary >= 0):
        W[g, primary[g]] = rng.uniform(0.5, 1.0) * (-1 if rng.random() < 0.15 else 1)
        if rng.random() < 0.25:
            W[g, (primary[g] + rng.integers(1, P)) % P] = rng.uniform(0.2, 0.5)
    log_base = rng.normal(math.log(3), 1.0, n_genes)
    theta = rng.uniform(2, 10, n_genes)  # NB size; variance mu + mu^2/theta
    mix = rng.standard_normal((S, n_features)) / math.sqrt(S)  # visible signals -> features
    stain_shift, stain_gain = (rng.standard_normal((3, n_features)),
                               rng.standard_normal((3, n_features)))
    patient_of = [2 * (i // 5) + (i % 5 >= 3) for i in range(n_slides)]   # 3, 2, 3, 2 ... slides
    n_pat = patient_of[-1] + 1
    patient_offset = 0.4 * rng.standard_normal((n_pat, S))  # e.g. more tumour in a patient
    patient_stain = rng.standard_normal((n_pat, 3))
    genes = [f"G{g:03d}" for g in range(n_genes)]
    names = [f"P{p:02d}_{name}" for p, (name, _, _) in enumerate(PROGRAMS)]
    paths, rows, total = [], [], 0
    for i in range(n_slides):
        srng, pat = np.random.default_rng([seed, i]), patient_of[i]
        n = int(n_spots * srng.uniform(0.85, 1.15))
        side = math.sqrt(n / 0.3 * hx * hy * (2 if hexagonal else 1))    # box ~3x the tissue area
        R, C = int(side / hy) + 2, int(side / hx) + 2
        rr, cc = np.mgrid[0:R, 0:C]
        grid = np.stack([cc * hx, rr * hy], -1).reshape(-1, 2)           # (R*C, 2) in pitches
        fields = _random_fields([s * scale for _, _, s in FIELDS] + [side / 4], srng)
        z = fields(grid)                                                 # (R*C, S+1)
        z[:, :S] += patient_offset[pat]
        # irregular tissue footprint: the n sites scoring
        # best on a random ellipse plus a smooth field
        angle, aspect = srng.uniform(0, np.pi), srng.uniform(0.6, 1.0)
        u, v = ((grid - side / 2) @ np.array([[math.cos(angle), -math.sin(angle)],
                                              [math.sin(angle), math.cos(angle)]])).T
        score = -np.hypot(u, v / aspect) / side + 0.15 * z[:, S]
        if hexagonal:
            score[(rr + cc).reshape(-1) % 2 == 1] = -np.inf
        mask = np.zeros(R * C, bool)
        mask[np.argsort(-score, kind="stable")[:n]] = True
        # program activities, including the ones that depend on the neighbours
        idx = {name: f for f, (name, _, _) in enumerate(FIELDS)}
        zg, mg = z[:, :S].reshape(R, C, S), mask.reshape(R, C)
        ring1 = _neighbour_mean(zg, mg, hexagonal, 1.0).reshape(-1, S)
        ring2 = _neighbour_mean(_region(zg), mg, hexagonal, 2.0).reshape(-1, S)
        act = np.zeros((R * C, P))
        for p, (name, kind, arg) in enumerate(PROGRAMS):
            if kind == "margin":      # outside the region, with the region in the two rings around
                act[:, p] = 5 * ring2[:, idx[arg]] * (1 - _region(z[:, idx[arg]])) - 0.5
            elif kind == "inhibit":   # suppressed by the partner's level in the first ring
                partner = idx["INHIBIT_B" if name == "INHIBIT_A" else "INHIBIT_A"]
                act[:, p] = (z[:, idx[name]] - 0.8 * ring1[:, partner]) / 1.2
            else:
                act[:, p] = (2 * _region(z[:, idx[name]]) - 1 if kind == "region"
                             else z[:, idx[name]])
        act = act[mask]                                                  # (N, P)
        # expression: NB counts around library size x exp(baseline + loadings . activities)
        lib = math.exp(srng.normal(0, 0.3)) * np.exp(0.4 * z[mask, idx["CELLULARITY"]]
                                                     + 0.2 * srng.standard_normal(n))
        expected = lib[:, None] * np.exp(log_base + act @ W.T)           # (N, G)
        counts = srng.negative_binomial(theta, theta / (theta + expected)).astype(np.float32)
        # features: mixed visible signals + noise, then a per-slide affine stain shift
        stain = patient_stain[pat] + 0.5 * srng.standard_normal(3)
        embed = lambda vis: (vis @ mix
                             + 0.3 / clarity * srng.standard_normal((len(vis), n_features))) \
            * np.exp(0.1 * stain @ stain_gain) + 0.35 * stain @ stain_shift  # noqa: E731
        offset = srng.uniform(0, 5000, 2)
        coords = grid[mask] * pitch + offset + 0.01 * pitch * srng.standard_normal((n, 2))
        slide = Slide(f"synth_{i:02d}",
                      torch.tensor(embed(_visible(z[mask, :S], srng, clarity)),
                                   dtype=torch.float32),
                      torch.tensor(coords, dtype=torch.float32),
                      np.array([f"s{i:02d}_{j:05d}" for j in range(n)]), patient=f"P{pat:02d}",
                      spot_pitch_um=pitch, encoder="synthetic", counts=torch.from_numpy(counts),
                      genes=genes, library_size=torch.from_numpy(counts.sum(1)),
                      expected=torch.tensor(expected, dtype=torch.float32))
        # off-grid pseudo-spots at triangle (hex) or square centres inside the tissue (FEAST)
        if pseudo:
            if hexagonal:   # sites (r, c), (r, c+2), (r+1, c+1) form a triangle
                pr, pc = np.nonzero(mg[:-1, :-2] & mg[:-1, 2:] & mg[1:, 1:-1])
                pxy = np.stack([pc * hx + 0.5, pr * hy + hy / 3], 1)
            else:
                pr, pc = np.nonzero(mg[:-1, :-1] & mg[:-1, 1:] & mg[1:, :-1] & mg[1:, 1:])
                pxy = np.stack([pc + 0.5, pr + 0.5], 1)
            pz = fields(pxy)[:, :S] + patient_offset[pat]
            slide.pseudo_features = torch.tensor(embed(_visible(pz, srng)), dtype=torch.float32)
            slide.pseudo_coords = torch.tensor(pxy * pitch + offset, dtype=torch.float32)
        if sub:
            slide = bin_slide(slide, sub)
            n = slide.n_spots
        write_slide(outputs.path(f"{slide.slide_id}.h5"), slide, overwrite=True,
                    where=outputs.folder / f"{slide.slide_id}.h5")
        paths.append(outputs.folder / f"{slide.slide_id}.h5")
        rows.append(f"{slide.slide_id},{slide.patient},{layout},{n}")
        total += n
    outputs.path("programs.gmt").write_text("".join(
        f"{name}\tsynthetic:{kind}\t" + "\t".join(genes[g] for g in np.flatnonzero(W[:, p])) + "\n"
        for p, (name, (_, kind, _)) in enumerate(zip(names, PROGRAMS))))
    outputs.path("metadata.csv").write_text("id,patient,layout,n_spots\n" + "\n".join(rows) + "\n")
    return paths, total, n_pat



# ----------------------------------------------------------------------------- command line

def main(argv=None):
    ap = argparse.ArgumentParser(prog="synthetic.py",
                                 description="Write a synthetic dataset (slides, programs.gmt, "
                                             "metadata.csv).")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--slides", type=int, default=12, help="number of slides (2-3 per patient)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="visium",
                    help="visium: hexagonal 100 um; square: 200 um (legacy ST); hd: "
                         "square 8 um bins")
    ap.add_argument("--spots", type=int, default=1500, help="spots per slide (+-15%%)")
    ap.add_argument("--genes", type=int, default=300)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--pseudo", action="store_true",
                    help="also write off-grid pseudo-spots (FEAST)")
    ap.add_argument("--sub", type=int, default=0, choices=[0, 2, 4],
                    help="simulate 2 x 2 or 4 x 4 sub-spots per spot (sub_features, sub_counts); "
                         "square layouts")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    a = ap.parse_args(argv)
    try:
        make_synthetic(a.out, a.slides, a.seed, a.layout, a.spots, a.genes, a.features,
                       a.pseudo, a.overwrite, sub=a.sub)
    except (ValueError, OSError) as e:  # e.g. an existing output file: one line, no traceback
        raise SystemExit(" ".join(str(e).split())) from None


if __name__ == "__main__":
    main()

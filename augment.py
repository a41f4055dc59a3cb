"""The coordinate augmentation of HiST (Appendix A.6/A.7): each training step sees the slide
mirrored, turned, sheared and with some spots dropped, at a strength that decays over training. Only
coordinates move; features stay as they are, apart from the sub-patches of a spot, which turn and
mirror with it.
"""
from __future__ import annotations

import math

import torch


def aug_strength(epoch: int, epochs: int, aug: dict) -> float:
    """HiST A.7: cosine decay of the augmentation strength from `start` to `end` over training."""
    t = epoch / max(1, epochs - 1)
    return aug["end"] + 0.5 * (aug["start"] - aug["end"]) * (1 + math.cos(math.pi * t))


def augment_coords(xy: torch.Tensor, strength: float, generator: torch.Generator | None = None,
                   p_drop: float = 0.2, max_shear_deg: float = 15.0, max_rot_deg: float = 30.0):
    """HiST A.6/A.7: random mirror, shear (up to strength * max_shear_deg), rotation (a multiple of
    90 deg plus up to strength * max_rot_deg) around the centroid, then spot drop with probability
    p_drop * strength (at least one spot stays). Mirror and right-angle turns are symmetries of the
    lattice, so they are drawn at any strength > 0; strength 0 is the identity. Features are
    untouched. Returns (keep (K,) long indices into xy, transformed xy[keep] (K, 2))."""
    n = xy.shape[0]
    if strength <= 0:
        return torch.arange(n), xy.clone()
    u = lambda: float(torch.rand((), generator=generator, dtype=torch.float64))  # noqa: E731
    mirror = -1.0 if u() < 0.5 else 1.0
    shear = math.tan(math.radians((2 * u() - 1) * strength * max_shear_deg))
    angle = math.pi / 2 * int(4 * u()) + math.radians((2 * u() - 1) * strength * max_rot_deg)
    c, s = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    # rotate . shear . mirror
    A = rotate @ torch.tensor([[mirror, shear], [0.0, 1.0]], dtype=torch.float64)
    centre = xy.double().mean(0)
    out = ((xy.double() - centre) @ A.T + centre).to(xy.dtype)
    keep = torch.rand(n, generator=generator) >= p_drop * strength
    if not keep.any():
        keep[int(torch.randint(n, (1,), generator=generator))] = True
    keep = keep.nonzero().squeeze(1)
    return keep, out[keep]


def sub_permutation(old_xy, new_xy, r) -> torch.Tensor:
    """(S,) index: after an augmentation moved the spots from old_xy to new_xy, sub-position s of
    the moved spot holds the old sub-patch index[s]. The transform's linear part (exact least
    squares, the augmentation is affine) is snapped to the nearest of the 8 symmetries of the square
    (mirror, quarter turns), which permutes the r x r sub-positions; the remaining small rotation
    and shear move whole spots only."""
    a, b = old_xy.double() - old_xy.double().mean(0), new_xy.double() - new_xy.double().mean(0)
    # b = a @ A.T
    A = torch.linalg.lstsq(a, b).solution.T if len(a) > 2 else torch.eye(2, dtype=torch.float64)
    turns = [torch.tensor(m, dtype=torch.float64)
             for m in ([[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]],
                       [[0, 1], [-1, 0]])]
    D = max(turns + [t @ torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64)) for t in turns],
            key=lambda m: float((m * A).sum()))
    s = torch.arange(r * r)
    # (S, 2) sub-positions (ix, iy), centred
    ixy = torch.stack([s // r, s % r], 1).double() - (r - 1) / 2
    moved = torch.round(ixy @ D.T + (r - 1) / 2).long()  # where each old sub-position goes
    index = torch.empty(r * r, dtype=torch.long)
    index[r * moved[:, 0] + moved[:, 1]] = torch.arange(r * r)
    return index


def augmented(b: dict, strength: float, aug: dict, gen: torch.Generator) -> dict:
    """HiST A.6: transform the coordinates (spots and pseudo-spots together) and drop spots;
    features untouched."""
    xy = b["coords"]
    n = xy.shape[0]
    if "pseudo_coords" in b:
        xy = torch.cat([xy, b["pseudo_coords"]])
    keep, new = augment_coords(xy, strength, gen, p_drop=aug["p_drop"],
                                    max_shear_deg=aug["shear_deg"], max_rot_deg=aug["rot_deg"])
    spots = keep < n
    if not spots.any():                                  # keep at least one real spot
        spots[0], keep[0] = True, 0
    out = {k: v for k, v in b.items() if k not in ("pseudo_features", "pseudo_coords")}
    ks = keep[spots]
    out["coords"] = new[spots]
    for key in ("features", "target", "counts", "library_size", "sub_features", "sub_valid"):
        if key in b:
            out[key] = b[key][ks]
    if "sub_features" in b and strength > 0:  # sub-patches turn and mirror with their spot
        index = sub_permutation(b["coords"][ks], out["coords"],
                                math.isqrt(b["sub_features"].shape[1]))
        out["sub_features"], out["sub_valid"] = (out["sub_features"][:, index],
                                                 out["sub_valid"][:, index])
    if "pseudo_coords" in b and (~spots).any():
        out["pseudo_coords"] = new[~spots]
        out["pseudo_features"] = b["pseudo_features"][keep[~spots] - n]
    return out

"""augment.py: the strength schedule, the coordinate transform and drop, and sub-patches that turn
with their spot."""
import math

import numpy as np
import pytest
import torch

import augment
import lattice


def test_aug_strength():
    aug = {"start": 1.0, "end": 0.2}
    assert augment.aug_strength(0, 50, aug) == pytest.approx(1.0)
    assert augment.aug_strength(49, 50, aug) == pytest.approx(0.2)
    t = [augment.aug_strength(e, 50, aug) for e in range(50)]
    assert all(a >= b for a, b in zip(t, t[1:]))          # decays, never rises


def pairwise(xy):
    return torch.cdist(xy.double(), xy.double())


def test_augment_coords():
    xy = torch.rand(300, 2) * 5000
    keep, out = augment.augment_coords(xy, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(keep, torch.arange(300)) and torch.equal(out, xy)
    angles = set()
    for seed in range(8):     # mirror and rotation only: distances and the centroid are preserved
        keep, out = augment.augment_coords(xy, 1.0, torch.Generator().manual_seed(seed), p_drop=0.0,
                                           max_shear_deg=0)
        assert len(keep) == 300 and torch.allclose(pairwise(out), pairwise(xy), atol=0.05)
        assert torch.allclose(out.mean(0), xy.mean(0), atol=0.05)
        v0, v1 = xy[1] - xy[0], out[1] - out[0]
        angles.add(round(math.degrees(math.atan2(v1[1], v1[0]) - math.atan2(v0[1], v0[0]))
                         % 360 / 45))
    assert len(angles) > 2
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = augment.augment_coords(xy, 0.7, g1), augment.augment_coords(xy, 0.7, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    keep, out = augment.augment_coords(xy, 1.0, torch.Generator().manual_seed(1), max_rot_deg=0,
                                       max_shear_deg=15)
    assert keep.dtype == torch.long and out.shape == (len(keep), 2) and 150 < len(keep) < 300
    assert torch.equal(keep, keep.sort().values)
    moved = [augment.augment_coords(xy, 1.0, torch.Generator().manual_seed(s), p_drop=0)[1]
             for s in range(4)]
    sheared = [not torch.allclose(pairwise(out), pairwise(xy), atol=0.05) for out in moved]
    assert any(sheared)
    keep, out = augment.augment_coords(xy[:3], 1.0, torch.Generator().manual_seed(0), p_drop=1.0)
    assert len(keep) == 1 and out.shape == (1, 2)


@pytest.mark.parametrize("r", [2, 4])
def test_sub_patches_follow_their_spot_through_augmentation(r):
    """Sub-spot centres moved with the slide's augmentation, then reordered by sub_permutation, are
    the sub-positions of the moved spot: each lies nearest to the sub_coords formula's own
    position."""
    rng = np.random.default_rng(r)
    xy = torch.tensor(rng.uniform(0, 2000, (60, 2)))
    extent = 80.0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        keep, new = augment.augment_coords(xy, 1.0, gen, p_drop=0.0, max_rot_deg=8.0,
                                           max_shear_deg=5.0)
        A = torch.linalg.lstsq(xy - xy.mean(0), new - new.mean(0)).solution.T
        sub = lattice.sub_coords(xy, r, extent)                          # (N, S, 2) before
        moved = (sub - xy.mean(0)) @ A.T + new.mean(0)                     # the same affine map
        moved = moved[:, augment.sub_permutation(xy, new, r)]
        want = lattice.sub_coords(new, r, extent)
        for n in range(0, 60, 7):
            d = torch.cdist(moved[n], want[n])                             # (S, S)
            assert torch.equal(d.argmin(1), torch.arange(r * r)), (seed, n)
    assert torch.equal(augment.sub_permutation(xy, xy + 5.0, r), torch.arange(r * r))

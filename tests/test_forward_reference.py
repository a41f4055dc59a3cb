"""The forward of every configs/*.yaml model gives the numbers it gave when
tests/forward_reference.pt was written (tests/make_forward_reference.py, on the fast kernels): the
same state_dict keys (saved checkpoints load), the same outputs in eval and training and the same
gradients, in float64 to 1e-9 (float32 cases to 1e-4 of each tensor's largest value, their bf16
autocast outputs to bf16 precision). The reference kernels (model.kernels = reference) must give
the same eval outputs; their training outputs draw dropout masks differently, so
tests/test_kernels.py compares the two paths' training without dropout."""
from pathlib import Path

import pytest
import torch

import make_forward_reference as ref

REFERENCE = Path(__file__).parent / "forward_reference.pt"
CASES = torch.load(REFERENCE, weights_only=True)


def test_every_config_has_a_reference():
    assert set(ref.configs()) == set(CASES), ("configs/ changed: rerun "
                                              "tests/make_forward_reference.py")


def close(key, got, want, dtype):
    if not got.is_floating_point():
        return torch.equal(got, want)
    if key.startswith("eval_bf16"):  # bf16 rounds at 2^-8 of each value, in any order of operations
        return float((got - want).abs().max()) <= 0.03 * float(want.abs().max())
    if dtype == "float64":
        return torch.allclose(got, want, rtol=1e-9, atol=1e-11)
    # float32 sums in another order on another CPU (its SIMD width): each element to 1e-4 of the
    # tensor's largest, not of itself (a gradient element near 0 is a difference of large terms)
    return float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-5


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_is_unchanged(name, kernels):
    case = CASES[name]
    model = ref.build({**case["model"], "kernels": kernels}, getattr(torch, case["dtype"]))
    assert list(model.state_dict()) == list(case["state"])       # checkpoints keep loading
    model.load_state_dict(case["state"], strict=True)
    got = ref.run(model, case["inputs"])
    want = case["outputs"]
    assert sorted(got) == sorted(want)
    keys = sorted(want) if kernels == "fast" else [k for k in sorted(want) if k.startswith("eval")]
    changed = [k for k in keys if got[k].dtype != want[k].dtype or not close(k, got[k], want[k],
                                                                             case["dtype"])]
    assert not changed, f"{name}: {len(changed)} outputs differ, first {changed[:5]}"


def test_a_checkpoint_with_the_window_bias_under_its_former_name_loads():
    """Checkpoints written before the window bias became attention.PairBias name it
    `spot.rpb.table`."""
    case = CASES["hist_split_linear"]
    old = {k.replace("spot.bias.table", "spot.rpb.table"): v for k, v in case["state"].items()}
    assert any("spot.rpb.table" in k for k in old)
    model = ref.build(case["model"])
    model.load_state_dict(old, strict=True)
    for k, v in case["state"].items():
        assert torch.equal(model.state_dict()[k], v)

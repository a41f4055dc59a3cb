"""The forward of every configs/*.yaml model gives the numbers it gave when tests/forward_reference.pt was
written (tests/make_forward_reference.py): the same state_dict keys (saved checkpoints load), the same
outputs in eval and training, the same attention maps and the same gradients, bit for bit in float64."""
from pathlib import Path

import pytest
import torch

import make_forward_reference as ref

REFERENCE = Path(__file__).parent / "forward_reference.pt"
CASES = torch.load(REFERENCE, weights_only=True)


def test_every_config_has_a_reference():
    assert set(ref.configs()) == set(CASES), "configs/ changed: rerun tests/make_forward_reference.py"


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_is_unchanged(name):
    case = CASES[name]
    model = ref.build(case["model"], getattr(torch, case["dtype"]))
    assert list(model.state_dict()) == list(case["state"])       # checkpoints keep loading
    model.load_state_dict(case["state"], strict=True)
    got = ref.run(model, case["inputs"], maps=any(k.startswith("eval/attention") for k in case["outputs"]))
    want = case["outputs"]
    assert sorted(got) == sorted(want)
    changed = [k for k in sorted(want) if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not changed, f"{name}: {len(changed)} outputs differ, first {changed[:5]}"

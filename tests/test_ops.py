"""Every op and layer in tests/op_cases.py against torch's stored outputs and gradients,
and against finite differences in float64, with each kernel set."""
import pathlib

import numpy as np
import pytest

import minisft
from conftest import assert_close
from helpers import MinisftLib
from op_cases import CASES, case_inputs

FIXTURES = np.load(pathlib.Path(__file__).parent / "fixtures" / "engine_ops.npz")
IDS = [case.name for case in CASES]


def _stored_inputs(case):
    count = sum(1 for key in FIXTURES.files if key.startswith(f"{case.name}/input"))
    return [FIXTURES[f"{case.name}/input{i}"] for i in range(count)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_torch(case, device, kernel_set):
    raw = _stored_inputs(case)
    tensors = [minisft.tensor(a, requires_grad=a.dtype.kind == "f", device=device) for a in raw]
    out = case.fn(MinisftLib, *tensors)
    assert out.dtype == np.float32
    assert_close(out, FIXTURES[f"{case.name}/output"], what=f"{case.name} output")
    v = minisft.tensor(FIXTURES[f"{case.name}/cotangent"], device=device)
    (out * v).sum().backward()
    for i, t in enumerate(tensors):
        if t.requires_grad:
            assert t.grad.dtype == np.float32
            assert_close(t.grad, FIXTURES[f"{case.name}/grad{i}"], what=f"{case.name} grad{i}")


@pytest.mark.parametrize("case", [c for c in CASES if c.gradcheck],
                         ids=[c.name for c in CASES if c.gradcheck])
def test_gradcheck(case, device, kernel_set):
    raw = [minisft.tensor(a, dtype=a.dtype, device=device) for a in case_inputs(case)]
    assert minisft.gradcheck(lambda *xs: case.fn(MinisftLib, *xs), raw)


def test_fixture_covers_every_case():
    stored = {key.split("/")[0] for key in FIXTURES.files}
    assert stored == set(IDS), "rerun tests/fixtures/make_engine_fixtures.py"

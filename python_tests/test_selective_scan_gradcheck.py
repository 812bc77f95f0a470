"""torch.autograd.gradcheck (float64, finite differences vs the op's analytical backward) of every
differentiable input: u, delta, A, B, C, D, z, delta_bias, initial_state, through both out and
last_state, for variable / grouped / constant / mixed B and C, both layouts. L = 19 and L = 33 cross the
16-step checkpoint chunks of the backward."""
import pytest
import torch

from conftest import case, case_id, gradcheck_case

f64 = torch.float64


full = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True, last_state=True)
MODES = [("variable", "variable"), ("grouped", "grouped"), ("constant", "constant"), ("variable", "constant"),
         ("constant", "grouped")]


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("b_mode,c_mode", MODES)
def test_gradcheck_all_inputs(layout, b_mode, c_mode):
    c = case(batch=2, d=4, L=19, N=3, dtype=f64, layout=layout, b_mode=b_mode, c_mode=c_mode, groups=2, **full)
    gradcheck_case(c)


@pytest.mark.parametrize("c", [
    case(batch=2, d=4, L=33, N=3, dtype=f64, b_mode="grouped", c_mode="grouped", groups=2, **full),
    case(batch=1, d=6, L=33, N=2, dtype=f64, layout="cl", b_mode="grouped", c_mode="grouped", groups=3, **full),
    case(batch=2, d=3, L=33, N=4, dtype=f64, b_mode="constant", c_mode="constant", **full),
], ids=case_id)
def test_gradcheck_L33(c):
    gradcheck_case(c, seed=1)


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gradcheck_without_optionals_and_without_softplus(layout):
    """delta used as is (no bias, no softplus) and no D / z / initial_state; out only."""
    c = case(batch=2, d=4, L=19, N=3, dtype=f64, layout=layout)
    gradcheck_case(c, seed=2)


@pytest.mark.parametrize("c", [
    case(batch=2, d=4, L=19, N=3, dtype=f64, delta_bias=True, last_state=True),  # bias without softplus
    case(batch=2, d=4, L=19, N=3, dtype=f64, softplus=True, z=True, a_init="range"),  # softplus without bias
    case(batch=2, d=4, L=19, N=3, dtype=f64, initial_state=True, last_state=True, layout="cl",
         b_mode="constant", c_mode="constant"),
], ids=case_id)
def test_gradcheck_option_subsets(c):
    gradcheck_case(c, seed=3)


@pytest.mark.parametrize("names", [("u",), ("A", "C"), ("initial_state",), ("delta", "delta_bias", "z")])
def test_gradcheck_subset_requiring_grad(names):
    """Only some inputs require grad: the others are constants to autograd."""
    c = case(batch=2, d=4, L=19, N=3, dtype=f64, b_mode="grouped", c_mode="grouped", groups=2, **full)
    gradcheck_case(c, seed=4, names=names)


def test_gradcheck_last_state_only():
    """A function of last_state alone (out discarded)."""
    gradcheck_case(case(batch=2, d=4, L=19, N=3, dtype=f64, **full), seed=5, output="last")

"""Gradients of every input through selective_scan (CPU kernel, float32 and float64) vs float64 autograd
through the oracle (the package reference; scan_oracle64 for long L), including gradients that flow in
through last_state."""
import pytest
import torch

from conftest import (FWD_TOL, GRAD_TOL, assert_close64, assert_grads_close, case, case_id, check_backward,
                      make_inputs, op_grads, random_cases, random_cotangents, ref_grads, run_op, run_ref)

f64 = torch.float64
full = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)

GRAD_CASES = [
    case(batch=2, d=5, L=1, N=16, **full, last_state=True),
    case(batch=2, d=12, L=7, N=8, layout="cl", b_mode="grouped", c_mode="grouped", groups=4, D=True, z=True),
    case(batch=2, d=12, L=49, N=16, **full, last_state=True),
    case(batch=2, d=16, L=49, N=16, layout="cl", **full, last_state=True, b_mode="constant",
         c_mode="constant"),
    case(batch=1, d=12, L=49, N=256, b_mode="grouped", c_mode="constant", groups=2, D=True, last_state=True),
    case(batch=2, d=40, L=196, N=16, layout="cl", b_mode="grouped", c_mode="grouped", groups=4, **full,
         last_state=True),
    case(batch=2, d=24, L=196, N=64, b_mode="constant", c_mode="variable", delta_bias=True, a_init="range"),
    case(batch=3, d=16, L=100, N=1, b_mode="variable", c_mode="constant", z=True, initial_state=True,
         last_state=True),
    case(batch=1, d=5, L=3136, N=16, layout="cl", **full, last_state=True),
    case(batch=1, d=4, L=4097, N=16, b_mode="grouped", c_mode="grouped", groups=2, **full, last_state=True),
    case(batch=1, d=8, L=4097, N=8, layout="cl", b_mode="constant", c_mode="constant", D=True, z=True),
    # float64 kernels vs the float64 oracle: only the order of operations differs.
    case(batch=2, d=12, L=49, N=16, dtype=f64, **full, last_state=True),
    case(batch=2, d=16, L=196, N=8, dtype=f64, layout="cl", b_mode="grouped", c_mode="constant", groups=2,
         **full, last_state=True),
    case(batch=1, d=8, L=4097, N=4, dtype=f64, b_mode="constant", c_mode="grouped", groups=4, **full,
         last_state=True),
]


@pytest.mark.parametrize("c", GRAD_CASES, ids=case_id)
def test_grads_grid(c):
    check_backward(c, seed=c["L"] + c["d"])


RANDOM_GRAD_CASES = random_cases(16, seed=4321)


@pytest.mark.parametrize("i", range(len(RANDOM_GRAD_CASES)))
def test_grads_random_combinations(i):
    check_backward(RANDOM_GRAD_CASES[i], seed=100 + i)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("b_mode,c_mode", [("variable", "variable"), ("grouped", "grouped"),
                                           ("constant", "constant")])
def test_grads_through_last_state_only(layout, b_mode, c_mode):
    """With out unused, every gradient comes from last_state alone (dout = 0)."""
    c = case(batch=2, d=8, L=37, N=6, layout=layout, b_mode=b_mode, c_mode=c_mode, groups=2, **full,
             last_state=True)
    t = make_inputs(c, seed=2, requires_grad=True)
    _, dlast = random_cotangents(c, t, 2, with_dlast=True)
    dout = torch.zeros_like(t["u"])
    got = op_grads(c, t, dout, dlast)
    exp = ref_grads(c, t, dout, dlast)
    assert_grads_close(got, exp, torch.float32)
    # D and z only act on out: their gradients are exactly zero.
    assert torch.count_nonzero(got["D"]) == 0 and torch.count_nonzero(got["z"]) == 0


def test_grads_of_weights_given_in_low_precision():
    """Weights given in bf16 are cast (differentiably) to float32; their gradients come back in bf16."""
    c = case(batch=2, d=8, L=33, N=4, dtype=torch.bfloat16, D=True, delta_bias=True, softplus=True,
             initial_state=True, b_mode="constant", c_mode="variable")
    t = make_inputs(c, seed=9)
    for k in ("A", "B", "D", "delta_bias", "initial_state"):
        t[k] = t[k].to(torch.bfloat16)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    dout, _ = random_cotangents(c, t, 9, with_dlast=False)
    got = op_grads(c, t, dout)
    exp = ref_grads(c, t, dout)
    for k in got:
        assert got[k].dtype == torch.bfloat16, k
    assert_grads_close(got, exp, torch.bfloat16)


def test_grad_tolerances_beat_mamba_floor():
    assert GRAD_TOL[torch.float32]["rtol"] < 6e-4 and GRAD_TOL[torch.bfloat16]["rtol"] < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_softplus_around_its_linear_threshold(dtype):
    """softplus(v) switches to v above 20 (as torch's F.softplus): raw deltas on both sides of it, values and
    gradients vs the reference (which uses F.softplus)."""
    c = case(batch=2, d=8, L=40, N=4, dtype=dtype, softplus=True, delta_bias=True, D=True, last_state=True)
    t = make_inputs(c, seed=13)
    g = torch.Generator().manual_seed(13)
    t["delta"] = (17.0 + 6.0 * torch.rand(t["u"].shape, generator=g, dtype=f64)).to(dtype)  # 17 .. 23
    t["delta_bias"] = torch.linspace(-0.5, 0.5, 8, dtype=f64).to(t["A"].dtype)
    t["A"] = -0.05 * torch.rand(t["A"].shape, generator=g, dtype=f64).to(t["A"].dtype)  # keep decays O(1)
    out, last = run_op(c, t)
    ref_out, ref_last = run_ref(c, t)
    assert_close64(out, ref_out, **FWD_TOL[dtype], msg="out")
    assert_close64(last, ref_last, **FWD_TOL[dtype], msg="last_state")
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    dout, dlast = random_cotangents(c, t, 13, with_dlast=True)
    got = op_grads(c, t, dout, dlast)
    exp = ref_grads(c, t, dout, dlast)
    assert_grads_close(got, exp, dtype)

"""Forward of selective_scan / selective_scan_channels_last (CPU kernel) vs the float64 reference, on a
parametrised grid of explicit cases plus seeded random combinations of every option; and checks of the
oracles themselves (closed forms, grouping semantics, the fast float64 oracle vs the package reference)."""
import zlib

import pytest
import torch
import torch.nn.functional as F

import gmamba_ext
from conftest import (case, case_id, check_forward, make_inputs, oracle_call, random_cases, random_cotangents,
                      ref_call, ref_grads, run_op, run_ref, upcast)

f64 = torch.float64

# Every L in {1, 7, 49, 196, 3136, 4097}, d in {1, 3, 4, 5, 12, 16, 40, 64} (several not multiples of the
# CPU kernel's 8 lanes), N in {1, 8, 16, 64, 256}, every B/C mode (variable, grouped G=2/4, constant, and
# mixes), both layouts, and each optional input in several combinations. Long L only with few channels.
FWD_CASES = [
    # L = 1: a single step
    case(batch=2, d=5, L=1, N=16),
    case(batch=3, d=12, L=1, N=1, layout="cl", b_mode="constant", c_mode="constant", D=True, z=True),
    case(batch=1, d=40, L=1, N=8, b_mode="grouped", c_mode="grouped", groups=4, initial_state=True,
         last_state=True),
    case(batch=1, d=1, L=1, N=64, layout="cl", delta_bias=True, softplus=True, last_state=True),
    # L = 7: shorter than one 16-step chunk
    case(batch=2, d=5, L=7, N=8, D=True, delta_bias=True, softplus=True),
    case(batch=2, d=12, L=7, N=64, layout="cl", b_mode="grouped", c_mode="grouped", groups=2, z=True,
         last_state=True),
    case(batch=1, d=3, L=7, N=256, b_mode="constant", c_mode="variable", initial_state=True, last_state=True),
    # L = 49: three full chunks and one partial
    case(batch=2, d=12, L=49, N=16, D=True, z=True, delta_bias=True, softplus=True, initial_state=True,
         last_state=True),
    case(batch=2, d=40, L=49, N=16, layout="cl", b_mode="variable", c_mode="constant", D=True, softplus=True),
    case(batch=1, d=12, L=49, N=256, layout="cl", b_mode="grouped", c_mode="constant", groups=4,
         last_state=True),
    case(batch=2, d=16, L=49, N=1, b_mode="grouped", c_mode="grouped", groups=2, a_init="range", z=True),
    case(batch=1, d=5, L=49, N=256, b_mode="constant", c_mode="grouped", groups=5, delta_bias=True,
         initial_state=True),
    # L = 196 (14 x 14 tokens)
    case(batch=2, d=40, L=196, N=16, layout="cl", b_mode="grouped", c_mode="grouped", groups=4, D=True, z=True,
         delta_bias=True, softplus=True, last_state=True),
    case(batch=2, d=5, L=196, N=64, b_mode="constant", c_mode="constant", delta_bias=True, initial_state=True,
         last_state=True),
    case(batch=1, d=64, L=196, N=8, D=True, a_init="range"),
    case(batch=2, d=12, L=196, N=16, layout="cl", b_mode="variable", c_mode="constant", z=True,
         initial_state=True, softplus=True),
    # L = 3136 (56 x 56 tokens) with few channels
    case(batch=1, d=5, L=3136, N=16, layout="cl", D=True, z=True, delta_bias=True, softplus=True,
         last_state=True),
    case(batch=2, d=4, L=3136, N=8, b_mode="grouped", c_mode="grouped", groups=2, initial_state=True,
         last_state=True),
    # L = 4097: 256 chunks and one step
    case(batch=1, d=4, L=4097, N=16, D=True, z=True, softplus=True, delta_bias=True, initial_state=True,
         last_state=True),
    case(batch=1, d=3, L=4097, N=1, layout="cl", b_mode="constant", c_mode="variable", last_state=True,
         a_init="range"),
    # float64 kernels: the same code paths, compared tightly
    case(batch=2, d=12, L=49, N=16, dtype=f64, D=True, z=True, delta_bias=True, softplus=True,
         initial_state=True, last_state=True),
    case(batch=1, d=5, L=4097, N=8, dtype=f64, layout="cl", b_mode="grouped", c_mode="grouped", groups=5,
         last_state=True),
    case(batch=2, d=40, L=196, N=64, dtype=f64, layout="cl", b_mode="constant", c_mode="constant", D=True,
         z=True),
    case(batch=1, d=4, L=7, N=256, dtype=f64, b_mode="variable", c_mode="constant", delta_bias=True,
         initial_state=True, last_state=True),
]


@pytest.mark.parametrize("c", FWD_CASES, ids=case_id)
def test_forward_grid(c):
    check_forward(c, seed=zlib.crc32(case_id(c).encode()) % 1000)


RANDOM_CASES = random_cases(30, seed=1234) + random_cases(6, seed=99, dtypes=(f64,))


@pytest.mark.parametrize("i", range(len(RANDOM_CASES)))
def test_forward_random_combinations(i):
    c = RANDOM_CASES[i]
    check_forward(c, seed=i)


def test_random_combinations_cover_every_option():
    """The seeded sample above exercises each option both ways (guards against an unlucky seed)."""
    cs = RANDOM_CASES
    for key in ("D", "z", "delta_bias", "softplus", "initial_state", "last_state"):
        assert {c[key] for c in cs} == {True, False}, key
    assert {c["layout"] for c in cs} == {"cf", "cl"}
    assert {c["b_mode"] for c in cs} == {"variable", "grouped", "constant"}
    assert {c["c_mode"] for c in cs} == {"variable", "grouped", "constant"}
    assert any(c["b_mode"] != c["c_mode"] for c in cs)
    assert any(c["d"] % 8 for c in cs) and any(c["L"] > 16 and c["L"] % 16 for c in cs)


# ---------------------------------------------------------------------------------------------------------
# The oracles themselves.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_single_step_closed_form(layout):
    """L = 1: out = (sum_n C_n (exp(dt A_n) h0_n + dt B_n u) + D u) * silu(z), last_state = the state,
    with dt = softplus(delta + bias); computed here without any scan."""
    c = case(batch=2, d=6, L=1, N=5, dtype=f64, layout=layout, D=True, z=True, delta_bias=True, softplus=True,
             initial_state=True, last_state=True)
    t = make_inputs(c, seed=7)
    out, last = run_op(c, t)
    # the single step: (b, d) for u/delta/z/out, (b, N) for B/C
    sq = (lambda x: x[:, :, 0]) if layout == "cf" else (lambda x: x[:, 0, :])
    u, delta, z = sq(t["u"]), sq(t["delta"]), sq(t["z"])
    Bv, Cv = sq(t["B"]), sq(t["C"])
    dt = F.softplus(delta + t["delta_bias"])
    h = torch.exp(dt[..., None] * t["A"]) * t["initial_state"] + dt[..., None] * Bv[:, None, :] * u[..., None]
    y = ((h * Cv[:, None, :]).sum(-1) + t["D"] * u) * F.silu(z)
    torch.testing.assert_close(sq(out), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_grouped_equals_per_group_variable_calls(layout):
    """Grouped B/C (G groups) means channel c uses group c // (d / G): the same as running each group's
    channel slice on its own with that group's variable B/C."""
    G, d = 4, 12
    c = case(batch=2, d=d, L=37, N=8, layout=layout, b_mode="grouped", c_mode="grouped", groups=G, D=True,
             z=True, delta_bias=True, softplus=True, initial_state=True, last_state=True)
    t = make_inputs(c, seed=3)
    out, last = run_op(c, t)
    h = d // G
    ch = (lambda x, s: x[:, s]) if layout == "cf" else (lambda x, s: x[:, :, s])
    grp = (lambda x, g: x[:, g]) if layout == "cf" else (lambda x, g: x[:, :, g])
    fn = gmamba_ext.selective_scan if layout == "cf" else gmamba_ext.selective_scan_channels_last
    for g in range(G):
        s = slice(g * h, (g + 1) * h)
        o, l_ = fn(ch(t["u"], s), ch(t["delta"], s), t["A"][s], grp(t["B"], g), grp(t["C"], g), D=t["D"][s],
                   z=ch(t["z"], s), delta_bias=t["delta_bias"][s], delta_softplus=True, return_last_state=True,
                   initial_state=t["initial_state"][:, s])
        torch.testing.assert_close(ch(out, s), o, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(last[:, s], l_, rtol=1e-6, atol=1e-6)


def test_constant_bc_equals_grouped_with_one_group_per_channel():
    """Constant (d, N) B/C are per-channel, time-invariant: the same as grouped with G = d and the values
    repeated over batch and time."""
    c = case(batch=2, d=6, L=21, N=4, dtype=f64, b_mode="constant", c_mode="constant", D=True, z=True,
             initial_state=True, last_state=True)
    t = make_inputs(c, seed=5)
    out, last = run_op(c, t)
    b, L = c["batch"], c["L"]
    Bg = t["B"][None, :, :, None].expand(b, -1, -1, L).contiguous()
    Cg = t["C"][None, :, :, None].expand(b, -1, -1, L).contiguous()
    out2, last2 = gmamba_ext.selective_scan(t["u"], t["delta"], t["A"], Bg, Cg, D=t["D"], z=t["z"],
                                            return_last_state=True, initial_state=t["initial_state"])
    torch.testing.assert_close(out, out2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last2, rtol=1e-12, atol=1e-12)


def test_reference_runs_in_float64_on_upcast_inputs():
    """The oracle used for low precision really is float64 on the rounded values."""
    c = case(dtype=torch.bfloat16, D=True, last_state=True)
    t = make_inputs(c)
    out, last = run_ref(c, t)
    assert out.dtype == f64 and last.dtype == f64


@pytest.mark.parametrize("c", [
    case(batch=2, d=6, L=33, N=5, dtype=f64, layout=layout, b_mode=bm, c_mode=cm, groups=3, D=True, z=True,
         delta_bias=True, softplus=True, initial_state=True, last_state=True)
    for layout in ("cf", "cl")
    for bm, cm in (("variable", "constant"), ("grouped", "grouped"), ("constant", "constant"))
], ids=case_id)
def test_fast_oracle_matches_package_reference(c):
    """scan_oracle64 (the gradient oracle for long L, see conftest) agrees with the package reference in
    values and gradients."""
    t = make_inputs(c, seed=11, requires_grad=True)
    dout, dlast = random_cotangents(c, t, 11, with_dlast=True)
    slow = ref_grads(c, t, dout, dlast, oracle="ref")
    fast = ref_grads(c, t, dout, dlast, oracle="fast")
    for k in slow:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-12, atol=1e-12, msg=k)
    with torch.no_grad():
        t64 = upcast(t)
        for a, b in zip(oracle_call(c, t64), ref_call(c, t64)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

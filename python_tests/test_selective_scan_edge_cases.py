"""Edge cases of selective_scan on the CPU: empty tensors (batch 0, L 0, d 0), non-contiguous inputs,
NaN propagation, decays at float32's exponent bounds, resuming from last_state, and channel packs with
fewer real channels than lanes."""
import pytest
import torch

import gmamba_ext
from conftest import (DIFF_NAMES, api, assert_close64, assert_grads_close, case, make_inputs, op_grads,
                      random_cotangents, ref_grads, run_op, run_ref)

full = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True, last_state=True)


# ---------------------------------------------------------------------------------------------------------
# Empty tensors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("batch,d,L", [(0, 4, 10), (2, 4, 0), (0, 4, 0), (2, 0, 10)],
                         ids=["batch0", "L0", "batch0_L0", "d0"])
@pytest.mark.parametrize("with_init", [True, False], ids=["init", "no_init"])
def test_empty_inputs(layout, batch, d, L, with_init):
    N = 3
    c = case(batch=batch, d=d, L=L, N=N, layout=layout, b_mode="variable", c_mode="constant", D=True, z=True,
             initial_state=with_init, last_state=True)
    t = make_inputs(c, requires_grad=True)
    out, last = run_op(c, t)
    assert out.shape == t["u"].shape and out.dtype == t["u"].dtype
    assert last.shape == (batch, d, N) and last.dtype == torch.float32
    if with_init:
        assert torch.equal(last, t["initial_state"])  # nothing to scan: the state is unchanged
        assert last.data_ptr() != t["initial_state"].data_ptr() or last.numel() == 0  # a copy, not an alias
    else:
        assert torch.count_nonzero(last) == 0
    dlast = torch.randn_like(last)
    (out.sum() + (last * dlast).sum()).backward()
    for k in DIFF_NAMES:
        if t[k] is not None:
            assert t[k].grad is not None and t[k].grad.shape == t[k].shape, k
    if with_init:  # d last_state / d initial_state is the identity when L = 0
        expected = dlast if L == 0 else torch.zeros_like(dlast)
        torch.testing.assert_close(t["initial_state"].grad, expected)
    for k in ("A", "C", "D"):
        assert torch.count_nonzero(t[k].grad) == 0, k


def test_empty_raw_op_shapes():
    u = torch.randn(2, 4, 0)
    out, last, ckpt = torch.ops.gmamba_ext.selective_scan_fwd(u, u, -torch.rand(4, 3), torch.randn(2, 3, 0),
                                                              torch.randn(2, 3, 0), None, None, None, None,
                                                              False, False)
    assert out.shape == (2, 4, 0) and last.shape == (2, 4, 3) and ckpt.shape == (2, 0, 3, 4)


# ---------------------------------------------------------------------------------------------------------
# Non-contiguous inputs: accepted, same result (bitwise: the wrapper makes contiguous copies of the
# same values) and the same gradients as contiguous ones.
# ---------------------------------------------------------------------------------------------------------
def non_contiguous(t):
    """The same values in a non-contiguous view: a transposed copy transposed back, or a strided slice."""
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    if t.dim() == 2:
        return t.t().contiguous().t()
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("b_mode,c_mode", [("variable", "variable"), ("grouped", "grouped"),
                                           ("constant", "constant")])
def test_non_contiguous_inputs(layout, b_mode, c_mode):
    c = case(batch=2, d=16, L=37, N=6, layout=layout, b_mode=b_mode, c_mode=c_mode, groups=2, **full)
    t = make_inputs(c, seed=4, requires_grad=True)
    t_nc = {k: None if v is None else non_contiguous(v.detach()).requires_grad_(True) for k, v in t.items()}
    assert all(v is None or not v.is_contiguous() for v in t_nc.values())
    for k, v in t.items():
        if v is not None:
            assert torch.equal(v, t_nc[k])
    out, last = run_op(c, t)
    out_nc, last_nc = run_op(c, t_nc)
    assert torch.equal(out, out_nc) and torch.equal(last, last_nc)
    dout, dlast = random_cotangents(c, t, 4, with_dlast=True)
    g = op_grads(c, t, dout, dlast)
    g_nc = op_grads(c, t_nc, non_contiguous(dout), dlast)
    for k in g:
        assert g_nc[k].shape == t_nc[k].shape
        assert torch.equal(g[k], g_nc[k]), k


def test_channels_first_op_on_transposed_channels_last_tensors():
    """The usual way to call the channels-first op from (B, L, d) activations: transposed views."""
    c = case(batch=2, d=12, L=50, N=8, layout="cl", **full)
    t = make_inputs(c, seed=6)
    out_cl, last_cl = run_op(c, t)
    tr = lambda x: None if x is None else x.transpose(1, 2)  # noqa: E731
    out_cf, last_cf = gmamba_ext.selective_scan(tr(t["u"]), tr(t["delta"]), t["A"], tr(t["B"]), tr(t["C"]),
                                                D=t["D"], z=tr(t["z"]), delta_bias=t["delta_bias"],
                                                delta_softplus=True, return_last_state=True,
                                                initial_state=t["initial_state"])
    assert out_cf.shape == (2, 12, 50)
    torch.testing.assert_close(out_cf.transpose(1, 2), out_cl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last_cf, last_cl, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# NaN propagation (documented: NaN in, NaN out; no crash, no clamping)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nan_in_u_propagates(layout, dtype):
    c = case(batch=2, d=12, L=40, N=4, dtype=dtype, layout=layout, D=True, last_state=True)
    t = make_inputs(c, seed=8)
    clean, clean_last = run_op(c, t)
    b0, c0, t0 = 1, 5, 21
    u = t["u"].clone()
    if layout == "cf":
        u[b0, c0, t0] = float("nan")
    else:
        u[b0, t0, c0] = float("nan")
    out, last = run_op(c, dict(t, u=u))
    ch = (lambda x: x[b0, c0]) if layout == "cf" else (lambda x: x[b0, :, c0])  # (L,) of that channel
    assert torch.isnan(ch(out)[t0:]).all(), "NaN must reach every later step of its channel"
    assert torch.isnan(last[b0, c0]).all()
    # Earlier steps of that channel, and every other channel, are unaffected.
    assert torch.equal(ch(out)[:t0], ch(clean)[:t0])
    mask = torch.ones_like(out, dtype=torch.bool)
    if layout == "cf":
        mask[b0, c0] = False
    else:
        mask[b0, :, c0] = False
    assert torch.equal(out[mask], clean[mask])
    assert torch.isfinite(out[mask]).all()


# ---------------------------------------------------------------------------------------------------------
# Decays at float32's exponent bounds: some chunks and lanes underflow (dt A down to -180, where the CPU
# kernel's 2^x must give 0; its exponent-bit construction gives garbage there unless bounded), others do
# not, and without softplus dt takes both signs.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("softplus", [True, False])
def test_decays_at_exponent_bounds(layout, softplus):
    c = case(batch=2, d=16, L=200, N=4, layout=layout, D=True, z=True, delta_bias=True, softplus=softplus,
             initial_state=True, last_state=True)
    t = make_inputs(c, seed=11)
    g = torch.Generator().manual_seed(12)
    delta = 2 * torch.rand(2, 16, 200, generator=g) - 1  # channels-first here, (B, d, L)
    delta[:, :8, 70:76] = 60.0  # the first lane pack, steps 70-75 of chunk 4: dt A down to -180, decays of 0
    delta[1, 3, 140] = 45.0  # one lane of one chunk
    delta[:, 8:, 150:160] = 20.0  # the second pack: dt A down to -60, decays of 1e-26, still in range
    t["delta"] = delta if layout == "cf" else delta.transpose(1, 2).contiguous()
    t["A"] = -(0.5 + torch.rand(16, 4, generator=g)) * 2
    t = {k: None if v is None else v.requires_grad_(True) for k, v in t.items()}

    out, last = run_op(c, t)
    out64, last64 = run_ref(c, t)
    scale = out64.abs().max().item()
    assert_close64(out, out64, rtol=1e-4, atol=1e-5 * scale, msg="out")
    assert_close64(last, last64, rtol=1e-4, atol=1e-5 * last64.abs().max().item(), msg="last_state")
    dout, dlast = random_cotangents(c, t, 13, with_dlast=True)
    assert_grads_close(op_grads(c, t, dout, dlast), ref_grads(c, t, dout, dlast), c["dtype"])


# ---------------------------------------------------------------------------------------------------------
# Semantics that the chunked kernel must preserve
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("split", [1, 16, 23])
def test_resuming_from_last_state_equals_one_call(layout, split):
    """Scanning [0, s) then [s, L) from the first call's last_state equals scanning [0, L) at once."""
    c = case(batch=2, d=12, L=50, N=8, dtype=torch.float64, layout=layout, b_mode="grouped", c_mode="grouped",
             groups=2, **full)
    t = make_inputs(c, seed=10)
    out, last = run_op(c, t)
    sl = (lambda x, s: x[..., s]) if layout == "cf" else (lambda x, s: x[:, s])
    fn = api(c)

    def part(s, h0):
        return fn(sl(t["u"], s), sl(t["delta"], s), t["A"], sl(t["B"], s), sl(t["C"], s), D=t["D"],
                  z=sl(t["z"], s), delta_bias=t["delta_bias"], delta_softplus=True, return_last_state=True,
                  initial_state=h0)

    o1, l1 = part(slice(0, split), t["initial_state"])
    o2, l2 = part(slice(split, None), l1)
    dim = -1 if layout == "cf" else 1
    torch.testing.assert_close(torch.cat([o1, o2], dim), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l2, last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [5, 13])
@pytest.mark.parametrize("b_mode,c_mode", [("variable", "constant"), ("constant", "variable"),
                                           ("grouped", "constant")])
def test_partial_channel_pack_with_constant_bc_ignores_memory_past_d(d, b_mode, c_mode):
    """Regression: with d not a multiple of the CPU kernel's 8-channel packs, the unused lanes of the last
    pack must not read constant B/C rows past d (out of bounds) nor mix them into the variable dB/dC sums.
    Rows past d are made NaN here (a contiguous slice of a larger tensor), which any such read exposes."""
    groups = d if b_mode == "grouped" else 1
    c = case(batch=2, d=d, L=21, N=4, b_mode=b_mode, c_mode=c_mode, groups=groups, D=True, last_state=True)
    t = make_inputs(c, seed=12)
    for k in ("B", "C"):
        if t[k].dim() == 2:
            big = torch.full((d + 8, c["N"]), float("nan"))
            big[:d] = t[k]
            t[k] = big[:d]
            assert t[k].is_contiguous()
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    dout, dlast = random_cotangents(c, t, 12, with_dlast=True)
    got = op_grads(c, t, dout, dlast)
    for k, g in got.items():
        assert torch.isfinite(g).all(), f"non-finite gradient of {k}"
    exp = ref_grads(c, t, dout, dlast)
    for k in got:
        torch.testing.assert_close(got[k].double(), exp[k], rtol=1e-4, atol=1e-4, msg=k)


def check_grads_with_uninitialised_memory_as_nan(layout, b_mode, c_mode, groups, device, N=5):
    """Gradients with torch's deterministic mode filling uninitialised memory with NaN: a partial or
    gradient element the kernels skipped comes back as a NaN gradient (d = 21: a short last pack or warp;
    L = 37: a short last chunk)."""
    d, L, batch = 21, 37, 2
    c = case(batch=batch, d=d, L=L, N=N, layout=layout, b_mode=b_mode, c_mode=c_mode, groups=groups, D=True,
             z=True, delta_bias=True, softplus=True, initial_state=True, last_state=True)
    t = make_inputs(c, seed=21, device=device, requires_grad=True)
    dout, dlast = random_cotangents(c, t, 21, with_dlast=True)
    saved = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(3, device=device)).all()  # the mechanism this test relies on
        got = op_grads(c, t, dout, dlast)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.utils.deterministic.fill_uninitialized_memory = saved[1]
    for k, g in got.items():
        assert torch.isfinite(g).all(), f"non-finite gradient of {k}"
    exp = ref_grads(c, t, dout, dlast)
    for k in got:
        torch.testing.assert_close(got[k].double().cpu(), exp[k], rtol=1e-4, atol=1e-4, msg=k)


BC_MODES = [("variable", "variable", 1), ("grouped", "grouped", 3), ("constant", "constant", 1),
            ("variable", "constant", 1)]


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("b_mode,c_mode,groups", BC_MODES)
def test_backward_partials_need_no_zero_fill(layout, b_mode, c_mode, groups):
    """The CPU backward allocates its partial buffers (dA, dB, dC, dD, delta_bias per chunk or pack) without
    zero-filling them, because it writes every element."""
    check_grads_with_uninitialised_memory_as_nan(layout, b_mode, c_mode, groups, "cpu")

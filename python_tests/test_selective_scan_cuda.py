"""CUDA tests of selective_scan: collected always, skipped without a GPU (and, except for the build check,
without compiled CUDA kernels: on such a build the wrapper falls back to the reference, nothing to test).

Oracles: the float64 reference on the CPU (upcast inputs) for small/medium shapes; for the large shapes
the CPU kernel in float64, which the rest of the suite verifies against the reference (forward grid up to
L = 4097, float64 gradients vs the reference and gradcheck), so it is a trustworthy and much faster oracle.
"""
import pytest
import torch

import gmamba_ext
from gmamba_ext._graph_capture import capture_cuda_graph
from conftest import (DIFF_NAMES, FWD_TOL, GRAD_TOL, LOWP, api, assert_close64, assert_grads_close,
                      case, case_id, check_backward, check_forward, gradcheck_case,
                      make_inputs, op_grads, random_cases, random_cotangents, raw_fwd_args, run_op)
from test_selective_scan_edge_cases import BC_MODES, check_grads_with_uninitialised_memory_as_nan

DEVICE = "cuda"
CUDA_AVAILABLE = torch.cuda.is_available()
HAS_CUDA_KERNEL = gmamba_ext.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "gmamba_ext::selective_scan_fwd", "CUDA")

pytestmark = pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")
needs_kernel = pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="gmamba_ext was built without its CUDA kernels")

# The CUDA kernels use the hardware exp approximation (__expf, a few ulp) for float32 decay factors, as
# mamba-ssm does: float32 gets 2x the CPU kernel's tolerance (still 3x/10x under mamba-ssm's 6e-4/2e-3);
# bf16/fp16 are dominated by the final rounding, float64 uses exact exp.
CUDA_FWD_TOL = dict(FWD_TOL)
CUDA_FWD_TOL[torch.float32] = dict(rtol=2e-4, atol=2e-4)
CUDA_GRAD_TOL = dict(GRAD_TOL)
CUDA_GRAD_TOL[torch.float32] = dict(rtol=2e-4, atol_rel=2e-5, norm_rel=2e-5)

full = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True, last_state=True)


def test_build_has_cuda_kernels_when_advertised():
    """A build that says it compiled the CUDA backend must have registered it."""
    from gmamba_ext import _build_info

    if "cuda" in getattr(_build_info, "BACKENDS", ()):
        assert HAS_CUDA_KERNEL
    else:
        pytest.skip(f"gmamba_ext built for {_build_info.BACKENDS} only")


# ---------------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------------
SHAPES = [
    dict(batch=2, d=5, L=1, N=16),
    dict(batch=2, d=12, L=7, N=64, layout="cl", b_mode="grouped", c_mode="grouped", groups=4),
    dict(batch=2, d=40, L=49, N=16, b_mode="variable", c_mode="constant"),
    dict(batch=1, d=12, L=49, N=256, layout="cl", b_mode="constant", c_mode="constant"),
    dict(batch=2, d=40, L=196, N=16, layout="cl", b_mode="grouped", c_mode="grouped", groups=2),
    dict(batch=2, d=64, L=196, N=8, b_mode="constant", c_mode="grouped", groups=4),
    dict(batch=1, d=5, L=3136, N=16),
    dict(batch=1, d=4, L=4097, N=8, layout="cl", b_mode="grouped", c_mode="grouped", groups=2),
]
CUDA_FWD_CASES = [case(dtype=dt, **s, **(full if i % 2 == 0 else dict(D=True, z=True)))
                  for dt in (torch.float32, *LOWP, torch.float64) for i, s in enumerate(SHAPES)]


@needs_kernel
@pytest.mark.parametrize("c", CUDA_FWD_CASES, ids=case_id)
def test_cuda_forward_vs_reference(c):
    check_forward(c, seed=c["L"], device=DEVICE, tol=CUDA_FWD_TOL[c["dtype"]])


RANDOM_CUDA = random_cases(20, seed=2024, dtypes=(torch.float32, torch.bfloat16, torch.float16))


@needs_kernel
@pytest.mark.parametrize("i", range(len(RANDOM_CUDA)))
def test_cuda_forward_random_combinations(i):
    c = RANDOM_CUDA[i]
    check_forward(c, seed=i, device=DEVICE, tol=CUDA_FWD_TOL[c["dtype"]])


CUDA_GRAD_CASES = [
    case(batch=2, d=12, L=49, N=16, **full),
    case(batch=2, d=40, L=196, N=16, layout="cl", b_mode="grouped", c_mode="grouped", groups=4, **full),
    case(batch=2, d=5, L=33, N=64, b_mode="variable", c_mode="constant", D=True, z=True, last_state=True),
    case(batch=1, d=4, L=4097, N=16, b_mode="constant", c_mode="constant", **full),
    case(batch=2, d=16, L=100, N=8, dtype=torch.bfloat16, layout="cl", **full),
    case(batch=2, d=16, L=100, N=8, dtype=torch.float16, b_mode="grouped", c_mode="constant", groups=2, **full),
    case(batch=2, d=12, L=49, N=16, dtype=torch.float64, layout="cl", **full),
]


@needs_kernel
@pytest.mark.parametrize("c", CUDA_GRAD_CASES, ids=case_id)
def test_cuda_grads_vs_reference(c):
    check_backward(c, seed=c["L"], device=DEVICE, tol=CUDA_GRAD_TOL[c["dtype"]])


# The two gradient kernels of the CUDA backward where both apply (variable or grouped B and C, d_state <= 8;
# channels-last up to 16): csrc/cuda/scan_lane_backward.cuh (the default at d_state <= 8) and
# bwd_chunk_grads, forced per call with GMAMBA_CUDA_SCAN_BWD=lane|chunk. Both layouts, padding lanes (d per
# group not a multiple of 32), d_state below 8, between 8 and 16 (lane_backward<16>, walked in two 8-step
# segments), partial last chunks, low precision and float64. Channels-first d_state 16 and float64 d_state
# 16 are cases where "lane" falls back to bwd_chunk_grads.
LANE_BWD_CASES = [
    case(batch=2, d=40, L=196, N=8, layout="cl", b_mode="grouped", c_mode="grouped", groups=2, **full),
    case(batch=2, d=40, L=196, N=8, b_mode="grouped", c_mode="grouped", groups=2, **full),
    case(batch=2, d=64, L=100, N=5, layout="cl", **full),
    case(batch=2, d=64, L=100, N=5, **full),
    case(batch=1, d=33, L=4097, N=8, layout="cl", D=True, z=True, last_state=True),
    case(batch=1, d=33, L=4097, N=8, D=True, z=True, last_state=True),
    case(batch=2, d=16, L=100, N=8, dtype=torch.bfloat16, layout="cl", **full),
    case(batch=2, d=16, L=100, N=8, dtype=torch.float16, **full),
    case(batch=2, d=12, L=49, N=4, dtype=torch.float64, layout="cl", **full),
    case(batch=2, d=12, L=49, N=4, dtype=torch.float64, **full),
    case(batch=2, d=40, L=196, N=16, layout="cl", b_mode="grouped", c_mode="grouped", groups=2, **full),
    case(batch=2, d=64, L=100, N=12, layout="cl", **full),
    case(batch=1, d=33, L=4097, N=16, layout="cl", D=True, z=True, last_state=True),
    case(batch=2, d=16, L=100, N=16, dtype=torch.bfloat16, layout="cl", **full),
    case(batch=2, d=16, L=100, N=9, dtype=torch.float16, layout="cl", **full),
    case(batch=2, d=16, L=49, N=16, **full),
    case(batch=2, d=12, L=49, N=16, dtype=torch.float64, layout="cl", **full),
    # Channels-first d_state 9..16: lane_backward<16> with B / C rows staged in shared memory.
    case(batch=2, d=40, L=196, N=16, b_mode="grouped", c_mode="grouped", groups=2, **full),
    case(batch=2, d=64, L=102, N=12, **full),
    case(batch=1, d=33, L=4097, N=16, D=True, z=True, last_state=True),
    case(batch=2, d=16, L=100, N=16, dtype=torch.bfloat16, **full),
    case(batch=2, d=16, L=101, N=9, dtype=torch.float16, **full),
    case(batch=2, d=12, L=49, N=16, dtype=torch.float64, **full),
]


@needs_kernel
@pytest.mark.parametrize("kernel", ["lane", "chunk", "lane_l1"])
@pytest.mark.parametrize("c", LANE_BWD_CASES, ids=case_id)
def test_cuda_backward_kernels(c, kernel, monkeypatch):
    if kernel == "lane_l1" and c["layout"] == "cl":
        pytest.skip("lane_l1 differs from lane only channels-first (its shared-memory carveout)")
    monkeypatch.setenv("GMAMBA_CUDA_SCAN_BWD", kernel)
    check_backward(c, seed=c["L"], device=DEVICE, tol=CUDA_GRAD_TOL[c["dtype"]])
    # Bitwise reproducible run to run.
    t = make_inputs(c, seed=11, device=DEVICE, requires_grad=True)
    dout, dlast = random_cotangents(c, t, 11, with_dlast=c["last_state"])
    first, second = op_grads(c, t, dout, dlast), op_grads(c, t, dout, dlast)
    for k in first:
        assert torch.equal(first[k], second[k]), k


@needs_kernel
def test_cuda_backward_kernel_choice_is_checked(monkeypatch):
    c = LANE_BWD_CASES[2]
    t = make_inputs(c, seed=0, device=DEVICE, requires_grad=True)
    dout, dlast = random_cotangents(c, t, 0, with_dlast=c["last_state"])
    monkeypatch.setenv("GMAMBA_CUDA_SCAN_BWD", "channels")
    with pytest.raises(ValueError, match="GMAMBA_CUDA_SCAN_BWD"):
        op_grads(c, t, dout, dlast)


@needs_kernel
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("b_mode,c_mode", [("variable", "variable"), ("grouped", "grouped"),
                                           ("constant", "variable")])
def test_cuda_gradcheck_float64(layout, b_mode, c_mode):
    c = case(batch=2, d=4, L=19, N=3, dtype=torch.float64, layout=layout, b_mode=b_mode, c_mode=c_mode,
             groups=2, **full)
    gradcheck_case(c, seed=0, device=DEVICE)


# ---------------------------------------------------------------------------------------------------------
# Against the CPU kernel (same inputs), and large shapes vs the float64 CPU kernel
# ---------------------------------------------------------------------------------------------------------
def to_device(t, device, dtype=None, requires_grad=False):
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
            continue
        v = v.detach().to(device)
        if dtype is not None:
            v = v.to(dtype)
        out[k] = v.requires_grad_(requires_grad)
    return out


@needs_kernel
@pytest.mark.parametrize("c", [CUDA_FWD_CASES[i] for i in (0, 1, 2, 4, 9, 12, 17, 20)], ids=case_id)
def test_cuda_matches_cpu_kernel(c):
    """Same rounded inputs on both devices: outputs agree within the dtype's tolerance."""
    t_cpu = make_inputs(c, seed=3)
    t_gpu = to_device(t_cpu, DEVICE)
    out_c, last_c = run_op(c, t_cpu)
    out_g, last_g = run_op(c, t_gpu)
    assert out_g.device.type == "cuda" and out_g.dtype == out_c.dtype
    tol = CUDA_FWD_TOL[c["dtype"]]
    # Two roundings of the output (one per device) in low precision: allow twice the tolerance.
    tol = {k: 2 * v for k, v in tol.items()} if c["dtype"] in LOWP else tol
    assert_close64(out_g, out_c.double(), **tol, msg="out")
    if c["last_state"]:
        assert_close64(last_g, last_c.double(), **CUDA_FWD_TOL[torch.float32], msg="last_state")


LARGE_CASES = [
    # B=2, d=96, L=3136 (56 x 56 tokens), N=16: the GMamba stage-1 shape
    case(batch=2, d=96, L=3136, N=16, layout="cl", **full),
    case(batch=2, d=96, L=3136, N=16, b_mode="grouped", c_mode="grouped", groups=4, **full),
    # L = 16384: 1024 chunks
    case(batch=1, d=16, L=16384, N=16, **full),
    case(batch=1, d=16, L=16384, N=16, layout="cl", b_mode="constant", c_mode="constant", D=True, z=True,
         last_state=True),
    # Enough (batch, channel) rows for the forward's single pass, without segments, on a 132-SM card:
    # channels-first from 16 warps per SM (2112 rows), channels-last from 640 threads per SM (84480 rows).
    case(batch=2, d=1100, L=300, N=16, **full),
    case(batch=4, d=21120, L=20, N=8, layout="cl", **full),
]


@needs_kernel
@pytest.mark.parametrize("c", LARGE_CASES, ids=case_id)
def test_cuda_large_shapes_vs_cpu_float64_kernel(c):
    t = make_inputs(c, seed=5)
    t_gpu = to_device(t, DEVICE, requires_grad=True)
    t_64 = to_device(t, "cpu", dtype=torch.float64, requires_grad=True)
    c64 = dict(c, dtype=torch.float64)
    out_g, last_g = run_op(c, t_gpu)
    out_64, last_64 = run_op(c64, t_64)
    assert_close64(out_g, out_64, **CUDA_FWD_TOL[torch.float32], msg="out")
    assert_close64(last_g, last_64, **CUDA_FWD_TOL[torch.float32], msg="last_state")
    dout, dlast = random_cotangents(c, t_gpu, 5, with_dlast=c["last_state"])
    g_gpu = op_grads(c, t_gpu, dout, dlast)
    g_64 = op_grads(c64, t_64, dout.double().cpu(), None if dlast is None else dlast.double().cpu())
    assert_grads_close(g_gpu, g_64, torch.float32, tol=CUDA_GRAD_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------------
# Determinism, opcheck, torch.compile, devices, empty inputs
# ---------------------------------------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("c", [
    case(batch=2, d=96, L=1000, N=16, layout="cl", b_mode="grouped", c_mode="grouped", groups=4, **full),
    case(batch=2, d=64, L=777, N=16, b_mode="constant", c_mode="constant", **full),
    case(batch=2, d=64, L=300, N=16, dtype=torch.bfloat16, **full),
], ids=case_id)
def test_cuda_forward_backward_bitwise_reproducible(c):
    def once():
        t = make_inputs(c, seed=7, device=DEVICE, requires_grad=True)
        out, last = run_op(c, t)
        dout, dlast = random_cotangents(c, t, 7, with_dlast=True)
        names = [k for k in DIFF_NAMES if t[k] is not None]
        grads = torch.autograd.grad((out, last), [t[k] for k in names], (dout, dlast))
        return [out, last, *grads]

    first = once()
    for _ in range(3):
        for a, b in zip(first, once()):
            assert torch.equal(a, b)


OPCHECK_CASES = [
    case(batch=2, d=4, L=19, N=3, D=True, z=True, delta_bias=True, softplus=True, initial_state=True),
    case(batch=2, d=12, L=33, N=8, layout="cl", b_mode="grouped", c_mode="grouped", groups=4, D=True),
    case(batch=2, d=8, L=40, N=4, dtype=torch.bfloat16, b_mode="constant", c_mode="constant", z=True),
]


@needs_kernel
@pytest.mark.parametrize("c", OPCHECK_CASES, ids=case_id)
def test_cuda_opcheck(c):
    t = make_inputs(c, seed=1, device=DEVICE)
    args = raw_fwd_args(c, t, requires_grad=True)
    torch.library.opcheck(torch.ops.gmamba_ext.selective_scan_fwd, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, last, checkpoints = torch.ops.gmamba_ext.selective_scan_fwd(*plain)
    for dlast in (None, torch.randn_like(last)):
        torch.library.opcheck(torch.ops.gmamba_ext.selective_scan_bwd,
                              (torch.randn_like(out), dlast, checkpoints, *plain))


@needs_kernel
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_cuda_compile_fullgraph_matches_eager(layout, backend):
    torch._dynamo.reset()
    c = case(batch=2, d=16, L=40, N=8, layout=layout, b_mode="grouped", c_mode="grouped", groups=2, **full)
    op = api(c)

    def fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = op(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                       return_last_state=True, initial_state=initial_state)
        return torch.tanh(out), last * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (compiled, fn):
        t = make_inputs(c, seed=2, device=DEVICE, requires_grad=True)
        out, last = f(**t)
        dout, dlast = random_cotangents(c, t, 2, with_dlast=True)
        names = [k for k in DIFF_NAMES if t[k] is not None]
        results.append([out, last, *torch.autograd.grad((out, last), [t[k] for k in names], (dout, dlast))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


MIXED = ["delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@needs_kernel
@pytest.mark.parametrize("name", MIXED)
@pytest.mark.parametrize("u_on", ["cuda", "cpu"])
def test_mixed_devices_raise_naming_the_argument(name, u_on):
    """One argument on the other device than u: a clear error naming it (no silent copy, no crash)."""
    c = case(batch=2, d=8, L=20, N=4, b_mode="variable", c_mode="constant", D=True, z=True, delta_bias=True,
             initial_state=True)
    t = make_inputs(c, seed=0, device=u_on)
    other = "cpu" if u_on == "cuda" else DEVICE
    t[name] = t[name].to(other)
    with pytest.raises((ValueError, RuntimeError), match=rf"'{name}'"):
        run_op(c, t)


@needs_kernel
@pytest.mark.parametrize("batch,L", [(0, 10), (2, 0)], ids=["batch0", "L0"])
def test_cuda_empty_inputs(batch, L):
    c = case(batch=batch, d=8, L=L, N=4, initial_state=True, last_state=True, D=True)
    t = make_inputs(c, device=DEVICE, requires_grad=True)
    out, last = run_op(c, t)
    assert out.shape == t["u"].shape and out.device.type == "cuda"
    assert torch.equal(last, t["initial_state"])
    (out.sum() + last.sum()).backward()
    assert t["initial_state"].grad is not None


@needs_kernel
def test_cuda_non_contiguous_inputs():
    c = case(batch=2, d=16, L=37, N=6, layout="cl", b_mode="grouped", c_mode="grouped", groups=2, **full)
    t = make_inputs(c, seed=4, device=DEVICE)
    t_nc = {k: None if v is None else (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() > 1 else v)
            for k, v in t.items()}
    out, last = run_op(c, t)
    out_nc, last_nc = run_op(c, t_nc)
    assert torch.equal(out, out_nc) and torch.equal(last, last_nc)


@needs_kernel
@pytest.mark.parametrize("c", [case(batch=2, d=40, L=300, N=8, **full),
                               case(batch=2, d=40, L=300, N=16, layout="cl", b_mode="grouped", c_mode="grouped",
                                    groups=2, **full)], ids=case_id)
def test_cuda_graph_capture(c):
    """Forward + backward captured in a CUDA graph: a replay on new u gives what an eager call gives."""
    t = make_inputs(c, seed=6, device=DEVICE, requires_grad=True)
    dout, dlast = random_cotangents(c, t, 6, with_dlast=True)
    graph, captured = capture_cuda_graph(lambda: op_grads(c, t, dout, dlast))
    with torch.no_grad():
        t["u"].copy_(torch.randn(t["u"].shape, generator=torch.Generator().manual_seed(7)).to(t["u"]))
    graph.replay()
    torch.cuda.synchronize()
    eager = op_grads(c, t, dout, dlast)
    for k in eager:
        torch.testing.assert_close(captured[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)


@needs_kernel
def test_cuda_indices_past_2_31():
    """64-bit indexing: channels-last bf16 u with 512 x (2^22 + 2^15) > 2^31 elements, so every step from
    l = 508 on lies past 2^31. Channels are independent: the outputs and per-channel gradients of the first
    and last 64 channels must match a small call on those channels alone. Needs ~45 GB of GPU memory."""
    L, d, N = 512, 2**22 + 2**15, 4
    if torch.cuda.mem_get_info()[0] < 50 * 2**30:
        pytest.skip("needs ~50 GB of free GPU memory")
    op = torch.ops.gmamba_ext
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)

    bf = torch.bfloat16
    u, delta, z, dout = rnd(1, L, d, dtype=bf), rnd(1, L, d, dtype=bf, scale=0.5), rnd(1, L, d, dtype=bf), \
        rnd(1, L, d, dtype=bf)
    A, B, C, D, bias = -torch.exp(rnd(d, N, scale=0.5)), rnd(1, L, N), rnd(1, L, N), rnd(d), rnd(d, scale=0.1)

    def fwd_bwd(u, delta, z, dout, A, D, bias):
        out, _, ckpt = op.selective_scan_fwd(u, delta, A, B, C, D, z, bias, None, True, True)
        grads = op.selective_scan_bwd(dout, None, ckpt, u, delta, A, B, C, D, z, bias, None, True, True)
        # out, du, ddelta, dA, dD, dz, ddelta_bias: the per-channel ones (dB, dC sum over channels)
        return [out, grads[0], grads[1], grads[2], grads[5], grads[6], grads[7]]

    big = fwd_bwd(u, delta, z, dout, A, D, bias)
    assert u.numel() > 2**31
    for sel in (slice(0, 64), slice(d - 64, d)):
        small = fwd_bwd(*(t[..., sel].contiguous() for t in (u, delta, z, dout)), A[sel].contiguous(), D[sel],
                        bias[sel])
        names = ["out", "du", "ddelta", "dA", "dD", "dz", "ddelta_bias"]
        for name, b, s in zip(names, big, small):
            b = b[sel] if name in ("dA", "dD", "ddelta_bias") else b[..., sel]
            torch.testing.assert_close(b.float(), s.float(), rtol=2e-2, atol=2e-2, msg=f"{name} {sel}")


@needs_kernel
@pytest.mark.parametrize("kernel", ["lane", "chunk"])
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("b_mode,c_mode,groups", BC_MODES)
@pytest.mark.parametrize("N", [5, 13])
def test_cuda_gradients_with_uninitialised_memory_as_nan(kernel, layout, b_mode, c_mode, groups, N, monkeypatch):
    """Every element of du, ddelta, dz and of every partial buffer (all allocated uninitialised) is written by
    both gradient kernels (N = 13: lane_backward<16>, either layout)."""
    monkeypatch.setenv("GMAMBA_CUDA_SCAN_BWD", kernel)
    check_grads_with_uninitialised_memory_as_nan(layout, b_mode, c_mode, groups, DEVICE, N=N)

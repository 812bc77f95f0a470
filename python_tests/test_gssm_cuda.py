"""CUDA tests of gmamba_ext.gssm and its ops (conv_silu, fgmm): skipped without a GPU or without compiled
CUDA kernels. Oracles: gssm_ref in float64 on the CPU for small shapes; for larger ones the CPU fused path
in float64 (checked against gssm_ref to 1e-10 by test_gssm.py)."""
import pytest
import torch

import gmamba_ext
from gmamba_ext import gssm
from gmamba_ext.gssm_ops import conv_silu, conv_silu_torch, fgmm, fgmm_torch
from gmamba_ext.gssm_reference import gssm_ref
from gmamba_ext._graph_capture import capture_cuda_graph
from gssm_helpers import assert_bitwise_reproducible, cast, grads_of, make, param_fields
from test_gssm_ops import conv_inputs, fgmm_inputs

f64 = torch.float64
HAS_CUDA_KERNEL = gmamba_ext.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "gmamba_ext::fgmm_fwd", "CUDA")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
              pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="gmamba_ext was built without its CUDA kernels")]
VARIANTS = ("full", "ssm", "fem_ssm", "dft_fgmm_ssm")


def x_for(cfg, B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, W, cfg.d_model, generator=g, dtype=f64)


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [3, 4])
def test_conv_silu_cuda_matches_torch(dtype, K):
    args = [t.cuda() for t in conv_inputs(B=3, L=333, d=40, K=K, dtype=dtype)]
    tol = {f64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    for got, want in zip(conv_silu(*args), conv_silu_torch(*args)):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
def test_fgmm_cuda_matches_torch(dtype):
    args = [t.cuda() for t in fgmm_inputs(B=3, L=1000, d=48, dtype=dtype)]
    tol = {f64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(fgmm(*args), fgmm_torch(*args)):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def test_ops_cuda_gradients_match_cpu_float64():
    conv = conv_inputs(B=2, L=300, d=24, K=3)
    fg = fgmm_inputs(B=2, L=300, d=24)
    for fn, args in ((lambda *a: conv_silu(*a)[0] * 2 + conv_silu(*a)[1], conv), (lambda *a: fgmm(*a)[0], fg)):
        grads = []
        for dev in ("cpu", "cuda"):
            leaves = [t.detach().to(dev).requires_grad_() for t in args]
            out = fn(*leaves)
            out.backward(torch.ones_like(out))
            grads.append([t.grad.cpu() for t in leaves])
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("directions", ["uni", "four"])
def test_gssm_cuda_float32_matches_reference(variant, directions):
    cfg, p, _ = make(32, variant=variant, directions=directions, d_state=8)
    x = x_for(cfg, 2, 14, 18)
    want = gssm_ref(x, p, cfg)
    got = gssm(x.float().cuda(), cast(p, torch.float32, "cuda"), variant=variant, directions=directions)
    assert got.is_cuda and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("mask", ["corner", "symmetric"])
def test_gssm_cuda_float64_large_matches_cpu(mask):
    cfg, p, _ = make(96, mask=mask, d_state=8, directions="bi")
    x = x_for(cfg, 4, 32, 40)
    want = gssm(x, p, mask=mask, directions="bi")
    got = gssm(x.cuda(), cast(p, device="cuda"), mask=mask, directions="bi")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [(7, 7), (56, 56), (37, 53)])
def test_gssm_cuda_autocast(dtype, size):
    """Autocast: GEMMs and elementwise in the half dtype, FFTs in float32 (any size, not only powers of 2)."""
    cfg, p, _ = make(64, d_state=8)
    x = x_for(cfg, 2, *size)
    want = gssm_ref(x, p, cfg)
    with torch.autocast("cuda", dtype=dtype):
        got = gssm(x.float().cuda(), cast(p, torch.float32, "cuda"))
    assert got.dtype == dtype
    assert rel_err(got, want) < 0.05


def test_gssm_cuda_gradients_match_reference():
    cfg, p, g = make(32, directions="bi", d_state=8)
    x = x_for(cfg, 2, 12, 10)
    dout = torch.randn(2, 12, 10, 32, generator=g, dtype=f64)
    names, got = grads_of(lambda x, q: gssm(x, q, directions="bi"), x, p, dout, torch.float32, "cuda")
    _, want = grads_of(lambda x, q: gssm_ref(x, q, cfg), x, p, dout, f64)
    for name, a, b in zip(names, got, want):
        assert rel_err(a, b) < 1e-3, name


def test_gssm_cuda_deterministic():
    cfg, p, _ = make(64, d_state=8, directions="four")
    p32 = cast(p, torch.float32, "cuda")
    x = x_for(cfg, 4, 32, 32).float().cuda()
    assert_bitwise_reproducible(x, p32, "freq_ratio", directions="four")


@pytest.mark.parametrize("impl", ["fused", "composition"])
def test_gssm_cuda_graph_capture(impl):
    """Forward + backward captured in a CUDA graph (no host sync, no host-to-device copy, no data-dependent
    host decision): a replay on new input data copied into the captured buffer gives what an eager call
    gives. Also for gssm_ref with our scan: the unfused composition, which the benchmarks run."""
    cfg, p, g = make(32, d_state=8, directions="bi")
    fn = (lambda x, q: gssm(x, q, directions="bi")) if impl == "fused" else \
        (lambda x, q: gssm_ref(x, q, cfg, scan=gmamba_ext.selective_scan))
    p32 = cast(p, torch.float32, "cuda")
    names = param_fields(p32)
    leaves = [x_for(cfg, 2, 14, 18).float().cuda().requires_grad_()]
    leaves += [getattr(p32, n).detach().clone().requires_grad_() for n in names]
    dout = torch.randn(2, 14, 18, 32, generator=g).cuda()

    def step():
        out = fn(leaves[0], p32.replace(**dict(zip(names, leaves[1:]))))
        return [out, *torch.autograd.grad(out, leaves, dout)]

    graph, captured = capture_cuda_graph(step)
    with torch.no_grad():
        leaves[0].copy_(x_for(cfg, 2, 14, 18, seed=5).float().cuda())
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(["out", "x", *names], captured, step()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_opcheck_cuda():
    for op, args in ((torch.ops.gmamba_ext.conv_silu_fwd.default, conv_inputs(L=50, dtype=torch.float32)),
                     (torch.ops.gmamba_ext.fgmm_fwd.default, fgmm_inputs(L=50, dtype=torch.float32))):
        torch.library.opcheck(op, [t.cuda().requires_grad_() for t in args])


def test_compile_cuda():
    cfg, p, _ = make(32)
    p32 = cast(p, torch.float32, "cuda")
    x = x_for(cfg, 2, 16, 16).float().cuda()
    fn = torch.compile(lambda x: gssm(x, p32), fullgraph=True)
    torch.testing.assert_close(fn(x), gssm(x, p32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_cuda_autocast_and_matches_cpu(dtype):
    from gmamba_ext.nn import GMambaBlock
    torch.manual_seed(0)
    block = GMambaBlock(64, window_size=None, directions="bi").eval()
    x = torch.randn(2, 64, 28, 28)
    want = block(x)
    block_cuda = block.cuda()
    xc = x.cuda().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block_cuda(xc).cpu(), want, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        got = block_cuda(xc)
        mixed = block_cuda.mixer(xc.permute(0, 2, 3, 1))
    assert mixed.dtype == dtype
    assert rel_err(got, want) < 0.05
    got.float().sum().backward()  # backward under autocast'ed graph

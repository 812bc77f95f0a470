"""The GSSM custom ops (conv_silu, fgmm): against their plain-torch twins, float64 gradcheck, opcheck
(schema, fake kernel, autograd registration, AOT dispatch), every dtype, and the errors of bad arguments,
both of the raw ops and of gmamba_ext.gssm."""
import pytest
import torch

import gmamba_ext
from gmamba_ext import gssm
from gmamba_ext.gssm_ops import conv_silu, conv_silu_torch, fgmm, fgmm_torch
from gmamba_ext.reference import accumulation_dtype
from gssm_helpers import make

f64 = torch.float64
needs_ext = pytest.mark.skipif(not gmamba_ext.HAS_EXTENSION, reason="extension not built")
DTYPE_TOL = {f64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def conv_inputs(B=2, L=37, d=6, K=3, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = accumulation_dtype(dtype)
    return (torch.randn(B, L, 2 * d, generator=g, dtype=f64).to(dtype),
            torch.randn(2 * d, K, generator=g, dtype=f64).to(acc), torch.randn(2 * d, generator=g, dtype=f64).to(acc))


def fgmm_inputs(B=2, L=70, d=8, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = accumulation_dtype(dtype)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    tokens = [r(B, L, d).to(dtype) for _ in range(3)] + [r(B, L).to(dtype)]
    weights = [r(d // 4, d), r(d // 4), r(2, d // 4), r(2), r(())]
    return tokens + [w.to(acc) for w in weights]


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("K", [1, 2, 3, 4, 7])
def test_conv_silu_matches_torch(dtype, K):
    args = conv_inputs(K=K, L=130, dtype=dtype)
    for got, want in zip(conv_silu(*args), conv_silu_torch(*args)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=DTYPE_TOL[dtype], atol=DTYPE_TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
def test_fgmm_matches_torch(dtype):
    args = fgmm_inputs(dtype=dtype)
    for got, want in zip(fgmm(*args), fgmm_torch(*args)):
        torch.testing.assert_close(got.double(), want.double(), rtol=DTYPE_TOL[dtype], atol=DTYPE_TOL[dtype])


@pytest.mark.parametrize("K,L", [(3, 1), (3, 2), (4, 65), (1, 9)])
def test_conv_silu_gradcheck(K, L):
    args = [t.requires_grad_() for t in conv_inputs(B=2, L=L, d=3, K=K)]
    assert torch.autograd.gradcheck(lambda *a: conv_silu(*a), args)


@pytest.mark.parametrize("L", [1, 5, 130])
def test_fgmm_gradcheck(L):
    args = [t.requires_grad_() for t in fgmm_inputs(B=3, L=L, d=4)]
    assert torch.autograd.gradcheck(lambda *a: fgmm(*a)[0], args)


@needs_ext
def test_fgmm_gradients_match_torch_float32():
    args = fgmm_inputs(dtype=torch.float32, L=300, d=16)
    dout = torch.randn_like(args[0])

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in args]
        fn(*leaves)[0].backward(dout)
        return [t.grad for t in leaves]

    for a, b in zip(grads(fgmm), grads(fgmm_torch)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-7)


@needs_ext
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_opcheck_conv_silu(dtype):
    args = conv_inputs(L=20, dtype=dtype)
    torch.library.opcheck(torch.ops.gmamba_ext.conv_silu_fwd.default, args)
    torch.library.opcheck(torch.ops.gmamba_ext.conv_silu_fwd.default, [t.requires_grad_() for t in args])
    x1, z1 = conv_silu(*args)
    torch.library.opcheck(torch.ops.gmamba_ext.conv_silu_bwd.default,
                          (torch.randn_like(x1), torch.randn_like(z1), *[t.detach() for t in args]))


@needs_ext
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_opcheck_fgmm(dtype):
    args = fgmm_inputs(L=20, dtype=dtype)
    torch.library.opcheck(torch.ops.gmamba_ext.fgmm_fwd.default, args)
    torch.library.opcheck(torch.ops.gmamba_ext.fgmm_fwd.default, [t.requires_grad_() for t in args])
    plain = [t.detach() for t in args]
    x2, s, a, g = torch.ops.gmamba_ext.fgmm_fwd(*plain)
    torch.library.opcheck(torch.ops.gmamba_ext.fgmm_bwd.default,
                          (torch.randn_like(x2), *plain[:4], s, a, g, *plain[4:]))


def test_empty_batch():
    cfg, p, _ = make(16)
    x = torch.zeros(0, 6, 6, 16, dtype=f64, requires_grad=True)
    out = gssm(x, p)
    assert out.shape == (0, 6, 6, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------- errors ----
@needs_ext
@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0][0], a[1], a[2]), "'xz' must be 3-D"),
    (lambda a: (a[0][..., :-1].contiguous(), a[1][:-1].contiguous(), a[2][:-1].contiguous()), "even"),
    (lambda a: (a[0], a[1][:, None], a[2]), "'weight' must have shape"),
    (lambda a: (a[0], a[1].float(), a[2]), "'weight' must be"),
    (lambda a: (a[0], a[1], a[2][:-1]), "'bias' must have shape"),
    (lambda a: (a[0].transpose(0, 1), a[1], a[2]), "contiguous"),
    (lambda a: (a[0].int(), a[1], a[2]), "'xz' must be a floating-point"),
    (lambda a: (a[0], torch.zeros(a[1].shape[0], 9, dtype=f64), a[2]), r"K = weight.shape\[1\] must be in"),
])
def test_conv_silu_raw_op_errors(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.gmamba_ext.conv_silu_fwd(*change(conv_inputs()))


@needs_ext
@pytest.mark.parametrize("index,bad,match", [
    (1, lambda t: t[:, :-1].contiguous(), "'f' must have shape"),
    (3, lambda t: t[:, None], "'gate_logit' must have shape"),
    (2, lambda t: t.float(), "'c' must have x1's dtype"),
    (4, lambda t: t[:, :-1].contiguous(), "'w1' must have shape"),
    (8, lambda t: t.reshape(1), "'ratio' must have shape"),
    (6, lambda t: t.float(), "'w2' must be"),
])
def test_fgmm_raw_op_errors(index, bad, match):
    args = fgmm_inputs()
    args[index] = bad(args[index])
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.gmamba_ext.fgmm_fwd(*args)


def _x(C=16, shape=(2, 6, 6), dtype=f64):
    return torch.randn(*shape, C, dtype=dtype)


@pytest.mark.parametrize("call,match", [
    (lambda p: gssm(_x(C=12), p), r"C = d_model = 16"),
    (lambda p: gssm(torch.randn(2, 36, 16, dtype=f64), p), "must be 4-D"),
    (lambda p: gssm(_x().int(), p), "floating point"),
    (lambda p: gssm([1, 2], p), "x must be a tensor"),
    (lambda p: gssm(_x(), p, variant="fft"), "variant must be one of"),
    (lambda p: gssm(_x(), p, mask="round"), "mask must be one of"),
    (lambda p: gssm(_x(), p, directions="eight"), "directions must be one of"),
    (lambda p: gssm(_x(), p, directions="bi"), r"missing keys: \['x_proj_1.weight'"),
    (lambda p: gssm(_x(), p.replace(D=p.D[:-1])), r"D: expected \(8,\), got \(7,\)"),
    (lambda p: gssm(_x(), p.replace(**{"in_proj.weight": p.in_proj_weight.to("meta")})), "is on meta"),
    (lambda p: gssm(_x(), {k: v for k, v in p.to_state_dict().items() if k != "freq_ratio"}),
     r"missing keys: \['freq_ratio'\]"),
    (lambda p: gssm(_x(), {**p.to_state_dict(), "extra.weight": p.D}), r"unexpected keys: \['extra.weight'\]"),
    (lambda p: gssm(_x(), {"x": 1}), "'in_proj.weight' must be a 2-D tensor"),
    (lambda p: gssm(_x(), {**p.to_state_dict(), "D": p.D.long()}), r"not floating point: \['D \(torch.int64\)'\]"),
    (lambda p: gssm(_x(), 3), "params must be a GSSMParams"),
    (lambda p: gssm(_x(), p, initial_state=[None, None]), "initial_state must be"),
    (lambda p: gssm(_x(), p, initial_state=torch.zeros(2, 8, 8, device="meta")), r"initial_state\[0\] is on meta"),
    (lambda p: gssm(_x(), make(16, directions="bi")[1], directions="bi", initial_state=torch.zeros(2, 8, 8)),
     "one per scan direction"),
])
def test_gssm_errors(call, match):
    _, p, _ = make(16)
    with pytest.raises(ValueError, match=match):
        call(p)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_jit_trace_says_what_to_use_instead():
    _, p, _ = make(16)
    with pytest.raises(RuntimeError, match="torch.jit.trace is not supported.*torch.compile or torch.export"):
        torch.jit.trace(lambda x: gssm(x, p), (_x(),))


def test_gssm_d_smaller_than_4():
    _, p, _ = make(16)
    small = p.replace(**{"in_proj.weight": torch.zeros(6, 16, dtype=f64)})
    with pytest.raises(ValueError, match=r"d = E // 2 = 3 must be >= 4"):
        gssm(_x(), small)

"""The scan kernels at extreme but legal inputs, against the float64 reference: an A whose decay rate
overflows (or A = -inf) with L not a multiple of the chunk (the padding steps have dt = 0), on the CPU and
(where present) CUDA, and the CPU's softplus far below 0."""
import pytest
import torch

import gmamba_ext
from gmamba_ext.ops import HAS_EXTENSION
from gmamba_ext.reference import selective_scan_ref

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")
NAMES = ("u", "delta", "A", "B", "C")


def outputs_and_grads(fn, args, **kw):
    args = [a.detach().clone().requires_grad_() for a in args]
    out, last = fn(*args, return_last_state=True, **kw)
    (out.sum() + last.sum()).backward()
    return [out, last] + [a.grad for a in args]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("A_value", [-3e38, float("-inf")])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("L", [5, 37])
def test_a_huge_negative_a_with_padding_steps(device, dtype, A_value, channels_last, L):
    """On the CPU, A log2(e) overflowed to -inf; on both devices A = -inf times the padding steps' dt = 0
    made last_state and every gradient NaN; the reference (and the kernels at L = 16) gave finite values.
    L = 37 spans several chunks."""
    b, d, N = 1, 3, 2
    shape = (b, L, d) if channels_last else (b, d, L)
    bc = (b, L, N) if channels_last else (b, N, L)
    args = [torch.ones(shape, dtype=dtype, device=device), torch.full(shape, 0.5, dtype=dtype, device=device),
            torch.full((d, N), A_value, dtype=dtype, device=device), torch.ones(bc, dtype=dtype, device=device),
            torch.ones(bc, dtype=dtype, device=device)]
    fn = gmamba_ext.selective_scan_channels_last if channels_last else gmamba_ext.selective_scan
    got = outputs_and_grads(fn, args)
    want = outputs_and_grads(lambda *a, **kw: selective_scan_ref(*a, channels_last=channels_last, **kw),
                             [a.double().cpu() for a in args])
    for name, g, w in zip(("out", "last_state", *NAMES), got, want):
        if not torch.isfinite(w).all():  # dA and ddelta at A = -inf hold 0 * inf in the reference too
            assert A_value == float("-inf") and name in ("A", "delta"), name
            continue
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-6, atol=1e-6, msg=name)


def test_softplus_far_below_zero_gives_zero_not_a_floor():
    """exp(-|v|) was clamped at -87.3, leaving softplus(v) >= 1.2e-38: times u = 1e30 that was 1.2e-8 in
    the output per step where the float64 reference gives ~3.7e-14 (v = -100) or 0 (v = -1e4)."""
    d, L, N = 2, 4, 1
    u = torch.full((1, d, L), 1e30)
    A, B, C, D = -torch.ones(d, N), torch.ones(1, N, L), torch.ones(1, N, L), torch.zeros(d)
    for v, bound in ((-100.0, 1e-12), (-1e4, 0.0)):  # the old floor gave 1.2e-8 per step
        delta = torch.full((1, d, L), v)
        out = gmamba_ext.selective_scan(u, delta, A, B, C, D, delta_softplus=True)
        ref = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double(), D.double(),
                                 delta_softplus=True)
        assert out.abs().max() <= bound and ref.abs().max() <= bound, (v, out.abs().max(), ref.abs().max())

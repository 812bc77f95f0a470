"""torch.library.opcheck on the raw ops: schema (no hidden mutation/aliasing), fake (meta) kernels vs the
real ones, the autograd registration (inputs requiring grad), and AOT dispatch with dynamic shapes."""
import pytest
import torch

from conftest import api, case, case_id, make_inputs, raw_fwd_args

fwd = torch.ops.gmamba_ext.selective_scan_fwd
bwd = torch.ops.gmamba_ext.selective_scan_bwd

full = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
OP_CASES = [
    case(batch=2, d=4, L=19, N=3, **full),
    case(batch=2, d=12, L=33, N=8, layout="cl", b_mode="grouped", c_mode="grouped", groups=4, D=True),
    case(batch=1, d=5, L=7, N=16, b_mode="constant", c_mode="variable", z=True, initial_state=True),
    case(batch=2, d=8, L=40, N=4, dtype=torch.bfloat16, layout="cl", b_mode="constant", c_mode="constant",
         **full),
    case(batch=1, d=4, L=17, N=2, dtype=torch.float64, b_mode="grouped", c_mode="constant", groups=2, **full),
    case(batch=2, d=4, L=0, N=3, initial_state=True),
]


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("c", OP_CASES, ids=case_id)
def test_opcheck_forward(c, requires_grad):
    t = make_inputs(c, seed=1)
    torch.library.opcheck(fwd, raw_fwd_args(c, t, requires_grad))


@pytest.mark.parametrize("with_dlast", [True, False], ids=["dlast", "no_dlast"])
@pytest.mark.parametrize("c", OP_CASES[:5], ids=case_id)
def test_opcheck_backward(c, with_dlast):
    t = make_inputs(c, seed=2)
    args = raw_fwd_args(c, t, requires_grad=False)
    out, last, checkpoints = fwd(*args)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(out.shape, generator=g).to(out.dtype)
    dlast = torch.randn(last.shape, generator=g).to(last.dtype) if with_dlast else None
    torch.library.opcheck(bwd, (dout, dlast, checkpoints, *args))


def test_opcheck_backward_grads_match_autograd():
    """The registered autograd formula is the raw backward op: same values as calling it directly."""
    c = case(batch=2, d=4, L=19, N=3, **full)
    t = make_inputs(c, seed=4)
    args = raw_fwd_args(c, t, requires_grad=True)
    out, last, ckpt = fwd(*args)
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    tensors = [a for a in args[:9]]
    grads = torch.autograd.grad((out, last), tensors, (dout, dlast))
    direct = bwd(dout, dlast, ckpt.detach(), *[a.detach() for a in tensors], *args[9:])
    for g_auto, g_direct in zip(grads, direct):
        assert torch.equal(g_auto, g_direct)


@pytest.mark.parametrize("c", [OP_CASES[0], OP_CASES[1]], ids=case_id)
def test_eager_wrapper_gradients_equal_registered_autograd(c):
    """Eager calls of the wrapper take a plain autograd.Function (far less Python per call than the op's
    registered autograd, which torch.compile and functorch keep using): both must give the same bits."""
    from gmamba_ext import ops

    t = make_inputs(c, seed=5)
    args = raw_fwd_args(c, t, requires_grad=True)
    flags = args[9:]
    out_fn, last_fn, _ = ops._ScanFunction.apply(*args[:9], *flags)
    out_op, last_op, _ = fwd(*args)
    assert torch.equal(out_fn, out_op) and torch.equal(last_fn, last_op)
    dout, dlast = torch.randn_like(out_op), torch.randn_like(last_op)
    inputs = [a for a in args[:9] if a is not None]
    g_fn = torch.autograd.grad((out_fn, last_fn), inputs, (dout, dlast))
    g_op = torch.autograd.grad((out_op, last_op), inputs, (dout, dlast))
    for a, b in zip(g_fn, g_op):
        assert torch.equal(a, b)
    # The public wrapper uses the Function in eager mode when something requires grad.
    wrapped = api(c)(t["u"].requires_grad_(), t["delta"], t["A"], t["B"], t["C"], D=t["D"],
                     z=t["z"], delta_bias=t["delta_bias"], delta_softplus=c["softplus"],
                     initial_state=t["initial_state"])
    assert type(wrapped.grad_fn).__name__ == "_ScanFunctionBackward"


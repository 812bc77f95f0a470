"""torch.compile(fullgraph=True) over functions that call gmamba_ext.selective_scan (and the channels-last
op): no graph break, same forward and backward as eager. Backends "eager" and "aot_eager" check tracing
and the fake/autograd registrations; inductor is tried once (skipped without a C++ compiler)."""
import shutil

import pytest
import torch

from conftest import DIFF_NAMES, api, case, make_inputs, random_cotangents

full = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True, last_state=True)
COMPILE_CASES = {
    "cf-variable": case(batch=2, d=8, L=33, N=4, **full),
    "cl-grouped": case(batch=2, d=8, L=33, N=4, layout="cl", b_mode="grouped", c_mode="grouped", groups=2, **full),
    "cf-constant-bf16": case(batch=2, d=8, L=20, N=4, dtype=torch.bfloat16, b_mode="constant",
                             c_mode="constant", D=True, z=True),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_fn(c):
    """A small model step around the op: pre/post-processing so the op sits inside a bigger graph."""
    op = api(c)

    def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
        res = op(u * 1.0, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=c["softplus"],
                 return_last_state=c["last_state"], initial_state=initial_state)
        if c["last_state"]:
            out, last = res
            return torch.tanh(out), last * 2.0
        return torch.tanh(res), None

    return fn


def run_fwd_bwd(fn, c, seed):
    t = make_inputs(c, seed=seed, requires_grad=True)
    names = [k for k in DIFF_NAMES if t[k] is not None]
    out, last = fn(**t)
    dout, dlast = random_cotangents(c, t, seed, with_dlast=c["last_state"])
    outs, cots = [out], [dout]
    if last is not None:
        outs.append(last)
        cots.append(dlast)
    grads = torch.autograd.grad(outs, [t[k] for k in names], cots)
    return out, last, dict(zip(names, grads))


def compare_compiled(c, backend, seed=0, dynamic=None):
    fn = make_fn(c)
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    out_c, last_c, g_c = run_fwd_bwd(compiled, c, seed)
    out_e, last_e, g_e = run_fwd_bwd(fn, c, seed)
    tol = dict(rtol=1e-5, atol=1e-5) if c["dtype"] != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out_c, out_e, **tol)
    if last_e is not None:
        torch.testing.assert_close(last_c, last_e, **tol)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k], **tol, msg=k)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_compile_fullgraph_matches_eager(name, backend):
    compare_compiled(COMPILE_CASES[name], backend)


def test_compile_dynamic_shapes_no_graph_break():
    """dynamic=True: one graph serves several (batch, L) (the fake kernel computes symbolic shapes)."""
    base = COMPILE_CASES["cl-grouped"]
    fn = torch.compile(make_fn(base), fullgraph=True, backend="aot_eager", dynamic=True)
    for batch, L in ((2, 33), (3, 17), (1, 50)):
        c = dict(base, batch=batch, L=L)
        out_c, last_c, g_c = run_fwd_bwd(fn, c, seed=L)
        out_e, last_e, g_e = run_fwd_bwd(make_fn(c), c, seed=L)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last_c, last_e, rtol=1e-5, atol=1e-5)
        for k in g_e:
            torch.testing.assert_close(g_c[k], g_e[k], rtol=1e-5, atol=1e-5, msg=k)


def test_compile_raw_op_fullgraph():
    """The raw op alone under fullgraph (independent of the Python wrapper's argument handling)."""
    c = COMPILE_CASES["cf-variable"]
    t = make_inputs(c, seed=5, requires_grad=True)
    args = tuple(t[k] for k in DIFF_NAMES) + (True, False)

    def f(*a):
        out, last, _ = torch.ops.gmamba_ext.selective_scan_fwd(*a)
        return out.sum() + last.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    g_c = torch.autograd.grad(loss_c, [a for a in args[:9]])
    loss_e = f(*args)
    g_e = torch.autograd.grad(loss_e, [a for a in args[:9]])
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("cc") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compile_inductor_matches_eager():
    """Default backend (inductor) once: the op stays an extern call inside generated C++ (~20 s here)."""
    compare_compiled(COMPILE_CASES["cl-grouped"], "inductor")

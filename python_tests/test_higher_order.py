"""Second-order gradients through the scan, the composition's ops and the fused gssm (gmamba_ext/higher_order.py):
gradgradcheck (finite differences of the first derivative) in float64, and against the plain-PyTorch
references under autograd and torch.func; first-order backward passes never take the reference path."""
import pytest
import torch

import gmamba_ext
from gmamba_ext import gssm_fused, gssm_ops, ops
from gmamba_ext.gssm import gssm
from gmamba_ext.gssm_reference import gssm_ref
from gmamba_ext.nn import GSSM
from gmamba_ext.reference import selective_scan_ref

from conftest import DIFF_NAMES, api, case, make_inputs
from gssm_helpers import make, param_fields

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="the compiled extension is not built")
f64 = torch.float64

SCAN_CASES = [
    case(batch=1, d=2, L=5, N=2, dtype=f64, D=True, z=True, delta_bias=True, softplus=True, initial_state=True),
    case(batch=2, d=2, L=4, N=3, dtype=f64, layout="cl", b_mode="grouped", c_mode="constant", groups=2, D=True),
]


def scan_args(c):
    t = make_inputs(c, seed=3, requires_grad=True)
    return [t[k] for k in DIFF_NAMES]


@pytest.mark.parametrize("c", SCAN_CASES, ids=["cf_all_options", "cl_grouped_constant"])
def test_scan_gradgradcheck(c):
    args = scan_args(c)
    present = [i for i, t in enumerate(args) if t is not None]

    def fn(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        out, last = api(c)(*full[:8], delta_softplus=c["softplus"], return_last_state=True,
                           initial_state=full[8])
        return out, last

    assert torch.autograd.gradgradcheck(fn, [args[i] for i in present])


@pytest.mark.parametrize("c", SCAN_CASES, ids=["cf_all_options", "cl_grouped_constant"])
def test_scan_hessian_vector_products_match_the_reference(c):
    """create_graph=True then a second backward (gradient penalties), and torch.func.grad over grad."""
    args = scan_args(c)
    ref = lambda *a: selective_scan_ref(*a[:8], delta_softplus=c["softplus"], initial_state=a[8],  # noqa: E731
                                        channels_last=c["layout"] == "cl")
    mine = lambda *a: api(c)(*a[:8], delta_softplus=c["softplus"], initial_state=a[8])  # noqa: E731
    results = []
    for fn in (mine, ref):
        first = torch.autograd.grad(fn(*args).square().sum(), args[0], create_graph=True)[0]
        results.append(torch.autograd.grad(first.square().sum(), [t for t in args if t is not None]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    def loss(fn):
        return lambda u: fn(u, *args[1:]).square().sum()

    got = torch.func.grad(lambda u: torch.func.grad(loss(mine))(u).square().sum())(args[0].detach())
    want = torch.func.grad(lambda u: torch.func.grad(loss(ref))(u).square().sum())(args[0].detach())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert want.abs().max() > 1e-3  # a second derivative that is not zero: zeros were the bug


def test_composition_ops_gradgradcheck():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=f64).requires_grad_()  # noqa: E731
    B, L, d = 2, 5, 4
    xz, w, b = rnd(B, L, 2 * d), rnd(2 * d, 3), rnd(2 * d)
    assert torch.autograd.gradgradcheck(gssm_ops.conv_silu, (xz, w, b))
    x1, f, c, gate = rnd(B, L, d), rnd(B, L, d), rnd(B, L, d), rnd(B, L)
    w1, b1, w2, b2, ratio = rnd(d // 4, d), rnd(d // 4), rnd(2, d // 4), rnd(2), rnd(())
    assert torch.autograd.gradgradcheck(lambda *a: gssm_ops.fgmm(*a)[0], (x1, f, c, gate, w1, b1, w2, b2, ratio))


@pytest.mark.parametrize("variant,directions", [("full", "uni"), ("dft_fgmm_ssm", "bi")])
def test_gssm_fused_gradgradcheck(variant, directions):
    cfg, p, g = make(8, variant=variant, directions=directions, d_state=2, d_conv=2)
    x = torch.randn(1, 4, 5, 8, generator=g, dtype=f64, requires_grad=True)
    names = ["in_proj_weight", "A_log", "D", "out_proj_weight"]
    ws = [getattr(p, n).clone().requires_grad_() for n in names]

    def fn(x, *ws):
        return gssm(x, p.replace(**dict(zip(names, ws))), variant=variant, directions=directions)

    assert torch.autograd.gradgradcheck(fn, (x, *ws), atol=1e-6)


def test_gssm_second_order_matches_the_reference_eager_and_under_torch_func():
    cfg, p, g = make(8, d_state=2, d_conv=2)
    x = torch.randn(2, 4, 4, 8, generator=g, dtype=f64)
    names = param_fields(p)
    ref = lambda x, q: gssm_ref(x, q, cfg)  # noqa: E731
    results = []
    for fn in (gssm, ref):
        xs = x.clone().requires_grad_()
        ws = [getattr(p, n).clone().requires_grad_() for n in names]
        q = p.replace(**dict(zip(names, ws)))
        (gx,) = torch.autograd.grad(fn(xs, q).square().sum(), xs, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [xs, *ws], allow_unused=True))
    for name, got, want in zip(["x", *names], *results):
        if want is None:
            assert got is None or got.abs().max() == 0, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)

    # torch.func over the module: the Python composition's ops (scan, conv, FGMM)
    m = GSSM(8, d_state=2, d_conv=2, expand=1).double()
    params = dict(m.named_parameters())

    def second(fn):
        loss = lambda h: fn(h).square().sum()  # noqa: E731
        return torch.func.grad(lambda h: torch.func.grad(loss)(h).square().sum())(x)

    got = second(lambda h: torch.func.functional_call(m, params, (h,)))
    want = second(lambda h: gssm_ref(h, m.gssm_params(), m.config))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert want.abs().max() > 1e-3


def _refuse(*_args, **_kwargs):
    raise AssertionError("a first-order backward took the reference path")


def test_first_order_backward_keeps_the_kernels(monkeypatch):
    for module in (ops, gssm_ops, gssm_fused):
        monkeypatch.setattr(module, "reference_vjp", _refuse)
    c = SCAN_CASES[0]
    args = scan_args(c)
    api(c)(*args[:8], delta_softplus=True, initial_state=args[8]).sum().backward()
    torch.func.grad(lambda u: api(c)(u, *args[1:8], initial_state=args[8]).sum())(args[0].detach())
    cfg, p, g = make(8, d_state=2)
    x = torch.randn(2, 4, 4, 8, generator=g, dtype=f64, requires_grad=True)
    gssm(x, p).sum().backward()
    m = GSSM(8, d_state=2, expand=1).double()
    params = dict(m.named_parameters())
    torch.func.vmap(torch.func.grad(lambda w, h: torch.func.functional_call(m, w, (h[None],)).sum()),
                    in_dims=(None, 0))(params, x.detach())


def test_vmap_of_grad_with_a_shared_batch_one_argument():
    """vmap folds the vmapped dimension into the batch; an unvmapped batch-1 argument (delta here) expanded
    to a stride-0 view, which the kernels refused as non-contiguous."""
    c = case(batch=1, d=4, L=6, N=2, dtype=f64, softplus=True)
    t = make_inputs(c, seed=1)
    us = torch.randn(3, 1, 4, 6, dtype=f64)
    f = lambda u: gmamba_ext.selective_scan(u, t["delta"], t["A"], t["B"], t["C"],  # noqa: E731
                                            delta_softplus=True).square().sum()
    r = lambda u: selective_scan_ref(u, t["delta"], t["A"], t["B"], t["C"],  # noqa: E731
                                     delta_softplus=True).square().sum()
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(us), torch.func.vmap(torch.func.grad(r))(us),
                               rtol=1e-10, atol=1e-10)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_scan_and_gssm_second_order_on_cuda():
    """The reference path on CUDA tensors (float64): HVPs equal the CPU reference's."""
    c = SCAN_CASES[0]
    args = scan_args(c)
    on = [None if t is None else t.detach().cuda().requires_grad_() for t in args]
    results = []
    for fn, xs in ((lambda *a: api(c)(*a[:8], delta_softplus=True, initial_state=a[8]), on),
                   (lambda *a: selective_scan_ref(*a[:8], delta_softplus=True, initial_state=a[8]), args)):
        first = torch.autograd.grad(fn(*xs).square().sum(), xs[0], create_graph=True)[0]
        results.append(torch.autograd.grad(first.square().sum(), xs[0])[0])
    torch.testing.assert_close(results[0].cpu(), results[1], rtol=1e-9, atol=1e-10)

    cfg, p, g = make(8, d_state=2, d_conv=2)
    x = torch.randn(2, 4, 4, 8, generator=g, dtype=f64)
    hvps = []
    for device, fn in (("cuda", gssm), ("cpu", lambda x, q: gssm_ref(x, q, cfg))):
        xs = x.to(device).requires_grad_()
        q = p.replace(**{n: getattr(p, n).to(device) for n in param_fields(p)})
        (gx,) = torch.autograd.grad(fn(xs, q).square().sum(), xs, create_graph=True)
        hvps.append(torch.autograd.grad(gx.square().sum(), xs)[0].cpu())
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-10)

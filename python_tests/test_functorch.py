"""torch.func over the package's ops (gmamba_ext/functorch_rules.py): vmap against a loop over the vmapped
index, grad / jacrev / per-sample gradients against torch.autograd, in float64, for selective_scan (both
layouts, variable and constant B / C, weights vmapped or not) and gssm (whose functorch path is the Python
composition over conv_silu, fgmm and the scan)."""
import warnings

import pytest
import torch

import gmamba_ext
from gmamba_ext import gssm
from gmamba_ext.ops import HAS_EXTENSION
from gssm_helpers import make, param_fields

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")
f64 = torch.float64
V, b, d, L, N = 3, 2, 5, 19, 4  # L not a multiple of the 16-step chunk
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def scan_inputs(layout, bc="variable", lead=()):
    """Scan arguments with `lead` extra leading dims on every per-sample tensor (u, delta, z, the state, a
    variable B / C)."""
    g = torch.Generator().manual_seed(0)
    xs = (*lead, b, d, L) if layout == "cf" else (*lead, b, L, d)
    if bc == "variable":
        bcs = (*lead, b, N, L) if layout == "cf" else (*lead, b, L, N)
    else:
        bcs = (d, N)
    return dict(u=torch.randn(xs, generator=g, dtype=f64), delta=0.5 * torch.rand(xs, generator=g, dtype=f64),
                A=-torch.rand(d, N, generator=g, dtype=f64) - 0.1, B=torch.randn(bcs, generator=g, dtype=f64),
                C=torch.randn(bcs, generator=g, dtype=f64), D=torch.randn(d, generator=g, dtype=f64),
                z=torch.randn(xs, generator=g, dtype=f64), delta_bias=0.1 * torch.rand(d, generator=g, dtype=f64),
                initial_state=torch.randn(*lead, b, d, N, generator=g, dtype=f64))


def scan(layout, *tensors):
    fn = gmamba_ext.selective_scan if layout == "cf" else gmamba_ext.selective_scan_channels_last
    kw = dict(zip(NAMES, tensors))
    return fn(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"), delta_softplus=True, **kw)


def scan_calls(fn):
    """How many times the scan's forward op ran on plain tensors inside fn() (under vmap the profiler also
    records the call on batched tensors that the batching rule serves: the outer one)."""
    name = "gmamba_ext::selective_scan_fwd"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def inside_another(e):
        p = e.cpu_parent
        while p is not None and p.name != name:
            p = p.cpu_parent
        return p is not None

    return sum(1 for e in prof.events() if e.name == name and inside_another(e))


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("bc", ["variable", "constant"])
def test_scan_vmap_folds_into_the_batch(layout, bc):
    kw = scan_inputs(layout, bc, lead=(V,))
    per_sample = [k for k in NAMES if kw[k].dim() > (2 if k in ("A", "B", "C") else 1) and k != "A"]
    in_dims = tuple(0 if k in per_sample else None for k in NAMES)
    args = [kw[k] for k in NAMES]
    fn = torch.func.vmap(lambda *ts: scan(layout, *ts), in_dims=in_dims)
    got = fn(*args)
    want = torch.stack([scan(layout, *[a[i] if dim == 0 else a for a, dim in zip(args, in_dims)]) for i in range(V)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert scan_calls(lambda: fn(*args)) == 1  # one call over V * b samples, not one per index


def test_scan_vmap_over_a_weight_runs_per_index():
    kw = scan_inputs("cl")
    As = torch.stack([kw["A"] * s for s in (0.5, 1.0, 2.0)])
    fn = torch.func.vmap(lambda A: scan("cl", *[A if k == "A" else kw[k] for k in NAMES]))
    got = fn(As)
    want = torch.stack([scan("cl", *[A if k == "A" else kw[k] for k in NAMES]) for A in As])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert scan_calls(lambda: fn(As)) == V


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_scan_func_grad_matches_autograd(layout):
    kw = scan_inputs(layout)
    args = [kw[k] for k in NAMES]
    got = torch.func.grad(lambda *ts: scan(layout, *ts).square().sum(), argnums=tuple(range(len(NAMES))))(*args)
    leaves = [a.clone().requires_grad_() for a in args]
    want = torch.autograd.grad(scan(layout, *leaves).square().sum(), leaves)
    for name, x, y in zip(NAMES, got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)


def test_scan_jacrev_matches_autograd_jacobian():
    kw = scan_inputs("cf")
    kw["u"] = kw["u"][:1, :2, :6].contiguous()
    for k in ("delta", "z"):
        kw[k] = kw[k][:1, :2, :6].contiguous()
    kw.update(B=kw["B"][:1, :, :6].contiguous(), C=kw["C"][:1, :, :6].contiguous(), A=kw["A"][:2],
              D=kw["D"][:2], delta_bias=kw["delta_bias"][:2], initial_state=kw["initial_state"][:1, :2])
    rest = [kw[k] for k in NAMES[1:]]
    got = torch.func.jacrev(lambda u: scan("cf", u, *rest))(kw["u"])
    want = torch.autograd.functional.jacobian(lambda u: scan("cf", u, *rest), kw["u"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scan_forward_mode_is_refused_clearly():
    kw = scan_inputs("cl")
    args = [kw[k] for k in NAMES]
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda u: scan("cl", u, *args[1:]), (args[0],), (torch.ones_like(args[0]),))


def gssm_case():
    cfg, p, g = make(16, d_state=4)
    return cfg, p, torch.randn(V, 6, 5, 16, generator=g, dtype=f64)


def test_gssm_vmap_has_no_per_index_fallback():
    cfg, p, xs = gssm_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.func.vmap(lambda x: gssm(x[None], p)[0])(xs)
    torch.testing.assert_close(got, torch.cat([gssm(x[None], p) for x in xs]), rtol=1e-12, atol=1e-12)
    slow = [str(w.message) for w in caught if "performance drop" in str(w.message)]
    assert not slow, slow


def test_gssm_per_sample_gradients():
    """vmap(grad(...)) over samples (per-sample gradients, e.g. for DP-SGD or influence estimates) gives what
    one autograd backward per sample gives, for every parameter and x."""
    cfg, p, xs = gssm_case()
    names = param_fields(p)
    weights = {n: getattr(p, n) for n in names}

    def loss(ws, x):
        return gssm(x[None], p.replace(**ws)).square().sum()

    got_w, got_x = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0))(weights, xs)
    for i in range(V):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in weights.items()}
        x = xs[i].clone().requires_grad_()
        grads = torch.autograd.grad(loss(leaves, x), [x, *leaves.values()])
        torch.testing.assert_close(got_x[i], grads[0], rtol=1e-11, atol=1e-12)
        for n, want in zip(names, grads[1:]):
            torch.testing.assert_close(got_w[n][i], want, rtol=1e-11, atol=1e-12, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gssm_per_sample_gradients_on_cuda():
    cfg, p, xs = gssm_case()
    names = param_fields(p)
    on_cuda = p.replace(**{n: getattr(p, n).float().cuda() for n in names})

    def per_sample(params, xs):
        weights = {n: getattr(params, n) for n in names}

        def loss(ws, x):
            return gssm(x[None], params.replace(**ws)).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(weights, xs)

    got = per_sample(on_cuda, xs.float().cuda())
    want = per_sample(p, xs)  # float64 on the CPU
    for n in names:
        torch.testing.assert_close(got[n].cpu().double(), want[n], rtol=2e-3, atol=2e-3, msg=n)

"""torch.func over the package's ops (gmamba_ext/functorch_rules.py): vmap against a loop over the vmapped
index, grad / jacrev / per-sample gradients against torch.autograd, in float64, for selective_scan (both
layouts, variable and constant B / C, weights vmapped or not) and gssm (whose functorch path is the Python
composition over conv_silu, fgmm and the scan)."""
import warnings

import pytest
import torch

from conftest import DIFF_NAMES, case, make_inputs, run_op
from gmamba_ext import gssm
from gmamba_ext.ops import HAS_EXTENSION
from gssm_helpers import make, param_fields

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")
f64 = torch.float64
V = 3  # the vmapped size


def scan_case(layout, bc="variable"):
    """A float64 case with every optional scan input present (conftest's helpers), L = 19."""
    return case(dtype=f64, layout=layout, b_mode=bc, c_mode=bc, D=True, z=True, delta_bias=True, softplus=True,
                initial_state=True)


def scan_fn(c):
    """The public scan of case c as a function of its inputs in DIFF_NAMES order."""
    return lambda *ts: run_op(c, dict(zip(DIFF_NAMES, ts)))[0]


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
    c = scan_case(layout, bc)
    draws = [make_inputs(c, seed=i) for i in range(V)]
    # per-sample inputs vmapped (V independent draws stacked), the weights shared (the first draw's)
    in_dims = tuple(0 if k in ("u", "delta", "z", "initial_state") or (k in ("B", "C") and bc == "variable") else None
                    for k in DIFF_NAMES)
    args = [torch.stack([t[k] for t in draws]) if dim == 0 else draws[0][k] for k, dim in zip(DIFF_NAMES, in_dims)]
    fn = torch.func.vmap(scan_fn(c), in_dims=in_dims)
    got = fn(*args)
    want = torch.stack([scan_fn(c)(*[a[i] if dim == 0 else a for a, dim in zip(args, in_dims)]) for i in range(V)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert scan_calls(lambda: fn(*args)) == 1  # one call over V * batch samples, not one per index


def test_scan_vmap_over_a_weight_runs_per_index():
    c = scan_case("cl")
    t = make_inputs(c)
    As = torch.stack([t["A"] * s for s in (0.5, 1.0, 2.0)])
    fn = torch.func.vmap(lambda A: scan_fn(c)(*[A if k == "A" else t[k] for k in DIFF_NAMES]))
    got = fn(As)
    want = torch.stack([scan_fn(c)(*[A if k == "A" else t[k] for k in DIFF_NAMES]) for A in As])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert scan_calls(lambda: fn(As)) == V


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_scan_func_grad_matches_autograd(layout):
    c = scan_case(layout)
    args = [make_inputs(c)[k] for k in DIFF_NAMES]
    loss = lambda *ts: scan_fn(c)(*ts).square().sum()  # noqa: E731
    got = torch.func.grad(loss, argnums=tuple(range(len(DIFF_NAMES))))(*args)
    leaves = [a.clone().requires_grad_() for a in args]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for name, x, y in zip(DIFF_NAMES, got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)


def test_scan_jacrev_matches_autograd_jacobian():
    c = case(dtype=f64, batch=1, d=2, L=6, N=3, D=True, z=True, delta_bias=True, softplus=True,
             initial_state=True)
    t = make_inputs(c)
    rest = [t[k] for k in DIFF_NAMES[1:]]
    fn = lambda u: scan_fn(c)(u, *rest)  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(fn)(t["u"]), torch.autograd.functional.jacobian(fn, t["u"]),
                               rtol=1e-12, atol=1e-12)


def test_scan_forward_mode_is_refused_clearly():
    c = scan_case("cl")
    args = [make_inputs(c)[k] for k in DIFF_NAMES]
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda u: scan_fn(c)(u, *args[1:]), (args[0],), (torch.ones_like(args[0]),))


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


@pytest.mark.parametrize("form", ["tokens with H = C", "channels_last map"])
def test_gssm_vmap_and_jacrev_with_layout_detection(form):
    """Telling the layout apart asked x.is_contiguous(memory_format=channels_last), which raises NYI inside
    vmap (and jacrev): every (B, H, W, C) input with H = C and every channels_last map failed there."""
    cfg, p, g = make(8, d_state=2)
    if form == "channels_last map":
        xs = torch.randn(V, 1, 4, 5, 8, generator=g, dtype=f64).permute(0, 1, 4, 2, 3)  # samples (1, 8, 4, 5)
    else:
        xs = torch.randn(V, 1, 8, 5, 8, generator=g, dtype=f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tokens with H = C fit both layouts: gssm warns, and reads tokens
        got = torch.func.vmap(lambda x: gssm(x, p))(xs)
        want = torch.stack([gssm(x, p) for x in xs])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        jac = torch.func.jacrev(lambda x: gssm(x, p).sum())(xs[0])
        x0 = xs[0].clone().requires_grad_()
        gssm(x0, p).sum().backward()
    torch.testing.assert_close(jac, x0.grad, rtol=1e-12, atol=1e-12)


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


def test_block_per_sample_gradients_through_functional_call():
    """The DP-SGD pattern on a module: vmap(grad(functional_call(...))) over samples."""
    from torch.func import functional_call

    from gmamba_ext.nn import GMambaBlock

    torch.manual_seed(0)
    block = GMambaBlock(16).double()
    params = {k: v.detach() for k, v in block.named_parameters()}
    xs = torch.randn(V, 16, 6, 5, dtype=f64)

    def loss(p, x):
        return functional_call(block, p, (x[None],)).square().sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(V):
        block.zero_grad()
        loss(dict(block.named_parameters()), xs[i]).backward()
        for k, v in block.named_parameters():
            torch.testing.assert_close(got[k][i], v.grad, rtol=1e-11, atol=1e-13, msg=k)


@pytest.mark.parametrize("H,W,variant,retain", [
    (6, 5, "full", True), (6, 5, "full", False),  # an empty low-pass: Pl's parameters get zeros
    (8, 8, "full", True), (8, 8, "full", False), (8, 8, "ssm", True), (8, 8, "dft_fgmm_ssm", True)])
def test_eager_gssm_batched_backward(H, W, variant, retain):
    """torch.autograd.grad(..., is_grads_batched=True) through an eager (C++ orchestration) gssm call: its
    backward differentiates the Python composition for the batch of output gradients, and gives what one
    backward per output gradient gives (None for the parameters the variant does not use)."""
    cfg, p, g = make(16, d_state=4, directions="bi", variant=variant)
    names = param_fields(p)
    x = torch.randn(2, H, W, 16, generator=g, dtype=f64).requires_grad_()
    ws = [getattr(p, n).clone().requires_grad_() for n in names]
    state = torch.randn(2, cfg.d, cfg.d_state, generator=g, dtype=f64).requires_grad_()
    inputs = [x, state, *ws]

    def forward():
        return gssm(x, p.replace(**dict(zip(names, ws))), directions="bi", initial_state=[state, None],
                    variant=variant)

    vs = torch.randn(V, 2, H, W, 16, generator=g, dtype=f64)
    got = torch.autograd.grad(forward(), inputs, vs, is_grads_batched=True, retain_graph=retain, allow_unused=True)
    out = forward()
    for i in range(V):
        want = torch.autograd.grad(out, inputs, vs[i], retain_graph=True, allow_unused=True)
        for name, a, b in zip(["x", "state", *names], got, want):
            assert (a is None) == (b is None), name
            if b is not None:
                torch.testing.assert_close(a[i], b, rtol=1e-11, atol=1e-13, msg=name)


def test_eager_gssm_vectorized_jacobian():
    cfg, p, g = make(16, d_state=4)
    x = torch.randn(1, 4, 4, 16, generator=g, dtype=f64)
    fn = lambda x: gssm(x, p)  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.jacobian(fn, x, vectorize=True),
                               torch.autograd.functional.jacobian(fn, x), rtol=1e-12, atol=1e-14)


def test_block_ensemble_through_stack_module_state():
    """Model ensembling: vmap over stacked parameters (every op's weights vmapped: the per-index rules)."""
    import copy

    from torch.func import functional_call, stack_module_state

    from gmamba_ext.nn import GMambaBlock

    torch.manual_seed(0)
    blocks = [GMambaBlock(16).double() for _ in range(V)]
    params, buffers = stack_module_state(blocks)
    base = copy.deepcopy(blocks[0]).to("meta")
    x = torch.randn(2, 16, 6, 5, dtype=f64)
    got = torch.func.vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(got, torch.stack([block(x) for block in blocks]), rtol=1e-12, atol=1e-12)


def test_gradcheck_with_batched_grads():
    """gradcheck's check_batched_grad (a batched backward against a loop) on eager gssm and the scan."""
    cfg, p, g = make(8, d_state=3)
    x = torch.randn(1, 4, 6, 8, generator=g, dtype=f64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gssm(x, p), (x,), check_batched_grad=True)
    c = case(dtype=f64, batch=1, L=7, D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
    t = make_inputs(c)
    rest = [t[k] for k in DIFF_NAMES[1:]]
    u = t["u"].requires_grad_()
    assert torch.autograd.gradcheck(lambda u: scan_fn(c)(u, *rest), (u,), check_batched_grad=True)

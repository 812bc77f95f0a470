"""The C++ orchestration of gssm (ops gssm_fwd / gssm_bwd with a hand-written backward) against the Python
composition of the same kernels (gssm_composition, itself checked against gssm_ref in test_gssm.py): outputs
and every gradient in float64 over variants, masks, directions, initial states and layouts; opcheck of both
raw ops; the routes that must fall back to the composition (functorch, composition_only); autocast around
the backward; inference without saving; errors of the raw ops; both GMAMBA_GSSM_SAVE policies (keep or
recompute xz, x1, z1 and relu(pre)) on the CPU, so the branch CUDA takes by default is tested without a GPU."""
import itertools

import pytest
import torch

from gmamba_ext.gssm import composition_only, gssm, gssm_composition
from gmamba_ext.gssm_fused import _param_keys, keeps_intermediates
from gmamba_ext.ops import HAS_EXTENSION
from gssm_helpers import cast, make, param_fields

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")
f64 = torch.float64


def inputs(cfg, B, H, W, g, dtype=f64):
    return torch.randn(B, H, W, cfg.d_model, generator=g, dtype=f64).to(dtype)


def outputs_and_grads(fn, x, p, states, dout, **options):
    names = param_fields(p)
    xs = x.clone().requires_grad_()
    ts = [getattr(p, n).clone().requires_grad_() for n in names]
    ss = [None if s is None else s.clone().requires_grad_() for s in states]
    out = fn(xs, p.replace(**dict(zip(names, ts))), initial_state=ss if len(ss) > 1 else ss[0], **options)
    out.backward(dout)
    leaves = [xs] + ts + [s for s in ss if s is not None]
    return out.detach(), [t.grad for t in leaves]


def assert_grads_close(got, want, tol=1e-10, scaled=False):
    """Gradients against the composition's. A parameter the variant does not use has None there and None
    or zeros here; scaled: atol relative to the tensor's largest value (low precision)."""
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item() + 1e-12 if scaled else tol)


def grad_fn_names(t):
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("variant,mask,directions",
                         [(v, m, d) for v, m, d in itertools.product(("full", "ssm", "fem_ssm", "dft_fgmm_ssm"),
                                                                     ("corner", "symmetric"), ("uni", "bi", "four"))
                          if m == "corner" or d == "bi"])
def test_matches_composition_float64(variant, mask, directions):
    cfg, p, g = make(16, variant=variant, mask=mask, directions=directions, d_state=5)
    n = cfg.n_directions
    options = dict(variant=variant, mask=mask, directions=directions)
    for B, H, W in ((2, 9, 12), (1, 3, 5)):  # with and without a low-pass
        x = inputs(cfg, B, H, W, g)
        states = [torch.randn(B, cfg.d, cfg.d_state, generator=g, dtype=f64) if k % 2 == 0 else None
                  for k in range(n)]
        dout = torch.randn(B, H, W, cfg.d_model, generator=g, dtype=f64)
        got_out, got = outputs_and_grads(gssm, x, p, states, dout, **options)
        want_out, want = outputs_and_grads(gssm_composition, x, p, states, dout, **options)
        torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
        assert_grads_close(got, want)


@pytest.mark.parametrize("B,H,W", [(0, 8, 8), (1, 1, 1), (2, 1, 9), (1, 7, 7), (1, 37, 53)])
def test_edge_sizes_match_composition(B, H, W):
    """Empty batch, L = 1, one row, odd sizes: outputs and every gradient (a B = 0 call still returns
    zero-filled parameter gradients of the right shapes)."""
    cfg, p, g = make(8, directions="bi", d_state=3)
    x = inputs(cfg, B, H, W, g)
    dout = torch.randn(B, H, W, 8, generator=g, dtype=f64)
    options = dict(directions="bi", layout="bhwc")  # (0, 8, 8, 8) fits both layouts
    got_out, got = outputs_and_grads(gssm, x, p, [None, None], dout, **options)
    want_out, want = outputs_and_grads(gssm_composition, x, p, [None, None], dout, **options)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    assert_grads_close(got, want)


def test_eager_call_runs_the_cpp_orchestration():
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 2, 8, 8, g).requires_grad_()
    assert "_GSSMFunctionBackward" in grad_fn_names(gssm(x, p))
    assert "_GSSMFunctionBackward" not in grad_fn_names(gssm_composition(x, p))
    with composition_only():
        assert "_GSSMFunctionBackward" not in grad_fn_names(gssm(x, p))
    with torch.no_grad():  # inference: the op without saving anything (float64; the fusion layer's low-pass
        # product runs on Fourier coefficients in C++, on tokens in the composition: rounding differs)
        torch.testing.assert_close(gssm(x, p), gssm_composition(x, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("single_dt_bias", [False, True])
def test_bchw_layout_and_single_dt_bias(single_dt_bias):
    cfg, p, g = make(16, d_state=4, single_dt_bias=single_dt_bias)
    x = inputs(cfg, 2, 8, 12, g).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    dout = torch.randn(2, 16, 8, 12, generator=g, dtype=f64)
    got_out, got = outputs_and_grads(gssm, x, p, [None], dout, single_dt_bias=single_dt_bias)
    want_out, want = outputs_and_grads(gssm_composition, x, p, [None], dout, single_dt_bias=single_dt_bias)
    assert got_out.shape == (2, 16, 8, 12)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_float32_and_bfloat16_match_composition():
    cfg, p, g = make(32, d_state=8, directions="bi")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q = cast(p, dtype)
        x = inputs(cfg, 2, 12, 10, g, dtype)
        dout = torch.randn(2, 12, 10, 32, generator=g).to(dtype)
        got_out, got = outputs_and_grads(gssm, x, q, [None, None], dout, directions="bi")
        want_out, want = outputs_and_grads(gssm_composition, x, q, [None, None], dout, directions="bi")
        torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
        for a, b in zip(got, want):
            scale = b.abs().max().item()
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale + 1e-6)


def test_backward_under_autocast_keeps_its_dtypes():
    """A backward run inside an autocast region must not have its GEMMs recast (the op excludes autocast)."""
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 2, 8, 8, g, torch.float32)
    p32 = cast(p, torch.float32)
    names = param_fields(p32)

    def grads(inside_autocast):
        ts = [getattr(p32, n).clone().requires_grad_() for n in names]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gssm(x, p32.replace(**dict(zip(names, ts))))
            if inside_autocast:
                out.float().square().sum().backward()
        if not inside_autocast:
            out.float().square().sum().backward()
        return [t.grad for t in ts]

    for a, b in zip(grads(True), grads(False)):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


def test_functorch_vmap_uses_the_composition():
    cfg, p, g = make(16, d_state=4)
    xs = inputs(cfg, 3, 8, 8, g)
    batched = torch.func.vmap(lambda x: gssm(x[None], p)[0])(xs)
    torch.testing.assert_close(batched, torch.cat([gssm(x[None], p) for x in xs]), rtol=1e-12, atol=1e-12)


def test_config_cache_keeps_option_checks():
    """gssm caches its configs per size and option tuple: an option of the wrong type must still be refused
    after a call with an equal value of the right type (1 == True)."""
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 1, 8, 8, g)
    gssm(x, p, single_dt_bias=True)
    with pytest.raises(ValueError, match="single_dt_bias must be a bool"):
        gssm(x, p, single_dt_bias=1)


def raw_args(variant="full", directions="uni", H=8, W=8, B=2, dtype=f64, states=False):
    cfg, p, g = make(16, variant=variant, directions=directions, d_state=4)
    params = [p[k].to(dtype) for k in _param_keys(cfg.n_directions)]
    init = [torch.randn(B, cfg.d, cfg.d_state, generator=g, dtype=f64) if states and k == 0 else None
            for k in range(cfg.n_directions)]
    return inputs(cfg, B, H, W, g, dtype), params, init, (H, W, variant, "corner", False)


def opcheck_all(x, params, init, options):
    """opcheck of gssm_fwd (with and without saving) and of both backward ops on its outputs."""
    torch.library.opcheck(torch.ops.gmamba_ext.gssm_fwd.default, (x, params, init, *options, False))
    torch.library.opcheck(torch.ops.gmamba_ext.gssm_fwd.default, (x, params, init, *options, True))
    out, front, scan = torch.ops.gmamba_ext.gssm_fwd(x, params, init, *options, True)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.gmamba_ext.gssm_bwd_scan.default, (dout, x, params, init, scan, *options))
    dx2 = torch.ops.gmamba_ext.gssm_bwd_scan(dout, x, params, init, scan, *options)[0]
    torch.library.opcheck(torch.ops.gmamba_ext.gssm_bwd_front.default, (dout, dx2, x, params, front, *options))


@pytest.mark.parametrize("variant,directions,H", [("full", "uni", 8), ("full", "bi", 3), ("ssm", "uni", 8),
                                                  ("fem_ssm", "uni", 8), ("dft_fgmm_ssm", "bi", 8)])
def test_opcheck(variant, directions, H):
    opcheck_all(*raw_args(variant, directions, H=H, states=True))


@pytest.mark.parametrize("policy", ["keep", "recompute"])
@pytest.mark.parametrize("variant,directions", [("full", "bi"), ("ssm", "uni"), ("fem_ssm", "uni"),
                                                ("dft_fgmm_ssm", "uni")])
def test_consume_frees_what_was_read_and_changes_no_result(variant, directions, policy, monkeypatch):
    # consume=True (what a backward without a retained graph passes) frees each saved tensor once read; the
    # gradients are bitwise those of consume=False, which leaves the lists as they were.
    monkeypatch.setenv("GMAMBA_GSSM_SAVE", policy)
    x, params, init, options = raw_args(variant, directions, states=True)
    out, front, scan = torch.ops.gmamba_ext.gssm_fwd(x, params, init, *options, True)
    dout = torch.randn_like(out)
    copies = [[t.clone() for t in front], [t.clone() for t in scan]]
    results = {}
    for consume, (f, s) in ((False, (front, scan)), (True, copies)):
        dx2, g_scan, d_init = torch.ops.gmamba_ext.gssm_bwd_scan(dout, x, params, init, s, *options, consume)
        dx, g_front = torch.ops.gmamba_ext.gssm_bwd_front(dout, dx2, x, params, f, *options, consume)
        results[consume] = [dx, *g_front, *g_scan, *d_init]
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)
    keep = policy == "keep"  # xz (front[0]) is saved only then
    assert all(t.numel() > 0 for t in [front[0]] * keep + scan[:2])  # not consumed: xz, x2, y intact
    freed = [copies[0][0]] * keep + [copies[1][1]] + copies[1][4::2]  # xz, y, every direction's checkpoints
    if variant != "ssm":
        freed.append(copies[0][2])  # Fm
    assert all(t.numel() == 0 for t in freed)


def test_raw_op_errors():
    x, params, init, options = raw_args()
    with pytest.raises(ValueError, match="expected 34, 39 or 49 parameters"):
        torch.ops.gmamba_ext.gssm_fwd(x, params[:-1], init, *options, False)
    with pytest.raises(ValueError, match="expected 1 initial states"):
        torch.ops.gmamba_ext.gssm_fwd(x, params, init + [None], *options, False)
    with pytest.raises(ValueError, match="variant must be"):
        torch.ops.gmamba_ext.gssm_fwd(x, params, init, 8, 8, "nope", "corner", False, False)
    with pytest.raises(ValueError, match="mask must be"):
        torch.ops.gmamba_ext.gssm_fwd(x, params, init, 8, 8, "full", "nope", False, False)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, C\)"):
        torch.ops.gmamba_ext.gssm_fwd(x, params, init, 4, 16, "full", "corner", False, False)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, C\)"):
        torch.ops.gmamba_ext.gssm_fwd(x[..., :8], params, init, *options, False)
    out, front, scan = torch.ops.gmamba_ext.gssm_fwd(x, params, init, *options, True)
    with pytest.raises(ValueError, match="'saved' and 'initial_states' must be"):
        torch.ops.gmamba_ext.gssm_bwd_scan(out, x, params, init, scan[:-1], *options)
    with pytest.raises(ValueError, match="'saved' must be the front list"):
        torch.ops.gmamba_ext.gssm_bwd_front(out, x[..., :8].reshape(out.shape[0], -1, 8), x, params, front[:-1],
                                            *options)


# GMAMBA_GSSM_SAVE: by default the CPU keeps xz, x1, z1 and relu(pre) for the backward and CUDA recomputes them.
# Both branches run on the CPU here, so the recompute branch is tested without a GPU.
@pytest.mark.parametrize("variant,directions", [("full", "uni"), ("full", "bi"), ("ssm", "uni"),
                                                ("fem_ssm", "bi"), ("dft_fgmm_ssm", "uni")])
def test_save_policies_match_composition(variant, directions, monkeypatch):
    cfg, p, g = make(16, variant=variant, directions=directions, d_state=5)
    options = dict(variant=variant, directions=directions)
    x = inputs(cfg, 2, 9, 12, g)
    states = [torch.randn(2, cfg.d, cfg.d_state, generator=g, dtype=f64)] + [None] * (cfg.n_directions - 1)
    dout = torch.randn(2, 9, 12, cfg.d_model, generator=g, dtype=f64)
    want_out, want = outputs_and_grads(gssm_composition, x, p, states, dout, **options)
    for policy in ("keep", "recompute"):
        monkeypatch.setenv("GMAMBA_GSSM_SAVE", policy)
        got_out, got = outputs_and_grads(gssm, x, p, states, dout, **options)
        torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
        assert_grads_close(got, want)


def saved_values(lists):
    return sum(t.numel() for t in itertools.chain(*lists))


@pytest.mark.parametrize("variant", ["full", "ssm", "fem_ssm", "dft_fgmm_ssm"])
def test_recompute_saves_xz_x1_z1_and_relu_less(variant, monkeypatch):
    x, params, init, options = raw_args(variant)
    B, H, W, _ = x.shape
    d = params[1].shape[0]
    sizes = {}
    for policy in ("keep", "recompute", "auto"):
        monkeypatch.setenv("GMAMBA_GSSM_SAVE", policy)
        sizes[policy] = saved_values(torch.ops.gmamba_ext.gssm_fwd(x, params, init, *options, True)[1:])
    # xz (B L x 2d) and z1 always, x1 only with a frequency stage, relu(pre) (B L x 2d) only with the fusion layer
    fem, fusion = variant != "ssm", variant in ("full", "fem_ssm")
    assert sizes["keep"] - sizes["recompute"] == B * H * W * d * (3 + fem + 2 * fusion)
    assert sizes["auto"] == sizes["keep"]  # on the CPU


def assert_variable_may_change_before_the_backward(monkeypatch, name, values, H=8, W=8):
    """x's gradient is the composition's when the environment variable `name` takes one value for gssm's
    forward and the other for its backward, both ways round."""
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 2, H, W, g)
    dout = torch.randn(2, H, W, cfg.d_model, generator=g, dtype=f64)
    want = outputs_and_grads(gssm_composition, x, p, [None], dout)[1]
    for forward, backward in (values, values[::-1]):
        monkeypatch.setenv(name, forward)
        xs = x.clone().requires_grad_()
        out = gssm(xs, p)
        monkeypatch.setenv(name, backward)
        out.backward(dout)
        torch.testing.assert_close(xs.grad, want[0], rtol=1e-10, atol=1e-10)


def test_backward_follows_what_the_forward_kept(monkeypatch):
    assert_variable_may_change_before_the_backward(monkeypatch, "GMAMBA_GSSM_SAVE", ("keep", "recompute"))


@pytest.mark.parametrize("policy", ["keep", "recompute"])
def test_opcheck_under_each_save_policy(policy, monkeypatch):
    monkeypatch.setenv("GMAMBA_GSSM_SAVE", policy)  # the fake kernel must follow it too
    opcheck_all(*raw_args("full", "bi", states=True))


def test_bad_save_policy_is_refused(monkeypatch):
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 1, 8, 8, g).requires_grad_()
    monkeypatch.setenv("GMAMBA_GSSM_SAVE", "sometimes")
    with pytest.raises(ValueError, match="GMAMBA_GSSM_SAVE must be 'auto', 'keep' or 'recompute'"):
        gssm(x, p)
    with pytest.raises(ValueError, match="GMAMBA_GSSM_SAVE must be"):
        keeps_intermediates(x.device)
    with torch.no_grad(), pytest.raises(ValueError, match="GMAMBA_GSSM_SAVE must be"):  # saving nothing too
        gssm(x, p)


def test_second_backward_needs_retain_graph():
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 1, 8, 8, g).requires_grad_()
    out = gssm(x, p).square().sum()
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()  # the graph was kept: a second backward works and doubles the gradient
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("variant,directions", [("full", "bi"), ("ssm", "uni"), ("fem_ssm", "four"),
                                                ("dft_fgmm_ssm", "uni")])
@pytest.mark.parametrize("policy", ["auto", "keep"])  # CUDA recomputes x1, z1, relu(pre) unless told to keep
def test_cuda_matches_composition(variant, directions, policy, monkeypatch):
    monkeypatch.setenv("GMAMBA_GSSM_SAVE", policy)
    cfg, p, g = make(32, variant=variant, directions=directions, d_state=8)
    n = cfg.n_directions
    for dtype, tol in ((f64, 1e-10), (torch.float32, 1e-4)):
        q = cast(p, dtype, "cuda")
        x = inputs(cfg, 2, 13, 9, g, dtype).cuda()
        states = [torch.randn(2, cfg.d, 8, generator=g, dtype=f64).to(dtype).cuda() if k == 0 else None
                  for k in range(n)]
        dout = torch.randn(2, 13, 9, 32, generator=g, dtype=f64).to(dtype).cuda()
        got_out, got = outputs_and_grads(gssm, x, q, states, dout, variant=variant, directions=directions)
        want_out, want = outputs_and_grads(gssm_composition, x, q, states, dout, variant=variant,
                                           directions=directions)
        torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
        assert_grads_close(got, want, tol, scaled=True)


@needs_cuda
def test_cuda_opcheck():
    x, params, init, options = raw_args("full", "bi", states=True)
    opcheck_all(x.cuda(), [t.cuda() for t in params], [None if s is None else s.cuda() for s in init], options)


def test_fake_kernels_are_registered():
    """gssm_fused registers its fake kernels only for ops that exist: imported (through flop_counts, from
    gmamba_ext/__init__) before the extension had loaded, it registered none, and FakeTensor ran the C++ op
    on meta tensors, which saved nothing (opcheck failed)."""
    from torch._library.simple_registry import singleton
    for op in ("gssm_fwd", "gssm_bwd_scan", "gssm_bwd_front", "selective_scan_fwd", "conv_silu_fwd", "fgmm_fwd"):
        assert singleton.find("gmamba_ext::" + op).fake_impl.kernel is not None, op

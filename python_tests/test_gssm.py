"""gmamba_ext.gssm (the fused GSSM mixer) against the plain-PyTorch oracle gssm_ref (itself checked against
hand computations in test_gssm_reference.py): every variant, mask and scan direction, odd and degenerate
sizes, both layouts, float64 / float32 / bfloat16, initial states, state_dict input, autocast, float64
gradcheck of x and every parameter, torch.compile and determinism."""
import itertools
import subprocess
import sys
import warnings

import pytest
import torch

import gmamba_ext
from gmamba_ext import gssm
from gmamba_ext.gssm_reference import gssm_ref
from gmamba_ext.nn import GMambaBlock
from gssm_helpers import assert_bitwise_reproducible, cast, grads_of, make, param_fields

f64 = torch.float64
VARIANTS = ("full", "ssm", "fem_ssm", "dft_fgmm_ssm")
MASKS = ("corner", "symmetric")
DIRECTIONS = ("uni", "bi", "four")


def options(cfg):
    return dict(variant=cfg.variant, mask=cfg.mask, directions=cfg.directions, single_dt_bias=cfg.single_dt_bias)


def x_for(cfg, B, H, W, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, W, cfg.d_model, generator=g, dtype=f64).to(dtype)


@pytest.mark.parametrize("variant,mask,directions", list(itertools.product(VARIANTS, MASKS, DIRECTIONS)))
def test_matches_reference_float64(variant, mask, directions):
    cfg, p, _ = make(16, variant=variant, mask=mask, directions=directions, d_state=5)
    for H, W in ((8, 8), (9, 12), (13, 7)):
        x = x_for(cfg, 2, H, W)
        torch.testing.assert_close(gssm(x, p, **options(cfg)), gssm_ref(x, p, cfg), rtol=1e-10, atol=1e-10)


# H or W < 4 (empty low-pass), H != W, odd sizes, L = 1, batch 1, the smallest d (d // 4 = 1).
EDGE = [(1, 1, 1, 8), (2, 3, 2, 8), (1, 3, 8, 8), (2, 8, 3, 8), (1, 1, 9, 8), (1, 7, 7, 8), (1, 37, 53, 8),
        (2, 4, 6, 16), (1, 5, 4, 16)]


@pytest.mark.parametrize("B,H,W,C", EDGE, ids=[f"{b}x{h}x{w}x{c}" for b, h, w, c in EDGE])
@pytest.mark.parametrize("variant", VARIANTS)
def test_edge_sizes(B, H, W, C, variant):
    cfg, p, _ = make(C, variant=variant, mask="symmetric" if H % 2 else "corner", d_conv=4)
    x = x_for(cfg, B, H, W)
    torch.testing.assert_close(gssm(x, p, **options(cfg), layout="bhwc"), gssm_ref(x, p, cfg, layout="bhwc"),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_close_to_float64(variant):
    cfg, p, _ = make(32, variant=variant, d_state=8, directions="bi")
    x = x_for(cfg, 2, 16, 12)
    want = gssm_ref(x, p, cfg)
    got = gssm(x.float(), cast(p, torch.float32), **options(cfg))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_bfloat16_inputs_and_params():
    cfg, p, _ = make(32, d_state=8)
    x = x_for(cfg, 2, 16, 16, dtype=torch.bfloat16)
    want = gssm_ref(x.double(), cast(cast(p, torch.bfloat16), f64), cfg)
    got = gssm(x, cast(p, torch.bfloat16))
    assert got.dtype == torch.bfloat16
    # bf16 rounds every intermediate (8 bits): a loose but meaningful bound, relative to the output scale
    err = (got.double() - want).abs().max().item()
    assert err < 0.05 * want.abs().max().item(), err


def test_autocast_bfloat16_cpu():
    cfg, p, _ = make(32, d_state=8)
    x = x_for(cfg, 2, 12, 12, dtype=torch.float32)
    p32 = cast(p, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gssm(x, p32)
    assert got.dtype == torch.bfloat16
    want = gssm_ref(x.double(), p, cfg)
    assert (got.double() - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_autocast_leaves_float64_alone():
    """As autocast's own ops do (nn.Linear stays float64 under it): a float64 input is not cast."""
    cfg, p, _ = make(16, d_state=4)
    x = x_for(cfg, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gssm(x, p)
    assert got.dtype == f64
    torch.testing.assert_close(got, gssm_ref(x, p, cfg), rtol=1e-10, atol=1e-10)


def test_meta_tensors_give_shapes():
    """Shape inference / FLOP counting on the meta device (there is no autocast to ask about there)."""
    cfg, p, _ = make(16, d_state=4)
    x = x_for(cfg, 2, 6, 5).to("meta")
    out = gssm(x, cast(p, device="meta"))
    assert out.device.type == "meta" and out.shape == x.shape


def test_a_shape_that_fits_both_layouts_warns_unless_layout_is_given():
    """A contiguous (B, C, H, W) map with W = C reads as (B, H, W, C) tokens: no error, wrong numbers. So a
    call whose shape fits both readings warns; layout= says which (the modules pass it)."""
    cfg, p, _ = make(16)
    x = torch.randn(2, 16, 6, 16, dtype=f64)
    with pytest.warns(UserWarning, match=r"fits both \(B, H, W, C\) and \(B, C, H, W\)"):
        got = gssm(x, p)
    torch.testing.assert_close(got, gssm_ref(x, p, cfg, layout="bhwc"), rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gssm(x, p, layout="bhwc")
        bchw = gssm(x, p, layout="bchw")
        torch.testing.assert_close(bchw.permute(0, 2, 3, 1), gssm_ref(x.permute(0, 2, 3, 1), p, cfg),
                                   rtol=1e-10, atol=1e-10)
        gssm(x.contiguous(memory_format=torch.channels_last), p)  # unambiguous: (B, C, H, W)
        block = GMambaBlock(16, d_state=4).double()
        block(torch.randn(1, 16, 16, 16, dtype=f64))  # H = W = C inside the block: it passes the layout


def test_a_plain_bchw_map_is_told_how_to_pass_it():
    cfg, p, _ = make(16)
    x = torch.randn(2, 16, 6, 10, dtype=f64)
    with pytest.raises(ValueError, match=r"looks like a \(B, C, H, W\) map.*channels_last.*layout='bchw'"):
        gssm(x, p)


def test_channels_last_bchw_layout():
    cfg, p, _ = make(16)
    x = x_for(cfg, 2, 6, 10)  # (B, H, W, C)
    x_bchw = x.permute(0, 3, 1, 2)  # (B, C, H, W), channels_last memory: the same storage
    assert x_bchw.is_contiguous(memory_format=torch.channels_last)
    out = gssm(x_bchw, p)
    assert out.shape == (2, 16, 6, 10) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.permute(0, 2, 3, 1), gssm_ref(x, p, cfg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("directions", DIRECTIONS)
def test_initial_state(directions):
    cfg, p, g = make(16, directions=directions)
    x = x_for(cfg, 2, 5, 6)
    n = cfg.n_directions
    states = [torch.randn(2, cfg.d, cfg.d_state, generator=g, dtype=f64) for _ in range(n)]
    arg = states[0] if n == 1 else states
    torch.testing.assert_close(gssm(x, p, directions=directions, initial_state=arg),
                               gssm_ref(x, p, cfg, initial_state=states), rtol=1e-10, atol=1e-10)


def test_single_dt_bias():
    cfg, p, _ = make(16, single_dt_bias=True)
    x = x_for(cfg, 1, 6, 6)
    torch.testing.assert_close(gssm(x, p, single_dt_bias=True), gssm_ref(x, p, cfg), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(gssm(x, p), gssm(x, p, single_dt_bias=True))


def test_state_dict_with_prefix():
    cfg, p, _ = make(16, directions="bi")
    sd = {"backbone.layers.0.mixer." + k: v for k, v in p.to_state_dict().items()}
    sd["backbone.stem.weight"] = torch.zeros(3)
    x = x_for(cfg, 1, 8, 8)
    torch.testing.assert_close(gssm(x, sd, directions="bi"), gssm_ref(x, p, cfg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant,mask,directions", [("full", "corner", "bi"), ("full", "symmetric", "four"),
                                                     ("ssm", "corner", "uni"), ("fem_ssm", "symmetric", "uni"),
                                                     ("dft_fgmm_ssm", "corner", "uni")])
def test_gradcheck_x_and_every_parameter(variant, mask, directions):
    cfg, p, _ = make(8, variant=variant, mask=mask, directions=directions, d_state=3)
    x = x_for(cfg, 2, 4, 5).requires_grad_()
    names = param_fields(p)
    tensors = [getattr(p, n).detach().clone().requires_grad_() for n in names]

    def fn(x, *ts):
        return gssm(x, p.replace(**dict(zip(names, ts))), **options(cfg))

    assert torch.autograd.gradcheck(fn, (x, *tensors), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradients_match_reference_float32():
    """float32 gradients of x and every parameter against float64 autograd through the oracle."""
    cfg, p, g = make(32, directions="bi", d_state=8)
    x = x_for(cfg, 2, 12, 10)
    dout = torch.randn(2, 12, 10, 32, generator=g, dtype=f64)
    names, got = grads_of(lambda x, q: gssm(x, q, directions="bi"), x, p, dout, torch.float32)
    _, want = grads_of(lambda x, q: gssm_ref(x, q, cfg), x, p, dout, f64)
    for name, a, b in zip(names, got, want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=lambda m: f"{name}: {m}")


def test_deterministic_forward_and_backward():
    cfg, p, g = make(32, d_state=8, directions="four")
    p32 = cast(p, torch.float32)
    x = x_for(cfg, 2, 16, 16, dtype=torch.float32)
    assert_bitwise_reproducible(x, p32, "in_proj.weight", directions="four")


def test_compile_fullgraph():
    cfg, p, _ = make(16, directions="bi")
    p32 = cast(p, torch.float32)
    x = x_for(cfg, 2, 8, 8, dtype=torch.float32).requires_grad_()
    fn = torch.compile(lambda x: gssm(x, p32, directions="bi"), fullgraph=True, backend="aot_eager")
    out = fn(x)
    torch.testing.assert_close(out, gssm(x, p32, directions="bi"))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compile_fullgraph_as_the_first_call_in_a_process():
    """GSSMParams.to_state_dict filled a field table lazily with dataclasses.fields, which dynamo cannot
    trace: compiling gssm failed unless an eager call or a module had filled it first (the README's flow)."""
    code = ("import torch, gmamba_ext\n"
            "from gmamba_ext import GSSMConfig, GSSMParams\n"
            "p = GSSMParams.init(GSSMConfig(d_model=8, d_state=2, d_conv=3, expand=1))\n"
            "x = torch.randn(1, 4, 5, 8)\n"
            "f = torch.compile(lambda t: gmamba_ext.gssm(t, p), fullgraph=True, backend='eager')\n"
            "torch.testing.assert_close(f(x), gmamba_ext.gssm(x, p))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_state_dict_error_lists_every_key_when_sizes_cannot_be_read():
    """A state_dict missing one of the keys the sizes come from named only that key; the README promises
    the missing and unexpected keys in the error."""
    cfg, p, _ = make(8)
    sd = {"module." + k: v for k, v in p.to_state_dict().items()}
    for key in ("module.A_log", "module.D"):
        del sd[key]
    sd["module.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'A_log' must be.*missing keys: \['A_log', 'D'\]; unexpected keys: "
                                         r"\['extra'\]"):
        gssm(x_for(cfg, 1, 4, 4), sd)


def test_reference_reachable_as_gmamba_ext_reference():
    assert gmamba_ext.reference.gssm_ref is gssm_ref

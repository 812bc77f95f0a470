"""FEM's low-pass in gssm's C++ orchestration (csrc/ops/fem_lowpass.cpp): the backward keeps the mask's kept
Fourier coefficients of x1 instead of low; in the DFT form (GMAMBA_GSSM_LOWPASS=dft, the CPU's default: DFT
matrices and GEMMs) with float32 / float64 tokens the fusion layer applies its channel map Pl to those
coefficients, in the FFT form (=fft, CUDA's default: ATen's FFTs) and with half-precision tokens it forms
low from them where needed and keeps its GEMMs. Both forms run
here on the CPU, so the branch a GPU takes is tested without one: against the Python composition (which
forms low on the tokens) in float64 over variants, masks, save policies and sizes that keep 1 to several
rows and columns; float64 gradcheck with the low-pass active; the size of what the forward saves; the
environment variable's errors."""
import itertools
import sys

import pytest
import torch

from gmamba_ext.gssm import gssm, gssm_composition
from gmamba_ext.ops import HAS_EXTENSION
from gssm_helpers import make, param_fields
from test_gssm_fused import (assert_grads_close, assert_variable_may_change_before_the_backward, inputs,
                             outputs_and_grads)

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")
f64 = torch.float64

# (B, H, W): kept rows H // 4 and columns (W // 2 + 1) // 4 of (1, 1), (2, 1), (1, 3), (9, 6); an empty batch
SIZES = [(2, 4, 6), (1, 9, 12), (2, 7, 21), (1, 37, 45), (0, 8, 8)]


@pytest.mark.parametrize("form", ["dft", "fft"])
@pytest.mark.parametrize("variant,mask", [("full", "corner"), ("full", "symmetric"), ("fem_ssm", "symmetric"),
                                          ("dft_fgmm_ssm", "corner"), ("dft_fgmm_ssm", "symmetric")])
def test_forms_match_composition(form, variant, mask, monkeypatch):
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", form)
    cfg, p, g = make(16, variant=variant, mask=mask, directions="bi", d_state=4)
    for (B, H, W), policy in itertools.product(SIZES, ("keep", "recompute")):
        monkeypatch.setenv("GMAMBA_GSSM_SAVE", policy)
        x = inputs(cfg, B, H, W, g)
        dout = torch.randn(B, H, W, cfg.d_model, generator=g, dtype=f64)
        options = dict(variant=variant, mask=mask, directions="bi")
        got_out, got = outputs_and_grads(gssm, x, p, [None, None], dout, **options)
        want_out, want = outputs_and_grads(gssm_composition, x, p, [None, None], dout, **options)
        torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
        assert_grads_close(got, want)


@pytest.mark.parametrize("form", ["dft", "fft"])
@pytest.mark.parametrize("mask", ["corner", "symmetric"])
def test_gradcheck_with_the_low_pass(form, mask, monkeypatch):
    # H = 8, W = 6: two kept rows (the symmetric mask's u = 0 and u = H - 1) and one column, so the gradients
    # of Pl's parameters (low_freq_proj, low_freq_weight) go through the coefficients
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", form)
    cfg, p, g = make(8, mask=mask, d_state=3)
    x = inputs(cfg, 1, 8, 6, g).requires_grad_()
    names = param_fields(p)
    tensors = [getattr(p, n).detach().clone().requires_grad_() for n in names]

    def fn(x, *ts):
        return gssm(x, p.replace(**dict(zip(names, ts))), mask=mask, layout="bhwc")

    assert torch.autograd.gradcheck(fn, (x, *tensors), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", ["dft", "fft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_agrees_with_float64(form, dtype, monkeypatch):
    # bf16 tokens take the branch that forms low from the saved coefficients and keeps the GEMMs, in both forms
    cfg, p, g = make(32, d_state=4)
    x = inputs(cfg, 2, 16, 20, g)
    dout = torch.randn(2, 16, 20, 32, generator=g, dtype=f64)
    want_out, want = outputs_and_grads(gssm, x, p, [None], dout)  # float64
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", form)
    q = p.replace(**{n: getattr(p, n).to(dtype) for n in param_fields(p)})
    got_out, got = outputs_and_grads(gssm, x.to(dtype), q, [None], dout.to(dtype))
    assert got_out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got_out.double(), want_out, rtol=1e-4, atol=1e-4)
        assert_grads_close([t.double() for t in got], want, 1e-4, scaled=True)
        return
    torch.testing.assert_close(got_out.double(), want_out, rtol=0, atol=0.02 * want_out.abs().max().item())
    for a, b in zip(got, want):  # the gradients' overall error, relative (bf16 rounds every intermediate)
        if b is not None and b.norm() > 0:
            assert (a.double() - b).norm() / b.norm() < 0.06  # 0.032 measured


def test_form_may_change_between_forward_and_backward(monkeypatch):
    # both forms save the same coefficients (layout, scaling), and each op reads the variable itself
    assert_variable_may_change_before_the_backward(monkeypatch, "GMAMBA_GSSM_LOWPASS", ("dft", "fft"), 12, 10)


def test_forward_saves_coefficients_not_low(monkeypatch):
    monkeypatch.setenv("GMAMBA_GSSM_SAVE", "recompute")
    cfg, p, g = make(16, d_state=4)
    B, H, W = 2, 16, 24
    x = inputs(cfg, B, H, W, g).float()
    params = [getattr(p, n).float() for n in param_fields(p)]
    _, front, _ = torch.ops.gmamba_ext.gssm_fwd(x, params, [None], H, W, "full", "corner", False, True)
    coeffs = front[1]  # kLowCoeffs: (B, H // 4 rows, [re, im], (W // 2 + 1) // 4 columns, d)
    assert coeffs.shape == (B, H // 4, 2, (W // 2 + 1) // 4, cfg.d) and coeffs.dtype == torch.float32
    assert coeffs.numel() * 16 <= B * H * W * cfg.d  # about L / 16 values per channel, not low's L


def test_cached_dft_matrices_made_under_inference_mode_serve_training(monkeypatch):
    # The CPU keeps the DFT form's matrices per (H, W, mask, dtype) (fem_lowpass.cpp); this size is the
    # suite's only one, so an inference call makes them and the training call after it reuses them.
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", "dft")
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 2, 17, 19, g)
    dout = torch.randn(2, 17, 19, cfg.d_model, generator=g, dtype=f64)
    with torch.inference_mode():
        inferred = gssm(x, p)
    got_out, got = outputs_and_grads(gssm, x, p, [None], dout)
    want_out, want = outputs_and_grads(gssm_composition, x, p, [None], dout)
    torch.testing.assert_close(inferred, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    assert_grads_close(got, want)


def test_bad_form_is_refused(monkeypatch):
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 1, 8, 8, g)
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", "fast")
    with pytest.raises(ValueError, match="GMAMBA_GSSM_LOWPASS must be 'auto', 'fft' or 'dft'"):
        gssm(x, p)
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", "auto")
    gssm(x, p)


@pytest.mark.parametrize("variable,value", [("GMAMBA_GSSM_LOWPASS", "fast"), ("GMAMBA_GSSM_SAVE", "all")])
def test_bad_settings_are_refused_on_every_path(variable, value, monkeypatch):
    """Both settings were checked only where the C++ ops read them: a bad value passed silently without
    grad (SAVE), and under composition_only / vmap (both)."""
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 1, 8, 8, g)
    monkeypatch.setenv(variable, value)
    calls = {"eager, no grad": lambda: gssm(x, p),
             "composition": lambda: gssm_composition(x, p),
             "vmap": lambda: torch.func.vmap(lambda t: gssm(t, p, layout="bhwc"))(x[None])}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{variable} must be"):
            call()


@pytest.mark.parametrize("form", ["dft", "fft", "auto"])
def test_composition_honours_the_form(form, monkeypatch):
    """The Python composition (torch.compile's and vmap's path) ran the DFT form on the CPU whatever
    GMAMBA_GSSM_LOWPASS said; it now takes the FFTs when told to, and agrees with both forms."""
    gssm_module = sys.modules[gssm.__module__]  # gmamba_ext.gssm names the function, not the module
    cfg, p, g = make(16, d_state=4)
    x = inputs(cfg, 1, 9, 12, g)
    want = gssm_composition(x, p)  # the CPU's default: the DFT form
    used = []
    real = gssm_module._fem_low_dft
    monkeypatch.setattr(gssm_module, "_fem_low_dft", lambda *a: used.append(1) or real(*a))
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", form)
    torch.testing.assert_close(gssm_composition(x, p), want, rtol=1e-12, atol=1e-12)
    assert bool(used) == (form != "fft"), (form, used)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["dft", "fft"])
@pytest.mark.parametrize("mask", ["corner", "symmetric"])
def test_cuda_forms_match_composition(form, mask, monkeypatch):
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", form)
    cfg, p, g = make(32, mask=mask, d_state=8)
    for dtype, tol in ((f64, 1e-10), (torch.float32, 1e-4)):
        q = p.replace(**{n: getattr(p, n).to("cuda", dtype) for n in param_fields(p)})
        x = inputs(cfg, 2, 13, 18, g, dtype).cuda()
        dout = torch.randn(2, 13, 18, 32, generator=g, dtype=f64).to("cuda", dtype)
        got_out, got = outputs_and_grads(gssm, x, q, [None], dout, mask=mask)
        want_out, want = outputs_and_grads(gssm_composition, x, q, [None], dout, mask=mask)
        torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
        assert_grads_close(got, want, tol, scaled=True)

"""FLOP formulas of the custom ops for torch.utils.flop_counter.FlopCounterMode (gmamba_ext/flop_counts.py).
Without them FlopCounterMode counted none of the eager mixer (a GMambaBlock reported only its MLP). The
oracle is FlopCounterMode's own count of the Python composition, whose GEMMs and convolutions it knows."""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import gmamba_ext
from gmamba_ext import GSSMConfig, GSSMParams, gssm
from gmamba_ext.flop_counts import gssm_flops, selective_scan_flops
from gmamba_ext.gssm import composition_only, gssm_composition
from gmamba_ext.nn import GMambaBlock
from gmamba_ext.ops import HAS_EXTENSION
from gmamba_ext.gssm_ops import conv_silu

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")


def count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture
def counted_composition(monkeypatch):
    """The composition with its in-place addmm_ made out of place: FlopCounterMode has a formula for addmm
    but none for addmm_, so it would leave out half of out_proj and the low-pass product."""
    module = sys.modules[gssm.__module__]
    monkeypatch.setattr(module, "_add_product", lambda acc, a, b: torch.addmm(acc, a, b))
    return gssm_composition


@pytest.mark.parametrize("form", ["dft", "fft"])
@pytest.mark.parametrize("variant,mask,directions", [("full", "corner", "uni"), ("full", "symmetric", "four"),
                                                     ("ssm", "corner", "bi"), ("fem_ssm", "symmetric", "uni"),
                                                     ("dft_fgmm_ssm", "corner", "bi")])
def test_eager_gssm_counts_what_the_composition_counts(counted_composition, form, variant, mask, directions,
                                                        monkeypatch):
    monkeypatch.setenv("GMAMBA_GSSM_LOWPASS", form)
    cfg = GSSMConfig(d_model=16, d_state=4, d_conv=3, expand=2, variant=variant, mask=mask, directions=directions)
    p = GSSMParams.init(cfg)
    kw = dict(variant=variant, mask=mask, directions=directions)
    for H, W in [(12, 10), (3, 5), (9, 13)]:  # (3, 5): an empty low-pass
        x = torch.randn(2, H, W, 16)
        eager = count(lambda: gssm(x, p, **kw))
        assert eager == count(lambda: counted_composition(x, p, **kw)), (H, W)
        assert eager == gssm_flops(2, H, W, 16, cfg.d, cfg.d_state, cfg.R, cfg.d_conv, variant, mask,
                                   cfg.n_directions, lowpass_fft=form == "fft")


def test_single_dt_bias_directions_are_all_counted(counted_composition):
    cfg = GSSMConfig(d_model=16, d_state=4, d_conv=3, expand=1, directions="four", single_dt_bias=True)
    p = GSSMParams.init(cfg)
    x = torch.randn(1, 8, 8, 16)
    kw = dict(directions="four", single_dt_bias=True)
    assert count(lambda: gssm(x, p, **kw)) == count(lambda: counted_composition(x, p, **kw))


def test_backward_counts_twice_the_forward():
    cfg = GSSMConfig(d_model=16, d_state=4, d_conv=3, expand=2, directions="bi")
    p = GSSMParams.init(cfg)
    x = torch.randn(2, 8, 9, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = gssm(x, p, directions="bi")
        forward = counter.get_total_flops()
        out.sum().backward()
    assert forward > 0 and counter.get_total_flops() == 3 * forward


def test_block_count_includes_the_mixer(counted_composition):
    """A GMambaBlock reported only its MLP's GEMMs (the mixer's fused op had no formula)."""
    torch.manual_seed(0)
    block = GMambaBlock(16)
    x = torch.randn(1, 16, 12, 12)
    eager = count(lambda: block(x))
    with composition_only():
        assert eager == count(lambda: block(x))
    mlp = count(lambda: block.mlp(torch.randn(1, 144, 16)))
    mixer = count(lambda: block.mixer(torch.randn(1, 12, 12, 16)))
    assert mixer > 0 and eager == mlp + mixer


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_D,with_z", [(False, False), (True, True)])
def test_selective_scan_count_is_vmamba_convention(channels_last, with_D, with_z):
    b, d, L, N = 2, 6, 11, 5
    seq = (b, L, d) if channels_last else (b, d, L)
    u, delta, z = torch.randn(seq), torch.rand(seq), torch.randn(seq)
    A, B, C = -torch.rand(d, N), torch.randn(b, L, N), torch.randn(b, L, N)
    if not channels_last:
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
    fn = gmamba_ext.selective_scan_channels_last if channels_last else gmamba_ext.selective_scan
    kw = dict(D=torch.ones(d) if with_D else None, z=z if with_z else None)
    want = 9 * b * L * d * N + b * L * d * (int(with_D) + int(with_z))
    assert count(lambda: fn(u, delta, A, B, C, **kw)) == want == selective_scan_flops(b, d, L, N, with_D, with_z)


def test_conv_silu_counts_as_torch_counts_the_depthwise_conv():
    B, L, d, K = 2, 13, 5, 3
    xz, weight, bias = torch.randn(B, L, 2 * d), torch.randn(2 * d, K), torch.randn(2 * d)
    torch_count = count(lambda: F.conv1d(xz.transpose(1, 2), weight[:, None], bias, padding="same", groups=2 * d))
    assert count(lambda: conv_silu(xz, weight, bias)) == torch_count > 0

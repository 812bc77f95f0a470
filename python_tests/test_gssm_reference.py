"""Checks of gmamba_ext.gssm_reference (the plain-PyTorch GSSM mixer of GSSM_SPEC.md) against independent
hand computations written here with explicit loops / plain torch ops, exact identities of the spec, the
global-perception axiom, state_dict handling, validation and float64 gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from gmamba_ext.gssm_reference import (GSSMConfig, GSSMParams, fem_low_mask, fem_split, gssm_ref,
                                       gssm_stages)
from gssm_helpers import make, perturb

f64 = torch.float64
FREQ_KEYS = [k for k in GSSMParams.init(GSSMConfig(16)).to_state_dict()
             if k.startswith("freq_") or k == "freq_ratio"]
RECAL_KEYS = [k for k in FREQ_KEYS if k.startswith("freq_ssm.")]
GATE_FGMM_KEYS = [k for k in FREQ_KEYS if k.startswith(("freq_gate.", "freq_adaptive.")) or k == "freq_ratio"]


# ---------------------------------------------------------------- independent hand computation ---------
def hand_head(x, sd, cfg):
    """Steps 1-2 with an explicit loop over the conv taps. x (B, H, W, C) -> x1, z1 (B, L, d)."""
    B, H, W, C = x.shape
    d, K = cfg.d, cfg.d_conv
    L = H * W
    xz = x.reshape(B, L, C) @ sd["in_proj.weight"].T
    x0, z0 = xz[..., :d], xz[..., d:]
    left = (K - 1) // 2

    def conv(v, w, b):
        out = torch.zeros_like(v) + b
        for l in range(L):
            for k in range(K):
                src = l + k - left
                if 0 <= src < L:
                    out[:, l] = out[:, l] + w[:, 0, k] * v[:, src]
        return out * torch.sigmoid(out)

    return conv(x0, sd["conv1d_x.weight"], sd["conv1d_x.bias"]), conv(z0, sd["conv1d_z.weight"], sd["conv1d_z.bias"])


def hand_scan(u, sd, cfg, k=0, single=False):
    """Step 7 for one direction, sequence order, explicit loop. u (B, L, d) -> y (B, L, d)."""
    sfx = "" if k == 0 else f"_{k}"
    R, N = cfg.R, cfg.d_state
    xd = u @ sd[f"x_proj{sfx}.weight"].T
    dl, Bt, Ct = xd[..., :R], xd[..., R:R + N], xd[..., R + N:]
    b = sd[f"dt_proj{sfx}.bias"]
    delta = F.softplus(dl @ sd[f"dt_proj{sfx}.weight"].T + (b if single else 2 * b))
    A = -torch.exp(sd[f"A_log{sfx}"])
    s = torch.zeros(u.shape[0], cfg.d, N, dtype=u.dtype)
    ys = []
    for l in range(u.shape[1]):
        s = torch.exp(delta[:, l, :, None] * A) * s + delta[:, l, :, None] * Bt[:, l, None, :] * u[:, l, :, None]
        ys.append((s * Ct[:, l, None, :]).sum(-1) + sd[f"D{sfx}"] * u[:, l])
    return torch.stack(ys, 1)


def hand_tail(x2, z1, sd, cfg, shape):
    B, H, W, C = shape
    y = hand_scan(x2, sd, cfg, single=cfg.single_dt_bias)
    return (torch.cat([y, z1], -1) @ sd["out_proj.weight"].T).reshape(B, H, W, C)


def hand_mask(H, W, mask):
    Wr = W // 2 + 1
    n = H // 4
    M = torch.zeros(H, Wr, dtype=f64)
    for u in range(H):
        for v in range(Wr):
            row = u < n if mask == "corner" else (u < math.ceil(n / 2) or u >= H - n // 2)
            M[u, v] = float(row and v < Wr // 4)
    return M


def hand_freq(x1, sd, cfg, H, W):
    """Steps 3 (FEM) with plain ops: returns low, high, F (B, L, d)."""
    B, L, d = x1.shape
    img = x1.transpose(1, 2).reshape(B, d, H, W)
    M = hand_mask(H, W, cfg.mask)
    low = torch.fft.irfft2(M * torch.fft.rfft2(img), s=(H, W)).reshape(B, d, L).transpose(1, 2)
    high = torch.fft.irfft2((1 - M) * torch.fft.rfft2(img), s=(H, W)).reshape(B, d, L).transpose(1, 2)
    lf = torch.sigmoid(sd["freq_ssm.low_freq_weight"]) * (low @ sd["freq_ssm.low_freq_proj.weight"].T
                                                          + sd["freq_ssm.low_freq_proj.bias"])
    hf = torch.sigmoid(sd["freq_ssm.high_freq_weight"]) * (high @ sd["freq_ssm.high_freq_proj.weight"].T
                                                           + sd["freq_ssm.high_freq_proj.bias"])
    h1 = torch.relu(torch.cat([x1, lf, hf], -1) @ sd["freq_ssm.freq_fusion.0.weight"].T
                    + sd["freq_ssm.freq_fusion.0.bias"])
    return low, high, h1 @ sd["freq_ssm.freq_fusion.2.weight"].T + sd["freq_ssm.freq_fusion.2.bias"]


def hand_gate_fgmm(x1, Fm, sd):
    """Steps 4-6: x2."""
    w = lambda k: sd[k].reshape(sd[k].shape[0], -1)  # noqa: E731  (1x1 conv -> Linear)
    g = torch.sigmoid(torch.relu(Fm @ w("freq_gate.0.weight").T + sd["freq_gate.0.bias"]) @ w("freq_gate.2.weight").T
                      + sd["freq_gate.2.bias"]).mean(1, keepdim=True)  # (B, 1, 1)
    F2 = Fm * torch.sigmoid(torch.relu(Fm @ w("freq_adaptive.freq_conv.0.weight").T
                                       + sd["freq_adaptive.freq_conv.0.bias"]) @ w("freq_adaptive.freq_conv.2.weight").T
                            + sd["freq_adaptive.freq_conv.2.bias"])
    s = (x1 + F2).mean(1)
    logits = torch.relu(s @ w("freq_adaptive.adaptive_weight.1.weight").T + sd["freq_adaptive.adaptive_weight.1.bias"]) \
        @ w("freq_adaptive.adaptive_weight.3.weight").T + sd["freq_adaptive.adaptive_weight.3.bias"]
    a = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    xf = a[:, None, 0:1] * x1 + a[:, None, 1:2] * F2
    return xf * (1 + torch.sigmoid(sd["freq_ratio"]) * g)


def hand_forward(x, sd, cfg):
    B, H, W, C = x.shape
    x1, z1 = hand_head(x, sd, cfg)
    if cfg.variant == "ssm":
        x2 = x1
    else:
        low, _, Fm = hand_freq(x1, sd, cfg, H, W)
        if cfg.variant == "dft_fgmm_ssm":
            Fm = low
        x2 = x1 + Fm if cfg.variant == "fem_ssm" else hand_gate_fgmm(x1, Fm, sd)
    return hand_tail(x2, z1, sd, cfg, x.shape)


# ---------------------------------------------------------------- tests --------------------------------
@pytest.mark.parametrize("variant", ["ssm", "fem_ssm", "dft_fgmm_ssm", "full"])
@pytest.mark.parametrize("H,W,mask,K,single", [(8, 8, "corner", 3, False), (7, 9, "symmetric", 4, False),
                                               (9, 12, "symmetric", 3, True)])
def test_matches_hand_computation(variant, H, W, mask, K, single):
    cfg, p, g = make(variant=variant, mask=mask, d_conv=K, single_dt_bias=single)
    x = torch.randn(2, H, W, 16, generator=g, dtype=f64)
    torch.testing.assert_close(gssm_ref(x, p, cfg), hand_forward(x, p.to_state_dict(), cfg), rtol=1e-10, atol=1e-10)


def test_ssm_ignores_frequency_parameters():
    cfg, p, g = make(variant="ssm")
    x = torch.randn(2, 7, 9, 16, generator=g, dtype=f64)
    out = gssm_ref(x, p, cfg)
    assert torch.equal(out, gssm_ref(x, perturb(p, FREQ_KEYS, g), cfg))
    # ... but the full variant does use them (the perturbation is not a no-op)
    cfg_f = GSSMConfig(16, variant="full")
    assert not torch.allclose(gssm_ref(x, p, cfg_f), gssm_ref(x, perturb(p, FREQ_KEYS, g), cfg_f))


def test_single_dt_bias_differs():
    cfg, p, g = make()
    x = torch.randn(1, 8, 8, 16, generator=g, dtype=f64)
    cfg1 = GSSMConfig(16, single_dt_bias=True)
    assert not torch.allclose(gssm_ref(x, p, cfg), gssm_ref(x, p, cfg1))


@pytest.mark.parametrize("H,W", [(8, 8), (7, 9), (9, 7), (16, 12), (12, 15), (4, 6)])
@pytest.mark.parametrize("mask", ["corner", "symmetric"])
def test_fem_linearity(H, W, mask):
    x1 = torch.randn(2, 5, H, W, dtype=f64)
    low, high = fem_split(x1, mask)
    M = fem_low_mask(H, W, mask, dtype=f64)
    assert torch.equal(M, hand_mask(H, W, mask))
    assert M.sum() > 0
    X = torch.fft.rfft2(x1)
    torch.testing.assert_close(high, torch.fft.irfft2((1 - M) * X, s=(H, W)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low, torch.fft.irfft2(M * X, s=(H, W)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low + high, x1, rtol=0, atol=1e-14)
    assert low.abs().max() > 1e-3


def test_fem_mask_rows():
    # n = floor(16/4) = 4: corner keeps rows 0..3; symmetric keeps 0, 1 and 14, 15; Wr = 7 -> 1 column
    assert fem_low_mask(16, 12, "corner").sum(1).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert fem_low_mask(16, 12, "symmetric").sum(1).nonzero().flatten().tolist() == [0, 1, 14, 15]
    assert fem_low_mask(16, 12, "symmetric").sum(0).nonzero().flatten().tolist() == [0]
    # n = 3: symmetric keeps ceil(3/2) = 2 rows at the top and 1 at the bottom
    assert fem_low_mask(12, 16, "symmetric").sum(1).nonzero().flatten().tolist() == [0, 1, 11]


@pytest.mark.parametrize("H,W", [(3, 8), (8, 5), (2, 2), (8, 6 - 1)])
@pytest.mark.parametrize("mask", ["corner", "symmetric"])
def test_fem_empty_mask(H, W, mask):
    x1 = torch.randn(2, 4, H, W, dtype=f64)
    assert fem_low_mask(H, W, mask).sum() == 0
    low, high = fem_split(x1, mask)
    assert torch.equal(low, torch.zeros_like(x1)) and torch.equal(high, x1)
    cfg, p, g = make(mask=mask)
    st = gssm_stages(torch.randn(1, H, W, 16, dtype=f64), p, cfg)
    assert torch.equal(st["low"], torch.zeros_like(st["low"]))


def test_fem_ssm_structure():
    cfg, p, g = make(variant="fem_ssm")
    x = torch.randn(2, 8, 8, 16, generator=g, dtype=f64)
    st = gssm_stages(x, p, cfg)
    torch.testing.assert_close(st["x2"], st["x1"] + st["F"], rtol=0, atol=0)
    _, _, Fh = hand_freq(st["x1"], p.to_state_dict(), cfg, 8, 8)
    torch.testing.assert_close(st["F"], Fh, rtol=1e-10, atol=1e-10)
    assert torch.equal(st["out"], gssm_ref(x, perturb(p, GATE_FGMM_KEYS, g), cfg))  # no gate, no FGMM
    assert not torch.allclose(st["out"], gssm_ref(x, perturb(p, RECAL_KEYS, g), cfg))


def test_dft_fgmm_ssm_structure():
    cfg, p, g = make(variant="dft_fgmm_ssm")
    x = torch.randn(2, 8, 8, 16, generator=g, dtype=f64)
    st = gssm_stages(x, p, cfg)
    assert torch.equal(st["F"], st["low"].flatten(2).transpose(1, 2))
    assert torch.equal(st["out"], gssm_ref(x, perturb(p, RECAL_KEYS, g), cfg))  # no recalibration / fusion
    assert not torch.allclose(st["out"], gssm_ref(x, perturb(p, GATE_FGMM_KEYS, g), cfg))


def _jacobian_blocks(cfg, p, H, W, C=16):
    x = torch.randn(1, H, W, C, dtype=f64)
    J = torch.autograd.functional.jacobian(lambda v: gssm_ref(v, p, cfg), x)  # (1,H,W,C, 1,H,W,C)
    J = J.reshape(H * W, C, H * W, C)
    return J.pow(2).sum((1, 3)).sqrt()  # [out pos, in pos] Frobenius norms


def test_global_perception_full():
    cfg, p, _ = make(variant="full")
    blocks = _jacobian_blocks(cfg, p, 4, 6)
    assert blocks.min() > 1e-6, blocks.min()


@pytest.mark.parametrize("K", [3, 4])
def test_ssm_uni_is_causal_up_to_conv_lookahead(K):
    cfg, p, _ = make(variant="ssm", d_conv=K)
    H, W = 4, 5
    L = H * W
    right = K - 1 - (K - 1) // 2
    blocks = _jacobian_blocks(cfg, p, H, W)
    for l in range(L):
        for m in range(L):
            if m > l + right:
                assert blocks[l, m] == 0, (l, m)
            else:
                assert blocks[l, m] > 0, (l, m)


def test_directions_run_and_differ():
    x = torch.randn(2, 7, 9, 16, dtype=f64)
    outs = {}
    for dr in ["uni", "bi", "four"]:
        cfg, p, _ = make(directions=dr, seed=1)
        outs[dr] = gssm_ref(x, p, cfg)
        assert outs[dr].shape == x.shape and torch.isfinite(outs[dr]).all()
    assert not torch.allclose(outs["uni"], outs["bi"]) and not torch.allclose(outs["bi"], outs["four"])


@pytest.mark.parametrize("variant", ["ssm", "full"])
def test_bi_with_silent_reverse_scan_is_uni_with_summed_D(variant):
    # direction 1 with x_proj_1 = 0 has Bt = Ct = 0, so its scan output is exactly D_1 * x2 (order-free):
    # bi == uni with D replaced by D + D_1.
    cfg_bi, p, g = make(directions="bi", variant=variant)
    p = p.replace(**{"x_proj_1.weight": torch.zeros_like(p["x_proj_1.weight"])})
    cfg_uni = GSSMConfig(16, variant=variant)
    sd = {k: v for k, v in p.to_state_dict().items() if "_1" not in k}
    sd["D"] = p["D"] + p["D_1"]
    x = torch.randn(2, 7, 9, 16, generator=g, dtype=f64)
    torch.testing.assert_close(gssm_ref(x, p, cfg_bi), gssm_ref(x, GSSMParams.from_state_dict(sd, cfg_uni), cfg_uni),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,W", [(4, 6), (3, 5)])
def test_direction_outputs_match_hand_scan_on_permuted_sequence(H, W):
    cfg, p, g = make(directions="four")
    x = torch.randn(2, H, W, 16, generator=g, dtype=f64)
    st = gssm_stages(x, p, cfg)
    sd = p.to_state_dict()
    x2 = st["x2"]
    L = H * W
    col = [i * W + j for j in range(W) for i in range(H)]  # l' = j*H + i -> raster index
    orders = [list(range(L)), list(range(L))[::-1], col, col[::-1]]
    total = 0
    for k, order in enumerate(orders):
        yk_seq = hand_scan(x2[:, order], sd, cfg, k=k)
        yk = torch.empty_like(yk_seq)
        yk[:, order] = yk_seq
        torch.testing.assert_close(st[f"y_{k}"], yk, rtol=1e-10, atol=1e-10)
        total = total + yk
    torch.testing.assert_close(st["y"], total, rtol=1e-10, atol=1e-10)


def test_channels_last_bchw_layout():
    cfg, p, g = make()
    x = torch.randn(2, 7, 9, 16, generator=g, dtype=f64)
    ref = gssm_ref(x, p, cfg)
    xc = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
    out = gssm_ref(xc, p, cfg)
    assert out.shape == (2, 16, 7, 9) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref.permute(0, 3, 1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_runs_in_input_dtype(dtype):
    cfg, p, g = make()
    x = torch.randn(2, 8, 8, 16, generator=g, dtype=f64)
    out = gssm_ref(x.to(dtype), p, cfg)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-1
    torch.testing.assert_close(out.double(), gssm_ref(x, p, cfg), rtol=tol, atol=tol)


def test_state_dict_round_trip_and_prefixes():
    cfg, p, _ = make(directions="bi")
    sd = p.to_state_dict()
    assert "x_proj_1.weight" in sd and "A_log_1" in sd and "x_proj_2.weight" not in sd
    x = torch.randn(1, 4, 6, 16, dtype=f64)
    out = gssm_ref(x, p, cfg)
    for pre in ["", "module.", "backbone.layers.0.mixer."]:
        big = {pre + k: v for k, v in sd.items()}
        if pre:
            big["backbone.norm.weight"] = torch.ones(3)  # other modules' keys are ignored
        for given in [None, pre]:
            q = GSSMParams.from_state_dict(big, cfg, prefix=given)
            assert q.to_state_dict().keys() == sd.keys()
            assert all(torch.equal(q[k], sd[k]) for k in sd)
            assert torch.equal(gssm_ref(x, q, cfg), out)


def test_state_dict_errors_name_keys():
    cfg, p, _ = make()
    sd = p.to_state_dict()
    bad = dict(sd)
    del bad["freq_gate.2.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["A_log"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as e:
        GSSMParams.from_state_dict(bad, cfg)
    msg = str(e.value)
    assert "freq_gate.2.bias" in msg and "extra.weight" in msg and "A_log" in msg and "(3, 3)" in msg
    # direction keys are required for "bi" and unexpected for "uni"
    with pytest.raises(ValueError, match=r"x_proj_1\.weight"):
        GSSMParams.from_state_dict(sd, GSSMConfig(16, directions="bi"))
    sd_bi = make(directions="bi")[1].to_state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys.*D_1"):
        GSSMParams.from_state_dict(sd_bi, cfg)
    # with a prefix
    with pytest.raises(ValueError, match=r"missing keys.*freq_ratio"):
        GSSMParams.from_state_dict({"m." + k: v for k, v in sd.items() if k != "freq_ratio"}, cfg)
    # ambiguous prefix
    two = {**{"a." + k: v for k, v in sd.items()}, **{"b." + k: v for k, v in sd.items()}}
    with pytest.raises(ValueError, match="prefix"):
        GSSMParams.from_state_dict(two, cfg)
    assert torch.equal(GSSMParams.from_state_dict(two, cfg, prefix="b.")["D"], sd["D"])


def test_init_values():
    cfg = GSSMConfig(32, d_state=6)
    p = GSSMParams.init(cfg, generator=torch.Generator().manual_seed(3))
    d, R = cfg.d, cfg.R
    assert R == 2 and d == 16
    assert torch.equal(p["A_log"], torch.log(torch.arange(1, 7, dtype=torch.float32)).repeat(d, 1))
    assert torch.equal(p["D"], torch.ones(d)) and p["freq_ratio"].shape == () and p["freq_ratio"] == 0.5
    assert torch.equal(p["freq_ssm.low_freq_weight"], torch.ones(1))
    assert p["dt_proj.weight"].abs().max() <= R ** -0.5
    dt = F.softplus(p["dt_proj.bias"].double())
    assert dt.min() >= 1e-3 - 1e-9 and dt.max() <= 0.1 + 1e-9
    assert p["in_proj.weight"].abs().max() <= 1 / math.sqrt(32)
    assert p["conv1d_x.weight"].abs().max() <= 1 / math.sqrt(cfg.d_conv)
    q = GSSMParams.init(cfg, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(p.to_state_dict().values(), q.to_state_dict().values()))
    GSSMParams.from_state_dict(p.to_state_dict(), cfg)  # shapes of the spec's table


def test_config_validation():
    with pytest.raises(ValueError, match="d_model"):
        GSSMConfig(6)  # d = 3 < 4
    with pytest.raises(ValueError, match="expand"):
        GSSMConfig(9)  # E = 9 odd
    with pytest.raises(ValueError, match="expand"):
        GSSMConfig(10, expand=1.5)  # E = 15
    for field, val in [("variant", "nope"), ("mask", "round"), ("directions", "two"), ("d_state", 0),
                       ("d_conv", 0), ("dt_rank", "x")]:
        with pytest.raises(ValueError, match=field):
            GSSMConfig(16, **{field: val})
    assert GSSMConfig(17, expand=2).R == 2 and GSSMConfig(16).R == 1 and GSSMConfig(8).d == 4
    # the conv kernels' width limit, said when the module is built rather than by every forward's conv op
    with pytest.raises(ValueError, match=r"d_conv must be at most 8 .*got 9"):
        GSSMConfig(16, d_conv=9)
    assert GSSMConfig(16, d_conv=8).d_conv == 8


def test_input_validation():
    cfg, p, _ = make()
    for bad in [torch.randn(8, 8, 16, dtype=f64), torch.randn(1, 8, 8, 15, dtype=f64),
                torch.randn(1, 1, 8, 8, 16, dtype=f64)]:
        with pytest.raises(ValueError, match=r"\bx\b"):
            gssm_ref(bad, p, cfg)


def test_gradcheck_full():
    cfg = GSSMConfig(8, variant="full")
    p = GSSMParams.init(cfg, generator=torch.Generator().manual_seed(0), dtype=f64)
    x = torch.randn(1, 4, 6, 8, dtype=f64, requires_grad=True)  # Wr = 4: the low-pass mask is non-empty
    names = ["freq_ratio", "A_log", "freq_ssm.low_freq_proj.weight", "dt_proj.bias", "freq_gate.2.weight"]
    leaves = [p[n].clone().requires_grad_() for n in names]

    def f(x, *ts):
        return gssm_ref(x, p.replace(**dict(zip(names, ts))), cfg)

    assert torch.autograd.gradcheck(f, (x, *leaves), eps=1e-6, atol=1e-6, rtol=1e-5)

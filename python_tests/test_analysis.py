"""gmamba_ext.analysis: influence maps, tau, the causal-scan check, the projection estimator's bound, the
baselines and the CLI. Small sizes (8x8, C = 8..16) in float64, where exact zeros are exact."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from gmamba_ext.analysis import (ConvStack, TokenMixer, WindowAttention, beyond_lookahead_mask, estimated_influence,
                                 exact_influence, lookahead, max_influence_beyond_lookahead,
                                 perception_report, projection_bound, projections_needed, sample_positions,
                                 scan_d_conv, tau, tau_argmin)
from gmamba_ext.analysis.cli import main, run
from gmamba_ext.nn import GMambaBlock, GSSM

f64 = torch.float64


def build(factory, seed):
    torch.manual_seed(seed)
    return factory().to(f64)


def rand_input(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def all_positions(H, W):
    return [(p, q) for p in range(H) for q in range(W)]


# ------------------------------------------------------------------------------------------------ global
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_block_is_global(seed):
    m = build(lambda: GMambaBlock(8), seed)
    x = rand_input((1, 8, 8, 8), seed)
    maps = exact_influence(m, x, sample_positions(8, 8, 6, seed))
    assert tau(maps) > 0, tau_argmin(maps, sample_positions(8, 8, 6, seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_full_mixer_is_global_bhwc(seed):
    m = build(lambda: GSSM(16, variant="full", d_state=8), seed)
    x = rand_input((1, 8, 8, 16), seed)
    pos = sample_positions(8, 8, 5, seed)
    report, maps = perception_report(m, x, pos, layout="bhwc", d_conv=scan_d_conv(m))
    assert report["tau"] > 0 and report["zero_fraction"] == 0.0
    assert report["tau"] == float(maps.min())
    # not causal: the inputs after the look-ahead do reach the output
    assert report["beyond_lookahead_max"] > 0


def test_fem_ssm_without_poolings_is_not_global():
    """Documents a property of the spec, found by this analysis: "fem_ssm" has no global pooling, and the
    8x8 low-pass (rows u < 2, column v = 0; irfft keeps the real part) has the kernel 1 + cos(2 pi di / 8)
    along H, exactly 0 for rows 4 apart. The first token's scan sees only itself, so output (0, 0) gets
    exactly nothing from row 4 (except the tokens the raster conv links to rows 3 and 5)."""
    m = build(lambda: TokenMixer(8, variant="fem_ssm"), 0)
    x = rand_input((1, 8, 8, 8), 0)
    maps = exact_influence(m, x, [(0, 0)], layout="bhwc")[0]
    zeros = (maps == 0).nonzero().tolist()
    assert zeros == [[4, j] for j in range(2, 7)]


# ------------------------------------------------------------------------------------------------ causal
@pytest.mark.parametrize("factory,layout,K", [
    (lambda: TokenMixer(8, variant="ssm", directions="uni"), "bhwc", 4),
    (lambda: GMambaBlock(8, variant="ssm"), "bchw", 3),
])
def test_ssm_scan_is_exactly_causal_beyond_lookahead(factory, layout, K):
    m = build(factory, 0)
    assert scan_d_conv(m) == K
    shape = (1, 8, 8, 8)
    x = rand_input(shape, 3)
    pos = all_positions(8, 8)
    maps = exact_influence(m, x, pos, layout=layout)
    assert max_influence_beyond_lookahead(maps, pos, K) == 0.0
    # and nothing else is zero: the zero set is exactly the region beyond the look-ahead
    for k, position in enumerate(pos):
        region = beyond_lookahead_mask(8, 8, position, K)
        assert torch.equal(maps[k] == 0, region), position


def test_bidirectional_scan_is_not_causal():
    m = build(lambda: TokenMixer(8, variant="ssm", directions="bi"), 0)
    x = rand_input((1, 8, 8, 8), 0)
    pos = [(0, 0), (4, 4)]
    maps = exact_influence(m, x, pos, layout="bhwc")
    assert max_influence_beyond_lookahead(maps, pos, 4) > 0
    assert tau(maps) > 0


def test_lookahead_region():
    assert [lookahead(k) for k in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2]
    mask = beyond_lookahead_mask(3, 4, (1, 2), 4)  # raster 6, look-ahead 2: indices 9..11 are beyond
    assert mask.reshape(-1).nonzero().reshape(-1).tolist() == [9, 10, 11]
    assert not beyond_lookahead_mask(3, 4, (2, 3), 3).any()


# ------------------------------------------------------------------------------------------------ local
def window_of(H, W, p, q, w):
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[p // w * w:(p // w + 1) * w, q // w * w:(q // w + 1) * w] = True
    return inside


@pytest.mark.parametrize("H,W", [(8, 8), (6, 7)])
def test_windowed_block_is_zero_outside_its_window(H, W):
    m = build(lambda: GMambaBlock(8, window_size=4), 0)
    x = rand_input((1, 8, H, W), 1)
    pos = all_positions(H, W)
    maps = exact_influence(m, x, pos)
    for k, (p, q) in enumerate(pos):
        assert torch.equal(maps[k] > 0, window_of(H, W, p, q, 4)), (p, q)


def test_window_attention_and_conv_stack_are_local():
    H = W = 8
    x = rand_input((1, 8, H, W), 0)
    pos = [(0, 0), (3, 5), (7, 7)]
    attn = build(lambda: WindowAttention(8, 4, num_heads=2), 0)
    maps = exact_influence(attn, x, pos)
    for k, (p, q) in enumerate(pos):
        assert torch.equal(maps[k] > 0, window_of(H, W, p, q, 4))
    conv = build(lambda: ConvStack(8, 3), 0)
    maps = exact_influence(conv, x, pos)
    for k, (p, q) in enumerate(pos):
        reach = torch.zeros(H, W, dtype=torch.bool)
        reach[max(0, p - 3):p + 4, max(0, q - 3):q + 4] = True  # 3 layers of 3x3: radius 3
        assert torch.equal(maps[k] > 0, reach)


# ------------------------------------------------------------------------------------------------ exact
def test_exact_matches_the_jacobian_of_a_linear_module():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False).to(f64)
    x = rand_input((1, 4, 5, 6), 0)
    maps = exact_influence(conv, x, [(2, 3), (0, 0)], chunk_size=3)  # chunks split across positions
    w = conv.weight  # dY[p,q,:]/dX[p+a-1, q+b-1, :] = weight[:, :, a, b]
    expected = torch.zeros(2, 5, 6, dtype=f64)
    for k, (p, q) in enumerate([(2, 3), (0, 0)]):
        for a in range(3):
            for b in range(3):
                i, j = p + a - 1, q + b - 1
                if 0 <= i < 5 and 0 <= j < 6:
                    expected[k, i, j] = w[:, :, a, b].norm()
    torch.testing.assert_close(maps, expected, rtol=1e-12, atol=0)


def test_vmap_batching_matches_stacking():
    m = build(lambda: GMambaBlock(8), 0)
    x = rand_input((1, 8, 8, 8), 0)
    pos = [(0, 0), (5, 2)]
    stacked = exact_influence(m, x, pos, chunk_size=5)
    batched = exact_influence(m, x, pos, chunk_size=5, batching="vmap")
    torch.testing.assert_close(batched, stacked, rtol=1e-10, atol=1e-14)


@pytest.mark.filterwarnings("ignore:x of shape")  # (1, 8, 8, 8) tokens with C = 8 fit both layouts
def test_channels_last_bchw_matches_bhwc():
    m = build(lambda: GSSM(8), 0)
    x = rand_input((1, 8, 8, 8), 0)  # (1, H, W, C)
    pos = [(1, 2), (7, 7)]
    bhwc = exact_influence(m, x, pos, layout="bhwc")
    bchw = exact_influence(m, x.permute(0, 3, 1, 2), pos, layout="bchw")  # channels_last memory format
    torch.testing.assert_close(bchw, bhwc, rtol=1e-12, atol=0)


def test_eval_mode_is_used_and_training_flags_restored():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).to(f64)
    m = nn.Sequential(nn.Dropout(0.9), conv, nn.BatchNorm2d(4).to(f64))
    m.train()
    m[1].eval()  # a submodule's own flag must come back as it was
    x = rand_input((1, 4, 6, 6), 0)
    maps = exact_influence(m, x, [(2, 2)])
    assert m.training and m[0].training and not m[1].training and m[2].training
    m.eval()
    torch.testing.assert_close(maps, exact_influence(m, x, [(2, 2)]), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ estimate
def test_estimate_within_stated_bound():
    m = build(lambda: GMambaBlock(16, window_size=4), 0)
    x = rand_input((1, 16, 8, 8), 0)
    pos = [(0, 0), (5, 6)]
    k, delta = 128, 1e-6
    exact = exact_influence(m, x, pos)
    est = estimated_influence(m, x, pos, num_projections=k, seed=0)
    nonzero = exact > 0
    assert torch.equal(est == 0, ~nonzero)  # exact zeros are estimated as exact zeros
    lo, hi = projection_bound(k, delta, n_entries=int(nonzero.sum()))
    ratio = est[nonzero] / exact[nonzero]
    assert lo <= float(ratio.min()) and float(ratio.max()) <= hi, (lo, hi, ratio.min(), ratio.max())
    # same seed, same numbers (the test cannot flake); another seed, other numbers
    few = estimated_influence(m, x, pos[:1], num_projections=4, seed=0)
    assert torch.equal(few, estimated_influence(m, x, pos[:1], num_projections=4, seed=0))
    assert not torch.equal(few, estimated_influence(m, x, pos[:1], num_projections=4, seed=1))


def test_bound_coverage_on_rank_one_jacobians():
    """The bound's worst case: a 1x1 conv with a rank-1 weight, so each map entry is one chi-square. Every
    one of the 300 positions gets its own projections; failures must be rarer than delta per entry."""
    C, k, delta = 6, 8, 0.2
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 1, bias=False).to(f64)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(C, 1, dtype=f64) @ torch.randn(1, C, dtype=f64))[:, :, None, None])
    x = rand_input((1, C, 15, 20), 0)
    pos = all_positions(15, 20)
    exact = exact_influence(conv, x, pos, chunk_size=512)
    est = estimated_influence(conv, x, pos, num_projections=k, seed=7, chunk_size=512)
    idx = torch.arange(len(pos))
    ps, qs = torch.tensor(pos).unbind(1)
    ratio = est[idx, ps, qs] / exact[idx, ps, qs]
    lo, hi = projection_bound(k, delta)
    failures = int(((ratio < lo) | (ratio > hi)).sum())
    assert failures <= delta * len(pos), failures
    assert float((ratio ** 2).mean()) == pytest.approx(1.0, abs=0.1)  # E[ratio^2] = 1


def test_projection_bound_and_projections_needed():
    lo, hi = projection_bound(100, 1e-3, 10)
    t = math.log(2 * 10 / 1e-3)
    assert lo == pytest.approx(math.sqrt(1 - 2 * math.sqrt(t / 100)))
    assert hi == pytest.approx(math.sqrt(1 + 2 * math.sqrt(t / 100) + 2 * t / 100))
    assert projection_bound(4, 0.5)[0] == 0.0  # too few projections: no lower guarantee
    for eps, n in ((0.1, 1), (0.3, 1000)):
        k = projections_needed(eps, 1e-3, n)
        lo, hi = projection_bound(k, 1e-3, n)
        assert 1 - eps <= lo and hi <= 1 + eps
        lo, hi = projection_bound(k - 1, 1e-3, n)
        assert lo < 1 - eps or hi > 1 + eps


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_raise_value_errors():
    conv = ConvStack(4, 1).to(f64)
    x = rand_input((1, 4, 5, 5), 0)
    with pytest.raises(ValueError, match="layout"):
        exact_influence(conv, x, [(0, 0)], layout="nchw")
    with pytest.raises(ValueError, match="positions.*outside"):
        exact_influence(conv, x, [(5, 0)])
    with pytest.raises(ValueError, match="positions.*outside"):
        exact_influence(conv, x, (0, -1))
    with pytest.raises(ValueError, match="positions"):
        exact_influence(conv, x, [(0, 1.5)])
    with pytest.raises(ValueError, match="positions"):
        exact_influence(conv, x, [])
    with pytest.raises(ValueError, match="same shape"):
        exact_influence(nn.Conv2d(4, 8, 1).to(f64), x, [(0, 0)])
    with pytest.raises(ValueError, match="same shape"):
        exact_influence(nn.Conv2d(4, 4, 3, stride=2).to(f64), x, [(0, 0)])
    with pytest.raises(ValueError, match="batch size 1"):
        exact_influence(conv, x.repeat(2, 1, 1, 1), [(0, 0)])
    with pytest.raises(ValueError, match="chunk_size"):
        exact_influence(conv, x, [(0, 0)], chunk_size=0)
    with pytest.raises(ValueError, match="batching"):
        exact_influence(conv, x, [(0, 0)], batching="loop")
    with pytest.raises(ValueError, match="num_projections"):
        estimated_influence(conv, x, [(0, 0)], num_projections=0)
    with pytest.raises(ValueError, match="method"):
        perception_report(conv, x, [(0, 0)], method="guess")
    with pytest.raises(ValueError, match="delta"):
        projection_bound(10, delta=1.0)
    with pytest.raises(ValueError, match="maps"):
        tau(torch.zeros(3, 3))


def test_positions_from_arrays():
    """np.argwhere / torch.nonzero give (k, 2) arrays: taken like lists of pairs."""
    import numpy as np
    from gmamba_ext.analysis.inputs import check_positions
    assert check_positions(np.argwhere(np.eye(3, dtype=bool)), 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert check_positions(torch.tensor([[0, 2], [1, 0]]), 3, 3) == [(0, 2), (1, 0)]
    assert check_positions(np.array([1, 2]), 3, 3) == [(1, 2)]
    with pytest.raises(ValueError, match="outside the 3 x 3 grid"):
        check_positions(np.array([[3, 0]]), 3, 3)


def test_sample_positions():
    pos = sample_positions(8, 8, 10, seed=0)
    assert len(set(pos)) == 10 and pos[:5] == [(0, 0), (0, 7), (7, 0), (7, 7), (4, 4)]
    assert pos == sample_positions(8, 8, 10, seed=0)
    assert sample_positions(2, 2, 9) == all_positions(2, 2)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_json_and_png(tmp_path, capsys):
    result = run(size=8, channels=8, out=str(tmp_path), positions=3)
    data = json.loads((tmp_path / "influence.json").read_text())
    assert data == json.loads(json.dumps(result))
    mods = data["modules"]
    assert set(mods) == {"gmamba_full", "gssm_full", "gmamba_ssm", "gmamba_window4", "conv3x3_x3",
                         "window_attention4"}
    assert mods["gmamba_full"]["tau"] > 0 and mods["gssm_full"]["tau"] > 0
    assert mods["gmamba_ssm"]["beyond_lookahead_max"] == 0.0 and mods["gmamba_ssm"]["tau"] == 0.0
    assert mods["gmamba_window4"]["tau"] == 0.0 and mods["window_attention4"]["tau"] == 0.0
    assert "beyond_lookahead_max" not in mods["conv3x3_x3"]
    if data["png"] is not None:
        assert (tmp_path / "influence.png").stat().st_size > 1000
    else:
        assert "matplotlib" in data["png_skipped"]
    assert "gmamba_full" in capsys.readouterr().out


def test_cli_without_matplotlib_writes_json_only(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = run(size=4, channels=8, out=str(tmp_path), positions=1, window=2)
    assert result["png"] is None and "matplotlib" in result["png_skipped"]
    assert not (tmp_path / "influence.png").exists()
    assert json.loads((tmp_path / "influence.json").read_text())["output_positions"] == [[0, 0], [2, 2]]


def test_cli_rejects_bad_sizes(tmp_path):
    with pytest.raises(SystemExit, match="size"):
        main(["--size", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="channels must be even and >= 8, got 6"):
        main(["--channels", "6", "--out", str(tmp_path)])


def test_cli_refuses_a_bad_device_or_out_before_computing(tmp_path, monkeypatch):
    monkeypatch.setattr("gmamba_ext.analysis.cli.comparison_modules", lambda *a: pytest.fail("computed"))
    with pytest.raises(SystemExit, match="device 'bogus' is not usable"):
        main(["--device", "bogus", "--out", str(tmp_path)])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        main(["--out", str(tmp_path / "file")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    conv = build(lambda: ConvStack(8, 2), 0)
    x = rand_input((1, 8, 8, 8), 0)
    cpu = exact_influence(conv, x, [(3, 3)])
    gpu = exact_influence(conv.cuda(), x.cuda(), [(3, 3)])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-14)

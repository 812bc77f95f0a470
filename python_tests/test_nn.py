"""gmamba_ext.nn: the GSSM module and GMambaBlock against independent compositions of the oracle
(gssm_ref + LayerNorm + MLP, an explicit loop over windows), release-checkpoint loading, model surgery, the
UNet, AMP, torch.compile, state_dict round trips, seeds, a tiny training run, DDP and FSDP on 2 processes."""
import inspect
import socket

import pytest
import torch
import torch.nn.functional as F

import distributed_worker
from gmamba_ext.gssm_reference import expected_shapes, gssm_ref
from gmamba_ext.nn import GSSM, GMambaBlock, GMambaUNet, insert_gmamba_blocks, load_release_state_dict

f64 = torch.float64


def block(dim=16, seed=0, **kw):
    torch.manual_seed(seed)
    return GMambaBlock(dim, **kw).double()


def ref_block(b, x):
    """The spec's block semantics written out with the oracle (eval mode: no drop path)."""
    def tokens(t):
        mixed = gssm_ref(F.layer_norm(t, (b.dim,), b.norm1.weight, b.norm1.bias), b.mixer.gssm_params(), b.mixer.config)
        if b.gamma_1 is not None:
            mixed = b.gamma_1 * mixed
        t = t + mixed
        mlp = b.mlp.fc2(F.gelu(b.mlp.fc1(F.layer_norm(t, (b.dim,), b.norm2.weight, b.norm2.bias))))
        return t + (b.gamma_2 * mlp if b.gamma_2 is not None else mlp)

    t = x.permute(0, 2, 3, 1)
    w = b.window_size
    if w is None:
        return tokens(t).permute(0, 3, 1, 2)
    B, H, W, C = t.shape
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    padded = torch.zeros(B, Hp, Wp, C, dtype=t.dtype)
    padded[:, :H, :W] = t
    out = torch.empty_like(padded)
    for i in range(0, Hp, w):  # each window on its own, as an independent sample
        for j in range(0, Wp, w):
            out[:, i:i + w, j:j + w] = tokens(padded[:, i:i + w, j:j + w].contiguous())
    return out[:, :H, :W].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- GSSM ----
def test_gssm_module_keys_shapes_and_init():
    m = GSSM(32, d_state=8, d_conv=3, expand=1, directions="four")
    sd = m.state_dict()
    want = expected_shapes(m.config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v) for k, v in want.items()}
    torch.testing.assert_close(m.A_log.detach(), torch.log(torch.arange(1.0, 9.0)).repeat(16, 1))
    assert torch.equal(m.D, torch.ones(16)) and m.freq_ratio.item() == 0.5
    assert m.freq_ssm.low_freq_weight.item() == 1.0
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("variant", ["full", "ssm"])
def test_gssm_module_matches_reference(variant):
    torch.manual_seed(0)
    m = GSSM(16, d_state=4, d_conv=3, expand=1, variant=variant, directions="bi").double()
    x = torch.randn(2, 6, 7, 16, dtype=f64)
    want = gssm_ref(x, m.gssm_params(), m.config)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x.reshape(2, 42, 16), 6, 7), want.reshape(2, 42, 16), rtol=1e-10, atol=1e-10)


def test_gssm_module_layout_argument():
    torch.manual_seed(0)
    m = GSSM(8, d_state=4, expand=1).double()
    x = torch.randn(1, 8, 8, 8, dtype=f64).contiguous(memory_format=torch.channels_last)  # H = W = C: ambiguous
    as_bchw = m(x, layout="bchw")
    torch.testing.assert_close(as_bchw.permute(0, 2, 3, 1), m(x.permute(0, 2, 3, 1).contiguous(), layout="bhwc"))
    assert not torch.allclose(as_bchw, m(x.contiguous(), layout="bhwc"))


def test_gssm_module_gradients_reach_parameters():
    m = GSSM(16, d_state=4, expand=1)
    m(torch.randn(1, 8, 8, 16)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.randn(2, 36, 16)), "needs H and W"),
    (lambda m: m(torch.randn(2, 35, 16), 6, 6), "L = 35 tokens but H \\* W"),
    (lambda m: m(torch.randn(2, 36, 16), 6), "both H and W"),
    (lambda m: m(torch.randn(2, 6, 6, 12)), "C = d_model = 16"),
])
def test_gssm_module_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(GSSM(16, expand=1))


# --------------------------------------------------------------------------------------------- block ----
@pytest.mark.parametrize("kw", [dict(), dict(layer_scale=0.3, directions="bi"), dict(variant="ssm", expand=2)])
def test_block_matches_spec_composition(kw):
    b = block(**kw).eval()
    x = torch.randn(2, 16, 9, 11, dtype=f64)
    torch.testing.assert_close(b(x), ref_block(b, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("w,size", [(4, (9, 11)), (7, (7, 7)), (8, (5, 19))])
def test_windowed_block_matches_window_loop(w, size):
    b = block(window_size=w).eval()
    x = torch.randn(2, 16, *size, dtype=f64)
    out = b(x)
    assert out.shape == x.shape and out.is_contiguous()  # the input's memory format, as the global block
    torch.testing.assert_close(out, ref_block(b, x), rtol=1e-10, atol=1e-10)
    out_cl = b(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(out_cl, out)


def test_block_reads_channels_last_input_in_place():
    b = block().eval()
    x = torch.randn(2, 16, 8, 8, dtype=f64).contiguous(memory_format=torch.channels_last)
    seen = {}

    def record(module, args):
        seen["ptr"] = args[0].data_ptr()

    b.norm1.register_forward_pre_hook(record)
    out = b(x)
    assert seen["ptr"] == x.data_ptr()  # no copy on the way in
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 12, 8, 8), "12 channels"),
    (torch.randn(2, 16, 64), "4-D"),
    (torch.ones(2, 16, 8, 8, dtype=torch.int64), "floating point"),
])
def test_block_errors(x, match):
    with pytest.raises(ValueError, match=match):
        GMambaBlock(16)(x)


@pytest.mark.parametrize("kw,match", [
    (dict(window_size=0), "window_size"), (dict(drop_path=1.0), "drop_path"), (dict(drop_path="0.1"), "drop_path"),
    (dict(drop_path=None), "drop_path"), (dict(layer_scale="1e-6"), "layer_scale"),
    (dict(layer_scale=float("nan")), "layer_scale"), (dict(variant="x"), "variant"), (dict(mlp_ratio="4"), "mlp_ratio"),
    (dict(mlp_ratio=0), "mlp_ratio"), (dict(mlp_ratio=-1.0), "mlp_ratio"), (dict(dim=-4), "dim"),
    (dict(dim=16.0), "dim"), (dict(dim="16"), "dim"),
])
def test_block_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        GMambaBlock(**{"dim": 16, **kw})


@pytest.mark.parametrize("window_size", [None, 4])
def test_block_refuses_an_empty_map(window_size):
    with pytest.raises(ValueError, match="H and W must be >= 1"):
        GMambaBlock(16, window_size=window_size)(torch.randn(1, 16, 0, 8))


def test_windowed_drop_path_drops_whole_samples():
    """Stochastic depth zeroes whole samples: with windows, all windows of an image together (the windows
    ran as a batch and each drew its own mask)."""
    from gmamba_ext.nn.block import drop_path
    torch.manual_seed(0)
    x = torch.ones(6 * 4, 3, 3, 2)  # 6 images of 4 windows
    kept = drop_path(x, 0.5, True, group=4).flatten(1).amax(1).reshape(6, 4) > 0
    assert torch.all(kept == kept[:, :1]) and 0 < kept[:, 0].sum() < 6
    b = block(window_size=4, drop_path=0.5).train()
    b.mlp.fc2.register_forward_hook(lambda m, a, out: torch.zeros_like(out))  # the mixer branch alone
    x = torch.randn(8, 16, 8, 8, dtype=f64)
    for _ in range(4):
        out = b(x)
        for i in range(8):
            same = torch.isclose(out[i], x[i]).all(0)  # (H, W): the branch was dropped there
            assert same.all() or not same.reshape(2, 4, 2, 4).all((1, 3)).any(), i  # no window dropped alone


def test_zero_layer_scale_is_identity_and_drop_path():
    x = torch.randn(2, 16, 8, 8, dtype=f64)
    assert torch.equal(block(layer_scale=0.0).eval()(x), x)
    b = block(drop_path=0.5)
    b.eval()
    torch.testing.assert_close(b(x), ref_block(b, x))  # no drop path in eval
    b.train()
    torch.manual_seed(3)
    outs = {tuple(torch.isclose(b(x), x).flatten(1).all(1).tolist()) for _ in range(8)}
    assert len(outs) > 1  # some samples skip the residual branches, differently from call to call


def test_state_dict_round_trip_and_seeds():
    a, b = block(seed=5, window_size=4), block(seed=5, window_size=4)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())  # same seed, same init
    c = block(seed=6, window_size=4)
    c.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 8, 8, dtype=f64)
    assert torch.equal(c.eval()(x), a.eval()(x))


# ---------------------------------------------------------------------------------------- checkpoints ----
@pytest.mark.parametrize("prefix", ["", "module.", "backbone.layers.0.blocks.1."])
def test_load_release_checkpoint_block_and_mixer(prefix):
    src = block(seed=1, layer_scale=1e-2)
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    if prefix:
        sd["head.weight"] = torch.zeros(3)  # keys outside the prefix belong to other modules: ignored
    dst = block(seed=2, layer_scale=1e-2)
    load_release_state_dict(dst, sd)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    mixer = GSSM(16, d_state=8, d_conv=3, expand=1).double()
    load_release_state_dict(mixer, sd)  # the mixer level, from a block-level checkpoint
    assert torch.equal(mixer.in_proj.weight, src.mixer.in_proj.weight)


def test_load_release_checkpoint_errors():
    sd = {"module." + k: v for k, v in block(layer_scale=1e-2).state_dict().items()}
    del sd["module.mixer.D"]
    sd["module.mixer.extra"] = torch.zeros(1)
    sd["module.norm1.weight"] = torch.zeros(5)
    with pytest.raises(ValueError) as e:
        load_release_state_dict(block(layer_scale=1e-2), sd)
    msg = str(e.value)
    assert "missing keys: ['mixer.D']" in msg and "unexpected keys: ['mixer.extra']" in msg
    assert "norm1.weight: checkpoint (5,), module (16,)" in msg
    # strict=False returns missing and unexpected keys, and refuses shape mismatches as torch does (they
    # would leave the parameter at its initial value, unreported)
    with pytest.raises(ValueError, match=r"shape mismatches: \['norm1.weight: checkpoint \(5,\)") as e:
        load_release_state_dict(block(layer_scale=1e-2), sd, strict=False)
    assert "missing keys" not in str(e.value)
    sd["module.norm1.weight"] = torch.full((16,), 3.0, dtype=torch.float64)
    dst = block(layer_scale=1e-2)
    missing, unexpected = load_release_state_dict(dst, sd, strict=False)
    assert missing == ["mixer.D"] and unexpected == ["mixer.extra"]
    assert torch.equal(dst.norm1.weight, sd["module.norm1.weight"])


# ------------------------------------------------------------------------------- AMP, compile, training ----
def test_autocast_bfloat16_cpu():
    """The mixer and MLP run in bf16 under autocast; the residual stream stays in x's dtype."""
    b = GMambaBlock(32).eval()
    x = torch.randn(2, 32, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = b(x)
        mixed = b.mixer(x.permute(0, 2, 3, 1))
    want = b(x)
    assert mixed.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05
    assert not torch.equal(got, want)  # bf16 arithmetic did happen


def test_compile_whole_block():
    b = GMambaBlock(16, window_size=4).eval()
    x = torch.randn(2, 16, 8, 12, requires_grad=True)
    compiled = torch.compile(b, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, b(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None


def test_tiny_training_run_loss_falls():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), GMambaBlock(16), torch.nn.Conv2d(16, 1, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(8, 1, 12, 12)
    y = x.mean(dim=(2, 3), keepdim=True).expand_as(x)  # each pixel's target is a global statistic
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------------- surgery ----
def test_insert_into_resnet_keeps_weights_and_outputs():
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    before, keys = m(x), dict(m.state_dict())
    insert_gmamba_blocks(m, window_size=None)
    after = m(x)
    assert torch.equal(after, before)  # zero-initialised layer scales: the function is unchanged
    assert all(torch.equal(m.state_dict()[k], v) for k, v in keys.items())
    assert sorted(m.gmamba_blocks.keys()) == ["layer1", "layer2", "layer3", "layer4"]
    m(x).sum().backward()
    assert m.gmamba_blocks["layer3"].gamma_1.grad.abs().sum() > 0  # the blocks train


def test_insert_into_convnext_and_errors():
    torchvision = pytest.importorskip("torchvision")
    from gmamba_ext.nn import CONVNEXT_STAGES
    m = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    before = m(x)
    insert_gmamba_blocks(m, CONVNEXT_STAGES[:2], zero_init=False, layer_scale=1e-3)
    assert m(x).shape == before.shape and not torch.equal(m(x), before)
    with pytest.raises(ValueError, match="already has GMamba blocks"):
        insert_gmamba_blocks(m)
    with pytest.raises(ValueError, match="no sub-modules \\['layer9'\\]"):
        insert_gmamba_blocks(torchvision.models.resnet18(weights=None), ["layer9"])
    gray = torchvision.models.resnet18(weights=None)
    gray.conv1 = torch.nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    with pytest.raises(ValueError, match=r"dry run .* shape \(1, 3, 64, 64\).*pass example_input="):
        insert_gmamba_blocks(gray)
    insert_gmamba_blocks(gray, example_input=torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="names a sub-module twice"):  # one block would run unregistered
        insert_gmamba_blocks(torchvision.models.resnet18(weights=None), ("layer3", "layer3"))
    for layer_scale in (None, 0.5):  # zero_init's promise (the model unchanged) cannot hold
        with pytest.raises(ValueError, match="conflicts with layer_scale"):
            insert_gmamba_blocks(torchvision.models.resnet18(weights=None), layer_scale=layer_scale)


def test_unet_positions_and_shapes():
    pytest.importorskip("torchvision")
    plain = GMambaUNet(4, gmamba_at=())
    full = GMambaUNet(4, encoder="resnet34", window_size=None)
    x = torch.randn(2, 3, 64, 48)
    assert plain(x).shape == full(x).shape == (2, 4, 64, 48)
    assert len(full.gmamba) == 7 and len(plain.gmamba) == 0
    with pytest.raises(ValueError, match="unknown positions"):
        GMambaUNet(4, gmamba_at=("enc5",))
    assert list(GMambaUNet(4, gmamba_at="enc3").gmamba) == ["enc3"]  # one name, as insert_gmamba_blocks takes
    for kw in (dict(num_classes=0), dict(in_channels=0), dict(num_classes=2.0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            GMambaUNet(**{"num_classes": 4, **kw})


# ----------------------------------------------------------------------------------------- distributed ----
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_distributed_gradients_equal_single_process(kind, tmp_path):
    if kind == "fsdp":
        fsdp = pytest.importorskip("torch.distributed.fsdp")
        if "ignored_params" not in inspect.signature(fsdp.fully_shard).parameters:
            pytest.skip("this torch's fully_shard has no ignored_params (needed for 0-d parameters)")
    import torch.multiprocessing as mp
    path = str(tmp_path / "grads.pt")
    mp.spawn(distributed_worker.worker, args=(2, _free_port(), kind, path), nprocs=2)
    got, want = torch.load(path), distributed_worker.reference_grads()
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:
            assert got[k] is None, k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)

"""The modules in training code as users write it: activation checkpointing, weight reparametrisations,
deferred (meta-device) initialisation, weight-decay groups, gradient strides. Each case was a failure found
by running such code (a crash, a wrong initialisation or a silently stale weight)."""
import collections
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize, prune
from torch.utils.checkpoint import checkpoint

from gmamba_ext import gssm
from gmamba_ext.gssm_reference import gssm_ref
from gmamba_ext.nn import GSSM, GMambaBlock, weight_decay_groups
from gmamba_ext.ops import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")
f64 = torch.float64


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("which", ["block", "mixer"])
def test_checkpoint_gives_the_plain_gradients(use_reentrant, which):
    """use_reentrant=False raised CheckpointError: gssm's backward unpacked ctx.saved_tensors twice."""
    torch.manual_seed(0)
    if which == "block":
        module, x = GMambaBlock(16, directions="bi").to(f64), torch.randn(2, 16, 6, 7, dtype=f64)
    else:
        module, x = GSSM(16, d_state=4).to(f64), torch.randn(2, 6, 7, 16, dtype=f64)
    runs = []
    for wrapped in (False, True):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        out = checkpoint(module, xi, use_reentrant=use_reentrant) if wrapped else module(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=f64).view(out.shape)).sum().backward()
        runs.append([xi.grad] + [p.grad.clone() for p in module.parameters()])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def reference_output(module, x, replace):
    """gssm_ref with some parameters replaced by the given tensors (the computed weights)."""
    p = module.gssm_params().replace(**replace)
    return gssm_ref(x, p, module.config)


def test_parametrize_reparametrisations_are_applied():
    """A parametrised sub-layer weight made gssm_params() fail with a TypeError about
    'out_proj_parametrizations_weight_original0'; it now enters as its computed value, and the gradient
    reaches the parametrisation's own parameters."""
    torch.manual_seed(0)
    module = GSSM(16, d_state=4).to(f64)
    parametrizations.weight_norm(module.out_proj)
    parametrizations.spectral_norm(module.in_proj)
    x = torch.randn(1, 5, 6, 16, dtype=f64)
    with parametrize.cached():  # spectral_norm's power iteration runs once: both sides see one weight
        out = module(x)
        want = reference_output(module, x, {"out_proj.weight": module.out_proj.weight,
                                            "in_proj.weight": module.in_proj.weight})
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    originals = [module.out_proj.parametrizations.weight.original0,
                 module.out_proj.parametrizations.weight.original1]
    got = torch.autograd.grad(out.square().sum(), originals, retain_graph=True)  # the weights are shared
    want_grads = torch.autograd.grad(want.square().sum(), originals)
    for g, w in zip(got, want_grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert "in_proj.parametrizations.weight.original" in dict(module.named_parameters())


@pytest.mark.parametrize("how", ["prune", "old weight_norm"])
def test_hook_based_reparametrisations_are_refused(how):
    """They keep the real weight under another name and recompute `weight` in a forward pre-hook, which
    never runs (the mixer does not call its sub-layers): the stale weight would be used silently."""
    module = GSSM(16, d_state=4)
    if how == "prune":
        prune.l1_unstructured(module.in_proj, "weight", amount=0.5)
    else:
        with pytest.warns(FutureWarning):  # deprecated by torch, still used
            torch.nn.utils.weight_norm(module.out_proj)
    with pytest.raises(ValueError, match="hook-based reparametrisation.*torch.nn.utils.parametrize"):
        module(torch.randn(1, 4, 4, 16))


def materialise(module, parents_first):
    """Deferred initialisation as FSDP does it: reset_parameters() on each module owning parameters."""
    order, queue = [], collections.deque([module])
    while queue:
        m = queue.popleft()
        order.append(m)
        queue.extend(m.children())
    if not parents_first:
        order.reverse()
    for m in order:
        if any(True for _ in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False))):
            m.reset_parameters()  # AttributeError for a module without one (FSDP's failure)


@pytest.mark.parametrize("parents_first", [True, False])
def test_meta_device_initialisation_module_by_module(parents_first):
    """_FreqSSM and GMambaBlock had no reset_parameters (FSDP raised), and nn.Linear's reset of dt_proj
    overwrote the spec's dt initialisation (dt ~ 0.9 instead of [1e-3, 1e-1])."""
    with torch.device("meta"):
        block = GMambaBlock(32, layer_scale=0.5, directions="bi")
    block.to_empty(device="cpu")
    materialise(block, parents_first)
    m = block.mixer
    for sfx in ("", "_1"):
        dt = F.softplus(getattr(m, "dt_proj" + sfx).bias)
        assert dt.min() >= m.config.dt_init_floor * 0.999 and dt.max() <= m.config.dt_max * 1.001, sfx
        bound = m.config.R ** -0.5 * m.config.dt_scale
        assert getattr(m, "dt_proj" + sfx).weight.abs().max() <= bound
        torch.testing.assert_close(getattr(m, "A_log" + sfx), torch.log(torch.arange(1.0, 9.0)).repeat(m.config.d, 1))
        assert torch.equal(getattr(m, "D" + sfx), torch.ones(m.config.d))
    assert torch.equal(m.freq_ssm.low_freq_weight, torch.ones(1))
    assert torch.equal(m.freq_ssm.high_freq_weight, torch.ones(1))
    assert torch.equal(block.gamma_1, torch.full((32,), 0.5)) and torch.equal(block.gamma_2, block.gamma_1)
    assert m.freq_ratio.item() == 0.5
    assert all(torch.isfinite(p).all() for p in block.parameters())
    assert m.A_log._no_weight_decay and m.D_1._no_weight_decay  # marked again on the new parameters


def test_weight_decay_groups_leave_a_log_and_d_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), GMambaBlock(16, directions="bi"))
    model = copy.deepcopy(model)  # drops the parameters' _no_weight_decay marks: the groups must not need them
    mixer = model[1].mixer
    assert mixer.no_weight_decay() == {"A_log", "D", "A_log_1", "D_1"}
    groups = weight_decay_groups(model, 0.05)
    assert {id(p) for p in groups[1]["params"]} == {id(getattr(mixer, n)) for n in mixer.no_weight_decay()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        unchanged = torch.equal(p, before[n])
        assert unchanged == (n.split(".")[-1] in mixer.no_weight_decay() or not before[n].abs().max() > 0), n


@pytest.mark.parametrize("dt_rank", [1, 3])
def test_parameter_gradients_have_the_parameters_strides(dt_rank):
    """dt_proj.weight (d, 1) got a gradient with strides (1, d): DDP warned on every step that gradient
    strides did not match its bucket views."""
    module = GSSM(8, d_state=4, d_conv=3, expand=1, dt_rank=dt_rank, directions="bi")
    x = torch.randn(2, 5, 6, 8)
    out = gssm(x, module.gssm_params(), directions="bi")
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())

"""`GSSM`: the GSSM mixer as an nn.Module whose parameters sit under the release's state_dict keys
(GSSM_SPEC.md's table), initialised as the spec says; forward calls the fused `gmamba_ext.gssm`."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..gssm import gssm
from ..gssm_reference import GSSMConfig, GSSMParams, _field, dt_bias_init, dt_weight_init, expected_shapes

__all__ = ["GSSM", "weight_decay_groups"]

# Deferred (meta-device) initialisation, as FSDP does it, calls reset_parameters() on every module that owns
# parameters directly, each initialising only its own: so every such module here has one that gives the
# spec's initialisation for its own parameters.


class _FreqSSM(nn.Module):
    """FEM parameters (keys freq_ssm.*)."""

    def __init__(self, d: int, **kw):
        super().__init__()
        self.low_freq_weight = nn.Parameter(torch.ones(1, **kw))
        self.high_freq_weight = nn.Parameter(torch.ones(1, **kw))
        self.low_freq_proj = nn.Linear(d, d, **kw)
        self.high_freq_proj = nn.Linear(d, d, **kw)
        self.freq_fusion = nn.Sequential(nn.Linear(3 * d, 2 * d, **kw), nn.ReLU(), nn.Linear(2 * d, d, **kw))

    def reset_parameters(self) -> None:
        """Its own two weights (1, as the spec says); the Linear layers reset themselves."""
        with torch.no_grad():
            self.low_freq_weight.fill_(1.0)
            self.high_freq_weight.fill_(1.0)


class _DtProjection(nn.Linear):
    """dt_proj (keys dt_proj[_k].*): a Linear whose reset_parameters() is the spec's dt initialisation, not
    nn.Linear's (which a module-by-module initialisation would otherwise leave: dt ~ 0.9 instead of
    [1e-3, 1e-1])."""

    def __init__(self, config: GSSMConfig, **kw):
        object.__setattr__(self, "dt_config", config)  # nn.Linear.__init__ calls reset_parameters
        super().__init__(config.R, config.d, **kw)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(dt_weight_init(self.dt_config))
            self.bias.copy_(dt_bias_init(self.dt_config))


class _FreqAdaptive(nn.Module):
    """FGMM parameters (keys freq_adaptive.*), as the release's 1x1 convolutions."""

    def __init__(self, d: int, **kw):
        super().__init__()
        d4 = d // 4
        self.freq_conv = nn.Sequential(nn.Conv2d(d, d4, 1, **kw), nn.ReLU(), nn.Conv2d(d4, d, 1, **kw))
        self.adaptive_weight = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(d, d4, 1, **kw), nn.ReLU(),
                                             nn.Conv2d(d4, 2, 1, **kw))


class GSSM(nn.Module):
    """The GSSM mixer (GSSM_SPEC.md). Defaults are Mamba's (d_state 16, d_conv 4, expand 2); the GMamba block
    uses d_state 8, d_conv 3, expand 1.

    forward(x, H=None, W=None, initial_state=None, layout=None): x is (B, H, W, C) tokens, (B, C, H, W) in
    channels_last memory format, or (B, L, C) with H and W given (L = H * W); the result has x's shape.
    layout="bhwc" / "bchw" settles a 4-D input whose shape fits both readings (e.g. H = W = C with a
    channels_last tensor); None detects it as gmamba_ext.gssm does. The sub-modules (in_proj, freq_ssm,
    ...) hold the parameters under the release's keys; the computation is the fused `gmamba_ext.gssm`, not
    these modules' own forwards.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: Union[int, str] = "auto", variant: str = "full", mask: str = "corner",
                 directions: str = "uni", single_dt_bias: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        self.config = GSSMConfig(d_model=d_model, expand=expand, d_state=d_state, d_conv=d_conv, dt_rank=dt_rank,
                                 variant=variant, mask=mask, directions=directions, single_dt_bias=single_dt_bias,
                                 dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, dt_scale=dt_scale)
        c = self.config
        kw = dict(device=device, dtype=dtype)
        C, E, d, N, K, R = c.d_model, c.E, c.d, c.d_state, c.d_conv, c.R
        self.in_proj = nn.Linear(C, E, bias=False, **kw)
        self.conv1d_x = nn.Conv1d(d, d, K, groups=d, **kw)
        self.conv1d_z = nn.Conv1d(d, d, K, groups=d, **kw)
        self.freq_ssm = _FreqSSM(d, **kw)
        self.freq_gate = nn.Sequential(nn.Linear(d, E // 4, **kw), nn.ReLU(), nn.Linear(E // 4, 1, **kw))
        self.freq_adaptive = _FreqAdaptive(d, **kw)
        self.freq_ratio = nn.Parameter(torch.empty((), **kw))
        for k in range(c.n_directions):
            sfx = "" if k == 0 else f"_{k}"
            setattr(self, "x_proj" + sfx, nn.Linear(d, R + 2 * N, bias=False, **kw))
            setattr(self, "dt_proj" + sfx, _DtProjection(c, **kw))
            setattr(self, "A_log" + sfx, nn.Parameter(torch.empty(d, N, **kw)))
            setattr(self, "D" + sfx, nn.Parameter(torch.empty(d, **kw)))
        self.out_proj = nn.Linear(E, C, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """The spec's initialisation (GSSMParams.init) of every parameter, the sub-modules' included: dt_proj,
        A_log, D, the frequency weights, and PyTorch's default for every other layer. (The sub-modules'
        own reset_parameters() give the same distributions, for module-by-module initialisation.)"""
        fresh = GSSMParams.init(self.config, generator=generator).to_state_dict()
        with torch.no_grad():
            for key, value in self.named_parameters():
                if key in fresh:  # (a parametrised weight's original keeps its value)
                    value.copy_(fresh[key])
        for name in self.no_weight_decay():  # marked here too: to_empty() makes new parameters
            getattr(self, name)._no_weight_decay = True

    def no_weight_decay(self) -> set:
        """Names of the parameters to keep out of weight decay, A_log and D of each direction (decay pulls
        A = -exp(A_log) towards -1 and D towards 0). Also marked `p._no_weight_decay = True` as mamba-ssm
        marks them (a mark torch's deepcopy of a parameter drops). docs/MODULES.md shows the optimizer groups."""
        return {name + sfx for sfx in [""] + [f"_{k}" for k in range(1, self.config.n_directions)]
                for name in ("A_log", "D")}

    def gssm_params(self) -> GSSMParams:
        """The parameters (not copies: gradients flow) as GSSMParams. A weight reparametrised with
        torch.nn.utils.parametrize (parametrizations.weight_norm, spectral_norm, orthogonal, LoRA-style
        parametrisations) enters as its computed value."""
        fields = {}
        for field, path, name in _parameter_slots(self.config):  # straight to each owner's _parameters: ~10 us
            owner = self  # per call, against ~45 us through named_parameters() (GPU calls are host-bound)
            for part in path:
                owner = owner._modules.get(part) if owner is not None else None
            value = owner._parameters.get(name) if owner is not None else None
            if value is None:  # reparametrised, pruned or replaced: the general path below says which
                named = dict(self.named_parameters())
                return GSSMParams(**{_field(k): self._effective(k, named) for k in expected_shapes(self.config)})
            fields[field] = value
        return GSSMParams(**fields)

    def _effective(self, key: str, named: dict) -> Tensor:
        if key in named:
            return named[key]
        *path, name = key.split(".")
        owner = self.get_submodule(".".join(path))
        if parametrize.is_parametrized(owner, name):
            return getattr(owner, name)
        raise ValueError(f"GSSM: '{key}' is no longer a parameter of the module, and not a torch.nn.utils."
                         "parametrize parametrisation: a hook-based reparametrisation (torch.nn.utils.prune, "
                         "weight_norm, spectral_norm) is never applied, because GSSM computes with its "
                         "sub-layers' weights in fused kernels and does not run their forwards or hooks. Use "
                         "torch.nn.utils.parametrize-based ones (torch.nn.utils.parametrizations.*) instead.")

    def forward(self, x: Tensor, H: Optional[int] = None, W: Optional[int] = None,
                initial_state=None, layout: Optional[str] = None) -> Tensor:
        if H is not None or W is not None:
            if H is None or W is None or not isinstance(x, Tensor) or x.dim() != 3:
                raise ValueError(f"GSSM: with H and W, x must be (B, L, C) tokens and both H and W given; got "
                                 f"x {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}, "
                                 f"H={H}, W={W}")
            if x.shape[1] != H * W:
                raise ValueError(f"GSSM: x has L = {x.shape[1]} tokens but H * W = {H} * {W} = {H * W}")
            out = self._run(x.reshape(x.shape[0], H, W, x.shape[2]), initial_state, "bhwc")
            return out.reshape(x.shape[0], H * W, -1)
        if isinstance(x, Tensor) and x.dim() == 3:
            raise ValueError(f"GSSM: a 3-D input (B, L, C) {tuple(x.shape)} needs H and W: call module(x, H, W)")
        return self._run(x, initial_state, layout)

    def _run(self, x, initial_state, layout):
        c = self.config
        return gssm(x, self.gssm_params(), variant=c.variant, mask=c.mask, directions=c.directions,
                    initial_state=initial_state, single_dt_bias=c.single_dt_bias, layout=layout)

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, d_state={c.d_state}, d_conv={c.d_conv}, expand={c.expand}, "
                f"dt_rank={c.R}, variant={c.variant!r}, mask={c.mask!r}, directions={c.directions!r}")


def _parameter_slots(config: GSSMConfig) -> tuple:
    """(GSSMParams field, owner module path, parameter name) of each parameter, from its state_dict key;
    cached per config (a dict, not functools.lru_cache, which dynamo warns about and traces through)."""
    slots = _SLOTS.get(config)
    if slots is None:
        slots = tuple((_field(key), tuple(key.split(".")[:-1]), key.split(".")[-1]) for key in expected_shapes(config))
        if not torch.compiler.is_compiling():  # dynamo cannot store into the cache
            _SLOTS[config] = slots
    return slots


_SLOTS: dict = {}


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list:
    """Optimizer parameter groups for `model`: every GSSM's no_weight_decay() parameters, and any parameter
    marked `_no_weight_decay`, with weight decay 0; the rest with `weight_decay`. Found by walking the
    modules, so deep copies (which drop the marks) still get it right."""
    skip = {id(getattr(m, name)) for m in model.modules() if isinstance(m, GSSM) for name in m.no_weight_decay()}
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if id(p) in skip or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

"""The GSSM mixer of GSSM_SPEC.md ("GSSM, exactly", in the team's shared/ folder) as plain PyTorch.

This is the oracle, and the fallback, of the future fused GSSM operator: written for clarity, not speed (the
selective scan is `gmamba_ext.reference.selective_scan_ref`, sequential over the sequence).

Public API
----------
- `GSSMConfig`: hyper-parameters, validated on construction (ValueError naming the field).
- `GSSMParams`: a dataclass of tensors, one field per state_dict key (field name = key with "." -> "_"),
  with `from_state_dict`, `to_state_dict` and `init`.
- `gssm_ref(x, params, config)`: the forward (steps 1-8 of the spec, every variant and scan direction).
- `gssm_stages(...)`: the same forward, returning every intermediate (for tests and debugging).
- `fem_low_mask(H, W, mask)`, `fem_split(x1, mask)`: the FEM's low-pass mask and low/high split.

Choices where the spec is silent (or leaves an option)
------------------------------------------------------
- Keys of scan directions k = 1, 2, 3 ("bi" uses k = 1, "four" k = 1..3): `x_proj_{k}.weight`,
  `dt_proj_{k}.weight`, `dt_proj_{k}.bias`, `A_log_{k}`, `D_{k}` (same shapes as direction 0's keys).
  Direction order: 0 raster (l = i*W + j), 1 reversed raster, 2 column-major (l' = j*H + i), 3 reversed
  column-major. Each direction's scan output is mapped back to raster order; the outputs are summed.
- The depthwise convolution and everything before the scan is shared by all directions (the conv runs once,
  along the raster sequence, as in step 2); only steps 7's x_proj/dt_proj/A_log/D are per direction.
- `single_dt_bias=False` (default) adds dt_proj's bias twice, as the release does (once in dt_proj's Linear,
  once as the scan's delta_bias). `single_dt_bias=True` adds it once (plain Mamba):
  Delta = softplus(dl W_dt^T + b_dt).
- Every parameter key of the spec's table is required by `from_state_dict` for every variant (the
  release's checkpoints always hold them); variants simply do not read the ones they skip. Direction keys
  are required exactly for the directions the config uses; others are "unexpected".
- Prefixes: `from_state_dict(sd, config, prefix=None)` auto-detects the prefix from the key that ends in
  "in_proj.weight" (exactly one candidate must exist, else a ValueError lists them). With a non-empty prefix,
  keys that do not start with it belong to other modules and are ignored; keys that start with it but are not
  parameters of this mixer are reported as unexpected. `prefix=""` means no prefix and every key counts.
- Dtypes: the computation runs in the input's dtype (the parameters are cast to it). FFTs run in float32 for
  float16/bfloat16 inputs (float64 for float64, float32 for float32) and are cast back. The selective scan
  keeps its state in float32 (float64 for float64) as `selective_scan_ref` does, and returns x's dtype.
- Layouts: x is (B, H, W, C) (channels last, the spec's layout), or (B, C, H, W) whose memory format is
  torch.channels_last; the output has the input's layout (a (B, C, H, W) input gives a (B, C, H, W)
  channels_last output). `layout=None` detects: (B, C, H, W) when x.shape[1] == C and x is channels_last-
  contiguous but not contiguous, else (B, H, W, C) when x.shape[-1] == C. Pass `layout="bhwc"` or
  `layout="bchw"` to force one (needed for degenerate shapes, e.g. H = W = 1, where both readings match).
- The global gate's pooled value g and FGMM's pooled s are means over all L = H*W tokens of each sample.
- The FEM's low-pass mask is built on the host from the Python ints H, W (no host sync). An empty mask
  (H < 4 or Wr = W//2 + 1 < 4) gives low = 0 exactly (the FFT is skipped) and high = x1.
- No `.item()`, no data-dependent Python control flow: the forward never synchronises with the device.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .reference import accumulation_dtype, selective_scan_ref

__all__ = ["GSSMConfig", "GSSMParams", "gssm_ref", "gssm_stages", "fem_low_mask", "fem_split",
           "VARIANTS", "MASKS", "DIRECTIONS"]

VARIANTS = ("full", "ssm", "fem_ssm", "dft_fgmm_ssm")
MASKS = ("corner", "symmetric")
DIRECTIONS = {"uni": 1, "bi": 2, "four": 4}
MAX_CONV_WIDTH = 8  # the conv kernels' limit (kMaxConvWidth, csrc/gmamba/gssm_math.h)


# ------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GSSMConfig:
    """Hyper-parameters of the GSSM mixer (defaults of the GMamba block).

    d_model: C; expand: E = int(expand * C), must be even; d = E // 2 >= 4 (the scan's channel count, and
    FGMM's reduction 4 needs d >= 4); d_state: N; d_conv: K, 1 to 8; dt_rank: R, "auto" -> ceil(C / 16).
    dt_min / dt_max / dt_init_floor / dt_scale: initialisation of dt_proj only.
    """
    d_model: int
    expand: float = 1
    d_state: int = 8
    d_conv: int = 3
    dt_rank: Union[int, str] = "auto"
    variant: str = "full"
    mask: str = "corner"
    directions: str = "uni"
    single_dt_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.d_model, bool) or not isinstance(self.d_model, int) or self.d_model < 1:
            raise ValueError(f"GSSMConfig.d_model must be a positive int, got {self.d_model!r}")
        if not (isinstance(self.expand, (int, float)) and not isinstance(self.expand, bool)
                and self.expand > 0):
            raise ValueError(f"GSSMConfig.expand must be a positive number, got {self.expand!r}")
        E = int(self.expand * self.d_model)
        if E % 2 != 0:
            raise ValueError(f"GSSMConfig.expand: E = int(expand * d_model) = int({self.expand} * "
                             f"{self.d_model}) = {E} must be even")
        if E // 2 < 4:
            raise ValueError(f"GSSMConfig.d_model/expand: d = E // 2 = {E // 2} must be >= 4 (FGMM's "
                             f"reduction 4); got d_model={self.d_model}, expand={self.expand}")
        for name in ("d_state", "d_conv"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GSSMConfig.{name} must be a positive int, got {v!r}")
        if self.d_conv > MAX_CONV_WIDTH:
            raise ValueError(f"GSSMConfig.d_conv must be at most {MAX_CONV_WIDTH} (the conv kernels' width "
                             f"limit), got {self.d_conv}")
        if self.dt_rank != "auto" and (isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int)
                                       or self.dt_rank < 1):
            raise ValueError(f"GSSMConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"GSSMConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mask not in MASKS:
            raise ValueError(f"GSSMConfig.mask must be one of {MASKS}, got {self.mask!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"GSSMConfig.directions must be one of {tuple(DIRECTIONS)}, "
                             f"got {self.directions!r}")
        if not isinstance(self.single_dt_bias, bool):
            raise ValueError(f"GSSMConfig.single_dt_bias must be a bool, got {self.single_dt_bias!r}")

    @property
    def E(self) -> int:
        return int(self.expand * self.d_model)

    @property
    def d(self) -> int:
        return self.E // 2

    @property
    def R(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def n_directions(self) -> int:
        return DIRECTIONS[self.directions]


def _scan_keys(k: int) -> Dict[str, str]:
    """Role -> state_dict key of scan direction k."""
    if k == 0:
        return dict(x_proj="x_proj.weight", dt_w="dt_proj.weight", dt_b="dt_proj.bias", A_log="A_log", D="D")
    return dict(x_proj=f"x_proj_{k}.weight", dt_w=f"dt_proj_{k}.weight", dt_b=f"dt_proj_{k}.bias",
                A_log=f"A_log_{k}", D=f"D_{k}")


def expected_shapes(config: GSSMConfig) -> Dict[str, Tuple[int, ...]]:
    """Ordered state_dict key -> shape for `config` (the spec's table, plus the extra scan directions)."""
    if torch.compiler.is_compiling():  # traced once per graph anyway; dynamo cannot store into the cache
        return _shape_table(config)
    table = _SHAPE_TABLES.get(config)
    if table is None:  # cached: every gssm call validates its parameters against it (GSSMConfig is hashable)
        table = _SHAPE_TABLES[config] = _shape_table(config)
    return dict(table)


_SHAPE_TABLES: Dict[GSSMConfig, Dict[str, Tuple[int, ...]]] = {}


def _shape_table(config: GSSMConfig) -> Dict[str, Tuple[int, ...]]:
    C, E, d, N, K, R = config.d_model, config.E, config.d, config.d_state, config.d_conv, config.R
    E4, d4 = E // 4, d // 4
    s = {
        "in_proj.weight": (E, C),
        "conv1d_x.weight": (d, 1, K), "conv1d_x.bias": (d,),
        "conv1d_z.weight": (d, 1, K), "conv1d_z.bias": (d,),
        "freq_ssm.low_freq_weight": (1,), "freq_ssm.high_freq_weight": (1,),
        "freq_ssm.low_freq_proj.weight": (d, d), "freq_ssm.low_freq_proj.bias": (d,),
        "freq_ssm.high_freq_proj.weight": (d, d), "freq_ssm.high_freq_proj.bias": (d,),
        "freq_ssm.freq_fusion.0.weight": (2 * d, 3 * d), "freq_ssm.freq_fusion.0.bias": (2 * d,),
        "freq_ssm.freq_fusion.2.weight": (d, 2 * d), "freq_ssm.freq_fusion.2.bias": (d,),
        "freq_gate.0.weight": (E4, d), "freq_gate.0.bias": (E4,),
        "freq_gate.2.weight": (1, E4), "freq_gate.2.bias": (1,),
        "freq_adaptive.freq_conv.0.weight": (d4, d, 1, 1), "freq_adaptive.freq_conv.0.bias": (d4,),
        "freq_adaptive.freq_conv.2.weight": (d, d4, 1, 1), "freq_adaptive.freq_conv.2.bias": (d,),
        "freq_adaptive.adaptive_weight.1.weight": (d4, d, 1, 1),
        "freq_adaptive.adaptive_weight.1.bias": (d4,),
        "freq_adaptive.adaptive_weight.3.weight": (2, d4, 1, 1),
        "freq_adaptive.adaptive_weight.3.bias": (2,),
        "freq_ratio": (),
    }
    for k in range(config.n_directions):
        keys = _scan_keys(k)
        s[keys["x_proj"]] = (R + 2 * N, d)
        s[keys["dt_w"]] = (d, R)
        s[keys["dt_b"]] = (d,)
        s[keys["A_log"]] = (d, N)
        s[keys["D"]] = (d,)
    s["out_proj.weight"] = (C, E)
    return s


def _field(key: str) -> str:
    return key.replace(".", "_")


# ------------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------------
Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


@dataclass
class GSSMParams:
    """Every parameter of the GSSM mixer. Field name = state_dict key with "." replaced by "_"
    (e.g. `freq_ssm_freq_fusion_0_weight` <-> "freq_ssm.freq_fusion.0.weight"). Fields of scan directions
    1..3 (keys `x_proj_{k}.weight`, `dt_proj_{k}.weight`, `dt_proj_{k}.bias`, `A_log_{k}`, `D_{k}`) are None
    unless the config's `directions` uses them."""
    in_proj_weight: Tensor
    conv1d_x_weight: Tensor
    conv1d_x_bias: Tensor
    conv1d_z_weight: Tensor
    conv1d_z_bias: Tensor
    freq_ssm_low_freq_weight: Tensor
    freq_ssm_high_freq_weight: Tensor
    freq_ssm_low_freq_proj_weight: Tensor
    freq_ssm_low_freq_proj_bias: Tensor
    freq_ssm_high_freq_proj_weight: Tensor
    freq_ssm_high_freq_proj_bias: Tensor
    freq_ssm_freq_fusion_0_weight: Tensor
    freq_ssm_freq_fusion_0_bias: Tensor
    freq_ssm_freq_fusion_2_weight: Tensor
    freq_ssm_freq_fusion_2_bias: Tensor
    freq_gate_0_weight: Tensor
    freq_gate_0_bias: Tensor
    freq_gate_2_weight: Tensor
    freq_gate_2_bias: Tensor
    freq_adaptive_freq_conv_0_weight: Tensor
    freq_adaptive_freq_conv_0_bias: Tensor
    freq_adaptive_freq_conv_2_weight: Tensor
    freq_adaptive_freq_conv_2_bias: Tensor
    freq_adaptive_adaptive_weight_1_weight: Tensor
    freq_adaptive_adaptive_weight_1_bias: Tensor
    freq_adaptive_adaptive_weight_3_weight: Tensor
    freq_adaptive_adaptive_weight_3_bias: Tensor
    freq_ratio: Tensor
    x_proj_weight: Tensor
    dt_proj_weight: Tensor
    dt_proj_bias: Tensor
    A_log: Tensor
    D: Tensor
    out_proj_weight: Tensor
    x_proj_1_weight: OptTensor = None
    dt_proj_1_weight: OptTensor = None
    dt_proj_1_bias: OptTensor = None
    A_log_1: OptTensor = None
    D_1: OptTensor = None
    x_proj_2_weight: OptTensor = None
    dt_proj_2_weight: OptTensor = None
    dt_proj_2_bias: OptTensor = None
    A_log_2: OptTensor = None
    D_2: OptTensor = None
    x_proj_3_weight: OptTensor = None
    dt_proj_3_weight: OptTensor = None
    dt_proj_3_bias: OptTensor = None
    A_log_3: OptTensor = None
    D_3: OptTensor = None

    # -- access by state_dict key ----------------------------------------------------------------------
    def __getitem__(self, key: str) -> Tensor:
        return getattr(self, _field(key))

    def scan_params(self, k: int) -> Dict[str, Tensor]:
        """Direction k's x_proj / dt_w / dt_b / A_log / D."""
        return {role: self[key] for role, key in _scan_keys(k).items()}

    def to_state_dict(self) -> Dict[str, Tensor]:
        """Key -> tensor (the release's key names; only the directions present)."""
        out = {}
        for name, key in _fields_and_keys():
            v = getattr(self, name)
            if v is not None:
                out[key] = v
        return out

    def replace(self, **kw) -> "GSSMParams":
        """A copy with some fields (by field name or by state_dict key) replaced."""
        return dataclasses.replace(self, **{_field(k): v for k, v in kw.items()})

    def check(self, config: GSSMConfig) -> None:
        """ValueError if a tensor required by `config` is missing or misshaped."""
        _validate(self.to_state_dict(), config, "params")

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd, config: GSSMConfig, prefix: Optional[str] = None) -> "GSSMParams":
        """Build from a state_dict (of the mixer, or of a larger model with `prefix`, e.g. "module." or
        "backbone.layers.0.mixer."). prefix=None auto-detects it (see the module docstring). Raises
        ValueError listing missing keys, unexpected keys and shape mismatches."""
        keys = list(sd.keys())
        if prefix is None:
            prefix = _detect_prefix(keys)
        if prefix:
            sub = {k[len(prefix):]: sd[k] for k in keys if k.startswith(prefix)}
        else:
            sub = dict(sd)
        _validate(sub, config, f"state_dict (prefix {prefix!r})")
        return cls(**{_field(k): v for k, v in sub.items()})

    @classmethod
    def init(cls, config: GSSMConfig, generator: Optional[torch.Generator] = None,
             dtype: torch.dtype = torch.float32, device=None) -> "GSSMParams":
        """Fresh parameters as the spec initialises them: dt_proj (weight uniform(+-R^-0.5 * dt_scale), bias =
        inverse softplus of exp(U(log dt_min, log dt_max)) clamped below at dt_init_floor), A_log = log(1..N)
        per channel, D = 1, low/high_freq_weight = 1, freq_ratio = 0.5, every other Linear / Conv PyTorch's
        default (kaiming_uniform(a=sqrt(5)) weight, i.e. U(+-1/sqrt(fan_in)), and bias U(+-1/sqrt(fan_in)))."""
        kw = dict(dtype=dtype, device=device)

        def unif(shape, bound):
            return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).to(**kw)

        shapes = expected_shapes(config)
        N, R, d = config.d_state, config.R, config.d
        out: Dict[str, Tensor] = {}
        scan_roles = {}
        for k in range(config.n_directions):
            for role, key in _scan_keys(k).items():
                scan_roles[key] = role
        for key, shape in shapes.items():
            role = scan_roles.get(key)
            if role == "dt_w":
                out[key] = dt_weight_init(config, generator, **kw)
            elif role == "dt_b":
                out[key] = dt_bias_init(config, generator, **kw)
            elif role == "A_log":
                out[key] = torch.log(torch.arange(1, N + 1, dtype=torch.float64)).repeat(d, 1).to(**kw)
            elif role == "D":
                out[key] = torch.ones(shape, **kw)
            elif key in ("freq_ssm.low_freq_weight", "freq_ssm.high_freq_weight"):
                out[key] = torch.ones(shape, **kw)
            elif key == "freq_ratio":
                out[key] = torch.full(shape, 0.5, **kw)
            elif key.endswith(".weight"):
                fan_in = math.prod(shape[1:])
                out[key] = unif(shape, 1 / math.sqrt(fan_in))
            elif key.endswith(".bias"):
                fan_in = math.prod(shapes[key[:-len("bias")] + "weight"][1:])
                out[key] = unif(shape, 1 / math.sqrt(fan_in))
            else:  # pragma: no cover - every key is covered above
                raise AssertionError(key)
        return cls(**{_field(k): v for k, v in out.items()})


def dt_weight_init(config: GSSMConfig, generator: Optional[torch.Generator] = None, dtype=torch.float32,
                   device=None) -> Tensor:
    """dt_proj's weight (d, R) as the spec initialises it: uniform(+-R^-0.5 * dt_scale)."""
    u = torch.rand((config.d, config.R), generator=generator, dtype=torch.float64)
    return ((u * 2 - 1) * (config.R ** -0.5 * config.dt_scale)).to(dtype=dtype, device=device)


def dt_bias_init(config: GSSMConfig, generator: Optional[torch.Generator] = None, dtype=torch.float32,
                 device=None) -> Tensor:
    """dt_proj's bias (d,): the inverse softplus of dt = exp(U(log dt_min, log dt_max)), dt >= dt_init_floor."""
    u = torch.rand((config.d,), generator=generator, dtype=torch.float64)
    dt = torch.exp(u * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min))
    dt = dt.clamp(min=config.dt_init_floor)
    return (dt + torch.log(-torch.expm1(-dt))).to(dtype=dtype, device=device)  # inverse softplus


_FIELDS_AND_KEYS: List[Tuple[str, str]] = []


def _fields_and_keys() -> List[Tuple[str, str]]:
    """(field name, state_dict key) of every GSSMParams field, filled once at import (at the end of this
    module): dataclasses.fields per call cost ~10 us of every gssm call's host time, and dynamo cannot trace
    it, so filling it lazily broke torch.compile(fullgraph=True) when a compiled call came first."""
    if not _FIELDS_AND_KEYS:
        keys = {_field(k): k for k in expected_shapes(GSSMConfig(d_model=16, directions="four"))}
        _FIELDS_AND_KEYS.extend((f.name, keys[f.name]) for f in dataclasses.fields(GSSMParams))
    return _FIELDS_AND_KEYS


def _detect_prefix(keys: List[str]) -> str:
    anchor = "in_proj.weight"
    if anchor in keys:
        return ""
    cands = [k[:-len(anchor)] for k in keys if k.endswith("." + anchor)]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        return ""  # nothing to anchor on: validation will report the missing keys
    raise ValueError(f"GSSMParams.from_state_dict: cannot auto-detect the prefix, several candidates "
                     f"{sorted(cands)}; pass prefix=...")


def _validate(sd: Dict[str, Tensor], config: GSSMConfig, what: str) -> None:
    shapes = expected_shapes(config)
    if len(sd) == len(shapes) and all(isinstance(t, torch.Tensor) and t.shape == shapes.get(k) and t.is_floating_point()
                                      for k, t in sd.items()):
        return  # the common case, checked in one pass; the lists below name what is wrong otherwise
    present = {k for k, v in sd.items() if v is not None}
    missing = [k for k in shapes if k not in present]
    unexpected = sorted(k for k in present if k not in shapes)
    mismatched = [f"{k}: expected {tuple(shapes[k])}, got {tuple(sd[k].shape)}"
                  for k in shapes if k in present and tuple(sd[k].shape) != tuple(shapes[k])]
    not_tensor = [k for k in present if not isinstance(sd[k], torch.Tensor)]
    not_float = sorted(k for k in present if isinstance(sd[k], torch.Tensor) and not sd[k].is_floating_point())
    if missing or unexpected or mismatched or not_tensor or not_float:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches: {mismatched}")
        if not_tensor:
            parts.append(f"not tensors: {sorted(not_tensor)}")
        if not_float:
            parts.append(f"not floating point: {[f'{k} ({sd[k].dtype})' for k in not_float]}")
        raise ValueError(f"GSSM parameters from {what} do not match {config}: " + "; ".join(parts))


# ------------------------------------------------------------------------------------------------------
# FEM pieces
# ------------------------------------------------------------------------------------------------------
def fem_low_mask(H: int, W: int, mask: str = "corner", device=None, dtype=torch.float32) -> Tensor:
    """The low-pass mask M, shape (H, W//2 + 1): M[u, v] = 1 where v < floor(Wr/4) and u is a kept row
    ("corner": u < floor(H/4); "symmetric": with n = floor(H/4), u < ceil(n/2) or u >= H - floor(n/2))."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    Wr = W // 2 + 1
    n = H // 4
    # Built on `device` from aranges: no host-to-device copy, so a CUDA graph can capture it.
    u = torch.arange(H, device=device)
    rows = u < n if mask == "corner" else (u < (n + 1) // 2) | (u >= H - n // 2)
    cols = torch.arange(Wr, device=device) < Wr // 4
    return (rows[:, None] & cols[None, :]).to(dtype)


def fem_split(x1: Tensor, mask: str = "corner") -> Tuple[Tensor, Tensor]:
    """low, high of x1 (B, d, H, W): low = irfft2(M * rfft2(x1), s=(H, W)) (norm "backward"),
    high = x1 - low. An empty mask gives low = 0 (no FFT)."""
    H, W = x1.shape[-2], x1.shape[-1]
    Wr = W // 2 + 1
    if H // 4 == 0 or Wr // 4 == 0:
        return torch.zeros_like(x1), x1
    xf = x1.to(accumulation_dtype(x1.dtype))
    M = fem_low_mask(H, W, mask, device=x1.device, dtype=xf.dtype)
    X = torch.fft.rfft2(xf, dim=(-2, -1), norm="backward")
    low = torch.fft.irfft2(M * X, s=(H, W), dim=(-2, -1), norm="backward").to(x1.dtype)
    return low, x1 - low


# ------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------
def _lin(v: Tensor, w: Tensor, b: OptTensor = None) -> Tensor:
    return F.linear(v, w.reshape(w.shape[0], -1), b)


def _direction_perm(k: int, H: int, W: int, device) -> Optional[Tensor]:
    """perm with seq_k[l'] = raster[perm[l']] (None for the identity)."""
    L = H * W
    if k == 0:
        return None
    if k == 1:
        return torch.arange(L - 1, -1, -1, device=device)
    colmajor = torch.arange(L, device=device).view(H, W).t().reshape(-1)  # l' = j*H + i -> i*W + j
    return colmajor if k == 2 else colmajor.flip(0)


def _strides_are_channels_last(x: Tensor) -> bool:
    """x.is_contiguous(memory_format=torch.channels_last) for a 4-D x, from the strides: inside
    torch.func.vmap (and jacrev, which vmaps) querying a memory format raises NYI, strides do not."""
    B, C, H, W = x.shape
    want = (H * W * C, 1, W * C, C)
    return all(size == 1 or stride == w for size, stride, w in zip(x.shape, x.stride(), want))


def _parse_input(x: Tensor, C: int, layout: Optional[str]) -> Tuple[Tensor, bool]:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D, (B, H, W, C) or channels_last (B, C, H, W); got shape "
                         f"{tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if layout not in (None, "bhwc", "bchw"):
        raise ValueError(f"layout must be None, 'bhwc' or 'bchw', got {layout!r}")
    if layout is None:
        if x.shape[1] == C and _strides_are_channels_last(x) and not x.is_contiguous():
            layout = "bchw"
        else:
            layout = "bhwc"
            if not torch.compiler.is_compiling() and x.shape[1] == C == x.shape[-1]:  # (no guard on H or W)
                # A contiguous (B, C, H, W) map with W = C would be read as tokens without any error.
                warnings.warn(f"x of shape {tuple(x.shape)} fits both (B, H, W, C) and (B, C, H, W) with "
                              f"C = {C}; it is read as (B, H, W, C) tokens (a (B, C, H, W) map is recognised "
                              "only in channels_last memory format). Pass layout='bhwc' or 'bchw' to say which.",
                              stacklevel=5)  # the caller of gmamba_ext.gssm
    if layout == "bchw":
        if x.shape[1] != C:
            raise ValueError(f"x: (B, C, H, W) input needs x.shape[1] == d_model = {C}, got shape "
                             f"{tuple(x.shape)}")
        return x.permute(0, 2, 3, 1), True
    if x.shape[-1] != C:
        hint = (" It looks like a (B, C, H, W) map, which is taken in channels_last memory format only: pass "
                "x.contiguous(memory_format=torch.channels_last), or layout='bchw'." if x.shape[1] == C else "")
        raise ValueError(f"x: expected (B, H, W, C) with C = d_model = {C} (or channels_last (B, C, H, W)), "
                         f"got shape {tuple(x.shape)}.{hint}")
    return x, False


def gssm_stages(x: Tensor, params: GSSMParams, config: GSSMConfig, layout: Optional[str] = None,
                initial_state: Optional[List[Optional[Tensor]]] = None, scan=None) -> Dict[str, Tensor]:
    """The forward of the spec, returning its intermediates as a dict (token tensors as (B, L, ch), raster
    order): x0, z0, x1, z1, [low, high (B, d, H, W), F, g (B,), F2, s (B, d), a (B, 2), xf], x2,
    y_k (per direction, raster order), y, out (the input's layout). initial_state: optional per-direction
    list of (B, d, N) scan states. scan: the selective scan to call, with mamba-ssm's `selective_scan_fn`
    signature (default selective_scan_ref; benchmarks pass mamba-ssm's or mambapy's to build the unfused
    composition users write today)."""
    if not isinstance(config, GSSMConfig):
        raise ValueError(f"config must be a GSSMConfig, got {type(config).__name__}")
    C, d, K = config.d_model, config.d, config.d_conv
    h, bchw = _parse_input(x, C, layout)
    Bsz, H, W, _ = h.shape
    L = H * W
    dt = h.dtype
    p = lambda key: params[key].to(dtype=dt, device=h.device)  # noqa: E731
    st: Dict[str, Tensor] = {}

    # 1. in_proj
    hs = h.reshape(Bsz, L, C)
    xz = _lin(hs, p("in_proj.weight"))
    x0, z0 = xz[..., :d], xz[..., d:]
    st["x0"], st["z0"] = x0, z0

    # 2. depthwise conv over the raster sequence, "same" zero padding, SiLU
    left = (K - 1) // 2
    right = K - 1 - left

    def dwconv(v, w, b):
        vc = F.pad(v.transpose(1, 2), (left, right))
        return F.silu(F.conv1d(vc, w, b, groups=d)).transpose(1, 2)

    x1 = dwconv(x0, p("conv1d_x.weight"), p("conv1d_x.bias"))
    z1 = dwconv(z0, p("conv1d_z.weight"), p("conv1d_z.bias"))
    st["x1"], st["z1"] = x1, z1

    variant = config.variant
    if variant == "ssm":
        x2 = x1
    else:
        # 3. FEM
        x1_img = x1.transpose(1, 2).reshape(Bsz, d, H, W)
        low_img, high_img = fem_split(x1_img, config.mask)
        st["low"], st["high"] = low_img, high_img
        low = low_img.reshape(Bsz, d, L).transpose(1, 2)
        if variant == "dft_fgmm_ssm":
            Fm = low
        else:
            high = high_img.reshape(Bsz, d, L).transpose(1, 2)
            lf = torch.sigmoid(p("freq_ssm.low_freq_weight")) * _lin(low, p("freq_ssm.low_freq_proj.weight"),
                                                                     p("freq_ssm.low_freq_proj.bias"))
            hf = torch.sigmoid(p("freq_ssm.high_freq_weight")) * _lin(high, p("freq_ssm.high_freq_proj.weight"),
                                                                      p("freq_ssm.high_freq_proj.bias"))
            cat = torch.cat([x1, lf, hf], dim=-1)
            Fm = _lin(F.relu(_lin(cat, p("freq_ssm.freq_fusion.0.weight"), p("freq_ssm.freq_fusion.0.bias"))),
                      p("freq_ssm.freq_fusion.2.weight"), p("freq_ssm.freq_fusion.2.bias"))
        st["F"] = Fm
        if variant == "fem_ssm":
            x2 = x1 + Fm
        else:
            # 4. global gate
            gt = torch.sigmoid(_lin(F.relu(_lin(Fm, p("freq_gate.0.weight"), p("freq_gate.0.bias"))),
                                    p("freq_gate.2.weight"), p("freq_gate.2.bias")))  # (B, L, 1)
            g = gt.mean(dim=1)  # (B, 1)
            # 5. FGMM
            F2 = Fm * torch.sigmoid(_lin(F.relu(_lin(Fm, p("freq_adaptive.freq_conv.0.weight"),
                                                     p("freq_adaptive.freq_conv.0.bias"))),
                                         p("freq_adaptive.freq_conv.2.weight"),
                                         p("freq_adaptive.freq_conv.2.bias")))
            s = (x1 + F2).mean(dim=1)  # (B, d)
            a = torch.softmax(_lin(F.relu(_lin(s, p("freq_adaptive.adaptive_weight.1.weight"),
                                               p("freq_adaptive.adaptive_weight.1.bias"))),
                                   p("freq_adaptive.adaptive_weight.3.weight"),
                                   p("freq_adaptive.adaptive_weight.3.bias")), dim=-1)  # (B, 2)
            xf = a[:, None, 0:1] * x1 + a[:, None, 1:2] * F2
            # 6. modulation
            x2 = xf * (1 + torch.sigmoid(p("freq_ratio")) * g[:, None, :])
            st.update(g=g[:, 0], F2=F2, s=s, a=a, xf=xf)
    st["x2"] = x2

    # 7. selective scan, per direction, mapped back to raster order and summed
    R, N = config.R, config.d_state
    u_raster = x2.transpose(1, 2)  # (B, d, L)
    y = None
    for k in range(config.n_directions):
        sp = {role: p(key) for role, key in _scan_keys(k).items()}
        perm = _direction_perm(k, H, W, h.device)
        u = u_raster if perm is None else u_raster.index_select(2, perm)
        x_dbl = _lin(u.transpose(1, 2), sp["x_proj"])  # (B, L, R + 2N)
        dl, Bt, Ct = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
        if config.single_dt_bias:
            delta = _lin(dl, sp["dt_w"])
        else:
            delta = _lin(dl, sp["dt_w"], sp["dt_b"])
        A = -torch.exp(sp["A_log"].to(accumulation_dtype(dt)))
        s0 = initial_state[k] if initial_state is not None else None
        extra = {} if s0 is None else dict(initial_state=s0)
        yk = (scan or selective_scan_ref)(u, delta.transpose(1, 2), A, Bt.transpose(1, 2).contiguous(),
                                          Ct.transpose(1, 2).contiguous(), D=sp["D"], delta_bias=sp["dt_b"],
                                          delta_softplus=True, **extra)
        if perm is not None:
            yk = yk.index_select(2, torch.argsort(perm))
        st[f"y_{k}"] = yk.transpose(1, 2)
        y = yk if y is None else y + yk
    y = y.transpose(1, 2)  # (B, L, d)
    st["y"] = y

    # 8. out_proj on [y | z1]
    out = _lin(torch.cat([y, z1], dim=-1), p("out_proj.weight")).reshape(Bsz, H, W, C)
    if bchw:
        out = out.permute(0, 3, 1, 2)
    st["out"] = out
    return st


def gssm_ref(x: Tensor, params: GSSMParams, config: GSSMConfig, layout: Optional[str] = None,
             initial_state: Optional[List[Optional[Tensor]]] = None, scan=None) -> Tensor:
    """GSSM mixer forward. x: (B, H, W, C), or (B, C, H, W) in channels_last memory format (the output then
    is (B, C, H, W), channels_last). Returns the input's layout and dtype. scan: see gssm_stages."""
    return gssm_stages(x, params, config, layout=layout, initial_state=initial_state, scan=scan)["out"]


_fields_and_keys()  # see its docstring

"""Shared helpers for the selective_scan tests: random inputs with realistic distributions, the float64
oracles and comparison helpers.

A test case is a plain dict (see `case`): sizes, dtype, layout, B/C modes and which optional inputs are
present. `make_inputs` draws the tensors for a case, `run_op` calls the public API on them, `run_ref`
evaluates gmamba_ext.reference.selective_scan_ref in float64 on the same values (upcast after any
low-precision rounding), and `ref_grads` differentiates a float64 oracle with autograd (the package
reference, or for long sequences `scan_oracle64`, which is checked against it).
"""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

try:
    import gmamba_ext
except ImportError:  # built in place (setup.py build_ext --inplace), not installed: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gmamba_ext
from gmamba_ext.reference import selective_scan_ref

# --------------------------------------------------------------------------------------------------------
# Tolerances: the op vs the float64 oracle evaluated on the same (already low-precision-rounded) inputs.
#
# mamba-ssm's own tests use rtol=6e-4, atol=2e-3 for float32 and rtol=3e-2, atol=5e-2 for bfloat16: floors
# we must beat. Measured on the distributions below (CPU kernel, L up to 4097, N up to 256):
# - float32 keeps its state in float32 with a ~1-ulp polynomial exp: max |err| ~3e-5 on outputs of
#   magnitude up to ~60 (error is mostly absolute, from the sum over N) -> rtol=1e-4, atol=1e-4.
# - bfloat16 / float16 compute in float32 and round the output once: |err| <= 1 unit roundoff of the format
#   (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4, both observed at ~0.99x) + the float32 error.
# - float64 agrees with the float64 reference to ~1e-13 (operation order only).
# --------------------------------------------------------------------------------------------------------
FWD_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=5e-3, atol=1e-3),
    torch.float16: dict(rtol=1e-3, atol=2e-4),
}
# last_state is returned in the accumulation dtype (float32 for fp32/bf16/fp16): no output rounding.
STATE_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-4, atol=1e-5),
}
# Gradients vs float64 autograd through the oracle, two criteria per gradient tensor:
# - elementwise: rtol, plus an atol relative to the largest magnitude of that gradient (dA, dD, constant
#   dB/dC and variable dB/dC sum many terms that cancel, so small entries carry absolute error);
# - as a whole: ||g - g_ref|| / ||g_ref|| <= norm_rel.
# du, ddelta, dz (and variable dB/dC, given in u's dtype) come back rounded to bf16/fp16; the weight
# gradients are float32. Measured maxima over the grid: float32 uses <10% of its elementwise tolerance and
# reaches 1.6e-6 norm-relative; bf16 / fp16 reach ~0.5x / ~0.35x of theirs (the output rounding).
GRAD_TOL = {
    torch.float64: dict(rtol=1e-9, atol_rel=1e-9, norm_rel=1e-11),
    torch.float32: dict(rtol=1e-4, atol_rel=1e-5, norm_rel=1e-5),
    torch.bfloat16: dict(rtol=5e-3, atol_rel=1e-3, norm_rel=3e-3),
    torch.float16: dict(rtol=1e-3, atol_rel=2e-4, norm_rel=4e-4),
}

DIFF_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
LOWP = (torch.bfloat16, torch.float16)


def case(**kw):
    """A test case with defaults. Keys:
    batch, d, L, N; dtype; layout 'cf' (channels first) or 'cl' (channels last);
    b_mode, c_mode: 'variable' (B, N, L), 'grouped' (B, G, N, L) with `groups`, or 'constant' (d, N);
    D, z, delta_bias, softplus, initial_state, last_state: booleans; a_init: 'exp' (-exp(randn)) or
    'range' (-(1..N), mamba's S4D-real init)."""
    c = dict(batch=2, d=4, L=19, N=3, dtype=torch.float32, layout="cf", b_mode="variable", c_mode="variable",
             groups=2, D=False, z=False, delta_bias=False, softplus=False, initial_state=False,
             last_state=False, a_init="exp")
    unknown = set(kw) - set(c)
    assert not unknown, unknown
    c.update(kw)
    if "grouped" in (c["b_mode"], c["c_mode"]):
        assert c["d"] % c["groups"] == 0, c
    return c


def case_id(c):
    dt = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[c["dtype"]]
    mode = {"variable": "v", "grouped": f"g{c['groups']}", "constant": "c"}
    flags = "".join(k[0] if k != "delta_bias" else "b" for k in ("D", "z", "delta_bias", "initial_state")
                    if c[k])
    flags += ("S" if c["softplus"] else "") + ("L" if c["last_state"] else "")
    return (f"{dt}-{c['layout']}-B{c['batch']}d{c['d']}L{c['L']}N{c['N']}-"
            f"{mode[c['b_mode']]}{mode[c['c_mode']]}-{flags or 'plain'}")


def _bc_shape(c, mode):
    b, d, L, N, G = c["batch"], c["d"], c["L"], c["N"], c["groups"]
    if mode == "constant":
        return (d, N)
    if c["layout"] == "cf":
        return (b, N, L) if mode == "variable" else (b, G, N, L)
    return (b, L, N) if mode == "variable" else (b, L, G, N)


def make_inputs(c, seed=0, device="cpu", requires_grad=False):
    """Draws the inputs of case `c` (on the CPU with a seeded generator, then moved to `device`).

    u, delta, z (and variable B/C, as mamba passes them) are in c['dtype']; A, constant B/C, D, delta_bias
    and initial_state are in the accumulation dtype (float32, float64 for float64), as a mamba layer holds
    them. Distributions: u, B, C, z ~ randn; A = -exp(randn) or -(1..N); delta either small positive
    (0.1 * rand + 1e-3) or, with softplus, raw randn*0.5 whose softplus lands in mamba's dt range; with
    softplus, delta_bias = log(expm1(U(1e-3, 0.1))) (mamba's dt init), else U(0, 0.05).
    """
    g = torch.Generator().manual_seed(seed)
    dtype = c["dtype"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b, d, L, N = c["batch"], c["d"], c["L"], c["N"]
    x_shape = (b, d, L) if c["layout"] == "cf" else (b, L, d)

    def randn(shape, dt):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dt)

    def rand(shape, dt):
        return torch.rand(shape, generator=g, dtype=torch.float64).to(dt)

    t = {}
    t["u"] = randn(x_shape, dtype)
    if c["softplus"]:
        t["delta"] = (0.5 * randn(x_shape, torch.float64)).to(dtype)
    else:
        t["delta"] = (0.1 * rand(x_shape, torch.float64) + 1e-3).to(dtype)
    if c["a_init"] == "exp":
        t["A"] = (-torch.exp(randn((d, N), torch.float64))).to(acc)
    else:
        t["A"] = (-torch.arange(1, N + 1, dtype=torch.float64)).repeat(d, 1).to(acc)
    for name, mode in (("B", c["b_mode"]), ("C", c["c_mode"])):
        t[name] = randn(_bc_shape(c, mode), acc if mode == "constant" else dtype)
    t["D"] = randn((d,), acc) if c["D"] else None
    t["z"] = randn(x_shape, dtype) if c["z"] else None
    if c["delta_bias"]:
        if c["softplus"]:
            dt_init = 1e-3 + (0.1 - 1e-3) * rand((d,), torch.float64)
            t["delta_bias"] = torch.log(torch.expm1(dt_init)).to(acc)
        else:
            t["delta_bias"] = (0.05 * rand((d,), torch.float64)).to(acc)
    else:
        t["delta_bias"] = None
    t["initial_state"] = randn((b, d, N), acc) if c["initial_state"] else None
    for k, v in t.items():
        if v is not None:
            v = v.to(device)
            if requires_grad:
                v.requires_grad_(True)
            t[k] = v
    return t


def api(c):
    return gmamba_ext.selective_scan if c["layout"] == "cf" else gmamba_ext.selective_scan_channels_last


def run_op(c, t, return_last_state=None):
    """Calls the public op on inputs `t`; returns (out, last_state or None)."""
    rls = c["last_state"] if return_last_state is None else return_last_state
    res = api(c)(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
                 delta_softplus=c["softplus"], return_last_state=rls, initial_state=t["initial_state"])
    return res if rls else (res, None)


def to_channels_first(c, t):
    """Independent layout conversion (so the reference's own channels_last path is not what is tested):
    (B, L, d) -> (B, d, L), (B, L, N) -> (B, N, L), (B, L, G, N) -> (B, G, N, L)."""
    if c["layout"] == "cf":
        return dict(t)
    t = dict(t)
    for k in ("u", "delta", "z"):
        if t[k] is not None:
            t[k] = t[k].transpose(1, 2)
    for k in ("B", "C"):
        if t[k].dim() == 3:
            t[k] = t[k].transpose(1, 2)
        elif t[k].dim() == 4:
            t[k] = t[k].permute(0, 2, 3, 1)
    return t


def upcast(t, dtype=torch.float64, requires_grad=False):
    """Detached copies of the (already rounded) inputs in `dtype`, on the CPU."""
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
        else:
            out[k] = v.detach().to("cpu", dtype).requires_grad_(requires_grad)
    return out


def ref_call(c, t64):
    """The reference on float64 inputs in the case's layout; returns (out (case layout), last_state)."""
    cf = to_channels_first(c, t64)
    out, last = selective_scan_ref(cf["u"], cf["delta"], cf["A"], cf["B"], cf["C"], D=cf["D"], z=cf["z"],
                                   delta_bias=cf["delta_bias"], delta_softplus=c["softplus"],
                                   return_last_state=True, initial_state=cf["initial_state"])
    if c["layout"] == "cl":
        out = out.transpose(1, 2)
    return out, last


def run_ref(c, t):
    """(out, last_state) of the reference in float64 on the upcast inputs `t`."""
    with torch.no_grad():
        return ref_call(c, upcast(t))


def scan_oracle64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  initial_state=None):
    """A second, independently written float64 scan (mamba-ssm's selective_scan_ref formulation: the
    discretised terms for all steps at once, then a loop over `unbind` views), channels-first only.

    Same math as gmamba_ext.reference.selective_scan_ref, but its autograd graph is O(L): the package
    reference indexes a (B, d, N, L) tensor at every step, whose backward materialises a full-size zero
    tensor per step (O(L^2)), which makes float64 gradients for L in the thousands take minutes. It is
    checked against the package reference (values and gradients) in test_selective_scan_reference.py.
    Returns (out, last_state)."""
    batch, d, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)

    def per_channel(M):  # -> (batch or 1, d, N, L)
        if M.dim() == 2:
            return M[None, :, :, None].expand(1, d, M.shape[1], max(L, 1))[..., :L]
        if M.dim() == 3:
            M = M[:, None]
        group_of_channel = torch.arange(d, device=M.device) // (d // M.shape[1])
        return M[:, group_of_channel]

    Bm, Cm = per_channel(B), per_channel(C)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bm.expand(batch, -1, -1, -1), u)
    x = initial_state if initial_state is not None else u.new_zeros(batch, d, A.shape[1])
    Cs = Cm.expand(batch, -1, -1, -1).unbind(-1)
    ys = []
    for t, (a_t, b_t) in enumerate(zip(decay.unbind(2), drive.unbind(2))):
        x = a_t * x + b_t
        ys.append((x * Cs[t]).sum(-1))
    y = torch.stack(ys, dim=-1) if L else u.new_zeros(batch, d, 0)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, x


def oracle_call(c, t64):
    """scan_oracle64 on float64 inputs in the case's layout; returns (out (case layout), last_state)."""
    cf = to_channels_first(c, t64)
    out, last = scan_oracle64(cf["u"], cf["delta"], cf["A"], cf["B"], cf["C"], D=cf["D"], z=cf["z"],
                              delta_bias=cf["delta_bias"], delta_softplus=c["softplus"],
                              initial_state=cf["initial_state"])
    if c["layout"] == "cl":
        out = out.transpose(1, 2)
    return out, last


def ref_grads(c, t, dout, dlast=None, oracle="auto"):
    """Gradients of <out, dout> + <last_state, dlast> w.r.t. every present input, by float64 autograd
    through the package reference (oracle='ref') or through scan_oracle64 (oracle='fast'); 'auto' takes
    the package reference when its O(L^2 * B * d * N) backward is cheap."""
    if oracle == "auto":
        oracle = "ref" if c["L"] ** 2 * c["batch"] * c["d"] * c["N"] <= 2_000_000 else "fast"
    t64 = upcast(t, requires_grad=True)
    out, last = (ref_call if oracle == "ref" else oracle_call)(c, t64)
    loss = (out * dout.detach().to("cpu", torch.float64)).sum()
    if dlast is not None:
        loss = loss + (last * dlast.detach().to("cpu", torch.float64)).sum()
    names = [k for k in DIFF_NAMES if t64[k] is not None]
    grads = torch.autograd.grad(loss, [t64[k] for k in names])
    return dict(zip(names, grads))


def op_grads(c, t, dout, dlast=None):
    """Gradients through the op (inputs `t` must require grad)."""
    out, last = run_op(c, t, return_last_state=dlast is not None)
    outputs, grads_out = [out], [dout]
    if dlast is not None:
        outputs.append(last)
        grads_out.append(dlast)
    names = [k for k in DIFF_NAMES if t[k] is not None]
    grads = torch.autograd.grad(outputs, [t[k] for k in names], grads_out)
    return dict(zip(names, grads))


def raw_fwd_args(c, t, requires_grad):
    """The op's positional arguments, as the wrapper would pass them (weights in the accumulation dtype)."""
    acc = torch.float64 if c["dtype"] == torch.float64 else torch.float32
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    args = []
    for k in names:
        v = t[k]
        if v is not None:
            v = v.detach()
            if k not in ("u", "delta", "z"):
                v = v.to(acc)
            v = v.contiguous().requires_grad_(requires_grad)
        args.append(v)
    return (*args, c["softplus"], c["layout"] == "cl")


def assert_close64(actual, expected, rtol, atol, msg=""):
    """assert_close of `actual` (any dtype/device) against a float64 CPU `expected`."""
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected.detach().to(torch.float64),
                               rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{msg}\n{m}")


def assert_grads_close(actual, expected, dtype, names=None, tol=None):
    tol = tol or GRAD_TOL[dtype]
    for k in names or expected:
        exp = expected[k].to(torch.float64)
        scale = exp.abs().max().item() if exp.numel() else 0.0
        assert actual[k].shape == exp.shape, (k, actual[k].shape, exp.shape)
        assert_close64(actual[k], exp, rtol=tol["rtol"], atol=tol["atol_rel"] * max(scale, 1e-6),
                       msg=f"grad of {k} (max |grad| = {scale:.3g})")
        if exp.numel() and scale > 0:
            rel = ((actual[k].detach().to("cpu", torch.float64) - exp).norm() / exp.norm()).item()
            assert rel <= tol["norm_rel"], f"grad of {k}: norm-relative error {rel:.3g} > {tol['norm_rel']}"


def check_forward(c, seed=0, device="cpu", tol=None):
    """Forward of the op vs the float64 reference (and last_state when requested); returns the op's out.
    `tol` overrides FWD_TOL[dtype] (and STATE_TOL)."""
    t = make_inputs(c, seed=seed, device=device)
    out, last = run_op(c, t)
    ref_out, ref_last = run_ref(c, t)
    exp_shape = (c["batch"], c["d"], c["L"]) if c["layout"] == "cf" else (c["batch"], c["L"], c["d"])
    assert out.shape == exp_shape and out.dtype == c["dtype"] and out.device.type == torch.device(device).type
    assert_close64(out, ref_out, **(tol or FWD_TOL[c["dtype"]]), msg="out")
    if c["last_state"]:
        acc = torch.float64 if c["dtype"] == torch.float64 else torch.float32
        assert last.shape == (c["batch"], c["d"], c["N"]) and last.dtype == acc
        assert_close64(last, ref_last, **(tol or STATE_TOL[c["dtype"]]), msg="last_state")
    return out


def gradcheck_case(c, seed=0, names=DIFF_NAMES, fast_mode=False, device="cpu", output=None):
    """float64 gradcheck of the op for case c w.r.t. the present inputs among `names`; output "both",
    "out" or "last" (default: both when c asks for last_state, else out)."""
    t = make_inputs(c, seed=seed, device=device)
    present = [k for k in DIFF_NAMES if t[k] is not None]
    wrt = [k for k in present if k in names]
    leaves = [t[k].detach().clone().requires_grad_(True) for k in wrt]
    output = output or ("both" if c["last_state"] else "out")

    def fn(*xs):
        kw = dict(t)
        kw.update(zip(wrt, xs))
        out, last = api(c)(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"],
                           delta_bias=kw["delta_bias"], delta_softplus=c["softplus"], return_last_state=True,
                           initial_state=kw["initial_state"])
        return {"both": (out, last), "out": out, "last": last}[output]

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast_mode)


def random_cotangents(c, t, seed, with_dlast):
    g = torch.Generator().manual_seed(seed + 1000)
    out_shape = t["u"].shape
    dout = torch.randn(out_shape, generator=g, dtype=torch.float64).to(c["dtype"]).to(t["u"].device)
    dlast = None
    if with_dlast:
        acc = torch.float64 if c["dtype"] == torch.float64 else torch.float32
        dlast = torch.randn((c["batch"], c["d"], c["N"]), generator=g, dtype=torch.float64).to(acc)
        dlast = dlast.to(t["u"].device)
    return dout, dlast


def check_backward(c, seed=0, device="cpu", tol=None):
    """Gradients of every present input through the op vs float64 autograd through the reference."""
    t = make_inputs(c, seed=seed, device=device, requires_grad=True)
    dout, dlast = random_cotangents(c, t, seed, with_dlast=c["last_state"])
    got = op_grads(c, t, dout, dlast)
    exp = ref_grads(c, t, dout, dlast)
    assert set(got) == set(exp)
    for k in got:
        assert got[k].dtype == t[k].dtype and got[k].device == t[k].device, k
    assert_grads_close(got, exp, c["dtype"], tol=tol)


def random_cases(n, seed, dtypes=(torch.float32,)):
    """`n` seeded random combinations of every option, with sizes bounded so the sequential reference
    stays cheap (big L only with small d * batch * N)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        L = rng.choice([1, 2, 7, 15, 16, 17, 31, 33, 49, 64, 100, 196, 3136])
        N = rng.choice([1, 2, 4, 8, 16, 64] + ([256] if L <= 49 else []))
        dims = [1, 3, 4, 5, 8, 12, 16, 24, 40] if L * N <= 196 * 16 else [1, 3, 4, 5, 8]
        d = rng.choice(dims)
        batch = rng.choice([1, 2, 3] if L < 3136 else [1])
        groups = rng.choice([g for g in (1, 2, 4, 8) if d % g == 0])
        modes = ["variable", "constant"] + (["grouped"] if groups > 1 else [])
        b_mode, c_mode = rng.choice(modes), rng.choice(modes)
        if {b_mode, c_mode} == {"variable", "grouped"}:  # B and C must share G (as in mamba-ssm)
            b_mode = c_mode = "grouped"
        cases.append(case(batch=batch, d=d, L=L, N=N, dtype=rng.choice(dtypes), layout=rng.choice(["cf", "cl"]),
                          b_mode=b_mode, c_mode=c_mode, groups=groups,
                          D=rng.random() < 0.5, z=rng.random() < 0.5, delta_bias=rng.random() < 0.5,
                          softplus=rng.random() < 0.5, initial_state=rng.random() < 0.5,
                          last_state=rng.random() < 0.5, a_init=rng.choice(["exp", "range"])))
    return cases


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


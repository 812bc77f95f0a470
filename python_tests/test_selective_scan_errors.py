"""Bad input to selective_scan must raise a Python exception (ValueError for shapes/values, TypeError for
types) whose message names the offending argument; the raw ops check the same (and contiguity)."""
import numpy as np
import pytest
import torch

import gmamba_ext

b, d, L, N = 2, 4, 10, 3
ss = gmamba_ext.selective_scan
ss_cl = gmamba_ext.selective_scan_channels_last


def inputs(layout="cf"):
    g = torch.Generator().manual_seed(0)
    xs = (b, d, L) if layout == "cf" else (b, L, d)
    bc = (b, N, L) if layout == "cf" else (b, L, N)
    return dict(u=torch.randn(xs, generator=g), delta=0.1 * torch.rand(xs, generator=g),
                A=-torch.rand(d, N, generator=g), B=torch.randn(bc, generator=g), C=torch.randn(bc, generator=g))


def call(layout="cf", **override):
    kw = inputs(layout)
    kw.update(override)
    fn = ss if layout == "cf" else ss_cl
    return fn(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw)


x = inputs()
SHAPE_ERRORS = [
    # (id, overrides, layout, pattern naming the argument)
    ("u_2d", dict(u=x["u"][0], delta=x["delta"][0]), "cf", r"argument 'u' must be 3-D"),
    ("u_4d", dict(u=x["u"][None], delta=x["delta"][None]), "cf", r"argument 'u' must be 3-D"),
    ("delta_shape", dict(delta=x["delta"][..., :-1]), "cf", r"argument 'delta' must have shape"),
    ("delta_rank", dict(delta=x["delta"][0]), "cf", r"argument 'delta'"),
    ("z_shape", dict(z=torch.randn(b, d, L + 1)), "cf", r"argument 'z' must have shape"),
    ("B_wrong_L", dict(B=x["B"][..., :-1]), "cf", r"argument 'B' must have shape"),
    ("C_wrong_L", dict(C=x["C"][..., :-1]), "cf", r"argument 'C' must have shape"),
    ("B_wrong_batch", dict(B=x["B"][:1]), "cf", r"argument 'B' must have shape"),
    ("C_wrong_N", dict(C=x["C"][:, :2]), "cf", r"argument 'C' must have shape"),
    ("B_1d", dict(B=torch.randn(N)), "cf", r"argument 'B'"),
    ("C_5d", dict(C=torch.randn(b, 1, 1, N, L)), "cf", r"argument 'C'"),
    ("B_const_wrong_d", dict(B=torch.randn(d + 1, N)), "cf", r"argument 'B' must have shape"),
    ("B_grouped_wrong_N", dict(B=torch.randn(b, 2, N + 1, L), C=torch.randn(b, 2, N, L)), "cf", r"argument 'B'"),
    ("A_wrong_d", dict(A=-torch.rand(d - 1, N)), "cf", r"argument 'A' must have shape"),
    ("A_1d", dict(A=-torch.rand(d)), "cf", r"argument 'A'"),
    ("A_3d", dict(A=-torch.rand(1, d, N)), "cf", r"argument 'A'"),
    ("A_N_mismatch_B", dict(A=-torch.rand(d, N + 1)), "cf", r"argument 'B' must have shape"),
    ("groups_not_dividing_d", dict(B=torch.randn(b, 3, N, L), C=torch.randn(b, 3, N, L)), "cf",
     r"divisible by the number of groups G=3 of argument 'B'"),
    ("groups_not_dividing_d_C", dict(C=torch.randn(b, 3, N, L), B=torch.randn(d, N)), "cf",
     r"divisible by the number of groups G=3 of argument 'C'"),
    ("groups_B_C_differ", dict(B=torch.randn(b, 2, N, L), C=torch.randn(b, 4, N, L)), "cf",
     r"'B' and 'C' have different group counts"),
    ("D_shape", dict(D=torch.randn(d + 1)), "cf", r"argument 'D' must have shape"),
    ("D_2d", dict(D=torch.randn(d, 1)), "cf", r"argument 'D' must have shape"),
    ("delta_bias_shape", dict(delta_bias=torch.randn(d - 1)), "cf", r"argument 'delta_bias' must have shape"),
    ("initial_state_shape", dict(initial_state=torch.randn(b, d, N + 1)), "cf",
     r"argument 'initial_state' must have shape"),
    ("initial_state_batch", dict(initial_state=torch.randn(b + 1, d, N)), "cf", r"argument 'initial_state'"),
    ("N_too_large", dict(A=-torch.rand(d, 257), B=torch.randn(b, 257, L), C=torch.randn(b, 257, L)), "cf",
     r"A\.shape\[1\] must be in \[1, 256\], got 257"),
    ("N_zero", dict(A=-torch.rand(d, 0), B=torch.randn(b, 0, L), C=torch.randn(b, 0, L)), "cf",
     r"A\.shape\[1\] must be in \[1, 256\], got 0"),
    # channels-last: B/C given in the channels-first layout are caught
    ("cl_B_in_cf_layout", dict(B=torch.randn(b, N, L)), "cl", r"argument 'B' must have shape \[2, 10, 3\]"),
    ("cl_grouped_wrong", dict(B=torch.randn(b, L, 3, N), C=torch.randn(b, L, 3, N)), "cl",
     r"groups G=3 of argument 'B'"),
]


@pytest.mark.parametrize("override,layout,pattern", [e[1:] for e in SHAPE_ERRORS], ids=[e[0] for e in SHAPE_ERRORS])
def test_shape_errors_raise_value_error_naming_argument(override, layout, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(layout, **override)


def test_channels_first_tensors_to_channels_last_api():
    """(B, d, L) tensors given to the channels-last op read d from their last dim: the A check fires."""
    with pytest.raises(ValueError, match=r"argument 'A' must have shape \(d, N\) = \(10, N\)"):
        call("cl", **inputs("cf"))


DTYPE_ERRORS = [
    ("delta_f16_vs_u_f32", dict(delta=x["delta"].half()), r"argument 'delta' must have u's dtype"),
    ("delta_bf16_vs_u_f32", dict(delta=x["delta"].bfloat16()), r"argument 'delta' must have u's dtype"),
    ("u_f16_vs_delta_f32", dict(u=x["u"].half()), r"argument 'delta' must have u's dtype"),
    ("z_f64_vs_u_f32", dict(z=torch.randn(b, d, L, dtype=torch.float64)), r"argument 'z' must have u's dtype"),
    ("u_int", dict(u=x["u"].long(), delta=x["delta"].long()), r"argument 'u' must be a floating-point"),
    ("u_bool", dict(u=x["u"] > 0), r"argument 'u' must be a floating-point"),
    ("u_complex", dict(u=torch.complex(x["u"], x["u"])), r"argument 'u' must be a floating-point"),
    ("delta_int", dict(delta=x["delta"].int()), r"argument 'delta'"),
    ("z_int", dict(z=torch.ones(b, d, L, dtype=torch.int64)), r"argument 'z'"),
    ("A_int", dict(A=-torch.ones(d, N, dtype=torch.int64)), r"argument 'A' must be a floating-point"),
    ("A_complex", dict(A=torch.complex(x["A"], x["A"])), r"argument 'A'"),
    ("B_int", dict(B=x["B"].int()), r"argument 'B' must be a floating-point"),
    ("C_int", dict(C=x["C"].to(torch.int16)), r"argument 'C' must be a floating-point"),
    ("D_int", dict(D=torch.ones(d, dtype=torch.int64)), r"argument 'D' must be a floating-point"),
    ("delta_bias_int", dict(delta_bias=torch.ones(d, dtype=torch.int32)), r"argument 'delta_bias'"),
    ("initial_state_int", dict(initial_state=torch.ones(b, d, N, dtype=torch.int64)), r"argument 'initial_state'"),
]


@pytest.mark.parametrize("override,pattern", [e[1:] for e in DTYPE_ERRORS], ids=[e[0] for e in DTYPE_ERRORS])
def test_dtype_errors_raise_type_error_naming_argument(override, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(**override)


NON_TENSORS = [
    ("u", x["u"].tolist()), ("u", x["u"].numpy()), ("delta", 0.1), ("A", None), ("B", 1.0), ("C", "C"),
    ("D", 1.0), ("z", [1.0]), ("delta_bias", np.zeros(d, dtype=np.float32)), ("initial_state", 0),
]


@pytest.mark.parametrize("name,value", NON_TENSORS, ids=[f"{n}-{type(v).__name__}" for n, v in NON_TENSORS])
def test_non_tensor_arguments_raise_type_error_naming_argument(name, value):
    with pytest.raises(TypeError, match=rf"argument '{name}' must be a torch\.Tensor"):
        call(**{name: value})


@pytest.mark.parametrize("name", ["delta", "A", "B", "D", "z", "initial_state"])
def test_mixed_devices_on_the_reference_fallback_name_the_argument(name):
    """Devices without a kernel (here 'meta') run the reference: it checks devices as the kernels do."""
    kw = dict(inputs(), D=torch.randn(d), z=torch.randn(b, d, L), initial_state=torch.randn(b, d, N))
    kw = {k: v if k == name else v.to("meta") for k, v in kw.items()}
    with pytest.raises(ValueError, match=rf"argument '{name}' is on cpu but 'u' is on meta"):
        ss(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw)


@pytest.mark.parametrize("name", ["delta", "A", "B", "D", "z", "initial_state"])
def test_one_argument_on_meta_names_it(name):
    """The dispatcher hands such a call to the fake kernel, which returned an uninitialised CPU tensor."""
    kw = dict(inputs(), D=torch.randn(d), z=torch.randn(b, d, L), initial_state=torch.randn(b, d, N))
    kw[name] = kw[name].to("meta")
    with pytest.raises(ValueError, match=rf"argument '{name}' is on meta but 'u' is on cpu"):
        ss(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw)


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_error_messages_name_the_op(layout):
    with pytest.raises(ValueError, match=r"^selective_scan: "):
        call(layout, A=-torch.rand(d + 1, N))


def test_weights_in_another_float_dtype_are_cast_not_rejected():
    """The wrapper casts A, B, C, D, delta_bias, initial_state to the accumulation dtype: float64 weights
    with float32 u give the float32-weight result."""
    kw = inputs()
    D, h0 = torch.randn(d, dtype=torch.float64), torch.randn(b, d, N, dtype=torch.float64)
    out64w = ss(kw["u"], kw["delta"], kw["A"].double(), kw["B"].double(), kw["C"].half(), D=D,
                delta_bias=torch.zeros(d, dtype=torch.bfloat16), initial_state=h0)
    out32w = ss(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"].half().float(), D=D.float(),
                delta_bias=torch.zeros(d), initial_state=h0.float())
    assert out64w.dtype == torch.float32
    torch.testing.assert_close(out64w, out32w, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# The raw ops (no wrapper): they check everything themselves, including what the wrapper normally fixes.
# ---------------------------------------------------------------------------------------------------------
fwd = torch.ops.gmamba_ext.selective_scan_fwd
bwd = torch.ops.gmamba_ext.selective_scan_bwd


def raw_args(**override):
    kw = inputs()
    args = dict(u=kw["u"], delta=kw["delta"], A=kw["A"], B=kw["B"], C=kw["C"], D=None, z=None, delta_bias=None,
                initial_state=None)
    args.update(override)
    return (*args.values(), False, False)


@pytest.mark.parametrize("name", ["u", "delta", "B"])
def test_raw_op_rejects_non_contiguous(name):
    t = inputs()[name]
    nc = t.transpose(1, 2).contiguous().transpose(1, 2)
    assert not nc.is_contiguous()
    with pytest.raises(ValueError, match=rf"argument '{name}' must be contiguous"):
        fwd(*raw_args(**{name: nc}))


@pytest.mark.parametrize("name,value", [("A", -torch.rand(d, N, dtype=torch.float64)),
                                        ("B", torch.randn(b, N, L).half()),
                                        ("D", torch.randn(d, dtype=torch.float64)),
                                        ("initial_state", torch.randn(b, d, N).bfloat16())])
def test_raw_op_rejects_weights_not_in_accumulation_dtype(name, value):
    with pytest.raises(TypeError, match=rf"argument '{name}' must be Float for Float inputs"):
        fwd(*raw_args(**{name: value}))


def test_raw_op_accepts_fp32_weights_for_bf16_inputs():
    kw = inputs()
    out, last, ckpt = fwd(*raw_args(u=kw["u"].bfloat16(), delta=kw["delta"].bfloat16()))
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32 and ckpt.dtype == torch.float32
    assert ckpt.shape == (b, (L + 15) // 16, N, d)


def test_raw_bwd_checks_its_extra_arguments():
    args = raw_args()
    out, last, ckpt = fwd(*args)
    u, delta, A, B, C, D, z, bias, h0, sp, cl = args
    good_dout = torch.randn_like(out)
    with pytest.raises(ValueError, match=r"'dout'"):
        bwd(good_dout[..., :-1], None, ckpt, u, delta, A, B, C, D, z, bias, h0, sp, cl)
    with pytest.raises(ValueError, match=r"'dout'"):
        bwd(good_dout.double(), None, ckpt, u, delta, A, B, C, D, z, bias, h0, sp, cl)
    with pytest.raises(ValueError, match=r"argument 'dlast_state' must have shape"):
        bwd(good_dout, torch.randn(b, d, N + 1), ckpt, u, delta, A, B, C, D, z, bias, h0, sp, cl)
    with pytest.raises(TypeError, match=r"argument 'dlast_state'"):
        bwd(good_dout, torch.randn(b, d, N, dtype=torch.float64), ckpt, u, delta, A, B, C, D, z, bias, h0, sp, cl)
    with pytest.raises(ValueError, match=r"argument 'checkpoints' must have shape"):
        bwd(good_dout, None, ckpt[:, :-1], u, delta, A, B, C, D, z, bias, h0, sp, cl)
    with pytest.raises(TypeError, match=r"argument 'checkpoints'"):
        bwd(good_dout, None, ckpt.double(), u, delta, A, B, C, D, z, bias, h0, sp, cl)

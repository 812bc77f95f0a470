"""NaN / inf in the inputs of selective_scan and gssm: propagated by default, a ValueError naming the argument
and the first bad index under torch.autograd.detect_anomaly or GMAMBA_CHECK_FINITE=always
(gmamba_ext/finite_checks.py)."""
import warnings

import pytest
import torch

import gmamba_ext
from conftest import DIFF_NAMES, case, make_inputs, run_op
from gmamba_ext.gssm import gssm_composition
from gssm_helpers import make

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def scan_case(layout, device="cpu"):
    """(case, inputs) with every optional scan input present (conftest's helpers)."""
    c = case(layout=layout, D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
    return c, make_inputs(c, device=device)


def scan(c, t):
    return run_op(c, t)[0]


def poison(t, value):
    """A copy of t with `value` at its last element; returns (copy, that element's index)."""
    t = t.clone()
    index = tuple(s - 1 for s in t.shape)
    t[index] = value
    return t, index


@pytest.fixture
def anomaly_mode():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Anomaly Detection has been enabled..."
        with torch.autograd.detect_anomaly(check_nan=False):
            yield


@pytest.fixture(autouse=True)
def default_mode(monkeypatch):
    monkeypatch.delenv("GMAMBA_CHECK_FINITE", raising=False)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("name", DIFF_NAMES)
def test_scan_names_the_argument_and_index_under_anomaly_mode(anomaly_mode, layout, name):
    c, t = scan_case(layout)
    t[name], index = poison(t[name], float("nan"))
    with pytest.raises(ValueError, match=rf"selective_scan: argument '{name}' holds a non-finite value "
                                         rf"\(nan at index \({', '.join(map(str, index))},?\)\)"):
        scan(c, t)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_scan_names_inf_with_its_sign(monkeypatch, value):
    monkeypatch.setenv("GMAMBA_CHECK_FINITE", "always")
    c, t = scan_case("cf")
    t["z"], _ = poison(t["z"], value)
    with pytest.raises(ValueError, match=rf"argument 'z' holds a non-finite value \({value}"):
        scan(c, t)


def test_scan_propagates_nan_by_default_and_with_never(monkeypatch, anomaly_mode):
    c, t = scan_case("cf")
    t["u"], _ = poison(t["u"], float("nan"))
    monkeypatch.setenv("GMAMBA_CHECK_FINITE", "never")  # anomaly mode is on, the checks are not
    assert scan(c, t).isnan().any()
    monkeypatch.setenv("GMAMBA_CHECK_FINITE", "auto")
    with torch.autograd.set_detect_anomaly(False):
        assert scan(c, t).isnan().any()


def test_checked_call_returns_what_an_unchecked_call_does(monkeypatch):
    c, t = scan_case("cl")
    plain = scan(c, t)
    monkeypatch.setenv("GMAMBA_CHECK_FINITE", "always")
    assert torch.equal(scan(c, t), plain)


def test_bad_setting_is_a_value_error(monkeypatch):
    monkeypatch.setenv("GMAMBA_CHECK_FINITE", "yes")
    with pytest.raises(ValueError, match="GMAMBA_CHECK_FINITE must be one of"):
        scan(*scan_case("cf"))


def gssm_case():
    cfg, p, g = make(C=16, dtype=torch.float32)
    x = torch.randn(2, 5, 6, 16, generator=g)
    return cfg, p, x


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composition"])
def test_gssm_names_x_a_parameter_and_the_initial_state(monkeypatch, fused):
    monkeypatch.setenv("GMAMBA_CHECK_FINITE", "always")
    fn = gmamba_ext.gssm if fused else gssm_composition
    cfg, p, x = gssm_case()
    bad_x, index = poison(x, float("nan"))
    with pytest.raises(ValueError, match=rf"gssm: x holds a non-finite value \(nan at index \(1, 4, 5, 15\)\)"):
        fn(bad_x, p)
    for key in ("freq_ssm.freq_fusion.0.weight", "A_log", "freq_ratio"):
        bad, index = poison(p[key], float("inf"))
        with pytest.raises(ValueError, match=rf"gssm: parameter '{key}' holds a non-finite value \(inf"):
            fn(x, p.from_state_dict({**p.to_state_dict(), key: bad}, cfg))
    state, _ = poison(torch.zeros(2, cfg.d, cfg.d_state), float("nan"))
    with pytest.raises(ValueError, match=r"gssm: initial_state\[0\] holds a non-finite value"):
        fn(x, p, initial_state=state)


def test_gssm_module_under_anomaly_mode(anomaly_mode):
    module = gmamba_ext.nn.GSSM(16)
    x, _ = poison(torch.randn(1, 4, 4, 16), float("nan"))
    with pytest.raises(ValueError, match=r"gssm: x holds a non-finite value"):
        module(x)


def test_gssm_without_the_checks_propagates(monkeypatch):
    cfg, p, x = gssm_case()
    bad_x, _ = poison(x, float("nan"))
    out = gmamba_ext.gssm(bad_x, p)  # the NaN is in sample 1, where it reaches every output (global mixing)
    assert out[1].isnan().all() and out[0].isfinite().all()
    monkeypatch.setenv("GMAMBA_CHECK_FINITE", "always")
    assert torch.equal(gmamba_ext.gssm(x, p), gmamba_ext.gssm(x.clone(), p))


@pytest.mark.parametrize("mode", ["always", "anomaly"])
def test_traced_calls_skip_the_checks(monkeypatch, mode):
    """torch.compile cannot read values while tracing: the checks step aside rather than break the graph."""
    cfg, p, x = gssm_case()
    c, t = scan_case("cf")
    if mode == "always":
        monkeypatch.setenv("GMAMBA_CHECK_FINITE", "always")
    with torch.autograd.set_detect_anomaly(mode == "anomaly"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        compiled = torch.compile(lambda t: scan(c, t), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(t), scan(c, t))
        compiled = torch.compile(lambda x: gmamba_ext.gssm(x, p), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), gmamba_ext.gssm(x, p))


def test_meta_tensors_skip_the_checks():
    from gmamba_ext.finite_checks import check_finite

    check_finite("f", [("t", torch.empty(3, device="meta"))])  # nothing to read: no error


@cuda
@pytest.mark.parametrize("name", ["u", "B", "initial_state"])
def test_scan_checks_on_cuda(anomaly_mode, name):
    c, t = scan_case("cl", "cuda")
    t[name], index = poison(t[name], float("nan"))
    with pytest.raises(ValueError, match=rf"argument '{name}' holds a non-finite value \(nan at index"):
        scan(c, t)
    c, t = scan_case("cl", "cuda")
    torch.testing.assert_close(scan(c, t).cpu(), scan(c, {k: v.cpu() for k, v in t.items()}), rtol=1e-4, atol=1e-4)


@cuda
def test_gssm_checks_on_cuda(anomaly_mode):
    cfg, p, x = gssm_case()
    p = p.from_state_dict({k: v.cuda() for k, v in p.to_state_dict().items()}, cfg)
    bad_x, _ = poison(x, float("inf"))
    with pytest.raises(ValueError, match=r"gssm: x holds a non-finite value \(inf at index \(1, 4, 5, 15\)\)"):
        gmamba_ext.gssm(bad_x.cuda(), p)

"""The suite must exercise the compiled kernels: if gmamba_ext fell back to its pure-PyTorch reference
(extension not built or not importable), every comparison would be the reference against itself."""
import os

import pytest
import torch

import gmamba_ext
from gmamba_ext import ops


@pytest.mark.skipif(os.environ.get("GMAMBA_ALLOW_REFERENCE_ONLY") == "1",
                    reason="GMAMBA_ALLOW_REFERENCE_ONLY=1: testing the pure-PyTorch fallback on purpose")
def test_compiled_cpu_kernel_is_loaded():
    assert gmamba_ext.HAS_EXTENSION, f"gmamba_ext._C did not import: {getattr(ops, '_IMPORT_ERROR', None)}"
    assert ops._has_kernel(torch.device("cpu"))


def test_python_m_gmamba_ext_reports(capsys):
    from gmamba_ext.__main__ import main

    main()
    out = capsys.readouterr().out
    assert "kernel for cpu: yes" in out or not gmamba_ext.HAS_EXTENSION
    assert f"torch {torch.__version__}" in out
    assert "CPU kernels:" in out or not gmamba_ext.HAS_EXTENSION


@pytest.mark.parametrize("name, prefix, cases", [
    ("GMAMBA_GSSM_SAVE", "gssm keeps xz, x1, z1, relu(pre) for the backward",
     ((None, "cpu yes, cuda no (recomputed) (GMAMBA_GSSM_SAVE=auto)"),
      ("recompute", "cpu no (recomputed), cuda no (recomputed) (GMAMBA_GSSM_SAVE=recompute)"),
      ("x", "GMAMBA_GSSM_SAVE must be 'auto', 'keep' or 'recompute', got 'x'"))),
    ("GMAMBA_GSSM_LOWPASS", "gssm's FEM low-pass runs as",
     ((None, "cpu DFT matrices, cuda FFTs (GMAMBA_GSSM_LOWPASS=auto)"),
      ("fft", "cpu FFTs, cuda FFTs (GMAMBA_GSSM_LOWPASS=fft)"),
      ("x", "GMAMBA_GSSM_LOWPASS must be 'auto', 'fft' or 'dft', got 'x'"))),
    ("GMAMBA_CHECK_FINITE", "NaN / inf checks of the inputs",
     ((None, "off now, under torch.autograd.detect_anomaly (GMAMBA_CHECK_FINITE=auto)"),
      ("always", "on now, every call (GMAMBA_CHECK_FINITE=always)"),
      ("x", "GMAMBA_CHECK_FINITE must be one of ('auto', 'always', 'never'), got 'x'"))),
])
def test_python_m_gmamba_ext_reports_the_gssm_settings(capsys, monkeypatch, name, prefix, cases):
    from gmamba_ext.__main__ import main

    for value, line in cases:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        main()
        assert f"{prefix}: {line}" in capsys.readouterr().out


@pytest.mark.skipif(not gmamba_ext.HAS_EXTENSION, reason="no compiled extension")
def test_cpu_kernels_are_built_multithreaded_where_torch_uses_openmp():
    """Regression: at::parallel_for is inline; without -fopenmp our kernels silently ran on one thread."""
    import sys

    from gmamba_ext import _build_info as info

    if torch.backends.openmp.is_available() and sys.platform != "darwin":
        assert getattr(info, "OPENMP", None) is True, "gmamba_ext._C was built without -fopenmp"


@pytest.mark.skipif(not gmamba_ext.HAS_EXTENSION, reason="no compiled extension")
def test_cpu_scan_lane_count_is_the_one_built(capsys):
    """cpu/scan_lanes.h: 16 channels per vector with AVX-512, else 8; CI builds both forms and names the one
    it expects in GMAMBA_EXPECT_CPU_LANES. `python -m gmamba_ext` reports it."""
    from gmamba_ext import _C
    from gmamba_ext.__main__ import main

    assert _C.CPU_SCAN_LANES in (8, 16)
    expected = os.environ.get("GMAMBA_EXPECT_CPU_LANES")
    if expected:
        assert _C.CPU_SCAN_LANES == int(expected)
    main()
    assert f"scan vectors of {_C.CPU_SCAN_LANES} channels" in capsys.readouterr().out

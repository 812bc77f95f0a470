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


@pytest.mark.skipif(not gmamba_ext.HAS_EXTENSION, reason="no compiled extension")
def test_cpu_kernels_are_built_multithreaded_where_torch_uses_openmp():
    """Regression: at::parallel_for is inline; without -fopenmp our kernels silently ran on one thread."""
    import sys

    from gmamba_ext import _build_info as info

    if torch.backends.openmp.is_available() and sys.platform != "darwin":
        assert getattr(info, "OPENMP", None) is True, "gmamba_ext._C was built without -fopenmp"

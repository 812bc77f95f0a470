"""gssm's peak CPU memory, counted by the benchmarks' malloc-counting allocator (benchmarks/cpu_peak_memory.py,
itself tested in test_benchmark_tools.py), in units of u = one (B, L, d) tensor. The bounds sit between what
the code does now and what it did before each saving (docs/GSSM.md, "Memory"), so a change that holds an
intermediate longer than it needs fails here."""
import os
import platform
import shutil
import sys

import pytest

from gmamba_ext.ops import HAS_EXTENSION

try:
    from gmamba_ext._build_info import SANITIZE
except ImportError:  # a source tree without a build
    SANITIZE = None

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
from cpu_peak_memory import build_shim, peak_mib  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built"),
    pytest.mark.skipif(platform.system() != "Linux" or not (shutil.which("cc") or shutil.which("gcc")),
                       reason="the counting allocator needs glibc and a C compiler"),
    pytest.mark.skipif(bool(SANITIZE),
                       reason="a sanitized build: ASan owns malloc, the counting allocator cannot be preloaded"),
]

# B = 2, C = 64, H = W = 64: d = 32, u = 1 MiB in float32; the parameters' gradients are ~0.1 MiB.
WORKER = """
import sys, torch
sys.path.insert(0, {bench!r})
from bench_gssm import closures, make_case
from cpu_peak_memory import report_peak
import gmamba_ext
torch.set_num_threads(1)
cfg, params, x = make_case(2, 64, 64, "cpu", getattr(torch, {dtype!r}))
fwd, fwd_bwd = closures(lambda x, p, cfg: gmamba_ext.gssm(x, p), cfg, params, x)
report_peak(fwd if {inference!r} else fwd_bwd)
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    path, why = build_shim(str(tmp_path_factory.mktemp("shim")))
    assert why is None, why
    return path


def peak_in_u(shim, dtype, inference, policy):
    u = 2 * 64 * 64 * 32 * (4 if dtype == "float32" else 2) / 2**20
    code = WORKER.format(bench=BENCH, dtype=dtype, inference=inference)
    env = {"GMAMBA_GSSM_SAVE": policy, "GMAMBA_GSSM_LOWPASS": "auto"}  # the CPU's default form, whatever is set
    return peak_mib([sys.executable, "-c", code], shim, env) / u


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inference_drops_intermediates_once_read(shim, dtype):
    # Without a backward to serve each intermediate is released once read: 5.8 u float32, 7.0 u bfloat16 (the
    # low-pass runs in float32), the 2 u output included. Holding them all to the end took 12.4 u / 13.5 u.
    assert peak_in_u(shim, dtype, True, "auto") < 8


@pytest.mark.parametrize("policy, bound", [("recompute", 13), ("keep", 18)])
def test_training_peak(shim, policy, bound):
    # Forward + backward for x and every parameter, float32, the output and gradients included: 12.4 u and
    # 17.4 u; 13.35 u and 18.35 u while the forward saved low (1 u) instead of its Fourier coefficients
    # (u / 16); recompute took 15.35 u while it saved in_proj's output xz (2 u), both 16.35 u and 20.35 u while
    # the backward ops held every saved tensor to their end (no consume), 17.35 u and 21.35 u while the
    # forward also saved FGMM's conv output c (1 u) instead of recomputing it.
    assert peak_in_u(shim, "float32", False, policy) < bound

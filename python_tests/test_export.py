"""Deployment: torch.export of a GMamba block keeps gmamba_ext's custom ops in the graph (their fake kernels
trace it, with a dynamic batch), and AOTInductor compiles that graph into a package that runs them."""
import pytest
import torch

from gmamba_ext.nn import GMambaBlock
from gmamba_ext.ops import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")


def block_and_input(batch=2):
    torch.manual_seed(0)
    block = GMambaBlock(32).eval()
    return block, torch.randn(batch, 32, 12, 10)


def custom_ops(program):
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "gmamba_ext" in str(n.target)}


def test_export_keeps_the_custom_ops_and_a_dynamic_batch():
    block, x = block_and_input()
    program = torch.export.export(block, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    assert {"gmamba_ext.conv_silu_fwd.default", "gmamba_ext.fgmm_fwd.default",
            "gmamba_ext.selective_scan_fwd.default"} <= custom_ops(program)
    with torch.no_grad():
        for batch in (1, 2, 5):
            x = torch.randn(batch, 32, 12, 10)
            torch.testing.assert_close(program.module()(x), block(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_batch_outside_its_range():
    block, x = block_and_input()
    program = torch.export.export(block, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4)}})
    with pytest.raises(AssertionError, match=r"x.size\(\)\[0\] <= 4"):  # torch.export's guard, not a kernel crash
        program.module()(torch.randn(9, 32, 12, 10))


def test_aot_inductor_package_runs_the_kernels(tmp_path):
    from gmamba_ext import _build_info
    if getattr(_build_info, "SANITIZE", None):
        pytest.skip("a sanitized build: AOTInductor's compiler would run under the preloaded sanitizer runtimes")
    block, x = block_and_input()
    program = torch.export.export(block, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "block.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), block(x), rtol=1e-5, atol=1e-5)

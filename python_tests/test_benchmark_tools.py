"""The benchmarks' CPU peak-memory counter (benchmarks/cpu_peak_memory.py) against allocations of known size."""
import os
import platform
import shutil
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
from cpu_peak_memory import build_shim, peak_mib  # noqa: E402

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not (shutil.which("cc") or shutil.which("gcc")),
                                reason="the counting allocator needs glibc and a C compiler")

WORKER = """
import sys, torch
sys.path.insert(0, {bench!r})
from cpu_peak_memory import report_peak
def run():
    kept = torch.ones(16 * 2**20 // 4)                # 16 MiB held at the end of the call
    for _ in range(3):
        temp = torch.empty(48 * 2**20 // 4).fill_(1)  # 48 MiB freed before the next: the peak is 64 MiB
        del temp
    return kept
report_peak(run)
"""


def test_peak_of_known_allocations(tmp_path):
    shim, why = build_shim(str(tmp_path))
    assert why is None and os.path.exists(shim)
    peak = peak_mib([sys.executable, "-c", WORKER.format(bench=BENCH)], shim)
    assert 64 <= peak < 64.5, peak  # the 16 MiB kept plus one 48 MiB temporary; small Python objects on top


def test_a_failing_worker_is_reported(tmp_path):
    shim, _ = build_shim(str(tmp_path))
    with pytest.raises(RuntimeError, match="peak-memory worker failed"):
        peak_mib([sys.executable, "-c", "raise SystemExit('no')"], shim)


def test_memory_trail_finds_the_peak_and_its_op():
    import torch
    from memory_trail import trail

    def run():
        first = torch.empty(2**20 // 4)           # 1 MiB
        second = torch.ones(2 * 2**20 // 4)       # 2 MiB: the peak, 3 MiB
        del first
        third = torch.zeros(2**20 // 4)           # 1 MiB after 1 MiB was freed: below the peak
        return second, third

    _, lines = trail(run, "cpu", 2**20, events=4)
    assert lines[0].startswith("peak 3.00 u"), lines
    peak_line = next(line for line in lines if line.endswith("<- peak"))
    assert "aten::ones" in peak_line and "+2.00" in peak_line, lines

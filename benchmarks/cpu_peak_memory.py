"""Peak CPU memory of a call, the CPU counterpart of bench_scan_gpu.peak_memory: a worker process runs with
cpu_peak_alloc.c preloaded, which counts what it holds from malloc (where CPU tensors come from) and the
peak since a reset. glibc only (LD_PRELOAD, __libc_* entry points); without a C compiler there is no column.

Parent side: `shim = build_shim(folder)`, then `peak_mib(argv, shim)` runs a worker command line with it
preloaded and reads the "PEAK_MIB <value>" line that `report_peak(run)` prints in the worker."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def build_shim(folder):
    """Compiles the counting allocator into folder; its path, or (None, why) when it cannot."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler: no CPU peak memory"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "cpu_peak_alloc.so")
    done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", path, os.path.join(HERE, "cpu_peak_alloc.c")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"the peak-memory allocator did not build: {done.stderr.strip()[:200]}"
    return path, None


def counter():
    """In a process with the allocator preloaded: its cpu_peak_reset() (bytes held now; the peak restarts
    there) and cpu_peak_get() (the peak since)."""
    lib = ctypes.CDLL(None)
    lib.cpu_peak_reset.restype = lib.cpu_peak_get.restype = ctypes.c_long
    return lib.cpu_peak_reset, lib.cpu_peak_get


def report_peak(run):
    """Worker: one untimed call, then the peak (MiB above what was held before) of one more call."""
    reset, get = counter()
    result = run()
    del result
    base = reset()
    result = run()
    print(f"PEAK_MIB {(get() - base) / 2**20:.3f}", flush=True)


def peak_mib(argv, shim, env=None):
    """Runs a worker command line with the counting allocator preloaded (and `env`'s variables set); its
    PEAK_MIB."""
    env = dict(os.environ, **(env or {}), LD_PRELOAD=shim)
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("PEAK_MIB "):
            return float(line.split()[1])
    raise RuntimeError(f"peak-memory worker failed: {done.stderr.strip()[-300:]}")

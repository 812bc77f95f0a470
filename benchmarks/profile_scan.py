"""One forward + backward of gmamba_ext's CUDA scan (and of mamba-ssm's, if given) at one shape, for a
profiler (ncu) to look at: benchmarks/profile_scan.sh runs it. Usage: profile_scan.py [mamba .so.gz]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gmamba_ext  # noqa: E402
from bench_scan_gpu import make_inputs  # noqa: E402

shape = (8, 1536, 2048, 16)
impls = [("gmamba", gmamba_ext.selective_scan, torch.float32)]
if len(sys.argv) > 1:
    import mamba_ssm_baseline
    mamba_ssm_baseline.load(sys.argv[1])
    impls.append(("mamba_ssm", mamba_ssm_baseline.selective_scan_fn, torch.float32))
for name, fn, bc_dtype in impls:
    inputs = make_inputs(*shape, torch.float32, False, bc_dtype)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    for _ in range(2):  # the second iteration is the one profiled (ncu --launch-skip)
        out = fn(**leaves, delta_softplus=True)
        torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    torch.cuda.synchronize()
    print(name, "done")

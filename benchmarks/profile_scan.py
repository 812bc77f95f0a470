"""One forward + backward of gmamba_ext's CUDA scan (and of mamba-ssm's, if given) per case, for a
profiler (ncu) to look at: benchmarks/profile_scan.sh runs it. Usage: profile_scan.py [mamba .so.gz]
PROFILE_CASES picks the cases: "B,d,L,N,layout[,dtype];..." with layout cf or cl and dtype float32
(default), bfloat16 or float16 (default case: the large scan shape, channels-first, float32).
PROFILE_FWD_ONLY=1 skips the backward."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gmamba_ext  # noqa: E402
from bench_scan_gpu import make_inputs  # noqa: E402


def parse_cases(text):
    cases = []
    for item in filter(None, text.split(";")):
        fields = item.split(",")
        dtype = torch.float32
        if fields[-1] not in ("cf", "cl"):  # an optional dtype after the layout
            dtype = getattr(torch, fields.pop())
        *dims, layout = fields
        if layout not in ("cf", "cl"):
            raise ValueError(f"PROFILE_CASES: layout must be cf or cl, got {layout!r} in {item!r}")
        cases.append((tuple(int(v) for v in dims), layout == "cl", dtype))
    return cases


cases = parse_cases(os.environ.get("PROFILE_CASES", "8,1536,2048,16,cf"))
fwd_only = os.environ.get("PROFILE_FWD_ONLY") == "1"
mamba = None
if len(sys.argv) > 1:
    import mamba_ssm_baseline
    mamba_ssm_baseline.load(sys.argv[1])
    mamba = mamba_ssm_baseline.selective_scan_fn
for shape, channels_last, dtype in cases:
    impls = [("gmamba_cl" if channels_last else "gmamba",
              gmamba_ext.selective_scan_channels_last if channels_last else gmamba_ext.selective_scan)]
    if mamba is not None and not channels_last and dtype == torch.float32:  # (it wants B/C in u's dtype)
        impls.append(("mamba_ssm", mamba))
    for name, fn in impls:
        inputs = make_inputs(*shape, dtype, channels_last, torch.float32)
        leaves = {k: v.requires_grad_() for k, v in inputs.items()}
        for _ in range(2):
            out = fn(**leaves, delta_softplus=True)
            if not fwd_only:
                torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
        torch.cuda.synchronize()
        print(name, shape, dtype, "done")

"""Small forward + backward runs of every CUDA scan variant and of the GSSM mixer's CUDA ops (through
gmamba_ext.gssm, odd sizes, every variant), for compute-sanitizer (memcheck) in benchmarks/device_check.sh:
out-of-bounds or misaligned accesses show up there, not in results."""
import itertools

import torch

import gmamba_ext

# The last three shapes chain their chunks over 2, 8 and 32 lanes (63, 163 and 1027 chunks of 16 steps).
CASES = list(itertools.product([(2, 40, 37, 5), (1, 33, 16, 3)], ["var", "grp", "const"], [False, True],
                               [torch.float32, torch.bfloat16]))
CASES += list(itertools.product([(1, 33, 1000, 3), (2, 5, 2600, 2), (1, 3, 16429, 2)], ["var"], [False, True],
                                [torch.float32]))
# d_state 9..16, both layouts: lane_backward<16> (channels-first: B / C rows staged in shared memory).
LANE16_CASES = list(itertools.product([(2, 40, 37, 13), (1, 33, 16, 16)], ["var", "grp"], [False, True],
                                      [torch.float32, torch.bfloat16]))


def run_case(batch, d, L, N, mode, cl, dtype):
    x_shape = (batch, L, d) if cl else (batch, d, L)
    G = 1 if mode != "grp" else (5 if d % 5 == 0 else 3)
    if mode == "const":
        bc = (d, N)
    elif cl:
        bc = (batch, L, G, N)
    else:
        bc = (batch, G, N, L)
    make = dict(device="cuda", requires_grad=True)
    u = torch.randn(x_shape, dtype=dtype, **make)
    delta = torch.randn(x_shape, dtype=dtype, **make)
    z = torch.randn(x_shape, dtype=dtype, **make)
    A = (-torch.rand(d, N, device="cuda") - 0.5).requires_grad_()
    B, C = torch.randn(bc, **make), torch.randn(bc, **make)
    D, bias = torch.randn(d, **make), torch.randn(d, **make)
    h0 = torch.randn(batch, d, N, **make)
    fn = gmamba_ext.selective_scan_channels_last if cl else gmamba_ext.selective_scan
    out, last = fn(u, delta, A, B, C, D, z, bias, True, True, h0)
    (out.float().sum() + last.sum()).backward()


for (batch, d, L, N), mode, cl, dtype in CASES + LANE16_CASES:
    run_case(batch, d, L, N, mode, cl, dtype)

for variant, (batch, H, W, C), dtype in itertools.product(
        ["full", "fem_ssm", "dft_fgmm_ssm"], [(2, 7, 9, 40), (1, 3, 70, 16)], [torch.float32, torch.bfloat16]):
    cfg = gmamba_ext.GSSMConfig(C, d_state=5, d_conv=4, variant=variant, directions="bi")
    params = gmamba_ext.GSSMParams.init(cfg, dtype=dtype, device="cuda")
    for field in ("in_proj_weight", "conv1d_x_weight", "freq_ratio"):
        getattr(params, field).requires_grad_()
    x = torch.randn(batch, H, W, C, device="cuda", dtype=dtype, requires_grad=True)
    gmamba_ext.gssm(x, params, variant=variant, directions="bi").float().square().sum().backward()
torch.cuda.synchronize()
print("sanitize_scan: all variants ran")

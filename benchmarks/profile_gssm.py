"""Where the time of one gssm forward + backward goes (torch.profiler), fused against the unfused
composition: wall time per call, the device's busy time per call (sum of kernel durations), kernels per
call, and the kernels and host-side ops that cost most. Busy / wall far under 1 means the device waits on
the host (Python and dispatcher cost per op), so fewer ops, not faster kernels, would pay.

    python benchmarks/profile_gssm.py --device cuda [--shapes 96x128,768x16] [--out DIR] [--mamba-ssm PATH]

Writes profile_gssm_<device>.md under --out (and prints it).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gssm import closures, implementations, make_case, shapes_of  # noqa: E402


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def profile_calls(fn, device, iters):
    """(wall ms per call, profiler) over `iters` calls after warm-up."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    wall = (time.perf_counter() - start) * 1e3 / iters
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    return wall, prof


def summary(prof, device, iters, top):
    """Markdown lines: device busy time and kernel count per call, then the top kernels and host ops."""
    lines = []
    if device == "cuda":
        kernels = collections.defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels[e.name[:90]]
                k[0] += e.time_range.elapsed_us() / 1e3
                k[1] += 1
        busy = sum(v[0] for v in kernels.values()) / iters
        count = sum(v[1] for v in kernels.values()) / iters
        lines.append(f"device busy {busy:.3f} ms per call, {count:.0f} kernels (and copies/memsets) per call")
        lines += ["", "| kernel | ms per call | launches per call |", "|---|---|---|"]
        for name, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"| `{name}` | {ms / iters:.3f} | {n / iters:.0f} |")
    ops = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
    ops.sort(key=lambda a: -a.self_cpu_time_total)
    host = sum(a.self_cpu_time_total for a in ops) / 1e3 / iters
    lines += ["", f"host: {host:.3f} ms of self CPU time per call (profiler overhead included)", "",
              "| host op | self CPU ms per call | calls per call |", "|---|---|---|"]
    for a in ops[:top]:
        lines.append(f"| `{a.key[:70]}` | {a.self_cpu_time_total / 1e3 / iters:.3f} | {a.count / iters:.0f} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default="96x128,768x16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--impls", default="fused,fused_composition,unfused_mamba_ssm")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--mamba-ssm", default=None)
    args = parser.parse_args()
    impls, notes = implementations(args.device, args.mamba_ssm)
    lines = [f"# gssm profile: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, "
             f"torch {torch.__version__}, batch {args.batch}, float32", ""] + [f"- {n}" for n in notes]
    for C, H in shapes_of(args.shapes):
        cfg, params, x = make_case(args.batch, C, H, args.device, torch.float32)
        for name in args.impls.split(","):
            if name not in impls:
                continue
            fwd, fwd_bwd = closures(impls[name], cfg, params, x)
            for label, fn in (("forward", fwd), ("forward + backward", fwd_bwd)):
                try:
                    wall, prof = profile_calls(fn, args.device, args.iters)
                    body = [f"wall {wall:.3f} ms per call"] + summary(prof, args.device, args.iters, args.top)
                except Exception as error:  # noqa: BLE001 - a failing case must not cost the rest of the run
                    body = [f"failed: {type(error).__name__}: {error}"]
                lines += ["", f"## {name}, C={C}, H=W={H}, {label}", ""] + body
                print("\n".join(lines[-len(body) - 3:]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile_gssm_{args.device}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

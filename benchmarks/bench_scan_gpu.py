"""GPU benchmark of the selective scan: gmamba_ext (both layouts) against mamba-ssm's CUDA selective_scan_fn.

Reports medians and interquartile ranges of device-event timings, peak memory, the forward's achieved
bandwidth against the measured device copy bandwidth, and agreement with mamba-ssm. Writes JSON,
Markdown and a PNG (throughput vs L). Usage:
    python benchmarks/bench_scan_gpu.py --out DIR [--mamba-ssm PATH_TO_selective_scan_cuda.so(.gz)] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gmamba_ext  # noqa: E402

# (batch, d, L, N): the GSSM stages (d = C/2 for (C, H=W) in (96,128), (192,64), (384,32), (768,16), N=8),
# then the scan alone at Mamba's LM size and at vision lengths.
SHAPES = [(8, 48, 16384, 8), (8, 96, 4096, 8), (8, 192, 1024, 8), (8, 384, 256, 8),
          (8, 1536, 2048, 16), (8, 1536, 49, 16), (8, 1536, 196, 16), (8, 1536, 3136, 16)]
QUICK_SHAPES = [(8, 48, 16384, 8), (8, 1536, 2048, 16), (8, 1536, 196, 16)]


def event_ms(fn):
    """One call of fn, timed by device events (ms)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def timed(fn, warmup, reps):
    """Median and IQR (ms) of `reps` device-event timings after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = [event_ms(fn) for _ in range(reps)]
    q = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "p25_ms": q[0], "p75_ms": q[2],
            "reps": reps}


def peak_memory(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second (GB/s), on 1 GiB."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 5, 30)["median_ms"]
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def make_inputs(batch, d, L, N, dtype, channels_last, bc_dtype=torch.float32, seed=0):
    """Same values for every implementation (same seed; the channels-last form gets the same tensors
    transposed); mamba-ssm wants variable B/C in u's dtype."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    A = -torch.exp(rnd(d, N) * 0.5)
    dt_bias = torch.log(torch.expm1(torch.empty(d, device="cuda").uniform_(1e-3, 1e-1, generator=g)))
    x = dict(u=rnd(batch, d, L), delta=rnd(batch, d, L) * 0.5, z=rnd(batch, d, L))
    bc = dict(B=rnd(batch, N, L), C=rnd(batch, N, L))
    if channels_last:
        x = {k: v.transpose(1, 2) for k, v in x.items()}
        bc = {k: v.transpose(1, 2) for k, v in bc.items()}
    inputs = {k: v.to(dtype).contiguous() for k, v in x.items()}
    inputs.update({k: v.to(bc_dtype).contiguous() for k, v in bc.items()})
    inputs.update(A=A, D=rnd(d), delta_bias=dt_bias)
    return inputs


def run_case(fn, inputs, warmup, reps):
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    dout = torch.randn_like(inputs["u"])

    def fwd():
        with torch.no_grad():
            fn(**inputs, delta_softplus=True)

    def fwd_bwd():
        out = fn(**leaves, delta_softplus=True)
        torch.autograd.grad(out, list(leaves.values()), dout)

    res = {"fwd": timed(fwd, warmup, reps), "fwd_bwd": timed(fwd_bwd, warmup, reps)}
    res["peak_mib_fwd_bwd"] = peak_memory(fwd_bwd)
    return res


def io_bytes(inputs):
    """Bytes the forward must move at least: every input read once, the output written once."""
    return sum(t.numel() * t.element_size() for t in inputs.values()) + inputs["u"].numel() * inputs["u"].element_size()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--mamba-ssm", default=None, help="selective_scan_cuda module (.so or .so.gz)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-plot", action="store_true", help="skip scan_gpu.png")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return
    os.makedirs(args.out, exist_ok=True)
    mamba = None
    if args.mamba_ssm:
        import mamba_ssm_baseline
        mamba_ssm_baseline.load(args.mamba_ssm)
        mamba = mamba_ssm_baseline.selective_scan_fn

    copy_gbs = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": copy_gbs,
              "cases": []}
    print(f"device {report['device']}, copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    # name -> (function, channels-last layout, B/C in u's dtype)
    impls = {"gmamba": (gmamba_ext.selective_scan, False, False),
             "gmamba_cl": (gmamba_ext.selective_scan_channels_last, True, False)}
    if mamba is not None:
        impls["mamba_ssm"] = (mamba, False, True)
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            case = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "impl": {}}
            ref_out = None
            for name, (fn, cl, bc_like_u) in impls.items():
                inputs = make_inputs(*shape, dtype, cl, dtype if bc_like_u else torch.float32)
                with torch.no_grad():
                    out = fn(**inputs, delta_softplus=True)
                out = out.transpose(1, 2) if cl else out
                if ref_out is None:
                    ref_out = out.float()
                else:
                    case.setdefault("max_rel_diff_vs_first", {})[name] = (
                        ((out.float() - ref_out).norm() / ref_out.norm()).item())
                res = run_case(fn, inputs, 5, args.reps)
                res["fwd_GBps"] = io_bytes(inputs) / (res["fwd"]["median_ms"] * 1e-3) / 1e9
                res["fwd_bw_fraction"] = res["fwd_GBps"] / copy_gbs
                case["impl"][name] = res
                del inputs
            if mamba is not None:
                m = case["impl"]["mamba_ssm"]
                for name in ("gmamba", "gmamba_cl"):
                    r = case["impl"][name]
                    r["speedup_fwd_vs_mamba"] = m["fwd"]["median_ms"] / r["fwd"]["median_ms"]
                    r["speedup_fwd_bwd_vs_mamba"] = m["fwd_bwd"]["median_ms"] / r["fwd_bwd"]["median_ms"]
                    r["memory_vs_mamba"] = r["peak_mib_fwd_bwd"] / max(m["peak_mib_fwd_bwd"], 1e-9)
            report["cases"].append(case)
            print(format_row(case), flush=True)
            with open(os.path.join(args.out, "scan_gpu.json"), "w") as f:  # after every case: a cut run keeps it
                json.dump(report, f, indent=1)
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "scan_gpu.md"), "w") as f:
        f.write(markdown(report))
    if not args.no_plot:
        plot(report, os.path.join(args.out, "scan_gpu.png"))
    print(markdown(report))


def format_row(case):
    parts = [f"{case['shape']} {case['dtype']}"]
    for name, r in case["impl"].items():
        parts.append(f"{name}: fwd {r['fwd']['median_ms']:.3f} fwd+bwd {r['fwd_bwd']['median_ms']:.3f} ms")
    return " | ".join(parts)


def markdown(report):
    lines = [f"Device: {report['device']}, torch {report['torch']}, copy bandwidth {report['copy_GBps']:.0f} GB/s",
             "", "| (B, d, L, N) | dtype | impl | fwd ms (IQR) | fwd+bwd ms (IQR) | fwd GB/s (% copy) | peak MiB | "
             "fwd x mamba | fwd+bwd x mamba | mem / mamba | rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        for name, r in case["impl"].items():
            diff = case.get("max_rel_diff_vs_first", {}).get(name)
            lines.append(
                f"| {tuple(case['shape'])} | {case['dtype']} | {name} | {r['fwd']['median_ms']:.3f} "
                f"({r['fwd']['iqr_ms']:.3f}) | {r['fwd_bwd']['median_ms']:.3f} ({r['fwd_bwd']['iqr_ms']:.3f}) | "
                f"{r['fwd_GBps']:.0f} ({100 * r['fwd_bw_fraction']:.0f}%) | {r['peak_mib_fwd_bwd']:.0f} | "
                f"{r.get('speedup_fwd_vs_mamba', float('nan')):.2f} | "
                f"{r.get('speedup_fwd_bwd_vs_mamba', float('nan')):.2f} | {r.get('memory_vs_mamba', float('nan')):.2f} | "
                f"{'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines) + "\n"


def plot(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, dtype in zip(axes, ("float32", "bfloat16")):
        cases = sorted((c for c in report["cases"] if c["dtype"] == dtype and c["shape"][1] == 1536),
                       key=lambda c: c["shape"][2])
        for name in cases[0]["impl"] if cases else []:
            Ls = [c["shape"][2] for c in cases]
            tput = [c["shape"][0] * c["shape"][1] * c["shape"][2] / (c["impl"][name]["fwd_bwd"]["median_ms"] * 1e-3)
                    / 1e9 for c in cases]
            ax.plot(Ls, tput, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("L (B=8, d=1536, N=16)")
        ax.set_ylabel("fwd+bwd G elements / s")
        ax.set_title(f"selective scan, {dtype}, {report['device']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

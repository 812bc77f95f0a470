"""A/B of two of the CUDA scan's gradient-kernel variants where both apply (variable B/C, N <= 16), forced
per call with GMAMBA_CUDA_SCAN_BWD (--variants A,B; default chunk,lane: bwd_chunk_grads against
csrc/cuda/scan_lane_backward.cuh; lane_l1: the lane kernel with channels-first blocks sized for L1), on the
gssm's scan shapes in both layouts (or --shapes, --layouts). One process, the two taking turns in rounds,
device events around the raw backward op; before timing, the two variants' gradients are compared
(relative L2 difference per gradient) and each is run twice to check that its gradients are bitwise equal.

    python benchmarks/ab_scan_bwd_gpu.py [--out DIR] [--dtypes float32,bfloat16] [--rounds 5] [--reps 10]
    python benchmarks/ab_scan_bwd_gpu.py --shapes 8:2048:1536:16,8:196:1536:16 --layouts cl  # lane_backward<16>
    python benchmarks/ab_scan_bwd_gpu.py --variants lane,lane_l1 --layouts cf

Decides which kernel is the default: it must agree, be deterministic and be faster.
--device cpu runs the same script on the CPU kernel (both variants are then the same code): a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gmamba_ext  # noqa: F401,E402  (registers torch.ops.gmamba_ext)
from bench_scan_gpu import event_ms  # noqa: E402
from profile_gssm import sync  # noqa: E402

# (batch, L, d, N): gssm's scans at DESIGN's (C, H=W) stages, d = C/2, L = H*W; each in both layouts.
SHAPES = [(8, 16384, 48, 8), (8, 4096, 96, 8), (8, 1024, 192, 8), (8, 256, 384, 8)]
LAYOUTS = ["cl", "cf"]
VARIANTS = ("chunk", "lane")  # GMAMBA_CUDA_SCAN_BWD's values compared by default (also: lane_l1)
GRADS = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state"]


def set_variant(name):
    if name is None:
        os.environ.pop("GMAMBA_CUDA_SCAN_BWD", None)
    else:
        os.environ["GMAMBA_CUDA_SCAN_BWD"] = name


def make_case(batch, L, d, N, layout, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = dict(u=rnd(batch, L, d).to(dtype), delta=rnd(batch, L, d, scale=0.5).to(dtype),
             A=-torch.exp(rnd(d, N, scale=0.5)), B=rnd(batch, L, 1, N), C=rnd(batch, L, 1, N), D=rnd(d),
             z=rnd(batch, L, d).to(dtype), delta_bias=rnd(d, scale=0.1))
    dout = rnd(batch, L, d).to(dtype)
    channels_last = layout == "cl"
    if not channels_last:  # (B, d, L) and (B, G, N, L)
        for k in ("u", "delta", "z"):
            x[k] = x[k].transpose(1, 2).contiguous()
        for k in ("B", "C"):
            x[k] = x[k].permute(0, 2, 3, 1).contiguous()
        dout = dout.transpose(1, 2).contiguous()
    op = torch.ops.gmamba_ext
    _, _, checkpoints = op.selective_scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                              x["delta_bias"], None, True, channels_last)

    def backward():
        return op.selective_scan_bwd(dout, None, checkpoints, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],
                                     x["z"], x["delta_bias"], None, True, channels_last)

    return backward


def time_once(fn, device):
    if device == "cuda":
        return event_ms(fn)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def rel_l2(a, b):
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(backward, variants):
    grads, deterministic = {}, {}
    for name in variants:
        set_variant(name)
        first, second = backward(), backward()
        deterministic[name] = all(torch.equal(p, q) for p, q in zip(first, second))
        grads[name] = first
    base, new = variants
    errors = {g: rel_l2(a, b) for g, a, b in zip(GRADS, grads[new], grads[base])}
    return errors, deterministic


def bench_case(shape, layout, dtype, device, args):
    backward = make_case(*shape, layout, dtype, device)
    variants = args.variants
    errors, deterministic = compare(backward, variants)
    times = {name: [] for name in variants}
    for name in variants:  # warm-up
        set_variant(name)
        for _ in range(2):
            backward()
    sync(device)
    for _ in range(args.rounds):
        for name in variants:
            set_variant(name)
            times[name] += [time_once(backward, device) for _ in range(args.reps)]
    set_variant(None)
    stats = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        stats[name] = {"median_ms": statistics.median(ts), "p25_ms": q[0], "p75_ms": q[2], "n": len(ts)}
    return {"shape": dict(zip(("batch", "L", "d", "N"), shape)), "layout": layout,
            "dtype": str(dtype).replace("torch.", ""), "stats": stats,
            "variants": list(variants), "speedup": stats[variants[0]]["median_ms"] / stats[variants[1]]["median_ms"],
            "rel_l2_second_vs_first": errors, "bitwise_deterministic": deterministic}


def kernel_breakdown(shape, layout, dtype, device, variants, calls=5):
    """Markdown lines per variant: profile_gssm.py's summary of one backward call, to show where the op's
    time goes beyond the gradient kernel (summary pass, chain, reductions of partials)."""
    from profile_gssm import profile_calls, summary

    backward = make_case(*shape, layout, dtype, device)
    lines = []
    for name in variants:
        set_variant(name)
        wall, prof = profile_calls(backward, device, calls)
        lines += ["", f"## {name}, {layout} {shape} {str(dtype).replace('torch.', '')}: wall {wall:.3f} ms per call",
                  ""] + summary(prof, device, calls, top=12)
    set_variant(None)
    return lines


def markdown(rows, device_name, variants):
    a, b = variants
    lines = [f"# CUDA scan backward: GMAMBA_CUDA_SCAN_BWD={a} vs {b} ({device_name})", "",
             "Raw selective_scan_bwd op, variable B/C, layout cl = (B, L, d), cf = (B, d, L); median (IQR) "
             f"ms of device-event timings, the two taking turns in rounds; speed-up = {a} / {b}.", "",
             f"| dtype | layout | (B, L, d, N) | {a} (ms) | {b} (ms) | speed-up | largest rel. L2 diff (grad) | "
             f"bitwise run to run ({a} / {b}) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stats"]
        worst = max(r["rel_l2_second_vs_first"].items(), key=lambda kv: kv[1])
        cell = lambda v: f"{v['median_ms']:.3f} ({v['p25_ms']:.3f}-{v['p75_ms']:.3f})"  # noqa: E731
        shape = tuple(r["shape"].values())
        det = r["bitwise_deterministic"]
        lines.append(f"| {r['dtype']} | {r['layout']} | {shape} | {cell(s[a])} | {cell(s[b])} | "
                     f"{r['speedup']:.2f}x | {worst[1]:.2e} ({worst[0]}) | {det[a]} / {det[b]} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shapes", default=None, help="B:L:d:N,... instead of the gssm's four")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="cl, cf or both (cl,cf)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="two GMAMBA_CUDA_SCAN_BWD values to compare (chunk, lane, lane_l1)")
    p.add_argument("--profile", default=None, metavar="B:L:d:N:LAYOUT",
                   help="also list each kernel of one backward call at this shape (float32), per variant")
    args = p.parse_args()
    args.variants = tuple(args.variants.split(","))
    if len(args.variants) != 2 or not set(args.variants) <= {"chunk", "lane", "lane_l1"}:
        raise SystemExit(f"ab_scan_bwd_gpu.py: --variants takes two of chunk, lane, lane_l1, got {args.variants}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ab_scan_bwd_gpu.py: no CUDA device visible (use --device cpu for a smoke test)")
    shapes = ([tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else SHAPES)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke test)"
    rows = []
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        for layout in args.layouts.split(","):
            for shape in shapes:
                rows.append(bench_case(shape, layout, dtype, args.device, args))
                print(json.dumps({k: rows[-1][k] for k in ("shape", "layout", "dtype", "speedup",
                                                           "bitwise_deterministic")}), flush=True)
    table = markdown(rows, device_name, args.variants)
    if args.profile:
        *dims, layout = args.profile.split(":")
        table += "\n".join(kernel_breakdown(tuple(int(v) for v in dims), layout, torch.float32, args.device,
                                             args.variants)) + "\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ab_scan_bwd.json"), "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "results": rows}, f, indent=1)
    with open(os.path.join(args.out, "ab_scan_bwd.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()

"""CPU benchmark of the selective scan, forward and forward+backward:
  ours      gmamba_ext.selective_scan (channels-first) and selective_scan_channels_last
  mambapy   mambapy's parallel scan (pip install mambapy; a benchmark requirement only), fed as its Mamba
            block feeds it: deltaA = exp(delta A), BX = delta B x as (B, L, d, N) tensors, then pscan
  ref       gmamba_ext.reference.selective_scan_ref, sequential (slow: only where one call fits a budget)
All compute out = (sum_n C s + D u) * silu(z), s_l = exp(delta A) s_{l-1} + delta B u, delta =
softplus(delta_raw + delta_bias), on the same inputs; outputs and gradients are checked to agree first.
Reports median and IQR of wall-clock times after warm-up; writes JSON and prints a Markdown table.
Against mambapy it also reports a paired ratio (--paired ROUNDS): ours and mambapy take turns call by call,
each in a worker process of its own that keeps freed memory (paired_timing.py), and the ratio is taken
per round, so neither drift in the machine's speed between cells nor the allocator's page faults (which
made mambapy's times depend on what ran before it in the process, by up to 2.5x) enter it.

    python benchmarks/bench_scan_cpu.py [--quick] [--batch 8] [--shapes 48:16384:8,...] [--threads 2] [--out ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import gmamba_ext
except ImportError:  # built in place, not installed: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gmamba_ext
from gmamba_ext.reference import selective_scan_ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paired_timing import paired_times, serve  # noqa: E402

try:
    from mambapy.pscan import pscan
except ImportError:
    pscan = None

# (batch, d, L, N) from DESIGN.md: the GSSM stages (d = C/2 for (C, H=W) in (96,128), (192,64), (384,32),
# (768,16); N = 8), then the scan alone at Mamba's LM size and at vision lengths.
SHAPES = [(8, 48, 16384, 8), (8, 96, 4096, 8), (8, 192, 1024, 8), (8, 384, 256, 8),
          (8, 1536, 2048, 16), (8, 1536, 49, 16), (8, 1536, 196, 16), (8, 1536, 3136, 16)]


def make_inputs(batch, d, L, N, seed=0):
    """Channels-first inputs with Mamba's initialisation (S4D-real A, dt in [1e-3, 1e-1])."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    return dict(u=torch.randn(batch, d, L, generator=g), delta=0.1 * torch.randn(batch, d, L, generator=g),
                A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1), B=torch.randn(batch, N, L, generator=g),
                C=torch.randn(batch, N, L, generator=g), D=torch.randn(d, generator=g),
                z=torch.randn(batch, d, L, generator=g), delta_bias=dt + torch.log(-torch.expm1(-dt)))


def channels_last(x):
    """(B, d, L) -> (B, L, d) and (B, N, L) -> (B, L, N), materialised (done once, outside the timings)."""
    return {k: (v.transpose(1, 2).contiguous() if v.dim() == 3 else v) for k, v in x.items()}


NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def ours_cf(x):
    return gmamba_ext.selective_scan(*(x[k] for k in NAMES), delta_softplus=True)


def ours_cl(x):
    return gmamba_ext.selective_scan_channels_last(*(x[k] for k in NAMES), delta_softplus=True)


def ref_cf(x):
    return selective_scan_ref(*(x[k] for k in NAMES), delta_softplus=True)


def mambapy_cl(x):
    """mambapy's MambaBlock.ssm + selective_scan (pscan path), channels-last, plus the silu(z) gate."""
    delta = F.softplus(x["delta"] + x["delta_bias"])                  # (B, L, d)
    deltaA = torch.exp(delta.unsqueeze(-1) * x["A"])                   # (B, L, d, N)
    BX = delta.unsqueeze(-1) * x["B"].unsqueeze(2) * x["u"].unsqueeze(-1)  # (B, L, d, N)
    hs = pscan(deltaA, BX)
    y = (hs @ x["C"].unsqueeze(-1)).squeeze(3) + x["D"] * x["u"]
    return y * F.silu(x["z"])


def mambapy_bytes(batch, d, L, N, backward):
    """Peak-memory estimate: pscan pads L to a power of two; peak RSS measured ~5.5 (B, L, d, N) float
    tensors in the forward, ~14 with the backward (deltaA, BX, clones, hs, products, gradients)."""
    L2 = 1 << max(L - 1, 0).bit_length()
    return (16 if backward else 7) * batch * L2 * d * N * 4


def runner(fn, x, dout, backward):
    """A closure running fn forward (and backward from dout w.r.t. every input) on fresh leaves of x."""
    leaves = {k: v.clone().requires_grad_(backward) for k, v in x.items()}
    tensors = [leaves[k] for k in NAMES]

    def run():
        if not backward:
            with torch.no_grad():
                return fn(leaves), None
        out = fn(leaves)
        return out, torch.autograd.grad(out, tensors, dout)

    return run


def timeit(run, warmup, repeats, min_repeats, max_s):
    """Wall-clock seconds of `repeats` calls after `warmup`, stopping early after max_s (but not before
    min_repeats calls)."""
    for _ in range(warmup):
        run()
    times, deadline = [], time.perf_counter() + max_s
    while len(times) < repeats and (len(times) < min_repeats or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": 1e3 * statistics.median(times), "p25_ms": 1e3 * q[0], "p75_ms": 1e3 * q[2],
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times), "n": len(times)}


def max_err(a, b):
    """Largest difference relative to b's largest magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_agreement(results, tol):
    """results: name -> (out in channels-first, grads in NAMES order, channels-first). Compare to ours_cf."""
    base_out, base_grads = results["ours_cf"]
    errors = {}
    for name, (out, grads) in results.items():
        if name == "ours_cf":
            continue
        err = max_err(out, base_out)
        if grads is not None and base_grads is not None:
            err = max([err] + [max_err(g, bg) for g, bg in zip(grads, base_grads)])
        errors[name] = err
        if err > tol:
            raise AssertionError(f"{name} disagrees with ours_cf: max relative error {err:.3g} > {tol}")
    return errors


def to_cf(name, out, grads):
    if not name.endswith("_cl"):
        return out, grads
    cf = lambda t: t.transpose(1, 2) if t.dim() == 3 else t  # noqa: E731
    return cf(out), None if grads is None else [cf(g) for g in grads]


def reference_slice_error(x_cf):
    """The sequential reference on batch 0, channels :16 (the scan is per channel), against ours there."""
    sl = {k: (v[:1, :16] if k in ("u", "delta", "z") else v[:1] if k in ("B", "C") else v[:16])
          for k, v in x_cf.items()}
    with torch.no_grad():
        return max_err(ours_cf(x_cf)[:1, :16], ref_cf(sl))


def reference_seconds(x_cf, steps=32):
    """Predicted seconds of one reference forward: a `steps`-step probe at full size, scaled by L (used only
    to decide whether to run it; never reported as a timing)."""
    L = x_cf["u"].shape[-1]
    probe = {k: (v[..., :steps] if v.dim() == 3 else v) for k, v in x_cf.items()}
    with torch.no_grad():
        ref_cf(probe)  # warm-up
        t0 = time.perf_counter()
        ref_cf(probe)
        seconds = (time.perf_counter() - t0) * L / min(L, steps)
    return seconds


def bench_shape(shape, args, log):
    batch, d, L, N = shape
    x_cf = make_inputs(batch, d, L, N)
    x_cl = channels_last(x_cf)
    dout_cf = torch.randn(x_cf["u"].shape, generator=torch.Generator().manual_seed(1))
    dout = {"cf": dout_cf, "cl": dout_cf.transpose(1, 2).contiguous()}  # the same gradient in both layouts
    ref_slice_err = reference_slice_error(x_cf)
    ref_fwd_s = reference_seconds(x_cf)
    if ref_slice_err > args.tol:
        raise AssertionError(f"{shape}: ours disagrees with the reference by {ref_slice_err:.3g} (batch 0, 16 channels)")
    rows = []
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        impls = {"ours_cf": (ours_cf, x_cf), "ours_cl": (ours_cl, x_cl)}
        skipped = {}
        need = mambapy_bytes(batch, d, L, N, backward)
        if pscan is None:
            skipped["mambapy"] = "mambapy not installed"
        elif need > args.mem_gb * 2**30:
            skipped["mambapy"] = f"needs ~{need / 2**30:.0f} GB of (B, L, d, N) tensors > --mem-gb {args.mem_gb:g}"
        else:
            impls["mambapy_cl"] = (mambapy_cl, x_cl)
        ref_s = ref_fwd_s * (3 if backward else 1)  # autograd through L small steps: ~3x the forward
        if ref_s > args.ref_max_s:
            skipped["reference"] = f"too slow: ~{ref_s:.0f} s a call (32-step probe) > --ref-max-s {args.ref_max_s:g}"
        else:
            impls["ref_cf"] = (ref_cf, x_cf)
        runs = {name: runner(fn, x, dout[name[-2:]], backward) for name, (fn, x) in impls.items()}
        # Same function everywhere: outputs (and all gradients) must agree with ours before any timing.
        errors = check_agreement({name: to_cf(name, *run()) for name, run in runs.items()}, args.tol)
        errors["ref_slice_fwd"] = ref_slice_err
        stats = {}
        for name, run in runs.items():
            stats[name] = timeit(run, args.warmup, args.repeats, args.min_repeats, args.max_s)
            log(f"  {shape} {mode:7s} {name:10s} median {stats[name]['median_ms']:10.2f} ms  "
                f"(IQR {stats[name]['p25_ms']:.2f}-{stats[name]['p75_ms']:.2f}, n={stats[name]['n']})")
        row = {"shape": dict(batch=batch, d=d, L=L, N=N), "mode": mode, "stats": stats,
               "max_rel_error_vs_ours_cf": errors, "skipped": skipped}
        if args.paired and "mambapy_cl" in impls:
            del runs  # free our copies of the inputs and gradients before two workers make theirs
            # Calls shorter than ~20 ms are timed in groups, the same count for both.
            calls = max(1, min(50, round(20.0 / stats["ours_cf"]["median_ms"])))
            row["paired"] = paired_times({name: worker_argv(args, name, shape, backward)
                                          for name in ("ours_cf", "mambapy_cl")}, args.paired, calls)
            r = row["paired"]["ratio_to_ours_cf"]["mambapy_cl"]
            log(f"  {shape} {mode:7s} paired, {args.paired} rounds of {calls} calls: mambapy / ours "
                f"{r['median']:.2f}x (IQR {r['p25']:.2f}-{r['p75']:.2f})")
        rows.append(row)
    return rows


IMPLS = {"ours_cf": (ours_cf, False), "ours_cl": (ours_cl, True), "mambapy_cl": (mambapy_cl, True)}


def worker_argv(args, name, shape, backward):
    """The command line of a paired-timing worker running implementation `name` on `shape`."""
    return [sys.executable, os.path.abspath(__file__), "--worker", name, "--threads", str(args.threads),
            "--shapes", ":".join(map(str, shape))] + (["--worker-backward"] if backward else [])


def run_worker(args):
    """Worker mode: the same inputs as bench_shape (seeded), one warm-up, then serve timed calls."""
    shape = tuple(int(v) for v in args.shapes.split(":"))
    fn, cl = IMPLS[args.worker]
    x = make_inputs(*shape)
    dout = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(1))
    if cl:
        x, dout = channels_last(x), dout.transpose(1, 2).contiguous()
    run = runner(fn, x, dout, args.worker_backward)
    run()
    serve(run)


def fmt(stats, name):
    s = stats.get(name)
    return "skipped" if s is None else f"{s['median_ms']:.2f} ({s['p25_ms']:.2f}-{s['p75_ms']:.2f})"


def ratio(stats, name):
    return "-" if name not in stats else f"{stats[name]['median_ms'] / stats['ours_cf']['median_ms']:.1f}x"


def paired_ratio(row):
    if "paired" not in row:
        return "-"
    r = row["paired"]["ratio_to_ours_cf"]["mambapy_cl"]
    return f"{r['median']:.1f}x ({r['p25']:.1f}-{r['p75']:.1f})"


def markdown(rows):
    lines = ["| B, d, L, N | pass | ours (ms) | ours ch-last (ms) | mambapy (ms) | reference (ms) "
             "| mambapy / ours | mambapy / ours, paired (IQR) | ref / ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, st = r["shape"], r["stats"]
        lines.append(f"| {s['batch']}, {s['d']}, {s['L']}, {s['N']} | {r['mode']} | {fmt(st, 'ours_cf')} | "
                     f"{fmt(st, 'ours_cl')} | {fmt(st, 'mambapy_cl')} | {fmt(st, 'ref_cf')} | "
                     f"{ratio(st, 'mambapy_cl')} | {paired_ratio(r)} | {ratio(st, 'ref_cf')} |")
    notes = sorted({f"- {r['shape']['batch']}, {r['shape']['d']}, {r['shape']['L']}, {r['shape']['N']} "
                    f"{r['mode']}: {who} skipped: {why}" for r in rows for who, why in r["skipped"].items()})
    return "\n".join(lines + ([""] + notes if notes else []))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 instead of 8, fewer repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "scan_cpu.json"))
    p.add_argument("--mem-gb", type=float, default=12.0, help="skip mambapy where its tensors would exceed this")
    p.add_argument("--ref-max-s", type=float, default=None,
                   help="skip the reference where one call would take longer (default 1 s quick, 5 s full)")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative disagreement allowed before timing")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1 quick, 8 full)")
    p.add_argument("--paired", type=int, default=None,
                   help="rounds of paired timing against mambapy, 0 for none (default 10 quick, 20 full)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # paired-timing worker (internal)
    p.add_argument("--worker-backward", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shapes", default=None,
                   help="comma-separated d:L:N triples to run instead of DESIGN.md's list, e.g. 48:16384:8,1536:196:16")
    args = p.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        return run_worker(args)
    if args.paired is None:
        args.paired = 10 if args.quick else 20
    batch = args.batch or (1 if args.quick else 8)
    shapes = ([tuple(int(v) for v in spec.split(":")) for spec in args.shapes.split(",")] if args.shapes
              else [s[1:] for s in SHAPES])
    shapes = [(batch,) + s for s in shapes]
    args.warmup, args.repeats, args.min_repeats, args.max_s = (1, 15, 3, 2.0) if args.quick else (3, 50, 5, 20.0)
    if args.ref_max_s is None:
        args.ref_max_s = 1.0 if args.quick else 5.0
    torch.set_num_threads(args.threads)
    if not gmamba_ext.HAS_EXTENSION:
        sys.exit("gmamba_ext has no compiled extension here: build it first (pip install --no-build-isolation .)")

    lanes = gmamba_ext.ops._C.CPU_SCAN_LANES  # channels per vector in the CPU scan (8: AVX2, 16: AVX-512)
    header = (f"# selective_scan on CPU ({'QUICK, ' if args.quick else ''}batch {batch}, {args.threads} threads, "
              f"{lanes} channels per vector, "
              f"warm-up {args.warmup}, up to {args.repeats} runs or {args.max_s:g} s per cell; median (IQR) ms; "
              f"float32, with D, z, delta_bias, softplus; load average at start {os.getloadavg()[0]:.1f})")
    print(header, flush=True)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, args, lambda m: print(m, flush=True))
    table = markdown(rows)
    print("\n" + header + "\n\n" + table)
    meta = {"quick": args.quick, "threads": args.threads, "torch": torch.__version__, "cpu_scan_lanes": lanes,
            "mambapy": None if pscan is None else __import__("importlib.metadata").metadata.version("mambapy"),
            "cpu": platform.processor() or platform.machine(), "warmup": args.warmup, "repeats": args.repeats,
            "max_s_per_cell": args.max_s, "mem_gb": args.mem_gb, "ref_max_s": args.ref_max_s,
            "paired_rounds": args.paired,
            "loadavg_1min_at_end": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows, "markdown": table}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

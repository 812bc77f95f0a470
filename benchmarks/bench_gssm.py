"""GSSM mixer benchmark: gmamba_ext.gssm (fused) against the unfused composition a user writes today,
gmamba_ext.gssm_reference.gssm_ref (the spec as PyTorch ops + torch.fft: rfft2/irfft2, concatenations,
separate projections) with the best available scan plugged in: mambapy's parallel scan on CPU, mamba-ssm's
CUDA selective_scan_fn on GPU. A second column plugs gmamba_ext's own scan into the same composition, to
separate the gain of the fusion from the gain of the scan; a third (fused_composition) runs gssm's own
kernels and algebra orchestrated from Python, to separate the gain of the C++ orchestration. With
--other-save-policy, fused_recompute (CPU) or fused_keep (GPU) is the fused path with the device's other
GMAMBA_GSSM_SAVE policy: what keeping xz, x1, z1 and relu(pre) for the backward costs in memory and saves in time.
With --other-lowpass, fused_fft_lowpass (CPU) or fused_dft_lowpass (GPU) is the fused path with the device's
other GMAMBA_GSSM_LOWPASS form of FEM's low-pass (ATen FFTs or DFT-matrix GEMMs).

Forward (no grad) and forward+backward (gradients of x and every parameter). Medians and interquartile
ranges of wall-clock (CPU) or device-event (GPU) times after warm-up; peak memory of forward+backward and
of inference (a forward under no_grad) (GPU: torch.cuda's allocator; CPU: a worker per cell with a
malloc-counting allocator preloaded, cpu_peak_memory.py), and on GPU the number of kernels launched per
forward / forward+backward (torch.profiler).
Outputs and gradients are checked to agree before timing. On CPU also a paired speed-up against
unfused_mambapy (--paired ROUNDS): the two take turns call by call, each in a worker process of its own that
keeps freed memory (paired_timing.py), so neither the machine's drift nor the allocator's page faults enter
the ratio. Writes gssm_<device>.json and .md.

    python benchmarks/bench_gssm.py --device cpu [--quick] [--out DIR]
    python benchmarks/bench_gssm.py --device cuda [--quick] [--mamba-ssm PATH] [--dtypes float32,bfloat16]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import gmamba_ext
except ImportError:  # built in place, not installed: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gmamba_ext
from bench_scan_cpu import timeit  # noqa: E402
from bench_scan_gpu import peak_memory, timed  # noqa: E402
from paired_timing import paired_times, serve  # noqa: E402
from cpu_peak_memory import build_shim, peak_mib, report_peak  # noqa: E402
from gmamba_ext.gssm import gssm_composition  # noqa: E402
from gmamba_ext.gssm_reference import GSSMConfig, GSSMParams, gssm_ref  # noqa: E402

# DESIGN.md: batch 8, (C, H = W), expand 1 (d = C / 2), N = 8; the block's d_conv 3.
SHAPES = [(96, 128), (192, 64), (384, 32), (768, 16)]


def mambapy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mambapy's parallel scan behind selective_scan_fn's signature (channels-first in and out), fed as
    mambapy's Mamba block feeds it."""
    from mambapy.pscan import pscan
    u, delta, B, C = (t.transpose(1, 2) for t in (u, delta, B, C))  # (b, L, d) / (b, L, N)
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = F.softplus(delta)
    deltaA = torch.exp(delta.unsqueeze(-1) * A)
    BX = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
    y = (pscan(deltaA, BX) @ C.unsqueeze(-1)).squeeze(3)
    if D is not None:
        y = y + D * u
    return y.transpose(1, 2)


def with_env(name, value, fn):
    """fn with the environment variable name=value around the call (gssm reads GMAMBA_GSSM_SAVE and
    GMAMBA_GSSM_LOWPASS per forward call; the backward follows what the forward kept)."""
    def run(x, p, cfg):
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(x, p, cfg)
        finally:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous
    return run


def implementations(device, mamba_path, other_save_policy=False, other_lowpass=False):
    """name -> fn(x, params, config), and notes on what was unavailable."""
    # fused_composition: the same kernels and algebra orchestrated from Python (what gssm ran before the C++
    # orchestration, and what torch.compile traces): the column that shows the host-side gain.
    impls = {"fused": lambda x, p, cfg: gmamba_ext.gssm(x, p),
             "fused_composition": lambda x, p, cfg: gssm_composition(x, p)}
    if other_save_policy:
        # The fused path with the device's other save policy (the default keeps xz, x1, z1 and relu(pre) on the
        # CPU and recomputes them on a GPU): its time and peak memory against the default's.
        other = "recompute" if device == "cpu" else "keep"
        impls[f"fused_{other}"] = with_env("GMAMBA_GSSM_SAVE", other, impls["fused"])
    if other_lowpass:
        # The fused path with the device's other form of FEM's low-pass (DFT matrices on the CPU, ATen's FFTs
        # elsewhere by default): which is faster where.
        other = "fft" if device == "cpu" else "dft"
        impls[f"fused_{other}_lowpass"] = with_env("GMAMBA_GSSM_LOWPASS", other, impls["fused"])
    notes = []
    if device == "cpu":
        if importlib.util.find_spec("mambapy") is not None:
            impls["unfused_mambapy"] = lambda x, p, cfg: gssm_ref(x, p, cfg, scan=mambapy_scan)
        else:
            notes.append("mambapy is not installed: no unfused_mambapy column")
    else:
        try:
            import mamba_ssm_baseline
            mamba_ssm_baseline.load(mamba_path) if mamba_path else mamba_ssm_baseline.load()
            def mamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
                # mamba-ssm takes D and delta_bias in float32 only (its Mamba module keeps them so),
                # and A in float32 too (it checks A's dtype)
                return mamba_ssm_baseline.selective_scan_fn(
                    u, delta, A.float(), B, C, None if D is None else D.float(), z,
                    None if delta_bias is None else delta_bias.float(), delta_softplus)

            impls["unfused_mamba_ssm"] = lambda x, p, cfg: gssm_ref(x, p, cfg, scan=mamba_scan)
        except Exception as error:  # noqa: BLE001 - any failure to load just drops the column
            notes.append(f"mamba-ssm unavailable ({error}): no unfused_mamba_ssm column")
    impls["unfused_gmamba_scan"] = lambda x, p, cfg: gssm_ref(x, p, cfg, scan=gmamba_ext.selective_scan)
    return impls, notes


def shapes_of(spec):
    """"96x128,768x16" -> [(96, 128), (768, 16)]; None -> DESIGN.md's SHAPES."""
    if not spec:
        return SHAPES
    return [tuple(int(v) for v in item.split("x")) for item in spec.split(",")]


def make_case(batch, C, H, device, dtype, seed=0):
    cfg = GSSMConfig(d_model=C, expand=1, d_state=8, d_conv=3)
    g = torch.Generator().manual_seed(seed)
    params = GSSMParams.init(cfg, generator=g, dtype=dtype, device=device)
    x = torch.randn(batch, H, H, C, generator=g).to(device=device, dtype=dtype)
    return cfg, params, x


def param_names(params):
    """The fields of `params` that hold a tensor, in order: the gradients' order in closures()."""
    return [f.name for f in dataclasses.fields(params) if getattr(params, f.name) is not None]


def closures(fn, cfg, params, x):
    names = param_names(params)
    leaves = [x.detach().clone().requires_grad_()] + [getattr(params, n).detach().clone().requires_grad_()
                                                        for n in names]
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)  # same for every impl

    def call(ts):
        return fn(ts[0], params.replace(**dict(zip(names, ts[1:]))), cfg)

    def fwd():
        with torch.no_grad():
            return call(leaves)

    def fwd_bwd():
        out = call(leaves)
        return out, torch.autograd.grad(out, leaves, dout)

    return fwd, fwd_bwd


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def float64_errors(runs, cfg, params, x):
    """impl -> [largest relative L2 difference from the float64 composition (gmamba_ext's scan in float64,
    checked against the sequential reference by the tests) over the output and the gradients, the tensor
    that has it]: says which implementation is nearer the truth when two disagree."""
    names = ["out", "x"] + param_names(params)
    p64 = params.replace(**{n: getattr(params, n).double() for n in names[2:]})
    _, fwd_bwd = closures(lambda x, p, c: gssm_ref(x, p, c, scan=gmamba_ext.selective_scan), cfg, p64, x.double())
    out, grads = fwd_bwd()
    truth = [out] + list(grads)
    errors = {}
    for name, (o, g) in runs.items():
        per_tensor = [rel_l2(a, b) for a, b in zip([o] + list(g), truth)]
        worst = max(range(len(per_tensor)), key=per_tensor.__getitem__)
        errors[name] = [per_tensor[worst], names[worst]]
    return errors


def agreement(runs, metric):
    """Largest difference (by `metric`) of each implementation's output and gradients from the fused one's."""
    base_out, base_grads = runs["fused"]
    return {name: max([metric(out, base_out)] + [metric(g, bg) for g, bg in zip(grads, base_grads)])
            for name, (out, grads) in runs.items() if name != "fused"}


PAIRED = ("fused", "unfused_mambapy")


def worker_argv(args, name, C, H, batch, dtype, pass_):
    """Command line of a worker: implementation `name`, one pass ("fwd" or "fwd_bwd": paired timing; "peak":
    the peak memory of forward + backward; "peak_fwd": of a forward without autograd, i.e. inference)."""
    return [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--worker", name, "--worker-pass", pass_,
            "--worker-threads", str(torch.get_num_threads()), "--shapes", f"{C}x{H}", "--batch", str(batch),
            "--dtypes", dtype]


def run_worker(args):
    """Worker mode: the same seeded case as bench(), one warm-up call, then serve timed calls."""
    torch.set_num_threads(args.worker_threads)
    (C, H), = shapes_of(args.shapes)
    cfg, params, x = make_case(args.batch, C, H, "cpu", getattr(torch, args.dtypes))
    fwd, fwd_bwd = closures(implementations("cpu", None, True, True)[0][args.worker], cfg, params, x)
    if args.worker_pass in ("peak", "peak_fwd"):
        return report_peak(fwd_bwd if args.worker_pass == "peak" else fwd)
    run = fwd if args.worker_pass == "fwd" else fwd_bwd
    run()
    serve(run)


def paired(args, row):
    """row["paired"][pass] from paired_times, for the forward and forward+backward passes."""
    out = {}
    for pass_ in ("fwd", "fwd_bwd"):
        calls = max(1, min(20, round(50.0 / row["impl"]["fused"][pass_]["median_ms"])))  # >= ~50 ms a turn
        argv = {n: worker_argv(args, n, row["C"], row["H"], row["batch"], row["dtype"], pass_) for n in PAIRED}
        out[pass_] = paired_times(argv, args.paired, calls)
        r = out[pass_]["ratio_to_fused"]["unfused_mambapy"]
        print(f"  paired C={row['C']:4d} H={row['H']:4d} {pass_:7s} unfused_mambapy / fused {r['median']:.2f}x "
              f"(IQR {r['p25']:.2f}-{r['p75']:.2f}, {args.paired} rounds of {calls} calls)", flush=True)
    return out


def cuda_kernel_count(fn):
    """Kernels (and memsets/copies) the device ran for one call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def measure(fn, cfg, params, x, device, args):
    """(outputs and gradients of one forward+backward, timings) of one implementation at one case."""
    fwd, fwd_bwd = closures(fn, cfg, params, x)
    result = fwd_bwd()
    if device == "cpu":
        budget = 4.0 if args.quick else 20.0
        return result, {"fwd": timeit(fwd, 1, 15, 3, budget), "fwd_bwd": timeit(fwd_bwd, 1, 15, 3, budget)}
    return result, {"fwd": timed(fwd, 3, args.reps), "fwd_bwd": timed(fwd_bwd, 3, args.reps),
                    "peak_mib_fwd_bwd": peak_memory(fwd_bwd), "peak_mib_fwd": peak_memory(fwd),
                    "kernels_fwd": cuda_kernel_count(fwd), "kernels_fwd_bwd": cuda_kernel_count(fwd_bwd)}


def bench(args):
    device = args.device
    impls, notes = implementations(device, args.mamba_ssm, args.other_save_policy, args.other_lowpass)

    def report(rows):
        return {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_scan_lanes": getattr(getattr(gmamba_ext.ops, "_C", None), "CPU_SCAN_LANES", None),
                "quick": args.quick, "notes": notes, "rows": rows}

    batch = args.batch or (2 if args.quick and device == "cpu" else 8)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    shim = None
    if device == "cpu":  # peak memory through a counting allocator preloaded into a worker per cell
        shim, why = build_shim(tempfile.mkdtemp(prefix="gssm_peak_"))
        if why:
            notes.append(why)
    rows = []
    for dtype in dtypes:
        for C, H in shapes_of(args.shapes):
            cfg, params, x = make_case(batch, C, H, device, dtype)
            row = {"batch": batch, "C": C, "H": H, "W": H, "d": cfg.d, "N": cfg.d_state, "dtype": str(dtype)[6:],
                   "impl": {}}
            runs = {}
            for name, fn in impls.items():
                try:
                    runs[name], res = measure(fn, cfg, params, x, device, args)
                except Exception as error:  # noqa: BLE001 - one failing column must not cost a GPU run
                    row.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"[:300]
                    print(f"  {name:22s} C={C:4d} H={H:4d} {row['dtype']:9s} FAILED: {row['errors'][name]}")
                    continue
                if shim:
                    for key, pass_ in (("peak_mib_fwd_bwd", "peak"), ("peak_mib_fwd", "peak_fwd")):
                        res[key] = peak_mib(worker_argv(args, name, C, H, batch, row["dtype"], pass_), shim)
                row["impl"][name] = res
                print(f"  {name:22s} C={C:4d} H={H:4d} {row['dtype']:9s} fwd {res['fwd']['median_ms']:9.2f} ms   "
                      f"fwd+bwd {res['fwd_bwd']['median_ms']:9.2f} ms", flush=True)
            if "fused" not in runs:
                rows.append(row)
                continue
            row["rel_l2_vs_float64"] = float64_errors(runs, cfg, params, x)
            # A sanity check (correctness is the test suite's job, against the oracle), judged on the relative
            # L2 difference with a loose float32 tolerance. Float32 gradients are only as close as the ReLU
            # kinks allow: at C=96, H=128 an input of the FEM fusion ReLU lies 2e-9 of its scale from 0, so
            # implementations that round differently take different sides of it; that token's gradients
            # move by 1e-3 of their scale, and the parameter gradients summed over all tokens by up to
            # 2.7e-3 (at C=768, H=16 scaling x by 1 + 1e-6 moves one of them by 8.9e-3). A wrong kernel is
            # off by far more.
            row["max_rel_diff_vs_fused"] = agreement(runs, rel_err)
            row["rel_l2_diff_vs_fused"] = agreement(runs, rel_l2)
            tol = 2e-2 if dtype == torch.float32 else 5e-2
            bad = {k: v for k, v in row["rel_l2_diff_vs_fused"].items() if v > tol}
            row["agrees"] = not bad
            if bad:  # recorded and shown, not fatal: one disagreement must not cost the rest of a GPU run
                print(f"  WARNING: implementations disagree with the fused gssm beyond {tol} at C={C}, H={H}: {bad}")
            if device == "cpu" and args.paired and all(n in runs for n in PAIRED):
                del runs  # our copies of every output and gradient, before two workers make theirs
                row["paired"] = paired(args, row)
            rows.append(row)
            write(args, report(rows))  # after every row: a run cut short keeps what it measured
    return report(rows)


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"


def markdown(report):
    rows = [r for r in report["rows"] if "fused" in r["impl"]]
    impls = list(dict.fromkeys(n for r in report["rows"] for n in list(r["impl"]) + list(r.get("errors", {}))))
    baselines = [n for n in impls if n != "fused"]
    lines = [f"# gssm benchmark: {report['device']} (torch {report['torch']}, {report['threads']} threads)", ""]
    lines += [f"- {n}" for n in report["notes"]]
    lines += [f"- {r['dtype']} C={r['C']} H={r['H']}: {name} failed: {e}"
              for r in report["rows"] for name, e in r.get("errors", {}).items()]
    lines += [""] if len(lines) > 2 else []
    head = "| dtype | B | C | H=W | fused fwd ms | fused fwd+bwd ms |"
    for b in baselines:
        head += f" {b} fwd ms | {b} fwd+bwd ms | speed-up fwd | speed-up fwd+bwd |"
    peak = any("peak_mib_fwd_bwd" in r["impl"]["fused"] for r in rows)
    gpu = any("kernels_fwd" in r["impl"]["fused"] for r in rows)
    if peak:
        head += " fused peak MiB | " + " | ".join(f"{b} peak MiB" for b in baselines) + " |"
    inference = any("peak_mib_fwd" in r["impl"]["fused"] for r in rows)
    if inference:
        head += " fused inference peak MiB | " + " | ".join(f"{b} inference peak MiB" for b in baselines) + " |"
    if gpu:
        head += " fused kernels fwd | " + " | ".join(f"{b} kernels fwd" for b in baselines) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    cell = lambda s: f"{s['median_ms']:.2f} ({s['p25_ms']:.2f}-{s['p75_ms']:.2f})"  # noqa: E731
    for r in rows:
        fu = r["impl"]["fused"]
        line = f"| {r['dtype']} | {r['batch']} | {r['C']} | {r['H']} | {cell(fu['fwd'])} | {cell(fu['fwd_bwd'])} |"
        for b in baselines:
            o = r["impl"].get(b)
            line += (" failed | failed | - | - |" if o is None else
                     f" {cell(o['fwd'])} | {cell(o['fwd_bwd'])} | {o['fwd']['median_ms'] / fu['fwd']['median_ms']:.2f}x"
                     f" | {o['fwd_bwd']['median_ms'] / fu['fwd_bwd']['median_ms']:.2f}x |")
        other = lambda b, k, f=".0f": "-" if k not in r["impl"].get(b, {}) else f"{r['impl'][b][k]:{f}}"  # noqa: E731
        if peak:
            line += f" {other('fused', 'peak_mib_fwd_bwd', '.1f')} | " \
                + " | ".join(other(b, "peak_mib_fwd_bwd", ".1f") for b in baselines) + " |"
        if inference:
            line += f" {other('fused', 'peak_mib_fwd', '.1f')} | " \
                + " | ".join(other(b, "peak_mib_fwd", ".1f") for b in baselines) + " |"
        if gpu:
            line += f" {fu['kernels_fwd']} | " + " | ".join(other(b, "kernels_fwd") for b in baselines) + " |"
        lines.append(line)
    lines += ["", "Times: median (25th-75th percentile). Speed-up = baseline time / fused time (> 1: fused is "
              "faster). Gradients: x and every parameter. Peak MiB: above what was held before the call, the "
              "outputs (and gradients) included; 'inference': a forward under torch.no_grad.", ""]
    if any("paired" in r for r in rows):
        lines += ["Paired speed-up, unfused_mambapy / fused (the two taking turns call by call, each in a process "
                  "of its own that keeps freed memory; median of the per-round ratios, IQR):"]
        for r in rows:
            if "paired" in r:
                q = {k: v["ratio_to_fused"]["unfused_mambapy"] for k, v in r["paired"].items()}
                lines.append(f"- {r['dtype']} C={r['C']} H={r['H']}: " + ", ".join(
                    f"{k} {v['median']:.2f}x ({v['p25']:.2f}-{v['p75']:.2f})" for k, v in q.items()))
        lines += [""]
    lines += [
              "Difference of outputs and gradients from the fused path, checked before timing (largest over "
              "the tensors of the relative L2 difference, which decides agreement; in brackets the largest "
              "elementwise difference relative to the tensor's largest value):"]
    for r in rows:
        diffs = ", ".join(f"{k} {r['rel_l2_diff_vs_fused'][k]:.1e} ({v:.1e})"
                          for k, v in r["max_rel_diff_vs_fused"].items())
        lines.append(f"- {r['dtype']} C={r['C']} H={r['H']}: {diffs}{'' if r.get('agrees', True) else '  (DISAGREES)'}")
    lines += ["", "Largest relative L2 difference from the float64 composition over the output and the gradients "
              "(the tensor that has it):"]
    for r in rows:
        if "rel_l2_vs_float64" in r:
            lines.append(f"- {r['dtype']} C={r['C']} H={r['H']}: " + ", ".join(
                f"{k} {e:.1e} ({t})" for k, (e, t) in r["rel_l2_vs_float64"].items()))
    return "\n".join(lines) + "\n"


def write(args, report):
    """Writes gssm_<device>.json and .md under args.out; returns the Markdown."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gssm_{args.device}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(md)
    return md


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--quick", action="store_true", help="CPU: batch 2 and shorter time budgets")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--shapes", default=None, help='C x H pairs, e.g. "96x128,768x16" (default: DESIGN.md)')
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--other-save-policy", action="store_true",
                        help="also time the fused path with GMAMBA_GSSM_SAVE=recompute (CPU) / keep (GPU)")
    parser.add_argument("--other-lowpass", action="store_true",
                        help="also time the fused path with GMAMBA_GSSM_LOWPASS=fft (CPU) / dft (GPU)")
    parser.add_argument("--mamba-ssm", default=None, help="selective_scan_cuda module (.so or .so.gz)")
    parser.add_argument("--paired", type=int, default=None,
                        help="CPU: rounds of paired timing, fused against unfused_mambapy (default 10; 0: none)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # paired-timing worker (internal)
    parser.add_argument("--worker-pass", default="fwd", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    if args.paired is None:
        args.paired = 10 if args.device == "cpu" else 0
    print(write(args, bench(args)))


if __name__ == "__main__":
    main()

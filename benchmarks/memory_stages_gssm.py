"""Where gssm's peak memory of forward + backward is: the three C++ ops run one by one (gssm_fwd saving
for the backward, gssm_bwd_scan, then gssm_bwd_front after the scan's saved tensors are dropped, as the
autograd function does), and for each the memory held before, its peak and what it leaves, in MiB above
the start (x and the parameters already allocated). Per shape, dtype and GMAMBA_GSSM_SAVE policy. On the
GPU from torch.cuda's allocator; on the CPU through cpu_peak_memory.py's counting allocator, so run it
there as `python benchmarks/memory_stages_gssm.py --device cpu` (it re-runs itself with the allocator).

    python benchmarks/memory_stages_gssm.py --device cuda [--shapes 96x128,768x16] [--dtypes float32,bfloat16]
                                            [--trail N]

--trail N adds, per stage with the recompute policy, the N largest allocations and frees before the stage's
peak and the op each happened in (memory_trail.py): what to free earlier.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gssm import make_case, shapes_of  # noqa: E402
from cpu_peak_memory import build_shim, counter  # noqa: E402
from memory_trail import trail  # noqa: E402
from gmamba_ext.gssm_fused import _param_fields  # noqa: E402

MIB = 2**20


class Meter:
    """held() and peak since reset() in bytes, from the device's allocator or the counting one."""

    def __init__(self, device):
        self.cuda = device == "cuda"
        if not self.cuda:
            self.cpu_reset, self.cpu_peak = counter()

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return self.cpu_reset()

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self.cpu_peak()


def stages(device, C, H, dtype, batch, trail_events=0):
    """[(stage, held before, peak, left after)] in MiB above the start, for one forward + backward; with
    trail_events, instead [(stage, lines)]: memory_trail's account of what made each stage's peak (a
    separate pass: the profiler's own allocations would skew the CPU meter)."""
    cfg, params, x = make_case(batch, C, H, device, dtype)
    ps = [getattr(params, n) for n in _param_fields(1)]
    opts = (H, H, "full", "corner", False)
    meter, rows = Meter(device), []
    dout = torch.randn(batch, H * H, C, device=device, dtype=dtype)
    start = meter.reset()
    unit = batch * H * H * (C // 2) * torch.finfo(dtype).bits / 8

    def run(name, fn):
        if trail_events:
            result, lines = trail(fn, device, unit, trail_events)
            rows.append((name, lines))
            return result
        before = meter.reset()
        result = fn()
        rows.append((name, (before - start) / MIB, (meter.peak() - start) / MIB, (meter.reset() - start) / MIB))
        return result

    # inference first: a forward that saves nothing (as under torch.no_grad), its output dropped after
    run("inference", lambda: torch.ops.gmamba_ext.gssm_fwd(x, ps, [None], *opts, False)[0].shape)
    out, front, scan = run("forward", lambda: torch.ops.gmamba_ext.gssm_fwd(x, ps, [None], *opts, True))
    # consume: each op frees a saved tensor once it has read it for the last time, as in a backward whose
    # graph is not retained
    dx2, *grads_scan = run("bwd_scan", lambda: torch.ops.gmamba_ext.gssm_bwd_scan(dout, x, ps, [None],
                                                                                    scan, *opts, True))
    del scan
    run("bwd_front", lambda: torch.ops.gmamba_ext.gssm_bwd_front(dout, dx2, x, ps, front, *opts, True))
    return rows, unit / MIB


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default=None, help='C x H pairs (default: DESIGN.md\'s)')
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on the GPU, 2 on the CPU")
    parser.add_argument("--out", default=None, help="folder for memory_stages_<device>.md")
    parser.add_argument("--trail", type=int, default=0, metavar="N",
                        help="also list, per stage with the recompute policy, the N largest allocations and "
                             "frees before its peak and the ops they happened in (memory_trail.py)")
    args = parser.parse_args()
    if args.device == "cpu" and "cpu_peak_alloc" not in os.environ.get("LD_PRELOAD", ""):
        shim, why = build_shim(tempfile.mkdtemp(prefix="gssm_mem_"))
        if why:
            sys.exit(why)
        sys.exit(subprocess.call([sys.executable] + sys.argv, env=dict(os.environ, LD_PRELOAD=shim)))
    batch = args.batch or (8 if args.device == "cuda" else 2)
    lines = [f"# gssm memory by stage, {args.device}, batch {batch} (MiB above the start: held before / peak / "
             "left after; u = one (B, L, d) tensor)", ""]

    def write():  # after every cell: a GPU step cut short by its time limit keeps what it measured
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"memory_stages_{args.device}.md"), "w") as f:
                f.write("\n".join(lines) + "\n")

    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for C, H in shapes_of(args.shapes):
            for policy in ("recompute", "keep"):
                os.environ["GMAMBA_GSSM_SAVE"] = policy
                stages(args.device, C, H, dtype, batch)  # warm-up: first-call workspaces (BLAS, caches) stay
                rows, unit = stages(args.device, C, H, dtype, batch)
                (_, _, inference, _), *rows = rows
                cells = "; ".join(f"{n} {b:.1f} / {p:.1f} / {a:.1f}" for n, b, p, a in rows)
                train = max(r[2] for r in rows)
                lines.append(f"- {str(dtype)[6:]} C={C} H={H} {policy}: {cells}; peak {train:.1f} MiB = "
                             f"{train / unit:.1f} u (u = {unit:.2f} MiB); inference (forward saving nothing) "
                             f"peak {inference:.1f} MiB = {inference / unit:.1f} u")
                print(lines[-1], flush=True)
                if args.trail and policy == "recompute":
                    for stage, trail_lines in stages(args.device, C, H, dtype, batch, args.trail)[0]:
                        block = [f"  - {stage}: " + trail_lines[0]] + ["    " + t for t in trail_lines[1:]]
                        lines += block
                        print("\n".join(block), flush=True)
                write()


if __name__ == "__main__":
    main()

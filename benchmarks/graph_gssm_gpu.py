"""gssm forward + backward on the GPU eagerly and replayed from a CUDA graph, fused against the unfused
composition with mamba-ssm's scan: how much of the eager gap is host time (the eager calls are host-bound at
DESIGN's batch 8), and what the fused path gains once the host is out of the way. Device-event medians
(IQR) per call; before timing, each graph's replay is checked against an eager call on the same input
(python_tests check replays on new input).

    python benchmarks/graph_gssm_gpu.py [--mamba-ssm PATH] [--shapes 96x128,768x16] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gssm import closures, implementations, make_case, rel_l2, shapes_of  # noqa: E402
from bench_scan_gpu import timed  # noqa: E402
from gmamba_ext._graph_capture import capture_cuda_graph  # noqa: E402

IMPLS = ("fused", "unfused_mamba_ssm")


def graphed(fwd_bwd):
    """(replay, outputs of the captured call)."""
    graph, (out, grads) = capture_cuda_graph(fwd_bwd, warmup=3)
    return graph.replay, [out, *grads]


def bench_one(fn, cfg, params, x, reps):
    _, fwd_bwd = closures(fn, cfg, params, x)
    row = {"eager": timed(fwd_bwd, 3, reps)}
    try:
        replay, captured = graphed(fwd_bwd)
    except Exception as error:  # noqa: BLE001 - report a capture failure instead of stopping the run
        row["graph_error"] = f"{type(error).__name__}: {error}"[:300]
        return row
    replay()
    torch.cuda.synchronize()
    eager = fwd_bwd()
    row["graph_vs_eager_rel_l2"] = max(rel_l2(a, b) for a, b in zip(captured, [eager[0], *eager[1]]))
    row["graph"] = timed(replay, 0, reps)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mamba-ssm", default=None)
    p.add_argument("--shapes", default="96x128,768x16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_gssm_gpu.py: no CUDA device visible")
    impls, notes = implementations("cuda", args.mamba_ssm)
    rows = []
    for C, H in shapes_of(args.shapes):
        cfg, params, x = make_case(args.batch, C, H, "cuda", torch.float32)
        for name in IMPLS:
            if name not in impls:
                continue
            row = {"impl": name, "C": C, "H": H, **bench_one(impls[name], cfg, params, x, args.reps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"# gssm forward + backward, eager and CUDA graph ({torch.cuda.get_device_name()}, batch {args.batch}, "
             "float32)", "", "| C, H | impl | eager ms (IQR) | graph ms (IQR) | graph vs eager rel. L2 |",
             "|---|---|---|---|---|"]
    cell = lambda s: f"{s['median_ms']:.3f} ({s['p25_ms']:.3f}-{s['p75_ms']:.3f})"  # noqa: E731
    for r in rows:
        graph = cell(r["graph"]) if "graph" in r else f"capture failed: {r['graph_error']}"
        lines.append(f"| {r['C']}, {r['H']} | {r['impl']} | {cell(r['eager'])} | {graph} | "
                     f"{r.get('graph_vs_eager_rel_l2', float('nan')):.1e} |")
    by = {(r["C"], r["H"], r["impl"]): r for r in rows}
    lines.append("")
    for C, H in shapes_of(args.shapes):
        f, u = by.get((C, H, "fused")), by.get((C, H, "unfused_mamba_ssm"))
        for mode in ("eager", "graph"):
            if f and u and mode in f and mode in u:
                lines.append(f"- ({C}, {H}) {mode}: fused {u[mode]['median_ms'] / f[mode]['median_ms']:.2f}x "
                             "the unfused composition")
    lines += [f"- note: {n}" for n in notes]
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "graph_gssm_cuda.json"), "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
    with open(os.path.join(args.out, "graph_gssm_cuda.md"), "w") as fh:
        fh.write(table)


if __name__ == "__main__":
    main()

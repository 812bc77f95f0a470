"""Which op made a call's memory peak: the allocations and frees torch's profiler records (profile_memory),
replayed in time order on one device, and the events before the peak with the ops they happened in.
Works for CPU and CUDA tensors alike (the profiler sees both allocators); a tool for finding what to free
earlier, not a measurement of the peak itself (memory_stages_gssm.py measures that).

    result, lines = trail(fn, "cuda", unit_bytes, events=12)
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def _device_of(event):
    kind = str(event.device_type()).split(".")[-1].upper()
    return "cuda" if kind == "CUDA" else "cpu" if kind == "CPU" else kind.lower()


def trail(fn, device, unit, events=12):
    """Runs fn() under the profiler. Returns (fn's result, lines): the peak above the start in units of `unit`
    bytes and the `events` largest allocations / frees before it (and up to 2 after), each with the running
    total and the chain of ops it happened in."""
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
    recorded = list(prof.profiler.kineto_results.events())
    ops = [e for e in recorded if e.name() != "[memory]"]
    memory = sorted((e for e in recorded if e.name() == "[memory]" and _device_of(e) == device),
                    key=lambda e: e.start_ns())
    total, peak, at, rows = 0, 0, -1, []
    for e in memory:
        total += e.nbytes()
        rows.append((total, e.nbytes(), e.start_ns()))
        if total > peak:
            peak, at = total, len(rows) - 1
    lines = [f"peak {peak / unit:.2f} u above the start ({len(memory)} allocator events)"]
    if at < 0:
        return result, lines
    before = sorted(range(at + 1), key=lambda i: -abs(rows[i][1]))[:events]
    for i in sorted(set(before) | set(range(at, min(len(rows), at + 3)))):
        total_i, delta, t = rows[i]
        inside = sorted((o for o in ops if o.start_ns() <= t <= o.end_ns()), key=lambda o: o.start_ns())
        chain = " > ".join(o.name() for o in inside) or "(outside any op: a tensor freed)"
        mark = "  <- peak" if i == at else ""
        lines.append(f"  {total_i / unit:7.2f} u  {delta / unit:+6.2f}  {chain[-140:]}{mark}")
    return result, lines

"""Paired timing: implementations take turns call by call, each in a worker process of its own.

Why: this team's CPU machine drifts by up to 2x in speed over tens of seconds, so medians timed one
implementation after another compare different phases of the machine (a gssm "gap" of 1.27x between two
runs of the same kernels was exactly that). Taking turns puts both in the same phase, and the ratio is
taken per round. Separate processes keep each one's allocator state its own: glibc's malloc moves its
thresholds after large frees, so one implementation's big temporaries would change how the other's
outputs are allocated (and page-faulted) if they shared a process.

Workers also keep freed memory (`retained_memory_env`): with glibc's defaults, how often a large output
page-faults its memory back in depends on what the process freed before (its mmap threshold moves with
large frees), and that dominated mambapy's times: at (8, 96, 4096, 8) its forward took ~500 ms in a fresh
process, ~200 ms in the benchmark process after the (8, 48, 16384, 8) cells, ~150-170 ms with memory
retained. Retaining memory times the computation, and favours whoever allocates most (mambapy).

The worker side is `serve(run)`; the parent side is `paired_times({name: argv}, rounds)`.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time


def retained_memory_env():
    """os.environ plus glibc malloc settings that keep freed memory in the process for reuse: every
    allocation below 4 GB comes from the heap, and the heap is not trimmed."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="4000000000", MALLOC_TRIM_THRESHOLD_="4000000000")


def serve(run):
    """Worker: announce readiness, then for each line "go N" read from stdin make one untimed call, time N
    calls of run() and print the seconds per call. The untimed call absorbs what the other worker's turn
    left behind: caches holding its data, this process's pool threads asleep."""
    print("ready", flush=True)
    for line in sys.stdin:
        calls = int(line.split()[1])
        run()
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        print(f"{(time.perf_counter() - t0) / calls:.9f}", flush=True)


class _Worker:
    def __init__(self, name, argv, env):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"paired-timing worker {name} did not start (said {line!r}; its stderr has why)")

    def time_once(self, calls):
        self.proc.stdin.write(f"go {calls}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"paired-timing worker {self.name} exited")
        return float(line)

    def close(self):
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}


def paired_times(workers, rounds, calls=1, env=None):
    """workers: name -> argv of a process that calls serve(). Runs `rounds` rounds in which every worker
    times `calls` calls (their mean: short calls are timed in groups), in alternating order (ABBA).
    Returns the per-implementation median and IQR in ms and, for every name after the first, the median
    and IQR of its per-round time ratio to the first. env: the workers' environment (default: retained
    memory)."""
    env = retained_memory_env() if env is None else env
    started = {}
    try:
        for name, argv in workers.items():
            started[name] = _Worker(name, argv, env)
        names = list(workers)
        times = {name: [] for name in names}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(started[name].time_once(calls))
    finally:
        for w in started.values():
            w.close()
    base = names[0]
    return {"rounds": rounds, "calls_per_round": calls,
            "ms": {n: {k: 1e3 * v for k, v in quartiles(times[n]).items()} for n in names},
            "ratio_to_" + base: {n: quartiles([a / b for a, b in zip(times[n], times[base])]) for n in names[1:]}}

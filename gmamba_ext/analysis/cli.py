"""`python -m gmamba_ext.analysis`: influence maps of GMamba and of local baselines at one random input;
writes influence.json (tau per module, the scan-order check for the GSSM-based ones) and influence.png."""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import List, Optional

import torch

from .inputs import check_positive_int
from .metrics import sample_positions, scan_d_conv
from .report import perception_report
from .zoo import comparison_modules


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gmamba_ext.analysis", description=__doc__)
    ap.add_argument("--size", type=int, default=16, help="H = W of the input (default 16)")
    ap.add_argument("--channels", type=int, default=16, help="C, even and >= 8 (default 16)")
    ap.add_argument("--out", default="influence_out", help="output folder (default ./influence_out)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the parameters, input and positions")
    ap.add_argument("--window", type=int, default=4, help="window size of the windowed modules (default 4)")
    ap.add_argument("--positions", type=int, default=8,
                    help="sampled output positions per module: corners, centre, then random (default 8); "
                         "the centre, whose maps are drawn, is added when fewer than 5 are asked for")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--chunk-size", type=int, default=64, help="vector-Jacobian products per backward")
    return ap


def run(size: int = 16, channels: int = 16, out: str = "influence_out", seed: int = 0, window: int = 4,
        positions: int = 8, device: str = "cpu", chunk_size: int = 64, plot: bool = True) -> dict:
    """Computes every module's exact maps, writes out/influence.json (and out/influence.png when matplotlib
    is available and plot is true); returns the JSON dict."""
    for value, name in ((size, "size"), (channels, "channels"), (window, "window"), (positions, "positions"),
                        (chunk_size, "chunk_size")):
        check_positive_int(value, name)
    if channels < 8 or channels % 2:  # the mixers' d = channels // 2 must be >= 4 (FGMM's reduction 4)
        raise ValueError(f"channels must be even and >= 8, got {channels}")
    # Before any computation: a bad device or an output path that is a file fails at once.
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device {device!r} is not usable here: {str(err).splitlines()[0]}") from None
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out!r} exists and is not a folder")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, size, size, generator=gen, dtype=torch.float64).to(dev)
    pos = sample_positions(size, size, positions, seed)
    marked = (size // 2, size // 2)
    if marked not in pos:  # only when --positions < 5
        pos.append(marked)
    result = {"size": size, "channels": channels, "seed": seed, "dtype": "float64", "device": str(dev),
              "method": "exact", "output_positions": [list(p) for p in pos], "marked_position": list(marked),
              "modules": {}}
    panels = []
    for cand in comparison_modules(channels, window, seed, torch.float64, dev):
        xin = x if cand.layout == "bchw" else x.permute(0, 2, 3, 1).contiguous()
        start = time.perf_counter()
        report, maps = perception_report(cand.module, xin, pos, cand.layout, d_conv=scan_d_conv(cand.module),
                                         chunk_size=chunk_size)
        report.update(label=cand.label, layout=cand.layout, causal_scan=cand.causal,
                      seconds=round(time.perf_counter() - start, 3))
        result["modules"][cand.name] = report
        panels.append((f"{cand.label}\ntau = {report['tau']:.2e}", maps[pos.index(marked)], marked))
        extra = f", beyond look-ahead {report['beyond_lookahead_max']:.3g}" if "d_conv" in report else ""
        print(f"{cand.name:20s} tau = {report['tau']:.3e}  zero fraction {report['zero_fraction']:.3f}{extra}"
              f"  ({report['seconds']:.1f} s)")
    os.makedirs(out, exist_ok=True)
    result["png"] = None
    if plot:
        try:
            from .plot import plot_influence_grid
            png = os.path.join(out, "influence.png")
            plot_influence_grid(panels, png, title=f"influence ||dY[p,q,:]/dX[i,j,:]||_F of output x at "
                                f"{marked} (log scale, grey = exactly 0), {size}x{size}, C={channels}")
            result["png"] = "influence.png"
        except ImportError as err:
            result["png_skipped"] = f"matplotlib not available ({err})"
            print(f"PNG skipped: {result['png_skipped']}")
    text = json.dumps(result, indent=2)
    text = re.sub(r"\[\s+(-?\d+),\s+(-?\d+)\s+\]", r"[\1, \2]", text)  # (p, q) pairs on one line
    with open(os.path.join(out, "influence.json"), "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.join(out, 'influence.json')}" + (f" and {result['png']}" if result["png"] else ""))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    a = _parser().parse_args(argv)
    try:
        run(a.size, a.channels, a.out, a.seed, a.window, a.positions, a.device, a.chunk_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    return 0

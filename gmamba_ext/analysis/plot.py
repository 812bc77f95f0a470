"""The PNG grid of influence heatmaps (matplotlib, Agg backend; imported only when a picture is drawn)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

from torch import Tensor

__all__ = ["plot_influence_grid"]


def plot_influence_grid(panels: Sequence[Tuple[str, Tensor, Tuple[int, int]]], path: str, title: str = "",
                        dpi: int = 80) -> None:
    """panels: (title, (H, W) influence map, marked output position). One log-scale heatmap per panel,
    each with its own colour bar (modules differ by orders of magnitude); exact zeros in light grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")  # masked = exactly zero influence
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, grid, (p, q)) in zip(axes.flat, panels):
        a = grid.detach().double().cpu().numpy()
        masked = np.ma.masked_where(a <= 0, a)
        positive = a[a > 0]
        norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
        im = ax.imshow(masked, cmap=cmap, norm=norm, interpolation="nearest")
        ax.plot(q, p, marker="x", color="red", markersize=9, markeredgewidth=2)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if norm is not None:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

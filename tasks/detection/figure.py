"""Which expert the gate gave which test scenes: the gate's view of a few images per expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")


def draw_assignment(split, assignment: np.ndarray, names: list[str], path: Path, per_expert: int = 6) -> Path:
    """One row per expert: the centre crops of the first `per_expert` test images routed to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), per_expert, figsize=(1.6 * per_expert, 1.8 * len(names)), squeeze=False)
    for n, name in enumerate(names):
        chosen = np.flatnonzero(assignment == n)
        crops = split.gate.take(chosen[:per_expert])  # (k, C, C, 3) uint8, read from the shards
        for k, ax in enumerate(axes[n]):
            ax.axis("off")
            if k < len(chosen):
                ax.imshow(crops[k])
                for side in ax.spines.values():
                    side.set_edgecolor(COLOURS[n % len(COLOURS)])
        axes[n][0].set_title(f"{name}: {len(chosen)} images", fontsize=8, loc="left",
                             color=COLOURS[n % len(COLOURS)])
    fig.suptitle("test scenes per expert (the gate's centre crop)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Which expert the gate gave which test scenes: the gate's view of a few images per expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")


def object_sizes(cache) -> np.ndarray:
    """(M,) each image's median object side, sqrt(w h) of its boxes over the image's short side
    (NaN for an image without objects): how much resolution its objects need."""
    from tasks.detection.metrics import unpack_gt

    sizes = []
    for blob, w, h in zip(cache["gt"], cache["img_w"], cache["img_h"]):
        gt = unpack_gt(blob)
        sides = np.sqrt(gt[:, 2] * gt[:, 3]) / min(w, h) if len(gt) else np.array([np.nan])
        sizes.append(float(np.median(sides)))
    return np.array(sizes)


def draw_assignment(split, assignment: np.ndarray, names: list[str], path: Path, per_expert: int = 6) -> Path:
    """One row per expert: the centre crops of the first `per_expert` test images routed to it;
    below, the object sizes of all the images each expert was given (the routing should send
    scenes of small objects to the dearer, sharper experts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1.6 * per_expert, 1.8 * len(names) + 2.2))
    grid = fig.add_gridspec(len(names) + 1, per_expert, height_ratios=[1.0] * len(names) + [1.3])
    axes = [[fig.add_subplot(grid[n, k]) for k in range(per_expert)] for n in range(len(names))]
    sizes = 100 * object_sizes(split.cache)
    hist = fig.add_subplot(grid[len(names), :])
    bins = np.linspace(0, max(np.nanmax(sizes), 1.0), 25) if np.isfinite(sizes).any() else 10
    for n, name in enumerate(names):
        chosen_sizes = sizes[(assignment == n) & np.isfinite(sizes)]
        if len(chosen_sizes):
            hist.hist(chosen_sizes, bins=bins, histtype="step", lw=1.5, color=COLOURS[n % len(COLOURS)],
                      label=f"{name} (median {np.median(chosen_sizes):.0f} %)")
    hist.set_xlabel("median object side per image (% of the image's short side)", fontsize=8)
    hist.set_ylabel("images", fontsize=8)
    hist.tick_params(labelsize=7)
    hist.legend(fontsize=7)
    for n, name in enumerate(names):
        chosen = np.flatnonzero(assignment == n)
        crops = split.gate_inputs.take(chosen[:per_expert])  # (k, C, C, 3) uint8, read from the shards
        for k, ax in enumerate(axes[n]):
            ax.axis("off")
            if k < len(chosen):
                ax.imshow(crops[k])
                for side in ax.spines.values():
                    side.set_edgecolor(COLOURS[n % len(COLOURS)])
        axes[n][0].set_title(f"{name}: {len(chosen)} images", fontsize=8, loc="left",
                             color=COLOURS[n % len(COLOURS)])
    fig.suptitle("test scenes per expert (the gate's centre crop) and the sizes of their objects", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

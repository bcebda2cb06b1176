"""Fig. 7: which expert the gate gave each 64x64 part of a test image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.superres.patches import PATCH, from_patches

COLOURS = ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")


def draw_assignment(split, assignment: np.ndarray, names: list[str], path: Path) -> Path:
    """Draw the test image with the most patches, each patch framed in its expert's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    cache = split.cache
    group = cache["group"].value_counts().idxmax()
    idx = np.flatnonzero(cache["group"].to_numpy() == group)
    pos = cache[["row", "col"]].to_numpy()[idx]  # (P, 2)
    shape = (int(cache["img_h"].iloc[idx[0]]), int(cache["img_w"].iloc[idx[0]]), 3)
    image = from_patches(split.gate_inputs.take(idx), pos, shape)  # (H, W, 3)

    fig, ax = plt.subplots(figsize=(7, 7 * shape[0] / shape[1] + 0.6))
    ax.imshow(image)
    for (row, col), n in zip(pos, assignment[idx]):
        ax.add_patch(mpatches.Rectangle((col + 1, row + 1), PATCH - 3, PATCH - 3, fill=False,
                                        edgecolor=COLOURS[n % len(COLOURS)], linewidth=1.6))
    counts = np.bincount(assignment[idx], minlength=len(names))
    ax.legend(handles=[mpatches.Patch(color=COLOURS[n % len(COLOURS)], label=f"{name}: {counts[n]} patches")
                       for n, name in enumerate(names)], loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3,
              fontsize=8)
    ax.set_title(f"expert per 64x64 patch, test image {group}")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

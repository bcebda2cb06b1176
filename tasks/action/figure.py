"""Fig. 9-like picture: a 2-D projection of the temporal expert's embeddings of the test clips,
coloured (a) by class and (b) by the expert the gate chose. PCA, not t-SNE: deterministic,
no extra dependency, and enough to show which clusters the gate leaves to the temporal mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

EXPERT_COLOURS = ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")


def embedding_columns(cache: pd.DataFrame) -> list[str]:
    """The temporal expert's embedding columns in the cache (emb00_0, emb01_0, ...)."""
    return sorted(c for c in cache.columns if c.startswith("emb") and c.endswith("_0"))


def project_2d(embedding: np.ndarray) -> np.ndarray:
    """(M, D) -> (M, 2) principal components (signs fixed so reruns draw the same picture)."""
    centred = embedding - embedding.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2] * np.sign(vt[:2].sum(axis=1, keepdims=True) + 1e-12)
    points = centred @ axes.T
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    return points


def draw_embedding(cache: pd.DataFrame, assignment: np.ndarray, names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = embedding_columns(cache)
    if not columns:
        raise ValueError("the cache has no temporal-expert embedding columns (emb??_0): rerun `bmoe cache`")
    points = project_2d(cache[columns].to_numpy(dtype=np.float64))
    labels = cache["label"].to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    cmap = "tab10" if labels.max() < 10 else "nipy_spectral"
    scatter = axes[0].scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=14, alpha=0.85)
    axes[0].set_title("(a) temporal expert's embedding, by class")
    if labels.max() < 20:
        axes[0].legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    for n, name in enumerate(names):
        mask = assignment == n
        axes[1].scatter(points[mask, 0], points[mask, 1], s=14, alpha=0.85,
                        color=EXPERT_COLOURS[n % len(EXPERT_COLOURS)], label=f"{name}: {int(mask.sum())} clips")
    axes[1].set_title("(b) expert chosen by the gate")
    axes[1].legend(fontsize=8, loc="best")
    for ax in axes:
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The report's figures, as matplotlib Figures (no pyplot state): curves, the t-SNE map, per-class views."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from kt_edge.evaluate.knn import l2_normalize

MAP_PCA_DIMS = 50  # t-SNE on a PCA projection, the usual speed-up that keeps neighbourhoods
LABELLED_CLASSES = 40  # above this many classes, figures drop per-class tick labels


def curves_figure(curves: dict[str, list[dict]]) -> Figure:
    """Loss per stage (with a running mean once there are 100 steps), and the learning rate under it when logged."""
    with_lr = any("lr" in r for records in curves.values() for r in records)
    fig = Figure(figsize=(5 * len(curves), 5.5 if with_lr else 3.4), layout="constrained")
    grid = fig.subplots(2 if with_lr else 1, len(curves), squeeze=False, sharex="col")
    for i, (stage, records) in enumerate(curves.items()):
        steps = np.array([r["step"] for r in records])
        loss = np.array([r.get("loss", np.nan) for r in records], dtype=float)
        ax = grid[0, i]
        ax.plot(steps, loss, color="tab:blue", alpha=0.35 if len(loss) >= 100 else 1.0, lw=1)
        if len(loss) >= 100:  # a running mean over 2% of the steps shows the trend through batch noise
            window = len(loss) // 50
            ax.plot(steps[window - 1 :], np.convolve(loss, np.ones(window) / window, "valid"), color="tab:blue")
        ax.set(title=stage, ylabel="loss")
        if with_lr:
            grid[1, i].plot(steps, [r.get("lr", np.nan) for r in records], color="tab:gray")
            grid[1, i].set(ylabel="learning rate")
        grid[-1, i].set(xlabel="step")
    return fig


def class_colors(n: int) -> np.ndarray:
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return cmap(np.arange(n) % 20 if n <= 20 else np.linspace(0, 1, n))


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of L2-normalised features (through PCA to 50 dims first when wider)."""
    x = l2_normalize(features)
    if x.shape[1] > MAP_PCA_DIMS and len(x) > MAP_PCA_DIMS:
        x = PCA(MAP_PCA_DIMS, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3.0))
    return TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(x)


def map_figure(shown: dict, classes: list[str], seed: int) -> Figure:
    """One t-SNE panel per model of its map sample, coloured by true class."""
    colors = class_colors(len(classes))
    fig = Figure(figsize=(5.2 * len(shown) + 1.8, 5))
    for i, (model, evaluation) in enumerate(shown.items()):
        ax = fig.add_subplot(1, len(shown), i + 1)
        points = tsne_2d(evaluation.map_features, seed)
        for c, name in enumerate(classes):
            mine = evaluation.map_labels == c
            ax.scatter(points[mine, 0], points[mine, 1], s=6, color=colors[c], label=name)
        ax.set(title=f"{model} ({len(points)} test images)", xticks=[], yticks=[])
    if len(classes) <= 20:  # beyond that a legend hides more than it tells
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", markerscale=2.5, fontsize=8)
        fig.subplots_adjust(right=1 - 1.6 / fig.get_figwidth())
    return fig


def accuracy_figure(classes: list[str], accuracy: np.ndarray, overall: float) -> Figure:
    """One bar per class, or for many classes their accuracies sorted into one curve."""
    n = len(classes)
    fig = Figure(figsize=(6, min(0.28 * n, 12) + 1.2) if n <= LABELLED_CLASSES else (6, 3.5))
    ax = fig.add_subplot()
    if n <= LABELLED_CLASSES:
        ax.barh(np.arange(n), np.nan_to_num(accuracy), color=class_colors(n))
        ax.set(yticks=np.arange(n), yticklabels=classes, xlim=(0, 100), xlabel="top-1 (%)")
        ax.invert_yaxis()
        ax.axvline(overall, color="k", ls=":", lw=1)
    else:
        ax.plot(np.sort(accuracy[~np.isnan(accuracy)])[::-1])
        ax.set(xlabel="classes, best first", ylabel="top-1 (%)", ylim=(0, 100))
        ax.axhline(overall, color="k", ls=":", lw=1)
    return fig


def confusion_figure(classes: list[str], matrix: np.ndarray) -> Figure:
    """Row-normalised confusion matrix; counts written in the cells when there are few classes."""
    n = len(classes)
    side = min(0.45 * n, 12)
    fig = Figure(figsize=(side + 2.5, side + 2))
    ax = fig.add_subplot()
    rates = matrix / np.maximum(matrix.sum(axis=1), 1)[:, None]
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    if n <= LABELLED_CLASSES:
        ax.set(xticks=np.arange(n), yticks=np.arange(n))
        ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
    if n <= 20:
        for (r, c), count in np.ndenumerate(matrix):
            ax.text(
                c, r, str(count), ha="center", va="center", fontsize=7, color="white" if rates[r, c] > 0.5 else "black"
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig

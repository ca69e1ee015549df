"""PNG figures for people (the CSVs next to them are for `dvc plots`): heatmaps and line panels.

Figures are drawn with matplotlib's Agg backend, without software/date metadata, and written
through a temporary file, so the same numbers always give the same bytes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WEAVE_STYLES = [("darkgreen", "--"), ("navy", ":"), ("saddlebrown", "-.")]
Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x, y)


def save(figure, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    figure.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def heatmaps(panels: Mapping[str, tuple[Sequence[str], Sequence[Sequence[float]]]],
             path: str | os.PathLike, title: str, vmin: float = -1.0,
             vmax: float = 1.0) -> None:  # fmt: skip
    """Side-by-side annotated matrices (e.g. cosine: individual | sequential)."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, (labels, matrix)) in zip(axes[0], panels.items(), strict=True):
        image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="RdBu_r")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(name, fontsize=9)
        if len(labels) <= 12:
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    figure.suptitle(title, fontsize=10)
    save(figure, path)


def line_panels(panels: Mapping[str, Series], path: str | os.PathLike, title: str, xlabel: str,
                ylabel: str, xticks: Mapping[float, str] | None = None) -> None:  # fmt: skip
    """One axis per panel, one line per series; shared y so panels compare at a glance."""
    figure, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True
    )
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", markersize=3, label=label)
        if xticks:
            ax.set_xticks(list(xticks), list(xticks.values()), fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    figure.suptitle(title, fontsize=10)
    save(figure, path)


def lambda_curves(panels: Mapping[str, Mapping], path: str | os.PathLike, title: str) -> None:
    """Accuracy vs lambda, one panel per method: thin line per task, bold average, and markers
    for the data-free default (star, drawn over the hollow oracle diamond so both show where
    they coincide) and weave pools (horizontal lines). One legend, right of the panels, holds
    every series any panel draws."""
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 1.6, 2.9 * rows),
                                squeeze=False, sharey=True, layout="constrained")  # fmt: skip
    for ax, (name, panel) in zip(axes.flat, panels.items(), strict=False):
        for label, (x, y) in panel["tasks"].items():
            ax.plot(x, y, linewidth=0.7, alpha=0.5, label=label)
        ax.plot(*panel["average"], color="black", linewidth=2, label="average")
        ax.plot(*panel["oracle"], "D", markersize=9, markerfacecolor="none", markeredgewidth=1.5,
                color="tab:purple", label="oracle (val)", zorder=4)  # fmt: skip
        if panel.get("default"):
            ax.plot(*panel["default"], "*", color="tab:red", markersize=10, label="data-free",
                    zorder=5)  # fmt: skip
        for i, (pool, accuracy) in enumerate(panel.get("weave", {}).items()):
            color, style = WEAVE_STYLES[i % len(WEAVE_STYLES)]
            ax.axhline(accuracy, linestyle=style, color=color, label=f"weave {pool}")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    legend = {}  # label -> handle, over every panel: the first may lack the star or weave
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize=7)
    figure.supxlabel("lambda (log scale)", fontsize=8)
    figure.supylabel("test accuracy", fontsize=8)
    figure.suptitle(title, fontsize=10)
    save(figure, path)


def boxes(panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
          title: str, xlabel: str) -> None:  # fmt: skip
    """Horizontal box plots, one panel per group (e.g. per-task optimal lambdas per method)."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False,
                                layout="constrained")  # fmt: skip
    for ax, (name, groups) in zip(axes[0], panels.items(), strict=True):
        labels = list(groups)
        ax.boxplot([groups[g] for g in labels], orientation="horizontal", widths=0.6)
        for i, label in enumerate(labels, start=1):
            ax.plot(groups[label], [i] * len(groups[label]), ".", color="tab:blue", alpha=0.6)
        ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    figure.suptitle(title, fontsize=10)
    save(figure, path)


def dots(panels: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | os.PathLike,
         title: str, xlabel: str) -> None:  # fmt: skip
    """Ranking dot plot, one panel per unit: a row per method, sorted by its first series (best
    on top), a marker per series. Dots, not bars: the axis spans the values, not 0 to the
    largest, so differences of a point or two stay visible without bars that lie about length."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1.2, 4.6),
                                squeeze=False, layout="constrained")  # fmt: skip
    markers = "o^vsDPX"
    for ax, (name, methods) in zip(axes[0], panels.items(), strict=True):
        labels = sorted(methods, key=lambda m: next(iter(methods[m].values())))
        fullest = sorted(methods.values(), key=len, reverse=True)  # its series order first
        series = list(dict.fromkeys(s for m in fullest for s in m))
        for j, s in enumerate(series):
            values = [methods[m].get(s, float("nan")) for m in labels]
            ax.plot(values, range(len(labels)), markers[j % len(markers)], linestyle="none",
                    markersize=5, alpha=0.85, label=s, color=f"C{j}")  # fmt: skip
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", fontsize=7)
    figure.suptitle(title, fontsize=10)
    save(figure, path)

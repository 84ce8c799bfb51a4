"""The study's figures: gradient flow by relative depth per family, at initialisation and
after training (one figure per dataset), and the input/output ratio at initialisation
against depth, with and without skip connections."""

from __future__ import annotations

import math
from pathlib import Path

from gradtrace.studies.architectures.results import Study

__all__ = ["depth_figure", "family_figure", "study_figures"]


def family_figure(study: Study, dataset: str, path: Path) -> Path:
    """One row per family, initialisation on the left and after training on the right."""
    from matplotlib import pyplot as plt

    from gradtrace.plots import plot_probe, save_figure
    from gradtrace.plots.style import figure_style

    rows = [r for r in study.results if r.dataset == dataset]
    families = list(dict.fromkeys(r.spec.family for r in rows))
    with figure_style():
        fig, axes = plt.subplots(
            len(families), 2, figsize=(11, 3.2 * len(families)), squeeze=False, sharex=True
        )
        for (left, right), family in zip(axes, families):
            members = [r for r in rows if r.spec.family == family]
            plot_probe({r.spec.label: r.init for r in members}, ax=left)
            left.set_title(f"{family}: at initialisation ({len(study.seeds)} seeds)")
            trained = {r.spec.label: r.end for r in members if r.end is not None}
            if trained:
                plot_probe(trained, ax=right)
                right.set_title(f"{family}: after training")
            else:
                right.set_axis_off()
        for ax in axes[:-1].flat:
            ax.set_xlabel("")  # the axes share x: the bottom row names it
        for ax in axes[-1]:
            ax.set_xlabel("relative depth (0 = input layer, 1 = output layer)")
        fig.suptitle(
            f"Gradient flow by family on {dataset} ({study.budget} budget): mean |grad| per "
            "main-path layer, median and range over seeds"
        )
        # Leave the suptitle its own band (half an inch) above the panels.
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return save_figure(fig, path)


def depth_figure(study: Study, path: Path) -> Path:
    """Input/output ratio at initialisation against depth, one line per family and skip
    setting (median over seeds, band: their range)."""
    from gradtrace.plots import save_figure
    from gradtrace.plots.style import figure_style, new_axes

    with figure_style():
        ax = new_axes(7.0, 4.0)
        series = dict.fromkeys((p.family, p.residual) for p in study.depth)
        families = list(dict.fromkeys(family for family, _ in series))
        for family, residual in series:
            points = sorted(
                (p for p in study.depth if (p.family, p.residual) == (family, residual)),
                key=lambda p: p.depth,
            )
            depths = [p.depth for p in points]
            ratios = [p.result.ratio for p in points]
            low = [min(p.result.ratios) for p in points]
            high = [max(p.result.ratios) for p in points]
            color = f"C{families.index(family)}"
            label = f"{family}, {'with' if residual else 'no'} skips"
            ax.plot(
                depths,
                ratios,
                marker="o",
                color=color,
                label=label,
                linestyle="-" if residual else "--",
            )
            ax.fill_between(depths, low, high, color=color, alpha=0.15)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("input/output mean |grad| at init")
        ax.set_title(
            "Batch-normalised networks at initialisation: gradient growth toward the input"
        )
        ax.legend(fontsize=7)
    return save_figure(ax.figure, path)


def study_figures(study: Study, folder: Path) -> list[Path]:
    """Every figure of the study under ``folder`` (``architectures_*.png``)."""
    paths = [
        family_figure(study, dataset, folder / f"architectures_flow_{dataset}.png")
        for dataset in study.datasets()
    ]
    if study.depth and all(math.isfinite(p.result.ratio) for p in study.depth):
        paths.append(depth_figure(study, folder / "architectures_depth.png"))
    return paths

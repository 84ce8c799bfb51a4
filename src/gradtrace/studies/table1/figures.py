"""Figures 1-5 of the MLP Coursework 2 report from Table 1's rows: training curves (1, 4) and
gradient flow (2, 3, 5). The gradient-flow figures show the layers of the original figures:
every parameter whose name has no ``bias``, in ``named_parameters`` order (the stem's
BatchNorm weight included: 9 points for VGG08, 39 for VGG38), as far as the run recorded
them (the Table 1 configs record them all)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradtrace.studies.table1.rows import RowRun

__all__ = ["figure_layers", "figures"]


def figure_layers(row: RowRun) -> list[str]:
    """The parameters the original figures plot for ``row``'s network: every name without
    ``bias``, in ``named_parameters`` order, as the callback records them (``net.`` prefix)."""
    from gradtrace.models import create_model

    options = {k: row.spec.model[k] for k in ("depth", "batch_norm", "residual")}
    net = create_model(
        row.spec.model["arch"], num_classes=row.num_classes, in_chans=row.in_chans, **options
    )
    return [f"net.{name}" for name, _ in net.named_parameters() if "bias" not in name]


def _plotted(row: RowRun) -> tuple[list[dict[str, Any]], list[str]]:
    """The recorded ones of :func:`figure_layers` with short names (``stem.1``,
    ``stages.0.blocks.1.conv2``), and their order."""
    wanted = figure_layers(row)
    recorded = {r["layer"] for r in row.history}

    def short(name: str) -> str:
        return name.removeprefix("net.").removesuffix(".weight")

    records = [{**r, "layer": short(r["layer"])} for r in row.history if r["layer"] in wanted]
    return records, [short(name) for name in wanted if name in recorded]


def _curves_for(row: RowRun, by_epoch: bool) -> dict[str, list[tuple[float, float]]]:
    if by_epoch:
        return {k.removesuffix("_epoch"): v for k, v in row.curves.items() if k.endswith("_epoch")}
    curves = {k: v for k, v in row.curves.items() if not k.endswith("_epoch")}
    # Training accuracy is known per epoch only: place it at the epoch's last step.
    per_epoch = row.steps / max(row.epochs, 1)
    curves["train/acc"] = [(e * per_epoch, a) for e, a in row.curves.get("train/acc_epoch", [])]
    return curves


def figures(rows: Sequence[RowRun], out: Path, budget: str) -> list[Path]:
    """Figures 1-5 as PNGs under ``out/figures/``; returns their paths."""
    from gradtrace.plots import plot_gradient_flow, plot_training_curves, save_figure

    by_name = {r.spec.name: r for r in rows}
    by_epoch = budget == "full"
    xlabel = "epoch" if by_epoch else "optimizer step"
    folder = out / "figures"
    tag = f"({budget} budget)"
    paths = []

    def label(r: RowRun) -> str:
        return f"{r.spec.label}, lr {r.spec.lr:g}"

    def curves(names: Sequence[str], number: int, stem: str, what: str) -> None:
        picked = [by_name[n] for n in names]
        fig = plot_training_curves(
            {label(r): _curves_for(r, by_epoch) for r in picked},
            xlabel=xlabel,
            chance=1.0 / picked[0].num_classes,
            title=f"Fig. {number}: training curves, {what} {tag}",
        )
        paths.append(save_figure(fig, folder / f"fig{number}_{stem}.png"))

    def flow(name: str, number: int, stem: str) -> None:
        r = by_name[name]
        records, order = _plotted(r)
        logged = sorted({rec["step"] for rec in records})
        fig = plot_gradient_flow(
            records,
            layers=order,
            title=f"Fig. {number}: gradient flow of {label(r)} {tag}\n"
            f"mean |grad| of {len(order)} weights (no biases) over {len(logged)} logged steps "
            f"(line: mean, band: min-max)",
        )
        paths.append(save_figure(fig, folder / f"fig{number}_{stem}.png"))

    curves(("vgg08", "vgg38"), 1, "curves_vgg08_vgg38", "VGG08 vs VGG38")
    flow("vgg08", 2, "gradient_flow_vgg08")
    flow("vgg38", 3, "gradient_flow_vgg38")
    curves(("vgg38-bn-rc-lr1e-2",), 4, "curves_vgg38_bn_rc_lr1e-2", "VGG38 BN + RC")
    flow("vgg38-bn-rc-lr1e-2", 5, "gradient_flow_vgg38_bn_rc_lr1e-2")
    return paths

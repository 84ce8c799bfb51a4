"""``make reproduce-table1``: Table 1 and Figures 1-5 of the MLP Coursework 2 report.

Two budgets:

``full`` (default; for GPUs)
    The seven shipped ``configs/table1/*`` runs (CIFAR-100, 47,500 / 2,500 / 10,000, Adam,
    cosine annealing, batch 100, 100 epochs, crop + flip), each through the ``gradtrace``
    CLI as a subprocess under ``--root`` (one row per GPU at a time with ``--gpus``; a
    finished row is skipped and an interrupted one resumed on the next call, as in
    ``sweep local``). ``--from DIR`` collects the rows from a finished run instead: any
    folder holding CLI runs (``runs/sweeps/table1`` after ``make sweep-local
    SWEEP=sweeps/table1.yaml``, or a W&B agent's output folder).
``smoke`` (CPU, minutes)
    Fashion-MNIST (synthetic data, said loudly, when Debian's package is missing), a
    class-balanced subset, 150 steps per row (300 for VGG38 RC, which starts slowly without
    BN), batch 16, in process (``study.short_run``).
    The numbers are not CIFAR-100's; what must hold is the report's qualitative result:
    plain VGG38 at chance with a collapsed gradient ratio, the BN, RC and BN+RC rows learn.

Writes ``<out>/table1.md`` (measured values next to the report's and the differences, the
budget and the data) and ``<out>/figures/fig{1..5}_*.png``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradtrace.datasets import DataNotFoundError
from gradtrace.experiments.study import RunSpec, table1_specs
from gradtrace.gradient_flow import input_output_ratio

__all__ = [
    "REPORTED",
    "RowRun",
    "checks",
    "collect",
    "count_params",
    "figures",
    "format_report",
    "full_commands",
    "grad_ratio",
    "main",
    "read_run",
    "smoke",
]

log = logging.getLogger(__name__)

# Table 1 of the report: #params, train loss, train acc (%), val loss, val acc (%).
REPORTED: dict[str, tuple[str, float, float, float, float]] = {
    "vgg08": ("60 K", 1.74, 51.59, 1.95, 46.84),
    "vgg38": ("336 K", 4.61, 0.01, 4.61, 0.01),
    "vgg38-bn": ("339 K", 1.70, 52.16, 1.84, 48.08),
    "vgg38-rc": ("336 K", 1.33, 61.52, 1.84, 52.32),
    "vgg38-bn-rc": ("339 K", 1.26, 62.99, 1.73, 53.76),
    "vgg38-bn-lr1e-2": ("339 K", 1.70, 52.28, 1.99, 46.72),
    "vgg38-bn-rc-lr1e-2": ("339 K", 0.90, 72.43, 1.58, 59.92),
}
METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
SMOKE_STEPS = 150
# Rows that get more smoke steps. Without BN, VGG38 RC starts slowly: measured on
# Fashion-MNIST (batch 16), 23% validation accuracy after 200 steps, 58% after 300.
SMOKE_STEP_FACTOR = {"vgg38-rc": 2}
TRAIN_KEYS = ("train/loss_step", "train/loss", "train/acc")
CIFAR100 = (100, 3)  # classes, channels of the report's configuration


@dataclass
class RowRun:
    """What one Table 1 row measured (final values, curves, gradient flow)."""

    spec: RunSpec
    metrics: dict[str, float]
    steps: int
    epochs: int
    curves: dict[str, list[tuple[float, float]]]
    """``{"train/loss": [(step, value), ...], ...}``; ``*_epoch`` series are by epoch."""
    history: list[dict[str, Any]] = field(repr=False)
    sources: list[Path]
    num_classes: int
    in_chans: int
    seconds: float | None = None


# --------------------------------------------------------------------------------------------
# Reading runs


def _float(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def read_run(version_dirs: Sequence[Path]) -> tuple[dict, dict, list, int, int]:
    """Final metrics, curves, gradient-flow history, steps and epochs of one run.

    ``version_dirs`` are the ``version_N`` folders of the run (several after resuming), in
    order; later values of the same step replace earlier ones. Curves, as ``(x, value)``
    with x the number of steps (or epochs) done: ``train/loss`` (``train/loss_step`` at
    each logged step), ``val/loss`` and ``val/acc`` at each validation, and the epoch-level
    ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` under ``<key>_epoch``. A
    validation after training (``trainer.validate``) counts as the last step's.
    """
    from gradtrace.gradient_flow import read_history

    rows: list[dict[str, str]] = []
    flow: dict[tuple[int, str], dict[str, Any]] = {}
    for folder in version_dirs:
        if (folder / "metrics.csv").is_file():
            with (folder / "metrics.csv").open(newline="") as f:
                rows += list(csv.DictReader(f))
        if (folder / "gradient_flow.csv").is_file():
            for record in read_history(folder / "gradient_flow.csv"):
                flow[(record["step"], record["layer"])] = record
    trained = [r for r in rows if any(_float(r.get(k)) is not None for k in TRAIN_KEYS)]
    steps = max((int(float(r["step"])) + 1 for r in trained), default=0)
    epochs = max((int(float(r["epoch"])) + 1 for r in trained if r.get("epoch")), default=0)
    by_x: dict[str, dict[float, float]] = {}
    final: dict[str, float] = {}
    for row in rows:
        step, epoch = _float(row.get("step")), _float(row.get("epoch"))
        if step is None:
            continue
        x_step = min(step + 1, steps)
        x_epoch = None if epoch is None else min(epoch + 1, epochs)
        loss = _float(row.get("train/loss_step"))
        if loss is not None:
            by_x.setdefault("train/loss", {})[x_step] = loss
        for key in METRICS:
            value = _float(row.get(key))
            if value is None:
                continue
            final[key] = value
            if key.startswith("val/"):
                by_x.setdefault(key, {})[x_step] = value
            if x_epoch is not None:
                by_x.setdefault(f"{key}_epoch", {})[x_epoch] = value
    curves = {key: sorted(points.items()) for key, points in by_x.items()}
    return final, curves, list(flow.values()), steps, epochs


def grad_ratio(history: Sequence[dict[str, Any]], last_n: int = 5) -> float:
    """First over last layer's ``mean_abs`` (data-flow order, as recorded), each averaged
    over its last ``last_n`` records: far below 1 means the gradient vanished at the input."""
    if len({r["layer"] for r in history}) < 2:
        return math.nan
    return input_output_ratio(history, last_n)


def _matches(spec: RunSpec, config: dict[str, Any], dataset: str) -> bool:
    model, data = config.get("model") or {}, config.get("data") or {}
    trainer = config.get("trainer") or {}
    arch, depth = model.get("arch"), model.get("depth")
    if arch in ("vgg08", "vgg38"):
        arch, depth = "vgg", depth or int(arch[3:])
    want = spec.model
    return (
        arch == "vgg"
        and depth == want["depth"]
        and bool(model.get("batch_norm")) == bool(want["batch_norm"])
        and bool(model.get("residual")) == bool(want["residual"])
        and math.isclose(float(model.get("lr", math.nan)), spec.lr, rel_tol=1e-9)
        and model.get("optimizer", "adam") == want.get("optimizer", "adam")
        and model.get("scheduler", "cosine") == want.get("scheduler", "cosine")
        and model.get("activation") in (None, "leaky_relu")
        and model.get("init") in (None, "pytorch")
        and not model.get("arch_kwargs")
        and not trainer.get("gradient_clip_val")
        and data.get("dataset") == dataset
    )


def collect(
    folder: str | Path, dataset: str = "cifar100", specs: Sequence[RunSpec] | None = None
) -> list[RowRun]:
    """The Table 1 rows found among the CLI runs under ``folder``.

    A run (``<name>/version_*/config.yaml``, as the CLI writes them) is a row's when its
    model, optimiser and data match the row's shipped config (same depth, BN, RC, lr, Adam,
    cosine, default activation and init, no clipping, ``dataset``); epochs and batch size
    may differ and are reported. When several runs match, the one with the most steps wins.
    Raises ``ValueError`` naming the rows that no run matches.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--from {folder}: no such folder")
    specs = list(specs or table1_specs())
    runs: dict[Path, list[tuple[Path, dict[str, Any]]]] = {}
    for config_file in sorted(folder.rglob("version_*/config.yaml")):
        config = yaml.safe_load(config_file.read_text()) or {}
        runs.setdefault(config_file.parent.parent, []).append((config_file.parent, config))
    rows, missing = [], []
    for spec in specs:
        candidates = []
        for versions in runs.values():
            matching = sorted(
                (v for v, c in versions if _matches(spec, c, dataset)),
                key=_version_number,
            )
            if matching:
                final, curves, history, steps, epochs = read_run(matching)
                candidates.append((steps, matching, final, curves, history, epochs))
        if not candidates:
            missing.append(spec.name)
            continue
        steps, matching, final, curves, history, epochs = max(candidates, key=lambda c: c[0])
        hparams = _hparams(matching[-1])
        rows.append(
            RowRun(
                spec=spec,
                metrics=final,
                steps=steps,
                epochs=epochs,
                curves=curves,
                history=history,
                sources=matching,
                num_classes=int(hparams.get("num_classes") or _classes_of(dataset)),
                in_chans=int(hparams.get("in_chans") or (1 if dataset == "fashion_mnist" else 3)),
            )
        )
    if missing:
        raise ValueError(
            f"no {dataset} run under {folder} matches Table 1 row(s) "
            f"{', '.join(missing)}; run them with `make reproduce-table1` or "
            "`make sweep-local SWEEP=sweeps/table1.yaml`"
        )
    return rows


def _version_number(folder: Path) -> int:
    suffix = folder.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def _hparams(version_dir: Path) -> dict[str, Any]:
    """The run's saved hyperparameters (``hparams.yaml``: the model's resolved class and
    channel counts), or ``{}``. The file holds Python tuples, hence the full loader."""
    path = version_dir / "hparams.yaml"
    try:
        return yaml.load(path.read_text(), Loader=yaml.FullLoader) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _classes_of(dataset: str) -> int:
    return {"cifar100": 100}.get(dataset, 10)


# --------------------------------------------------------------------------------------------
# Running the rows


def full_commands(root: Path, extra: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """``(row name, command)`` of the seven full-budget runs: the shipped configs through
    the CLI, under ``root/<row name>``, resuming from ``last.ckpt`` when one exists."""
    return [
        (
            spec.name,
            [
                sys.executable,
                "-m",
                "gradtrace",
                "fit",
                f"--config=table1/{spec.name}",
                f"--trainer.default_root_dir={root}",
                f"--run_name={spec.name}",
                "--ckpt_path=last",
                *extra,
            ],
        )
        for spec in table1_specs()
    ]


def smoke(
    root: Path,
    steps: int = SMOKE_STEPS,
    batch_size: int = 16,
    subset: int | None = None,
    val_size: int = 300,
    every_n_steps: int = 5,
    val_checks_per_epoch: int = 2,
    synthetic: bool = False,
) -> tuple[list[RowRun], str]:
    """Train the seven rows briefly on the smoke data; returns the rows and the data's
    description.

    Each row trains ``steps`` optimizer steps (times :data:`SMOKE_STEP_FACTOR`) on a
    class-balanced ``subset`` of the training images (default: two epochs of ``steps``),
    so the training metrics are those of the last epoch, as in the report; validation
    runs ``val_checks_per_epoch`` times an epoch. ``synthetic`` trains on synthetic data
    instead of Fashion-MNIST (never a silent fallback).
    """
    from gradtrace.experiments.study import short_run, smoke_data

    subset = subset or steps * batch_size // 2
    data, description = smoke_data(
        batch_size=batch_size, val_size=val_size, subset=subset, synthetic=synthetic
    )
    description += (
        f"; {subset:,} training images (class-balanced subset, {subset // batch_size} steps "
        f"an epoch), {val_size:,} validation images"
    )
    rows = []
    for spec in table1_specs():
        start = time.perf_counter()
        row_steps = steps * SMOKE_STEP_FACTOR.get(spec.name, 1)
        log.info("smoke: %s, lr %g, %d steps", spec.label, spec.lr, row_steps)
        result = short_run(
            spec,
            data,
            max_steps=row_steps,
            root=root,
            every_n_steps=every_n_steps,
            enable_progress_bar=False,
            val_check_interval=1.0 / val_checks_per_epoch,
        )
        seconds = time.perf_counter() - start
        final, curves, history, _, epochs = read_run([result.log_dir])
        final.update({k: v for k, v in result.metrics.items() if k in METRICS})
        rows.append(
            RowRun(
                spec=spec,
                metrics=final,
                steps=result.steps,
                epochs=epochs,
                curves=curves,
                history=history,
                sources=[result.log_dir],
                num_classes=result.num_classes,
                in_chans=data.num_channels,
                seconds=seconds,
            )
        )
        log.info(
            "smoke: %s, lr %g: val acc %.1f%% in %.0f s",
            spec.label,
            spec.lr,
            100 * final.get("val/acc", math.nan),
            seconds,
        )
    return rows, description


# --------------------------------------------------------------------------------------------
# Report and figures


def count_params(spec: RunSpec, num_classes: int, in_chans: int) -> int:
    """Parameters of the row's network built for ``num_classes`` and ``in_chans``."""
    from gradtrace.models import create_model

    options = {k: spec.model[k] for k in ("depth", "batch_norm", "residual") if k in spec.model}
    net = create_model(spec.model["arch"], num_classes=num_classes, in_chans=in_chans, **options)
    return sum(p.numel() for p in net.parameters())


def _short(n: int) -> str:
    return f"{(n + 500) // 1000}K"  # half up, as the report rounds 338,500 to 339 K


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _diff(measured: float | None, reported: float) -> str:
    if measured is None or not math.isfinite(measured):
        return "n/a"
    return f"{measured - reported:+.2f}"


def checks(rows: Sequence[RowRun]) -> list[tuple[bool, str]]:
    """The report's qualitative result, checked on ``rows``: ``(holds, statement)``."""
    by_name = {r.spec.name: r for r in rows}
    out = []
    if "vgg38" in by_name:
        r = by_name["vgg38"]
        chance = 1.0 / r.num_classes
        acc = r.metrics.get("val/acc", math.nan)
        out.append(
            (
                acc < 1.5 * chance,
                f"plain VGG38 stays at chance: val acc {100 * acc:.1f}% "
                f"(chance {100 * chance:.0f}%)",
            )
        )
        ratio = grad_ratio(r.history)
        out.append(
            (
                ratio < 1e-3,
                f"plain VGG38's gradient collapses toward the input: first/last layer mean "
                f"|grad| {ratio:.1e} (< 1e-3)",
            )
        )
    for name in ("vgg38-bn", "vgg38-rc", "vgg38-bn-rc", "vgg38-bn-rc-lr1e-2", "vgg08"):
        if name in by_name:
            r = by_name[name]
            chance = 1.0 / r.num_classes
            acc = r.metrics.get("val/acc", math.nan)
            out.append(
                (
                    acc > 2 * chance,
                    f"{r.spec.label} (lr {r.spec.lr:g}) learns: val acc {100 * acc:.1f}% "
                    f"(> 2x chance, {200 * chance:.0f}%)",
                )
            )
    return out


def format_report(
    rows: Sequence[RowRun],
    budget: str,
    data: str,
    figure_paths: Sequence[Path],
    out: Path,
    wall_seconds: float | None = None,
) -> str:
    """The markdown of ``table1.md``."""
    smoke_budget = budget == "smoke"
    synthetic = "SYNTHETIC" in data
    lines = [f"# Table 1 of the MLP Coursework 2 report, reproduced ({budget} budget)", ""]
    if synthetic:
        lines += [
            "> **WARNING: SYNTHETIC DATA** (asked for with `--synthetic`): these numbers come "
            "from generated images and say nothing about real data.",
            "",
        ]
    if smoke_budget:
        lines += [
            "> **Smoke budget**: a few minutes on a CPU, not the report's setup. The measured "
            "values are not comparable with the report's CIFAR-100 numbers (the differences "
            "are shown for completeness only); what must hold is the qualitative result "
            "checked below.",
            "",
        ]
    lengths = {(r.steps, r.epochs) for r in rows}
    if len(lengths) == 1:
        ((steps, epochs),) = lengths
        length = f"{steps} optimizer steps ({epochs} epochs) per row"
    else:
        length = "optimizer steps (epochs) per row as in the table"
        if smoke_budget:
            length += (
                " (VGG38 RC without BN starts slowly and gets "
                f"{SMOKE_STEP_FACTOR['vgg38-rc']}x the steps)"
            )
    lines += [
        f"- Budget: **{budget}**; {length}.",
        f"- Data: {data}.",
        "- Optimiser: Adam, cosine annealing to zero over the run, at each row's learning rate.",
    ]
    if smoke_budget:
        lines.append(
            "- Train loss/acc: the running average over the last epoch (as the report's); "
            "val: the validation split after the last step."
        )
    if wall_seconds is not None:
        lines.append(f"- Wall time: {wall_seconds:.0f} s.")
    lines.append("")
    own = {(r.num_classes, r.in_chans) for r in rows} - {CIFAR100}
    header = "| Model | LR | Steps (epochs) | #Params (CIFAR-100) | report |"
    rule = "|---|---:|---:|---:|---:|"
    if own:
        header += " #Params (this run) |"
        rule += "---:|"
    for metric in ("Train loss", "Train acc %", "Val loss", "Val acc %"):
        header += f" {metric} | report | Δ |"
        rule += "---:|---:|---:|"
    lines += [
        "Measured values next to the report's (Table 1) and their difference (measured - report).",
        "",
        header,
        rule,
    ]
    for r in rows:
        params = count_params(r.spec, *CIFAR100)
        reported = REPORTED[r.spec.name]
        cells = [
            r.spec.label,
            f"{r.spec.lr:g}",
            f"{r.steps} ({r.epochs})",
            f"{_short(params)} ({params:,})",
            reported[0],
        ]
        if own:
            run_params = count_params(r.spec, r.num_classes, r.in_chans)
            cells.append(f"{run_params:,} ({r.num_classes} classes, {r.in_chans} ch.)")
        for key, report_value in zip(METRICS, reported[1:]):
            value = r.metrics.get(key)
            scale = 100.0 if key.endswith("acc") else 1.0
            value = None if value is None else scale * value
            cells += [_num(value), f"{report_value:.2f}", _diff(value, report_value)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## The qualitative result", ""]
    for holds, statement in checks(rows):
        lines.append(f"- {'holds' if holds else '**DOES NOT HOLD**'}: {statement}")
    lines += ["", "Gradient ratio (first/last layer mean |grad|, last 5 logged steps):", ""]
    lines += ["| Model | LR | ratio |", "|---|---:|---:|"]
    lines += [f"| {r.spec.label} | {r.spec.lr:g} | {grad_ratio(r.history):.1e} |" for r in rows]
    lines += ["", "## Figures", ""]
    for path in figure_paths:
        rel = path.relative_to(out) if path.is_relative_to(out) else path
        lines += [f"![{path.stem}]({rel.as_posix()})", ""]
    lines += ["## Runs", ""]
    for r in rows:
        took = f", {r.seconds:.0f} s" if r.seconds is not None else ""
        lines.append(f"- {r.spec.label}, lr {r.spec.lr:g}{took}: {', '.join(map(str, r.sources))}")
    return "\n".join(lines) + "\n"


def _weights_only(row: RowRun) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of conv/linear weights only (what the report plots), with short names
    (``stages.0.blocks.1.conv2``), and their data-flow order."""
    from gradtrace.models import create_model

    options = {k: row.spec.model[k] for k in ("depth", "batch_norm", "residual")}
    net = create_model(
        row.spec.model["arch"], num_classes=row.num_classes, in_chans=row.in_chans, **options
    )
    weights = {f"net.{n}" for n, p in net.named_parameters() if p.ndim >= 2}
    records = [
        {**r, "layer": r["layer"].removeprefix("net.").removesuffix(".weight")}
        for r in row.history
        if r["layer"] in weights
    ]
    return records, list(dict.fromkeys(r["layer"] for r in records))


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
        records, order = _weights_only(r)
        logged = sorted({rec["step"] for rec in records})
        fig = plot_gradient_flow(
            records,
            layers=order,
            title=f"Fig. {number}: gradient flow of {label(r)} {tag}\n"
            f"mean |grad| of each conv/linear weight over {len(logged)} logged steps "
            f"(line: mean, band: min-max)",
        )
        paths.append(save_figure(fig, folder / f"fig{number}_{stem}.png"))

    curves(("vgg08", "vgg38"), 1, "curves_vgg08_vgg38", "VGG08 vs VGG38")
    flow("vgg08", 2, "gradient_flow_vgg08")
    flow("vgg38", 3, "gradient_flow_vgg38")
    curves(("vgg38-bn-rc-lr1e-2",), 4, "curves_vgg38_bn_rc_lr1e-2", "VGG38 BN + RC")
    flow("vgg38-bn-rc-lr1e-2", 5, "gradient_flow_vgg38_bn_rc_lr1e-2")
    return paths


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see ``python -m gradtrace.experiments.table1 --help``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="make reproduce-table1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after `--` go to every full-budget run's `gradtrace fit`, e.g. "
        "`-- --data.root=/datasets/cifar`.",
    )
    parser.add_argument("--budget", choices=("full", "smoke"), default="full")
    parser.add_argument(
        "--from", dest="source", type=Path, default=None, help="collect finished runs from DIR"
    )
    parser.add_argument("--dataset", default="cifar100", help="dataset of the runs --from collects")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder")
    parser.add_argument("--root", type=Path, default=None, help="where the runs go")
    parser.add_argument("--gpus", default=None, help="full budget: e.g. 0,1,2,3")
    smoke_group = parser.add_argument_group("smoke budget")
    smoke_group.add_argument(
        "--steps",
        type=int,
        default=SMOKE_STEPS,
        help=f"optimizer steps per row (VGG38 RC: x{SMOKE_STEP_FACTOR['vgg38-rc']})",
    )
    smoke_group.add_argument("--batch-size", type=int, default=16)
    smoke_group.add_argument(
        "--subset", type=int, default=None, help="training images (default: 2 epochs of steps)"
    )
    smoke_group.add_argument("--val-size", type=int, default=300)
    smoke_group.add_argument("--every", type=int, default=5, help="log every N steps")
    smoke_group.add_argument("--val-checks", type=int, default=2, help="validations per epoch")
    smoke_group.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic data instead of Fashion-MNIST (the numbers then say nothing)",
    )
    args = parser.parse_args(argv)
    sizes = (args.steps, args.batch_size, args.subset or 1, args.val_size, args.every)
    if min(*sizes, args.val_checks) < 1:
        parser.error(
            "--steps, --batch-size, --subset, --val-size, --every and --val-checks must be >= 1"
        )
    if args.subset is not None and args.subset < args.batch_size:
        parser.error(f"--subset ({args.subset}) must hold at least one batch ({args.batch_size})")
    if args.source is not None and args.budget == "smoke":
        parser.error("--from collects full-budget runs; leave out --budget smoke")
    if extra and (args.budget == "smoke" or args.source is not None):
        parser.error("arguments after `--` go to full-budget runs only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        from gradtrace.experiments.sweep import parse_gpus, run_cells

        gpus = parse_gpus(args.gpus)
        if args.budget == "smoke":
            root = args.root or Path("runs/table1-smoke")
            rows, data = smoke(
                root,
                steps=args.steps,
                batch_size=args.batch_size,
                subset=args.subset,
                val_size=args.val_size,
                every_n_steps=args.every,
                val_checks_per_epoch=args.val_checks,
                synthetic=args.synthetic,
            )
        else:
            if args.source is None:
                root = args.root or Path("runs/table1")
                results = run_cells(full_commands(root, extra), root, gpus=gpus)
                failed = [r for r in results if r.status == "failed"]
                if failed:
                    listed = "; ".join(
                        f"{r.name} (exit {r.exit_code}, log {r.log_file})" for r in failed
                    )
                    raise RuntimeError(f"Table 1 run(s) failed: {listed}")
            rows = collect(args.source or root, dataset=args.dataset)
            data = f"{args.dataset} (runs under {args.source or root})"
            if args.dataset == "cifar100":
                data = (
                    "CIFAR-100, 47,500 / 2,500 / 10,000 split, batch 100, crop + flip "
                    f"(runs under {args.source or root})"
                )
    except (ValueError, RuntimeError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    paths = figures(rows, args.out, args.budget)
    report = format_report(rows, args.budget, data, paths, args.out, wall_seconds=wall)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table1.md").write_text(report)
    print(report)
    print(f"Wrote {args.out / 'table1.md'} and {len(paths)} figures in {wall:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

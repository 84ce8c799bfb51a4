"""The checks of ``GradientFlow``'s settings: its arguments when it is built (a ``ValueError``
before any training), and what only the Trainer reveals at train start (one
:class:`~gradtrace.measure.diagnosis.GradientFlowWarning` each, never raised: a fit is not
stopped for them)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from gradtrace.checks import check_choice, check_int, check_range
from gradtrace.measure.diagnosis import GradientFlowWarning
from gradtrace.measure.selection import select_layers
from gradtrace.measure.stats import STATS

__all__ = [
    "check_arguments",
    "check_flight_recorder",
    "check_noise_scale",
    "deepspeed_zero_stage",
    "warn_about_fit_settings",
]

# warnings.warn's stacklevel that points past this module and the callback's two frames
# (the hook and its helper) at Lightning's call of the hook.
_HOOK_CALLER = 4


def check_arguments(
    *,
    include: Sequence[str | type] | str | type,
    exclude: Sequence[str | type] | str | type,
    stats: Sequence[str] | str,
    plot: bool,
    every_n_steps: int | None,
    history_size: int | None,
    histogram_every_n_steps: int | None,
    filename: str,
    activations: bool,
    activation_patience: int,
) -> tuple[tuple[str, ...], tuple[str | type, ...], tuple[str | type, ...]]:
    """Raise ``ValueError`` naming the first bad argument; return ``stats`` (in
    :data:`~gradtrace.measure.stats.STATS` order), ``include`` and ``exclude`` as tuples."""
    check_choice("activations", activations, (False, True))
    check_int("activation_patience", activation_patience, 1)
    given = (stats,) if isinstance(stats, str) else tuple(stats)
    if not given:
        raise ValueError(f"stats must name at least one of {', '.join(STATS)}; got none")
    for stat in given:
        check_choice("stats entry", stat, STATS)
    if plot and "mean_abs" not in given:
        raise ValueError(
            f"plot=True draws mean_abs, so stats must include 'mean_abs'; got {given}"
            " (or pass plot=False)"
        )
    check_int("every_n_steps", every_n_steps, 1, optional=True)
    check_int("history_size", history_size, 1, optional=True)
    check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
    if not isinstance(filename, str) or not filename or Path(filename).name != filename:
        raise ValueError(
            f"filename must be a plain file name such as 'gradient_flow.csv'; got {filename!r}"
        )
    select_layers(torch.nn.Module(), include, exclude)  # checks the patterns now
    stats = tuple(stat for stat in STATS if stat in given)
    return stats, _as_tuple(include), _as_tuple(exclude)


def check_flight_recorder(flight_recorder: int | None, spike_threshold: float) -> None:
    """Raise ``ValueError`` unless ``flight_recorder`` is ``None`` or at least 20 steps (fewer
    could not hold the 10 steps of history the spike rule needs, checked every K // 4 steps)
    and ``spike_threshold`` is positive."""
    check_int("flight_recorder", flight_recorder, 20, optional=True)
    check_range("spike_threshold", spike_threshold, 0.0, low_inclusive=False)


def check_noise_scale(noise_scale: bool, noise_scale_decay: float) -> None:
    """Raise ``ValueError`` unless ``noise_scale`` is a bool and ``noise_scale_decay`` (of its
    running averages) lies strictly between 0 and 1."""
    check_choice("noise_scale", noise_scale, (False, True))
    check_range(
        "noise_scale_decay", noise_scale_decay, 0.0, 1.0, low_inclusive=False, high_inclusive=False
    )


def warn_about_fit_settings(
    *,
    zero_stage: int | None,
    log_every_n_steps: int,
    every_n_steps: int | None,
) -> None:
    """Warn about settings known only at train start: DeepSpeed (``zero_stage``, ``None``
    without it) leaves nothing to measure, ``log_every_n_steps < 1`` only the first and last
    step."""
    if zero_stage is not None:
        warnings.warn(
            f"GradientFlow does not measure under DeepSpeed (ZeRO stage {zero_stage}): its "
            "optimizer steps flat partitions, not the model's parameters, so this run "
            "records nothing. gradtrace.grad_stats(pl_module) in on_before_optimizer_step "
            "reads ZeRO's gradient partitions exactly (with fp16, pass "
            "scale=<the DeepSpeed optimizer's loss_scale>)",
            GradientFlowWarning,
            stacklevel=_HOOK_CALLER,
        )
    if every_n_steps is None and log_every_n_steps < 1:
        warnings.warn(
            f"GradientFlow follows Trainer(log_every_n_steps={log_every_n_steps}): "
            "only the first and the last step are measured; pass every_n_steps to measure "
            "more",
            GradientFlowWarning,
            stacklevel=_HOOK_CALLER,
        )


def _as_tuple(patterns: Sequence[str | type] | str | type) -> tuple[str | type, ...]:
    """One name glob or module type, or several, as a tuple."""
    return (patterns,) if isinstance(patterns, (str, type)) else tuple(patterns)


def deepspeed_zero_stage(strategy: object) -> int | None:
    """The ZeRO stage of a Lightning ``DeepSpeedStrategy``, ``None`` for any other strategy.

    Read from the strategy's config, so that deepspeed need not be importable here.
    """
    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    return int(strategy.config.get("zero_optimization", {}).get("stage", 0))

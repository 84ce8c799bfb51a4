"""Argument checks shared by every gradtrace entry point.

Each raises ``ValueError`` with one line that names the option, says what is valid and shows
the value given, so the ``gradtrace`` command can print it as a usage error (exit status 2)
before any work starts.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["check_choice", "check_int", "check_range"]


def check_choice(option: str, value: object, valid: Iterable[object]) -> None:
    """Raise unless ``value`` is one of ``valid``."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"{option} must be one of {', '.join(map(str, valid))}; got {value!r}")


def check_int(option: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """Raise unless ``value`` is an ``int`` (not a ``bool``) >= ``minimum`` (or ``None`` when
    ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or None" if optional else ""
        raise ValueError(f"{option} must be an integer >= {minimum}{none}; got {value!r}")


def check_range(
    option: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    optional: bool = False,
) -> None:
    """Raise unless ``value`` is a real number in the interval from ``low`` to ``high`` (either
    end open when ``None``; each end inclusive unless said otherwise), or ``None`` when
    ``optional``."""
    if optional and value is None:
        return
    lo = "(-inf" if low is None else f"{'[' if low_inclusive else '('}{low:g}"
    hi = "inf)" if high is None else f"{high:g}{']' if high_inclusive else ')'}"
    none = " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{option} must be a number in {lo}, {hi}{none}; got {value!r}")
    ok_low = low is None or (value >= low if low_inclusive else value > low)
    ok_high = high is None or (value <= high if high_inclusive else value < high)
    if not (ok_low and ok_high):
        raise ValueError(f"{option} must be in {lo}, {hi}{none}; got {value!r}")

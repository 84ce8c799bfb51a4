"""The configs shipped with gradtrace (``--config NAME``): the Table 1 rows
(``table1/*.yaml``) and one per zoo architecture (``arch/*.yaml``)."""

from __future__ import annotations

from pathlib import Path

from gradtrace.cli.errors import UserError

__all__ = ["CONFIG_DIR", "list_configs", "resolve_config", "resolve_config_args"]

CONFIG_DIR = Path(__file__).parent


def list_configs() -> list[str]:
    """Names of the configs shipped with gradtrace (usable as ``--config NAME``)."""
    return sorted(
        str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")
    )


def resolve_config(value: str) -> str:
    """An existing file path unchanged, else the shipped config called ``value``."""
    if Path(value).is_file():
        return value
    shipped = CONFIG_DIR / f"{value.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise UserError(f"no config file {value!r}; shipped configs: {', '.join(list_configs())}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` (or ``-c NAME``) made a path
    (:func:`resolve_config`)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out

"""quiet_output: silences Lightning's info lines and other packages' deprecations inside
gradtrace's commands only, prints warnings on one line, and restores everything on exit."""

from __future__ import annotations

import logging
import warnings

import pytest

from gradtrace.console import quiet_output


def emit_from(module: str, message: str, category: type[Warning]) -> None:
    """Issue a warning attributed to ``module`` (what ``warnings`` filters on)."""
    warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)


def test_inside_quiet_output(capsys: pytest.CaptureFixture[str]) -> None:
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with quiet_output():
            emit_from("lightning.pytorch.utilities._pytree", "LeafSpec is old", FutureWarning)
            emit_from("torch.nn.modules", "old API", DeprecationWarning)
            emit_from(
                "lightning.pytorch.loops.fit_loop",
                "The number of training batches (3) is smaller than the logging interval "
                "Trainer(log_every_n_steps=50).",
                UserWarning,
            )
            emit_from("gradtrace.gradient_flow", "Gradients vanish at step 20", UserWarning)
            emit_from("gradtrace.models", "an old gradtrace option", DeprecationWarning)
            assert not lightning_info.isEnabledFor(logging.INFO)  # tips and device banners
            logging.getLogger("gradtrace.data.datamodule").info("Data: synthetic")
    assert capsys.readouterr().err.splitlines() == [
        "UserWarning: Gradients vanish at step 20",
        "DeprecationWarning: an old gradtrace option",
        "Data: synthetic",
    ]


def test_nothing_changes_for_library_users(capsys: pytest.CaptureFixture[str]) -> None:
    filters, show = list(warnings.filters), warnings.showwarning
    level = logging.getLogger("lightning.pytorch").level
    with quiet_output(), quiet_output():  # nested, as the demo runs short_run
        pass
    assert warnings.filters == filters
    assert warnings.showwarning is show
    assert logging.getLogger("lightning.pytorch").level == level
    assert logging.getLogger("gradtrace").handlers == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emit_from("torch.nn.modules", "old API", DeprecationWarning)
    assert [str(w.message) for w in caught] == ["old API"]

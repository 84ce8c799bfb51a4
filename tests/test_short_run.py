"""The study's short runs: Table 1 rows from the configs, the demo, and the real-data claim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gradtrace.data import find_fashion_mnist
from gradtrace.studies.short_run import short_run, smoke_data, table1_specs


def test_table1_rows_come_from_the_shipped_configs() -> None:
    specs = table1_specs()
    assert [s.label for s in specs] == [
        "VGG08",
        "VGG38",
        "VGG38 BN",
        "VGG38 RC",
        "VGG38 BN + RC",
        "VGG38 BN",
        "VGG38 BN + RC",
    ]
    assert [s.lr for s in specs] == [1e-3] * 5 + [1e-2] * 2
    assert specs[6].model["batch_norm"] is True
    assert specs[6].model["residual"] is True
    with pytest.raises(ValueError, match="no Table 1 row 'vgg39'; rows: vgg08, vgg38"):
        table1_specs(("vgg39",))


NEEDS_FASHION_MNIST = pytest.mark.skipif(
    find_fashion_mnist("data") is None, reason="needs Debian's dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def fashion_mnist_batches() -> Any:
    # Batch 16 keeps each run under ~1 minute on one core; calibrated: VGG08 ~70%, BN+RC ~66%
    # after 150 steps (68% after 120).
    data, description = smoke_data(batch_size=16, val_size=500)
    assert description.startswith("Fashion-MNIST")
    return data


# One network per test, so that the runs spread over the workers.
@pytest.mark.slow
@NEEDS_FASHION_MNIST
@pytest.mark.parametrize(("row", "steps"), [("vgg08", 400), ("vgg38", 40), ("vgg38-bn-rc", 150)])
def test_on_real_data_vgg08_and_bn_rc_learn_while_plain_vgg38_stays_at_chance(
    fashion_mnist_batches: Any, row: str, steps: int, tmp_path: Path
) -> None:
    (spec,) = table1_specs((row,))
    result = short_run(spec, fashion_mnist_batches, steps, tmp_path, enable_progress_bar=False)
    if row == "vgg38":
        assert result.metrics["val/acc"] == pytest.approx(0.1, abs=0.03)
        assert result.grad_ratio < 1e-6
    else:
        assert result.metrics["val/acc"] > 0.5
    if row == "vgg38-bn-rc":
        assert result.grad_ratio > 1e-3

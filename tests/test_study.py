"""The study's short runs: Table 1 rows from the configs, the demo, and the real-data claim."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gradtrace.datasets import find_fashion_mnist
from gradtrace.experiments import demo, study
from gradtrace.experiments.study import short_run, smoke_data, table1_specs


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


def test_demo_falls_back_to_synthetic_data_loudly(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(study, "find_fashion_mnist", lambda root: None)
    with caplog.at_level(logging.WARNING):
        args = ["--steps", "3", "--batch-size", "8", "--val-size", "40", "--out", str(tmp_path)]
        results = demo.main(args)
    assert "FALLING BACK TO SYNTHETIC DATA" in caplog.text
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("\n| VGG") == 3
    assert "SYNTHETIC data (Fashion-MNIST missing)" in summary
    assert (tmp_path / "gradient_flow.png").stat().st_size > 10_000
    assert [r.steps for r in results] == [3, 3, 3]
    # The ratio is the callback's, from the CSV it wrote.
    for r in results:
        assert (r.log_dir / "gradient_flow.csv").is_file()
        assert r.num_classes == 10


@pytest.mark.slow
@pytest.mark.skipif(
    find_fashion_mnist("data") is None, reason="needs Debian's dataset-fashion-mnist"
)
def test_on_real_data_vgg08_and_bn_rc_learn_while_plain_vgg38_stays_at_chance(
    tmp_path: Path,
) -> None:
    # Batch 16 keeps this under ~3 minutes on one core; calibrated: VGG08 ~70%, BN+RC ~70%.
    data, description = smoke_data(batch_size=16, val_size=500)
    assert description.startswith("Fashion-MNIST")
    steps = {"vgg08": 400, "vgg38": 40, "vgg38-bn-rc": 200}
    results = {
        spec.name: short_run(spec, data, steps[spec.name], tmp_path, enable_progress_bar=False)
        for spec in table1_specs(tuple(steps))
    }
    assert results["vgg08"].metrics["val/acc"] > 0.5
    assert results["vgg38-bn-rc"].metrics["val/acc"] > 0.5
    plain = results["vgg38"]
    assert plain.metrics["val/acc"] == pytest.approx(0.1, abs=0.03)
    assert plain.grad_ratio < 1e-6
    assert results["vgg38-bn-rc"].grad_ratio > 1e-3

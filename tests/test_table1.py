"""``make reproduce-table1``: parameter counts, the figures' layers, row matching against the
code's defaults, the smoke budget end to end (tiny, synthetic), collecting finished CLI runs
(``--from``), the report and the figures, the claims and the exit status, where the report
goes (``runs/``, ``reports/`` only when asked) and the full budget's launcher output."""

from __future__ import annotations

import csv
import inspect
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from gradtrace.classifier import ImageClassifier
from gradtrace.cli.main import main as cli_main
from gradtrace.cli.run_files import read_run
from gradtrace.studies import claims as study_claims
from gradtrace.studies.short_run import table1_specs
from gradtrace.studies.table1 import figures as table1_figures
from gradtrace.studies.table1 import report as table1_report
from gradtrace.studies.table1 import reproduce as table1
from gradtrace.studies.table1 import rows as table1_rows

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = [
    "fig1_curves_vgg08_vgg38.png",
    "fig2_gradient_flow_vgg08.png",
    "fig3_gradient_flow_vgg38.png",
    "fig4_curves_vgg38_bn_rc_lr1e-2.png",
    "fig5_gradient_flow_vgg38_bn_rc_lr1e-2.png",
]
LABELS = [
    ("VGG08", "0.001"),
    ("VGG38", "0.001"),
    ("VGG38 BN", "0.001"),
    ("VGG38 RC", "0.001"),
    ("VGG38 BN + RC", "0.001"),
    ("VGG38 BN", "0.01"),
    ("VGG38 BN + RC", "0.01"),
]


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the main table (the one with a ``#Params`` column)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Model | LR | Steps"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_parameter_counts_of_the_cifar100_configuration() -> None:
    # The original coursework code's counts: VGG08 59,716 / VGG38 336,196 / VGG38+BN 338,500.
    counts = {spec.name: table1_report.count_params(spec, 100, 3) for spec in table1_specs()}
    assert counts == {
        "vgg08": 59_716,
        "vgg38": 336_196,
        "vgg38-bn": 338_500,
        "vgg38-rc": 336_196,
        "vgg38-bn-rc": 338_500,
        "vgg38-bn-lr1e-2": 338_500,
        "vgg38-bn-rc-lr1e-2": 338_500,
    }
    # 10 classes and 1 channel: 90 fewer head rows of 33 and 2 fewer stem input channels.
    vgg08 = table1_specs(("vgg08",))[0]
    assert table1_report.count_params(vgg08, 10, 1) == 59_716 - 90 * 33 - 2 * 9 * 32


def test_grad_ratio_is_first_over_last_layer_over_the_last_records() -> None:
    history = [
        {"step": s, "layer": layer, "mean_abs": value}
        for s in range(8)
        for layer, value in (("in", 1e-6 * (s + 1)), ("mid", 1.0), ("out", 1e-2))
    ]
    # last 5 steps of "in": (4 + 5 + 6 + 7 + 8) / 5 * 1e-6 = 6e-6; "out": 1e-2.
    assert study_claims.grad_ratio(history) == pytest.approx(6e-4)
    assert study_claims.grad_ratio(history, last_n=1) == pytest.approx(8e-4)
    assert math.isnan(study_claims.grad_ratio(history[:1]))


def test_full_budget_commands_run_the_shipped_configs_and_resume(tmp_path: Path) -> None:
    commands = table1.full_commands(tmp_path, ["--data.root=/d"])
    run_dir, command = commands[-1]
    assert command == [
        sys.executable,
        "-m",
        "gradtrace",
        "fit",
        "--config=table1/vgg38-bn-rc-lr1e-2",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.root=/d",
    ]
    assert run_dir.parent == tmp_path
    assert run_dir.name.startswith("vgg38-bn-rc-cifar100-lr0.01-")
    assert len({d for d, _ in commands}) == 7
    # With a checkpoint to resume, the row resumes.
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert table1.full_commands(tmp_path, ["--data.root=/d"])[-1][1][-1] == "--ckpt_path=last"


def make_row(name: str, num_classes: int = 100, in_chans: int = 3) -> table1_rows.RowRun:
    return table1_rows.RowRun(
        spec=table1_specs((name,))[0],
        metrics={},
        steps=0,
        epochs=0,
        curves={},
        history=[],
        source=Path("."),
        num_classes=num_classes,
        in_chans=in_chans,
    )


def test_gradient_flow_figures_show_the_original_layers() -> None:
    # The original figures: every parameter without "bias" in named_parameters order, the
    # second being the stem's BatchNorm weight: 9 points for VGG08, 39 for VGG38.
    vgg08 = table1_figures.figure_layers(make_row("vgg08"))
    vgg38 = table1_figures.figure_layers(make_row("vgg38"))
    assert (len(vgg08), len(vgg38)) == (9, 39)
    for layers in (vgg08, vgg38):
        assert layers[0] == "net.stem.0.weight"
        assert layers[1] == "net.stem.1.weight"
        assert layers[-1] == "net.head.weight"
        assert not any("bias" in layer for layer in layers)


def test_rows_match_with_the_code_defaults_filled_in() -> None:
    spec = table1_specs(("vgg38-bn",))[0]
    defaults = {
        name: p.default
        for name, p in inspect.signature(ImageClassifier.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    # The run's config.yaml lists every option, the row's config only those it sets.
    # (config.yaml writes the tuple defaults, such as milestones, as lists)
    saved = {**defaults, **spec.model, "milestones": list(defaults["milestones"])}
    config = {"model": saved, "data": {"dataset": "cifar100"}, "trainer": {}}
    assert table1_rows.matches(spec, config, "cifar100")
    assert not table1_rows.matches(spec, config, "cifar10")
    for key, value in (("weight_decay", 1e-4), ("label_smoothing", 0.1), ("lr_min", 0.0)):
        assert not table1_rows.matches(spec, {**config, "model": {**saved, key: value}}, "cifar100")
    # The same network under its alias, linked class counts and speed options still match.
    alias = {**saved, "arch": "vgg38", "depth": None, "num_classes": 10, "channels_last": False}
    assert table1_rows.matches(spec, {**config, "model": alias}, "cifar100")
    clipped = {**config, "trainer": {"gradient_clip_val": 1.0}}
    assert not table1_rows.matches(spec, clipped, "cifar100")


def test_training_curves_plot(tmp_path: Path) -> None:
    from gradtrace.plots import plot_training_curves, save_figure

    fig = plot_training_curves(
        {
            "A": {"train/loss": [(1, 2.0), (2, 1.5)], "val/acc": [(2, 0.5)]},
            "B": {"train/loss": [(1, 2.3)], "train/acc": []},
        },
        xlabel="epoch",
        chance=0.1,
        title="t",
    )
    loss, acc = fig.axes
    assert loss.get_ylabel() == "cross-entropy loss"
    assert acc.get_ylabel() == "accuracy (%)"
    assert loss.get_xlabel() == acc.get_xlabel() == "epoch"
    assert [line.get_label() for line in loss.lines] == ["A, training", "B, training", "chance"]
    assert list(acc.lines[0].get_ydata()) == [50.0]  # fractions shown in %
    assert acc.lines[0].get_linestyle() == "--"
    assert loss.lines[-1].get_ydata()[0] == pytest.approx(math.log(10))
    assert acc.lines[-1].get_ydata()[0] == pytest.approx(10.0)
    assert loss.lines[0].get_color() != loss.lines[1].get_color()
    assert save_figure(fig, tmp_path / "c.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves({"A": {"train/loss": []}})
    with pytest.raises(ValueError, match="chance must be an accuracy in"):
        plot_training_curves({"A": {"train/loss": [(1, 1.0)]}}, chance=10)


@pytest.mark.slow
def test_smoke_budget_writes_a_complete_table_and_five_figures_on_synthetic_data(
    tmp_path: Path,
) -> None:
    out = tmp_path / "reports"
    code = table1.main(
        ["--budget", "smoke", "--steps", "2", "--batch-size", "4", "--subset", "8",
         "--val-size", "4", "--every", "1", "--val-checks", "1", "--out", str(out),
         "--root", str(tmp_path / "r"), "--synthetic"]
    )  # fmt: skip
    assert code == 0  # too few steps to establish the accuracy claims: none fails
    report = (out / "report.md").read_text()
    assert report.startswith("# Table 1 of the MLP Coursework 2 report, reproduced (smoke budget)")
    assert "**WARNING: SYNTHETIC DATA** (asked for with `--synthetic`)" in report
    assert "- Data: SYNTHETIC data (asked for)" in report
    assert (
        "- Budget: **smoke**; optimizer steps (epochs) per row as in the table (VGG38 RC" in report
    )
    rows = table_rows(report)
    assert [(r[0], r[1]) for r in rows] == LABELS
    assert [r[3] for r in rows] == [
        "60K (59,716)",
        "336K (336,196)",
        "339K (338,500)",
        "336K (336,196)",
        "339K (338,500)",
        "339K (338,500)",
        "339K (338,500)",
    ]
    assert rows[0][5] == "56,170 (10 classes, 1 ch.)"  # this run's own count
    assert [r[2] for r in rows] == ["2 (1)"] * 3 + ["4 (2)"] + ["2 (1)"] * 3  # RC: 2x steps
    # every measured value is a number, every report value is Table 1's, the difference
    # is measured - report
    for row, name in zip(rows, [s.name for s in table1_specs()]):
        for i, reported in zip(range(6, 18, 3), table1_report.REPORTED[name][1:]):
            measured = float(row[i])
            assert float(row[i + 1]) == pytest.approx(reported)
            assert float(row[i + 2]) == pytest.approx(measured - reported, abs=0.011)
    for name in FIGURES:
        assert (out / "figures" / name).read_bytes().startswith(PNG)
        assert f"](figures/{name})" in report
    assert sorted(p.name for p in (out / "figures").iterdir()) == FIGURES
    assert "## The qualitative result" in report
    # 2 steps (VGG38 RC: 4) of the 150 (300) that settle whether a row learns
    verdicts = [line for line in report.splitlines() if line.startswith("- ") and ": " in line]
    accuracy = [line for line in verdicts if "val acc" in line]
    assert len(accuracy) == 6
    for line in accuracy:
        needed = "4 of the 300" if "VGG38 RC (lr" in line else "2 of the 150"
        assert line.startswith(f"- not established at this budget ({needed} steps it needs): ")


def make_runs(root: Path) -> None:
    """The seven rows through the CLI with their shipped configs, on tiny synthetic data."""
    for spec in table1_specs():
        cli_main(
            [
                "fit",
                f"--config=table1/{spec.name}",
                "--data.dataset=synthetic",
                "--data.synthetic_sizes=[20, 10]",
                "--data.val_size=10",
                "--data.batch_size=5",
                "--data.eval_batch_size=10",
                "--data.augment=none",
                "--data.normalization=split",
                "--trainer.max_epochs=2",
                "--trainer.log_every_n_steps=1",
                "--trainer.num_sanity_val_steps=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.callbacks=[{class_path: gradtrace.GradientFlow, init_args: "
                "{plot: false, every_n_steps: 1, include: ['*.weight']}}, {class_path: "
                "lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_top_k: 0}}]",
                f"--trainer.default_root_dir={root}",
            ]
        )


@pytest.mark.slow
def test_from_collects_finished_cli_runs_into_the_table_and_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    make_runs(root)
    run_of = {
        spec.name: next(
            run
            for run in root.iterdir()
            if table1_rows.matches(spec, read_run(run).config, "synthetic")
        )
        for spec in table1_specs()
    }
    # A decoy with more steps that is not a Table 1 run (Kaiming init): never picked.
    decoy = root / "vgg38-kaiming"
    shutil.copytree(run_of["vgg38"], decoy)
    config = yaml.safe_load((decoy / "config.yaml").read_text())
    config["model"]["init"] = "kaiming"
    (decoy / "config.yaml").write_text(yaml.safe_dump(config))
    with (decoy / "metrics.csv").open("a") as f:
        f.write(
            ",".join(["999"] * len((decoy / "metrics.csv").read_text().split("\n")[0].split(",")))
        )

    out = tmp_path / "reports"
    assert table1.main(["--from", str(root), "--dataset", "synthetic", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "(full budget)" in report
    assert "Smoke budget" not in report
    assert "- Budget: **full**; 4 optimizer steps (2 epochs) per row." in report
    rows = table_rows(report)
    assert [(r[0], r[1]) for r in rows] == LABELS
    assert rows[0][5] == f"{59_716 - 90 * 33:,} (10 classes, 3 ch.)"  # from hparams.yaml
    assert {r[2] for r in rows} == {"4 (2)"}
    # The values are the last epoch's, read independently from each run's metrics.csv.
    for row, spec in zip(rows, table1_specs()):
        metrics = list(csv.DictReader((run_of[spec.name] / "metrics.csv").open()))
        last = {k: float([m[k] for m in metrics if m.get(k)][-1]) for k in table1_rows.METRICS}
        shown = [float(row[i]) for i in range(6, 18, 3)]
        assert shown == pytest.approx(
            [last["train/loss"], 100 * last["train/acc"], last["val/loss"], 100 * last["val/acc"]],
            abs=0.006,
        )
    assert f"- VGG38, lr 0.001: {run_of['vgg38']}" in report
    assert "cosine annealing to 2e-05" in report
    assert "Precision: fp32 (`32-true`" in report
    assert sorted(p.name for p in (out / "figures").iterdir()) == FIGURES
    capsys.readouterr()

    shutil.rmtree(run_of["vgg38-rc"])
    assert table1.main(["--from", str(root), "--dataset", "synthetic", "--out", str(out)]) == 2
    assert re.search(r"matches Table 1 row\(s\) vgg38-rc;", capsys.readouterr().err)
    assert table1.main(["--from", str(root), "--out", str(out)]) == 2  # no cifar100 runs
    assert "no cifar100 run under" in capsys.readouterr().err


def test_measured_places_a_final_validation_at_the_last_step(tmp_path: Path) -> None:
    header = "epoch,step,train/loss_step,train/loss,train/acc,val/loss,val/acc\n"
    (tmp_path / "metrics.csv").write_text(
        header
        + "0,0,2.3,,,,\n0,1,2.2,,,,\n0,1,,,,2.1,0.2\n0,1,,2.25,0.1,,\n"
        + "1,2,2.0,,,,\n1,3,1.9,,,,\n1,3,,,,1.8,0.4\n1,3,,1.95,0.3,,\n2,4,,,,1.7,0.5\n"
    )
    final, curves, steps, epochs = table1_rows.measured(read_run(tmp_path))
    assert (steps, epochs) == (4, 2)
    assert final == {"train/loss": 1.95, "train/acc": 0.3, "val/loss": 1.7, "val/acc": 0.5}
    assert curves["train/loss"] == [(1, 2.3), (2, 2.2), (3, 2.0), (4, 1.9)]
    assert curves["val/acc"] == [(2, 0.2), (4, 0.5)]  # the validation after training: step 4
    assert curves["train/acc_epoch"] == [(1, 0.1), (2, 0.3)]
    assert curves["val/acc_epoch"] == [(1, 0.2), (2, 0.5)]


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        table1.main(["--budget", "smoke", "--steps", "0"])
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        table1.main(["--budget", "smoke", "--", "--x=1"])
    assert "after `--` go to full-budget runs only" in capsys.readouterr().err
    assert table1.main(["--from", "/nonexistent/runs"]) == 2
    assert "--from /nonexistent/runs: no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Claims, exit status and where the report goes, on rows made up for the purpose


def fake_row(
    name: str, val_acc: float, steps: int | None = None, ratio: float = 0.5
) -> table1_rows.RowRun:
    """A smoke-budget row (10 classes) that trained ``steps`` (default: just enough to settle
    its claims), reached ``val_acc``, and whose first/last layer mean |grad| is ``ratio``."""
    steps = study_claims.settling_steps(name) if steps is None else steps
    layers = table1_figures.figure_layers(make_row(name, 10, 1))
    last = len(layers) - 1
    history = [
        {"step": step, "layer": layer, "mean_abs": 1e-2 * ratio ** (1 - i / last)}
        for step in range(0, steps, max(1, steps // 5))
        for i, layer in enumerate(layers)
    ]
    half = steps // 2
    return table1_rows.RowRun(
        spec=table1_specs((name,))[0],
        metrics={"train/loss": 1.5, "train/acc": val_acc, "val/loss": 1.6, "val/acc": val_acc},
        steps=steps,
        epochs=2,
        curves={
            "train/loss": [(1, 2.3), (steps, 1.5)],
            "val/loss": [(half, 1.9), (steps, 1.6)],
            "val/acc": [(half, val_acc / 2), (steps, val_acc)],
            "train/acc_epoch": [(1, val_acc / 2), (2, val_acc)],
        },
        history=history,
        source=Path("runs/table1-smoke") / name,
        num_classes=10,
        in_chans=1,
    )


def as_reported(**changed: table1_rows.RowRun) -> list[table1_rows.RowRun]:
    """The seven rows as the report has them (plain VGG38 at chance with a collapsed gradient,
    the others learning), but those in ``changed``."""
    rows = {
        spec.name: fake_row(spec.name, 0.10 if spec.name == "vgg38" else 0.5)
        for spec in table1_specs()
    }
    rows["vgg38"] = fake_row("vgg38", 0.10, ratio=1e-9)
    rows.update({name.replace("_", "-"): row for name, row in changed.items()})
    return list(rows.values())


def test_claims_hold_fail_or_are_not_established_at_the_budget() -> None:
    verdicts = {c.name: c.verdict for c in study_claims.check_claims(as_reported())}
    assert verdicts == {
        "plain VGG38 stays at chance": "holds",
        "plain VGG38's gradient collapses toward the input": "holds",
        "VGG38 BN (lr 0.001) learns": "holds",
        "VGG38 RC (lr 0.001) learns": "holds",
        "VGG38 BN + RC (lr 0.001) learns": "holds",
        "VGG38 BN + RC (lr 0.01) learns": "holds",
        "VGG08 (lr 0.001) learns": "holds",
    }
    # 2x chance is 20%: 19% does not learn; plain VGG38 at 16% (> 1.5x chance) left chance;
    # a first/last ratio of 2e-3 is no collapse (< 1e-3).
    failing = as_reported(
        vgg38=fake_row("vgg38", 0.16, ratio=2e-3), vgg38_bn=fake_row("vgg38-bn", 0.19)
    )
    claims = study_claims.check_claims(failing)
    assert study_claims.does_not_hold_line(claims) == (
        "3 claim(s) do not hold: plain VGG38 stays at chance; plain VGG38's gradient collapses "
        "toward the input; VGG38 BN (lr 0.001) learns"
    )
    assert "- **DOES NOT HOLD**: VGG38 BN (lr 0.001) learns: val acc 19.0% (> 2x chance, 20%)" in (
        study_claims.claims_markdown(claims)
    )
    # One step short of settling (VGG38 RC: 299 of 300): neither holds nor fails.
    short = as_reported(
        vgg38_bn=fake_row("vgg38-bn", 0.19, steps=149), vgg38_rc=fake_row("vgg38-rc", 0.1, 299)
    )
    claims = {c.name: c for c in study_claims.check_claims(short)}
    assert study_claims.does_not_hold_line(list(claims.values())) is None
    assert claims["VGG38 BN (lr 0.001) learns"].markdown() == (
        "- not established at this budget (149 of the 150 steps it needs): VGG38 BN (lr 0.001) "
        "learns: val acc 19.0% (> 2x chance, 20%)"
    )
    assert claims["VGG38 RC (lr 0.001) learns"].reason == "299 of the 300 steps it needs"
    # the gradient claim needs two layers' records, at any step
    one_layer = fake_row("vgg38", 0.1, ratio=1e-9)
    one_layer.history = one_layer.history[:1]
    rows = as_reported(vgg38=one_layer)
    [gradient] = [c for c in study_claims.check_claims(rows) if "gradient" in c.name]
    assert (gradient.verdict, gradient.reason) == ("not established", "no gradients of two layers")


@pytest.fixture
def fake_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[table1_rows.RowRun]]:
    """The smoke budget's training replaced by the rows put in the returned list; the working
    directory is ``tmp_path`` with a committed ``reports/`` of its own."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports" / "figures").mkdir(parents=True)
    (tmp_path / "reports" / "table1.md").write_text("the committed report\n")
    (tmp_path / "reports" / "figures" / FIGURES[0]).write_bytes(b"the committed figure")
    planned: list[list[table1_rows.RowRun]] = []
    monkeypatch.setattr(table1, "smoke", lambda root, **kwargs: (planned.pop(), "made-up data"))
    return planned


SMOKE = ["--budget", "smoke", "--synthetic"]


def test_the_report_goes_under_runs_and_into_reports_only_when_asked(
    tmp_path: Path, fake_smoke: list[list[table1_rows.RowRun]]
) -> None:
    fake_smoke.append(as_reported())
    assert table1.main(SMOKE) == 0
    out = tmp_path / "runs" / "table1-smoke"
    report = (out / "report.md").read_text()
    assert "- Data: made-up data." in report
    assert sorted(p.name for p in (out / "figures").iterdir()) == FIGURES
    assert (tmp_path / "reports" / "table1.md").read_text() == "the committed report\n"
    committed_figure = tmp_path / "reports" / "figures" / FIGURES[0]
    assert committed_figure.read_bytes() == b"the committed figure"
    assert sorted(p.name for p in (tmp_path / "reports" / "figures").iterdir()) == FIGURES[:1]

    fake_smoke.append(as_reported())
    assert table1.main([*SMOKE, "--update-reports", "--out", "elsewhere"]) == 0
    out = tmp_path / "elsewhere"
    assert (tmp_path / "reports" / "table1.md").read_text() == (out / "report.md").read_text()
    for name in FIGURES:
        committed = (tmp_path / "reports" / "figures" / name).read_bytes()
        assert committed == (out / "figures" / name).read_bytes()
        assert committed.startswith(PNG)


def test_a_claim_that_does_not_hold_exits_1_after_writing_the_report(
    tmp_path: Path,
    fake_smoke: list[list[table1_rows.RowRun]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_smoke.append(as_reported(vgg38_rc=fake_row("vgg38-rc", 0.12)))
    assert table1.main(SMOKE) == 1
    report = (tmp_path / "runs" / "table1-smoke" / "report.md").read_text()
    failed = [line for line in report.splitlines() if "DOES NOT HOLD" in line]
    assert failed == [
        "- **DOES NOT HOLD**: VGG38 RC (lr 0.001) learns: val acc 12.0% (> 2x chance, 20%)"
    ]
    assert capsys.readouterr().err.splitlines() == [
        "make reproduce-table1: 1 claim(s) do not hold: VGG38 RC (lr 0.001) learns "
        "(see runs/table1-smoke/report.md)"
    ]
    assert (tmp_path / "reports" / "table1.md").read_text() == "the committed report\n"


FAILS_OFFLINE = (
    "import sys; print('Epoch 0: 0%|'); "
    "print('gradtrace: error: could not download cifar-100-python.tar.gz', file=sys.stderr); "
    "sys.exit(2)"
)


def test_the_full_budget_prints_one_line_per_run_and_exits_1_when_one_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    monkeypatch.setattr(
        table1,
        "full_commands",
        lambda root, extra: [
            (root / "vgg08-a", [sys.executable, "-c", "print('Epoch 0: 100%|')"]),
            (root / "vgg38-b", [sys.executable, "-c", FAILS_OFFLINE]),
        ],
    )
    assert table1.main(["--root", str(root)]) == 1
    lines = [re.sub(r"\d+ s", "N s", line) for line in capsys.readouterr().out.splitlines()]
    logs = f"{root}/<run>/launch.log"
    assert lines == [
        f"Table 1: 2 runs, one after the other, under {root} (each run's output: {logs})",
        "[1/2] vgg08-a: done in N s",
        "[2/2] vgg38-b: failed (exit 2) after N s: "
        "gradtrace: error: could not download cifar-100-python.tar.gz",
        f"Table 1: 1 done, 1 failed; logs: {logs}",
    ]
    assert "Epoch 0: 0%|" in (root / "vgg38-b" / "launch.log").read_text()
    assert not (root / "report.md").exists()

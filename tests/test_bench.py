"""The bench's machinery on tiny workloads: interleaving, statistics, the step-by-step fit,
the baselines, FLOP and sync counting, the child processes' measurements, and the reports.

No speed targets here: those are what ``make bench`` reports.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gradtrace.bench import child
from gradtrace.bench.gpu import table1_rows
from gradtrace.bench.phases import BenchConfig, _children
from gradtrace.bench.report import (
    FIGURES,
    TOP_LEVEL_KEYS,
    Goal,
    build_report,
    render_markdown,
)
from gradtrace.bench.stats import Summary, interleave, overheads, ratios, round_orders
from gradtrace.bench.stepper import TrainerSteps
from gradtrace.bench.workloads import (
    HostSyncCounter,
    Matmul,
    OurBatches,
    PlainLoop,
    TorchvisionBatches,
    _copy_direction,
    train_step_flops,
)
from gradtrace.classifier import ImageClassifier
from gradtrace.datamodule import ImageDataModule, TrainBatches
from gradtrace.models import create_model

SMALL = {"dataset": "synthetic", "synthetic_sizes": (300, 20), "val_size": 20, "batch_size": 8}


def small_dm(**kwargs: Any) -> ImageDataModule:
    dm = ImageDataModule(**{**SMALL, "num_classes": 10, **kwargs})
    dm.setup("fit")
    return dm


def quiet_trainer_kwargs(root: Path, **kwargs: Any) -> dict[str, Any]:
    return dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# stats


def test_round_orders_rotate_so_every_workload_takes_every_place() -> None:
    assert round_orders(["a", "b", "c"], 4) == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    with pytest.raises(
        ValueError, match="names must be distinct and not empty; got \\['a', 'a'\\]"
    ):
        round_orders(["a", "a"], 1)


def test_interleave_runs_rounds_in_order_and_drops_the_warmup() -> None:
    calls: list[str] = []
    ticks = iter(range(1000))
    clock = lambda: float(next(ticks))  # noqa: E731  (each reading advances one second)

    def timed_by_clock(name: str):
        return lambda: calls.append(name)  # returns None: timed around the call

    def own_duration() -> float:
        calls.append("own")
        return 0.25 * len(calls)

    switched: list[str] = []
    samples = interleave(
        {"a": timed_by_clock("a"), "b": timed_by_clock("b"), "own": own_duration},
        rounds=2,
        warmup=1,
        clock=clock,
        between=switched.append,
    )
    # warm-up round a b own, then b own a, then own a b
    assert calls == ["a", "b", "own", "b", "own", "a", "own", "a", "b"]
    assert switched == calls
    assert samples["a"] == [1.0, 1.0]  # two clock readings around each call
    assert samples["own"] == [0.25 * 5, 0.25 * 7]  # its own return value, warm-up dropped
    with pytest.raises(ValueError, match="rounds must be >= 1; got 0"):
        interleave({"a": timed_by_clock("a")}, rounds=0)


def test_ratios_overheads_and_summary() -> None:
    assert ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert overheads([1.1, 2.0], [1.0, 2.0]) == pytest.approx([0.1, 0.0])
    with pytest.raises(ValueError, match="the same number of rounds; got 2 and 1"):
        ratios([1.0, 2.0], [1.0])
    summary = Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.median, summary.low, summary.high) == (3.0, 1.0, 5.0)
    assert (summary.q1, summary.q3, summary.rounds) == (2.0, 4.0, 5)
    assert summary.to_dict()["values"] == [5.0, 1.0, 3.0, 2.0, 4.0]
    single = Summary.of([7.0])
    assert (single.median, single.q1, single.q3, single.rounds) == (7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError, match="at least one value"):
        Summary.of([])


# ---------------------------------------------------------------------------------------------
# the step-by-step fit


class CountingClassifier(ImageClassifier):
    """Counts its training steps (an independent record of how many ran)."""

    steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


def tiny_model(cls: type = CountingClassifier) -> ImageClassifier:
    return cls("coursework_vgg", num_classes=10, arch_kwargs={"width": 4}, scheduler="none")


def test_trainer_steps_runs_exactly_the_steps_asked_for(tmp_path: Path) -> None:
    dm = small_dm()  # 280 training images: 35 batches of 8
    model = tiny_model()
    with TrainerSteps(model, dm, **quiet_trainer_kwargs(tmp_path)) as steps:
        steps.start()
        assert model.steps == 0  # start-up only: waits at the first batch
        seconds = [steps.run(2), steps.run(3)]
        # the fit waits at the start of the next batch: the last block's steps all ran
        assert model.steps == 5 == steps.steps_run
        assert all(s > 0 for s in seconds)
        assert steps.trainer.global_step == 5
    assert model.steps == 5  # closing skips the rest of the epoch


def test_trainer_steps_reports_the_end_of_the_data_and_errors(tmp_path: Path) -> None:
    dm = small_dm(synthetic_sizes=(44, 20))  # 24 training images: 3 batches
    with TrainerSteps(tiny_model(), dm, **quiet_trainer_kwargs(tmp_path)) as steps:
        steps.run(2)
        with pytest.raises(RuntimeError, match="the fit ended after 2 timed steps"):
            steps.run(2)
        with pytest.raises(RuntimeError, match="the fit has ended"):
            steps.run(1)

    class Broken(CountingClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise ValueError("broken step")

    broken = TrainerSteps(tiny_model(Broken), small_dm(), **quiet_trainer_kwargs(tmp_path))
    with broken, pytest.raises(RuntimeError, match=r"the fit failed: ValueError\('broken step'\)"):
        broken.run(1)
    with pytest.raises(ValueError, match="steps must be a positive integer; got 0"):
        TrainerSteps(tiny_model(), dm, **quiet_trainer_kwargs(tmp_path)).run(0)


# ---------------------------------------------------------------------------------------------
# baselines


def test_plain_loop_trains_on_the_batches_the_data_module_makes() -> None:
    dm = small_dm()
    images, labels = dm.split("train")
    plain = PlainLoop(
        "coursework_vgg", images, labels, dm.mean, dm.std, num_classes=10, batch_size=8,
        model_options={"width": 4},
    )  # fmt: skip
    ours = TrainBatches(images, labels, 8, seed=dm.seed, augment=True, padding=dm.crop_padding)
    for step, batch in zip(range(3), ours):
        x, y = plain.next_batch()
        expected_x, expected_y = dm.transform_batch(batch)
        torch.testing.assert_close(x, expected_x, rtol=0, atol=0, msg=f"batch {step}")
        assert torch.equal(y, expected_y)
        assert x.is_contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in plain.net.parameters()]
    assert plain.run(2) > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, plain.net.parameters()))
    with pytest.raises(ValueError, match="precision must be one of 32-true, bf16-mixed"):
        PlainLoop("vgg08", images, labels, dm.mean, dm.std, precision="16-mixed")


def conv_linear_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward + backward FLOPs of convs and linears, from the layers' shapes (by hand)."""
    shapes: list[tuple[torch.nn.Module, torch.Size]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: shapes.append((mod, out.shape)))
        for m in net.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    net(x)
    for h in hooks:
        h.remove()
    total = 0
    for i, (mod, out) in enumerate(shapes):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            forward = 2 * out.numel() * mod.in_channels * k
        else:
            forward = 2 * out.numel() * mod.in_features
        # backward: the weight gradient always, the input gradient except for the first layer
        # (the images need none)
        total += forward * (2 if i == 0 else 3)
    return total


def test_train_step_flops_match_a_count_by_hand() -> None:
    flops = train_step_flops(
        "coursework_vgg", batch_size=4, num_classes=10, model_options={"width": 4}
    )
    net = create_model("coursework_vgg", num_classes=10, width=4)
    assert flops == conv_linear_flops(net, torch.zeros(4, 3, 32, 32))


def test_matmul_workload() -> None:
    matmul = Matmul(64)
    assert matmul.flops == 2 * 64**3 * matmul.repeat
    assert matmul.repeat >= 1
    assert matmul.run() > 0


def test_data_pipelines_make_batches_and_the_loader_stays_in_one_epoch() -> None:
    dm = small_dm()
    ours = OurBatches(dm)
    assert ours.run(40) > 0  # 35 batches per epoch: goes on into the next epoch
    theirs = TorchvisionBatches(dm, workers=0, warmup=2)
    assert len(theirs) == 35
    x, y = next(iter(theirs.loader))
    assert x.shape == (8, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.shape == (8,)
    assert theirs.run(30) > 0
    with pytest.raises(ValueError, match="an epoch has 35 batches and 32 are drawn; cannot draw"):
        theirs.run(4)
    theirs.close()


def test_host_sync_counter_attributes_scalar_reads_to_their_caller() -> None:
    x = torch.arange(6.0)
    counter = HostSyncCounter()
    with counter:
        x.sum().item()  # not counted: inactive
        counter.active = True
        line = inspect.currentframe().f_lineno
        x.sum().item()
        bool(x.max() > 2)
        torch.nonzero(x)
        x * 2  # no sync
        counter.active = False
    where = f"{__file__}:{{}} (test_host_sync_counter_attributes_scalar_reads_to_their_caller)"
    assert dict(counter.counts) == {
        "aten._local_scalar_dense from " + where.format(line + 1): 1,  # .item()
        "aten._local_scalar_dense from " + where.format(line + 2): 1,  # bool(tensor)
        "aten.nonzero from " + where.format(line + 3): 1,
    }


def test_copies_that_wait_are_told_apart_without_a_gpu() -> None:
    aten = torch.ops.aten
    cpu, gpu = (
        SimpleNamespace(device=torch.device("cpu")),
        SimpleNamespace(device=torch.device("cuda")),
    )
    to_cuda, to_cpu = {"device": torch.device("cuda")}, {"device": torch.device("cpu")}
    assert _copy_direction(aten._to_copy.default, (gpu,), to_cpu) == "device-to-host copy"
    assert _copy_direction(aten._to_copy.default, (cpu,), to_cuda) == "blocking host-to-device copy"
    assert _copy_direction(aten._to_copy.default, (cpu,), {**to_cuda, "non_blocking": True}) is None
    assert _copy_direction(aten._to_copy.default, (cpu,), {"dtype": torch.half}) is None
    assert _copy_direction(aten.copy_.default, (cpu, gpu), {}) == "device-to-host copy"
    assert _copy_direction(aten.copy_.default, (gpu, cpu, True), {}) is None
    assert _copy_direction(aten.copy_.default, (gpu, cpu), {}) == "blocking host-to-device copy"
    assert _copy_direction(aten.add.Tensor, (cpu, cpu), {}) is None


# ---------------------------------------------------------------------------------------------
# child processes' measurements (run in this process: same code)


@pytest.mark.slow  # a fresh Python process: imports and a warm-up fit, ~10-20 s
def test_child_memory_in_a_fresh_process() -> None:
    [memory] = _children([["memory", "--arch", "vgg08", "--steps", "1", "--batch-size", "32"]])
    assert memory["measure"] == "peak resident set size (VmHWM)"
    assert (memory["arch"], memory["steps"], memory["batch_size"]) == ("vgg08", 1, 32)
    # At least the stem's output, which backward keeps (32 images x 32 channels x 32 x 32
    # fp32 = 4 MiB), and not the whole process (Python, torch, Lightning, the data).
    assert 4 < memory["peak_mb"] < memory["baseline_mb"]


def test_child_throughput(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    args = ["--arch", "vgg08", "--warmup", "1", "--steps", "2", "--batch-size", "4"]
    child.main(["throughput", *args, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["processes"] == 1
    assert result["steps"] == 2
    assert result["images_per_s"] == pytest.approx(2 * 4 / result["seconds"])


def test_table1_rows_come_from_the_packaged_configs() -> None:
    rows = table1_rows()
    assert len(rows) == 7
    assert all(row["epochs"] == 100 for row in rows)
    by_name = {row["name"]: row["arch"] for row in rows}
    assert by_name["vgg08"] == ("coursework_vgg", 8, False, False)
    assert by_name["vgg38-bn-rc-lr1e-2"] == ("coursework_vgg", 38, True, True)
    # the GPU section times each distinct network once
    assert len(set(by_name.values())) == 5


def test_training_pool_holds_every_timed_step_in_one_epoch() -> None:
    assert BenchConfig.for_device(quick=True, device="cpu").training_pool() == 50_000
    gpu = BenchConfig.for_device(quick=False, device="cuda")
    # VGG38: (2 warm-up + 10 rounds) x 25 steps x 4 Lightning blocks, + 1, + validation
    assert gpu.training_pool() == (12 * 25 * 4 + 1) * 100 + 2_500


# ---------------------------------------------------------------------------------------------
# reports


def fake_phases() -> dict[str, Any]:
    s = Summary.of
    models = {
        "vgg08": {
            "seconds_per_step": {"plain": s([0.4, 0.5]), "gradtrace": s([0.41, 0.5])},
            "train_step_ratio": s([0.97, 1.0, 0.99]),
            "steps_per_block": 1,
        },
        "vgg38": {
            "seconds_per_step": {"plain": s([2.0]), "gradtrace": s([2.1])},
            "train_step_ratio": s([0.9, 0.93, 0.92]),
            "steps_per_block": 1,
            "callback_overhead": {
                "gradtrace": s([0.01, -0.02, 0.015]),
                "grad_norm": s([0.05]),
                "wandb_watch": s([0.1]),
            },
            "callback_hook_fraction": {"gradtrace": s([0.001]), "grad_norm": s([0.02])},
            "data_vs_model": s([900.0, 1000.0]),
            "flops": {
                "train_step_flops": 84e9,
                "train_step_flops_per_s": s([30e9]),
                "matmul_flops_per_s": s([40e9]),
                "matmul_size": 2048,
                "flops_fraction": s([0.75]),
            },
        },
    }
    return dict(
        device="cpu: test",
        settings=BenchConfig.for_device(quick=True, device="cpu").to_dict(),
        training={
            "models": models,
            "host_overhead": {
                "torch_threads": 1,
                "seconds_per_step": {"plain": s([0.009]), "gradtrace": s([0.0113])},
                "extra_seconds_per_step": s([0.002, 0.0023, 0.003]),
                "block": 20,
            },
        },
        data={
            "batches_per_s": {"gradtrace": s([500.0]), "torchvision": s([20.0])},
            "speedup": s([4.0, 25.0, 26.0]),
            "batches_per_round": 20,
            "torchvision_workers": 2,
            "threads": 2,
        },
        memory={"vgg08": {"peak_mb": 90.5}, "vgg38": {"peak_mb": 400.0}},
        scaling={"skipped": "test"},
        host_syncs={"unlogged_step": {}, "logged_step": {"aten.x from lightning/y.py:1 (f)": 1.0}},
        gpu={"skipped": "no CUDA device"},
        environment={"torch": torch.__version__},
        caveats=["a caveat"],
        elapsed_s=100.0,
    )


def test_report_keys_values_and_verdicts() -> None:
    report = build_report(**fake_phases())
    text = json.dumps(report, allow_nan=False)  # plain JSON, no NaN/inf
    assert json.loads(text) == report
    assert set(TOP_LEVEL_KEYS) <= set(report)
    assert report["device"] == "cpu: test"
    assert report["train_step_ratio"] == {"vgg08": 0.99, "vgg38": 0.92}
    assert report["callback_overhead"] == {"gradtrace": 0.01, "grad_norm": 0.05, "wandb_watch": 0.1}
    assert report["data_speedup_vs_torchvision"] == 25.0
    assert report["data_vs_model"] == 950.0
    assert report["peak_memory_mb"] == {"vgg08": 90.5, "vgg38": 400.0}
    assert report["flops_fraction"] == 0.75
    for key in ("train_step_ratio", "callback_overhead", "peak_memory_mb"):
        assert all(isinstance(v, float) for v in report[key].values())
    figures = report["figures"]
    assert [f.key for f in FIGURES] == list(figures)
    assert figures["train_step_ratio/vgg08"]["passed"] is True
    assert figures["train_step_ratio/vgg38"]["passed"] is False
    assert figures["callback_overhead/gradtrace"]["passed"] is True
    assert figures["data_speedup_vs_torchvision"]["passed"] is True
    assert figures["callback_overhead/grad_norm"]["goal"] is None
    assert figures["callback_hook_fraction/wandb_watch"]["summary"] is None  # not measured
    assert figures["train_step_ratio/vgg38"]["summary"]["values"] == [0.9, 0.93, 0.92]


def test_markdown_shows_every_figure_with_goal_and_verdict() -> None:
    text = render_markdown(build_report(**fake_phases()))
    assert "- Device: **cpu: test**" in text
    assert (
        "| Training step, gradtrace ÷ plain PyTorch (throughput), VGG38 | 0.92x | 0.9x - 0.93x "
        "| 3 | ≥ 0.95x | **FAIL** |"
    ) in text
    assert (
        "| GradientFlow logging every step: extra VGG38 step time | 1.00% | -2.00% - 1.50% | 3 "
        "| ≤ 2.00% | **pass** |" in text
    )
    assert "| Peak training memory, VGG38, batch 100 | 400 MB | - | 1 | - | - |" in text
    assert "not measured" in text
    assert (
        "(tiny network, width 4, batch 2, 1 torch thread(s), 3 rounds of 20 steps): "
        "**2.30 ms** (2.00 - 3.00) over the plain loop's 9.00 ms." in text
    )
    assert "Skipped: no CUDA device." in text
    assert "| logged step | 1 | `aten.x from lightning/y.py:1 (f)` |" in text
    assert "- a caveat" in text
    with pytest.raises(ValueError, match="op must be one of >=, <=; got '=='"):
        Goal("==", 1.0)
    assert math.isclose(Goal(">=", 0.95).threshold, 0.95)

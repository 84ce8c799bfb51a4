"""The bench's machinery on tiny workloads: interleaving, statistics and verdicts, the
step-by-step fit, the callback timer, the plain loop, collective counting, the GPU section's
training process and epoch time, the reports and the GPU check without a GPU (that the wheel holds
no bench: tests/test_packaging.py).

No speed targets here: those are what ``make bench`` reports. The bench is not installed
with gradtrace: these tests import it from the repository root.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import child  # noqa: E402
from benchmarks.bounded import Deadline, run_bounded  # noqa: E402
from benchmarks.callbacks import TimedCallback, keyed_gradient_flow  # noqa: E402
from benchmarks.collectives import CollectiveCounter, sharded_model  # noqa: E402
from benchmarks.config import BenchConfig  # noqa: E402
from benchmarks.figures import FIGURES, Goal  # noqa: E402
from benchmarks.gpu import epoch_time, table1_rows  # noqa: E402
from benchmarks.markdown import render_markdown  # noqa: E402
from benchmarks.report import TOP_LEVEL_KEYS, build_report  # noqa: E402
from benchmarks.stats import (  # noqa: E402
    Summary,
    interleave,
    median_interval,
    ratios,
    round_orders,
)
from benchmarks.stepper import TrainerSteps  # noqa: E402
from benchmarks.workloads import PlainLoop  # noqa: E402

from gradtrace.classifier import ImageClassifier  # noqa: E402
from gradtrace.data.batches import TrainBatches  # noqa: E402
from gradtrace.data.datamodule import ImageDataModule  # noqa: E402
from gradtrace.gradient_flow import GradientFlow  # noqa: E402

SMALL = {
    "dataset": "synthetic",
    "synthetic_sizes": (300, 20),
    "val_size": 20,
    "batch_size": 8,
    "augment": "crop_flip",  # the bench measures CIFAR's augmented batches
}


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


def test_ratios_and_summary() -> None:
    assert ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="the same number of rounds; got 2 and 1"):
        ratios([1.0, 2.0], [1.0])
    summary = Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.median, summary.low, summary.high) == (3.0, 1.0, 5.0)
    assert summary.rounds == 5
    assert summary.to_dict()["values"] == [5.0, 1.0, 3.0, 2.0, 4.0]
    single = Summary.of([7.0])
    assert (single.median, single.low, single.high, single.rounds) == (7.0, 7.0, 7.0, 1)
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
# the baseline


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


# ---------------------------------------------------------------------------------------------
# the callback timer


class SlowCallback(pl.Callback):
    """Sleeps in a Lightning hook and in a forward hook it registers; counts both."""

    def __init__(self) -> None:
        self.optimizer_calls = self.forward_calls = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def slow_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.forward_calls += 1
            time.sleep(0.01)

        pl_module.net.register_forward_hook(slow_forward)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.optimizer_calls += 1
        time.sleep(0.02)


def test_timed_callback_times_its_hooks_and_the_hooks_it_registers_only_when_active(
    tmp_path: Path,
) -> None:
    callback = SlowCallback()
    timed = TimedCallback(callback)
    kwargs = quiet_trainer_kwargs(tmp_path, callbacks=[callback])
    with TrainerSteps(tiny_model(), small_dm(), **kwargs) as steps:
        steps.run(2)  # inactive: neither hook runs
        assert (callback.optimizer_calls, callback.forward_calls, timed.seconds) == (0, 0, 0.0)
        timed.active = True
        block = steps.run(3)
        timed.active = False
        steps.run(1)
    assert (callback.optimizer_calls, callback.forward_calls) == (3, 3)
    # 3 x (20 ms + 10 ms) slept inside (plus a busy machine's delays), and the time inside
    # is part of the block's time
    assert 0.09 <= timed.seconds < min(0.25, block)


def test_several_gradient_flows_share_one_fit_with_their_own_state_keys(tmp_path: Path) -> None:
    flows = [keyed_gradient_flow(role, plot=False) for role in ("gradients", "idle")]
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path, callbacks=flows))  # no clash
    assert [f.state_key for f in flows] == ["GradientFlow[gradients]", "GradientFlow[idle]"]
    assert all(isinstance(f, GradientFlow) for f in flows)
    assert trainer.callbacks[-2:] == flows


# ---------------------------------------------------------------------------------------------
# collectives


def test_collective_counter_counts_c10d_and_functional_collectives(tmp_path: Path) -> None:
    from torch.distributed import _functional_collectives as funcol

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        x = torch.ones(3)
        with CollectiveCounter() as counter:
            dist.all_reduce(x)
            funcol.all_reduce(x, "sum", dist.group.WORLD).wait()
            x * 2  # not a collective
        assert counter.ops == ["c10d.allreduce_", "_c10d_functional.all_reduce"]
    finally:
        dist.destroy_process_group()


def test_sharded_model_of_the_collectives_bench_is_on_a_cpu_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.fsdp._fully_shard import _fully_shard
    from torch.distributed.tensor import DTensor

    # FSDP2's default mesh is the accelerator's (CUDA on a GPU machine, where the bench's CPU
    # batch would then not reach the parameters): the bench must never fall back on it
    def no_default_mesh() -> None:
        raise AssertionError("fully_shard was called without a mesh")

    monkeypatch.setattr(_fully_shard, "_init_default_mesh", no_default_mesh)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        net = sharded_model()
        params = list(net.parameters())
        assert len(params) == 6  # 2 convolutions and a linear layer, weight and bias each
        assert all(isinstance(p, DTensor) for p in params)
        assert {p.device_mesh.device_type for p in params} == {"cpu"}
        assert {p.device.type for p in params} == {"cpu"}
        images = torch.randn(2, 3, 16, 16)
        torch.nn.functional.cross_entropy(net(images), torch.arange(2)).backward()
        assert all(p.grad is not None for p in params)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# child processes' measurements (run in this process: same code)


def test_child_throughput(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    args = ["--arch", "vgg08", "--warmup", "1", "--steps", "2", "--batch-size", "4"]
    child.main(["throughput", "--accelerator", "cpu", *args, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["steps"] == 2
    assert result["images_per_s"] == pytest.approx(2 * 4 / result["seconds"])


def test_child_epoch_time_writes_the_epoch_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data: list[tuple[int, int]] = []

    def small_cifar100_like(batch_size: int, pool: int) -> ImageDataModule:
        data.append((batch_size, pool))
        return small_dm(batch_size=batch_size)

    monkeypatch.setattr(child, "cifar100_like", small_cifar100_like)
    out = tmp_path / "epoch.json"
    model = {"arch": "coursework_vgg", "batch_norm": True, "arch_kwargs": {"width": 4}}
    args = ["--model", json.dumps(model), "--gradient-flow", '{"include": ["*.weight"]}']
    args += ["--accelerator", "cpu", "--steps", "2", "--batch-size", "8"]
    child.main(["epoch-time", *args, "--root", str(tmp_path / "run"), "--out", str(out)])
    times = json.loads(out.read_text())
    assert data == [(8, 50_000)]  # CIFAR-100's training pool unless told otherwise
    assert times["graphs_compiled"] == 0  # eager
    assert times["epoch_s"] == pytest.approx(times["train_s"] + times["val_s"])
    # the fit's GradientFlow recorded every weight, BatchNorm's too, as the configs ask
    (csv_file,) = (tmp_path / "run").rglob("gradient_flow.csv")
    with csv_file.open(newline="") as f:
        layers = {row["layer"] for row in csv.DictReader(f)}
    assert {"net.stem.1.weight", "net.stages.0.reduction.bn1.weight"} <= layers


def test_table1_rows_come_from_the_packaged_configs() -> None:
    rows = table1_rows()
    assert len(rows) == 7
    assert all(row["epochs"] == 100 for row in rows)
    assert all(row["precision"] == "32-true" for row in rows)
    assert all(row["gradient_flow"] == {"include": ["*.weight"]} for row in rows)
    network = {row["name"]: row["network"] for row in rows}
    # the learning rate changes the optimisation, not the network: timed once
    assert network["vgg38-bn-rc-lr1e-2"] == network["vgg38-bn-rc"]
    assert network["vgg38-bn-lr1e-2"] == network["vgg38-bn"]
    assert all(dict(network[name]).items() <= rows[i]["model"].items() for i, name in
               enumerate(network))  # fmt: skip
    assert len(set(network.values())) == 5


def test_epoch_time_of_the_gpu_section_on_a_tiny_network(tmp_path: Path) -> None:
    dm = small_dm()  # 280 training images: 35 steps of 8 per full epoch; 20 validation images
    settings = {"arch": "coursework_vgg", "arch_kwargs": {"width": 4}}
    times = epoch_time(settings, dm, 3, tmp_path, accelerator="cpu")
    # every phase was timed: the second epoch's hooks fired (and only a CPU run, no CUDA sync)
    assert all(times[key] > 0 for key in ("compile_s", "train_s", "val_s"))
    assert times["epoch_s"] == pytest.approx(times["train_s"] + times["val_s"])
    assert times["graphs_compiled"] == 0


@pytest.mark.gpu
def test_epoch_time_on_a_gpu_compiled_without_falling_back_to_eager(tmp_path: Path) -> None:
    dm = small_dm()
    settings = {"arch": "coursework_vgg", "arch_kwargs": {"width": 4}}
    times = epoch_time(settings, dm, 3, tmp_path, compile=True)  # cuda, 32-true
    assert all(times[key] > 0 for key in ("compile_s", "train_s", "val_s"))
    assert times["graphs_compiled"] >= 1  # compiled, not run eagerly
    assert dm.split("train")[0].is_cuda  # the data sat on the GPU


# ---------------------------------------------------------------------------------------------
# the GPU section's time limits


@pytest.mark.integration
def test_run_bounded_kills_the_child_and_what_it_started_at_the_limit(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(grandchild.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    done = run_bounded([sys.executable, "-c", script], timeout_s=3)
    assert done.timed_out
    assert done.stdout == "started\n"  # what it wrote before the kill
    assert 3 <= done.seconds < 20
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed, then reaped by init
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived its parent's time limit")
    finished = run_bounded([sys.executable, "-c", "import sys; sys.exit(3)"], timeout_s=30)
    assert (finished.timed_out, finished.returncode) == (False, 3)


@pytest.mark.integration
def test_throughput_processes_are_awaited_until_their_ready_line_or_the_deadline() -> None:
    from benchmarks.bounded import kill_group
    from benchmarks.gpu import _wait_for_ready

    def start(script: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )

    ready = start(
        "import time; print('already', flush=True); time.sleep(0.5); "
        "print('ready', flush=True); input()"
    )
    silent = start("import time; time.sleep(60)")
    try:
        _wait_for_ready(ready, time.monotonic() + 30)  # not fooled by "already"
        assert ready.poll() is None  # waiting for its go
        begin = time.monotonic()
        with pytest.raises(TimeoutError):
            _wait_for_ready(silent, time.monotonic() + 1)
        assert time.monotonic() - begin < 5
    finally:
        for proc in (ready, silent):
            kill_group(proc)
            proc.wait()


def test_deadline_gives_each_step_its_limit_or_what_is_left() -> None:
    now = [100.0]
    deadline = Deadline(60, clock=lambda: now[0])
    assert deadline.timeout(limit_s=30, least_s=10) == 30
    now[0] += 45  # 15 s left
    assert deadline.left() == 15
    assert deadline.timeout(limit_s=30, least_s=10) == 15
    assert deadline.timeout(limit_s=30, least_s=20) is None  # not worth starting
    assert Deadline(None).timeout(limit_s=30, least_s=10) == 30


# what each fake measurement of the GPU section costs (s) and reports: epoch seconds by network
FAKE_COST = {"as_configured": 20.0, "fastest_faithful": 70.0}
FAKE_EPOCH_S = {"vgg08": 2.0, "vgg38": 8.0, "vgg38-bn": 9.0, "vgg38-bn-rc": 10.0, "vgg38-rc": 9.5}


def fake_gpu_section(
    monkeypatch: pytest.MonkeyPatch, failing: str = ""
) -> tuple[list[float], list[tuple[str, str, float]]]:
    """Fake measurements on a fake clock: ``(clock, [(setup, network, timeout), ...])``."""
    import benchmarks.gpu as gpu

    now = [0.0]
    calls: list[tuple[str, str, float]] = []

    def measure_epoch(row, setup, cfg, workdir, timeout_s):
        calls.append((setup.key, row["name"], timeout_s))
        now[0] += FAKE_COST[setup.key]
        if row["name"] == failing:
            return None, "failed (exit 1): RuntimeError: boom"
        speed = 2.0 if setup.compile else 1.0
        epoch_s = FAKE_EPOCH_S[row["name"]] / speed
        times = {"compile_s": 1.0, "train_s": epoch_s - 1, "val_s": 1.0, "epoch_s": epoch_s}
        return {**times, "graphs_compiled": 2 * setup.compile}, ""

    def concurrent_throughput(cfg, precision, processes, workdir, timeout_s):
        assert (precision, timeout_s > 0) == ("32-true", True)
        now[0] += 60
        return [100.0] if processes == 1 else [70.0, 70.0]

    monkeypatch.setattr(gpu, "_measure_epoch", measure_epoch)
    monkeypatch.setattr(gpu, "_concurrent_throughput", concurrent_throughput)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "fake GPU")
    return now, calls


def projected_minutes(measured: set[str], speed: float) -> float:
    """Table 1's projection by hand: 100 epochs of each row whose network was measured."""
    network_of = {"vgg38-bn-lr1e-2": "vgg38-bn", "vgg38-bn-rc-lr1e-2": "vgg38-bn-rc"}
    rows = ["vgg08", "vgg38", "vgg38-bn", "vgg38-rc", "vgg38-bn-rc", *network_of]
    seconds = sum(
        100 * FAKE_EPOCH_S[network_of.get(row, row)] / speed
        for row in rows
        if network_of.get(row, row) in measured
    )
    return seconds / 60


def test_gpu_section_within_its_budget_cuts_what_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.gpu import bench_gpu

    now, calls = fake_gpu_section(monkeypatch)
    cfg = BenchConfig.for_device(quick=True, device="cuda")
    gpu = bench_gpu(cfg, tmp_path, lambda message: None, budget_s=300, clock=lambda: now[0])
    # 5 eager networks (20 s each: 200 s left), then compiled ones (70 s each) while at least
    # 75 s are left, each limited to what is left; no time for 1 vs 2 processes (120 s)
    assert calls == [
        ("as_configured", "vgg08", 150),
        ("as_configured", "vgg38", 150),
        ("as_configured", "vgg38-bn", 150),
        ("as_configured", "vgg38-rc", 150),
        ("as_configured", "vgg38-bn-rc", 150),
        ("fastest_faithful", "vgg08", 200),
        ("fastest_faithful", "vgg38", 130),
    ]
    assert now[0] <= 300
    assert gpu["cut"] == [
        "vgg38-bn (fastest faithful): not started, 60 s left",
        "vgg38-rc (fastest faithful): not started, 60 s left",
        "vgg38-bn-rc (fastest faithful): not started, 60 s left",
        "1 vs 2 processes per GPU: not started, 60 s left",
    ]
    eager, compiled = gpu["setups"]["as_configured"], gpu["setups"]["fastest_faithful"]
    assert (eager["rows_projected"], compiled["rows_projected"]) == (7, 2)
    assert eager["table1_minutes"] == pytest.approx(projected_minutes(set(FAKE_EPOCH_S), 1.0))
    assert compiled["table1_minutes"] == pytest.approx(projected_minutes({"vgg08", "vgg38"}, 2))
    assert (gpu["two_processes_measured"], gpu["runs_per_gpu"]) == (False, 1)
    assert gpu["table1_minutes"] == compiled["table1_minutes"]
    assert (gpu["device"], gpu["precision"], gpu["tf32"]) == ("fake GPU", "32-true", "off")
    assert (gpu["steps_per_epoch"], gpu["val_batches"]) == (475, 25)


def test_gpu_section_without_a_budget_measures_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.gpu import bench_gpu

    now, calls = fake_gpu_section(monkeypatch, failing="vgg38-rc")
    cfg = BenchConfig.for_device(quick=True, device="cuda")
    gpu = bench_gpu(cfg, tmp_path, lambda message: None, clock=lambda: now[0])
    assert [timeout for _, _, timeout in calls] == [150] * 5 + [300] * 5
    failed = "failed (exit 1): RuntimeError: boom"
    assert gpu["cut"] == [
        f"vgg38-rc (as configured): {failed}",
        f"vgg38-rc (fastest faithful): {failed}",
    ]
    measured = set(FAKE_EPOCH_S) - {"vgg38-rc"}
    compiled = gpu["setups"]["fastest_faithful"]
    assert compiled["rows_projected"] == 6
    assert compiled["table1_minutes"] == pytest.approx(projected_minutes(measured, 2.0))
    # two processes: 140 images/s against 100
    assert gpu["two_processes_speedup"].median == pytest.approx(1.4)
    assert (gpu["two_processes_measured"], gpu["runs_per_gpu"]) == (True, 2)
    assert gpu["table1_minutes"] == pytest.approx(compiled["table1_minutes"] / 2)


def test_transformer_section_times_its_four_workloads(tmp_path: Path) -> None:
    from benchmarks.transformer import bench_transformer

    result = bench_transformer(2, 1, 1, 2, tmp_path, lambda message: None)
    assert set(result["seconds_per_step"]) == {
        "plain",
        "gradtrace",
        "gradtrace+GradientFlow",
        "gradtrace+GradientFlow(idle)",
    }
    fractions = result["callback_hook_fraction"]
    assert 0 < fractions["default_cadence"].median < fractions["every_step"].median < 1
    assert result["unmeasured_step_us"].rounds == 2
    assert result["unmeasured_step_us"].median > 0


def test_training_pool_holds_every_timed_step_in_one_epoch() -> None:
    assert BenchConfig.for_device(quick=True, device="cpu").training_pool() == 50_000
    gpu = BenchConfig.for_device(quick=False, device="cuda")
    # VGG38: (2 warm-up + 10 rounds) x 25 steps x 7 Lightning blocks (plain Lightning and
    # six callbacks), + 1, + validation
    assert gpu.training_pool() == (12 * 25 * 7 + 1) * 100 + 2_500


@pytest.mark.integration
def test_gpu_check_without_cuda_prints_one_line_and_succeeds_quickly() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 60
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu-check: no CUDA device here; the GPU tests and the bench's GPU section skipped"
    ]


# ---------------------------------------------------------------------------------------------
# statistics of a verdict


def test_median_interval_by_order_statistics() -> None:
    # n = 5: only the whole range reaches 90%: 1 - 2 / 2**5
    assert median_interval([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.0, 5.0, 1 - 2 / 32)
    # n = 10: the 2nd and 9th values hold the median with 1 - 2 (1 + 10) / 2**10 > 95%;
    # the 3rd and 8th only with 1 - 2 (1 + 10 + 45) / 2**10 < 95%
    assert median_interval(range(10, 0, -1)) == (2.0, 9.0, 1 - 22 / 1024)
    assert median_interval([7.0]) == (7.0, 7.0, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])


def test_verdicts_need_an_interval_inside_the_goal_and_narrower_than_its_margin() -> None:
    cost = Goal("<=", 0.02, "%")  # margin: 2 percentage points from no cost
    assert cost.verdict(0.001, 0.004) == "pass"
    assert cost.verdict(0.03, 0.035) == "FAIL"
    assert cost.verdict(0.015, 0.025) == "inconclusive"  # straddles the goal
    assert cost.verdict(-0.33, 0.0) == "inconclusive"  # all below 2%, but 33 points wide
    ratio = Goal(">=", 0.95, "x")  # margin 0.05 from parity
    assert ratio.verdict(0.97, 1.01) == "pass"
    assert ratio.verdict(0.90, 0.94) == "FAIL"
    assert ratio.verdict(0.96, 1.02) == "inconclusive"  # 1.02 / 0.96 > 1 / 0.95
    assert ratio.verdict(0.97, 1.01, coverage=0.75) == "inconclusive"  # 3 rounds' range
    count = Goal("==", 1, "")
    assert (count.verdict(1, 1), count.verdict(2, 2), count.verdict(1, 2)) == (
        "pass",
        "FAIL",
        "inconclusive",
    )
    with pytest.raises(ValueError, match="op must be one of >=, <=, ==; got '<'"):
        Goal("<", 1.0)


# ---------------------------------------------------------------------------------------------
# reports


def fake_sections() -> dict[str, Any]:
    s = Summary.of
    narrow = [0.001, 0.002, 0.0015, 0.0012, 0.0018]
    models = {
        "vgg08": {
            "seconds_per_step": {"plain": s([0.4, 0.5]), "gradtrace": s([0.41, 0.5])},
            "train_step_ratio": s([0.97, 1.0, 0.99, 0.98, 1.01]),
            "steps_per_block": 1,
        },
        "vgg38": {
            "seconds_per_step": {"plain": s([2.0]), "gradtrace": s([2.1])},
            "train_step_ratio": s([0.9, 0.93, 0.92, 0.91, 0.92]),
            "steps_per_block": 1,
            "callback_hook_fraction": {
                "gradtrace": s(narrow),
                "grad_norm": s([0.02]),
                "activations_every_step": s([0.4]),
                "activations_every_50": s([0.01, 0.012, 0.011, 0.05, 0.009]),
            },
            "not_measured": {"wandb_watch": "not available: wandb is not installed"},
        },
    }
    transformer = {
        "model": "a tiny Transformer",
        "steps_per_block": 2,
        "seconds_per_step": {"plain": s([0.08]), "gradtrace": s([0.09])},
        "train_step_ratio": s([0.95, 0.96, 0.94, 0.95, 0.97]),
        "callback_hook_fraction": {
            "every_step": s([0.12, 0.13, 0.11, 0.12, 0.12]),
            "default_cadence": s([0.0030, 0.0035, 0.0033, 0.0031, 0.0036]),
        },
        "unmeasured_step_us": s([70.0, 75.0, 72.0, 71.0, 74.0]),
    }
    return dict(
        device="cpu: test",
        settings=BenchConfig.for_device(quick=True, device="cpu").to_dict(),
        training={"models": models},
        transformer=transformer,
        collectives={
            "collectives_per_logged_step": 1,
            "ops_per_rank": [["c10d.allreduce_"], ["c10d.allreduce_"]],
            "processes": 2,
            "backend": "gloo",
        },
        gpu={"skipped": "no CUDA device"},
        environment={"torch": torch.__version__},
        caveats=["a caveat"],
        elapsed_s=100.0,
    )


def test_report_keys_values_and_verdicts() -> None:
    report = build_report(**fake_sections())
    text = json.dumps(report, allow_nan=False)  # plain JSON, no NaN/inf
    assert json.loads(text) == report
    assert set(TOP_LEVEL_KEYS) <= set(report)
    assert report["device"] == "cpu: test"
    assert report["train_step_ratio"] == {"vgg08": 0.99, "vgg38": 0.92}
    assert report["callback_hook_fraction"]["gradtrace"] == 0.0015
    assert report["callback_hook_fraction"]["activations_every_50"] == 0.011
    assert report["callback_hook_fraction"]["wandb_watch"] is None
    assert report["collectives_per_logged_step"] == 1
    assert isinstance(report["collectives_per_logged_step"], int)
    figures = report["figures"]
    assert [f.key for f in FIGURES] == list(figures)
    verdicts = {key: figure["verdict"] for key, figure in figures.items()}
    assert verdicts["train_step_ratio/vgg08"] == "pass"  # 0.97 - 1.01
    assert verdicts["train_step_ratio/vgg38"] == "FAIL"  # 0.90 - 0.93
    assert verdicts["callback_hook_fraction/gradtrace"] == "pass"  # 0.10% - 0.20%
    assert verdicts["callback_hook_fraction/grad_norm"] is None  # a figure only: no goal
    # median 1.1%, under 3%, but the 5 rounds' range (0.9% - 5%) is wider than the margin
    assert verdicts["callback_hook_fraction/activations_every_50"] == "inconclusive"
    assert verdicts["collectives_per_logged_step"] == "pass"
    assert verdicts["transformer/default_cadence"] == "pass"  # 0.30% - 0.36%, under 1%
    assert verdicts["transformer/every_step"] is None
    assert figures["transformer/unmeasured_step_us"]["summary"]["median"] == 72.0
    assert figures["callback_hook_fraction/wandb_watch"]["not_measured"] == (
        "not available: wandb is not installed"
    )
    assert figures["callback_hook_fraction/wandb_watch"]["summary"] is None  # not measured
    assert figures["train_step_ratio/vgg38"]["summary"]["values"] == [0.9, 0.93, 0.92, 0.91, 0.92]


def test_markdown_shows_every_figure_with_goal_interval_and_verdict() -> None:
    text = render_markdown(build_report(**fake_sections()))
    assert "- Device: **cpu: test**" in text
    assert (
        "| Training step, gradtrace ÷ plain PyTorch (throughput), VGG38 | 0.92x | 0.9x - 0.93x "
        "(94%) | 5 | ≥ 0.95x | **FAIL** |"
    ) in text
    assert (
        "| GradientFlow measuring every step: time in its hooks ÷ VGG38 step time | 0.15% "
        "| 0.10% - 0.20% (94%) | 5 | ≤ 2.00% | **pass** |"
    ) in text
    assert "| 1 | - | 1 | = 1 | **pass** |" in text
    assert "| 72 µs | 70 µs - 75 µs (94%) | 5 | - | - |" in text
    assert "| text Transformer | plain | 0.0800 | 0.0800 - 0.0800 |" in text
    assert "Text Transformer: a tiny Transformer." in text
    assert "| n/a | n/a | 0 | - | not available: wandb is not installed |" in text
    assert "Collectives of one `grad_stats` call on rank 0: `c10d.allreduce_`." in text
    assert "Skipped: no CUDA device." in text
    assert "- a caveat" in text
    assert math.isclose(Goal(">=", 0.95).threshold, 0.95)


def test_markdown_of_a_gpu_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.gpu import bench_gpu

    now, _ = fake_gpu_section(monkeypatch)
    cfg = BenchConfig.for_device(quick=True, device="cuda")
    sections = fake_sections()
    sections["gpu"] = bench_gpu(cfg, tmp_path, lambda m: None, budget_s=300, clock=lambda: now[0])
    sections["gpu"]["gpu_tests"] = "6 passed, 2 skipped in 90s"
    text = render_markdown(build_report(**sections))
    assert "Device: fake GPU. Epoch = 475 training steps + 25 validation batches" in text
    assert "precision `32-true`, TF32 off" in text
    assert "- **as configured**: what `gradtrace fit --config table1/<row>` runs" in text
    assert "- **fastest faithful**: the same plus `torch.compile`" in text
    assert "| vgg08 | as configured | 1.0 | 1.00 | 1.00 | 2.00 | 0 |" in text
    assert "| vgg38 | fastest faithful | 1.0 | 3.00 | 1.00 | 4.00 | 2 |" in text
    assert "Projected Table 1 (7 rows, 700 epochs in all):" in text
    assert (
        "- as configured, one run at a time: **95.8 min** (7 of 7 rows measured) (goal: under "
        "30 min on one H100: **inconclusive**, one timed epoch per network gives no interval "
        "of the median)."
    ) in text
    assert (
        "- fastest faithful, one run at a time: **8.3 min** (2 of 7 rows measured) (goal: "
        "under 30 min on one H100: **inconclusive**, only 2 of 7 rows measured)."
    ) in text
    assert "- 1 vs 2 processes per GPU: not started, 60 s left" in text
    assert "GPU-marked tests: 6 passed, 2 skipped in 90s." in text

    now[0] = 0.0
    sections["gpu"] = bench_gpu(cfg, tmp_path, lambda m: None, clock=lambda: now[0])
    text = render_markdown(build_report(**sections))
    assert (
        "- fastest faithful, one run at a time: **47.9 min** (7 of 7 rows measured); two "
        "training processes on one GPU get 1.40x the throughput of one, so with 2 run(s) per "
        "GPU: **24.0 min** (goal:"
    ) in text
    assert "Cut to keep" not in text

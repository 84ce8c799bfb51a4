"""GradientFlow under several processes: DDP, Lightning's FSDP (CPU and GPU), the model-parallel
strategy's sub-mesh against one process; and DeepSpeed, where it measures nothing and says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.measure import read_history
from gradtrace.sweeps.launch import free_port
from helpers.distributed import needs_gpus
from helpers.fits import fit
from helpers.tiny import Classifier, TinyNet

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    import importlib.util
    import json
    import subprocess
    import sys

    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    script = SCRIPTS / "ddp_gradient_flow.py"
    done = subprocess.run(
        [sys.executable, str(script), str(ddp_out), "--devices", "2", "--poison-step", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("ddp_gradient_flow", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single = module.run(single_out, devices=1, poison_step=2)

    rank0, rank1 = (json.loads((ddp_out / f"rank{r}.json").read_text()) for r in (0, 1))
    # both ranks stopped at the poisoned step with the same message as one process
    message = (
        "non-finite gradient at step 2: first in layer 'net.hidden.weight' (1 of 64 entries "
        "are inf or nan)"
    )
    assert rank0["error"] == rank1["error"] == single["error"] == message
    # rank 0 reports, rank 1 does not; the values are those of one process on the same batch
    assert rank1["history"] == []
    assert rank0["collectives"] == rank1["collectives"] == [0, 0, 0]  # replicated: none
    assert len(rank0["history"]) == len(single["history"]) == 3 * 3
    for got, want in zip(rank0["history"], single["history"]):
        assert (got["step"], got["layer"], got["nonfinite"]) == (
            want["step"],
            want["layer"],
            want["nonfinite"],
        )
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-5), (got["layer"], stat)
    assert read_history(ddp_out / "gradient_flow" / "gradient_flow.csv") == rank0["history"]


def _two_processes_and_one(
    tmp_path: Path, strategy: str, accelerator: str, precision: str = "32-true"
) -> tuple[dict, dict, dict]:
    """What ranks 0 and 1 of a 2-process ``strategy`` fit of ddp_gradient_flow.py saw, and
    what one process (same accelerator and precision) saw."""
    import importlib.util
    import json
    import subprocess
    import sys

    two_out, single_out = tmp_path / "two", tmp_path / "single"
    two_out.mkdir()
    single_out.mkdir()
    script = SCRIPTS / "ddp_gradient_flow.py"
    args = [str(two_out), "--devices", "2", "--poison-step", "-1", "--strategy", strategy]
    args += ["--accelerator", accelerator, "--precision", precision]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("ddp_gradient_flow", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single = module.run(single_out, 1, -1, accelerator=accelerator, precision=precision)
    rank0, rank1 = (json.loads((two_out / f"rank{r}.json").read_text()) for r in (0, 1))
    return rank0, rank1, single


@pytest.mark.parametrize(
    "accelerator",
    [
        pytest.param("cpu", marks=pytest.mark.slow),
        pytest.param(
            "gpu",
            marks=[pytest.mark.gpu, needs_gpus(2)],
        ),
    ],
)
@pytest.mark.parametrize(("strategy", "collectives"), [("fsdp", 1), ("fsdp_no_shard", 0)])
@pytest.mark.integration
def test_lightning_fsdp_two_processes_match_one_process_with_one_collective(
    tmp_path: Path, accelerator: str, strategy: str, collectives: int
) -> None:
    """Lightning's FSDP strategy (FSDP1, use_orig_params=True): each rank holds slices of the
    gradients; one all_gather per measured step gives the one-process values. With NO_SHARD
    each rank holds them whole: no collective. On CPU the strategy runs through a subclass
    (Lightning allows "fsdp" only with a GPU)."""
    rank0, rank1, single = _two_processes_and_one(tmp_path, strategy, accelerator)
    assert rank0["collectives"] == rank1["collectives"] == [collectives] * 3  # 3 measured steps
    assert single["collectives"] == [0, 0, 0]
    assert rank1["history"] == []
    assert [(r["step"], r["layer"]) for r in rank0["history"]] == [
        (s, layer)
        for s in range(3)
        for layer in ("net.inp.weight", "net.hidden.weight", "net.head.weight")
    ]
    for got, want in zip(rank0["history"], single["history"], strict=True):
        assert got["nonfinite"] == want["nonfinite"] == 0
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-5), (got["layer"], stat)


@pytest.mark.slow
@pytest.mark.integration
def test_model_parallel_strategy_sub_mesh_matches_one_process(tmp_path: Path) -> None:
    """Lightning's ModelParallelStrategy, fully_shard on the data-parallel sub-mesh (1 rank)
    next to 2 tensor-parallel ranks: each rank's shard group is its own sub-mesh, so the
    values are one process's (the whole world's sum gave l2 x sqrt 2)."""
    import json
    import subprocess
    import sys

    script = SCRIPTS / "model_parallel_gradient_flow.py"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    for mode in ("single", "model_parallel"):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), mode],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    single, parallel = (
        json.loads((tmp_path / f"{m}.json").read_text()) for m in ("single", "model_parallel")
    )
    assert len(single) == 3 * 3  # 3 steps x 3 weights
    for got, want in zip(parallel, single, strict=True):
        assert (got["step"], got["layer"]) == (want["step"], want["layer"])
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-6), (got["layer"], stat)


@pytest.mark.gpu
@needs_gpus(2)
@pytest.mark.parametrize(
    ("strategy", "precision"), [("fsdp_cpu_offload", "32-true"), ("fsdp", "16-mixed")]
)
@pytest.mark.integration
def test_lightning_fsdp_on_two_gpus_matches_one_gpu(
    tmp_path: Path, strategy: str, precision: str
) -> None:
    """FSDP1 with CPU offload (gradients on the CPU, combined over NCCL on the GPU) and FSDP
    with 16-mixed (loss-scaled gradients, ShardedGradScaler) on 2 GPUs vs one GPU."""
    rank0, _, single = _two_processes_and_one(tmp_path, strategy, "gpu", precision)
    assert rank0["collectives"] == [1, 1, 1]
    assert len(rank0["history"]) == len(single["history"]) == 3 * 3
    rel = 1e-3 if precision == "16-mixed" else 1e-4
    for got, want in zip(rank0["history"], single["history"], strict=True):
        assert (got["step"], got["layer"]) == (want["step"], want["layer"])
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=rel), (got["layer"], stat)


def test_deepspeed_warns_once_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DeepSpeed the callback measures nothing and says so once at train start (the
    strategy itself needs deepspeed and CUDA, so its ZeRO stage is patched in here)."""
    from gradtrace.gradient_flow import fit_state

    monkeypatch.setattr(fit_state, "deepspeed_zero_stage", lambda strategy: 2)
    cb = GradientFlow(every_n_steps=1, plot=False)
    with pytest.warns(GradientFlowWarning, match="DeepSpeed \\(ZeRO stage 2\\)") as caught:
        fit(tmp_path, Classifier(TinyNet()), cb)
    assert len([w for w in caught if issubclass(w.category, GradientFlowWarning)]) == 1
    assert cb.history == []

"""grad_stats (exact per-layer statistics, one collective when sharded) and select_layers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradtrace.measure import grad_stats, grad_stats_table, select_layers
from helpers.distributed import SCRIPTS, needs_gpus, run_rank_script


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 1, 5, 5)).square().sum().backward()
    return model


def test_values_match_an_independent_computation() -> None:
    model = _tiny()
    stats = grad_stats(model)
    for name, param in model.named_parameters():
        g = param.grad.double()
        assert stats[f"mean_abs/{name}"].item() == pytest.approx(g.abs().mean().item(), rel=1e-6)
        assert stats[f"l2/{name}"].item() == pytest.approx(g.norm().item(), rel=1e-6)
        assert stats[f"max_abs/{name}"].item() == pytest.approx(g.abs().max().item(), rel=1e-6)
        assert stats[f"nonfinite/{name}"].item() == 0


def test_scale_divides_and_nonfinite_counts_entries() -> None:
    model = _tiny()
    plain = grad_stats(model, ("mean_abs", "l2", "max_abs"))
    weight = model[0].weight
    for p in model.parameters():
        p.grad *= 1024.0
    scaled = grad_stats(model, ("mean_abs", "l2", "max_abs"), scale=torch.tensor(1024.0))
    for key, value in plain.items():
        assert scaled[key].item() == pytest.approx(value.item(), rel=1e-6)
    weight.grad[0, 0, 0, :2] = torch.tensor([float("inf"), float("nan")])
    assert grad_stats([("w", weight)], ("nonfinite",)) == {"nonfinite/w": torch.tensor(2.0)}


def test_layers_without_gradient_and_sparse_gradients() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    unused = nn.Linear(2, 2)
    embedding(torch.tensor([1, 1, 4])).sum().backward()
    names, table = grad_stats_table(
        [("emb", embedding.weight), ("unused", unused.weight)], ("mean_abs", "l2")
    )
    dense = embedding.weight.grad.to_dense()
    assert names == ["emb", "unused"]
    assert table[0, 0].item() == pytest.approx(dense.abs().mean().item())  # mean over 10 x 3
    assert table[0, 1].item() == pytest.approx(dense.norm().item())
    assert torch.isnan(table[1, 0])
    assert table[1, 1] == 0


def _assert_equal_to_one_process(
    values: dict[str, float],
    histograms: dict,
    reference: tuple[dict, dict],
    where: tuple,
    rel: float = 1e-5,
) -> None:
    """Statistics to float rounding; histograms of the whole gradients: same entry counts and
    ranges, and bin counts off by at most the entries on a bin edge that rounding moves."""
    stats, reference_histograms = reference
    assert sorted(values) == sorted(stats), where
    for key, want in stats.items():
        assert values[key] == pytest.approx(want, rel=rel, abs=0), (*where, key)
    assert sorted(histograms) == sorted(reference_histograms), where
    for name, (num, low, high, counts) in reference_histograms.items():
        got_num, got_low, got_high, got_counts = histograms[name]
        assert got_num == sum(got_counts) == num, (*where, name)
        assert (got_low, got_high) == pytest.approx((low, high), rel=rel), (*where, name)
        assert sum(abs(a - b) for a, b in zip(got_counts, counts)) <= 2, (*where, name)


@pytest.mark.parametrize(
    ("world", "device"),
    [
        pytest.param(2, "cpu", marks=pytest.mark.slow),
        pytest.param(4, "cpu", marks=pytest.mark.slow),
        pytest.param(2, "cuda", marks=[pytest.mark.gpu, needs_gpus(2)]),
        pytest.param(4, "cuda", marks=[pytest.mark.gpu, needs_gpus(4)]),
    ],
)
@pytest.mark.integration
def test_processes_equal_one_process(tmp_path: Path, world: int, device: str) -> None:
    """DDP, FSDP1 (use_orig_params; FULL_SHARD, NO_SHARD, HYBRID_SHARD, _HYBRID_SHARD_ZERO2;
    CPU offload on GPUs), FSDP2 fully_shard (world; hybrid 2 replicas x world/2 shards; the dp
    sub-mesh of dp x tp) and DTensor Shard(0) weights on 2 and 4 processes (gloo on the CPU,
    NCCL on GPUs) vs 1 CPU process, statistics and histograms. FSDP1 hybrid sharding is one
    replica of 2 shards with 2 processes, 2 replicas of 2 shards with 4; the dp sub-mesh has
    1 rank (2 processes) or 2 (4 processes), next to tp = 2."""
    run_rank_script(
        "grad_stats_distributed.py",
        lambda port: [
            str(tmp_path),
            "--world",
            str(world),
            "--port",
            str(port),
            "--device",
            device,
        ],
    )
    sys.path.insert(0, str(SCRIPTS))
    try:
        import grad_stats_distributed as dist_script
    finally:
        sys.path.remove(str(SCRIPTS))
    reference = dist_script.single()
    assert len(reference[0]) == 6 * 4  # 3 weights + 3 biases, 4 stats
    assert len(reference[1]) == 3
    # collectives issued by one grad_stats call: none when nothing is sharded, exactly one else
    expected_calls = {
        "ddp": 0,
        "fsdp1": 1,
        "fsdp1_no_shard": 0,
        "fsdp1_hybrid": 1,
        "fsdp1_hybrid_zero2": 1,
        "fsdp2": 1,
        "fsdp2_hybrid": 1,
        "fsdp2_dp_submesh": 1,
        "dtensor": 1,
    }
    if device == "cuda":
        expected_calls["fsdp1_cpu_offload"] = 1
    rel = 1e-5 if device == "cpu" else 1e-4  # GPU reductions add in another order
    # The optimizer side of a clipped Adam step, from optimizer.state and the weights' change
    by_hand = dist_script.single_optimizer_side()
    assert by_hand["grad_norm_clipped"] == pytest.approx(dist_script.CLIP_NORM, rel=1e-4)
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(results) == sorted(expected_calls)
        for setup, (values, calls, histograms, optimizer) in results.items():
            where = (setup, rank)
            assert calls == expected_calls[setup], where
            _assert_equal_to_one_process(values, histograms, reference, where, rel)
            assert optimizer["calls"] == expected_calls[setup], where
            assert sorted(optimizer["params"]) == sorted(by_hand["params"]), where
            for name, want in by_hand["params"].items():
                got = optimizer["params"][name]
                assert got == pytest.approx(want, rel=rel), (*where, name)
            got_norm = optimizer["grad_norm_clipped"]
            assert got_norm == pytest.approx(by_hand["grad_norm_clipped"], rel=rel), where


@pytest.mark.slow
@pytest.mark.integration
def test_deepspeed_zero_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    """DeepSpeed ZeRO stages 1, 2 and 3, and 2 with the optimizer offloaded (engine on the CPU
    accelerator, fp32) right after ``engine.backward``: partial sums of each rank's partition
    and one all_gather."""
    pytest.importorskip("deepspeed")
    run_rank_script("grad_stats_deepspeed.py", lambda port: [str(tmp_path), "--port", str(port)])
    sys.path.insert(0, str(SCRIPTS))
    try:
        import grad_stats_distributed as dist_script
    finally:
        sys.path.remove(str(SCRIPTS))
    reference = dist_script.single()
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(results) == ["zero1", "zero2", "zero2_offload", "zero3"]
        for setup, (values, calls, histograms) in results.items():
            assert calls == 1, (setup, rank)
            _assert_equal_to_one_process(values, histograms, reference, (setup, rank))


def test_default_selection_is_weights_of_weight_bearing_modules() -> None:
    model = _tiny()
    assert [layer.name for layer in select_layers(model)] == ["0.weight", "3.weight"]
    first = select_layers(model)[0]
    assert first.module is model[0]
    assert first.module_name == "0"
    chosen = select_layers(model, include=["BatchNorm2d", "*.bias"], exclude=[nn.Linear])
    assert [layer.name for layer in chosen] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(ValueError, match="include entries must be name globs"):
        select_layers(model, include=[3])


def test_vit_starts_at_the_patch_embedding() -> None:
    pytest.importorskip("timm")
    from gradtrace.models import create_model

    wrapper = nn.Module()
    wrapper.net = create_model("vit_tiny_cifar")
    names = [layer.name for layer in select_layers(wrapper)]
    assert names[0] == "net.patch_embed.proj.weight"
    assert names[-1] == "net.head.weight"
    assert not [n for n in names if "token" in n or "pos_embed" in n or "norm" in n]
    included = [layer.name for layer in select_layers(wrapper, include=["net.cls_token"])]
    assert included[0] == "net.cls_token"

"""The cost table against the lecture's AlexNet and GoogLeNet numbers and plain arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradtrace.models import CostTable, create_model, summarize

# The AlexNet table of the lecture notes "Lecture 8: CNN Architectures I":
# layer -> (C, H/W, KB, params, MACs).
# MACs are the exact (C_out H W) (C_in K K) products; the lecture rounds them (72.9 M, 224 M,
# 112 M, 100 M, 37.7 M, 16.8 M, 4.1 M) and prints conv4 as 145 M, though its own formula
# gives (256 * 13 * 13) * (384 * 3 * 3) = 149.5 M.
ALEXNET = {
    "features.conv1": (64, 56, 784, 23_296, 64 * 56 * 56 * 3 * 11 * 11),
    "features.pool1": (64, 27, 182.25, 0, 64 * 27 * 27 * 9),
    "features.conv2": (192, 27, 546.75, 307_392, 192 * 27 * 27 * 64 * 25),
    "features.pool2": (192, 13, 126.75, 0, 192 * 13 * 13 * 9),
    "features.conv3": (384, 13, 253.5, 663_936, 384 * 13 * 13 * 192 * 9),
    "features.conv4": (256, 13, 169, 884_992, 256 * 13 * 13 * 384 * 9),
    "features.conv5": (256, 13, 169, 590_080, 256 * 13 * 13 * 256 * 9),
    "features.pool5": (256, 6, 36, 0, 256 * 6 * 6 * 9),
}
ALEXNET_FC = {
    "classifier.fc6": (4096, 16, 37_752_832, 9216 * 4096),
    "classifier.fc7": (4096, 16, 16_781_312, 4096 * 4096),
    "classifier.fc8": (1000, 1000 * 4 / 1024, 4_097_000, 4096 * 1000),
}


@pytest.fixture(scope="module")
def alexnet_table() -> CostTable:
    return summarize(create_model("alexnet"), (3, 227, 227))


def test_alexnet_rows_match_the_lecture(alexnet_table: CostTable) -> None:
    rows = {r.name: r for r in alexnet_table.rows}
    for name, (c, hw, kb, params, macs) in ALEXNET.items():
        row = rows[name]
        assert row.output_shape == (c, hw, hw), name
        assert (row.memory_kb, row.params, row.macs) == (kb, params, macs), name
    for name, (c, kb, params, macs) in ALEXNET_FC.items():
        row = rows[name]
        assert row.output_shape == (c,)
        assert (row.memory_kb, row.params, row.macs) == (kb, params, macs), name
    # The lecture's rounded figures.
    assert rows["features.conv1"].macs / 1e6 == pytest.approx(72.9, abs=0.05)
    assert rows["features.pool1"].macs / 1e6 == pytest.approx(0.4, abs=0.05)
    assert rows["features.conv2"].macs / 1e6 == pytest.approx(224, abs=0.5)
    assert rows["classifier.fc6"].macs / 1e6 == pytest.approx(37.7, abs=0.05)


def test_alexnet_rows_and_totals(alexnet_table: CostTable) -> None:
    names = [r.name for r in alexnet_table.rows]
    # The adaptive pool (6x6 -> 6x6 here) is the lecture's "flatten" row: 36 KB, no weights.
    assert names == [*ALEXNET, "avgpool", *ALEXNET_FC]
    avgpool = alexnet_table.rows[names.index("avgpool")]
    assert (avgpool.memory_kb, avgpool.params, avgpool.macs) == (36, 0, 256 * 36)
    assert alexnet_table.total_params == 61_100_840
    assert alexnet_table.params_not_run == 0
    expected_macs = sum(v[-1] for v in ALEXNET.values()) + sum(v[-1] for v in ALEXNET_FC.values())
    assert alexnet_table.total_macs == expected_macs + 256 * 36
    expected_kb = sum(v[2] for v in ALEXNET.values()) + sum(v[1] for v in ALEXNET_FC.values())
    assert alexnet_table.total_memory_kb == pytest.approx(expected_kb + 36)


def test_googlenet_stem_matches_the_lecture() -> None:
    model = create_model("googlenet")
    table = summarize(model, (3, 224, 224))
    stem = [r for r in table.rows if r.name.startswith("stem.")]
    assert [(r.name, r.output_shape) for r in stem] == [
        ("stem.conv1.conv", (64, 112, 112)),
        ("stem.pool1", (64, 56, 56)),
        ("stem.conv2.conv", (64, 56, 56)),
        ("stem.conv3.conv", (192, 56, 56)),
        ("stem.pool2", (192, 28, 28)),
    ]
    assert [r.memory_kb for r in stem] == [3136, 784, 784, 2352, 588]
    assert [r.params for r in stem] == [9_472, 0, 4_160, 110_784, 0]
    assert sum(r.params for r in stem) == 124_416  # "124K"
    assert sum(r.memory_kb for r in stem) / 1024 == pytest.approx(7.5, abs=0.05)  # "7.5 MB"
    macs = [64 * 112**2 * 3 * 49, 64 * 56**2 * 9, 64 * 56**2 * 64, 192 * 56**2 * 64 * 9]
    macs.append(192 * 28**2 * 9)
    assert [r.macs for r in stem] == macs
    assert sum(macs) / 1e6 == pytest.approx(481, abs=0.5)
    # Eval mode: the auxiliary heads do not run, so their weights are not in any row.
    aux = [*model.aux1.parameters(), *model.aux2.parameters()]
    assert table.params_not_run == sum(p.numel() for p in aux)
    assert "parameters in modules that did not run" in str(table)


def test_rows_add_up_to_flop_counter_total() -> None:
    """Rows' MACs = FlopCounterMode's count / 2 + our pooling count."""
    model = create_model("resnet20").eval()
    table = summarize(model, (3, 32, 32), batch_size=2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, 32, 32))
    pooling = sum(r.macs for r in table.rows if "Pool" in r.kind)
    assert pooling == 2 * 64 * 8 * 8  # global average pool over 8x8, batch of 2
    assert table.total_macs == counter.get_total_flops() // 2 + pooling
    assert table.total_params == sum(p.numel() for p in model.parameters())
    # BN rows are there (params, output memory) with no MACs; ReLUs are not rows.
    kinds = {r.kind for r in table.rows}
    assert kinds == {"Conv2d", "BatchNorm2d", "AdaptiveAvgPool2d", "Linear"}
    assert all(r.macs == 0 for r in table.rows if r.kind == "BatchNorm2d")


def test_batch_size_scales_memory_and_macs_not_params() -> None:
    model = create_model("vgg_cifar10")
    one, four = summarize(model, (3, 32, 32)), summarize(model, (3, 32, 32), batch_size=4)
    assert four.total_macs == 4 * one.total_macs
    assert four.total_memory_kb == 4 * one.total_memory_kb
    assert four.total_params == one.total_params
    assert model.training  # summarize restores the mode


def test_adaptive_pool_bins_follow_pytorch() -> None:
    # 5 -> 3 bins: [0, 2), [1, 4), [3, 5): lengths 2, 3, 2 per dimension.
    table = summarize(nn.Sequential(nn.AdaptiveAvgPool2d(3)), (2, 5, 5))
    assert table.rows[0].macs == 2 * (2 + 3 + 2) ** 2
    table = summarize(nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1)), (1, 8, 8))
    assert table.rows[0].macs == 4 * 4 * 9


def test_attention_is_counted_on_cpu() -> None:
    """timm's fused attention gets a row of its own, the same count as the unfused path."""
    model = create_model("vit_tiny_cifar")
    table = summarize(model, (3, 32, 32))
    attention = [r for r in table.rows if r.kind == "Attention (own)"]
    assert len(attention) == 12
    tokens, width = 65, 192  # 3 heads of 64: q @ k^T and scores @ v
    assert attention[0].macs == 2 * tokens * tokens * width
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert summarize(model, (3, 32, 32)).total_macs == table.total_macs
    own = next(r for r in table.rows if r.kind == "VisionTransformer (own)")
    assert own.params == model.cls_token.numel() + model.pos_embed.numel()
    assert table.total_params == sum(p.numel() for p in model.parameters())


def test_meta_device_gives_the_same_table() -> None:
    real = summarize(create_model("resnet20"), (3, 32, 32))
    with torch.device("meta"):
        meta = summarize(create_model("resnet20"), (3, 32, 32))
    assert meta.rows == real.rows


def test_printing(alexnet_table: CostTable) -> None:
    text = str(alexnet_table)
    lines = text.splitlines()
    assert lines[0].split() == [
        "layer",
        "kind",
        "output",
        "memory",
        "(KB)",
        "params",
        "MACs",
        "(M)",
    ]
    # Aligned: every line of the table but the footer has the same width.
    assert len({len(line) for line in lines[:-1]}) == 1
    assert lines[2].split() == ["features.conv1", "Conv2d", "64x56x56", "784.0", "23,296", "72.86"]
    assert lines[-2].split() == ["total", "2,339.2", "61,100,840", "717.57"]
    assert lines[-1] == "input 3x227x227, batch 1; memory = fp32 outputs of the rows"
    markdown = alexnet_table.to_markdown().splitlines()
    assert markdown[0] == "| layer | kind | output | memory (KB) | params | MACs (M) |"
    assert markdown[2] == "| features.conv1 | Conv2d | 64x56x56 | 784.0 | 23,296 | 72.86 |"
    assert markdown[len(alexnet_table.rows) + 2] == (
        "| **total** |  |  | **2,339.2** | **61,100,840** | **717.57** |"
    )


def test_bad_arguments() -> None:
    model = create_model("resnet20")
    with pytest.raises(ValueError, match=r"input_size must be positive ints .*; got \(3, 0, 32\)"):
        summarize(model, (3, 0, 32))
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        summarize(model, (3, 32, 32), batch_size=0)

"""The coordinate check (``gradtrace.coord_check``, ``gradtrace coord-check``): the known
results on an MLP (standard parametrisation: the output layer grows with width under Adam;
muP: every layer flat), recorded values against a hand-written training loop, the verdicts on
made-up records, the figure, the command on zoo models and its errors (one line, exit 2,
nothing written), and the zoo's width knobs."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("matplotlib")

from gradtrace.cli.coord_check import coord_check_table
from gradtrace.cli.main import main
from gradtrace.measure import CoordCheckResult, coord_check, random_batch
from gradtrace.measure.coord_check import FLAT_SLOPE, width_slope
from gradtrace.models import create_model
from gradtrace.plots import plot_coord_check

WIDTHS = (64, 128, 256, 512)
INPUTS, CLASSES, BASE_WIDTH = 32, 10, 64


def mlp(width: int, mup: bool = False) -> nn.Sequential:
    """Two hidden ReLU layers; ``mup``: readout weights and every bias start at zero (muP's
    readout, and biases whose scale does not depend on the fan-in)."""
    net = nn.Sequential(
        nn.Linear(INPUTS, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, CLASSES),
    )
    if mup:
        nn.init.zeros_(net[4].weight)
        for layer in (net[0], net[2], net[4]):
            nn.init.zeros_(layer.bias)
    return net


def mup_adam(model: nn.Sequential, lr: float = 1e-2) -> torch.optim.Adam:
    """Adam with muP's learning rates: the hidden and readout weights' scaled by
    base width / fan-in, the input weights' and the biases' as given."""
    groups = []
    for i in (0, 2, 4):
        layer = model[i]
        scale = 1.0 if i == 0 else BASE_WIDTH / layer.in_features
        groups += [{"params": [layer.weight], "lr": lr * scale}, {"params": [layer.bias]}]
    return torch.optim.Adam(groups, lr=lr)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + seed)
    inputs = torch.randn(16, INPUTS, generator=generator)
    return inputs, torch.randint(0, CLASSES, (16,), generator=generator)


def test_standard_parametrisation_grows_and_mup_stays_flat() -> None:
    seeds = (0, 1, 2)
    standard = coord_check(
        mlp,
        WIDTHS,
        batch,
        seeds=seeds,
        optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=1e-2),
    )
    mup = coord_check(
        lambda width: mlp(width, mup=True), WIDTHS, batch, seeds=seeds, optimizer=mup_adam
    )
    first, hidden, readout = standard.layers
    assert standard.layers == mup.layers == ["0.weight", "2.weight", "4.weight"]
    # Under Adam each entry moves by about lr, so a layer's output moves by about lr * fan-in.
    assert standard.slopes("act_rms")[readout] > 0.5
    assert standard.slopes("change_rms")[readout] > 0.5
    assert standard.slopes("change_rms")[hidden] > 0.5
    assert abs(standard.slopes("act_rms")[first]) < FLAT_SLOPE  # its fan-in is fixed
    assert standard.verdicts() == {first: "flat", hidden: "grows", readout: "grows"}
    for stat in ("act_rms", "change_rms"):
        assert all(abs(slope) < FLAT_SLOPE for slope in mup.slopes(stat).values()), stat
    assert set(mup.verdicts().values()) == {"flat"}
    # The weight update per entry shows the learning rates: Adam's flat, muP's ~ 1 / width.
    assert all(abs(slope) < 0.3 for slope in standard.slopes("update_rms").values())
    updates = mup.slopes("update_rms")
    assert abs(updates[first]) < 0.1
    assert updates[hidden] == pytest.approx(-1, abs=0.1)
    assert updates[readout] == pytest.approx(-1, abs=0.1)


def test_records_match_a_hand_written_training_loop() -> None:
    widths, steps, seed = (8, 16), 2, 3
    result = coord_check(mlp, widths, batch, steps=steps, seeds=(seed,))
    assert result.widths == widths
    assert result.steps == steps
    assert result.seeds == (seed,)
    assert len(result.records) == len(widths) * (steps + 1) * 3
    for width in widths:
        torch.manual_seed(seed)
        net = mlp(width)
        inputs, targets = batch(seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        linears = [net[0], net[2], net[4]]
        outputs, weights, losses = [], [], []
        for _ in range(steps + 1):
            h1 = F.linear(inputs, linears[0].weight, linears[0].bias)
            h2 = F.linear(h1.relu(), linears[1].weight, linears[1].bias)
            logits = F.linear(h2.relu(), linears[2].weight, linears[2].bias)
            loss = F.cross_entropy(logits, targets)
            outputs.append([h.detach().clone() for h in (h1, h2, logits)])
            weights.append([m.weight.detach().clone() for m in linears])
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for record in (r for r in result.records if r["width"] == width):
            step, i = record["step"], result.layers.index(record["layer"])
            out, start = outputs[step][i], outputs[0][i]
            assert record["seed"] == seed
            assert record["depth"] == i / 2
            assert record["act_rms"] == pytest.approx(out.square().mean().sqrt().item(), 1e-5)
            assert record["change_rms"] == pytest.approx(
                (out - start).square().mean().sqrt().item(), rel=1e-4, abs=1e-9
            )
            assert record["loss"] == pytest.approx(losses[step], 1e-5)
            if step == 0:
                assert math.isnan(record["update_rms"])
            else:
                update = weights[step][i] - weights[step - 1][i]
                expected = update.norm().item() / math.sqrt(update.numel())
                assert record["update_rms"] == pytest.approx(expected, 1e-5)


def test_dropout_masks_repeat_and_the_random_state_is_kept() -> None:
    def net(width: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(INPUTS, width), nn.Dropout(0.5), nn.Linear(width, 10))

    state = torch.get_rng_state()
    result = coord_check(
        net, (4, 8), batch, steps=2, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0)
    )
    assert torch.equal(torch.get_rng_state(), state)
    # No learning and the same masks in every pass: the outputs do not change at all.
    assert [r["change_rms"] for r in result.records] == [0.0] * len(result.records)


def test_bad_arguments_are_one_line_value_errors() -> None:
    with pytest.raises(ValueError, match=r"two distinct widths or more; got \[8, 8\]"):
        coord_check(mlp, (8, 8), batch)
    with pytest.raises(ValueError, match="each width must be an integer >= 1; got 0"):
        coord_check(mlp, (0, 8), batch)
    with pytest.raises(ValueError, match="steps must be an integer >= 1; got 0"):
        coord_check(mlp, (4, 8), batch, steps=0)
    with pytest.raises(ValueError, match=r"one seed or more, each once; got \[1, 1\]"):
        coord_check(mlp, (4, 8), batch, seeds=(1, 1))

    def deeper_when_wide(width: int) -> nn.Sequential:
        hidden = [nn.Linear(width, width)] if width > 4 else []
        return nn.Sequential(nn.Linear(INPUTS, width), *hidden, nn.Linear(width, CLASSES))

    with pytest.raises(ValueError, match="layers differ between width 4 and width 8"):
        coord_check(deeper_when_wide, (4, 8), batch)
    result = coord_check(mlp, (4, 8), batch, steps=1)
    with pytest.raises(ValueError, match="stat must be one of act_rms, change_rms, update_rms"):
        result.slopes("mean_abs")
    with pytest.raises(ValueError, match=r"step must be in 0..1 \(the steps recorded\); got 2"):
        result.medians("act_rms", step=2)


def made_up(slopes: dict[str, tuple[float, float]]) -> CoordCheckResult:
    """A result whose layers' act_rms and change_rms follow ``width ** slope`` exactly
    (``nan``: never measured)."""
    widths = (8, 16, 64)
    records = [
        {
            "width": w,
            "seed": 0,
            "step": 1,
            "layer": layer,
            "depth": 0.0,
            "act_rms": w**act,
            "change_rms": w**change,
            "update_rms": 1.0,
            "loss": 1.0,
        }
        for layer, (act, change) in slopes.items()
        for w in widths
    ]
    return CoordCheckResult(records, list(slopes), [], widths, (0,), 1)


def test_verdicts_read_the_output_and_its_change() -> None:
    result = made_up(
        {
            "a": (0.1, -0.15),
            "b": (0.0, 0.3),
            "c": (-0.6, 0.5),
            "d": (-0.3, 0.1),
            "e": (math.nan, math.nan),
        }
    )
    slopes = result.slopes("change_rms")
    assert [round(slopes[x], 9) for x in "abcd"] == [-0.15, 0.3, 0.5, 0.1]
    assert math.isnan(slopes["e"])
    assert result.verdicts() == {
        "a": "flat",
        "b": "grows",
        "c": "grows",  # growth wins: it is what blows up
        "d": "shrinks",
        "e": "unmeasured",
    }
    assert result.verdicts(stats=("act_rms",))["c"] == "shrinks"
    assert result.verdicts(flat=0.35)["b"] == "flat"
    table = coord_check_table(result).splitlines()
    row = ["c", "0.29 -> 0.082", "-0.60", "2.8 -> 8", "+0.50", "+0.00", "grows (change)"]
    assert re.split(r"\s{2,}", table[3]) == row  # widths 8 .. 64
    assert re.split(r"\s{2,}", table[5]) == ["e", "-", "-", "-", "-", "+0.00", "unmeasured"]
    assert width_slope((1, 10, 100), (5.0, 5 * 10**0.7, 5 * 100**0.7)) == pytest.approx(0.7)
    assert math.isnan(width_slope((1, 10), (0.0, 1.0)))  # one positive value


def test_figure_has_a_panel_per_statistic_and_a_line_per_layer() -> None:
    result = made_up({"a": (0.1, 0.2), "b": (0.5, 1.0), "c": (0.0, 0.0)})
    figure = plot_coord_check(result, title="made up")
    panels = figure.axes[:3]  # then the colour bar
    assert len(figure.axes) == 4
    for ax in panels:
        assert [line.get_label() for line in ax.get_lines()] == ["a", "b", "c"]
        assert list(ax.get_xticks()) == [8, 16, 64]
        assert ax.get_xscale() == ax.get_yscale() == "log"
    assert list(panels[1].get_lines()[1].get_ydata()) == pytest.approx([8.0, 16.0, 64.0])
    assert len(plot_coord_check(result, stats=("change_rms",)).axes) == 2
    with pytest.raises(ValueError, match="stats must be some of act_rms, change_rms"):
        plot_coord_check(result, stats=("mean_abs",))


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """``gradtrace coord-check ARGS``'s printed lines, checking it exits with status 0."""
    with pytest.raises(SystemExit) as info:
        main(["coord-check", *args, "--device", "cpu"])
    assert info.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_command_on_the_coursework_vgg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, records = tmp_path / "figures" / "c.png", tmp_path / "r.csv"
    common = ["--widths", "8,4", "--steps", "2", "--seeds", "2", "--batch-size", "4"]
    lines = run(["vgg08", *common, "-o", str(png), "--csv", str(records)], capsys)
    assert lines[0] == (
        "Coordinate check of vgg08 over width 4, 8: 2 adam steps (lr 0.001) on one batch of 4 "
        "random images, 2 seeds, on cpu."
    )
    small, large = (
        sum(p.numel() for p in create_model("vgg08", width=w).parameters()) for w in (4, 8)
    )
    assert lines[1].startswith(f"Parameters {small:,} to {large:,}.")
    header, *rows = lines[2:11]
    assert re.split(r"\s{2,}", header) == [
        "layer", "activation RMS", "slope", "change RMS", "slope", "update slope", "verdict"
    ]  # fmt: skip

    def build(width: int) -> nn.Module:
        return create_model("vgg08", width=width)

    expected = coord_check(
        build, (4, 8), lambda seed: random_batch((3, 32, 32), 100, 4, seed), steps=2, seeds=(0, 1)
    )
    slopes = expected.slopes("act_rms")
    verdicts = expected.verdicts()
    assert len(expected.layers) == 8
    for row, layer in zip(rows, expected.layers):
        cells = re.split(r"\s{2,}", row)
        assert cells[0] == layer
        assert cells[2] == f"{slopes[layer]:+.2f}"
        assert cells[6].split()[0] == verdicts[layer]
    grows = [layer for layer in expected.layers if verdicts[layer] == "grows"]
    flat = [layer for layer in expected.layers if verdicts[layer] == "flat"]
    named = f": {', '.join(grows)}" if grows else ""
    assert f"Grows with width: {len(grows)} of 8 layers{named}." in lines
    assert f"Flat: {len(flat)} of 8 layers." in lines
    assert lines[-2:] == [f"Figure: {png}", f"Records: {records}"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    with records.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 3 * 8  # widths x seeds x steps 0..2 x layers
    assert rows[0].keys() == {
        "model", "width", "seed", "step", "layer", "depth",
        "act_rms", "change_rms", "update_rms", "loss",
    }  # fmt: skip
    last = [r for r in rows if r["step"] == "2" and r["layer"] == "head.weight"]
    assert float(last[-1]["act_rms"]) == pytest.approx(expected.records[-1]["act_rms"], rel=1e-6)


@pytest.mark.parametrize(
    ("model", "options", "knob"),
    [("resnet20", {}, "width"), ("vit_tiny_cifar", {"patch_size": 16}, "embed_dim")],
)
def test_command_finds_each_family_s_width_knob(
    model: str, options: dict, knob: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    label = f"{model}:patch_size=16" if options else model
    args = [label, "--widths", "6,12", "--steps", "1", "--seeds", "1", "--batch-size", "2"]
    lines = run([*args, "-o", str(tmp_path / "c.png")], capsys)
    assert lines[0].startswith(f"Coordinate check of {label} over {knob} 6, 12:")
    small, large = (
        sum(p.numel() for p in create_model(model, **options, **{knob: w}).parameters())
        for w in (6, 12)
    )
    assert lines[1].startswith(f"Parameters {small:,} to {large:,}.")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vgg11", "--widths", "8,16"], "vgg11 has no known width option: name the model option "
         "that sets its width with --knob, or check a model that has one: coursework_vgg, vgg08, "
         "vgg38 (width); plain110, "),
        (["vgg11", "--knob", "width", "--widths", "8,16"], "vgg11 at width=8: unknown option(s) "
         "['width'] for model 'vgg11'"),
        (["vgg08", "--widths", "8"], "argument --widths: two or more distinct integers >= 1 "
         "separated by commas, e.g. 16,32,64; got '8'"),
        (["vgg08", "--widths", "8,x"], "argument --widths: two or more distinct integers"),
        (["vgg08:width=16", "--widths", "8,16"], "vgg08:width=16 sets width, which --widths "
         "varies: leave it out of MODEL"),
        (["vit_tiny_cifar", "--widths", "8,16"], "vit_tiny_cifar at embed_dim=8: embed_dim must "
         "be a multiple of the 3 attention heads of vit_tiny_patch16_224; got 8, nearest valid: "
         "6, 9"),
        (["vgg08", "--widths", "8,16", "--steps", "0"], "--steps must be >= 1; got 0"),
        (["vgg08", "--widths", "8,16", "--data", "cifar10", "--data-root", "nowhere"],
         "gradtrace coord-check never downloads (gradtrace fit --data.dataset cifar10 does)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["coord-check", *args, "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gradtrace: error: ")
    assert err.count("\n") == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_width_knobs_of_the_zoo() -> None:
    default = create_model("resnet20")
    assert [default.conv1.out_channels, default.layer2[0].conv1.out_channels] == [16, 32]
    assert default.fc.in_features == 64
    assert sum(p.numel() for p in default.parameters()) == 269_722  # the paper's ResNet-20
    wide = create_model("resnet_cifar", depth=8, width=24)
    assert [wide.conv1.out_channels, wide.layer2[0].conv2.out_channels] == [24, 48]
    assert [wide.layer3[0].conv1.out_channels, wide.fc.in_features] == [96, 96]
    assert wide(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="width must be an integer >= 1; got 0"):
        create_model("resnet20", width=0)

    vit = create_model("vit_tiny_cifar")
    assert vit.pos_embed.shape[-1] == 192
    assert vit.blocks[0].attn.num_heads == 3
    small = create_model("vit_tiny_cifar", embed_dim=48, patch_size=16)
    assert small.pos_embed.shape == (1, 5, 48)
    assert small.blocks[0].mlp.fc1.out_features == 4 * 48
    assert small.head.in_features == 48
    assert small.blocks[0].attn.num_heads == 3
    assert sum(p.numel() for p in create_model("vit_tiny_cifar", embed_dim=192).parameters()) == (
        sum(p.numel() for p in vit.parameters())
    )
    assert create_model("vit_small_cifar", embed_dim=12).pos_embed.shape[-1] == 12
    with pytest.raises(ValueError, match="multiple of the 6 attention heads"):
        create_model("vit_small_cifar", embed_dim=9)
    with pytest.raises(ValueError, match="pretrained weights exist for embed_dim=192 only"):
        create_model("vit_tiny_cifar", embed_dim=96, pretrained=True)

"""``gradtrace probe``: the table, figure and records of several models against the library and
hand-written passes, real data, the zoo's Transformers, and bad input (one line, exit 2,
nothing written)."""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("matplotlib")

from gradtrace import probe
from gradtrace.cli.main import main
from gradtrace.cli.model_inputs import parse_model_spec
from gradtrace.data.datamodule import ImageDataModule
from gradtrace.measure import random_batch
from gradtrace.models import create_model
from helpers.data_files import write_fashion_mnist

CPU = ["--device", "cpu"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """``gradtrace probe ARGS``'s printed lines, checking it exits with status 0."""
    with pytest.raises(SystemExit) as info:
        main(["probe", *args])
    assert info.value.code == 0
    return capsys.readouterr().out.splitlines()


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def spread(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def test_two_models_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, records = tmp_path / "figures" / "p.png", tmp_path / "r.csv"
    bn14 = "coursework_vgg:depth=14,batch_norm=true"
    common = ["--seeds", "2", "--batch-size", "8", *CPU]
    lines = run(["vgg08", bn14, *common, "-o", str(png), "--csv", str(records)], capsys)
    assert lines[0] == "Gradient flow at initialisation: 2 seeds, batch 8 of random images, on cpu."
    assert cells(lines[1]) == [
        "model",
        "parameters",
        "layers",
        "input/output ratio",
        "slope",
        "first dead/saturated layer",
        "loss",
    ]
    builders = {
        "vgg08": lambda: create_model("vgg08"),
        bn14: lambda: create_model("coursework_vgg", depth=14, batch_norm=True),
    }
    expected = {
        label: probe(build, lambda s: random_batch((3, 32, 32), 100, 8, s), seeds=(0, 1))
        for label, build in builders.items()
    }
    parameters = {"vgg08": 59_716, bn14: sum(p.numel() for p in builders[bn14]().parameters())}
    for line, (label, result) in zip(lines[2:4], expected.items()):
        assert cells(line) == [
            label,
            f"{parameters[label]:,}",
            str(len(result.layers)),
            spread(result.ratios, ".1e"),
            spread(result.slopes, ".2f"),
            "none",
            f"{statistics.median(result.losses):.3f}",
        ]
    assert len(expected["vgg08"].layers) == 8
    assert len(expected[bn14].layers) == 14
    assert lines[4:] == ["", f"Figure: {png}", f"Records: {records}"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with records.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (8 + 14)
    for label, result in expected.items():
        mine = [row for row in rows if row["model"] == label]
        assert [row["layer"] for row in mine] == [r["layer"] for r in result.records]
        assert [int(row["seed"]) for row in mine] == [r["seed"] for r in result.records]
        for stat in ("depth", "mean_abs", "act_rms", "act_zero_frac"):
            assert [float(row[stat]) for row in mine] == pytest.approx(
                [r[stat] for r in result.records], rel=1e-9
            )
    # one seed: the value alone; markdown
    one_seed = ["vgg08", "--seeds", "1", "--batch-size", "4", "--markdown", *CPU]
    lines = run([*one_seed, "-o", str(png)], capsys)
    one = probe(lambda: create_model("vgg08"), random_batch((3, 32, 32), 100, 4, seed=0))
    assert lines[1] == (
        "| model | parameters | layers | input/output ratio | slope | first dead/saturated layer "
        "| loss |"
    )
    assert lines[3] == (
        f"| vgg08 | 59,716 | 8 | {one.ratio:.1e} | {one.slope:.2f} | none | {one.losses[0]:.3f} |"
    )


def test_steps_and_aux_heads_as_in_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    googlenet = "googlenet:stem=cifar,dropout=0,aux_dropout=0"
    args = [googlenet, "--num-classes", "10", "--input-size", "3", "32", "32", "--seeds", "1"]
    args += ["--batch-size", "2", "--steps", "2", "--optimizer", "sgd", "--lr", "0.01"]
    lines = run([*args, "--aux-weight", "0.5", *CPU, "-o", str(tmp_path / "p.png")], capsys)
    assert lines[0].startswith("Gradient flow after 2 sgd steps: 1 seed, batch 2 of random")
    row = cells(lines[2])
    assert re.fullmatch(r"\d+ \(\+6 off path\)", row[2]), row
    # two SGD steps on the batch, then the loss: main head + 0.5 x both auxiliary heads
    torch.manual_seed(0)
    net = create_model("googlenet", num_classes=10, stem="cifar", dropout=0, aux_dropout=0)
    x, y = random_batch((3, 32, 32), 10, 2, seed=0)
    sgd = torch.optim.SGD(net.parameters(), lr=0.01)

    def loss() -> torch.Tensor:
        out = net.train()(x)
        aux = sum(F.cross_entropy(head, y) for head in out.aux)
        return F.cross_entropy(out.logits, y) + 0.5 * aux

    for _ in range(2):
        sgd.zero_grad()
        loss().backward()
        sgd.step()
    assert row[-1] == f"{float(loss().detach()):.3f}"


def test_the_first_training_batch_of_a_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fashion_mnist(tmp_path / "data", 32, 16)
    args = ["vgg08", "--data", "fashion_mnist", "--data-root", str(tmp_path / "data")]
    csv_path = tmp_path / "r.csv"
    args += ["--seeds", "1", "--batch-size", "8", *CPU, "-o", str(tmp_path / "p.png")]
    lines = run([*args, "--csv", str(csv_path)], capsys)
    assert "batch 8 of fashion_mnist (first training batch)" in lines[0]
    # what a run with seed 0 trains on first, without augmentation, through the data module
    root = str(tmp_path / "data")
    data = ImageDataModule("fashion_mnist", root, batch_size=8, val_size=0, augment="none")
    data.setup("fit")
    x, y = data.transform_batch(next(iter(data.train_dataloader())))
    assert x.shape == (8, 1, 32, 32)
    torch.manual_seed(0)
    net = create_model("vgg08", num_classes=10, in_chans=1)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    row = cells(lines[2])
    assert row[1] == f"{sum(p.numel() for p in net.parameters()):,}"
    assert row[-1] == f"{float(loss.detach()):.3f}"
    with csv_path.open() as handle:
        first = next(csv.DictReader(handle))
    assert first["layer"] == "stem.0.weight"  # the entry conv
    grad = float(net.get_parameter("stem.0.weight").grad.abs().mean())
    assert float(first["mean_abs"]) == pytest.approx(grad, rel=1e-5)


def test_the_zoos_transformers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    csv_path = tmp_path / "r.csv"
    args = ["vit_tiny_cifar", "swin_tiny_cifar", "--seeds", "1", "--batch-size", "2", *CPU]
    run([*args, "-o", str(tmp_path / "p.png"), "--csv", str(csv_path)], capsys)
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    for model, block, head in (
        ("vit_tiny_cifar", "blocks.0", "head"),
        ("swin_tiny_cifar", "layers.0.blocks.0", "head.fc"),
    ):
        layers = [row["layer"] for row in rows if row["model"] == model]
        assert layers[0] == "patch_embed.proj.weight"
        assert layers[-1] == f"{head}.weight"
        stages = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        assert layers[1:5] == [f"{block}.{stage}.weight" for stage in stages]


def test_model_options_are_yaml_values() -> None:
    assert parse_model_spec("vgg38") == ("vgg38", {})
    assert parse_model_spec("coursework_vgg:depth=38,batch_norm=true,init=null") == (
        "coursework_vgg",
        {"depth": 38, "batch_norm": True, "init": None},
    )
    # a list or mapping keeps its commas
    assert parse_model_spec("m:a=[1, 2],b={c: x, d: 0.5}") == (
        "m",
        {"a": [1, 2], "b": {"c": "x", "d": 0.5}},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vgg39"], "unknown model 'vgg39'; closest: vgg38, "),
        (["coursework_vgg:depht=38"], "coursework_vgg:depht=38: unknown option(s) ['depht'] for "),
        (["coursework_vgg:depth=37"], "coursework_vgg:depth=37: depth must be 8 + 6*b (8, 14, "),
        (["vgg08:depth=38"], "vgg08:depth=38: 'vgg08' fixes {'depth': 8}"),
        (["vgg08:depth"], "model 'vgg08:depth': options are key=value separated by commas"),
        (["coursework_vgg:depth=abc"], "coursework_vgg:depth=abc: cannot build it with {'depth':"),
        (["vit_tiny_cifar", "--input-size", "3", "64", "64"], "vit_tiny_cifar: cannot run it on"),
        (["vgg08", "--seeds", "0"], "--seeds must be >= 1; got 0 (all options: gradtrace probe"),
        (["vgg08", "--lr", "0"], "--lr must be > 0; got 0.0"),
        (["vgg08", "--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
        (["vgg08", "vgg08"], "a MODEL is given twice: vgg08 vgg08"),
        (["vgg08", "--data", "cifar7"], "dataset must be one of cifar10, cifar100, fashion_mnist"),
        (["vgg08", "--data", "cifar10"], "cifar10 needs cifar-10-python.tar.gz (MD5 c58f30108f"),
        ([], "the following arguments are required: MODEL"),
    ],
)
def test_bad_input_is_one_line_before_any_work(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figure = tmp_path / "p.png"
    root = ["--data-root", str(tmp_path / "empty")]
    with pytest.raises(SystemExit) as info:
        main(["probe", *args, *root, *CPU, "-o", str(figure)])
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"gradtrace: error: {message}"), line
    assert not figure.exists()
    if "cifar10" in args:  # names this command's option, and says why nothing was downloaded
        assert "point --data-root at the folder" in line
        never = "gradtrace probe never downloads (gradtrace fit --data.dataset cifar10 does)"
        assert line.endswith(never)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["probe", "vgg08", "--device", "cuda"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "gradtrace: error: --device cuda, but CUDA is not available here: use --device cpu "
        "(all options: gradtrace probe --help)\n"
    )

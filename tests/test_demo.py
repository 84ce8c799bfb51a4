"""``make demo``: where its data comes from (each step's message), what it prints, and its exit
status when the study's claims do not hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradtrace
from gradtrace.data import DataNotFoundError, fashion_mnist
from gradtrace.studies import demo
from gradtrace.studies.short_run import RunResult, RunSpec, smoke_data
from helpers.data_files import md5_of, write_fashion_mnist

SRC = Path(gradtrace.__file__).resolve().parent.parent
REPO = SRC.parent
FETCH_SCRIPT = REPO / "scripts" / "fetch-demo-data.sh"


@pytest.fixture
def no_system_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-debian-package")


def point_downloads_at(monkeypatch: pytest.MonkeyPatch, mirror: Path | None) -> None:
    """torchvision's Fashion-MNIST mirror list replaced by a local folder (file URL), or by
    an unreachable one when ``mirror`` is None."""
    from torchvision.datasets import FashionMNIST

    if mirror is None:
        monkeypatch.setattr(FashionMNIST, "mirrors", ["file:///nonexistent-mirror/"])
        return
    resources = [(p.name, md5_of(p)) for p in sorted(mirror.glob("*.gz"))]
    monkeypatch.setattr(FashionMNIST, "mirrors", [mirror.as_uri() + "/"])
    monkeypatch.setattr(FashionMNIST, "resources", resources)


@pytest.mark.usefixtures("no_system_copy")
def test_demo_data_found_locally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", 30, 10)
    demo.main(["--fetch-data", "--data-root", str(tmp_path / "data")])
    found = tmp_path / "data" / "fashion-mnist"
    assert capsys.readouterr().out == f"Fashion-MNIST: found in {found}\n"


@pytest.mark.usefixtures("no_system_copy")
def test_demo_data_downloaded_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fashion_mnist(tmp_path / "mirror", 30, 10)
    point_downloads_at(monkeypatch, tmp_path / "mirror")
    demo.main(["--fetch-data", "--data-root", str(tmp_path / "data")])
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert capsys.readouterr().out == (
        f"Fashion-MNIST: downloaded to {raw} (published MD5s checked)\n"
    )
    assert sorted(p.name for p in raw.glob("*.gz")) == sorted(
        p.name for p in (tmp_path / "mirror").glob("*.gz")
    )


@pytest.mark.usefixtures("no_system_copy")
def test_demo_without_data_stops_with_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    point_downloads_at(monkeypatch, None)
    with pytest.raises(SystemExit) as info:
        demo.main(["--fetch-data", "--data-root", str(tmp_path / "data")])
    assert info.value.code == 1  # silent: the Makefile's apt step comes next
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as info:
        demo.main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [message] = captured.err.splitlines()
    assert message.startswith("make demo: Fashion-MNIST not found: looked in ")
    for way in (
        "nonexistent-mirror",  # why the download failed
        "apt-get install dataset-fashion-mnist",
        "--data.root",
        "machine with internet",
        "--synthetic",
    ):
        assert way in message
    assert not (tmp_path / "out").exists()  # stopped before any training


def fake_commands(folder: Path, uid: int, python_status: int) -> dict[str, str]:
    """PATH with a fake ``id``, ``apt-get`` (recording its arguments) and python."""
    folder.mkdir()
    (folder / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (folder / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {folder}/apt-calls\n')
    (folder / "python").write_text(f"#!/bin/sh\nexit {python_status}\n")
    for name in ("id", "apt-get", "python"):
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("uid", "python_status", "apt_called"),
    [(0, 1, True), (0, 0, False), (1000, 1, False)],
    ids=["offline-root-apt", "data-found-no-apt", "offline-not-root-no-apt"],
)
@pytest.mark.integration
def test_makefile_apt_step_only_offline_as_root(
    tmp_path: Path, uid: int, python_status: int, apt_called: bool
) -> None:
    bin_dir = tmp_path / "bin"
    env = fake_commands(bin_dir, uid, python_status)
    done = subprocess.run(
        ["sh", str(FETCH_SCRIPT), str(bin_dir / "python")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    calls = bin_dir / "apt-calls"
    if apt_called:
        assert calls.read_text() == "install -y -qq dataset-fashion-mnist\n"
        assert done.stdout == (
            "Fashion-MNIST: not found and not downloadable; installing Debian's "
            "dataset-fashion-mnist with apt-get\n"
        )
    else:
        assert not calls.exists()
        assert done.stdout == ""


@pytest.mark.slow
@pytest.mark.integration
def test_demo_output_is_one_screen_without_noise(tmp_path: Path) -> None:
    """The whole output of a (tiny) demo on real-format data: no Lightning tips, device
    banners, deprecation warnings or warning source lines; <= 40 lines; ends with the table,
    the files and what to read in the picture."""
    root = tmp_path / "data"
    write_fashion_mnist(root, 200, 60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(SRC)
    args = ["--steps", "3", "--batch-size", "8", "--val-size", "40"]
    done = subprocess.run(
        [sys.executable, "-m", "gradtrace.studies.demo", *args, "--data-root", str(root)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for noise in ("Tip:", "GPU available", "TPU available", "Deprecat", "LeafSpec", "warn("):
        assert noise not in output
    assert len(output.splitlines()) <= 40
    assert done.stderr.startswith(f"Fashion-MNIST: found in {root}\n")
    assert output.count("Data: fashion_mnist: ") == 1  # the settings used, said once
    for label in ("VGG08", "VGG38", "VGG38 BN + RC"):
        assert f"{label}: step 3/3, loss " in done.stderr  # one progress line per run
    lines = done.stdout.splitlines()
    assert sum(line.startswith("| VGG") for line in lines) == 3
    assert lines[-4].startswith("Files: runs/demo/summary.md (this table), runs/demo/gradient")
    assert lines[-2].startswith("In the picture:")
    assert (tmp_path / "runs" / "demo" / "gradient_flow.png").is_file()


@pytest.mark.usefixtures("no_system_copy")
def test_synthetic_data_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    point_downloads_at(monkeypatch, None)
    with pytest.raises(DataNotFoundError):  # never a silent fallback
        smoke_data(root=tmp_path / "empty")
    data, description = smoke_data(root=tmp_path / "empty", synthetic=True)
    assert data.dataset == "synthetic"
    assert description.startswith("SYNTHETIC data (asked for)")
    assert "Synthetic data (asked for): the numbers below say nothing" in caplog.text


@pytest.mark.parametrize(("bn_rc_acc", "status"), [(0.55, 0), (0.12, 1)])
def test_the_demo_exits_1_naming_the_claims_that_do_not_hold(
    bn_rc_acc: float,
    status: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Training replaced by made-up results at the demo's 150 steps, enough to settle every
    claim: VGG38 BN + RC at 12% (< 2x chance) does not learn."""
    accuracy = {"vgg08": 0.5, "vgg38": 0.1, "vgg38-bn-rc": bn_rc_acc}

    def made_up(spec: RunSpec, data: object, steps: int, root: Path) -> RunResult:
        first = 1e-9 if spec.name == "vgg38" else 0.3  # first/last layer mean |grad|
        history = [
            {"step": step, "layer": layer, "mean_abs": value}
            for step in (0, 10)
            for layer, value in (("stem", first), ("head", 1.0))
        ]
        metrics = {"train/loss": 1.0, "val/loss": 1.0, "val/acc": accuracy[spec.name]}
        return RunResult(spec, 1000, 10, steps, metrics, first, root / spec.name, history)

    monkeypatch.setattr(demo, "smoke_data", lambda **kwargs: (None, "made-up data"))
    monkeypatch.setattr(demo, "short_run", made_up)
    assert demo.main(["--out", str(tmp_path)]) == status
    captured = capsys.readouterr()
    summary = tmp_path / "summary.md"
    table, claims = summary.read_text().split("\nThe study's claims:\n")
    assert table in captured.out
    assert claims.splitlines()[:2] == [
        "- holds: plain VGG38 stays at chance: val acc 10.0% (chance 10%)",
        "- holds: plain VGG38's gradient collapses toward the input: first/last layer mean "
        "|grad| 1.0e-09 (< 0.001)",
    ]
    assert claims.splitlines()[3] == (
        "- holds: VGG08 (lr 0.001) learns: val acc 50.0% (> 2x chance, 20%)"
    )
    if status == 0:
        assert "VGG38 BN + RC (lr 0.001) learns: val acc 55.0%" in claims.splitlines()[2]
        assert f"The study's claims: 4 of 4 hold (each with its evidence in {summary})." in (
            captured.out.splitlines()
        )
        assert captured.err == ""
    else:
        assert claims.splitlines()[2] == (
            "- **DOES NOT HOLD**: VGG38 BN + RC (lr 0.001) learns: val acc 12.0% (> 2x chance, 20%)"
        )
        assert "The study's claims: 3 of 4 hold, 1 does not hold (each with its evidence in " in (
            captured.out
        )
        assert captured.err.splitlines() == [
            f"make demo: 1 claim(s) do not hold: VGG38 BN + RC (lr 0.001) learns (see {summary})"
        ]

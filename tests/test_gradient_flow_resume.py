"""GradientFlow across checkpoints: its state round-trips, two callbacks keep separate state, and
a resumed fit keeps the warnings given and continues the CSV (a new fit starts it afresh)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.measure import read_history
from helpers.fits import fit, quiet_trainer
from helpers.tiny import FLOW, Chain, Classifier, TinyNet, make_data


def test_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(25)
    cb = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    with pytest.warns(GradientFlowWarning):
        fit(tmp_path, Classifier(Chain(1e-6), lr=0.0), cb, max_steps=2)
    state = cb.state_dict()
    copy = GradientFlow(every_n_steps=1, plot=False)
    copy.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=False))
    assert copy.state_dict() == state
    assert copy.history == cb.history
    assert copy.last_step == 1
    assert copy.diagnosis.warned_vanishing
    assert copy.main_path == cb.main_path == [f"net.layers.{i}.weight" for i in range(4)]


def test_two_callbacks_writing_different_files_keep_separate_state() -> None:
    gradients = GradientFlow(plot=False)
    activations = GradientFlow(plot=False, activations=True, filename="activations.csv")
    assert gradients.state_key != activations.state_key
    assert gradients.state_key == GradientFlow(plot=False).state_key  # stable across runs
    assert "activation_diagnosis" in gradients.state_dict()


def _saved(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_resume_keeps_warnings_and_continues_the_csv(tmp_path: Path) -> None:
    torch.manual_seed(26)
    model = Classifier(Chain(1e-6), lr=0.0)
    first = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    logger = CSVLogger(tmp_path, name="run", version="same")
    with pytest.warns(GradientFlowWarning, match="Gradients vanish at step 0"):
        fit(
            tmp_path,
            model,
            first,
            logger=logger,
            callbacks=[first, ckpt],
            enable_checkpointing=True,
        )
    data = DataLoader(make_data(), batch_size=4)
    # rows an attempt killed after the checkpoint wrote: logged again on resume, never twice
    rows = first.csv_path.read_text().splitlines()
    stale = [row.replace("1,", "2,", 1) for row in rows if row.startswith("1,")]
    first.csv_path.write_text("\n".join([*rows, *stale]) + "\n")

    def resume_in(version: str) -> GradientFlow:
        """Resume the fit from its last checkpoint with the CSV logger's ``version``; a
        repeated GradientFlowWarning fails the test."""
        flow = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
        logger = CSVLogger(tmp_path, name="run", version=version)
        trainer = quiet_trainer(tmp_path, [flow], max_epochs=2, logger=logger)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientFlowWarning)
            trainer.fit(model, data, ckpt_path=ckpt.last_model_path)
        return flow

    # same log directory: the CSV goes on; the vanishing warning is not repeated
    same = resume_in("same")
    assert same.csv_path == first.csv_path
    assert [r["step"] for r in read_history(same.csv_path)] == [
        s for s in range(4) for _ in range(4)
    ]

    # a new log directory: a new CSV, whose steps continue
    moved = resume_in("moved")
    assert moved.csv_path != first.csv_path
    assert sorted({r["step"] for r in read_history(moved.csv_path)}) == [2, 3]


def test_resumed_fit_appends_to_the_csv_and_a_new_fit_starts_it_afresh(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(16)
    model = Classifier(TinyNet())
    first = GradientFlow(every_n_steps=1, plot=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, model, first, callbacks=[first, ckpt], enable_checkpointing=True)
    resumed = GradientFlow(every_n_steps=1, plot=False)
    t = quiet_trainer(tmp_path, [resumed], max_epochs=2)
    t.fit(model, DataLoader(make_data(), batch_size=4), ckpt_path=ckpt.last_model_path)

    assert resumed.csv_path == first.csv_path
    # the checkpoint carries the history: the resumed callback continues the first one's
    assert sorted({r["step"] for r in resumed.history}) == [0, 1, 2, 3]
    assert resumed.history[: len(first.history)] == first.history
    assert read_history(first.csv_path) == resumed.history
    fresh = GradientFlow(every_n_steps=1, plot=False)
    fit(tmp_path, Classifier(TinyNet()), fresh, max_steps=1)
    assert read_history(fresh.csv_path) == fresh.history
    assert len(fresh.history) == len(FLOW)

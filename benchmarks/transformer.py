"""GradientFlow's cost on a small text Transformer: a model it was not written around.

A two-layer ``nn.TransformerEncoder`` language model (next-token cross-entropy) trained by
Lightning, against the same model in a plain PyTorch loop. Per round, in rotating order: a
plain-loop block, a Lightning block with no callback working, a block where GradientFlow
measures every step, and one where a second GradientFlow is attached but measures none of
its steps. At the default cadence (``log_every_n_steps=50``) GradientFlow measures one step
in 50: its cost there is (one measuring step + 49 idle steps) ÷ 50 steps, round by round.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.callbacks import TimedCallback, keyed_gradient_flow
from benchmarks.config import Log, quiet_fit_kwargs
from benchmarks.stats import Summary, interleave, ratios
from benchmarks.stepper import TrainerSteps

__all__ = ["DEFAULT_CADENCE", "TextTransformer", "bench_transformer"]

DEFAULT_CADENCE = 50
"""Lightning's default ``log_every_n_steps``: GradientFlow measures one step in this many."""
VOCAB, WIDTH, HEADS, FEEDFORWARD, LAYERS, SEQUENCE = 2000, 128, 4, 512, 2, 64


def text_transformer() -> nn.Module:
    """Embedding, two encoder layers (causal mask), a linear head over the vocabulary."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            layer = nn.TransformerEncoderLayer(
                WIDTH, HEADS, FEEDFORWARD, dropout=0.1, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
            self.head = nn.Linear(WIDTH, VOCAB)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQUENCE))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens), mask=self.mask, is_causal=True))

    torch.manual_seed(0)
    return Net()


class TextTransformer(pl.LightningModule):
    """The Lightning side: the same network, data and AdamW, the loss logged as a user would."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.net = text_transformer()
        self.data, self.batch_size = data, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        tokens, targets = batch
        loss = F.cross_entropy(self.net(tokens).flatten(0, 1), targets.flatten())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def token_batches(batches: int, batch_size: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB, (batches * batch_size, SEQUENCE + 1), generator=g)
    return TensorDataset(text[:, :-1], text[:, 1:])


class PlainTransformerLoop:
    """The same network, data order and optimizer in a hand-written loop."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        self.net = text_transformer()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=3e-4)
        self.loader = DataLoader(data, batch_size=batch_size)
        self._batches = iter(self.loader)

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            try:
                tokens, targets = next(self._batches)
            except StopIteration:
                self._batches = iter(self.loader)
                tokens, targets = next(self._batches)
            loss = F.cross_entropy(self.net(tokens).flatten(0, 1), targets.flatten())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - start


def bench_transformer(
    rounds: int, block: int, warmup: int, batch_size: int, workdir: Path, log: Log
) -> dict[str, Any]:
    """Per-round timings and GradientFlow's cost on the text Transformer (CPU, fp32)."""
    log(f"text Transformer: {rounds} rounds of {block}-step blocks")
    lightning_blocks = (warmup + rounds) * block * 3
    data = token_batches(lightning_blocks + 1, batch_size)
    measuring = keyed_gradient_flow("measuring", every_n_steps=1, plot=False)
    idle = keyed_gradient_flow("idle", every_n_steps=10**9, plot=False)
    clocks = {"GradientFlow": TimedCallback(measuring), "GradientFlow(idle)": TimedCallback(idle)}
    stepper = TrainerSteps(
        TextTransformer(data, batch_size),
        callbacks=[measuring, idle],
        logger=CSVLogger(workdir, name="transformer"),
        default_root_dir=workdir,
        log_every_n_steps=DEFAULT_CADENCE,
        **quiet_fit_kwargs("cpu", "32-true"),
    )
    plain = PlainTransformerLoop(data, batch_size)
    hook_seconds: dict[str, list[float]] = {name: [] for name in clocks}

    def timed(name: str) -> Any:
        def run() -> float:
            before = clocks[name].seconds
            elapsed = stepper.run(block)
            hook_seconds[name].append(clocks[name].seconds - before)
            return elapsed

        return run

    def switch(workload: str) -> None:
        for name, clock in clocks.items():
            clock.active = workload == f"gradtrace+{name}"

    try:
        stepper.start()
        workloads = {
            "plain": lambda: plain.run(block),
            "gradtrace": lambda: stepper.run(block),
            **{f"gradtrace+{name}": timed(name) for name in clocks},
        }
        samples = interleave(workloads, rounds, warmup=warmup, between=switch)
        switch("")
    finally:
        stepper.close()
    every_step = ratios(hook_seconds["GradientFlow"][-rounds:], samples["gradtrace+GradientFlow"])
    idle_share = ratios(
        hook_seconds["GradientFlow(idle)"][-rounds:], samples["gradtrace+GradientFlow(idle)"]
    )
    n = DEFAULT_CADENCE
    return {
        "model": f"{LAYERS}-layer nn.TransformerEncoder LM, d_model {WIDTH}, {HEADS} heads, "
        f"feed-forward {FEEDFORWARD}, vocabulary {VOCAB}, {SEQUENCE} tokens x {batch_size}",
        "steps_per_block": block,
        "seconds_per_step": {k: Summary.of([t / block for t in v]) for k, v in samples.items()},
        "train_step_ratio": Summary.of(ratios(samples["plain"], samples["gradtrace"])),
        "callback_hook_fraction": {
            "every_step": Summary.of(every_step),
            "default_cadence": Summary.of(
                [(m + (n - 1) * i) / n for m, i in zip(every_step, idle_share)]
            ),
        },
        "unmeasured_step_us": Summary.of(
            [1e6 * s / block for s in hook_seconds["GradientFlow(idle)"][-rounds:]]
        ),
    }

"""``make bench``: how fast gradtrace trains, measured against what one would write by hand.

Not part of the installed package: run from the repository root as ``python -m benchmarks
[--quick] [--out reports]``; it writes ``bench.json`` and ``bench.md``. Every figure is a
ratio of two workloads measured in the same process, interleaved round by round (A B A B
...), reported as the median over rounds with the median's confidence interval, on which its
goal is judged (pass, FAIL or inconclusive):

* training step: Trainer + ImageClassifier + ImageDataModule vs a plain PyTorch loop (VGG08,
  VGG38, batch 100, CIFAR-100-shaped synthetic data);
* callback cost on VGG38, as time inside the callback ÷ step time: GradientFlow measuring
  every step, GradientFlow with activation statistics (every step, every 50 steps),
  Lightning's ``grad_norm``, ``wandb.watch(log="gradients", log_freq=1)`` offline;
* collectives per logged step of ``grad_stats`` on an FSDP2 model (2 gloo processes);
* on CUDA: epoch times of the Table 1 networks as configured and in the fastest faithful
  configuration, one vs two runs per GPU and the projected wall time of Table 1 (also
  ``make gpu-check``, :mod:`benchmarks.gpu_check`, within a hard 8 minutes).

Modules: :mod:`~benchmarks.stats` (interleaving, medians, intervals),
:mod:`~benchmarks.stepper` (a ``Trainer.fit`` run step by step), :mod:`~benchmarks.callbacks`
(the compared callbacks, timed), :mod:`~benchmarks.workloads` (the plain loop),
:mod:`~benchmarks.config` (settings), :mod:`~benchmarks.training`,
:mod:`~benchmarks.collectives` and :mod:`~benchmarks.gpu` (the measurements),
:mod:`~benchmarks.child` (the GPU section's measurement processes),
:mod:`~benchmarks.bounded` (their time limits), :mod:`~benchmarks.figures`,
:mod:`~benchmarks.report`, :mod:`~benchmarks.markdown`, :mod:`~benchmarks.gpu_check`
(``make gpu-check``).
"""

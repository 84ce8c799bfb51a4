"""``make bench``: how fast gradtrace trains, measured against what one would write by hand.

``python -m gradtrace.bench [--quick] [--out reports]`` writes ``bench.json`` and ``bench.md``.
Every figure is a ratio of two workloads measured in the same process, interleaved round by
round (A B A B ...), reported as the median over rounds with its spread:

* training step: Trainer + ImageClassifier + ImageDataModule vs a plain PyTorch loop (VGG08,
  VGG38, batch 100, CIFAR-100-shaped synthetic data), and the host time Lightning adds to a
  step (a tiny network in both loops);
* callback overhead on VGG38: GradientFlow logging every step, Lightning's ``grad_norm``,
  ``wandb.watch(log="gradients", log_freq=1)`` offline;
* data pipeline: ImageDataModule vs a torchvision per-sample DataLoader, and vs the model;
* peak memory per model; VGG38's achieved FLOP/s vs a dense matmul;
* scaling with 1 and 2 DDP processes; host syncs per step; on CUDA, epoch times and the
  projected wall time of Table 1.

Modules: :mod:`~gradtrace.bench.stats` (interleaving, medians), :mod:`~gradtrace.bench.stepper`
(a ``Trainer.fit`` run step by step), :mod:`~gradtrace.bench.workloads` (baselines),
:mod:`~gradtrace.bench.phases` and :mod:`~gradtrace.bench.gpu` (the measurements),
:mod:`~gradtrace.bench.child` (fresh-process measurements), :mod:`~gradtrace.bench.report`.
"""

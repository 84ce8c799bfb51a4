"""W&B sweeps over the study's grids (``sweeps/*.yaml``), on W&B agents or locally:
:mod:`~gradtrace.sweeps.grid` (read, expand and shard a sweep file),
:mod:`~gradtrace.sweeps.agents` (one ``wandb agent`` per GPU), :mod:`~gradtrace.sweeps.launch`
(runs as subprocesses on a GPU pool), :mod:`~gradtrace.sweeps.outcome` (one line per run as it
ends, and a summary) and :mod:`~gradtrace.sweeps.commands` (``python -m gradtrace.sweeps``).
"""

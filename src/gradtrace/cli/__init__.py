"""The ``gradtrace`` command: :mod:`~gradtrace.cli.main` (subcommands, one-line errors),
:mod:`~gradtrace.cli.trainer_cli` (``fit``/``validate``/``test``/``predict`` on LightningCLI),
:mod:`~gradtrace.cli.configs` (the shipped configs), :mod:`~gradtrace.cli.run_identity` (one
name and one directory per run), :mod:`~gradtrace.cli.run_files` (reading a run's files),
:mod:`~gradtrace.cli.compare` (``gradtrace compare``), :mod:`~gradtrace.cli.probe`
(``gradtrace probe``) and :mod:`~gradtrace.cli.coord_check` (``gradtrace coord-check``), with
what the last two share in :mod:`~gradtrace.cli.model_inputs` (a model given on the command
line, checked on the meta device; a dataset's first batch).
"""

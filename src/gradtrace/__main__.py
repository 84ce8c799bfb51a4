"""``python -m gradtrace`` runs the ``gradtrace`` command."""

from gradtrace.cli.main import main

main()

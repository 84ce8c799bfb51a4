"""``python -m gradtrace`` runs the ``gradtrace`` command."""

from gradtrace.cli import main

main()

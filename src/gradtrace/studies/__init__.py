"""The studies built on gradtrace, apart from the library: :mod:`~gradtrace.studies.demo`
(``make demo``), :mod:`~gradtrace.studies.table1` (``make reproduce-table1``), the short
in-process training they share (:mod:`~gradtrace.studies.short_run`) and the claims both check
(:mod:`~gradtrace.studies.claims`). Their outputs go under ``runs/``; the committed
``reports/`` change only when asked (``--update-reports``).
"""

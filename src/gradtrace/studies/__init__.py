"""The studies built on gradtrace, apart from the library: :mod:`~gradtrace.studies.demo`
(``make demo``), :mod:`~gradtrace.studies.table1` (``make reproduce-table1``) and the short
in-process training they share (:mod:`~gradtrace.studies.short_run`).
"""

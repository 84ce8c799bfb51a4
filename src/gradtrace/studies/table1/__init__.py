"""The coursework report's Table 1 (VGG08 vs VGG38 +/- BN +/- RC on CIFAR-100):
:mod:`~gradtrace.studies.table1.reproduce` (``python -m gradtrace.studies.table1``), its
rows (:mod:`~gradtrace.studies.table1.rows`), the report (:mod:`~gradtrace.studies.table1.report`)
and the gradient-flow figures (:mod:`~gradtrace.studies.table1.figures`).
"""

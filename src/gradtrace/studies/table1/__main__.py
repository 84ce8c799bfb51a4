"""``python -m gradtrace.studies.table1`` (see :mod:`gradtrace.studies.table1.reproduce`)."""

import sys

from gradtrace.studies.table1.reproduce import main

sys.exit(main())

"""``python -m gradtrace.sweeps {show,agents,local} ...`` (see :mod:`gradtrace.sweeps.commands`)."""

import sys

from gradtrace.sweeps.commands import main

sys.exit(main())

"""``python benchmarks/run.py [--quick] [--out DIR]``: the bench, without installing it.

The same as ``python -m benchmarks`` from the repository root: puts the root on ``sys.path``
(the bench is not part of the installed package) in place of this script's folder (whose
module names would shadow others) and runs :func:`benchmarks.__main__.main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from benchmarks.__main__ import main

    main()

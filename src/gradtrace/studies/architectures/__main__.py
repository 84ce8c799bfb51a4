import sys

from gradtrace.studies.architectures.reproduce import main

sys.exit(main())

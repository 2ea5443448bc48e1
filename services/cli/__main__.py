"""`python -m services.cli`: the same command line as `ops-pipeline`."""

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main())

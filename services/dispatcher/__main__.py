"""`python -m services.dispatcher`: the dispatcher service (the container's entry point)."""

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["dispatcher", *sys.argv[1:]]))

"""``python -m erllama``: the same command line as ``erllama``."""

import sys

from erllama.cli import main

if __name__ == "__main__":
    sys.exit(main())

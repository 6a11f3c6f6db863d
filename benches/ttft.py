"""Cold versus warm time to first token per tier (``erllama bench --only ttft``).

Kept as a script for the README's benchmark section; the logic lives in
:mod:`erllama.bench`. Run with ``.venv/bin/python benches/ttft.py [--repeats N]``
after ``./dev build``; ``./dev bench`` runs every part.
"""

from __future__ import annotations

import sys

from erllama.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "ttft", *sys.argv[1:]]))

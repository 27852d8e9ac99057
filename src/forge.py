"""`python src/forge.py`: the requirements' entry point; the same code as `opensem forge`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from opensem.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    stage_main("forge")

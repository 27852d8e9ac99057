"""`python src/cpt.py`: continued pre-training; the same code as `opensem cpt` (also under torchrun)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from opensem.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    stage_main("cpt")

"""Stage 1, the Data Forge: raw documents -> grounded ShareGPT train/test sets."""

from opensem.forge.stage import run_forge

__all__ = ["run_forge"]

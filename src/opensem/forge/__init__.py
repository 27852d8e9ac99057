"""Stage 1, the Data Forge: raw documents -> grounded ShareGPT train/test sets."""

from opensem import lazy_names

__getattr__ = lazy_names(__name__, {"run_forge": "opensem.forge.stage"})
__all__ = ['run_forge']

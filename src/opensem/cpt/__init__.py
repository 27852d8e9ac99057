"""Continued pre-training: next-token loss on the raw documents (and teacher rewrites of them), before
instruction tuning. corpus.py builds the corpus, recipe.py trains, stage.py is the pipeline stage."""

from opensem import lazy_names

__getattr__ = lazy_names(__name__, {"run_cpt": "opensem.cpt.recipe"})
__all__ = ['run_cpt']

"""Continued pre-training: next-token loss on the raw documents (and teacher rewrites of them), before
instruction tuning. corpus.py builds the corpus, recipe.py trains, stage.py is the pipeline stage."""

from opensem.cpt.recipe import run_cpt

__all__ = ["run_cpt"]

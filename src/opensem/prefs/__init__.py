"""Preference tuning after instruction tuning: pairs.py builds prompt/chosen/rejected pairs from the tuned
model's own wrong answers, recipe.py trains DPO or ORPO on them, stage.py puts both in the pipeline."""

from opensem.prefs.pairs import build_pairs
from opensem.prefs.recipe import run_preference

__all__ = ["build_pairs", "run_preference"]

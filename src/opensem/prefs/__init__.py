"""Preference tuning after instruction tuning: pairs.py builds prompt/chosen/rejected pairs from the tuned
model's own wrong answers, recipe.py trains DPO or ORPO on them, stage.py puts both in the pipeline."""

from opensem import lazy_names

__getattr__ = lazy_names(__name__, {"build_pairs": "opensem.prefs.pairs", "run_preference": "opensem.prefs.recipe"})
__all__ = ['build_pairs', 'run_preference']

"""Stage 3, the Training Floor: train.jsonl -> LoRA adapter in models/adapters/{run_name}."""

from opensem import lazy_names

__getattr__ = lazy_names(__name__, {"run_training": "opensem.train.recipe"})
__all__ = ['run_training']

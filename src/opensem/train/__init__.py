"""Stage 3, the Training Floor: train.jsonl -> LoRA adapter in models/adapters/{run_name}."""

from opensem.train.recipe import run_training

__all__ = ["run_training"]

"""configs/cpt_config.yaml: continued pre-training (its training keys are the kernel's; the hardware keys come from
train_config.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from opensem.config import Strict
from opensem.kernel.config import FullModuleKeys, LoraKeys, OptimizerKeys, RunKeys

REWRITE_KINDS = ("paraphrase", "explain", "entities")


class AugmentConfig(Strict):
    enabled: bool = Field(False, description="Teacher rewrites of every chunk (forge_config.yaml's teacher, cost and budget)")
    kinds: list[Literal["paraphrase", "explain", "entities"]] = Field(default_factory=lambda: list(REWRITE_KINDS))
    max_tokens: int = Field(512, ge=16, le=32_000, description="Longest rewrite in tokens")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) < len(v):
            raise ValueError(f"name each kind once, at least one of {', '.join(REWRITE_KINDS)}")
        return v


class CptConfig(LoraKeys, FullModuleKeys, OptimizerKeys, RunKeys):
    corpus: str = Field("data/processed/cpt.jsonl", description="Where the corpus is written: one {\"text\": ...} per line")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    eval_share: float = Field(0.1, ge=0.0, lt=1.0, description="Share of packed sequences held out to measure perplexity")
    lora_alpha: int = Field(32, ge=1)
    peft_use_rslora: bool = True
    sequence_len: int = Field(512, ge=16, le=131_072)
    micro_batch_size: int = Field(4, ge=1)
    num_epochs: float = Field(10.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    output_dir: str = "models/cpt"

    def training_keys(self) -> dict:
        """The keys that are TrainConfig's too (all but the corpus, its augmentation and the held-out share)."""
        return self.model_dump(exclude={"corpus", "augment", "eval_share"})

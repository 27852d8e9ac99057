"""configs/preference_config.yaml: preference pairs from the instruction-tuned model's own wrong answers, and DPO
or ORPO on them (TRL's key names)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from opensem.config import Strict
from opensem.kernel.config import LoraKeys, OptimizerKeys, RunKeys

class PairsConfig(Strict):
    output: str = Field("data/processed/preferences.jsonl", description="prompt/chosen/rejected JSONL, TRL's conversational format")
    max_questions: Optional[int] = Field(200, ge=1, description="Training questions sampled (null: all)")
    samples_per_question: int = Field(4, ge=1, le=32)
    temperature: float = Field(0.9, gt=0.0, le=2.0)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    seed: int = 0


class PreferenceConfig(LoraKeys, OptimizerKeys, RunKeys):
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    method: Literal["dpo", "orpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0, le=10.0, description="DPO: strength of the pull from the reference; ORPO: the odds-ratio weight")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO loss (TRL's name)")
    max_length: int = Field(512, ge=16, le=131_072, description="Prompt + answer tokens")
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    num_epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(5e-5, gt=0, le=1.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=0.5)
    output_dir: str = "models/preference"

    def training_keys(self) -> dict:
        """The keys that are TrainConfig's too."""
        return self.model_dump(exclude={"pairs", "method", "beta", "loss_type", "max_length"})

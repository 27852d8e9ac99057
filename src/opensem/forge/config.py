"""configs/forge_config.yaml: the Data Forge's schema (teacher, chunking, generation, quality gates, output, cost)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from opensem.config import DEFAULT_PRICES, LLMSpec, Price, Strict

class ChunkingConfig(Strict):
    chunk_tokens: int = Field(256, ge=16, le=32_000)
    overlap_tokens: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _overlap(self) -> "ChunkingConfig":
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self


class GenerationConfig(Strict):
    pairs_per_chunk: int = Field(40, ge=1, le=100, description="Budget of pairs asked for per chunk")
    strategy: Literal["auto", "passage", "sentence"] = Field(
        "auto",
        description="passage: the teacher writes question+answer from the whole chunk (capable teachers); "
        "sentence: one source sentence per request, the teacher writes questions, the answer is the "
        "sentence (weak local teachers). auto: sentence for the local provider, passage otherwise.",
    )
    questions_per_sentence: int = Field(2, ge=1, le=10, description="Sentence strategy: wordings per fact (source sentence)")
    replacement_rounds: int = Field(
        2, ge=0, le=10, description="Sentence strategy: rounds of new wordings for facts the quality gates left short")
    system_prompt: Optional[str] = Field(None, description="Optional system turn written into every record")


class QualityConfig(Strict):
    min_question_chars: int = Field(12, ge=1)
    max_question_chars: int = Field(300, ge=10)
    min_answer_chars: int = Field(8, ge=1)
    max_answer_chars: int = Field(2000, ge=10)
    grounding_threshold: float = Field(0.6, ge=0.0, le=1.0, description="Share of answer content words found in the chunk")
    near_duplicate_threshold: float = Field(0.8, ge=0.0, le=1.0, description="MinHash Jaccard of question+answer")
    golden_overlap_threshold: float = Field(0.6, ge=0.0, le=1.0, description="MinHash Jaccard of question vs golden questions")
    golden_embedding_threshold: float = Field(0.9, ge=0.0, le=1.0, description="Cosine of question vs golden questions")
    question_gate: bool = Field(True, description="Reject non-questions, questions about a heading, with no subject, or "
                                "naming what the source does not")


class OutputConfig(Strict):
    format: Literal["sharegpt", "messages"] = "sharegpt"
    split_by: Literal["wording", "chunk"] = Field(
        "wording", description="wording: every fact trained, test.jsonl holds other wordings of trained facts; "
        "chunk: whole chunks held out (facts never trained)")
    test_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="wording: share of facts with a held-out wording; chunk: share of pairs")
    seed: int = 42


class CostConfig(Strict):
    max_cost_usd: Optional[float] = Field(5.0, ge=0, description="Hard budget for teacher calls in USD; null: none")
    prices: dict[str, Price] = Field(default_factory=dict, description="Extra or overriding prices per model")

    def price_for(self, model: str) -> Optional[Price]:
        if model in self.prices:
            return self.prices[model]
        if model in DEFAULT_PRICES:
            return Price(**DEFAULT_PRICES[model])
        return None


class ForgeConfig(Strict):
    input_dir: str = "data/raw"
    output_dir: str = "data/processed"
    golden_set: str = "evals/golden_set.json"
    teacher: LLMSpec = Field(default_factory=LLMSpec)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cost: CostConfig = Field(default_factory=CostConfig)

"""configs/eval_config.yaml: the judge's schema (golden set, answers, the judge or scorer, statistics, retrieval rows)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from opensem.config import LLMSpec, Strict

class AnswerConfig(Strict):
    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    batch_size: int = Field(16, ge=1, le=1024)
    system_prompt: Optional[str] = None


class JudgeSpec(LLMSpec):
    provider: str = Field("offline", description="a scorer (offline: the reference scorer; a plugin's; package.module:Class), "
                                                  "or any teacher provider, which grades as an LLM judge")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(400, ge=16)
    concurrency: int = Field(4, ge=1, le=256, description="Items graded at once (promptfoo's maxConcurrency)")
    fallback_to_offline: bool = Field(True, description="Use the offline scorer when the judge is unreachable")

    @model_validator(mode="after")
    def _check(self) -> "JudgeSpec":
        if self.scorer() is not None:
            return self
        try:
            return LLMSpec._check(self)
        except ValueError as e:
            if "unknown provider" not in str(e):
                raise
            from opensem.judge.scorers import SCORERS

            raise ValueError(f"{e}; or a scorer: {', '.join(SCORERS.names())}") from None

    def scorer(self):
        """The scorer class ``provider`` names (opensem/judge/scorers.py: SCORERS), or None for a provider."""
        from opensem.judge.scorers import scorer_class

        return scorer_class(self.provider)

    def in_process(self) -> bool:
        return self.scorer() is not None or super().in_process()

    def resolved_model(self) -> str:
        cls = self.scorer()
        if cls is not None:
            return getattr(cls, "version", None) or getattr(cls, "short", None) or self.provider
        return super().resolved_model()

    def resolved_key_env(self) -> Optional[str]:
        return None if self.scorer() is not None else super().resolved_key_env()


class RetrievalConfig(Strict):
    enabled: bool = Field(True, description="Also answer with the top_k passages of your documents in the prompt: "
                          "the '+ retrieval' rows, recall@k, and the recommended row")
    top_k: int = Field(3, ge=1, le=20)
    method: Literal["dense", "bm25", "hybrid"] = Field(
        "hybrid", description="How passages are ranked: embeddings, BM25, or both fused by reciprocal rank")


class EvalConfig(Strict):
    golden_set: str = "evals/golden_set.json"
    reports_dir: str = "evals/reports"
    answers: AnswerConfig = Field(default_factory=AnswerConfig)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    pass_threshold: int = Field(4, ge=1, le=5)
    bootstrap_samples: int = Field(2000, ge=100, le=1_000_000)
    seed: int = 0
    forgetting_set: Optional[str] = Field("builtin", description="'builtin', a path to a golden-format file, or null")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    train_sample: int = Field(24, ge=0, le=1000, description="The fine-tuned model also answers this many of its own "
                              "training questions: the 'why it misses' line (0: off)")
    promptfoo: Optional[str] = Field(None, description="promptfoo command; default: the workspace's or the tool's node_modules")

"""configs/export_config.yaml: the export's schema (formats, GGUF types, the round-trip check). The type names are
llama.cpp's."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from opensem.config import Strict

GGUF_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_m")


class VerifyConfig(Strict):
    enabled: bool = Field(True, description="The round-trip check (`opensem export --no-verify` skips it)")
    questions: int = Field(8, ge=1, le=1000, description="Golden questions each export answers")
    max_new_tokens: int = Field(48, ge=1, le=4096)
    min_exact: float = Field(0.75, ge=0.0, le=1.0, description="Unquantized: share of answers identical to the evaluated model's")
    min_agreement_unquantized: float = Field(4.5, ge=1.0, le=5.0)
    min_agreement_quantized: float = Field(3.0, ge=1.0, le=5.0, description="Quantized: mean agreement (offline scorer, 1-5)")


class CardConfig(Strict):
    """The model card's metadata (README.md of every export, Hugging Face's front matter)."""

    license: Optional[str] = Field(None, description="A Hugging Face license id (apache-2.0, mit, ...); null: other")
    datasets: list[str] = Field(default_factory=list, description="Hub datasets to name, if your documents are one")
    tags: list[str] = Field(default_factory=list, description="Extra tags")


class ExportConfig(Strict):
    formats: list[str] = Field(
        default_factory=lambda: ["merged", "gguf", "ollama"],
        description="What `opensem export` writes: merged, gguf, ollama, lora-gguf, a plugin's, or package.module:Class")
    gguf_types: list[Literal[GGUF_TYPE_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["f16", "q8_0"], description="GGUF files: f16/bf16/f32/q8_0 from the converter, the rest quantized "
        "from f16 (q4_k_m and below change facts of small models more often: the check says so)")
    ollama_gguf: Optional[Literal[GGUF_TYPE_NAMES]] = Field(  # type: ignore[valid-type]
        None, description="The GGUF the Modelfile's FROM names (default: the smallest of this export's that passed its check)")
    output_dir: str = "models/exports"
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    card: CardConfig = Field(default_factory=CardConfig)

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        from opensem.export.formats import FORMATS

        for name in v:
            FORMATS.get(name)  # ValueError: unknown, listing the known ones
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if not self.formats:
            raise ValueError("formats: name at least one of merged, gguf, ollama, lora-gguf")
        if self.ollama_gguf and self.ollama_gguf not in self.gguf_types:
            raise ValueError(f"ollama_gguf: {self.ollama_gguf} is not among gguf_types {self.gguf_types}")
        return self

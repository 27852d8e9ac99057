"""The three YAML files of a workspace, validated by pydantic.

configs/forge_config.yaml  -> ForgeConfig   (the Data Forge)
configs/train_config.yaml  -> TrainConfig   (the Training Floor; Axolotl's key names)
configs/eval_config.yaml   -> EvalConfig    (the Judge)
configs/cpt_config.yaml    -> CptConfig     (continued pre-training, when `cpt` is among the stages)
configs/preference_config.yaml -> PreferenceConfig (preference pairs and DPO/ORPO, after instruction tuning)
configs/export_config.yaml -> ExportConfig  (merged / GGUF / Ollama / LoRA-GGUF exports and their round-trip check)
configs/launch_config.yaml -> LaunchConfig  (`opensem launch --cloud`: the pipeline on a rented GPU through SkyPilot)
configs/pipeline_config.yaml -> PipelineConfig (the stages `opensem run` runs)

Unknown keys, wrong types and out-of-range values fail before any work starts, with the file, the
dotted key path and, for a misspelled key, the closest valid one. Any value can be overridden from the
command line with ``--set train.learning_rate=1e-4`` (the first part names the file).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opensem.errors import ConfigError

EMBEDDED_MODEL = "smollm2-135m-instruct"


class Strict(BaseModel):
    # allow_inf_nan: `.inf` or `.nan` for a number is a config error naming the key, never an OverflowError later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Teacher / judge model endpoint (shared by the forge and the judge)
# --------------------------------------------------------------------------------------------------
class LLMSpec(Strict):
    """A chat model the tool talks to: a hosted API, an OpenAI-compatible server, or an in-process model."""

    provider: str = Field("local", description="openai, openai-compatible, anthropic, local, a plugin's name, or package.module:Class")
    model: Optional[str] = Field(None, description="Model name; defaults per provider")
    base_url: Optional[str] = Field(None, description="For openai-compatible (Ollama, vLLM, LM Studio...)")
    api_key_env: Optional[str] = Field(None, description="Name of the environment variable with the key")
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    max_tokens: int = Field(1024, ge=1, le=200_000)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0, le=50)
    concurrency: int = Field(8, ge=1, le=256)
    requests_per_minute: Optional[int] = Field(None, ge=1)
    tokens_per_minute: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "LLMSpec":
        cls = self.provider_class()  # ValueError: unknown provider, listing the known ones
        if cls.needs_base_url and not self.base_url:
            raise ValueError(f"provider '{self.provider}' needs base_url (e.g. http://localhost:11434/v1)")
        return self

    def provider_class(self):
        from opensem.llm.registry import provider_class

        return provider_class(self.provider)

    def in_process(self) -> bool:
        """A model in this process: free, and its own tokenizer counts the prompts."""
        return self.provider_class().in_process

    def resolved_model(self) -> str:
        return self.model or self.provider_class().default_model

    def resolved_key_env(self) -> Optional[str]:
        return self.api_key_env or self.provider_class().key_env


class Price(Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # USD per million tokens, list prices; edit forge_config.yaml `cost.prices` to change or add.
    "gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
    "gpt-4o": {"input_per_mtok": 2.50, "output_per_mtok": 10.00},
    "gpt-4.1-mini": {"input_per_mtok": 0.40, "output_per_mtok": 1.60},
    "gpt-4.1": {"input_per_mtok": 2.00, "output_per_mtok": 8.00},
    "claude-3-5-haiku-latest": {"input_per_mtok": 0.80, "output_per_mtok": 4.00},
    "claude-sonnet-4-5": {"input_per_mtok": 3.00, "output_per_mtok": 15.00},
}


# --------------------------------------------------------------------------------------------------
# Forge
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Train (Axolotl key names)
# --------------------------------------------------------------------------------------------------
class DatasetSpec(Strict):
    path: str
    type: Literal["chat_template"] = "chat_template"
    field_messages: str = "conversations"


RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # always fullmatch: "$" lets a trailing newline through
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
TargetModules = Union[list[str], Literal["all-linear"]]


# Shared pieces of the training schemas (train, cpt, preference), each stage's defaults set in its own schema.
class LoraKeys(Strict):
    """PEFT's LoRA keys, by Axolotl's names."""

    lora_r: int = Field(32, ge=1, le=1024)
    lora_alpha: int = Field(64, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: TargetModules = "all-linear"

    @field_validator("lora_target_modules")
    @classmethod
    def _modules(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("lora_target_modules must name at least one module, or be 'all-linear'")
        return v


class FullModuleKeys(Strict):
    """Modules trained in full beside the LoRA, and their learning rate."""

    lora_modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the LoRA, e.g. [embed_tokens, lm_head]")
    peft_use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by lora_alpha/sqrt(lora_r)")
    embedding_learning_rate: Optional[float] = Field(
        None, gt=0, le=1.0, description="Learning rate of lora_modules_to_save (Unsloth's name); default: learning_rate / 10")


class OptimizerKeys(Strict):
    """Batch, length and optimizer keys, by the trainer's names."""

    micro_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(3.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    lr_scheduler: Scheduler = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5)
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 42


class RunKeys(Strict):
    """Where a run writes, how often it saves and logs, and its name."""

    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (resume with --resume)")
    logging_steps: int = Field(5, ge=1)
    output_dir: str = "models/adapters"
    run_name: Optional[str] = None

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not RUN_NAME_RE.fullmatch(v) or ".." in v):
            raise ValueError(
                f"run_name {v!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')"
            )
        return v


class TrainConfig(LoraKeys, FullModuleKeys, OptimizerKeys, RunKeys):
    base_model: str = EMBEDDED_MODEL
    datasets: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(path="data/processed/train.jsonl")])
    test_datasets: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(path="data/processed/test.jsonl")])
    engine: Literal["auto", "unsloth", "hf"] = "auto"
    adapter: Literal["lora", "qlora"] = "lora"
    lora_model_dir: Optional[str] = Field(None, description="An adapter to go on training (e.g. a continued pre-training result)")
    after_cpt: Literal["merge", "continue"] = Field(
        "merge", description="When the cpt stage ran first: merge its adapter into the base and train a fresh LoRA, "
        "or continue training the CPT adapter")
    sequence_len: int = Field(256, ge=16, le=131_072)
    sample_packing: bool = False
    train_on_inputs: bool = False
    replay: Optional[str] = Field(
        "builtin",
        description="Against forgetting: general prompts ('builtin', or a JSON list file) answered by the base model "
        "itself and mixed into training; null to turn off",
    )
    replay_ratio: float = Field(0.2, ge=0.0, le=2.0, description="Replay examples per training example")
    num_epochs: float = Field(3.0, gt=0, description="Passes over data whose examples name no fact (not the forge's)")
    max_steps: Optional[int] = Field(None, ge=1, description="Overrides exposures_per_fact and num_epochs when set")
    min_steps: Optional[int] = Field(
        None, ge=1, description="With num_epochs: when it gives fewer optimizer steps, train this many"
    )
    exposures_per_fact: Optional[float] = Field(
        24.0, gt=0, le=10_000, description="Training length for the forge's data: how often each fact is seen, all its "
        "training wordings together (wordings x passes); null: num_epochs")
    time_budget_min: Optional[float] = Field(
        None, gt=0, le=1_000_000, description="Train at most this many minutes (estimated): fewer exposures, said at the start")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch"
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: picked by the hardware profile")
    gradient_checkpointing: Union[bool, Literal["auto"], float] = Field(
        "auto", description="auto (by hardware profile), true, false, or the share of decoder layers to checkpoint (0-1)"
    )
    eval_steps: Optional[int] = Field(None, ge=1, description="Evaluate on test_datasets every N steps; default: at the end")
    max_vram_gb: float = Field(22.0, gt=0, description="Hard VRAM cap on consumer GPUs (RTX 4090 safety)")
    wandb_project: Optional[str] = None
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None

    @field_validator("gradient_checkpointing")
    @classmethod
    def _share(cls, v):
        if isinstance(v, float) and not isinstance(v, bool) and not 0.0 <= v <= 1.0:
            raise ValueError("a share of layers must be between 0 and 1")
        return v


# --------------------------------------------------------------------------------------------------
# Continued pre-training (the training keys are TrainConfig's; the hardware keys come from train_config.yaml)
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Preference tuning (pairs from the instruction-tuned model's own wrong answers; TRL's key names)
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Eval
# --------------------------------------------------------------------------------------------------
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
    enabled: bool = Field(False, description="Also answer with the top_k passages of your documents in the prompt")
    top_k: int = Field(3, ge=1, le=20)


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
    promptfoo: Optional[str] = Field(None, description="promptfoo command; default: the workspace's or the tool's node_modules")


# --------------------------------------------------------------------------------------------------
# Export (llama.cpp's converter and quantizer; the type names are llama.cpp's)
# --------------------------------------------------------------------------------------------------
GGUF_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_m")


class VerifyConfig(Strict):
    enabled: bool = Field(True, description="The round-trip check (`opensem export --no-verify` skips it)")
    questions: int = Field(8, ge=1, le=1000, description="Golden questions each export answers")
    max_new_tokens: int = Field(48, ge=1, le=4096)
    min_exact: float = Field(0.75, ge=0.0, le=1.0, description="Unquantized: share of answers identical to the evaluated model's")
    min_agreement_unquantized: float = Field(4.5, ge=1.0, le=5.0)
    min_agreement_quantized: float = Field(3.0, ge=1.0, le=5.0, description="Quantized: mean agreement (offline scorer, 1-5)")


class ExportConfig(Strict):
    formats: list[str] = Field(
        default_factory=lambda: ["merged", "gguf", "ollama"],
        description="What `opensem export` writes: merged, gguf, ollama, lora-gguf, a plugin's, or package.module:Class")
    gguf_types: list[Literal[GGUF_TYPE_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["f16", "q4_k_m"], description="GGUF files: f16/bf16/f32/q8_0 from the converter, the rest quantized from f16")
    ollama_gguf: Optional[Literal[GGUF_TYPE_NAMES]] = Field(  # type: ignore[valid-type]
        None, description="The GGUF the Modelfile's FROM names (default: the smallest exported)")
    output_dir: str = "models/exports"
    verify: VerifyConfig = Field(default_factory=VerifyConfig)

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


# --------------------------------------------------------------------------------------------------
# Launch (SkyPilot's names where it has them: cloud, accelerators, num_nodes, idle_minutes_to_autostop)
# --------------------------------------------------------------------------------------------------
class LaunchConfig(Strict):
    cloud: Optional[str] = Field("runpod", description="runpod, aws, gcp, azure, lambda, kubernetes, ... (SkyPilot's names), or local")
    gpu: Optional[str] = Field("RTX4090:1", description="SkyPilot accelerators, e.g. RTX4090:1, A100-80GB:1 (null: CPU only)")
    nodes: int = Field(1, ge=1, le=64, description="More than 1: the hf engine's data-parallel training with torchrun across nodes")
    stages: Optional[list[str]] = Field(None, description="Stages to run remotely (default: pipeline_config.yaml's)")
    engine: Literal["auto", "unsloth", "hf"] = Field("unsloth", description="Training engine on the GPU (multi-node: hf)")
    max_hours: float = Field(2.0, gt=0, le=720, description="The job ends itself after this long; the budget is price x max_hours")
    max_cost_usd: Optional[float] = Field(None, gt=0, description="Refuse to launch when price x max_hours is above this")
    price_per_hour: Optional[float] = Field(None, gt=0, description="USD per hour for the whole cluster when the catalog has no price")
    idle_minutes: int = Field(10, ge=1, le=10_080, description="Autodown: the cluster is deleted after this long idle")
    region: Optional[str] = None
    use_spot: bool = False
    disk_size: int = Field(100, ge=20, le=65_536, description="GB")
    cluster_name: Optional[str] = Field(None, description="Lower-case letters, digits and '-', starting with a letter; "
                                        "default: opensem-<workspace folder>")
    secrets: list[str] = Field(default_factory=lambda: ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN", "WANDB_API_KEY"],
                               description="Environment variables passed by name when set here; their values are never written")
    sync_models: bool = Field(False, description="Also upload models/ (adapters, exports) already made here")
    sync_cache: bool = Field(False, description="Also upload .opensem/cache (teacher replies, answers) so the remote reuses them")

    @field_validator("secrets")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", x)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name (list names only, never values)")
        return v

    @field_validator("cluster_name")
    @classmethod
    def _cluster(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", v):
            raise ValueError(f"{v!r} is not a cluster name: lower-case letters, digits and '-', starting with a letter, at most 63 "
                             f"characters (it names a folder and a cloud cluster)")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        bad = [x for x in v or [] if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*(:[A-Za-z_][A-Za-z0-9_]*)?", x)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a stage name (a registered stage, or package.module:attribute)")
        return v


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------
class PipelineConfig(Strict):
    stages: list[str] = Field(
        default_factory=lambda: ["forge", "baseline", "train", "fine-tuned"],
        description="What `opensem run` runs, in order: forge, baseline, cpt, train, fine-tuned, pairs, preference, preferred, "
        "or package.module:attribute",
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one stage")
        bad = [x for x in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*(:[A-Za-z_][A-Za-z0-9_]*)?", x)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a stage name (a registered stage, or package.module:attribute)")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"stage(s) listed twice: {', '.join(dup)}")
        return v


@dataclass(frozen=True)
class Section:
    """One config file: its name (the first part of a ``--set`` key), its file in the workspace, its schema."""

    name: str
    file: str
    schema: type[BaseModel]


SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section("forge", "configs/forge_config.yaml", ForgeConfig),
    Section("train", "configs/train_config.yaml", TrainConfig),
    Section("eval", "configs/eval_config.yaml", EvalConfig),
    Section("cpt", "configs/cpt_config.yaml", CptConfig),
    Section("preference", "configs/preference_config.yaml", PreferenceConfig),
    Section("export", "configs/export_config.yaml", ExportConfig),
    Section("launch", "configs/launch_config.yaml", LaunchConfig),
    Section("pipeline", "configs/pipeline_config.yaml", PipelineConfig),
)}


def register_section(section: Section) -> None:
    """A stage's own config section (stages.py: ``config_section``): its file and ``--set`` keys become known."""
    known = SECTIONS.get(section.name)
    if known is not None and known != section:
        raise ConfigError(f"config section {section.name!r} is already {known.file} ({known.schema.__name__}): "
                          f"give the stage's section another name")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", section.name):
        raise ConfigError(f"config section {section.name!r}: use lower-case letters, digits and _ (it is a --set prefix)")
    SECTIONS[section.name] = section


# --------------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# --------------------------------------------------------------------------------------------------
def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at the place ``loc`` (the path to the unknown key) in the model tree."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = _model_in(ann)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}).keys())


def _model_in(ann: Any) -> Optional[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found:
            return found
    return None


def format_validation_error(err: ValidationError, file: str, model: type[BaseModel],
                            overrides: Optional[dict[tuple, str]] = None) -> str:
    """One line naming where the bad value came from: the file and key, or the --set flag that set it."""
    first = err.errors()[0]
    loc = tuple(first.get("loc", ()))
    for keys, text in (overrides or {}).items():
        if tuple(str(p) for p in loc[: len(keys)]) == keys:
            file = f"--set {text}"
            break
    key = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        candidates = _valid_keys(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), candidates, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(candidates)}"
        return f"{file}: unknown key '{key}': {hint}{more}"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{file}: key '{key}': {msg}{shown}{more}"


def parse_override(text: str) -> tuple[str, list[str], Any]:
    """``train.learning_rate=1e-4`` -> ("train", ["learning_rate"], 0.0001)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. train.learning_rate=1e-4")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"--set {text!r}: the key must start with one of {', '.join(SECTIONS)} (e.g. train.num_epochs=2)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {text[:60]!r}...: nested too deeply to be a config value") from None
    return parts[0], parts[1:], value


def _apply(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}): keep one", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    from opensem.encoding import read_text

    try:
        data = yaml.load(read_text(path), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from e
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config: a config is a few levels of keys") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


# Renamed keys, one line each: "section.old.path": "new.path" (a path inside the same section). A config file or --set that
# still uses the old name keeps working, with a warning naming the new one; the line goes two releases later. A key
# renamed in a schema gets its line here in the same change.
RENAMED_KEYS: dict[str, str] = {}


def _get(data: dict, keys: list[str]) -> tuple[bool, Any]:
    node: Any = data
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False, None
        node = node[k]
    return True, node


def _pop(data: dict, keys: list[str]) -> None:
    node = data
    for k in keys[:-1]:
        node = node[k]
    del node[keys[-1]]


def renamed(section: str, data: dict, where: str, warn: Callable[[str], None]) -> dict:
    """``data`` with every old key of ``section`` moved to its new name (RENAMED_KEYS); both set is an error."""
    for old, new in RENAMED_KEYS.items():
        sec, _, old_path = old.partition(".")
        if sec != section:
            continue
        found, value = _get(data, old_path.split("."))
        if not found:
            continue
        if _get(data, new.split("."))[0]:
            raise ConfigError(f"{where}: key '{old_path}' is the old name of '{new}', and both are set: keep '{new}' only")
        _pop(data, old_path.split("."))
        _apply(data, new.split("."), value)
        warn(f"{where}: key '{old_path}' is now '{new}': rename it (the old name will stop working)")
    return data


def renamed_path(section: str, keys: list[str], where: str, warn: Callable[[str], None]) -> list[str]:
    """A ``--set`` key path under its new name, when it (or a key above it) was renamed."""
    for old, new in RENAMED_KEYS.items():
        sec, _, old_path = old.partition(".")
        n = len(old_path.split("."))
        if sec == section and keys[:n] == old_path.split("."):
            warn(f"{where}: key '{old_path}' is now '{new}': use the new name (the old one will stop working)")
            return new.split(".") + keys[n:]
    return keys


_WARNED: set[str] = set()


def _warn(message: str) -> None:
    """Once per message and process (configs are read more than once by a command)."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    from opensem.terminal import Console

    Console(stderr=True).print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def load_section(section: str, root: Path, overrides: list[str] | None = None, path: Path | None = None):
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}: use one of {', '.join(SECTIONS)}, or a stage's own section "
                          f"(its stage in configs/pipeline_config.yaml)")
    rel, model = SECTIONS[section].file, SECTIONS[section].schema
    file = path or (root / rel)
    data = renamed(section, read_yaml(file), str(file), _warn)
    applied: dict[tuple, str] = {}
    for text in overrides or []:
        sec, keys, value = parse_override(text)
        if sec == section:
            keys = renamed_path(section, keys, f"--set {text}", _warn)
            _apply(data, keys, value)
            applied[tuple(keys)] = text
    try:
        return model.model_validate(data)
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to be a config: a config is a few levels of keys") from None
    except ValidationError as e:
        shown = file if file.exists() else f"{file} (defaults)"
        raise ConfigError(format_validation_error(e, str(shown), model, applied)) from None


def check_overrides(overrides: list[str] | None, root: Path | None = None) -> None:
    """Every ``--set`` well formed and naming a known section. A section no built-in has may be a stage's own: the
    workspace's pipeline stages are loaded first (which registers their sections) when ``root`` is given."""
    def section_of(text: str) -> str:
        return text.split("=", 1)[0].strip().split(".", 1)[0]

    if root is not None and any(section_of(t) not in SECTIONS for t in overrides or []):
        from opensem.stages import load_stage

        try:
            names = load_section("pipeline", root, [t for t in overrides or [] if section_of(t) == "pipeline"]).stages
        except ConfigError:
            names = []  # the pipeline config's own error comes when it is used
        for name in names:
            try:
                load_stage(name)
            except ConfigError:
                pass
    for text in overrides or []:
        parse_override(text)

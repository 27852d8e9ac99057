"""configs/train_config.yaml: the training kernel's schema, by Axolotl's key names, and the keys every training
recipe shares (LoRA, optimizer, run), composed into the cpt and preference schemas as mixins."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator

from opensem.config import EMBEDDED_MODEL, Strict
from opensem.workspace import PLAIN_NAME as RUN_NAME_RE  # the one rule for names that become paths


class DatasetSpec(Strict):
    path: str
    type: Literal["chat_template"] = "chat_template"
    field_messages: str = "conversations"


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


class RaftConfig(Strict):
    """RAFT (train/raft.py): train on the retrieval prompt, the source chunk among distractors."""

    enabled: bool = Field(False, description="Train on the judge's retrieval prompt (top_k of eval_config.yaml) for each forge example")
    p: float = Field(0.8, ge=0.0, le=1.0, description="RAFT's P: share of examples whose passages hold the source chunk; "
                     "the rest hold distractors only")


class DocumentsConfig(Strict):
    """Pre-instruction-tuning (train/documents.py): the documents trained too, after the QA pairs."""

    enabled: bool = Field(False, description="Train on the chunks of the documents as well (next-token loss on every "
                          "token), after the QA pairs (Jiang et al. 2024's pre-instruction-tuning)")
    passes: float = Field(10.0, gt=0, le=1000, description="How often each chunk of the documents is seen")
    after: float = Field(0.5, ge=0.0, lt=1.0, description="Share of the QA pairs' steps trained on them alone before "
                         "the documents join the rest of them")


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
    raft: RaftConfig = Field(default_factory=RaftConfig)
    documents: DocumentsConfig = Field(default_factory=DocumentsConfig)

    @field_validator("gradient_checkpointing")
    @classmethod
    def _share(cls, v):
        if isinstance(v, float) and not isinstance(v, bool) and not 0.0 <= v <= 1.0:
            raise ValueError("a share of layers must be between 0 and 1")
        return v

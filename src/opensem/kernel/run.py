"""The training kernel: the steps every training recipe shares (instruction tuning in train/recipe.py, continued
pre-training in cpt/recipe.py, preference tuning in prefs/recipe.py), each one function a recipe calls in order:

    Run               one run as set up: config, folder, rank, how to resume it
    load_profile      hardware profile and base model (engine chosen before: Unsloth first)
    seed_everything   the LoRA init draws from the global RNG: the same run whatever ran before
    load_model        model + LoRA (engine: unsloth | hf), per-layer activation checkpointing
    make_trainer      TRL's SFT trainer with the answer-only loss, checkpoints, wandb
    train             Ctrl-C saves a checkpoint; ``--resume`` continues from the last complete one
    write_adapter, finish   adapter, tokenizer and log into the run folder; manifest last, run marked complete

The engines (kernel/engines.py), hardware profiles (kernel/hardware.py), tokenised data (kernel/data.py) and the
step plan (kernel/plan.py) live beside it. The folder a run writes, and what it started from: opensem/adapters.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from opensem.adapters import CHECKPOINTS, MANIFEST, RUN_STATUS, TRAINING_LOG, last_checkpoint
from opensem.kernel.config import TrainConfig
from opensem.errors import ConfigError, OpenSEMError, StageInterrupted
from opensem.kernel import engines
from opensem.kernel.data import TokenizedSet
from opensem.kernel.hardware import apply_vram_cap, make_profile
from opensem.kernel.plan import StepPlan
from opensem.lineage import now, read_json, write_json
from opensem.workspace import Workspace

ADJ = "amber brisk calm deft eager fleet gentle hardy keen lucid merry noble quiet rapid sage steady swift vivid".split()
NOUN = "finch heron lark otter wren badger falcon marten osprey plover raven stoat swift tern vole wasp bee moth".split()


def default_run_name(cfg: TrainConfig) -> str:
    """Readable and unique: base model, date, two words (same on every rank of a torchrun job)."""
    seed = os.environ.get("TORCHELASTIC_RUN_ID") or f"{time.time_ns()}-{os.getpid()}"
    rng = random.Random(seed)
    base = Path(cfg.base_model.rstrip("/")).name.replace(".gguf", "").lower()[:32]
    stamp = time.strftime("%Y%m%d-%H%M") if "TORCHELASTIC_RUN_ID" not in os.environ else "ddp"
    return f"{base}-{stamp}-{rng.choice(ADJ)}-{rng.choice(NOUN)}"


@dataclass
class Run:
    """One training run as it is set up: who writes, what config, where, on what."""

    cfg: TrainConfig
    run_dir: Path
    main: bool
    world_size: int
    say: Callable[..., None]
    resume: bool = False
    resumed_from: Optional[str] = None
    engine: str = "hf"
    chain: Optional[dict] = None  # what this run starts from when it continues another (e.g. continued pre-training)
    plan: Optional[StepPlan] = None  # how long it trains (train/plan.py)
    resume_command: str = "opensem train --resume"


@dataclass
class Data:
    train: TokenizedSet
    test: Optional[TokenizedSet]
    replay: int
    files: list[dict]  # {"path", "sha256", "examples"} of every training file
    test_files: list[dict]
    facts: int = 0  # distinct facts the examples name (the forge's metadata.fact)
    fact_examples: int = 0  # examples that name one
    raft: Optional[dict] = None  # what RAFT made of the examples (train/raft.py), when it is on
    order: Optional[list] = None  # the whole run's rows in the recipe's order (one pass, no shuffling), if it sets one
    documents: Optional[dict] = None  # the documents trained beside the QA pairs (train/documents.py), when on



# hardware profile and base model -------------------------------------------------------------------------
def load_profile(ws: Workspace, run: Run, hw):
    import transformers

    from opensem.inference import context_length
    from opensem.models import resolve_base_model

    cfg = run.cfg
    base = resolve_base_model(cfg.base_model, ws.base_models_dir)
    mcfg = transformers.AutoConfig.from_pretrained(base.path)
    context = context_length(mcfg)
    if context and cfg.sequence_len > context:
        raise ConfigError(f"configs/train_config.yaml: key 'sequence_len': {cfg.sequence_len} is longer than the base model's "
                          f"context of {context} tokens: set it to {context} or less")
    n_params = param_count(mcfg)
    profile = make_profile(cfg, hw, n_params / 1e9, getattr(mcfg, "hidden_size", 0), getattr(mcfg, "num_hidden_layers", 0))
    run.say(f"hardware profile: {profile.describe()}")
    for note in profile.notes:
        run.say(f"  {note}")
    if hw.device == "cuda":
        apply_vram_cap(profile)
    return base, profile, n_params


# model + LoRA (engine: unsloth | hf) ----------------------------------------------------------------------------
def load_model(run: Run, base, profile, engine: str, hw):
    if engine == "unsloth":
        return engines.load_unsloth(base.path, run.cfg, profile.precision, profile.gradient_checkpointing)
    model, tok = engines.load_hf(base.path, run.cfg, profile.precision, hw.device)
    n_ckpt = engines.apply_checkpointing(model, profile.checkpoint_layers)
    if n_ckpt:
        run.say(f"gradient checkpointing on {n_ckpt} decoder layers")
    from opensem import onednn
    from opensem.kernel import lean

    lean.apply(model)  # the other layers keep fewer activations (MLP, norms: recomputed bit for bit; GQA attention)
    if hw.device == "cpu" and profile.precision == "fp32" and onednn.apply(model):
        run.say("linear layers: fp32 through oneDNN (exact here, and faster than the default)")
    return model, tok


# trainer: TRL SFT with our loss, checkpoints, wandb ---------------------------------------------------------------
def make_trainer(ws: Workspace, run: Run, profile, hw, model, tok, data: Data):
    from datasets import Dataset
    from trl import SFTConfig

    cfg = run.cfg
    report_to = setup_wandb(cfg, ws, run.main)
    emb_lr = engines.embedding_lr(cfg)
    args_cls, extra = SFTConfig, {}
    if run.engine == "unsloth" and emb_lr is not None:  # Unsloth's own embedding learning rate
        from unsloth import UnslothTrainingArguments

        args_cls, extra = UnslothTrainingArguments, {"embedding_learning_rate": emb_lr}
    args = args_cls(
        **extra,
        output_dir=str(run.run_dir / CHECKPOINTS),
        run_name=cfg.run_name,
        per_device_train_batch_size=profile.micro_batch_size,
        per_device_eval_batch_size=profile.micro_batch_size,
        gradient_accumulation_steps=profile.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=run.plan.steps if run.plan else (cfg.max_steps or -1),  # a run without a plan (cpt): its epochs
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optimizer,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if (cfg.eval_steps and data.test) else "no",
        eval_steps=cfg.eval_steps,
        prediction_loss_only=True,
        bf16=profile.precision == "bf16",
        fp16=profile.precision == "fp16",
        use_cpu=hw.device == "cpu",
        **no_trainer_checkpointing(args_cls),  # applied in load_model, per layer (hf); Unsloth applies its own
        max_length=cfg.sequence_len,
        packing=cfg.sample_packing,
        # batches of similar length (little padding), or the recipe's own order (already grouped by length)
        train_sampling_strategy="sequential" if data.order else "group_by_length",
        report_to=report_to,
        ddp_backend="gloo" if (run.world_size > 1 and hw.device == "cpu") else None,
        ddp_find_unused_parameters=False if run.world_size > 1 else None,
        dataloader_num_workers=0,
        disable_tqdm=not run.main,
    )
    trainer_cls = engines.make_trainer_class(run.engine, emb_lr)
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.order or data.train.rows),
        eval_dataset=Dataset.from_list(data.test.rows) if data.test and data.test.rows else None,
        processing_class=tok,
    )


def no_trainer_checkpointing(args_cls) -> dict:
    """The trainer's own activation checkpointing, off: `activation_checkpointing` in newer transformers,
    `gradient_checkpointing` before (the GPU set's)."""
    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"activation_checkpointing": False} if "activation_checkpointing" in names else {"gradient_checkpointing": False}


# train; Ctrl-C saves a checkpoint; --resume continues --------------------------------------------------------------
def train(run: Run, trainer, data: Data) -> tuple[float, Optional[float]]:
    resume_from = last_checkpoint(run.run_dir / CHECKPOINTS) if run.resume else None
    if resume_from:
        run.say(f"resuming from {resume_from}")
    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        if run.main:
            trainer._save_checkpoint(trainer.model, trial=None)
            write_json(run.run_dir / RUN_STATUS, read_json(run.run_dir / RUN_STATUS) | {"status": "interrupted", "step": trainer.state.global_step})
        raise StageInterrupted(
            f"training interrupted at step {trainer.state.global_step}: checkpoint saved in "
            f"{run.cfg.output_dir}/{run.cfg.run_name}/checkpoints; continue with `{run.resume_command}`"
        ) from None
    wall = time.time() - t0
    eval_loss = trainer.evaluate().get("eval_loss") if data.test and data.test.rows else None
    run.resumed_from = resume_from
    return wall, eval_loss


# adapter, log, manifest --------------------------------------------------------------------------------------------
def write_adapter(run: Run, trainer, tok) -> list[dict]:
    """Adapter, tokenizer and the trainer's log into the run folder; returns the log (one dict per logged step)."""
    trainer.model.save_pretrained(str(run.run_dir))
    tok.save_pretrained(str(run.run_dir))
    log = trainer.state.log_history
    (run.run_dir / TRAINING_LOG).write_text("".join(json.dumps(r) + "\n" for r in log))
    return log


def finish(run: Run, manifest: dict) -> None:
    """The manifest last, the run marked complete, the checkpoints gone."""
    write_json(run.run_dir / MANIFEST, manifest)
    write_json(run.run_dir / RUN_STATUS, read_json(run.run_dir / RUN_STATUS) | {"status": "complete", "finished": now()})
    shutil.rmtree(run.run_dir / CHECKPOINTS, ignore_errors=True)


# what a run derived from another config (continued pre-training, preference tuning) takes from train_config.yaml:
# one base model, one machine
HARDWARE_KEYS = ("base_model", "engine", "adapter", "optimizer", "max_grad_norm", "precision", "gradient_checkpointing",
                 "max_vram_gb", "wandb_project", "wandb_mode")


def derived_config(ws: Workspace, keys: dict, source: str, prefix: str) -> TrainConfig:
    """A TrainConfig of HARDWARE_KEYS from train_config.yaml and ``keys`` (from ``source``, for errors); a
    readable run name starting with ``prefix`` unless ``keys`` name one."""
    from pydantic import ValidationError

    from opensem.config import format_validation_error

    shared = {k: v for k, v in ws.train_config().model_dump().items() if k in HARDWARE_KEYS}
    try:
        cfg = TrainConfig.model_validate(shared | {"min_steps": None, "exposures_per_fact": None} | keys)  # their own epochs or steps
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, TrainConfig)) from None
    return cfg if cfg.run_name else with_values(cfg, run_name=f"{prefix}-" + default_run_name(cfg))


def with_values(cfg: TrainConfig, **values) -> TrainConfig:
    from pydantic import ValidationError

    from opensem.config import format_validation_error

    try:
        return TrainConfig.model_validate(cfg.model_dump() | values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "--run-name", TrainConfig)) from None


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs from ``seed`` (transformers' set_seed)."""
    from transformers import set_seed

    set_seed(seed)


def fmt(x) -> str:
    """A loss for a log line: three decimals, or n/a."""
    return "n/a" if x is None else f"{x:.3f}"


def param_count(mcfg) -> int:
    h = getattr(mcfg, "hidden_size", 0)
    layers = getattr(mcfg, "num_hidden_layers", 0)
    inter = getattr(mcfg, "intermediate_size", 4 * h)
    vocab = getattr(mcfg, "vocab_size", 0)
    return int(layers * (4 * h * h + 3 * h * inter) + vocab * h)


def setup_wandb(cfg: TrainConfig, ws: Workspace, main: bool) -> list[str]:
    if not cfg.wandb_project:
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise OpenSEMError("wandb_project is set but wandb is not installed: pip install 'opensem[tracking]'") from None
    os.environ["WANDB_PROJECT"] = cfg.wandb_project
    os.environ.setdefault("WANDB_DIR", str(ws.root))
    mode = cfg.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    if main and mode == "offline":
        print(f"wandb: offline mode (no WANDB_API_KEY); sync later with `wandb sync {ws.root}/wandb/offline-run-*`")
    return ["wandb"]

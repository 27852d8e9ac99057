"""The Training Floor recipe: one LoRA fine-tuning run, top to bottom, driven by configs/train_config.yaml.

``run_training`` reads as the run itself; each step below is one function:

    1. setup_run      config, run name and run folder      5. make_trainer  TRL SFTTrainer (answer-only loss),
    2. load_profile   hardware profile, base model                          checkpoints, wandb
       (engine choice first: Unsloth before transformers)   6. train         Ctrl-C saves a checkpoint; --resume
    3. load_model     model + LoRA (engine: unsloth | hf)   7. save          adapter, tokenizer, log, manifest
    4. load_data      every dataset, replay, answer mask                     -> models/adapters/{run} (rank 0)

The same entry point runs under ``torchrun --nproc_per_node N`` / ``accelerate launch`` (hf engine):
rank 0 writes the outputs; gloo is used on CPUs.
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


from opensem.config import TrainConfig
from opensem.errors import ConfigError, OpenSEMError, StageInterrupted
from opensem.lineage import file_sha256, json_sha256, now, read_json, versions, write_json
from opensem.terminal import Console
from opensem.train import engines
from opensem.train.data import TokenizedSet
from opensem.train.hardware import apply_vram_cap, check_adapter, detect_hardware, make_profile
from opensem.train.plan import StepPlan, gave_up_line, measured_speed, plan_steps
from opensem.train.stage import base_record, data_paths, is_resumable
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


def find_resumable(adapters: Path, name: Optional[str]) -> Path:
    cands = [adapters / name] if name else sorted(adapters.glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
    for d in cands:
        if is_resumable(d):
            return d
    raise OpenSEMError(f"--resume: no interrupted run with a checkpoint in {adapters}" + (f" named {name!r}" if name else ""))


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
class Chain:
    """Start instruction tuning from an earlier result: config overrides (base_model or lora_model_dir) and the
    record the manifest keeps (which result, how it was used)."""

    overrides: dict
    record: dict


def run_training(ws: Workspace, resume: bool = False, run_name: Optional[str] = None, console: Optional[Console] = None,
                 chain: Optional[Chain] = None) -> Path:
    """The whole run: setup -> data -> trainer -> train -> save. Returns the adapter folder."""
    console = console or Console(stderr=True)
    run = setup_run(ws, resume, run_name, console, chain)
    hw = detect_hardware()
    check_adapter(run.cfg, hw)  # before any model is loaded
    engine = run.engine = engines.choose_engine(run.cfg, console if run.main else Console(quiet=True))
    if engine == "unsloth":  # Unsloth must be imported before transformers / trl / peft
        if run.world_size > 1:
            raise OpenSEMError("multi-GPU data-parallel training uses the hf engine: set engine: hf in train_config.yaml")
        engines.import_unsloth_first()
    base, profile, n_params = load_profile(ws, run, hw)
    _seed(run.cfg.seed)  # the LoRA init draws from the global RNG: the same run whatever ran before in this process
    model, tok = load_model(run, base, profile, engine, hw)
    data = load_data(ws, run, base, tok)
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "run.json", {"status": "running", "started": now(), "config": run.cfg.model_dump(mode="json"),
                                              "engine": engine, "chain": run.chain})
    run.plan = plan_length(ws, run, profile, data)
    trainer = make_trainer(ws, run, profile, hw, model, tok, data)
    wall, eval_loss = train(run, trainer, data)
    if run.main:
        save(ws, run, trainer, tok, data, base, n_params, engine, profile, wall, eval_loss)
    return run.run_dir


# 1. config, run name and run folder ------------------------------------------------------------------------
def setup_run(ws: Workspace, resume: bool, run_name: Optional[str], console: Console, chain: Optional[Chain] = None) -> Run:
    rank, world_size = engines.world()
    main = rank == 0
    say = console.print if main else (lambda *a, **k: None)
    cfg = ws.train_config()
    if run_name is not None:
        cfg = _with(cfg, run_name=run_name)  # validates the name
    adapters = ws.output_path(cfg.output_dir, "train.output_dir")
    record = chain.record if chain else None
    if resume:
        run_dir = find_resumable(adapters, cfg.run_name)
        cfg = TrainConfig.model_validate(read_json(run_dir / "run.json")["config"])
        record = read_json(run_dir / "run.json").get("chain")
    else:
        if chain:
            cfg = _with(cfg, **chain.overrides)
            say(f"starting from {chain.record.get('stage', 'an earlier result')} {chain.record.get('run_name', '')} "
                f"({chain.record.get('mode')})")
        name = cfg.run_name or default_run_name(cfg)
        run_dir = adapters / name
        if main and run_dir.exists() and any(run_dir.iterdir()):
            raise OpenSEMError(
                f"{cfg.output_dir}/{name} already exists: choose another run_name, delete it, or use --resume to continue it"
            )
        cfg = _with(cfg, run_name=name)
    for spec, path in zip(cfg.datasets, data_paths(ws, cfg.datasets)):
        if not path.exists():
            raise OpenSEMError(f"{spec.path}: training data not found: run `opensem forge` first")
    return Run(cfg, run_dir, main, world_size, say, resume, chain=record)


# 2. hardware profile and base model ----------------------------------------------------------------------
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
    n_params = _param_count(mcfg)
    profile = make_profile(cfg, hw, n_params / 1e9, getattr(mcfg, "hidden_size", 0), getattr(mcfg, "num_hidden_layers", 0))
    run.say(f"hardware profile: {profile.describe()}")
    for note in profile.notes:
        run.say(f"  {note}")
    if hw.device == "cuda":
        apply_vram_cap(profile)
    return base, profile, n_params


# 3. model + LoRA (engine: unsloth | hf) -------------------------------------------------------------------------
def load_model(run: Run, base, profile, engine: str, hw):
    if engine == "unsloth":
        return engines.load_unsloth(base.path, run.cfg, profile.precision, profile.gradient_checkpointing)
    model, tok = engines.load_hf(base.path, run.cfg, profile.precision, hw.device)
    n_ckpt = engines.apply_checkpointing(model, profile.checkpoint_layers)
    if n_ckpt:
        run.say(f"gradient checkpointing on {n_ckpt} decoder layers")
    return model, tok


# 4. data: every dataset, replay, chat template and answer mask ---------------------------------------------------
@dataclass
class Data:
    train: TokenizedSet
    test: Optional[TokenizedSet]
    replay: int
    files: list[dict]  # {"path", "sha256", "examples"} of every training file
    test_files: list[dict]
    facts: int = 0  # distinct facts the examples name (the forge's metadata.fact)
    fact_examples: int = 0  # examples that name one


def load_data(ws: Workspace, run: Run, base, tok) -> Data:
    from opensem.train.data import build_replay, load_conversations, load_facts, tokenize_conversations

    cfg = run.cfg
    convs, files, facts = [], [], []
    for spec, path in zip(cfg.datasets, data_paths(ws, cfg.datasets)):
        part = load_conversations(path, spec.field_messages)
        convs += part
        facts += [f"{spec.path}\x00{f}" for f in load_facts(path) if f]
        files.append({"path": spec.path, "sha256": file_sha256(path), "examples": len(part)})
    # replay shows the untouched base model's own answers, also when training starts from a merged earlier result
    replay_base = base
    if run.chain and run.chain.get("mode") == "merge":
        from opensem.models import resolve_base_model

        replay_base = resolve_base_model(run.chain["base_model"]["name"], ws.base_models_dir)
    replay = build_replay(ws, cfg, replay_base, len(convs), run.say)  # same on every rank: greedy answers, cached
    train_set = tokenize_conversations(tok, convs + replay, cfg.sequence_len, cfg.train_on_inputs)
    test_convs, test_files = [], []
    for spec, path in zip(cfg.test_datasets, data_paths(ws, cfg.test_datasets)):
        if path.exists() and path.stat().st_size > 0:
            part = load_conversations(path, spec.field_messages)
            test_convs += part
            test_files.append({"path": spec.path, "sha256": file_sha256(path), "examples": len(part)})
    test_set = tokenize_conversations(tok, test_convs, cfg.sequence_len, cfg.train_on_inputs) if test_convs else None
    if not train_set.rows:
        raise OpenSEMError(f"{cfg.datasets[0].path}: no example has a trainable answer token within sequence_len={cfg.sequence_len}")
    run.say(
        f"data: {len(train_set.rows)} train examples ({len(replay)} of them replay, {train_set.tokens} tokens), "
        f"{len(test_set.rows) if test_set else 0} test; {train_set.truncated} truncated to {cfg.sequence_len} tokens, "
        f"{train_set.dropped_no_target} dropped with no answer token left"
    )
    return Data(train_set, test_set, len(replay), files, test_files, len(set(facts)), len(facts))


# 5. trainer: TRL SFT with our loss, checkpoints, wandb ------------------------------------------------------------
def make_trainer(ws: Workspace, run: Run, profile, hw, model, tok, data: Data):
    from datasets import Dataset
    from trl import SFTConfig

    cfg = run.cfg
    report_to = _setup_wandb(cfg, ws, run.main)
    emb_lr = engines.embedding_lr(cfg)
    args_cls, extra = SFTConfig, {}
    if run.engine == "unsloth" and emb_lr is not None:  # Unsloth's own embedding learning rate
        from unsloth import UnslothTrainingArguments

        args_cls, extra = UnslothTrainingArguments, {"embedding_learning_rate": emb_lr}
    args = args_cls(
        **extra,
        output_dir=str(run.run_dir / "checkpoints"),
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
        train_sampling_strategy="group_by_length",  # batches of similar length: little padding
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
        train_dataset=Dataset.from_list(data.train.rows),
        eval_dataset=Dataset.from_list(data.test.rows) if data.test and data.test.rows else None,
        processing_class=tok,
    )


def no_trainer_checkpointing(args_cls) -> dict:
    """The trainer's own activation checkpointing, off: `activation_checkpointing` in newer transformers,
    `gradient_checkpointing` before (the GPU set's)."""
    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"activation_checkpointing": False} if "activation_checkpointing" in names else {"gradient_checkpointing": False}


def plan_length(ws: Workspace, run: Run, profile, data: Data) -> StepPlan:
    """The run's optimizer steps, from exposures per fact (the forge's data), max_steps or num_epochs, within
    time_budget_min (train/plan.py)."""
    per_step = profile.micro_batch_size * profile.gradient_accumulation_steps * run.world_size
    speed, source = measured_speed(ws.path(run.cfg.output_dir), run.cfg.base_model, profile.hardware.get("device", "cpu"))
    plan = plan_steps(run.cfg, len(data.train.rows), data.facts, data.fact_examples, per_step, speed, source)
    run.say(f"training length: {plan.describe()}" + (f" (speed from {source})" if source and plan.est_seconds else ""))
    if plan.gave_up:
        run.say(f"[yellow]{gave_up_line(plan)}[/]")
    return plan


# 6. train; Ctrl-C saves a checkpoint; --resume continues -----------------------------------------------------------
def train(run: Run, trainer, data: Data) -> tuple[float, Optional[float]]:
    resume_from = engines.last_checkpoint(run.run_dir / "checkpoints") if run.resume else None
    if resume_from:
        run.say(f"resuming from {resume_from}")
    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        if run.main:
            trainer._save_checkpoint(trainer.model, trial=None)
            write_json(run.run_dir / "run.json", read_json(run.run_dir / "run.json") | {"status": "interrupted", "step": trainer.state.global_step})
        raise StageInterrupted(
            f"training interrupted at step {trainer.state.global_step}: checkpoint saved in "
            f"{run.cfg.output_dir}/{run.cfg.run_name}/checkpoints; continue with `{run.resume_command}`"
        ) from None
    wall = time.time() - t0
    eval_loss = trainer.evaluate().get("eval_loss") if data.test and data.test.rows else None
    run.resumed_from = resume_from
    return wall, eval_loss


# 7. adapter + tokenizer + log + manifest -> models/adapters/{run} (rank 0) -------------------------------------------
def save(ws: Workspace, run: Run, trainer, tok, data: Data, base, n_params: int, engine: str, profile, wall: float,
         eval_loss: Optional[float]) -> None:
    from opensem.forge.stage import manifest_for

    cfg = run.cfg
    log = write_adapter(run, trainer, tok)
    train_losses = [r["loss"] for r in log if "loss" in r]
    real_tokens = trainer.real_tokens * run.world_size
    forge_manifests = {a.sha256 for a in (manifest_for(ws, ws.path(f["path"])) for f in data.files) if a}
    manifest = {
        "stage": "train",
        "created": now(),
        "run_name": cfg.run_name,
        "engine": engine,
        "config": cfg.model_dump(mode="json"),
        "config_sha": json_sha256(cfg.model_dump(mode="json")),
        "data": {
            "train": {"files": data.files, "sha256": data.files[0]["sha256"] if len(data.files) == 1 else json_sha256(data.files),
                      "examples": len(data.train.rows), "tokens": data.train.tokens, "truncated": data.train.truncated,
                      "dropped_no_target": data.train.dropped_no_target},
            "test": {"files": data.test_files, "examples": len(data.test.rows)} if data.test else None,
            "forge_manifest_sha256": forge_manifests.pop() if len(forge_manifests) == 1 else sorted(forge_manifests) or None,
            "replay": {"source": cfg.replay, "examples": data.replay},
        },
        "base_model": base_record(base, run.run_dir, n_params),
        "chain": run.chain,
        "hardware": profile.hardware,
        "profile": {k: v for k, v in profile.__dict__.items() if k != "hardware"},
        "world_size": run.world_size,
        "seed": cfg.seed,
        "steps": trainer.state.global_step,
        "length": run.plan.record() if run.plan else None,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_loss,
        "wall_time_s": round(wall, 1),
        "real_tokens": real_tokens,
        "tokens_per_s": round(real_tokens / wall, 1) if wall > 0 else None,
        "versions": versions(),
        "resumed_from": run.resumed_from,
    }
    finish(run, manifest)
    run.say(
        f"adapter saved to {cfg.output_dir}/{cfg.run_name}  (steps {manifest['steps']}, train loss "
        f"{_fmt(manifest['first_train_loss'])} -> {_fmt(manifest['final_train_loss'])}, eval loss {_fmt(eval_loss)}, "
        f"{manifest['tokens_per_s']} tokens/s, {manifest['wall_time_s']} s)"
    )
    if "wandb" in (trainer.args.report_to or []):
        import wandb

        if wandb.run is not None:
            run.say(f"wandb run directory: {wandb.run.dir}")
            wandb.finish()


def write_adapter(run: Run, trainer, tok) -> list[dict]:
    """Adapter, tokenizer and the trainer's log into the run folder; returns the log (one dict per logged step)."""
    trainer.model.save_pretrained(str(run.run_dir))
    tok.save_pretrained(str(run.run_dir))
    log = trainer.state.log_history
    (run.run_dir / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return log


def finish(run: Run, manifest: dict) -> None:
    """The manifest last, the run marked complete, the checkpoints gone."""
    write_json(run.run_dir / "manifest.json", manifest)
    write_json(run.run_dir / "run.json", read_json(run.run_dir / "run.json") | {"status": "complete", "finished": now()})
    shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)


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
    return cfg if cfg.run_name else _with(cfg, run_name=f"{prefix}-" + default_run_name(cfg))


def _with(cfg: TrainConfig, **values) -> TrainConfig:
    from pydantic import ValidationError

    from opensem.config import format_validation_error

    try:
        return TrainConfig.model_validate(cfg.model_dump() | values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "--run-name", TrainConfig)) from None


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _param_count(mcfg) -> int:
    h = getattr(mcfg, "hidden_size", 0)
    layers = getattr(mcfg, "num_hidden_layers", 0)
    inter = getattr(mcfg, "intermediate_size", 4 * h)
    vocab = getattr(mcfg, "vocab_size", 0)
    return int(layers * (4 * h * h + 3 * h * inter) + vocab * h)


def _setup_wandb(cfg: TrainConfig, ws: Workspace, main: bool) -> list[str]:
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

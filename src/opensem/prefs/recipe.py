"""Preference tuning, top to bottom: preferences.jsonl + the instruction-tuned adapter -> models/preference/{run}.

    1. setup      preference_config.yaml's training keys over train_config.yaml's base, engine and hardware keys
    2. start      the instruction-tuned adapter merged into the model under it (once, in {adapter}/merged/);
                  a fresh LoRA goes on top, so the reference is that model itself: the LoRA switched off (DPO),
                  with no second copy of the weights; ORPO needs no reference
    3. data       prompt/chosen/rejected conversations (TRL's conversational format)
    4. trainer    TRL's DPOTrainer (``trl``) or ORPOTrainer (``trl.experimental.orpo``), their key names:
                  ``beta``, ``loss_type``, ``max_length``; on the unsloth engine Unsloth's PatchDPOTrainer first
    5. train      Ctrl-C saves a checkpoint; ``opensem prefer --resume`` continues
    6. save       adapter, tokenizer, training log, manifest.json (pairs hash, chain: base -> sft -> dpo/orpo)

The judge then answers with the merged instruction-tuned model under this adapter (the chain in its manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


from opensem.adapters import Chain, base_record, find_adapter, find_resumable
from opensem.kernel.config import TrainConfig
from opensem.prefs.config import PreferenceConfig
from opensem.errors import OpenSEMError
from opensem.kernel import engines
from opensem.kernel import run as kernel
from opensem.kernel.data import jsonl_records
from opensem.kernel.hardware import check_adapter, detect_hardware
from opensem.lineage import file_sha256, json_sha256, now, read_json, versions, write_json
from opensem.terminal import Console
from opensem.workspace import Workspace

def run_preference(ws: Workspace, sft_dir: Optional[Path] = None, resume: bool = False, run_name: Optional[str] = None,
                   console: Optional[Console] = None) -> Path:
    """The whole run on top of ``sft_dir`` (default: the latest instruction-tuned adapter). Returns the adapter folder."""
    console = console or Console(stderr=True)
    pcfg = ws.preference_config()
    run = setup(ws, pcfg, resume, run_name, console, sft_dir or find_adapter(ws, ws.train_config(), None))
    hw = detect_hardware()
    check_adapter(run.cfg, hw)
    engine = run.engine = engines.choose_engine(run.cfg, console if run.main else Console(quiet=True))
    if engine == "unsloth":
        if run.world_size > 1:
            raise OpenSEMError("multi-GPU data-parallel training uses the hf engine: set engine: hf in train_config.yaml")
        engines.import_unsloth_first()
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()
    base, profile, n_params = kernel.load_profile(ws, run, hw)
    kernel.seed_everything(run.cfg.seed)
    peft_config = None
    if engine == "unsloth":  # Unsloth's LoRA model goes to the trainer as it is
        model, tok = kernel.load_model(run, base, profile, engine, hw)
    else:  # the trainer puts the LoRA on, and uses the model with it switched off as the reference
        model, tok = engines.load_hf(base.path, run.cfg, profile.precision, hw.device, wrap=False)
        engines.apply_checkpointing(model, profile.checkpoint_layers)
        peft_config = engines.lora_config(run.cfg)
    pairs_path = ws.path(pcfg.pairs.output)
    rows = load_pairs(pairs_path)
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        status = read_json(run.run_dir / "run.json", {}) if resume else {}
        write_json(run.run_dir / "run.json", status | {"status": "running", "started": status.get("started", now()),
                                                       "config": run.cfg.model_dump(mode="json"), "engine": engine,
                                                       "stage": "preference", "chain": run.chain,
                                                       "preference": pcfg.model_dump(mode="json")})
    trainer = make_trainer(run, pcfg, profile, hw, model, tok, rows, peft_config)
    data = kernel.Data(None, None, 0, [{"path": pcfg.pairs.output, "sha256": file_sha256(pairs_path), "examples": len(rows)}], [])
    wall, _ = kernel.train(run, trainer, data)
    if run.main:
        save(ws, run, pcfg, trainer, tok, data, base, n_params, profile, wall)
    return run.run_dir


# 1-2. the run, starting from the merged instruction-tuned model ---------------------------------------------------------
def setup(ws: Workspace, pcfg: PreferenceConfig, resume: bool, run_name: Optional[str], console: Console,
          sft_dir: Path) -> kernel.Run:
    rank, world_size = engines.world()
    main = rank == 0
    say = console.print if main else (lambda *a, **k: None)
    out = ws.output_path(pcfg.output_dir, "preference.output_dir")
    if resume:
        run_dir = find_resumable(out, run_name or pcfg.run_name)
        rec = read_json(run_dir / "run.json")
        return kernel.Run(TrainConfig.model_validate(rec["config"]), run_dir, main, world_size, say, resume=True,
                          chain=rec.get("chain"), resume_command="opensem prefer --resume")
    chain = Chain.from_run(sft_dir, "merge")
    cfg = training_config(ws, pcfg, run_name, base_model=chain.overrides["base_model"])
    run_dir = out / cfg.run_name
    if main and run_dir.exists() and any(run_dir.iterdir()):
        raise OpenSEMError(f"{pcfg.output_dir}/{cfg.run_name} already exists: choose another run_name, delete it, "
                           f"or use `opensem prefer --resume` to continue it")
    say(f"preference tuning ({pcfg.method}) on top of {chain.record['run_name']}")
    return kernel.Run(cfg, run_dir, main, world_size, say, chain=chain.record, resume_command="opensem prefer --resume")


def training_config(ws: Workspace, pcfg: PreferenceConfig, run_name: Optional[str] = None, base_model: Optional[str] = None) -> TrainConfig:
    """train_config.yaml's base model and hardware keys, the rest from preference_config.yaml."""
    keys = pcfg.training_keys() | {"datasets": [], "test_datasets": [], "replay": None, "sequence_len": pcfg.max_length}
    if base_model:
        keys["base_model"] = base_model
    if run_name:
        keys["run_name"] = run_name
    return kernel.derived_config(ws, keys, "configs/preference_config.yaml", pcfg.method)


# 3. data ------------------------------------------------------------------------------------------------------------
def load_pairs(path: Path) -> list[dict]:
    if not path.exists():
        raise OpenSEMError(f"{path}: no preference pairs: run `opensem pairs` first")
    rows = []
    for n, rec in jsonl_records(path):
        if not all(isinstance(rec.get(k), list) and rec[k] for k in ("prompt", "chosen", "rejected")):
            raise OpenSEMError(f"{path}:{n}: a pair needs 'prompt', 'chosen' and 'rejected' lists of messages (TRL's format)")
        rows.append({k: rec[k] for k in ("prompt", "chosen", "rejected")})
    if not rows:
        raise OpenSEMError(f"{path}: the file has no preference pairs")
    return rows


# 4. trainer: TRL's DPO or ORPO, their key names -----------------------------------------------------------------------
def make_trainer(run: kernel.Run, pcfg: PreferenceConfig, profile, hw, model, tok, rows: list[dict], peft_config=None):
    from datasets import Dataset

    cfg = run.cfg
    common = dict(
        output_dir=str(run.run_dir / "checkpoints"), run_name=cfg.run_name,
        per_device_train_batch_size=profile.micro_batch_size, gradient_accumulation_steps=profile.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps or -1, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, optim=cfg.optimizer, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, bf16=profile.precision == "bf16",
        fp16=profile.precision == "fp16", use_cpu=hw.device == "cpu", report_to=[], max_length=pcfg.max_length,
        beta=pcfg.beta, dataloader_num_workers=0, disable_tqdm=not run.main,
        ddp_backend="gloo" if (run.world_size > 1 and hw.device == "cpu") else None,
    )
    if pcfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args, cls = DPOConfig(loss_type=[pcfg.loss_type], **common), DPOTrainer
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args, cls = ORPOConfig(**common), ORPOTrainer
    return cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config)


# 6. adapter + manifest ------------------------------------------------------------------------------------------------
def save(ws: Workspace, run: kernel.Run, pcfg: PreferenceConfig, trainer, tok, data: kernel.Data, base, n_params: int,
         profile, wall: float) -> None:
    cfg = run.cfg
    log = kernel.write_adapter(run, trainer, tok)
    margins = [r[k] for r in log for k in ("rewards/margins", "log_odds_ratio") if k in r]
    losses = [r["loss"] for r in log if "loss" in r]
    manifest = {
        "stage": "preference", "created": now(), "run_name": cfg.run_name, "engine": run.engine, "method": pcfg.method,
        "config": pcfg.model_dump(mode="json"), "training_config": cfg.model_dump(mode="json"),
        "config_sha": json_sha256(cfg.model_dump(mode="json")),
        "data": {"pairs": data.files},
        "base_model": base_record(base, run.run_dir, n_params),
        "chain": run.chain, "hardware": profile.hardware, "world_size": run.world_size, "seed": cfg.seed,
        "steps": trainer.state.global_step, "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "first_margin": margins[0] if margins else None, "final_margin": margins[-1] if margins else None,
        "wall_time_s": round(wall, 1), "versions": versions(), "resumed_from": run.resumed_from,
    }
    kernel.finish(run, manifest)
    run.say(f"{pcfg.method} adapter saved to {pcfg.output_dir}/{cfg.run_name}  (steps {manifest['steps']}, loss "
            f"{kernel.fmt(manifest['first_train_loss'])} -> {kernel.fmt(manifest['final_train_loss'])}, "
            f"{round(wall, 1)} s)")



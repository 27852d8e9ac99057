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

from pathlib import Path
from typing import Optional

from opensem.adapters import Chain, base_record, find_resumable
from opensem.kernel.config import TrainConfig
from opensem.errors import OpenSEMError
from opensem.kernel import engines
from opensem.kernel.hardware import check_adapter, detect_hardware
from opensem.kernel.plan import StepPlan, gave_up_line, measured_speed, plan_steps
from opensem.kernel.run import (Data, Run, default_run_name, finish, fmt, load_model, load_profile, make_trainer,
                                seed_everything, train, with_values, write_adapter)
from opensem.lineage import file_sha256, json_sha256, now, read_json, versions, write_json, written_by
from opensem.terminal import Console
from opensem.train.stage import data_paths
from opensem.workspace import Workspace

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
    seed_everything(run.cfg.seed)  # the LoRA init draws from the global RNG: the same run whatever ran before in this process
    model, tok = load_model(run, base, profile, engine, hw)
    data = load_data(ws, run, base, tok)
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "run.json", {"status": "running", "started": now(), "config": run.cfg.model_dump(mode="json"),
                                              "engine": engine, "chain": run.chain})
    run.plan = plan_length(ws, run, profile, data)
    if run.cfg.documents.enabled:  # pre-instruction-tuning: the documents after the QA pairs (train/documents.py)
        from opensem.train import documents

        data = documents.apply(ws, run, tok, data, profile.micro_batch_size * profile.gradient_accumulation_steps * run.world_size)
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
        cfg = with_values(cfg, run_name=run_name)  # validates the name
    adapters = ws.output_path(cfg.output_dir, "train.output_dir")
    record = chain.record if chain else None
    if resume:
        run_dir = find_resumable(adapters, cfg.run_name)
        cfg = TrainConfig.model_validate(read_json(run_dir / "run.json")["config"])
        record = read_json(run_dir / "run.json").get("chain")
    else:
        if chain:
            cfg = with_values(cfg, **chain.overrides)
            say(f"starting from {chain.record.get('stage', 'an earlier result')} {chain.record.get('run_name', '')} "
                f"({chain.record.get('mode')})")
        name = cfg.run_name or default_run_name(cfg)
        run_dir = adapters / name
        if main and run_dir.exists() and any(run_dir.iterdir()):
            raise OpenSEMError(
                f"{cfg.output_dir}/{name} already exists: choose another run_name, delete it, or use --resume to continue it"
            )
        cfg = with_values(cfg, run_name=name)
    for spec, path in zip(cfg.datasets, data_paths(ws, cfg.datasets)):
        if not path.exists():
            raise OpenSEMError(f"{spec.path}: training data not found: run `opensem forge` first")
    return Run(cfg, run_dir, main, world_size, say, resume, chain=record)


# 4. data: every dataset, replay, chat template and answer mask ---------------------------------------------------
def load_data(ws: Workspace, run: Run, base, tok) -> Data:
    from opensem.kernel.data import build_replay, load_conversations, load_facts, tokenize_conversations

    cfg = run.cfg
    convs, files, facts = [], [], []
    parts = [(path, load_conversations(path, spec.field_messages)) for spec, path in zip(cfg.datasets, data_paths(ws, cfg.datasets))]
    tests = [(path, load_conversations(path, spec.field_messages), spec.path)
             for spec, path in zip(cfg.test_datasets, data_paths(ws, cfg.test_datasets)) if path.exists() and path.stat().st_size > 0]
    raft = None
    if cfg.raft.enabled:  # every example on the retrieval prompt (train/raft.py); the test files alike
        from opensem.train import raft as raft_recipe

        done, raft = raft_recipe.apply(ws, cfg, parts + [(path, c) for path, c, _ in tests], run.say)
        parts = [(path, c) for (path, _), c in zip(parts, done[:len(parts)])]
        tests = [(path, c, shown) for (path, _, shown), c in zip(tests, done[len(parts):])]
        longest = tokenize_conversations(tok, convs_of(parts), cfg.sequence_len, cfg.train_on_inputs)
        if longest.truncated:
            raise OpenSEMError(f"configs/train_config.yaml: key 'sequence_len': {longest.truncated} RAFT examples are longer than "
                               f"{cfg.sequence_len} tokens with their passages (the longest {longest.longest}): set sequence_len "
                               f"to {-(-longest.longest // 256) * 256} or more")
    for spec, (path, part) in zip(cfg.datasets, parts):
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
    for path, part, shown in tests:
        test_convs += part
        test_files.append({"path": shown, "sha256": file_sha256(path), "examples": len(part)})
    test_set = tokenize_conversations(tok, test_convs, cfg.sequence_len, cfg.train_on_inputs) if test_convs else None
    if not train_set.rows:
        raise OpenSEMError(f"{cfg.datasets[0].path}: no example has a trainable answer token within sequence_len={cfg.sequence_len}")
    run.say(
        f"data: {len(train_set.rows)} train examples ({len(replay)} of them replay, {train_set.tokens} tokens), "
        f"{len(test_set.rows) if test_set else 0} test; {train_set.truncated} truncated to {cfg.sequence_len} tokens, "
        f"{train_set.dropped_no_target} dropped with no answer token left"
    )
    return Data(train_set, test_set, len(replay), files, test_files, len(set(facts)), len(facts), raft)


def convs_of(parts: list[tuple]) -> list[list[dict]]:
    return [c for part in parts for c in part[1]]


def plan_length(ws: Workspace, run: Run, profile, data: Data) -> StepPlan:
    """The run's optimizer steps, from exposures per fact (the forge's data), max_steps or num_epochs, within
    time_budget_min (kernel/plan.py)."""
    per_step = profile.micro_batch_size * profile.gradient_accumulation_steps * run.world_size
    speed, source = measured_speed(ws.path(run.cfg.output_dir), run.cfg.base_model, profile.hardware.get("device", "cpu"),
                                   data.train.tokens / max(1, len(data.train.rows)))
    plan = plan_steps(run.cfg, len(data.train.rows), data.facts, data.fact_examples, per_step, speed, source)
    run.say(f"training length: {plan.describe()}" + (f" (speed from {source})" if source and plan.est_seconds else ""))
    if plan.gave_up:
        run.say(f"[yellow]{gave_up_line(plan)}[/]")
    return plan


# 7. adapter + tokenizer + log + manifest -> models/adapters/{run} (rank 0) -------------------------------------------
def save(ws: Workspace, run: Run, trainer, tok, data: Data, base, n_params: int, engine: str, profile, wall: float,
         eval_loss: Optional[float]) -> None:
    cfg = run.cfg
    log = write_adapter(run, trainer, tok)
    train_losses = [r["loss"] for r in log if "loss" in r]
    real_tokens = trainer.real_tokens * run.world_size
    forge_manifests = {file_sha256(m) for m in (written_by(ws.path(f["path"])) for f in data.files) if m}
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
            "raft": data.raft,
            "documents": data.documents,
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
        f"{fmt(manifest['first_train_loss'])} -> {fmt(manifest['final_train_loss'])}, eval loss {fmt(eval_loss)}, "
        f"{manifest['tokens_per_s']} tokens/s, {manifest['wall_time_s']} s)"
    )
    if "wandb" in (trainer.args.report_to or []):
        import wandb

        if wandb.run is not None:
            run.say(f"wandb run directory: {wandb.run.dir}")
            wandb.finish()



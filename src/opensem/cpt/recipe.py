"""Continued pre-training, top to bottom: the raw documents (and rewrites) -> a LoRA adapter in models/cpt/{run}.

    1. setup      cpt_config.yaml's training keys over train_config.yaml (base model, engine, hardware keys)
    2. profile    hardware profile, base model                (the Training Floor's own steps)
    3. model      model + LoRA; with lora_modules_to_save, embed_tokens / lm_head trained in full at
                  embedding_learning_rate (an optimizer parameter group; UnslothTrainer on the unsloth engine)
    4. corpus     data/processed/cpt.jsonl (corpus.py), tokenized, an end-of-text token after each record,
                  packed into sequences of exactly ``sequence_len`` tokens; ``eval_share`` of them held out
    5. train      next-token loss on every token; perplexity on the held-out sequences (on the training
                  sequences when the corpus is too small to hold any out) before and after;
                  Ctrl-C saves a checkpoint, ``opensem cpt --resume`` continues
    6. save       adapter, tokenizer, training log, manifest.json (corpus hash and counts, perplexities, chain)

Instruction tuning then starts from this adapter (``after_cpt`` in train_config.yaml: merge or continue).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


from opensem.adapters import base_record, find_resumable
from opensem.cpt.config import CptConfig
from opensem.kernel.config import TrainConfig
from opensem.cpt.corpus import Corpus, build_corpus
from opensem.errors import OpenSEMError
from opensem.kernel import engines
from opensem.kernel import run as kernel
from opensem.kernel.data import TokenizedSet
from opensem.kernel.hardware import check_adapter, detect_hardware
from opensem.lineage import file_sha256, json_sha256, now, read_json, versions, write_json
from opensem.terminal import Console
from opensem.workspace import Workspace


def run_cpt(ws: Workspace, resume: bool = False, run_name: Optional[str] = None, console: Optional[Console] = None) -> Path:
    """The whole run. Returns the adapter folder."""
    console = console or Console(stderr=True)
    ccfg = ws.cpt_config()
    run = setup(ws, ccfg, resume, run_name, console)
    hw = detect_hardware()
    check_adapter(run.cfg, hw)
    engine = run.engine = engines.choose_engine(run.cfg, console if run.main else Console(quiet=True))
    if engine == "unsloth":
        if run.world_size > 1:
            raise OpenSEMError("multi-GPU data-parallel training uses the hf engine: set engine: hf in train_config.yaml")
        engines.import_unsloth_first()
    corpus = build_corpus(ws, ccfg, console if run.main else Console(quiet=True), cache_only=run.world_size > 1)
    base, profile, n_params = kernel.load_profile(ws, run, hw)
    kernel.seed_everything(run.cfg.seed)
    model, tok = kernel.load_model(run, base, profile, engine, hw)
    data = pack(corpus, tok, run.cfg.sequence_len, ccfg.eval_share, run)
    status = read_json(run.run_dir / "run.json", {}) if resume else {}
    trainer = kernel.make_trainer(ws, run, profile, hw, model, tok, data)
    before = status.get("eval_loss_before")
    if before is None and data.test:
        before = trainer.evaluate().get("eval_loss")
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "run.json", status | {"status": "running", "started": status.get("started", now()),
                                                       "config": run.cfg.model_dump(mode="json"), "engine": engine,
                                                       "stage": "cpt", "eval_loss_before": before})
    wall, after = kernel.train(run, trainer, data)
    if run.main:
        save(ws, run, ccfg, trainer, tok, corpus, data, base, n_params, profile, wall, before, after)
    return run.run_dir


# 1. the run: cpt_config.yaml's training keys over train_config.yaml ---------------------------------------------
def setup(ws: Workspace, ccfg: CptConfig, resume: bool, run_name: Optional[str], console: Console) -> kernel.Run:
    rank, world_size = engines.world()
    main = rank == 0
    say = console.print if main else (lambda *a, **k: None)
    out = ws.output_path(ccfg.output_dir, "cpt.output_dir")
    if resume:
        run_dir = find_resumable(out, run_name or ccfg.run_name)
        cfg = TrainConfig.model_validate(read_json(run_dir / "run.json")["config"])
        return kernel.Run(cfg, run_dir, main, world_size, say, resume=True, resume_command="opensem cpt --resume")
    cfg = training_config(ws, ccfg, run_name)
    run_dir = out / cfg.run_name
    if main and run_dir.exists() and any(run_dir.iterdir()):
        raise OpenSEMError(f"{ccfg.output_dir}/{cfg.run_name} already exists: choose another run_name, delete it, "
                           f"or use `opensem cpt --resume` to continue it")
    return kernel.Run(cfg, run_dir, main, world_size, say, resume_command="opensem cpt --resume")


def training_config(ws: Workspace, ccfg: CptConfig, run_name: Optional[str] = None) -> TrainConfig:
    """The TrainConfig of a CPT run: train_config.yaml's base model and hardware keys, the rest from cpt_config.yaml."""
    keys = ccfg.training_keys() | {"datasets": [], "test_datasets": [], "replay": None, "train_on_inputs": True}
    if run_name:
        keys["run_name"] = run_name
    return kernel.derived_config(ws, keys, "configs/cpt_config.yaml", "cpt")


# 4. the corpus, packed ---------------------------------------------------------------------------------------------
def pack(corpus: Corpus, tok, sequence_len: int, eval_share: float, run: kernel.Run) -> kernel.Data:
    """Every record's tokens and an end-of-text token, end to end, cut into sequences of ``sequence_len``.

    Held out for perplexity: evenly spaced sequences, ``eval_share`` of them (none when there are fewer than 5:
    the perplexity is then measured on the training sequences themselves)."""
    eos = tok.eos_token_id
    stream: list[int] = []
    for r in corpus.records:
        stream += tok(r["text"], add_special_tokens=False)["input_ids"] + [eos]
    blocks = [stream[i:i + sequence_len] for i in range(0, len(stream), sequence_len)]
    blocks = [b for b in blocks if len(b) >= min(32, sequence_len)]  # a short tail teaches little
    if not blocks:
        raise OpenSEMError(f"{corpus.path}: the corpus has no text to train on")
    n_eval = int(len(blocks) * eval_share) if len(blocks) >= 5 else 0
    every = len(blocks) / n_eval if n_eval else 0
    held = {int(i * every + every / 2) for i in range(n_eval)}
    rows = lambda idx: [{"input_ids": blocks[i], "assistant_masks": [1] * len(blocks[i])} for i in idx]  # noqa: E731
    train = TokenizedSet(rows([i for i in range(len(blocks)) if i not in held]), 0, 0)
    test = TokenizedSet(rows(sorted(held)), 0, 0) if held else train
    files = [{"path": str(corpus.path), "sha256": file_sha256(corpus.path), "examples": len(corpus.records)}]
    run.say(f"corpus: {len(corpus.records)} records ({_kinds(corpus)}), {len(stream)} tokens -> {len(train.rows)} "
            f"sequences of {sequence_len} tokens to train on, {len(held)} held out")
    return kernel.Data(train, test, 0, files, [])


# 6. adapter + manifest -> models/cpt/{run} -----------------------------------------------------------------------------
def save(ws: Workspace, run: kernel.Run, ccfg: CptConfig, trainer, tok, corpus: Corpus, data: kernel.Data, base,
         n_params: int, profile, wall: float, before: Optional[float], after: Optional[float]) -> None:
    cfg = run.cfg
    log = kernel.write_adapter(run, trainer, tok)
    losses = [r["loss"] for r in log if "loss" in r]
    real_tokens = trainer.real_tokens * run.world_size
    manifest = {
        "stage": "cpt",
        "created": now(),
        "run_name": cfg.run_name,
        "engine": run.engine,
        "config": ccfg.model_dump(mode="json"),
        "training_config": cfg.model_dump(mode="json"),
        "config_sha": json_sha256(cfg.model_dump(mode="json")),
        "corpus": {"path": ccfg.corpus, "sha256": file_sha256(corpus.path), "records": corpus.counts,
                   "inputs": corpus.inputs, "rewrite_cost": corpus.cost, "stopped": corpus.stop,
                   "sequences": {"train": len(data.train.rows), "held_out": _held_out(data)},
                   "tokens": data.train.tokens},
        "base_model": base_record(base, run.run_dir, n_params),
        "hardware": profile.hardware,
        "world_size": run.world_size,
        "seed": cfg.seed,
        "steps": trainer.state.global_step,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "eval_loss_before": before,
        "eval_loss": after,
        "perplexity_on": "held-out sequences" if _held_out(data) else "the training sequences (too few to hold any out)",
        "perplexity_before": _ppl(before),
        "perplexity_after": _ppl(after),
        "wall_time_s": round(wall, 1),
        "real_tokens": real_tokens,
        "tokens_per_s": round(real_tokens / wall, 1) if wall > 0 else None,
        "versions": versions(),
        "resumed_from": run.resumed_from,
    }
    kernel.finish(run, manifest)
    ppl = (f", {'held-out' if _held_out(data) else 'training-text'} perplexity {manifest['perplexity_before']} -> "
           f"{manifest['perplexity_after']}" if after is not None else "")
    run.say(f"cpt adapter saved to {ccfg.output_dir}/{cfg.run_name}  (steps {manifest['steps']}, train loss "
            f"{kernel.fmt(manifest['first_train_loss'])} -> {kernel.fmt(manifest['final_train_loss'])}{ppl}, "
            f"{manifest['tokens_per_s']} tokens/s, {manifest['wall_time_s']} s)")


def _held_out(data: kernel.Data) -> int:
    return 0 if data.test is data.train else len(data.test.rows)


def _ppl(loss: Optional[float]) -> Optional[float]:
    return round(math.exp(loss), 2) if loss is not None else None


def _kinds(corpus: Corpus) -> str:
    return ", ".join(f"{n} {k}" for k, n in corpus.counts.items() if k in ("raw", "paraphrase", "explain", "entities"))



"""The Data Forge stage: data/raw -> data/processed/{train,test}.jsonl + forge_manifest.json.

Read top to bottom: ingest -> chunk -> plan teacher calls -> (dry run: print plan) -> call the teacher
through the reply cache -> parse -> quality gates -> split by chunk -> write atomically -> manifest.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from opensem.config import ForgeConfig
from opensem.errors import OpenSEMError, StageInterrupted
from opensem.forge.documents import Chunk, chunk_document, count_tokens, read_documents
from opensem.forge.quality import REASONS, Gate, Pair, split_by_chunk
from opensem.forge.synthesis import (
    PAIRS_SCHEMA,
    PROMPT_VERSION,
    clean_question,
    passage_messages,
    sentence_messages,
    source_sentences,
)
from opensem.golden import load_golden
from opensem.lineage import atomic_write_text, file_sha256, json_sha256, now, versions, write_json
from opensem.llm import CachedProvider, LLMError, LLMReply, get_provider
from opensem.progress import stage_progress
from opensem.workspace import Workspace


@dataclass
class Request:
    chunk: Chunk
    messages: list[dict]
    schema: Optional[dict]
    temperature: float
    max_tokens: int
    variant: int = 0
    answer: Optional[str] = None  # sentence strategy: the answer is the source text
    reply: Optional[LLMReply] = None
    error: Optional[str] = None


@dataclass
class Costs:
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    new_usd: float = 0.0  # spent in this run (cached replies were paid for before)
    calls: int = 0
    cached: int = 0

    def add(self, reply: LLMReply, price) -> None:
        self.input_tokens += reply.input_tokens
        self.output_tokens += reply.output_tokens
        usd = 0.0
        if price is not None:
            usd = reply.input_tokens / 1e6 * price.input_per_mtok + reply.output_tokens / 1e6 * price.output_per_mtok
        self.usd += usd
        if reply.cached:
            self.cached += 1
        else:
            self.calls += 1
            self.new_usd += usd


def _strategy(cfg: ForgeConfig) -> str:
    if cfg.generation.strategy != "auto":
        return cfg.generation.strategy
    return "sentence" if cfg.teacher.provider == "local" else "passage"


def plan_requests(chunks: list[Chunk], cfg: ForgeConfig) -> list[Request]:
    t = cfg.teacher
    reqs: list[Request] = []
    if _strategy(cfg) == "passage":
        for c in chunks:
            reqs.append(Request(c, passage_messages(c, cfg.generation.pairs_per_chunk), PAIRS_SCHEMA, t.temperature, t.max_tokens))
        return reqs
    k = cfg.generation.questions_per_sentence
    for c in chunks:
        budget = cfg.generation.pairs_per_chunk
        for s in source_sentences(c):
            for v in range(k):
                if budget <= 0:
                    break
                # variant 0 is greedy; the others sample, so each fact gets several wordings
                temp = 0.0 if v == 0 else max(t.temperature, 0.3)
                reqs.append(Request(c, sentence_messages(c.heading, s.prompt_sentence), None, temp, 48, v, answer=s.text))
                budget -= 1
    return reqs


def _execute(reqs: list[Request], cached: CachedProvider, cfg: ForgeConfig, costs: Costs, progress) -> Optional[str]:
    """Fill in every request's reply (cache first). Returns a stop reason, or None when all ran."""
    price = cfg.cost.price_for(cached.provider.model) if cfg.teacher.provider in ("openai", "anthropic", "openai-compatible") else None
    budget = cfg.cost.max_cost_usd
    todo: list[Request] = []
    for r in reqs:
        hit = cached.get(cached.key(r.messages, r.schema, r.temperature, r.max_tokens, r.variant))
        if hit is not None:
            r.reply = hit
            costs.add(hit, price)
            progress(1)
        else:
            todo.append(r)
    if not todo:
        return None
    provider = cached.provider
    if cfg.teacher.provider == "local":  # one model in this process: batch the prompts
        by_params: dict[tuple, list[Request]] = {}
        for r in todo:
            by_params.setdefault((r.temperature, r.variant, r.max_tokens), []).append(r)
        for (temp, variant, max_tokens), group in by_params.items():
            for i in range(0, len(group), 64):
                part = group[i : i + 64]
                replies = provider.complete_batch([r.messages for r in part], temp, max_tokens, seed=variant * 1000 + i)
                for r, rep in zip(part, replies):
                    cached.put(cached.key(r.messages, r.schema, r.temperature, r.max_tokens, r.variant), r.messages, rep)
                    r.reply = rep
                    costs.add(rep, None)
                progress(len(part))
        return None

    def one(r: Request) -> Request:
        try:
            r.reply = cached.complete(r.messages, r.schema, r.temperature, r.max_tokens, r.variant)
        except LLMError as e:
            r.error = str(e)
        return r

    stop: Optional[str] = None
    pool = ThreadPoolExecutor(max_workers=cfg.teacher.concurrency)
    pending: set = set()
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < cfg.teacher.concurrency and stop is None:
                if budget is not None and costs.new_usd >= budget:
                    stop = f"max_cost_usd {budget} reached"
                    break
                pending.add(pool.submit(one, queue.pop(0)))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                r = fut.result()
                if r.reply is not None:
                    costs.add(r.reply, price)
                progress(1)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return stop


def _parse(reqs: list[Request], strategy: str, teacher: str) -> tuple[list[Pair], int, int]:
    pairs: list[Pair] = []
    malformed = failed = 0
    for r in reqs:
        if r.reply is None:
            failed += r.error is not None
            continue
        meta = {"teacher": teacher, "prompt_version": PROMPT_VERSION}
        if strategy == "sentence":
            q = clean_question(r.reply.text)
            pairs.append(Pair(q, r.answer or "", r.chunk.id, r.chunk.sha, r.chunk.doc, dict(meta)))
            continue
        data = r.reply.data
        items = data.get("pairs") if isinstance(data, dict) else data if isinstance(data, list) else None
        if not isinstance(items, list):
            malformed += 1
            continue
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("question"), str) or not isinstance(it.get("answer"), str):
                malformed += 1
                continue
            pairs.append(Pair(it["question"].strip(), it["answer"].strip(), r.chunk.id, r.chunk.sha, r.chunk.doc, dict(meta)))
    return pairs, malformed, failed


def to_record(p: Pair, fmt: str, system: Optional[str]) -> dict:
    meta = {
        "source": p.source,
        "chunk_id": p.chunk_id,
        "chunk_sha": p.chunk_sha,
        "teacher": p.meta.get("teacher", ""),
        "prompt_version": p.meta.get("prompt_version", ""),
    }
    if fmt == "messages":
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p.question},
            {"role": "assistant", "content": p.answer},
        ]
        return {"messages": msgs, "metadata": meta}
    conv = ([{"from": "system", "value": system}] if system else []) + [
        {"from": "human", "value": p.question},
        {"from": "gpt", "value": p.answer},
    ]
    return {"conversations": conv, "metadata": meta}


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def run_forge(ws: Workspace, dry_run: bool = False, console: Optional[Console] = None) -> dict:
    console = console or Console(stderr=True)
    cfg = ws.forge_config()
    t0 = time.time()
    input_dir, out_dir = ws.path(cfg.input_dir), ws.path(cfg.output_dir)

    docs, skipped = read_documents(input_dir)
    for s in skipped:
        console.print(f"[yellow]skipped[/] {cfg.input_dir}/{s.path}: {s.reason}")
    if not docs:
        raise OpenSEMError(
            f"{cfg.input_dir}: no readable .txt, .md or .pdf documents: put your documents there "
            f"(or run `opensem init --example product-manual` for the example)"
        )
    chunks = [c for d in docs for c in chunk_document(d, cfg.chunking.chunk_tokens, cfg.chunking.overlap_tokens)]
    golden = load_golden(ws.path(cfg.golden_set), required=False)
    strategy = _strategy(cfg)
    reqs = plan_requests(chunks, cfg)
    teacher_id = f"{cfg.teacher.provider}/{cfg.teacher.resolved_model()}"

    if dry_run:
        return _print_plan(console, cfg, docs, chunks, reqs, strategy, teacher_id)

    provider = get_provider(cfg.teacher, models_dir=ws.base_models_dir)
    cached = CachedProvider(provider, ws.state_dir / "cache" / "teacher")
    costs = Costs()
    with stage_progress(console, f"forge ({teacher_id})", len(reqs)) as advance:
        try:
            stop = _execute(reqs, cached, cfg, costs, advance)
        except KeyboardInterrupt:
            done = sum(r.reply is not None for r in reqs)
            raise StageInterrupted(
                f"forge interrupted: {done} of {len(reqs)} teacher replies are saved in the cache; "
                f"run `opensem forge` again to continue without paying for them twice"
            ) from None

    pairs, malformed, failed = _parse(reqs, strategy, teacher_id)
    gate = Gate(cfg.quality, [g.question for g in golden])
    gate.rejected["malformed"] += malformed
    kept = gate.filter(pairs, {c.id: c.text for c in chunks})
    train, test = split_by_chunk(kept, cfg.output.test_ratio, cfg.output.seed)
    sys_prompt = cfg.generation.system_prompt
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", [to_record(p, cfg.output.format, sys_prompt) for p in train])
    write_jsonl(out_dir / "test.jsonl", [to_record(p, cfg.output.format, sys_prompt) for p in test])

    failed_chunks = sorted({r.chunk.id for r in reqs if r.error})
    manifest = {
        "stage": "forge",
        "created": now(),
        "status": "stopped: " + stop if stop else "complete",
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "config_sha": json_sha256(cfg.model_dump(mode="json")),
        "teacher": {"provider": cfg.teacher.provider, "model": provider.model, "base_url": cfg.teacher.base_url},
        "strategy": strategy,
        "prompt_version": PROMPT_VERSION,
        "inputs": [{"path": d.path, "sha256": d.sha} for d in docs],
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "golden_set": {"path": cfg.golden_set, "questions": len(golden)},
        "counts": {
            "files": len(docs),
            "chunks": len(chunks),
            "requests": len(reqs),
            "pairs_made": len(pairs) + malformed,
            "kept": len(kept),
            "train": len(train),
            "test": len(test),
            "failed_requests": failed,
            "rejected": {r: gate.rejected.get(r, 0) for r in REASONS},
        },
        "rejected_examples": dict(gate.examples),
        "failed_chunks": failed_chunks,
        "cost": {
            "input_tokens": costs.input_tokens,
            "output_tokens": costs.output_tokens,
            "usd_total": round(costs.usd, 6),
            "usd_this_run": round(costs.new_usd, 6),
            "calls_made": costs.calls,
            "calls_from_cache": costs.cached,
            "price_known": cfg.teacher.provider == "local" or cfg.cost.price_for(provider.model) is not None,
        },
        "outputs": {
            "train": {"path": "train.jsonl", "sha256": file_sha256(out_dir / "train.jsonl")},
            "test": {"path": "test.jsonl", "sha256": file_sha256(out_dir / "test.jsonl")},
        },
        "versions": versions("opensem", "openai", "anthropic", "transformers"),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json(out_dir / "forge_manifest.json", manifest)
    _print_summary(console, manifest)
    if failed_chunks:
        console.print(f"[yellow]{len(failed_chunks)} chunk(s) had failed teacher calls[/]: {', '.join(failed_chunks[:5])}; rerun to retry them")
    if stop:
        console.print(f"[yellow]stopped early[/]: {stop}; everything made so far is kept; raise the limit and rerun to continue")
    if not train:
        raise OpenSEMError(
            f"forge kept no training pairs (of {len(pairs)} made): see rejected counts in {cfg.output_dir}/forge_manifest.json"
        )
    return manifest


def _estimate_tokens(r: Request) -> tuple[int, int]:
    inp = sum(count_tokens(m["content"]) for m in r.messages) * 4 // 3
    out = min(r.max_tokens, 120 if r.schema is None else 360)  # a question; or a JSON list of pairs
    return inp, out


def _print_plan(console, cfg, docs, chunks, reqs, strategy, teacher_id) -> dict:
    tin = tout = 0
    for r in reqs:
        i, o = _estimate_tokens(r)
        tin += i
        tout += o
    price = cfg.cost.price_for(cfg.teacher.resolved_model())
    usd = None if price is None else tin / 1e6 * price.input_per_mtok + tout / 1e6 * price.output_per_mtok
    if cfg.teacher.provider == "local":
        usd = 0.0
    table = Table(title=f"forge plan (dry run, nothing called) - teacher {teacher_id}, strategy {strategy}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for k, v in [
        ("files", len(docs)),
        ("chunks", len(chunks)),
        ("teacher calls", len(reqs)),
        ("est. input tokens", tin),
        ("est. output tokens", tout),
        ("est. cost (USD)", "unknown price" if usd is None else f"{usd:.4f}"),
    ]:
        table.add_row(k, str(v))
    console.print(table)
    for d in docs:
        n = sum(c.doc == d.path for c in chunks)
        console.print(f"  {cfg.input_dir}/{d.path}: {n} chunk(s)")
    return {"dry_run": True, "files": len(docs), "chunks": len(chunks), "calls": len(reqs),
            "est_input_tokens": tin, "est_output_tokens": tout, "est_usd": usd}


def _print_summary(console: Console, m: dict) -> None:
    c, cost = m["counts"], m["cost"]
    table = Table(title="forge summary")
    table.add_column("item")
    table.add_column("value", justify="right")
    rows = [
        ("files", c["files"]),
        ("chunks", c["chunks"]),
        ("teacher requests", c["requests"]),
        ("pairs made", c["pairs_made"]),
        ("kept", f"{c['kept']} (train {c['train']}, test {c['test']})"),
    ]
    rows += [(f"rejected: {k}", v) for k, v in c["rejected"].items() if v]
    rows += [
        ("calls made / from cache", f"{cost['calls_made']} / {cost['calls_from_cache']}"),
        ("tokens in / out", f"{cost['input_tokens']} / {cost['output_tokens']}"),
        ("cost USD (this run / total)", f"{cost['usd_this_run']:.4f} / {cost['usd_total']:.4f}" if cost["price_known"] else "unknown price"),
        ("wall time", f"{m['wall_time_s']} s"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)

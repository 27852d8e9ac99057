"""The continued pre-training corpus: data/raw -> data/processed/cpt.jsonl, one {"text", "source", "kind"} per line.

The documents are read and chunked by the forge's own ingest (one ingest, not two), without overlap: each
chunk, under its section heading, is one ``raw`` record. With ``augment.enabled`` the forge's teacher
rewrites every chunk in each of ``augment.kinds`` ways (synthetic continued pre-training: a fact seen in
several wordings is learned, one seen once is not):

    paraphrase   the same facts in new sentences
    explain      an explanation for a newcomer, with no questions and answers
    entities     each named thing in the passage, what it is, and how it relates to the others

The calls go through the reply cache and the forge's budget (``cost`` in forge_config.yaml): a rerun or a
run resumed after Ctrl-C pays for nothing twice; ``opensem cpt --dry-run`` prints the calls and their cost.
A rewrite that mostly says things the passage does not is dropped (the forge's grounding measure).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from opensem.cpt.config import CptConfig
from opensem.forge.config import ForgeConfig
from opensem.errors import OpenSEMError, StageInterrupted
from opensem.forge.documents import Chunk, chunk_document
from opensem.forge.quality import grounding
from opensem.lineage import atomic_write_text
from opensem.llm import CachedProvider, Call
from opensem.llm.cost import Budget, Costs
from opensem.progress import stage_progress
from opensem.terminal import Console
from opensem.workspace import Workspace

PROMPT_VERSION = "cpt-rewrite-v1"
MIN_GROUNDING = 0.5  # share of a rewrite's content words found in its passage

REWRITE_PROMPTS = {
    "paraphrase": "Rewrite the passage below in your own words. Keep every fact, name and number exactly; "
                  "change the sentences. Write plain prose, no lists, no preamble.",
    "explain": "Explain the passage below to a newcomer to this subject, in plain prose. Keep every fact, name and "
               "number exactly and add nothing that the passage does not say. Do not write questions or answers.",
    "entities": "List each named thing in the passage below (product, part, place, person, setting, number with its "
                "unit). For each write one or two sentences: what it is, and how it relates to the other things "
                "named, using only what the passage says.",
}


@dataclass
class Corpus:
    path: Path
    records: list[dict]
    counts: dict = field(default_factory=dict)  # records per kind, rewrites dropped and failed, calls
    cost: dict = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)  # the documents: path and sha256
    stop: Optional[str] = None


def chunks(ws: Workspace, fcfg: ForgeConfig, console: Console) -> tuple[list, list[Chunk]]:
    from opensem.forge.documents import ingest

    docs, _, _ = ingest(ws, fcfg, console)
    return docs, [c for d in docs for c in chunk_document(d, fcfg.chunking.chunk_tokens, 0)]


def raw_text(c: Chunk) -> str:
    return f"{c.heading}\n\n{c.text}" if c.heading and not c.text.startswith(c.heading) else c.text


def rewrite_calls(chunk_list: list[Chunk], cfg: CptConfig, fcfg: ForgeConfig) -> list[Call]:
    calls = []
    for c in chunk_list:
        for kind in cfg.augment.kinds:
            msgs = [{"role": "system", "content": REWRITE_PROMPTS[kind]},
                    {"role": "user", "content": raw_text(c)}]
            calls.append(Call(msgs, None, fcfg.teacher.temperature, cfg.augment.max_tokens, tag=(c, kind)))
    return calls


def build_corpus(ws: Workspace, cfg: CptConfig, console: Console, dry_run: bool = False,
                 cache_only: bool = False) -> Optional[Corpus]:
    """Write the corpus (atomically) and return it; with ``dry_run`` print the teacher calls it would make.
    ``cache_only`` (each rank of a data-parallel job): every rewrite must already be in the reply cache."""
    from opensem.forge.teacher import prompt_counter, teacher_price

    fcfg = ws.forge_config()
    out = ws.output_path(cfg.corpus, "cpt.corpus")
    docs, chunk_list = chunks(ws, fcfg, console)
    records = [{"text": raw_text(c), "source": c.id, "kind": "raw"} for c in chunk_list]
    calls = rewrite_calls(chunk_list, cfg, fcfg) if cfg.augment.enabled else []
    costs = Costs(price=teacher_price(fcfg) if calls else None)
    if dry_run:
        _print_plan(console, ws, fcfg, chunk_list, calls, costs)
        return None
    counts: Counter = Counter()
    stop = None
    if calls:
        from opensem.llm import get_provider

        budget = Budget(costs, fcfg.cost.max_cost_usd, prompt_counter(ws, fcfg))
        teacher = f"{fcfg.teacher.provider}/{fcfg.teacher.resolved_model()}"
        cached = CachedProvider(get_provider(fcfg.teacher, models_dir=ws.base_models_dir), ws.state_dir / "cache" / "teacher")
        if cache_only and any(cached.get(cached._resolve(c)) is None for c in calls):
            raise OpenSEMError("a data-parallel job does not call the teacher from every process: build the corpus "
                               "first with `opensem cpt --corpus-only`, then start the job")
        with stage_progress(console, f"cpt rewrites ({teacher})", len(calls)) as advance:
            def done(c: Call) -> None:
                budget.settle(c)
                advance(1)

            try:
                stop = cached.complete_many(calls, done, budget.may_start)
            except KeyboardInterrupt:
                n = sum(c.reply is not None for c in calls)
                raise StageInterrupted(f"cpt interrupted: {n} of {len(calls)} rewrites are saved in the cache; "
                                       f"run it again to continue without paying for them twice") from None
        for c in calls:
            chunk, kind = c.tag
            if c.reply is None:
                counts["rewrites_failed"] += 1
                continue
            text = c.reply.text.strip()
            if len(text) < 40 or grounding(text, chunk.text) < MIN_GROUNDING:
                counts["rewrites_dropped"] += 1
                continue
            records.append({"text": text, "source": chunk.id, "kind": kind})
    counts.update(Counter(r["kind"] for r in records))
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    cost = {"usd_this_run": round(costs.new_usd, 6), "usd_total": round(costs.usd, 6), "calls_made": costs.calls,
            "calls_from_cache": costs.cached, "max_cost_usd": fcfg.cost.max_cost_usd} if calls else {}
    if stop:
        console.print(f"[yellow]rewrites stopped early[/]: {stop}; the corpus has what was made so far")
    return Corpus(out, records, dict(counts), cost, [{"path": d.path, "sha256": d.sha} for d in docs], stop)


def _print_plan(console: Console, ws: Workspace, fcfg: ForgeConfig, chunk_list: list[Chunk], calls: list[Call],
                costs: Costs) -> None:
    from opensem.forge.teacher import prompt_counter
    from opensem.llm.cost import usd

    console.print(f"cpt corpus: {len(chunk_list)} raw chunks from {fcfg.input_dir}")
    if not calls:
        console.print("rewrites: off (augment.enabled: false in configs/cpt_config.yaml): no teacher calls")
        return
    count = prompt_counter(ws, fcfg)
    tin = sum(count(c.messages) for c in calls)
    tout = sum(c.max_tokens or 0 for c in calls)
    price = costs.price
    est = f"at most ${usd(price, tin, tout):.4f}" if price else ("free (local teacher)" if fcfg.teacher.in_process()
                                                                 else "unknown price")
    console.print(f"rewrites: {len(calls)} teacher calls to {fcfg.teacher.provider}/{fcfg.teacher.resolved_model()}, "
                  f"about {tin} prompt tokens, at most {tout} reply tokens: {est} "
                  f"(budget: {fcfg.cost.max_cost_usd if fcfg.cost.max_cost_usd is not None else 'none'}); cached replies are free")

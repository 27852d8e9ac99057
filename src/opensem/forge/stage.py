"""The Data Forge stage: data/raw -> data/processed/{train,test}.jsonl + forge_manifest.json.

Read top to bottom: ingest -> chunk -> plan teacher calls -> (dry run: print plan) -> call the teacher
through the reply cache -> parse -> quality gates -> split by chunk -> write atomically -> manifest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.markup import escape
from rich.table import Table

from opensem.forge.config import ForgeConfig
from opensem.errors import OpenSEMError, StageInterrupted
from opensem.forge import commands
from opensem.forge.documents import Chunk, ingest, raw_inputs
from opensem.forge.quality import REASONS, Gate, Pair, coverage, held_out, split_by_chunk, split_by_wording
from opensem.forge.synthesis import (
    PAIRS_SCHEMA,
    PROMPT_VERSION,
    clean_question,
    pairs_from_text,
    passage_messages,
    SourceSentence,
    sentence_messages,
    source_sentences,
)
from opensem.forge.teacher import prompt_counter, teacher_price
from opensem.golden import load_golden
from opensem.lineage import atomic_write_text, file_sha256, json_sha256, now, read_json, versions, write_json
from opensem.llm import CachedProvider, Call, LLMReply, get_provider
from opensem.llm.cost import Budget, Costs
from opensem.progress import stage_progress
from opensem.stages import STAGES, Artifact, Context, ReportSection, StageResult
from opensem.terminal import Console
from opensem.text import normalize
from opensem.workspace import Workspace


@dataclass
class Request:
    chunk: Chunk
    messages: list[dict]
    schema: Optional[dict]
    temperature: float
    max_tokens: int
    variant: int = 0
    sentence: Optional[SourceSentence] = None  # sentence strategy: the fact; its text is the answer
    reply: Optional[LLMReply] = None
    error: Optional[str] = None


def _strategy(cfg: ForgeConfig) -> str:
    if cfg.generation.strategy != "auto":
        return cfg.generation.strategy
    return "sentence" if cfg.teacher.in_process() else "passage"


def plan_requests(chunks: list[Chunk], cfg: ForgeConfig) -> list[Request]:
    t = cfg.teacher
    reqs: list[Request] = []
    if _strategy(cfg) == "passage":
        for c in chunks:
            reqs.append(Request(c, passage_messages(c, cfg.generation.pairs_per_chunk), PAIRS_SCHEMA, t.temperature, t.max_tokens))
        return reqs
    budget = cfg.generation.pairs_per_chunk
    k = min(cfg.generation.questions_per_sentence, budget)
    out = cfg.output
    for c in chunks:
        # whole sentences within the chunk's budget: every sentence asked gets all its wordings (the same prompts
        # in every variant, which the local teacher computes once); a fact chosen for test.jsonl gets one more,
        # held out, so that it still has all its training wordings
        for s in source_sentences(c)[: budget // k]:
            extra = int(out.split_by == "wording" and held_out(s.fact, out.seed, out.test_ratio))
            for v in range(k + extra):
                reqs.append(sentence_request(c, s, v, t.temperature))
    return reqs


def sentence_request(chunk: Chunk, s: SourceSentence, variant: int, temperature: float) -> Request:
    # variant 0 is greedy; the others sample, so each fact gets several wordings
    temp = 0.0 if variant == 0 else max(temperature, 0.3)
    return Request(chunk, sentence_messages(chunk.heading, s.prompt_sentence), None, temp, 48, variant, sentence=s)


def replacement_requests(reqs: list[Request], kept: list[Pair], temperature: float) -> list[Request]:
    """Sentence strategy: new wordings, as new sampled variants, for every fact the gates left short of the
    wordings it was asked for (a fact whose call failed is left to the next run, which retries it)."""
    asked: dict[str, list[Request]] = {}
    for r in reqs:
        if r.sentence is not None:
            asked.setdefault(r.sentence.fact, []).append(r)
    have = Counter(p.meta.get("fact") for p in kept)
    out: list[Request] = []
    for fact, rs in asked.items():
        target = len({r.variant for r in rs if r.variant < REPLACEMENT_VARIANTS})
        missing = target - have[fact]
        if missing <= 0 or any(r.error for r in rs):
            continue
        start = max(max(r.variant for r in rs) + 1, REPLACEMENT_VARIANTS)
        out += [sentence_request(rs[0].chunk, rs[0].sentence, v, temperature) for v in range(start, start + missing)]
    return out


REPLACEMENT_VARIANTS = 100  # replacement wordings take variants from here on: they never collide with the asked ones


def _execute(reqs: list[Request], cached: CachedProvider, budget: Budget, progress) -> Optional[str]:
    """Fill in every request's reply or error (cache first, then the teacher through ``complete_many``).
    Returns why the run stopped early (the budget, a run of identical failures), or None when all ran."""
    # a question is used up to its question mark (clean_question): a local teacher stops there
    calls = [Call(r.messages, r.schema, r.temperature, r.max_tokens, r.variant, stop_after=("?",) if r.schema is None else (), tag=r)
             for r in reqs]

    def done(c: Call) -> None:
        budget.settle(c)
        c.tag.reply, c.tag.error = c.reply, c.error
        progress(1)

    return cached.complete_many(calls, done, budget.may_start)


def _parse(reqs: list[Request], strategy: str, teacher: str, cap: int) -> tuple[list[Pair], int, int, int]:
    """Pairs from the replies; a reply's pairs beyond ``cap`` (pairs_per_chunk) are dropped and counted."""
    pairs: list[Pair] = []
    malformed = failed = extra = 0
    for r in reqs:
        if r.reply is None:
            failed += r.error is not None
            continue
        meta = {"teacher": teacher, "prompt_version": PROMPT_VERSION}
        if strategy == "sentence":
            q = clean_question(r.reply.text)
            pairs.append(Pair(q, r.sentence.text, r.chunk.id, r.chunk.sha, r.chunk.doc, dict(meta, fact=r.sentence.fact, variant=r.variant)))
            continue
        data = r.reply.data
        items = data.get("pairs") if isinstance(data, dict) else data if isinstance(data, list) else None
        if not isinstance(items, list):
            items = pairs_from_text(r.reply.text) or None  # small models answer in prose: "Question: ... Answer: ..."
        if not isinstance(items, list):
            malformed += 1
            continue
        if len(items) > cap:
            extra += len(items) - cap
            items = items[:cap]
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("question"), str) or not isinstance(it.get("answer"), str):
                malformed += 1
                continue
            answer = it["answer"].strip()
            fact = f"{r.chunk.id}:{hashlib.sha256(normalize(answer).encode()).hexdigest()[:10]}"  # a pair's fact: its answer
            pairs.append(Pair(it["question"].strip(), answer, r.chunk.id, r.chunk.sha, r.chunk.doc, dict(meta, fact=fact)))
    return pairs, malformed, failed, extra


def to_record(p: Pair, fmt: str, system: Optional[str]) -> dict:
    meta = {
        "source": p.source,
        "chunk_id": p.chunk_id,
        "chunk_sha": p.chunk_sha,
        "teacher": p.meta.get("teacher", ""),
        "prompt_version": p.meta.get("prompt_version", ""),
        "fact": p.meta.get("fact", ""),
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


FAILURE_FILE = "forge_failed.json"


def run_forge(ws: Workspace, dry_run: bool = False, console: Optional[Console] = None) -> dict:
    """Stage 1. Writes train.jsonl, test.jsonl and forge_manifest.json only when the run kept pairs; a run
    that kept nothing leaves the last good ones untouched, records why in forge_failed.json and fails."""
    console = console or Console(stderr=True)
    cfg = ws.forge_config()
    t0 = time.time()
    out_dir = ws.output_path(cfg.output_dir, "forge.output_dir")

    # 1. ingest and plan -----------------------------------------------------------------------------------
    docs, skipped, chunks = ingest(ws, cfg, console)
    golden = load_golden(ws.path(cfg.golden_set), required=False)
    strategy = _strategy(cfg)
    reqs = plan_requests(chunks, cfg)
    teacher_id = f"{cfg.teacher.provider}/{cfg.teacher.resolved_model()}"
    if dry_run:
        return _print_plan(console, ws, cfg, docs, chunks, reqs, strategy, teacher_id)

    # 2. the teacher, through the reply cache, within the budget ---------------------------------------------
    costs = Costs(price=teacher_price(cfg))
    teacher = Teacher(CachedProvider(get_provider(cfg.teacher, models_dir=ws.base_models_dir), ws.state_dir / "cache" / "teacher"),
                      Budget(costs, cfg.cost.max_cost_usd, prompt_counter(ws, cfg)), console)
    stop = teacher.ask(reqs, f"forge ({teacher_id})", f"forge interrupted: {{done}} of {len(reqs)} teacher replies are saved "
                       f"in the cache; run `opensem forge` again to continue without paying for them twice")

    # 3. parse, quality gates; new wordings for the facts the gates left short; split -------------------------
    made = keep_pairs(cfg, reqs, chunks, golden, strategy, teacher_id, teacher, stop)
    split = split_by_wording if cfg.output.split_by == "wording" else split_by_chunk
    train, test = split(made.kept, cfg.output.test_ratio, cfg.output.seed)
    facts = ({s.fact: s.text for c in chunks for s in source_sentences(c)} if strategy == "sentence"
             else {p.meta["fact"]: p.answer for p in made.pairs})
    cover = coverage(facts, train, test) | {"replacement_wordings_kept": made.replaced, "split_by": cfg.output.split_by}
    manifest = forge_manifest(cfg, made, train, test, cover, docs, skipped, chunks, golden, strategy, teacher.cached.provider,
                              costs) | {"wall_time_s": round(time.time() - t0, 1)}

    # 4. a run that kept nothing changes nothing ------------------------------------------------------------
    if not train:
        write_json(out_dir / FAILURE_FILE, manifest)
        _print_summary(console, manifest)
        raise OpenSEMError(f"forge failed: {_why_nothing(manifest, made.stop)}; {cfg.output_dir}/train.jsonl and its manifest "
                           f"are unchanged (details: {cfg.output_dir}/{FAILURE_FILE})")

    # 5. outputs, each replaced atomically, the manifest last ------------------------------------------------
    sys_prompt = cfg.generation.system_prompt
    write_jsonl(out_dir / "train.jsonl", [to_record(p, cfg.output.format, sys_prompt) for p in train])
    write_jsonl(out_dir / "test.jsonl", [to_record(p, cfg.output.format, sys_prompt) for p in test])
    manifest["outputs"] = {
        "train": {"path": "train.jsonl", "sha256": file_sha256(out_dir / "train.jsonl")},
        "test": {"path": "test.jsonl", "sha256": file_sha256(out_dir / "test.jsonl")},
    }
    write_json(out_dir / MANIFEST, manifest)
    (out_dir / FAILURE_FILE).unlink(missing_ok=True)
    _print_summary(console, manifest)
    _print_warnings(console, cfg, manifest, made)
    return manifest


@dataclass
class Teacher:
    """The teacher as the forge calls it: through the reply cache, within the budget, with a progress bar."""

    cached: CachedProvider
    budget: Budget
    console: Console

    def ask(self, reqs: list[Request], title: str, interrupted: str) -> Optional[str]:
        """Every request answered (or failed); why the calls stopped early, or None. Ctrl-C: ``interrupted`` (with
        ``{done}``, the replies saved) as a StageInterrupted."""
        with stage_progress(self.console, title, len(reqs)) as advance:
            try:
                return _execute(reqs, self.cached, self.budget, advance)
            except KeyboardInterrupt:
                raise StageInterrupted(interrupted.format(done=sum(r.reply is not None for r in reqs))) from None


@dataclass
class Made:
    """What the teacher's replies gave, after the gates: every pair parsed, those kept, and the counts."""

    reqs: list[Request]
    pairs: list[Pair]
    kept: list[Pair]
    gate: Gate
    malformed: int  # replies of the first round that were not pairs
    failed: int
    replaced: int
    stop: Optional[str]


def keep_pairs(cfg: ForgeConfig, reqs: list[Request], chunks: list[Chunk], golden: list, strategy: str, teacher_id: str,
               teacher: Teacher, stop: Optional[str]) -> Made:
    """Parse the replies and pass them through the gates; then, for the facts the gates left short of wordings, ask
    for new ones (``replacement_rounds``, sentence strategy) and gate those too."""
    cap = cfg.generation.pairs_per_chunk
    pairs, malformed, failed, extra = _parse(reqs, strategy, teacher_id, cap)
    gate = Gate(cfg.quality, [g.question for g in golden])
    gate.rejected["malformed"] += malformed
    gate.rejected["beyond_pairs_per_chunk"] += extra
    chunk_text, headings = {c.id: c.text for c in chunks}, {c.id: c.heading for c in chunks}
    kept = gate.filter(pairs, chunk_text, headings)
    replaced = 0
    for _ in range(cfg.generation.replacement_rounds if strategy == "sentence" else 0):
        more = [] if stop else replacement_requests(reqs, kept, cfg.teacher.temperature)
        if not more:
            break
        stop = teacher.ask(more, f"forge: new wordings for {len({r.sentence.fact for r in more})} fact(s)",
                           "forge interrupted while asking for new wordings: every reply so far is saved in the cache; "
                           "run `opensem forge` again to continue")
        reqs += more
        new_pairs, new_malformed, new_failed, new_extra = _parse(more, strategy, teacher_id, cap)
        failed += new_failed
        gate.rejected["malformed"] += new_malformed
        gate.rejected["beyond_pairs_per_chunk"] += new_extra
        new_kept = gate.filter(new_pairs, chunk_text, headings)
        replaced += len(new_kept)
        kept += new_kept
    return Made(reqs, pairs, kept, gate, malformed, failed, replaced, stop)


def forge_manifest(cfg: ForgeConfig, made: Made, train: list, test: list, cover: dict, docs: list, skipped: list,
                   chunks: list[Chunk], golden: list, strategy: str, provider, costs: Costs) -> dict:
    """What went in (config, teacher, documents, golden set) and what came out (counts, coverage, cost)."""
    reqs = made.reqs
    return {
        "stage": "forge",
        "created": now(),
        "status": _status(made.stop, made.failed, train),
        "config": cfg.model_dump(mode="json"),
        "config_sha": json_sha256(cfg.model_dump(mode="json")),
        "teacher": {"provider": cfg.teacher.provider, "model": provider.model, "base_url": provider.identity().get("base_url")},
        "strategy": strategy,
        "prompt_version": PROMPT_VERSION,
        "inputs": [{"path": d.path, "sha256": d.sha} for d in docs],
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "golden_set": {"path": cfg.golden_set, "questions": len(golden)},
        "counts": {
            "files": len(docs),
            "chunks": len(chunks),
            "requests": len(reqs),
            "answered": sum(r.reply is not None for r in reqs),
            "pairs_made": len(made.pairs) + made.malformed,
            "kept": len(made.kept),
            "skipped_files": len(skipped),
            "train": len(train),
            "test": len(test),
            "failed_requests": made.failed,
            "rejected": {r: made.gate.rejected.get(r, 0) for r in REASONS},
        },
        "coverage": cover,
        "failures": dict(Counter(r.error for r in reqs if r.error).most_common()),
        "rejected_examples": dict(made.gate.examples),
        "failed_chunks": sorted({r.chunk.id for r in reqs if r.error}),
        "cost": _cost_record(costs, cfg, provider.model),
        "versions": versions("opensem", "openai", "anthropic", "transformers"),
    }


def _print_warnings(console: Console, cfg: ForgeConfig, manifest: dict, made: Made) -> None:
    cover = manifest["coverage"]
    if manifest["failed_chunks"]:
        console.print(f"[yellow]{made.failed} teacher call(s) failed[/] ({_top_failure(manifest)}) in "
                      f"{len(manifest['failed_chunks'])} chunk(s); rerun to retry them")
    if cover["trained"] < cover["facts"]:
        console.print(f"[yellow]{cover['facts'] - cover['trained']} of {cover['facts']} fact(s) have no training wording[/] "
                      f"(rejected by the gates, or beyond generation.pairs_per_chunk); listed under coverage.untrained in "
                      f"{cfg.output_dir}/{MANIFEST}")
    if made.stop:
        console.print(f"[yellow]stopped early[/]: {made.stop}; everything made so far is kept; fix the cause and rerun to "
                      f"continue")


def _status(stop: Optional[str], failed: int, train: list) -> str:
    if not train:
        return "failed"
    if stop:
        return "stopped: " + stop
    if failed:
        return f"partial: {failed} request(s) failed"
    return "complete"


def _why_nothing(m: dict, stop: Optional[str]) -> str:
    c = m["counts"]
    if c["answered"] == 0 and m["failures"]:
        return f"none of the {c['requests']} teacher requests succeeded ({_top_failure(m)})" + (f"; {stop}" if stop else "")
    if c["answered"] == 0 and stop:
        return stop
    return f"kept no training pairs of {c['pairs_made']} made (see the rejected counts)"


def _top_failure(m: dict) -> str:
    (err, n), *rest = m["failures"].items()
    return f"{n} x {err}" + (f", and {len(rest)} other kind(s)" if rest else "")


def _cost_record(costs: Costs, cfg: ForgeConfig, model: str) -> dict:
    return {
        "input_tokens": costs.input_tokens,
        "output_tokens": costs.output_tokens,
        "usd_total": round(costs.usd, 6),
        "usd_this_run": round(costs.new_usd, 6),
        "max_cost_usd": cfg.cost.max_cost_usd,
        "calls_made": costs.calls,
        "calls_from_cache": costs.cached,
        "calls_without_usage": costs.estimated,  # the server sent no token counts: counted here, with a margin
        "price_known": cfg.teacher.in_process() or cfg.cost.price_for(model) is not None,
    }


def _print_plan(console, ws, cfg, docs, chunks, reqs, strategy, teacher_id) -> dict:
    count = prompt_counter(ws, cfg)
    tin = sum(count(r.messages) for r in reqs)
    tout = sum(min(r.max_tokens, 120 if r.schema is None else 360) for r in reqs)  # a question; or a JSON list of pairs
    price = cfg.cost.price_for(cfg.teacher.resolved_model())
    usd = None if price is None else tin / 1e6 * price.input_per_mtok + tout / 1e6 * price.output_per_mtok
    if cfg.teacher.in_process():
        usd = 0.0
    table = Table(title=f"forge plan (dry run, nothing called) - teacher {teacher_id}, strategy {strategy}")
    table.add_column("item")
    table.add_column("value", justify="right")
    facts = {r.sentence.fact for r in reqs if r.sentence is not None}
    rows = [("files", len(docs)), ("chunks", len(chunks))]
    if facts:
        every = sum(len(source_sentences(c)) for c in chunks)
        rows += [("facts (source sentences)", f"{len(facts)}" + (f" of {every} (pairs_per_chunk)" if every > len(facts) else "")),
                 ("training wordings per fact", cfg.generation.questions_per_sentence)]
    for k, v in rows + [
        ("teacher calls", len(reqs)),
        ("est. input tokens", tin),
        ("est. output tokens", tout),
        ("est. cost (USD)", "unknown price" if usd is None else f"{usd:.4f}"),
    ]:
        table.add_row(k, str(v))
    console.print(table)
    for d in docs:
        n = sum(c.doc == d.path for c in chunks)
        console.print(f"  {escape(cfg.input_dir)}/{escape(d.path)}: {n} chunk(s)")
    if facts:
        _print_training_estimate(console, ws, len(facts), cfg.generation.questions_per_sentence, len(chunks))
    if usd is None and cfg.cost.max_cost_usd is not None:
        console.print(f"[yellow]the real run will refuse to start[/]: cost.max_cost_usd is set but no price is known for "
                      f"{cfg.teacher.resolved_model()!r} (add it under cost.prices)")
    return {"dry_run": True, "files": len(docs), "chunks": len(chunks), "calls": len(reqs), "facts": len(facts),
            "est_input_tokens": tin, "est_output_tokens": tout, "est_usd": usd}


def _print_training_estimate(console: Console, ws: Workspace, facts: int, wordings: int, chunks: int = 0) -> None:
    """What train_config.yaml will make of these facts if every wording passes the gates: steps and time."""
    from opensem.kernel.hardware import detect_hardware, make_profile
    from opensem.kernel.plan import gave_up_line, measured_speed, plan_steps

    try:
        tcfg = ws.train_config()
        profile = make_profile(tcfg, detect_hardware())
    except OpenSEMError as e:
        console.print(f"training estimate unavailable: {escape(str(e))}")
        return
    examples = facts * wordings
    examples += round(examples * tcfg.replay_ratio) if tcfg.replay else 0
    per_step = profile.micro_batch_size * profile.gradient_accumulation_steps
    speed, source = measured_speed(ws.path(tcfg.output_dir), tcfg.base_model, profile.hardware.get("device", "cpu"))
    plan = plan_steps(tcfg, examples, facts, facts * wordings, per_step, speed, source)
    console.print(f"training (train_config.yaml, if every wording is kept): {examples} examples, {plan.describe()}"
                  + (f"; speed from {source}" if source else "; no speed measured for this model here yet"))
    if plan.gave_up:
        console.print(f"[yellow]{gave_up_line(plan)}[/]")
    if tcfg.documents.enabled:
        console.print(f"documents (train.documents): about {-(-round(chunks * tcfg.documents.passes) // per_step)} more steps "
                      f"({chunks} chunks x {tcfg.documents.passes:g} passes), after {tcfg.documents.after:.0%} of the QA steps")


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
    cov = m.get("coverage")
    if cov:
        rows += [("facts trained", f"{cov['trained']} of {cov['facts']} ({cov['train_wordings_per_fact']} wordings each)"),
                 ("new wordings kept (after the gates)", cov["replacement_wordings_kept"])]
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


# --- the forge as a pipeline stage --------------------------------------------------------------------------
MANIFEST = "forge_manifest.json"


def forge_result(ws: Workspace, cfg: ForgeConfig) -> StageResult:
    out_dir = ws.output_path(cfg.output_dir, "forge.output_dir")
    m = read_json(out_dir / MANIFEST)
    arts = {name: Artifact.of(ws, out_dir / f) for name, f in (("train", "train.jsonl"), ("test", "test.jsonl"), ("manifest", MANIFEST))}
    return StageResult("forge", arts, {
        "manifest": arts["manifest"].path, "manifest_sha256": arts["manifest"].sha256, "train_sha256": arts["train"].sha256,
        "status": m.get("status"), "teacher": m.get("teacher"), "counts": m.get("counts"), "cost": m.get("cost"),
        "inputs": m.get("inputs"),
    })


@STAGES.register
class ForgeStage:
    """data/raw -> train.jsonl, test.jsonl, forge_manifest.json."""

    name = "forge"
    configs = ("forge", "train")
    commands = {"forge": commands.forge}

    def outputs(self, ws: Workspace) -> list[str]:
        return [ws.forge_config().output_dir]

    def columns(self, summary: dict) -> dict[str, str]:
        return {"pairs": str((summary.get("counts") or {}).get("train", "-"))}

    def inputs(self, ctx: Context) -> dict:
        cfg = ctx.ws.forge_config()
        golden = ctx.ws.path(cfg.golden_set)
        return {"raw": raw_inputs(ctx.ws, cfg), "config": cfg.model_dump(mode="json"),
                "golden": file_sha256(golden) if golden.exists() else None}

    def run(self, ctx: Context) -> StageResult:
        run_forge(ctx.ws, console=ctx.console)
        return forge_result(ctx.ws, ctx.ws.forge_config())

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return read_json(result.path(ws, "manifest"))

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        return [ReportSection("Forge", [[k, v] for k, v in report_rows(self.details(ws, result))], lineage={
            "forge manifest": result.summary.get("manifest_sha256"), "train.jsonl": result.summary.get("train_sha256")})]


def report_rows(forge: dict) -> list[tuple[str, object]]:
    """The forge's rows in the run's report: teacher, counts, fact coverage, rejections, tokens and cost."""
    counts, cost, teacher = forge.get("counts", {}), forge.get("cost", {}), forge.get("teacher") or {}
    rows = [("teacher", f"{teacher.get('provider')}/{teacher.get('model')}"),
            ("strategy", forge.get("strategy")), ("files", counts.get("files")), ("chunks", counts.get("chunks")),
            ("pairs made", counts.get("pairs_made")), ("kept (train / test)", f"{counts.get('kept')} ({counts.get('train')} / {counts.get('test')})")]
    cov = forge.get("coverage")
    if cov:
        rows += [("facts trained", f"{cov.get('trained')} of {cov.get('facts')} ({cov.get('train_wordings_per_fact')} wordings each)"),
                 ("split", cov.get("split_by"))]
    rows += [(f"rejected: {k}", v) for k, v in (counts.get("rejected") or {}).items() if v]
    return rows + [("tokens in / out", f"{cost.get('input_tokens')} / {cost.get('output_tokens')}"), ("cost (USD)", cost.get("usd_total"))]

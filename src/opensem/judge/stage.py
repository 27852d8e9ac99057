"""Stages 2 and 4, the Judge: golden set -> answers -> promptfoo + judge -> scores -> Baseline vs Fine-Tuned.

    opensem judge --mode baseline      the untouched base model; results stored for later comparison
    opensem judge --mode fine-tuned    base + adapter (latest, or --adapter); compared with the baseline
    opensem judge --calibrate          each judge's agreement with the human-scored calibration set
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from rich.markup import escape

from opensem.judge import commands, diagnosis
from opensem.adapters import adapter_hash, chain_text, find_adapter, trained_on
from opensem.judge.config import EvalConfig
from opensem.errors import OpenSEMError
from opensem.golden import GoldenItem, duplicate_questions, load_golden
from opensem.judge import promptfoo, report
from opensem.judge.answers import conversation, generate_answers
from opensem.judge.scorers import ReferenceScorer, make_judge, reachable_judge
from opensem.judge.stats import paired_compare
from opensem.lineage import file_sha256, json_sha256, now, read_json, write_json
from opensem.models import resolve_base_model
from opensem.progress import stage_progress
from opensem.stages import STAGES, Artifact, Context, ReportSection, StageResult
from opensem.terminal import Console
from opensem.workspace import Workspace


def _forgetting_items(ecfg, ws: Workspace) -> list[GoldenItem]:
    if not ecfg.forgetting_set:
        return []
    if ecfg.forgetting_set == "builtin":
        path = Path(str(resources.files("opensem") / "assets" / "judge" / "general_knowledge.json"))
    else:
        path = ws.path(ecfg.forgetting_set)
    return load_golden(path, required=True)


def _new_run_dir(parent: Path, name: str) -> Path:
    """A fresh folder: two runs in the same second never share one."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        d = parent / (name if n == 1 else f"{name}-{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise OpenSEMError(f"{parent}: too many runs named {name}")


def _check_context(model_path: str, ecfg, items: list[tuple[str, GoldenItem]]) -> None:
    """Every question fits the model's context with room for the answer, or a one-line error before any work."""
    from opensem.inference import PromptChecker

    checker = PromptChecker(model_path)
    for source, it in items:
        why = checker.too_long(conversation(it.question, it.system or ecfg.answers.system_prompt), ecfg.answers.max_new_tokens)
        if why:
            raise OpenSEMError(f"{source}: item {it.id!r}: the question is too long ({why}): shorten it")


@dataclass
class JudgeRun:
    """One judge run as it is set up, before any answer: what is asked of which model, graded by whom."""

    mode: str
    ecfg: EvalConfig
    items: list[GoldenItem]
    forget: list[GoldenItem]
    base: Any
    adapter_dir: Optional[Path]
    judge: Any
    promptfoo_cmd: list[str]
    reports_dir: Path
    weights: Any = None  # the model under the adapter: the base, or the merged result it was chained from
    gguf: Optional[Path] = None  # answers from this exported GGUF in llama.cpp instead (the model that ships)
    store: Optional[Path] = None  # promptfoo's store for this workspace (PROMPTFOO_CONFIG_DIR): concurrent runs elsewhere never touch it

    @property
    def label(self) -> str:
        return (f"Fine-Tuned ({self.gguf.name})" if self.gguf else "Fine-Tuned") if self.adapter_dir else "Baseline"


def run_judge(ws: Workspace, mode: str, adapter: Optional[str] = None, console: Optional[Console] = None,
              gguf: Optional[Path] = None) -> dict:
    """setup -> answers -> promptfoo grades the golden set -> forgetting check -> results -> comparison. ``gguf``: the
    fine-tuned model answers as exported (a GGUF of the adapter's run, in llama.cpp), so the row is what ships."""
    console = console or Console()
    t0 = time.time()
    run = setup_judge(ws, mode, adapter, console, gguf)
    rag = retrieval_prompts(ws, run, console) if run.ecfg.retrieval.enabled else None
    own = diagnosis.training_sample(ws, run.adapter_dir, run.ecfg.train_sample) if run.adapter_dir else []
    everything = ([(it.id, it.question, it.system) for it in run.items] + [("forget:" + it.id, it.question, None) for it in run.forget]
                  + [("rag:" + it.id, rag["prompts"][it.id], it.system) for it in run.items if rag]
                  + [("own:" + o.id, o.question, o.system) for o in own])
    what = f"{len(run.items)} golden" + (" (and with retrieval)" if rag else "") + f" + {len(run.forget)} general" + \
        (f" + {len(own)} of its training questions" if own else "")
    t1 = time.time()
    with stage_progress(console, f"{mode}: answering {what}", len(everything)) as adv:
        answers = answer_all(ws, run, everything, adv)  # one batched generation for every row
    answer_seconds = time.time() - t1
    if rag is not None:
        rag["answers"] = {it.id: answers["rag:" + it.id] for it in run.items}
    run_dir = _new_run_dir(run.reports_dir, f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    write_json(run_dir / "answers.json", {k: v for k, v in answers.items() if not k.startswith(("forget:", "rag:", "own:"))})
    per_item, rag_items = grade_with_promptfoo(run, answers, run_dir, console, rag)
    forget_items = score_forgetting(run, answers)
    result = results_record(ws, run, run_dir, per_item, forget_items, time.time() - t0)
    result["answer_seconds"] = round(answer_seconds, 1)
    if rag is not None:
        result["retrieval"] = retrieval_record(run, rag, rag_items)
    if own:
        result["own_questions"] = diagnosis.own_record(run.judge, own, answers, run.ecfg)
    write_json(run_dir / "results.json", result)
    base_res = compare_with_baseline(ws, run, result, console)
    if own:
        result["diagnosis"] = diagnosis.line(result, run.ecfg.pass_threshold)
    write_json(run_dir / "results.json", result)
    write_json(run.reports_dir / f"{mode}-latest.json", result)
    tuned_res = result if mode == "fine-tuned" else None
    cmp, forgetting = result.get("comparison"), result.get("forgetting")
    (run_dir / "report.md").write_text(report.markdown(run.judge.name, base_res, tuned_res, cmp, result["lineage"], forgetting,
                                                       result.get("retrieval_comparisons"), result.get("recommendation")),
                                       encoding="utf-8")
    report.render(console, run.judge.name, base_res, tuned_res, cmp, forgetting)
    report.render_retrieval(console, base_res, tuned_res, result.get("retrieval_comparisons"))
    if result.get("diagnosis"):
        console.print(f"[bold]{escape(result['diagnosis'])}[/]")
    console.print(f"results: {result['run_dir']}/ (results.json, report.md, promptfoo_output.json); "
                  f"browse it with `PROMPTFOO_CONFIG_DIR=.opensem/promptfoo npx promptfoo view`")
    return result


def answer_all(ws: Workspace, run: JudgeRun, items: list[tuple[str, str, Optional[str]]], progress=None) -> dict[str, str]:
    """The model under test answers (id, question, system) items: base + adapter through the answer cache, or the
    exported GGUF in llama.cpp's runtime (greedy, the judged length and system prompt, no repeat penalty)."""
    if run.gguf is None:
        return generate_answers(ws, run.weights.path, run.weights.fingerprint, run.adapter_dir, items, run.ecfg.answers,
                                progress=progress)
    from opensem.llamacpp import answers

    acfg = run.ecfg.answers
    got = answers(run.gguf, [conversation(q, system or acfg.system_prompt) for _, q, system in items], acfg.max_new_tokens)
    if progress:
        progress(len(items))
    return {item_id: text for (item_id, _, _), text in zip(items, got.answers)}


def setup_judge(ws: Workspace, mode: str, adapter: Optional[str], console: Console, gguf: Optional[Path] = None) -> JudgeRun:
    """Everything checked before any work: configs, golden set, promptfoo, model, adapter, context, judge."""
    ecfg, tcfg = ws.eval_config(), ws.train_config()
    reports_dir = ws.output_path(ecfg.reports_dir, "eval.reports_dir")
    items = load_golden(ws.path(ecfg.golden_set))
    for a, b in duplicate_questions(items):
        console.print(f"[yellow]warning[/]: {escape(ecfg.golden_set)}: items {escape(a)} and {escape(b)} ask the same question")
    cmd = promptfoo.find_promptfoo(ecfg.promptfoo, ws.root)
    base = resolve_base_model(tcfg.base_model, ws.base_models_dir)
    adapter_dir = find_adapter(ws, tcfg, adapter) if mode == "fine-tuned" else None
    weights = (trained_on(adapter_dir) if adapter_dir else None) or base
    forget = _forgetting_items(ecfg, ws)
    _check_context(base.path, ecfg, [(ecfg.golden_set, it) for it in items] + [(ecfg.forgetting_set, it) for it in forget])
    judge = reachable_judge(ws, ecfg, console)
    if gguf is not None:
        if mode != "fine-tuned":
            raise OpenSEMError("--gguf: the exported GGUF is the fine-tuned model: use it with --mode fine-tuned")
        if not Path(gguf).is_file() or Path(gguf).suffix != ".gguf":
            raise OpenSEMError(f"--gguf {gguf}: no GGUF file there: export one first (opensem export RUN --format gguf)")
        gguf = Path(gguf).resolve()
    return JudgeRun(mode, ecfg, items, forget, base, adapter_dir, judge, cmd, reports_dir, weights, store=ws.state_dir / "promptfoo",
                    gguf=gguf)


def retrieval_prompts(ws: Workspace, run: JudgeRun, console: Console) -> Optional[dict]:
    """Each golden question with the top_k passages of the documents in the prompt (the index built once and cached
    by the corpus's content), fitted to the model's context; None, said once, when data/raw has no documents."""
    from opensem.inference import PromptChecker
    from opensem import retrieval

    rcfg = run.ecfg.retrieval
    try:
        index = retrieval.Index.build(ws, console)
    except retrieval.NoDocuments as e:
        console.print(f"[yellow]no '+ retrieval' rows[/]: {escape(str(e))}")
        return None
    t = time.time()
    found = index.search([it.question for it in run.items], rcfg.top_k)
    checker = PromptChecker(run.weights.path)
    prompts = {}
    for it, passages in zip(run.items, found):
        # as many passages as fit the model's context with room for the answer (all of them, for most models)
        system = it.system or run.ecfg.answers.system_prompt
        prompts[it.id] = index.fitted(it.question, passages, lambda text: not checker.too_long(
            conversation(text, system), run.ecfg.answers.max_new_tokens))
    hits = {it.id: retrieval.holds_answer(it.question, it.answer, prompts[it.id][1]) for it in run.items}
    return {"label": f"{run.label} + retrieval", "passages": {i: [p.id for p in ps] for i, (_, ps) in prompts.items()},
            "prompts": {i: t for i, (t, _) in prompts.items()}, "hits": hits, "top_k": rcfg.top_k, "method": index.method,
            "index": index.key, "template": retrieval.TEMPLATE_VERSION, "search_seconds": round(time.time() - t, 2)}


def grade_with_promptfoo(run: JudgeRun, answers: dict[str, str], run_dir: Path, console: Console,
                         rag: Optional[dict] = None) -> tuple[list[dict], Optional[list[dict]]]:
    """promptfoo runs the golden set as tests and the judge grades through it: the model's row, and its
    "+ retrieval" row when ``rag`` is given. promptfoo sees opaque keys only; questions, golden answers and
    model answers stay on this side."""
    keys = promptfoo.test_keys(len(run.items))
    by_key = dict(zip(keys, run.items))
    answers_by_key = run_dir / "promptfoo_answers.json"
    write_json(answers_by_key, {k: answers[it.id] for k, it in by_key.items()})
    extra = {}
    if rag:
        write_json(run_dir / "promptfoo_answers_retrieval.json", {k: rag["answers"][it.id] for k, it in by_key.items()})
        extra[rag["label"]] = "promptfoo_answers_retrieval.json"
    rows = len(run.items) * (1 + len(extra))
    with stage_progress(console, f"{run.mode}: judging with {run.judge.short} via promptfoo", rows) as adv:

        def grade(key: str, output: str) -> dict:
            it = by_key[key]
            if output != answers[it.id] and not (rag and output == rag["answers"][it.id]):
                return {"error": f"promptfoo passed an output for {key} that differs from the recorded answers"}
            v = run.judge.score_many([(it.question, it.answer, output)])[0]
            adv(1)
            return {"error": v.error} if v.error else {"score": v.score, "reason": v.reason}

        config = promptfoo.write_config(run_dir, run.label, keys, run.ecfg.pass_threshold, f"OpenSEM {run.mode}",
                                        run.ecfg.judge.concurrency, extra)
        with promptfoo.JudgeServer(grade) as server:
            data = promptfoo.run_eval(run.promptfoo_cmd, config, run_dir / "promptfoo_output.json", server, answers_by_key,
                                      sys.executable, run_dir / "promptfoo.log", store=run.store)
        promptfoo.check_complete(data, keys, [run.label, *extra], run_dir / "promptfoo_output.json")

    def rows_of(label: str) -> list[dict]:
        parsed = promptfoo.parse_results(data, label)
        return [{"id": it.id, "question": it.question, "golden": it.answer, **parsed[k]} for k, it in by_key.items() if k in parsed]

    return rows_of(run.label), (rows_of(rag["label"]) if rag else None)


def retrieval_record(run: JudgeRun, rag: dict, items: list[dict]) -> dict:
    """The "+ retrieval" row: its scored items (each with the passages it was given), summary and recall@k."""
    ecfg = run.ecfg
    for it in items:
        it["passages"], it["retrieved_answer"] = rag["passages"][it["id"]], rag["hits"][it["id"]]
        it["prompt"] = rag["prompts"][it["id"]]
    hits = list(rag["hits"].values())
    return {"label": rag["label"], "top_k": rag["top_k"], "method": rag["method"], "index": rag["index"],
            "template": rag["template"], "search_seconds": rag["search_seconds"], "recall_at_k": sum(hits) / len(hits) if hits else None, "items": items,
            "summary": report.summarize(items, ecfg.pass_threshold, ecfg.bootstrap_samples, ecfg.seed)}


def score_forgetting(run: JudgeRun, answers: dict[str, str]) -> list[dict]:
    """The general-knowledge questions, scored by the same judge in one batch."""
    if not run.forget:
        return []
    verdicts = run.judge.score_many([(f.question, f.answer, answers["forget:" + f.id]) for f in run.forget])
    return [{"id": f.id, "question": f.question, "golden": f.answer, "output": answers["forget:" + f.id],
             "score": v.score, "reason": v.reason, "error": v.error} for f, v in zip(run.forget, verdicts)]


def results_record(ws: Workspace, run: JudgeRun, run_dir: Path, per_item: list[dict], forget_items: list[dict],
                   seconds: float) -> dict:
    ecfg, golden_sha, adapter_dir = run.ecfg, file_sha256(ws.path(run.ecfg.golden_set)), run.adapter_dir
    adapter_manifest = adapter_dir / "manifest.json" if adapter_dir else None
    return {
        "stage": "judge",
        "mode": run.mode,
        "created": now(),
        "label": run.label,
        "judge": run.judge.name,
        "judge_short": run.judge.short,
        "pass_threshold": ecfg.pass_threshold,
        "summary": report.summarize(per_item, ecfg.pass_threshold, ecfg.bootstrap_samples, ecfg.seed),
        "items": per_item,
        "forgetting_items": forget_items,
        "lineage": {
            "golden_set": f"{ecfg.golden_set} {golden_sha}",
            "eval_config": json_sha256(ecfg.model_dump(mode="json")),
            "base_model": f"{run.base.name} {run.base.fingerprint}",
            "adapter": f"{adapter_dir} {adapter_hash(adapter_dir)}" if adapter_dir else "none",
            "adapter_manifest": file_sha256(adapter_manifest) if adapter_manifest and adapter_manifest.exists() else "none",
            **({"chain": chain_text(adapter_dir)} if adapter_dir and chain_text(adapter_dir) else {}),
            **({"gguf": f"{run.gguf} {file_sha256(run.gguf)}"} if run.gguf else {}),
            "judge": run.judge.name,
            "promptfoo": f"{promptfoo.PROMPTFOO_VERSION} {run_dir.name}/promptfooconfig.yaml",
        },
        "key": {"golden": golden_sha, "base": run.base.fingerprint, "judge": run.judge.name,
                "answers": ecfg.answers.model_dump(mode="json"),
                **({"retrieval": ecfg.retrieval.model_dump(mode="json")} if ecfg.retrieval.enabled else {})},
        "run_dir": str(run_dir.relative_to(ws.root)) if run_dir.is_relative_to(ws.root) else str(run_dir),
        "wall_time_s": round(seconds, 1),
    }


def compare_with_baseline(ws: Workspace, run: JudgeRun, result: dict, console: Console) -> dict:
    """The baseline results to compare with (this run, for a baseline); a fine-tuned result gets its comparison."""
    if run.mode == "baseline":
        return result
    base_res = read_json(run.reports_dir / "baseline-latest.json", None)
    if base_res is None or base_res.get("key") != result["key"]:
        console.print("no baseline for this golden set, base model and judge yet: running the baseline first")
        base_res = run_judge(ws, "baseline", console=Console(quiet=True))
    ecfg = run.ecfg
    result["comparison"] = report.compare(base_res["items"], result["items"], ecfg.pass_threshold, ecfg.bootstrap_samples, ecfg.seed)
    result["forgetting"] = forgetting_check(base_res.get("forgetting_items", []), result["forgetting_items"], ecfg)
    result["baseline_run"] = base_res["run_dir"]
    if result.get("retrieval") and base_res.get("retrieval"):
        rows = {"baseline": base_res["items"], "baseline_retrieval": base_res["retrieval"]["items"],
                "fine_tuned": result["items"], "fine_tuned_retrieval": result["retrieval"]["items"]}
        result["retrieval_comparisons"] = {
            f"{b}__{a}": {k: v for k, v in report.compare(rows[a], rows[b], ecfg.pass_threshold, ecfg.bootstrap_samples,
                                                            ecfg.seed).items() if k != "regressions"}
            for a, b in report.RETRIEVAL_PAIRS}
        row, result["recommendation"] = report.recommend(rows, ecfg.pass_threshold, ecfg.bootstrap_samples, ecfg.seed)
        result["recommended"] = recommended_record(row, result, base_res)
    return base_res


def recommended_record(row: str, result: dict, base_res: dict) -> dict:
    """The row the judge recommends, as export, serve, ask, push and the model card read it: which model (the
    fine-tuned adapter, whose hash the results' lineage names, or the base model), with or without retrieval (the
    index, top_k and method it was judged with), and its judged figures."""
    source = result if row.startswith("fine_tuned") else base_res
    retrieval = row.endswith("_retrieval")
    summary = (source["retrieval"] if retrieval else source)["summary"]
    r = result["retrieval"]
    return {"row": row, "label": report.ROW_NAMES[row], "fine_tuned": row.startswith("fine_tuned"), "retrieval": retrieval,
            "retrieval_settings": {"top_k": r["top_k"], "method": r.get("method", "dense"), "index": r["index"]} if retrieval else None,
            "adapter": result["lineage"]["adapter"] if row.startswith("fine_tuned") else None,
            "summary": {k: summary.get(k) for k in ("n", "accuracy", "accuracy_ci", "mean_score", "mean_score_ci")}}


def forgetting_check(base_items: list[dict], tuned_items: list[dict], ecfg) -> Optional[dict]:
    if not base_items or not tuned_items:
        return None
    b = {x["id"]: x for x in base_items}
    pairs = [(b[t["id"]]["score"], t["score"]) for t in tuned_items if t["id"] in b and t["score"] is not None and b[t["id"]]["score"] is not None]
    if not pairs:
        return None
    p = paired_compare([x for x, _ in pairs], [y for _, y in pairs], ecfg.bootstrap_samples, ecfg.seed)
    flagged = p.ci[1] < 0
    msg = (f"general knowledge ({p.n} questions): mean score {p.mean_diff:+.2f}, 95% CI [{p.ci[0]:.2f}, {p.ci[1]:.2f}]"
           + (": FORGETTING - the drop is beyond its confidence interval" if flagged else ": no significant forgetting"))
    return {"n": p.n, "mean_diff": p.mean_diff, "ci": p.ci, "p_value": p.p_value, "flagged": flagged, "message": msg}


class CalibrationItem(BaseModel):
    """One human-scored answer: the question, the reference answer, a candidate answer and a person's 1-5 score."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    question: str = Field(min_length=1)
    golden: str = Field(min_length=1, validation_alias=AliasChoices("golden", "reference", "answer"))
    candidate: str
    human_score: int = Field(ge=1, le=5, validation_alias=AliasChoices("human_score", "human", "score"))


def shipped_calibration_set() -> Path:
    """The 51 human-scored answers shipped with the tool."""
    return Path(str(resources.files("opensem") / "assets" / "judge" / "calibration_set.json"))


def load_calibration(path: Optional[Path]) -> list[CalibrationItem]:
    """The shipped set (51 human-scored answers about the example domain), or a team's own file."""
    from pydantic import ValidationError

    from opensem.encoding import read_text

    path = path or shipped_calibration_set()
    if not path.exists():
        raise OpenSEMError(f"{path}: calibration file not found")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise OpenSEMError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise OpenSEMError(f"{path}: nested too deeply: expected a JSON list of {{question, golden, candidate, human_score}} items") from None
    if not isinstance(data, list):
        raise OpenSEMError(f"{path}: expected a JSON list of {{question, golden, candidate, human_score}} items")
    items = []
    for i, raw in enumerate(data):
        try:
            items.append(CalibrationItem.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "item"
            raise OpenSEMError(f"{path}: item {i + 1}: key '{key}': {err['msg']}") from None
    if len(items) < 3:
        raise OpenSEMError(f"{path}: {len(items)} item(s): a rank correlation needs at least 3 human-scored answers")
    return items


def run_calibration(ws: Workspace, path: Optional[Path] = None, console: Optional[Console] = None) -> dict:
    """Agreement of the offline scorer (and the configured judge, if it is another) with human scores."""
    from rich.table import Table

    console = console or Console()
    items = load_calibration(path)
    human = [it.human_score for it in items]
    ecfg = ws.eval_config()
    judges = [ReferenceScorer()]
    if ecfg.judge.provider != "offline":
        judges.append(make_judge(ecfg.judge, ws))
    source = escape(str(path)) if path else "the shipped set"
    table = Table(title=f"judge calibration on {len(items)} human-scored answers ({source})")
    for col in ("judge", "Spearman", "exact", "within 1", "errors"):
        table.add_column(col, justify="right" if col != "judge" else "left")
    out = {}
    for j in judges:
        verdicts = j.score_many([(it.question, it.golden, it.candidate) for it in items])
        ok = [(h, v.score) for h, v in zip(human, verdicts) if v.score is not None]
        errors = len(items) - len(ok)
        rho, why = rank_correlation([h for h, _ in ok], [s for _, s in ok])
        exact = sum(round(s) == h for h, s in ok) / len(ok) if ok else 0.0
        within = sum(abs(round(s) - h) <= 1 for h, s in ok) / len(ok) if ok else 0.0
        out[j.short] = {"spearman": rho, "exact": exact, "within_1": within, "errors": errors, "n": len(items)} | (
            {"spearman_undefined": why} if why else {})
        table.add_row(escape(j.name), f"{rho:.3f}" if rho is not None else f"undefined ({why})", f"{exact:.0%}", f"{within:.0%}", str(errors))
    console.print(table)
    record = read_json(calibration_record(ws), {"judges": {}})  # one entry per judge, the last measurement of each
    for j in judges:
        record["judges"][j.name] = out[j.short] | {"set": str(path) if path else "the shipped set",
                                                   "set_sha256": file_sha256(path or shipped_calibration_set()), "created": now()}
    write_json(calibration_record(ws), record)
    return out


def rank_correlation(human: list, judged: list) -> tuple[Optional[float], Optional[str]]:
    """Spearman's rho, or None and why it is undefined (never NaN, which is not JSON)."""
    from scipy.stats import spearmanr

    if len(human) < 3:
        return None, "fewer than 3 scored answers"
    if len(set(human)) == 1:
        return None, "all human scores equal"
    if len(set(judged)) == 1:
        return None, "all the judge's scores equal"
    return float(spearmanr(human, judged).statistic), None


def calibration_record(ws: Workspace) -> Path:
    """Where `opensem judge --calibrate` keeps each judge's last agreement with human scores (the model card reads it)."""
    return ws.path(ws.eval_config().reports_dir) / "calibration.json"


# --- the judge as pipeline stages: baseline and fine-tuned -------------------------------------------------------
def judge_result(ws: Workspace, stage: str, result: dict) -> StageResult:
    art = Artifact.of(ws, ws.path(result["run_dir"]) / "results.json")
    summary = {"results": art.path, "results_sha256": art.sha256, "summary": result["summary"], "judge": result["judge"]}
    cmp = result.get("comparison")
    if cmp:
        summary |= {"headline": report.headline(cmp), "forgetting": result.get("forgetting"),
                    "comparison": {k: v for k, v in cmp.items() if k != "regressions"} | {"regressions": len(cmp.get("regressions", []))}}
    if result.get("retrieval"):
        r = result["retrieval"]
        summary["retrieval"] = {"top_k": r["top_k"], "recall_at_k": r["recall_at_k"], "summary": r["summary"]}
    if result.get("diagnosis"):
        summary["diagnosis"] = result["diagnosis"]
    if result.get("retrieval_comparisons"):
        summary["retrieval_line"] = report.retrieval_line(result["retrieval_comparisons"])
        summary["recommendation"] = result.get("recommendation")
        summary["recommended"] = result.get("recommended")
        summary["retrieval_comparisons"] = result["retrieval_comparisons"]
    return StageResult(stage, {"results": art}, summary)


@STAGES.register
class BaselineStage:
    """The untouched base model answers the golden set; the judge scores it."""

    name = "baseline"
    configs = ("eval", "train")
    commands = {"judge": commands.judge}
    mode = "baseline"

    def outputs(self, ws: Workspace) -> list[str]:
        return [ws.eval_config().reports_dir]

    def columns(self, summary: dict) -> dict[str, str]:
        mean = (summary.get("summary") or {}).get("mean_score")
        return {self.name: "-" if mean is None else f"{mean:.2f}"}

    def inputs(self, ctx: Context) -> dict:
        ecfg, tcfg = ctx.ws.eval_config(), ctx.ws.train_config()
        base = resolve_base_model(tcfg.base_model, ctx.ws.base_models_dir)
        return {"golden": file_sha256(ctx.ws.path(ecfg.golden_set)), "eval": ecfg.model_dump(mode="json"), "base": base.fingerprint}

    def check(self, ws: Workspace) -> None:
        """Before any stage of the run works: the golden set reads and promptfoo is there."""
        ecfg = ws.eval_config()
        load_golden(ws.path(ecfg.golden_set))
        promptfoo.find_promptfoo(ecfg.promptfoo, ws.root)

    def adapter(self, ctx: Context) -> Optional[Path]:
        return None

    def run(self, ctx: Context) -> StageResult:
        adapter = self.adapter(ctx)
        res = run_judge(ctx.ws, self.mode, adapter=str(adapter) if adapter else None, console=ctx.console)
        return judge_result(ctx.ws, self.name, res)

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return read_json(result.path(ws, "results"))

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        """No section of its own (the page is the judge's): its results file joins the lineage, and for a compared
        model, the baseline's judge run it was compared with."""
        lineage = {f"{self.mode} results": f"{result.summary.get('results')} {result.summary.get('results_sha256')}"}
        if result.summary.get("comparison"):
            lineage["compared with"] = self.details(ws, result).get("baseline_run")
        return [ReportSection("", [], lineage=lineage)]


@STAGES.register
class FineTunedStage(BaselineStage):
    """Base + the adapter of the train stage (this run's, or the last one finished here) answers the golden set;
    compared with the baseline."""

    name = "fine-tuned"
    mode = "fine-tuned"
    needs = ("train",)

    def adapter(self, ctx: Context) -> Optional[Path]:
        return ctx.need("train").path(ctx.ws, "adapter").parent

    def inputs(self, ctx: Context) -> dict:
        return super().inputs(ctx) | {"adapter": adapter_hash(self.adapter(ctx))}

"""Preference pairs from the instruction-tuned model's own mistakes: train.jsonl + adapter -> preferences.jsonl.

For up to ``pairs.max_questions`` training questions (never a golden one: the forge keeps them out, and any
that match a golden question exactly are skipped here too), the instruction-tuned model answers
``samples_per_question`` times at ``temperature``. The judge of eval_config.yaml scores each answer against
the forge's grounded answer; the lowest-scoring answer below ``pass_threshold`` is "rejected", the grounded
answer "chosen". Written in TRL's conversational preference format, with provenance:

    {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": grounded}],
     "rejected": [{"role": "assistant", "content": wrong}],
     "metadata": {"source": ..., "chunk_id": ..., "rejected_score": 1.8, "judge": ..., "adapter_sha256": ...}}

Answers go through the answer cache (one entry per sample) and verdicts through the judge's cache, so a rerun
or a run resumed after Ctrl-C repeats nothing. A manifest beside the file counts pairs made and why questions
gave none.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Optional


from opensem.errors import OpenSEMError, StageInterrupted
from opensem.lineage import atomic_write_text, file_sha256, now, versions, write_json
from opensem.terminal import Console
from opensem.workspace import Workspace

MANIFEST = "preferences_manifest.json"


def training_questions(ws: Workspace) -> list[dict]:
    """(question, grounded answer, provenance) from every training dataset, golden questions left out."""
    from opensem.golden import load_golden
    from opensem.text import normalize
    from opensem.kernel.data import to_messages

    tcfg, ecfg = ws.train_config(), ws.eval_config()
    golden = {normalize(g.question) for g in load_golden(ws.path(ecfg.golden_set), required=False)}
    out = []
    for spec in tcfg.datasets:
        path = ws.path(spec.path)
        if not path.exists():
            raise OpenSEMError(f"{spec.path}: training data not found: run `opensem forge` first")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            msgs = to_messages(rec, spec.field_messages, f"{spec.path}:{n}")
            users = [m for m in msgs if m["role"] == "user"]
            answers = [m for m in msgs if m["role"] == "assistant"]
            if len(users) != 1 or len(answers) != 1 or normalize(users[0]["content"]) in golden:
                continue
            system = next((m["content"] for m in msgs if m["role"] == "system"), None)
            out.append({"question": users[0]["content"], "answer": answers[0]["content"], "system": system,
                        "metadata": rec.get("metadata") or {}})
    return out


def build_pairs(ws: Workspace, adapter_dir: Path, console: Optional[Console] = None) -> Path:
    """Write the preference pairs (atomically) and their manifest; return the pairs file."""
    from opensem.adapters import adapter_hash, trained_on
    from opensem.judge.scorers import reachable_judge
    from opensem.models import resolve_base_model

    console = console or Console(stderr=True)
    t0 = time.time()
    pcfg, ecfg = ws.preference_config().pairs, ws.eval_config()
    out = ws.output_path(pcfg.output, "preference.pairs.output")
    weights = trained_on(adapter_dir) or resolve_base_model(ws.train_config().base_model, ws.base_models_dir)
    ahash = adapter_hash(adapter_dir)
    questions = training_questions(ws)
    if not questions:
        raise OpenSEMError("no single-turn training questions to build preference pairs from: run `opensem forge` first")
    if pcfg.max_questions and len(questions) > pcfg.max_questions:
        questions = random.Random(pcfg.seed).sample(questions, pcfg.max_questions)
    samples, total = sample_answers(ws, questions, weights, adapter_dir, ahash, console)
    judge = reachable_judge(ws, ecfg, console)
    worst, judged, errors = worst_answers(questions, samples, judge, ecfg.pass_threshold, console)
    records, reasons = [], Counter()
    for qi, q in enumerate(questions):
        if qi not in samples:
            reasons["no_answer"] += 1
        elif qi not in worst:
            reasons["every_answer_passed"] += 1
        elif worst[qi][1].strip() == q["answer"].strip():
            reasons["same_as_chosen"] += 1
        else:
            records.append(pair_record(q, *worst[qi], judge.name, ahash))
    if not records:
        raise OpenSEMError(f"no preference pairs: of {len(questions)} training questions, "
                           + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in reasons.items())
                           + " (the model already answers them well, or raise pairs.temperature)")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json(out.parent / MANIFEST, {
        "stage": "pairs", "created": now(), "config": pcfg.model_dump(mode="json"),
        "adapter": str(adapter_dir), "adapter_sha256": ahash, "model": {"path": weights.path, "fingerprint": weights.fingerprint},
        "judge": judge.name, "pass_threshold": ecfg.pass_threshold,
        "counts": {"questions": len(questions), "answers": total, "judged": judged, "judge_errors": errors,
                   "pairs": len(records), "dropped": dict(reasons)},
        "output": {"path": pcfg.output, "sha256": file_sha256(out)},
        "versions": versions("opensem", "transformers", "trl"), "wall_time_s": round(time.time() - t0, 1),
    })
    console.print(f"pairs: {len(records)} preference pairs from {len(questions)} training questions written to {pcfg.output} "
                  f"(dropped: {dict(reasons) or 'none'})")
    return out


def sample_answers(ws: Workspace, questions: list[dict], weights, adapter_dir: Path, ahash: Optional[str],
                   console: Console) -> tuple[dict[int, list[str]], int]:
    """The tuned model's sampled answers to each question (by index; empty answers left out), through the answer
    cache, and how many were asked for."""
    from opensem.inference import answer_cache_dir, answer_key, cached_answers
    from opensem.judge.answers import conversation
    from opensem.progress import stage_progress

    pcfg = ws.preference_config().pairs
    requests, owner = [], {}
    for qi, q in enumerate(questions):
        for v in range(pcfg.samples_per_question):
            base_key = answer_key(weights.fingerprint, ahash, q["system"], q["question"], pcfg.max_new_tokens, pcfg.temperature)
            key = hashlib.sha256(f"{base_key}:sample{v}:seed{pcfg.seed}".encode()).hexdigest()
            requests.append((key, conversation(q["question"], q["system"])))
            owner[key] = qi
    try:
        with stage_progress(console, f"pairs: the tuned model answers {len(questions)} training questions "
                                     f"x {pcfg.samples_per_question}", len(requests)) as adv:
            got = cached_answers(answer_cache_dir(ws), weights.path, str(adapter_dir), requests, pcfg.max_new_tokens,
                                 pcfg.temperature, ws.eval_config().answers.batch_size, progress=adv)
    except KeyboardInterrupt:
        raise StageInterrupted("pairs interrupted: the answers made so far are cached; run it again to continue") from None
    samples: dict[int, list[str]] = {}
    for key, _ in requests:
        text = got[key]["answer"].strip()
        if text:
            samples.setdefault(owner[key], []).append(text)
    return samples, len(requests)


def worst_answers(questions: list[dict], samples: dict[int, list[str]], judge, threshold: float,
                  console: Console) -> tuple[dict[int, tuple[float, str]], int, int]:
    """Each question's lowest-scored distinct answer below the pass threshold; how many were judged; judge errors."""
    from opensem.progress import stage_progress

    flat = [(qi, s) for qi, ss in samples.items() for s in dict.fromkeys(ss)]  # distinct samples per question
    with stage_progress(console, f"pairs: judging {len(flat)} answers with {judge.short}", len(flat)) as adv:
        verdicts = []
        for start in range(0, len(flat), 64):
            part = flat[start:start + 64]
            verdicts += judge.score_many([(questions[qi]["question"], questions[qi]["answer"], s) for qi, s in part])
            adv(len(part))
    worst: dict[int, tuple[float, str]] = {}
    errors = 0
    for (qi, s), v in zip(flat, verdicts):
        if v.score is None:
            errors += 1
            continue
        if v.score < threshold and (qi not in worst or v.score < worst[qi][0]):
            worst[qi] = (v.score, s)
    return worst, len(flat), errors


def pair_record(q: dict, score: float, wrong: str, judge_name: str, ahash: Optional[str]) -> dict:
    """One DPO/ORPO example in TRL's conversational format: the grounded answer chosen, the model's own rejected."""
    sys_turn = [{"role": "system", "content": q["system"]}] if q["system"] else []
    return {"prompt": sys_turn + [{"role": "user", "content": q["question"]}],
            "chosen": [{"role": "assistant", "content": q["answer"]}],
            "rejected": [{"role": "assistant", "content": wrong}],
            "metadata": {**{k: q["metadata"].get(k) for k in ("source", "chunk_id", "chunk_sha")},
                         "rejected_score": score, "judge": judge_name, "adapter_sha256": ahash}}

"""The model card every export carries: ``models/exports/{run}/README.md``, a Hugging Face model card (YAML front
matter, then Markdown) that tells what the model was trained on, how it was judged and where it is weak, from the
records themselves: the adapter's manifest, the forge's, and the judge's results for this very adapter.

The judge's results are the newest whose lineage names this adapter (opensem/verdict.py), with the row the judge
recommends shipping; the forge's manifest is the last finished `forge` stage's when it names this adapter's data.
A model that was never judged here says so instead of showing numbers.
"""

from __future__ import annotations

import re
from typing import Optional

import yaml

from opensem.lineage import read_json
from opensem.stages import load_stage, recall
from opensem.verdict import judged

HF_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the embedded model's own repository


def forged(ws, train_manifest: dict) -> Optional[dict]:
    """The forge's manifest of the data this adapter was trained on, or None."""
    result = recall(ws, "forge")
    if result is None or result.summary.get("manifest_sha256") != (train_manifest.get("data") or {}).get("forge_manifest_sha256"):
        return None
    return load_stage("forge").details(ws, result)


def front_matter(m: dict, cfg, library: str) -> str:
    base = (m.get("base_model") or {}).get("name") or "unknown"
    meta = {"base_model": HF_IDS.get(base, base), "library_name": library,
            "tags": ["opensem", "lora", "domain-expert", *cfg.card.tags], "license": cfg.card.license or "other"}
    if cfg.card.datasets:
        meta["datasets"] = list(cfg.card.datasets)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


def quote(text, limit: int = 200) -> str:
    """Text from the golden set as the card may show it: one line, at most ``limit`` characters, HTML escaped and
    every Markdown sign escaped, so it can add no heading, table, link, image or script to the card."""
    import html

    one = " ".join(str(text).split())
    one = one if len(one) <= limit else one[: limit - 1] + "…"
    return MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one, quote=False))


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _cell(summary: Optional[dict], key: str, pct: bool) -> str:
    """A summary's value with its 95% CI, e.g. ``23.9% [13.0, 37.0]`` or ``2.47 [2.07, 2.89]``."""
    if not summary or summary.get(key) is None:
        return "-"
    scale, unit, digits = (100, "%", 1) if pct else (1, "", 2)
    ci = summary.get(f"{key}_ci")
    text = f"{summary[key] * scale:.{digits}f}{unit}"
    return text + (f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]" if ci else "")


def calibration_line(ws, judge: Optional[str]) -> str:
    """The judge's agreement with human scores, as `opensem judge --calibrate` last measured it here."""
    from opensem.judge.stage import calibration_record

    m = read_json(calibration_record(ws), {}).get("judges", {}).get(judge)
    if not m:
        return "The judge's agreement with human scores was not measured in this workspace (`opensem judge --calibrate`)."
    rho = f"{m['spearman']:.2f}" if isinstance(m.get("spearman"), (int, float)) else f"undefined ({m.get('spearman_undefined', 'not measured')})"
    return (f"Judge calibration (`opensem judge --calibrate`, {m['n']} human-scored answers, {m['set']}): Spearman "
            f"{rho}, exact {m['exact']:.0%}, within one point {m['within_1']:.0%}.")


def evaluation(res: dict, baseline: Optional[dict] = None, calibration: str = "") -> list[str]:
    """The judged numbers: the table with CIs (``baseline``: the baseline's summary), the judge and its calibration,
    retrieval rows, forgetting, top regressions."""
    c, s = res["comparison"], res["summary"]
    ci = c["mean_diff_ci"]
    lines = ["## Evaluation", "", f"Judged on {c['paired_n']} hand-written golden questions by **{res.get('judge')}** "
             f"(a score of {res.get('pass_threshold')} or more out of 5 counts as correct)."]
    lines += ["", calibration] if calibration else []
    base_accuracy = _cell(baseline or {"accuracy": c["accuracy_baseline"]}, "accuracy", True)
    lines += ["", "| 95% CI in brackets | Baseline | Fine-Tuned |", "|---|---:|---:|",
              f"| accuracy | {base_accuracy} | {_cell(s, 'accuracy', True)} |",
              f"| mean score (1-5) | {_cell(baseline, 'mean_score', False)} | {_cell(s, 'mean_score', False)} |", "",
              f"Mean score difference {c['mean_diff']:+.2f}, 95% CI [{ci[0]:.2f}, {ci[1]:.2f}] (paired bootstrap), "
              f"win / tie / loss {c['wins']} / {c['ties']} / {c['losses']}, p = {_f(c.get('p_value'), '.4f')}."]
    if res.get("forgetting"):
        lines += ["", f"Forgetting check: {res['forgetting']['message']}"]
    regressions = c.get("regressions") or []
    if regressions:
        shown = "" if len(regressions) <= 5 else "; the 5 largest drops"
        lines += ["", f"Questions it answers worse than the base model ({len(regressions)}{shown}):", ""]
        lines += [f"- {quote(g['question'])} ({g['baseline_score']:.1f} -> {g['fine_tuned_score']:.1f})" for g in regressions[:5]]
    return lines


def how_to_use(res: Optional[dict], run_name: str, files: dict) -> list[str]:
    """The row the judge recommends, its judged accuracy and score with CIs, and how to query it that way."""
    rec = (res or {}).get("recommended")
    if not rec:
        return []
    s = rec["summary"]
    lines = ["## Recommended use", "", f"The judge recommends **{rec['label']}**: accuracy {_cell(s, 'accuracy', True)}, "
             f"mean score {_cell(s, 'mean_score', False)} on {s.get('n')} golden questions (95% CIs). "
             f"{res.get('recommendation') or ''}".rstrip()]
    if not rec["fine_tuned"]:
        lines += ["", "The fine-tuned model did not beat the base model on this row: weigh shipping the base model instead."]
    if rec["retrieval"]:
        r = rec.get("retrieval_settings") or {}
        bundle = "retrieval" in files
        lines += ["", f"Ask it with the top {r.get('top_k')} passages of the documents in the prompt ({r.get('method')} "
                  f"retrieval), as it was judged: `opensem serve {run_name}` and `opensem ask` do so by default"
                  + (", and the `retrieval/` folder of this export serves it without the workspace "
                     "(its README.md says how)." if bundle else ".")]
    else:
        lines += ["", f"Ask it as it is, without passages: `opensem serve {run_name}`, or any runtime of the files below."]
    return lines


def limitations(res: Optional[dict]) -> list[str]:
    """Stated from the measured results, not boilerplate."""
    if res is None:
        return ["- It was not judged in the workspace it was exported from: its quality is not measured."]
    c = res["comparison"]
    acc, n = c["accuracy_fine_tuned"], c["paired_n"]
    out = [f"- It answered {acc * 100:.0f}% of {n} golden questions correctly: check its answers against the documents."]
    if c["mean_diff_ci"][0] <= 0:
        out.append("- Fine-tuning made no significant difference on the golden set (the paired CI holds 0).")
    if (res.get("forgetting") or {}).get("flagged"):
        out.append(f"- It lost general knowledge: {res['forgetting']['message']}")
    if c.get("regressions"):
        out.append(f"- It answers {len(c['regressions'])} golden question(s) worse than the base model (listed above).")
    return out


def library_for(files) -> str:
    """The card's library_name for what is shipped (format keys): GGUF files, merged weights, or the adapter."""
    if any(k.startswith("gguf:") for k in files) and "lora-gguf" not in files:
        return "gguf"
    return "transformers" if "merged" in files else "peft"  # merged weights load in transformers alone


def card(ws, adapter_dir, cfg, files: dict) -> str:
    """The model card's text for a trained run (``files``: what its export holds, by format key; none for the adapter
    alone). ``cfg``: export_config.yaml's schema (the card's license, datasets and tags)."""
    from opensem.adapters import adapter_hash, chain_text

    m = read_json(adapter_dir / "manifest.json")
    sha, run_name, chain = adapter_hash(adapter_dir), m.get("run_name"), chain_text(adapter_dir)
    res, forge = judged(ws, sha), forged(ws, m)
    library = library_for(files)
    data = m.get("data") or {}
    teacher = (forge or {}).get("teacher") or {}
    tcfg = m.get("config") or {}
    lines = [front_matter(m, cfg, library), f"# {run_name}", "",
             f"A small domain expert: {(m.get('base_model') or {}).get('name')} with a LoRA adapter trained by OpenSEM on "
             f"question/answer pairs written from {(forge or {}).get('counts', {}).get('files', 'its')} documents.", ""]
    if res:
        baseline = read_json(ws.path(res["baseline_run"]) / "results.json", {}).get("summary") if res.get("baseline_run") else None
        lines += evaluation(res, baseline, calibration_line(ws, res.get("judge")))
        lines += [""] + how_to_use(res, run_name, files) if res.get("recommended") else []
    else:
        lines += ["## Evaluation", "", "Not judged in the workspace it was exported from."]
    lines += ["", "## Intended use and limitations", "",
              "Answering questions about the documents it was trained on, best checked against them."] + limitations(res)
    lines += ["", "## Lineage", "", f"- training data: `{(data.get('train') or {}).get('sha256')}` "
              f"({(data.get('train') or {}).get('examples')} examples)",
              f"- teacher: {teacher.get('provider')}/{teacher.get('model')}" if teacher else "- teacher: not recorded here",
              f"- chain: {chain or 'base -> sft'}",
              f"- adapter: `{sha}`",
              "", "## Training", "",
              f"- engine {m.get('engine')}, {m.get('steps')} steps, {m.get('wall_time_s')} s, on {(m.get('hardware') or {}).get('device')}",
              f"- LoRA r {tcfg.get('lora_r')}, alpha {tcfg.get('lora_alpha')}, learning rate {tcfg.get('learning_rate')}, "
              f"sequence_len {tcfg.get('sequence_len')}, exposures per fact {tcfg.get('exposures_per_fact')}"]
    return "\n".join(lines) + "\n"

"""Numbers and tables of a judge run: summaries, Baseline vs Fine-Tuned comparison, Markdown."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from rich.markup import escape
from rich.table import Table

from opensem.judge.stats import bootstrap_ci, paired_compare
from opensem.terminal import Console
from opensem.text import exact_match, rouge_l, token_f1


def summarize(items: list[dict], threshold: int, samples: int, seed: int) -> dict:
    """items: per golden item {id, question, golden, output, score, error}."""
    scored = [it for it in items if it["score"] is not None]
    scores = [it["score"] for it in scored]
    return {
        "n": len(items),
        "scored": len(scored),
        "judge_errors": len(items) - len(scored),
        "mean_score": float(np.mean(scores)) if scores else None,
        "mean_score_ci": bootstrap_ci(scores, samples, seed) if scores else None,
        "accuracy": float(np.mean([s >= threshold for s in scores])) if scores else None,
        "accuracy_ci": bootstrap_ci([float(s >= threshold) for s in scores], samples, seed) if scores else None,
        "exact_match": float(np.mean([exact_match(it["output"], it["golden"]) for it in items])) if items else None,
        "token_f1": float(np.mean([token_f1(it["output"], it["golden"]) for it in items])) if items else None,
        "rouge_l": float(np.mean([rouge_l(it["output"], it["golden"]) for it in items])) if items else None,
        "mean_length_words": float(np.mean([len(it["output"].split()) for it in items])) if items else None,
    }


def compare(base_items: list[dict], tuned_items: list[dict], threshold: int, samples: int, seed: int) -> dict:
    b = {it["id"]: it for it in base_items}
    pairs = [(b[t["id"]], t) for t in tuned_items if t["id"] in b and t["score"] is not None and b[t["id"]]["score"] is not None]
    bs = [x["score"] for x, _ in pairs]
    ts = [y["score"] for _, y in pairs]
    p = paired_compare(bs, ts, samples, seed)
    acc_b = float(np.mean([s >= threshold for s in bs])) if bs else 0.0
    acc_t = float(np.mean([s >= threshold for s in ts])) if ts else 0.0
    acc_pair = paired_compare([float(s >= threshold) for s in bs], [float(s >= threshold) for s in ts], samples, seed)
    regressions = sorted(
        ({"id": y["id"], "question": y["question"], "golden": y["golden"], "baseline": x["output"], "fine_tuned": y["output"],
          "baseline_score": x["score"], "fine_tuned_score": y["score"], "drop": x["score"] - y["score"]}
         for x, y in pairs if y["score"] < x["score"] - 1e-9),
        key=lambda r: -r["drop"],
    )
    return {
        "paired_n": p.n,
        "excluded_for_errors": len(tuned_items) - len(pairs),
        "mean_diff": p.mean_diff,
        "mean_diff_ci": p.ci,
        "p_value": p.p_value,
        "wins": p.wins,
        "ties": p.ties,
        "losses": p.losses,
        "accuracy_baseline": acc_b,
        "accuracy_fine_tuned": acc_t,
        "accuracy_diff_pp": (acc_t - acc_b) * 100,
        "accuracy_diff_ci_pp": (acc_pair.ci[0] * 100, acc_pair.ci[1] * 100),
        "accuracy_relative": ((acc_t - acc_b) / acc_b * 100) if acc_b > 0 else None,
        "regressions": regressions,
    }


def significance(cmp: dict) -> str:
    """'up' when the paired 95% CI of the mean score difference lies above zero, 'down' below it, else 'none'."""
    lo, hi = cmp["mean_diff_ci"]
    return "up" if lo > 0 else "down" if hi < 0 else "none"


def headline(cmp: dict) -> str:
    """The closing line. A change is called an improvement (or a loss) only when its paired CI excludes zero."""
    pp, rel = cmp["accuracy_diff_pp"], cmp["accuracy_relative"]
    a, b = cmp["accuracy_baseline"] * 100, cmp["accuracy_fine_tuned"] * 100
    rel_s = f", {rel:+.0f}% relative" if rel is not None else ""
    acc = f"{a:.1f}% -> {b:.1f}%: {pp:+.1f} percentage points{rel_s}"
    score = f"mean score {cmp['mean_diff']:+.2f}, 95% CI {_ci(cmp['mean_diff_ci'])}"
    sig = significance(cmp)
    if sig == "up":
        if pp > 0:
            return f"Accuracy improved by {pp:.1f}% ({acc})"
        return f"Mean score improved by {cmp['mean_diff']:+.2f} (95% CI {_ci(cmp['mean_diff_ci'])}); accuracy {a:.1f}% -> {b:.1f}%"
    if sig == "down":
        if pp < 0:
            return f"Accuracy fell by {-pp:.1f}% ({acc})"
        return f"Mean score fell by {cmp['mean_diff']:+.2f} (95% CI {_ci(cmp['mean_diff_ci'])}); accuracy {a:.1f}% -> {b:.1f}%"
    return f"No significant change (accuracy {acc}; {score})"


def _f(x, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _ci(ci, digits=2) -> str:
    return "-" if not ci else f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


SUMMARY_ROWS = [
    ("n (scored / judge errors)", lambda s: f"{s['n']} ({s['scored']} / {s['judge_errors']})"),
    ("mean judge score (1-5)", lambda s: _f(s["mean_score"])),
    ("  95% bootstrap CI", lambda s: _ci(s["mean_score_ci"])),
    ("accuracy (score >= pass)", lambda s: _pct(s["accuracy"])),
    ("exact match", lambda s: _pct(s["exact_match"])),
    ("token F1", lambda s: _f(s["token_f1"], 3)),
    ("ROUGE-L", lambda s: _f(s["rouge_l"], 3)),
    ("mean answer length (words)", lambda s: _f(s["mean_length_words"], 1)),
]


# "+ retrieval" rows: the same model with the top-k passages in the prompt. Pairs (A, B) compare B - A.
RETRIEVAL_PAIRS = [("baseline", "baseline_retrieval"), ("baseline_retrieval", "fine_tuned"),
                   ("fine_tuned", "fine_tuned_retrieval"), ("baseline_retrieval", "fine_tuned_retrieval")]
ROW_NAMES = {"baseline": "Baseline", "baseline_retrieval": "Baseline + retrieval", "fine_tuned": "Fine-Tuned",
             "fine_tuned_retrieval": "Fine-Tuned + retrieval"}


def columns(base: Optional[dict], tuned: Optional[dict]) -> list[tuple[str, dict]]:
    """(title, results row) for each model row there is: Baseline, Baseline + retrieval, Fine-Tuned, ..."""
    cols = []
    for res, name in ((base, "Baseline"), (tuned, "Fine-Tuned")):
        if res:
            cols.append((name, res))
            if res.get("retrieval"):
                cols.append((f"{name} + retrieval", res["retrieval"]))
    return cols


def render(console: Console, judge_name: str, base: Optional[dict], tuned: Optional[dict], cmp: Optional[dict],
           forgetting: Optional[dict] = None) -> None:
    title = "Baseline vs Fine-Tuned" if (base and tuned) else ("Baseline" if base else "Fine-Tuned")
    table = Table(title=f"{title}  -  judge: {judge_name}")
    table.add_column("metric")
    cols = columns(base, tuned)
    for name, _ in cols:
        table.add_column(name, justify="right")
    for label, fn in SUMMARY_ROWS:
        table.add_row(label, *[fn(res["summary"]) for _, res in cols])
    if any("recall_at_k" in res for _, res in cols):
        table.add_row("retrieval recall@k", *[_pct(res["recall_at_k"]) if "recall_at_k" in res else "" for _, res in cols])
    console.print(table)
    if cmp:
        t = Table(title="paired comparison (same questions)")
        t.add_column("")
        t.add_column("value", justify="right")
        t.add_row("mean score difference", f"{cmp['mean_diff']:+.2f}")
        t.add_row("  95% bootstrap CI", _ci(cmp["mean_diff_ci"]))
        t.add_row("  paired permutation p-value", f"{cmp['p_value']:.4f}")
        t.add_row("win / tie / loss", f"{cmp['wins']} / {cmp['ties']} / {cmp['losses']}")
        t.add_row("accuracy difference (pp)", f"{cmp['accuracy_diff_pp']:+.1f}  CI {_ci(cmp['accuracy_diff_ci_pp'], 1)}")
        if cmp["excluded_for_errors"]:
            t.add_row("excluded (judge errors)", str(cmp["excluded_for_errors"]))
        console.print(t)
        if cmp["regressions"]:
            r = Table(title=f"regressions: {len(cmp['regressions'])} question(s) scored lower after fine-tuning")
            for col in ("id", "question", "baseline", "fine-tuned"):
                r.add_column(col)
            for g in cmp["regressions"][:10]:
                r.add_row(escape(g["id"]), escape(g["question"][:60]), f"{g['baseline_score']:.2f}", f"{g['fine_tuned_score']:.2f}")
            console.print(r)
        if forgetting:
            console.print(forgetting["message"])
        sig = significance(cmp)
        style = {"up": "bold green", "down": "bold red", "none": "bold"}[sig]
        tail = f"  (mean score {cmp['mean_diff']:+.2f}, 95% CI {_ci(cmp['mean_diff_ci'])})" if sig != "none" else ""
        console.print(f"[{style}]{escape(headline(cmp))}[/]{tail}")


def retrieval_line(rcmp: Optional[dict]) -> Optional[str]:
    """The second closing line: what fine-tuning bought over retrieval, and whether the two together are best."""
    if not rcmp:
        return None
    ft, both = rcmp["fine_tuned__baseline_retrieval"], rcmp["fine_tuned_retrieval__fine_tuned"]

    def said(c: dict) -> str:
        lo, hi = c["mean_diff_ci"]
        return f"{c['mean_diff']:+.2f}, 95% CI {_ci(c['mean_diff_ci'])}" + ("" if lo > 0 or hi < 0 else ", not significant")

    verdict = ("fine-tuning beats retrieval" if ft["mean_diff_ci"][0] > 0 else
               "retrieval beats fine-tuning" if ft["mean_diff_ci"][1] < 0 else "fine-tuning and retrieval are level")
    return (f"Fine-tuned vs baseline + retrieval: mean score {said(ft)} ({verdict}); "
            f"fine-tuned + retrieval vs fine-tuned: {said(both)}")


SERVING_COST = ["baseline", "fine_tuned", "baseline_retrieval", "fine_tuned_retrieval"]  # cheapest to serve first


def recommend(rows: dict[str, list[dict]], pass_threshold: int, samples: int, seed: int) -> tuple[str, str]:
    """Which of the four rows to ship, and the line that says why: the best by mean score, unless a cheaper one is
    level with it (paired CI holding 0), then the cheapest such one. Retrieval costs an index and longer prompts on
    every answer."""
    def mean(items):
        scores = [it["score"] for it in items if it.get("score") is not None]
        return sum(scores) / len(scores) if scores else float("-inf")

    def said(c):
        return f"{c['mean_diff']:+.2f}, 95% CI {_ci(c['mean_diff_ci'])}"

    best = max(SERVING_COST, key=lambda r: (mean(rows[r]), -SERVING_COST.index(r)))
    for cheaper in SERVING_COST[:SERVING_COST.index(best)]:
        c = compare(rows[cheaper], rows[best], pass_threshold, samples, seed)
        if c["mean_diff_ci"][0] <= 0:
            return cheaper, (f"On your data: {ROW_NAMES[cheaper]} is level with {ROW_NAMES[best]} ({ROW_NAMES[best]} - "
                             f"{ROW_NAMES[cheaper]}: {said(c)}) and cheaper to serve: use {ROW_NAMES[cheaper]}")
    runner = max((r for r in SERVING_COST if r != best), key=lambda r: mean(rows[r]))
    c = compare(rows[runner], rows[best], pass_threshold, samples, seed)
    level = c["mean_diff_ci"][0] <= 0
    return best, (f"On your data: {ROW_NAMES[best]} is best ({said(c)} over {ROW_NAMES[runner]}"
                  + (", which is level with it and costs more to serve)" if level else ")"))


def render_retrieval(console: Console, base: Optional[dict], tuned: Optional[dict], rcmp: Optional[dict]) -> None:
    if not rcmp:
        return
    t = Table(title="with retrieval: paired comparisons (same questions, same judge)")
    for col in ("", "mean score difference", "95% CI", "win / tie / loss", "accuracy (pp)"):
        t.add_column(col, justify="right" if col else "left")
    for a, b in RETRIEVAL_PAIRS:
        c = rcmp[f"{b}__{a}"]
        t.add_row(f"{ROW_NAMES[b]} vs {ROW_NAMES[a]}", f"{c['mean_diff']:+.2f}", _ci(c["mean_diff_ci"]),
                  f"{c['wins']} / {c['ties']} / {c['losses']}", f"{c['accuracy_diff_pp']:+.1f}")
    console.print(t)
    console.print(f"[bold]{retrieval_line(rcmp)}[/]")
    if tuned and tuned.get("recommendation"):
        console.print(f"[bold]{tuned['recommendation']}[/]")


def markdown(judge_name: str, base: Optional[dict], tuned: Optional[dict], cmp: Optional[dict], lineage: dict,
             forgetting: Optional[dict] = None, rcmp: Optional[dict] = None, recommendation: Optional[str] = None) -> str:
    cols = columns(base, tuned)
    lines = ["# OpenSEM judge report", "", f"Judge: **{judge_name}**", "", "| metric | " + " | ".join(n for n, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label, fn in SUMMARY_ROWS:
        lines.append(f"| {label.strip()} | " + " | ".join(fn(res["summary"]) for _, res in cols) + " |")
    if any("recall_at_k" in res for _, res in cols):
        lines.append("| retrieval recall@k | " + " | ".join(_pct(res["recall_at_k"]) if "recall_at_k" in res else "" for _, res in cols) + " |")
    if cmp:
        lines += ["", f"**{headline(cmp)}**", "",
                  f"- mean score difference {cmp['mean_diff']:+.2f}, 95% CI {_ci(cmp['mean_diff_ci'])}, paired permutation p = {cmp['p_value']:.4f}",
                  f"- win / tie / loss: {cmp['wins']} / {cmp['ties']} / {cmp['losses']}",
                  f"- regressions: {len(cmp['regressions'])}"]
        for g in cmp["regressions"][:20]:
            lines.append(f"  - `{g['id']}` {g['question']} ({g['baseline_score']:.2f} -> {g['fine_tuned_score']:.2f})")
        if forgetting:
            lines += ["", f"- forgetting check: {forgetting['message']}"]
    if tuned and tuned.get("diagnosis"):
        lines += ["", f"**{tuned['diagnosis']}**"]
    if rcmp:
        lines += ["", "## With retrieval", "", f"**{retrieval_line(rcmp)}**", ""] + ([f"**{recommendation}**", ""] if recommendation else []) + [
                  "| comparison | mean score difference | 95% CI | win / tie / loss |", "|---|---:|---:|---:|"]
        for a, b in RETRIEVAL_PAIRS:
            c = rcmp[f"{b}__{a}"]
            lines.append(f"| {ROW_NAMES[b]} vs {ROW_NAMES[a]} | {c['mean_diff']:+.2f} | {_ci(c['mean_diff_ci'])} | "
                         f"{c['wins']} / {c['ties']} / {c['losses']} |")
    lines += ["", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in lineage.items()]
    return "\n".join(lines) + "\n"


STEP_NAMES = {"sft_vs_baseline": ("Fine-Tuned (SFT)", "Baseline"), "preference_vs_sft": ("SFT + preference", "Fine-Tuned (SFT)"),
              "final_vs_baseline": ("SFT + preference", "Baseline")}


def render_steps(console: Console, steps: dict) -> None:
    """Each step of the chain base -> SFT -> SFT + preference, paired on the same golden questions."""
    t = Table(title="each step of the chain, paired on the same golden questions")
    for col in ("step", "mean score difference", "95% CI", "win / tie / loss", "accuracy (pp)", "regressions"):
        t.add_column(col, justify="right" if col != "step" else "left")
    for key, (b, a) in STEP_NAMES.items():
        c = steps.get(key)
        if c:
            t.add_row(f"{b} vs {a}", f"{c['mean_diff']:+.2f}", _ci(c["mean_diff_ci"]), f"{c['wins']} / {c['ties']} / {c['losses']}",
                      f"{c['accuracy_diff_pp']:+.1f}", str(c["regressions"]))
    console.print(t)

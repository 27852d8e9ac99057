"""One self-contained HTML report per run: loss curve, score distributions, per-question table, each stage's
own sections and the lineage. Plots are matplotlib PNGs embedded as data URIs; every text is HTML-escaped."""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1f2933;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#52606d;margin-top:0}
.headline{font-size:1.5rem;font-weight:700;padding:1rem 1.2rem;border-radius:8px;background:#e3f9e5;color:#05400a;margin:1rem 0}
.headline.down{background:#ffe3e3;color:#610404} .headline.flat{background:#f0f4f8;color:#243b53}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:.8rem;margin:1rem 0}
.card{border:1px solid #d9e2ec;border-radius:8px;padding:.7rem 1rem}.card b{display:block;font-size:1.3rem}
.card span{color:#52606d;font-size:.85rem}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:1rem}.plots img{width:100%;border:1px solid #d9e2ec;border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:.88rem;margin:.5rem 0 1.5rem}
th,td{border-bottom:1px solid #e4e7eb;padding:.4rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f7fa;position:sticky;top:0} td.num{text-align:right;white-space:nowrap}
tr.regression{background:#fff1f1} tr.improved{background:#f1fff4}
.reason{color:#616e7c;font-size:.78rem} code{font-size:.8rem;word-break:break-all}
td.id{white-space:nowrap} .warn{background:#fff3c4;border-left:4px solid #f0b429;padding:.6rem 1rem;border-radius:4px}
.label{display:inline-block;padding:.1rem .4rem;border-radius:4px;background:#fff3c4;color:#8d2b0b;font-size:.8rem}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def loss_plot(rows: list[dict]) -> str | None:
    """The trainer's log history (one dict per logged step) as a loss curve."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(*zip(*train), marker="o", ms=3, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", ms=5, ls="--", label="eval loss (test.jsonl)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def score_plot(base: list, tuned: list, judge: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bins = [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5.01]
    ax.hist([base, tuned], bins=bins, label=["Baseline", "Fine-Tuned"], color=["#9fb3c8", "#2f8132"])
    ax.set_xlabel("judge score (1-5)")
    ax.set_ylabel("questions")
    ax.set_title("Score distribution")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _retrieval_section(base_res: dict, ft_res: dict) -> str:
    """The four rows (baseline, + retrieval, fine-tuned, + retrieval) and their paired comparisons, when retrieval ran."""
    from opensem.judge import report

    rcmp = ft_res.get("retrieval_comparisons")
    if not rcmp:
        return ""
    cols = report.columns(base_res, ft_res)
    head = "".join(f"<th>{escape(n)}</th>" for n, _ in cols)
    body = "".join(f"<tr><td>{escape(label.strip())}</td>" + "".join(f"<td class='num'>{escape(fn(r['summary']))}</td>" for _, r in cols)
                   + "</tr>" for label, fn in report.SUMMARY_ROWS)
    body += "<tr><td>retrieval recall@k</td>" + "".join(
        f"<td class='num'>{_f(r['recall_at_k'] * 100, '.1f') + '%' if r.get('recall_at_k') is not None else ''}</td>" for _, r in cols) + "</tr>"
    pairs = "".join(
        f"<tr><td>{escape(report.ROW_NAMES[b])} vs {escape(report.ROW_NAMES[a])}</td><td class='num'>{_f(c['mean_diff'], '+.2f')}</td>"
        f"<td class='num'>[{_f(c['mean_diff_ci'][0])}, {_f(c['mean_diff_ci'][1])}]</td>"
        f"<td class='num'>{c['wins']} / {c['ties']} / {c['losses']}</td></tr>"
        for a, b in report.RETRIEVAL_PAIRS for c in [rcmp[f"{b}__{a}"]])
    rec = f"<p class='headline flat'>{escape(ft_res['recommendation'])}</p>" if ft_res.get("recommendation") else ""
    return (f"<h2>Fine-tune or retrieve?</h2><p class='headline flat'>{escape(report.retrieval_line(rcmp) or '')}</p>{rec}"
            f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<table><thead><tr><th>comparison</th><th>mean score difference</th><th>95% CI</th><th>win / tie / loss</th></tr></thead>"
            f"<tbody>{pairs}</tbody></table>")


def sections_html(sections) -> str:
    """The stages' own sections (opensem.stages.ReportSection), in the order the stages ran."""
    html = []
    for sec in (s for s in sections if s.shown):
        if sec.header:
            head = "<thead><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in sec.header) + "</tr></thead>"
            body = "".join("<tr>" + "".join(f"<td{' class=num' if i else ''}>{escape(str(c))}</td>" for i, c in enumerate(row))
                           + "</tr>" for row in sec.rows)
        else:
            head, body = "", "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in sec.rows)
        note = f"<p class='headline flat'>{escape(sec.note)}</p>" if sec.note else ""
        table = f"<table>{head}<tbody>{body}</tbody></table>" if sec.rows else ""
        html.append(f"<h2>{escape(sec.title)}</h2>{note}{table}")
    return "".join(html)


def banner(cmp: dict) -> tuple[str, str]:
    """The page's headline and its class: green only for a change whose paired CI lies above zero, red for one
    below it, neutral otherwise (the text then says "No significant change")."""
    from opensem.judge import report

    if not cmp:
        return "flat", "no comparison"
    return {"up": "", "down": "down", "none": "flat"}[report.significance(cmp)], report.headline(cmp)


def write_html_report(path: Path, manifest: dict, sections: list, training_log: list[dict], base_res: dict, ft_res: dict) -> None:
    """The page: the judged model against the baseline (headline, cards, plots, retrieval rows, every question), then
    each stage's own sections, the stage times and the lineage (the judge's, and each section's)."""
    cmp = ft_res.get("comparison") or {}
    titems = ft_res.get("items", [])
    cls, headline = banner(cmp)  # this page's table: the fine-tuned stage's model
    judge = ft_res.get("judge", "")
    offline = "offline" in judge
    cards = _cards(base_res.get("summary", {}), ft_res.get("summary", {}), cmp)
    plots = [p for p in (loss_plot(training_log), score_plot(
        [it["score"] for it in base_res.get("items", []) if it["score"] is not None],
        [it["score"] for it in titems if it["score"] is not None], judge)) if p]
    rows = _question_rows(base_res, titems)
    lineage = ft_res.get("lineage", {}) | {k: v for sec in sections for k, v in sec.lineage.items() if v}
    stage_rows = "".join(f"<tr><td>{escape(k)}</td><td class='num'>{'skipped' if v['skipped'] else _f(v['seconds'], '.1f') + ' s'}</td></tr>"
                         for k, v in manifest["stages"].items())
    forgetting = ft_res.get("forgetting") or {}
    retrieval = _retrieval_section(base_res, ft_res)
    html = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>OpenSEM run {escape(manifest['run_id'])}</title>
<style>{CSS}</style></head><body>
<h1>OpenSEM run {escape(manifest['run_id'])}</h1>
<p class="sub">Baseline vs Fine-Tuned on {len(titems)} golden questions · judge: {escape(judge)}
{"<span class='label'>offline reference scorer, not an LLM judge</span>" if offline else ""}</p>
<div class="headline {cls}">{escape(headline)}</div>
<div class="cards">{''.join(f"<div class='card'><span>{escape(k)}</span><b>{escape(v)}</b></div>" for k, v in cards)}</div>
<div class="plots">{''.join(f"<img alt='plot' src='{p}'>" for p in plots)}</div>
{f"<p class='{'warn' if forgetting.get('flagged') else ''}'>Forgetting check: {escape(forgetting.get('message', ''))}</p>" if forgetting else ""}
{f"<p class='headline flat'>{escape(ft_res['diagnosis'])}</p>" if ft_res.get("diagnosis") else ""}
{retrieval}
<h2>Per question</h2>
<p class="sub">Sorted with regressions (score fell) first, highlighted in red; improvements in green.</p>
<table><thead><tr><th>id</th><th>question</th><th>golden answer</th><th>baseline answer</th><th>fine-tuned answer</th>
<th>base</th><th>tuned</th><th>Δ</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
{sections_html(sections)}
<h2>Stage times</h2><table>{stage_rows}</table>
<h2>Lineage</h2><table>{''.join(f"<tr><td>{escape(str(k))}</td><td><code>{escape(str(v))}</code></td></tr>" for k, v in lineage.items())}</table>
</body></html>"""
    path.write_text(html, encoding="utf-8")


def _cards(bs: dict, fs: dict, cmp: dict) -> list[tuple[str, str]]:
    ci = cmp.get("mean_diff_ci") or [None, None]
    return [
        ("mean score", f"{_f(bs.get('mean_score'))} → {_f(fs.get('mean_score'))}"),
        ("difference [95% CI]", f"{_f(cmp.get('mean_diff'), '+.2f')} [{_f(ci[0])}, {_f(ci[1])}]"),
        ("p-value (paired)", _f(cmp.get("p_value"), ".4f")),
        ("win / tie / loss", f"{cmp.get('wins', '-')} / {cmp.get('ties', '-')} / {cmp.get('losses', '-')}"),
        ("accuracy", f"{_f((bs.get('accuracy') or 0) * 100, '.1f')}% → {_f((fs.get('accuracy') or 0) * 100, '.1f')}%"),
        ("token F1", f"{_f(bs.get('token_f1'), '.3f')} → {_f(fs.get('token_f1'), '.3f')}"),
    ]


def _question_rows(base_res: dict, titems: list[dict]) -> list[str]:
    """One row per golden question, regressions first."""
    bitems = {it["id"]: it for it in base_res.get("items", [])}
    rows = []
    for it in sorted(titems, key=lambda t: (t["score"] or 0) - (bitems.get(t["id"], {}).get("score") or 0)):
        b = bitems.get(it["id"], {})
        d = None if it["score"] is None or b.get("score") is None else it["score"] - b["score"]
        rc = "regression" if d is not None and d < 0 else "improved" if d is not None and d > 0 else ""
        rows.append(
            f"<tr class='{rc}'><td class='id'><code>{escape(it['id'])}</code></td><td>{escape(it['question'])}</td>"
            f"<td>{escape(it['golden'])}</td>"
            f"<td>{escape(b.get('output', ''))}<div class='reason'>{escape(b.get('reason') or b.get('error') or '')}</div></td>"
            f"<td>{escape(it['output'])}<div class='reason'>{escape(it.get('reason') or it.get('error') or '')}</div></td>"
            f"<td class='num'>{_f(b.get('score'))}</td><td class='num'>{_f(it['score'])}</td><td class='num'>{_f(d, '+.2f')}</td></tr>"
        )
    return rows

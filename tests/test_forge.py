"""Data Forge: ingest, chunking, teachers behind fake OpenAI/Anthropic servers, quality gates, resume, cost."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, child, default_sigint, read_jsonl, run_cli, scaled, set_config

from opensem.errors import OpenSEMError
from opensem.forge import run_forge
from opensem.forge.documents import Document, chunk_document, count_tokens, read_documents
from opensem.forge.quality import Pair, split_by_chunk
from opensem.workspace import Workspace

DOC = """# Halden H-40 Pump

## Specifications

The Halden H-40 pump runs at a maximum pressure of 12 bar. Its motor draws 450 watts at full load.
The H-40 weighs 14 kilograms and is made of marine-grade bronze.

## Maintenance

Replace the H-40 impeller seal every 2,000 operating hours. Flush the pump housing with fresh water after
pumping salt water. The warranty of the H-40 lasts four years when the seal schedule is kept.
"""


def write_docs(ws: Path, n: int = 1) -> None:
    for i in range(n):
        (ws / "data" / "raw" / f"pump{i}.md").write_text(DOC.replace("H-40", f"H-4{i}"))


def use_openai(ws: Path, fake, **extra) -> None:
    set_config(ws, "forge", teacher={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "gpt-4o-mini",
                                     "api_key_env": "FAKE_KEY", "concurrency": 4, "max_retries": 4, "timeout_s": 1.0, **extra},
               generation={"pairs_per_chunk": 3})


# --- ingest and chunking --------------------------------------------------------------------------------
def test_ingest_txt_md_pdf_recursively_and_skips_bad_files(tmp_path):
    from fpdf import FPDF

    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.md").write_text("# Title\n\nSome text here.")
    (raw / "sub" / "b.txt").write_bytes("Caf\xe9 cr\xe8me in cp1252.".encode("cp1252"))
    (raw / "empty.txt").write_text("   \n")
    (raw / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (raw / "image.png").write_bytes(b"\x89PNG")
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 8, "The pdf says the valve opens at 3 bar.")
    pdf.output(str(raw / "sub" / "c.pdf"))
    (raw / "sub" / "d.txt").write_bytes("Café crème in UTF-8.".encode("utf-8"))
    docs, skipped = read_documents(raw)
    assert {d.path for d in docs} == {"a.md", "sub/c.pdf", "sub/d.txt"}
    assert "Café crème" in next(d.text for d in docs if d.path == "sub/d.txt")
    assert "valve opens at 3 bar" in next(d.text for d in docs if d.path == "sub/c.pdf")
    reasons = {s.path: s.reason for s in skipped}
    assert "empty" in reasons["empty.txt"] and "unreadable" in reasons["broken.pdf"] and "unsupported" in reasons["image.png"]
    # a legacy single-byte encoding is skipped with the reason, never read as mojibake
    assert "not UTF-8 or UTF-16" in reasons["sub/b.txt"] and "save it as UTF-8" in reasons["sub/b.txt"]


def test_chunk_size_and_overlap_take_effect():
    text = "# Manual\n\n" + "\n\n".join(f"Paragraph {i} says that part {i} weighs {i * 3} grams and costs {i} euros." for i in range(60))
    doc = Document("m.md", text, "x")
    small = chunk_document(doc, chunk_tokens=40, overlap_tokens=0)
    big = chunk_document(doc, chunk_tokens=200, overlap_tokens=0)
    assert len(small) > 3 * len(big)
    assert all(c.tokens <= 40 for c in small) and all(c.tokens <= 200 for c in big)
    over = chunk_document(doc, chunk_tokens=60, overlap_tokens=20)
    assert all(c.overlap_text and c.text.startswith(c.overlap_text) for c in over[1:])
    assert all(0 < count_tokens(c.overlap_text) <= 20 for c in over[1:])
    assert over[1].overlap_text in over[0].text
    none = chunk_document(doc, chunk_tokens=60, overlap_tokens=0)
    assert all(not c.overlap_text for c in none)
    # ids and hashes are stable across runs; headings travel with the chunk
    assert [c.id for c in over] == [c.id for c in chunk_document(doc, 60, 20)]
    assert [c.sha for c in over] == [c.sha for c in chunk_document(doc, 60, 20)]
    assert over[0].heading == "Manual"


def test_chunks_follow_markdown_headings():
    chunks = chunk_document(Document("p.md", DOC, "x"), 256, 0)
    assert [c.heading for c in chunks] == ["Halden H-40 Pump > Specifications", "Halden H-40 Pump > Maintenance"]


# --- teachers behind fake servers ------------------------------------------------------------------------
def test_openai_compatible_happy_path_output_loads_and_keeps_provenance(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-fake-SECRET-value")
    write_docs(workspace, 3)
    use_openai(workspace, fake)
    m = run_forge(Workspace(workspace))
    train = read_jsonl(workspace / "data/processed/train.jsonl")
    test = read_jsonl(workspace / "data/processed/test.jsonl")
    assert m["counts"]["kept"] == len(train) + len(test) > 0
    r = train[0]
    assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
    assert set(r["metadata"]) >= {"source", "chunk_id", "chunk_sha", "teacher", "prompt_version"}
    # structured output was asked for
    assert fake.requests[0]["body"]["response_format"]["type"] == "json_schema"
    # the key is never written anywhere
    for f in (workspace / "data/processed").iterdir():
        assert "SECRET" not in f.read_text()
    for f in (workspace / ".opensem").rglob("*.json"):
        assert "SECRET" not in f.read_text()
    # loads with datasets as chat data
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(workspace / "data/processed/train.jsonl"), split="train")
    assert ds[0]["conversations"][0]["from"] == "human"
    # and the training floor consumes it
    from opensem.kernel.data import load_conversations, tokenize_conversations
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "models/base/smollm2-135m-instruct")
    convs = load_conversations(workspace / "data/processed/train.jsonl", "conversations")
    ts = tokenize_conversations(tok, convs, 256)
    assert len(ts.rows) == len(train) and all(any(r["assistant_masks"]) for r in ts.rows)


def test_anthropic_teacher_uses_tool_use(workspace, fake, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-SECRET")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.anthropic_url)
    write_docs(workspace, 1)
    set_config(workspace, "forge", teacher={"provider": "anthropic", "model": "claude-3-5-haiku-latest"},
               generation={"pairs_per_chunk": 3})
    m = run_forge(Workspace(workspace))
    assert fake.calls["/v1/messages"] == 2
    assert fake.requests[0]["body"]["tool_choice"]["type"] == "tool"
    assert m["counts"]["kept"] > 0
    assert m["cost"]["usd_total"] > 0  # priced from the default table
    assert "SECRET" not in json.dumps(m)


def test_429_with_retry_after_and_500s_are_retried(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    write_docs(workspace, 1)
    use_openai(workspace, fake)
    set_config(workspace, "forge", teacher__concurrency=1)
    fake.behaviour.script = {1: "429", 2: "500", 3: "500"}
    fake.behaviour.retry_after = "1"
    t = time.time()
    m = run_forge(Workspace(workspace))
    assert time.time() - t >= 1.0, "Retry-After must be honoured"
    assert fake.calls["/v1/chat/completions"] == 2 + 3
    assert m["counts"]["failed_requests"] == 0 and m["counts"]["kept"] > 0


def test_timeouts_retry_then_a_failed_chunk_is_reported_and_the_rest_kept(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    write_docs(workspace, 2)
    use_openai(workspace, fake, max_retries=1)
    set_config(workspace, "forge", teacher__concurrency=1)
    fake.behaviour.script = {1: "slow", 2: "slow"}  # the first request times out twice: gives up
    m = run_forge(Workspace(workspace))
    assert m["counts"]["failed_requests"] == 1
    assert len(m["failed_chunks"]) == 1
    assert m["counts"]["kept"] > 0


def test_malformed_and_non_json_replies_are_counted_not_fatal(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    write_docs(workspace, 2)
    use_openai(workspace, fake)
    set_config(workspace, "forge", teacher__concurrency=1)
    fake.behaviour.script = {1: "malformed", 2: "nonjson"}
    m = run_forge(Workspace(workspace))
    assert m["counts"]["rejected"]["malformed"] >= 1
    assert m["counts"]["kept"] > 0


def test_rate_limits_requests_and_tokens_per_window():
    from opensem.llm.base import RateLimiter

    rl = RateLimiter(rpm=3, tpm=None, window_s=0.5)
    t = time.perf_counter()
    for _ in range(6):
        rl.acquire(10)
    assert time.perf_counter() - t >= 0.5  # the 4th request waited for the window
    rl = RateLimiter(rpm=None, tpm=100, window_s=0.5)
    t = time.perf_counter()
    for _ in range(3):
        rl.acquire(60)  # 60 + 60 > 100: each waits for the previous to leave the window
    assert time.perf_counter() - t >= 1.0


def test_lenient_parsing_and_reasoning_blocks():
    from opensem.llm.base import parse_json_lenient, strip_reasoning

    assert strip_reasoning("<think>hmm {x}</think>Answer") == "Answer"
    assert parse_json_lenient('<think>a</think>Here:\n```json\n{"pairs": [{"question": "q?", "answer": "a",},]}\n```') == {
        "pairs": [{"question": "q?", "answer": "a"}]}


def test_killed_midway_resumes_with_zero_repeated_calls(workspace, fake, tmp_path):
    write_docs(workspace, 6)
    use_openai(workspace, fake)
    set_config(workspace, "forge", teacher__concurrency=1)
    fake.behaviour.delay_s = 0.3
    env = os.environ | {"FAKE_KEY": "k"}
    exe = Path(sys.executable).parent / "opensem"
    with child([str(exe), "forge", "-w", str(workspace)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               text=True, preexec_fn=default_sigint) as proc:
        deadline = time.time() + scaled(60)
        while fake.calls["/v1/chat/completions"] < 4 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=scaled(60))
    assert proc.returncode == 130, err
    assert "saved in the cache" in err
    # what the interrupted run finished is what it saved: one cache entry per answered request
    saved = [json.loads(f.read_text()) for f in (workspace / ".opensem/cache/teacher").rglob("*.json")]
    assert len(saved) >= 3
    finished = {json.dumps(e["messages"]) for e in saved}
    first = fake.calls["/v1/chat/completions"]
    fake.behaviour.delay_s = 0
    r = run_cli("forge", "-w", str(workspace), env={"FAKE_KEY": "k"})
    assert r.returncode == 0, r.stderr
    # stderr is a pipe here, not a terminal: the progress comes as plain lines, the last one complete
    progress = [x for x in r.stderr.splitlines() if re.search(r": \d+/12 \(\d+%\), [\d.]+/s, ", x)]
    assert progress and "12/12 (100%)" in progress[-1], r.stderr[-2000:]
    total_requests = 12  # 6 documents x 2 chunks
    resumed = fake.requests[first:]
    assert len(resumed) == total_requests - len(saved)
    # zero repeated calls for finished work
    assert not [x for x in resumed if json.dumps(x["body"]["messages"]) in finished]
    # and a third run is all cache
    before = fake.calls["/v1/chat/completions"]
    run_forge(Workspace(workspace))
    assert fake.calls["/v1/chat/completions"] == before


def test_max_cost_stops_cleanly_keeping_work(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    write_docs(workspace, 6)
    use_openai(workspace, fake)
    # each fake call costs 1000 in + 200 out tokens at gpt-4o-mini prices = 0.00027 USD
    set_config(workspace, "forge", teacher__concurrency=1, cost={"max_cost_usd": 0.001})
    m = run_forge(Workspace(workspace))
    assert m["status"].startswith("stopped: max_cost_usd")
    # a hard limit: a call starts only if its worst case (prompt estimate x 1.25 + all 1024 max_tokens,
    # about 0.0007 USD) still fits; after two calls (0.00054 spent) the third could overspend
    assert fake.calls["/v1/chat/completions"] == 2
    assert m["cost"]["usd_this_run"] == pytest.approx(0.00054) and m["cost"]["usd_this_run"] <= 0.001
    assert m["counts"]["kept"] > 0 and (workspace / "data/processed/train.jsonl").exists()
    # raising the budget continues without paying twice
    set_config(workspace, "forge", cost={"max_cost_usd": 1.0})
    run_forge(Workspace(workspace))
    assert fake.calls["/v1/chat/completions"] == 12


def test_dry_run_calls_nobody(workspace, fake):
    write_docs(workspace, 2)
    use_openai(workspace, fake)
    r = run_cli("forge", "--dry-run", "-w", str(workspace), env={"FAKE_KEY": "k"})
    assert r.returncode == 0, r.stderr
    assert "teacher calls" in r.stderr and "est. cost" in r.stderr
    assert fake.calls["/v1/chat/completions"] == 0


def test_missing_key_is_a_clear_error(workspace):
    write_docs(workspace, 1)
    set_config(workspace, "forge", teacher={"provider": "openai"})
    r = run_cli("forge", "-w", str(workspace))
    assert r.returncode == 2 and "OPENAI_API_KEY" in r.stderr and "Traceback" not in r.stderr


# --- quality gates -----------------------------------------------------------------------------------------
def test_decontamination_removes_a_planted_golden_question_and_its_paraphrase(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    write_docs(workspace, 1)
    use_openai(workspace, fake)
    golden = [{"question": "What is the maximum pressure of the Halden H-40 pump?", "answer": "12 bar."}]
    (workspace / "evals/golden_set.json").write_text(json.dumps(golden))
    planted = [
        {"question": "What is the maximum pressure of the Halden H-40 pump?", "answer": "The Halden H-40 pump runs at a maximum pressure of 12 bar."},
        {"question": "What's the Halden H-40 pump's maximum pressure?", "answer": "The H-40 pump runs at a maximum pressure of 12 bar."},
        {"question": "How much does the Halden H-40 pump weigh?", "answer": "The H-40 weighs 14 kilograms."},
    ]
    fake.behaviour.reply = lambda body: json.dumps({"pairs": planted})
    m = run_forge(Workspace(workspace))
    qs = [r["conversations"][0]["value"] for f in ("train", "test") for r in read_jsonl(workspace / f"data/processed/{f}.jsonl")]
    assert not any("pressure" in q for q in qs)
    assert "How much does the Halden H-40 pump weigh?" in qs
    assert m["counts"]["rejected"]["golden_overlap"] >= 2


def test_near_duplicates_and_ungrounded_pairs_are_rejected(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    write_docs(workspace, 1)
    use_openai(workspace, fake)
    pairs = [
        {"question": "How often should the H-40 impeller seal be replaced?", "answer": "Replace the H-40 impeller seal every 2,000 operating hours."},
        {"question": "How often should the H-40 impeller seal be replaced ?", "answer": "Every 2,000 operating hours the H-40 impeller seal is replaced."},
        {"question": "How often should the H-40 impeller seal be replaced?", "answer": "Replace the H-40 impeller seal every 2,000 operating hours."},
        {"question": "What fuel does the H-40 pump burn?", "answer": "It burns premium diesel from Norwegian refineries."},
        {"question": "According to the text, what is the H-40 made of?", "answer": "The H-40 is made of marine-grade bronze."},
    ]
    set_config(workspace, "forge", generation__pairs_per_chunk=len(pairs))  # every pair is asked for: the gates decide
    fake.behaviour.reply = lambda body: json.dumps({"pairs": pairs})
    m = run_forge(Workspace(workspace))
    rej = m["counts"]["rejected"]
    assert rej["beyond_pairs_per_chunk"] == 0
    assert rej["near_duplicate"] >= 1 and rej["exact_duplicate"] >= 1
    assert rej["ungrounded"] >= 1 and rej["not_standalone"] >= 1


def test_split_is_deterministic_and_grouped_by_chunk():
    pairs = [Pair(f"q{i}?", "a", f"c{i % 17}", "h", "s") for i in range(200)]
    train, test = split_by_chunk(pairs, 0.1, seed=3)
    assert {p.chunk_id for p in train}.isdisjoint({p.chunk_id for p in test})
    assert 0.05 <= len(test) / len(pairs) <= 0.2
    again = split_by_chunk(pairs, 0.1, seed=3)
    assert [p.question for p in again[1]] == [p.question for p in test]
    assert [p.question for p in split_by_chunk(pairs, 0.1, seed=4)[1]] != [p.question for p in test]


def test_messages_format_option(workspace, fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    write_docs(workspace, 1)
    use_openai(workspace, fake)
    set_config(workspace, "forge", output={"format": "messages", "test_ratio": 0.0}, generation={"pairs_per_chunk": 2, "system_prompt": "Be brief."})
    run_forge(Workspace(workspace))
    r = read_jsonl(workspace / "data/processed/train.jsonl")[0]
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]


def test_no_documents_is_a_clear_error(workspace):
    with pytest.raises(OpenSEMError, match="no readable .txt, .md or .pdf"):
        run_forge(Workspace(workspace))


# --- the embedded model as the local teacher ----------------------------------------------------------------
def test_local_embedded_teacher_makes_grounded_pairs(workspace):
    (workspace / "data/raw/pump.md").write_text(DOC)
    set_config(workspace, "forge", generation={"pairs_per_chunk": 6, "questions_per_sentence": 2}, output={"test_ratio": 0.0})
    m = run_forge(Workspace(workspace))
    assert m["strategy"] == "sentence" and m["teacher"]["provider"] == "local"
    rows = read_jsonl(workspace / "data/processed/train.jsonl")
    assert len(rows) >= 3
    doc_words = set(DOC.lower().split())
    for r in rows:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.endswith("?")
        assert a in DOC.replace("\n", " ") or all(w in doc_words for w in a.lower().split())  # the answer is source text
    # a rerun reuses every reply from the cache
    m2 = run_forge(Workspace(workspace))
    assert m2["cost"]["calls_made"] == 0 and m2["cost"]["calls_from_cache"] == m["counts"]["requests"]


# --- one code path: every strategy with every provider kind ------------------------------------------------------
@pytest.mark.parametrize("provider", ["openai", "anthropic", "openai-compatible", "local"])
@pytest.mark.parametrize("strategy", ["passage", "sentence"])
def test_every_strategy_with_every_provider_kind_writes_pairs(workspace, fake, monkeypatch, provider, strategy):
    """complete_many is the one way the forge calls any teacher: replies are parsed and cached the same way.
    (provider: local + strategy: passage used to mark every reply malformed and write nothing.)"""
    (workspace / "data/raw/pump.md").write_text(DOC)
    teacher = {"provider": provider, "concurrency": 2, "max_retries": 1, "timeout_s": 5.0}
    if provider == "openai":
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        monkeypatch.setenv("OPENAI_BASE_URL", fake.openai_url)
    elif provider == "anthropic":
        monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.anthropic_url)
    elif provider == "openai-compatible":
        teacher |= {"base_url": fake.openai_url, "model": "my-model"}
    else:
        teacher |= {"temperature": 0.0, "max_tokens": 96}
    set_config(workspace, "forge", teacher=teacher, cost={"max_cost_usd": None},
               generation={"strategy": strategy, "pairs_per_chunk": 4, "questions_per_sentence": 1})
    m = run_forge(Workspace(workspace))
    assert m["strategy"] == strategy and m["status"] == "complete"
    assert m["counts"]["kept"] > 0 and m["counts"]["train"] > 0
    rows = read_jsonl(workspace / "data/processed/train.jsonl")
    assert all(r["metadata"]["teacher"].startswith(provider) for r in rows)
    calls = sum(fake.calls.values())
    assert calls == (0 if provider == "local" else m["counts"]["requests"])
    # and every reply was cached: a rerun calls nobody and keeps the same data
    before = (workspace / "data/processed/train.jsonl").read_bytes()
    again = run_forge(Workspace(workspace))
    assert sum(fake.calls.values()) == calls and again["cost"]["calls_made"] == 0
    assert (workspace / "data/processed/train.jsonl").read_bytes() == before


@pytest.mark.slow
def test_the_local_teachers_shared_prefix_and_question_stop_keep_the_questions(base_models_dir):
    """The prompt prefix computed once per batch and the stop at '?' change the cost, not the questions: the same
    cleaned questions, greedy and sampled with the same seeds, and fewer decoding steps."""
    from opensem.forge.synthesis import clean_question, sentence_messages
    from opensem.inference import ChatModel

    model = ChatModel(str(base_models_dir / "smollm2-135m-instruct"))
    sents = [f"The Model {i} pump delivers {10 + i} litres per minute at {3 + i % 5} bar." for i in range(24)]
    convs = [sentence_messages("Pumps > Specifications", s) for s in sents]
    rows = [model.tokenizer(model.render(c), add_special_tokens=False)["input_ids"] for c in convs]
    batch, lcp = model._shared_prefix(rows)  # the system prompt and the few-shot turns: one prefix for all rows
    assert lcp >= model.MIN_SHARED_PREFIX
    assert batch["attention_mask"].shape[0] == len(convs) and (batch["attention_mask"] == 0).any()
    prompt_passes = []
    forward = model.model.forward
    model.model.forward = lambda *a, **k: (prompt_passes.append(k["input_ids"].shape), forward(*a, **k))[1]
    for temperature in (0.0, 0.8):
        model.reference_decoding = True  # transformers' generate(), whole prompts, 16 rows per seed
        plain = model.generate(convs, max_new_tokens=48, temperature=temperature, seed=5, batch_size=16)
        model.reference_decoding = False
        # one batch of 24 rows: two seed blocks (16 + 8) sample what two batches of 16 and 8 sampled
        fast = model.generate(convs, max_new_tokens=48, temperature=temperature, seed=5, stop_after=("?",), batch_size=32)
        assert [clean_question(o.text) for o in fast] == [clean_question(o.text) for o in plain]
        assert all(o.text.endswith("?") for o in fast if "?" in o.text)
        assert sum(o.completion_tokens for o in fast) <= sum(o.completion_tokens for o in plain)
    # the same prompts again at once, another seed: the prompts' forward pass is reused, the samples are those of a
    # fresh pass
    prompt_passes.clear()
    again = model.generate(convs, max_new_tokens=48, temperature=0.8, seed=9, stop_after=("?",), batch_size=32)
    assert all(shape[1] == 1 for shape in prompt_passes)  # decoding steps only
    model._last_prefill = None
    prompt_passes.clear()
    fresh = model.generate(convs, max_new_tokens=48, temperature=0.8, seed=9, stop_after=("?",), batch_size=32)
    assert sum(shape[1] > 1 for shape in prompt_passes) == 2  # the shared prefix, then the rest of the prompts
    assert [o.text for o in again] == [o.text for o in fresh]
    assert [o.text for o in again] != [o.text for o in fast]  # another seed, other samples


# --- every fact trained: split by wording, new wordings after the gates, question quality ---------------------------
FACTS_DOC = "# Harbour rules\n\n" + "\n\n".join(
    f"## Berth {i}\n\nBerth {i} of the Varno harbour takes ships up to {20 + i} metres long. "
    f"The Berth {i} crane lifts at most {3 + i} tonnes at a time." for i in range(12))


def _sentence_of(body: dict) -> str:
    return body["messages"][-1]["content"].split("Sentence: ", 1)[1]


def _sentence_teacher(ws: Path, fake, **generation) -> None:
    """A fake OpenAI-compatible teacher on the sentence strategy: each sampled call writes another wording."""
    seen: dict = {}

    def reply(body: dict) -> str:
        s = _sentence_of(body)
        n = seen[s] = seen.get(s, 0) + 1
        subject, rest = s.split(" of the Varno", 1) if " of the Varno" in s else s.split(" crane", 1)
        words = ["How long can ships be at", "What is the longest ship for", "Which ship length fits", "What size of ship fits",
                 "How large a ship can use", "What ships does the Varno harbour allow at"]
        if "crane" in s:
            words = ["How much can the crane of", "What load can the crane at", "How many tonnes lifts the crane of",
                     "What weight does the crane of", "Which load limit has the crane of", "How heavy a load takes the crane of"]
        return f"{words[(n - 1) % len(words)]} {subject.strip().replace('The ', '')} lift?" if "crane" in s else \
            f"{words[(n - 1) % len(words)]} {subject.strip()}?"

    fake.behaviour.reply = reply
    set_config(ws, "forge", teacher={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "m",
                                     "concurrency": 4, "max_retries": 1, "timeout_s": 5.0},
               generation={"strategy": "sentence", "pairs_per_chunk": 40, **generation},
               chunking={"chunk_tokens": 48, "overlap_tokens": 0}, cost={"max_cost_usd": None})


def test_every_fact_is_trained_and_test_holds_other_wordings_of_trained_facts(workspace, fake):
    from opensem.forge.quality import coverage

    (workspace / "data/raw/harbour.md").write_text(FACTS_DOC)
    _sentence_teacher(workspace, fake, questions_per_sentence=2)
    set_config(workspace, "forge", output={"test_ratio": 0.25, "seed": 7})
    m = run_forge(Workspace(workspace))
    train = read_jsonl(workspace / "data/processed/train.jsonl")
    test = read_jsonl(workspace / "data/processed/test.jsonl")
    facts = lambda rows: {r["metadata"]["fact"] for r in rows}  # noqa: E731
    cov = m["coverage"]
    assert cov["facts"] == 24 and cov["trained"] == 24 and cov["share"] == 1.0
    assert len(facts(train)) == 24 and test and facts(test) <= facts(train)  # every held-out fact is also trained
    assert cov["train_wordings_per_fact"] == 2.0  # a held-out fact was asked one wording more: it still trains on two
    questions = lambda rows: {r["conversations"][0]["value"].lower() for r in rows}  # noqa: E731
    assert not questions(train) & questions(test)

    # the same pairs split by chunk: whole chunks, and every fact of theirs, never trained
    from opensem.forge.quality import Pair, split_by_chunk

    pairs = [Pair(r["conversations"][0]["value"], r["conversations"][1]["value"], r["metadata"]["chunk_id"], "", "",
                  {"fact": r["metadata"]["fact"]}) for r in train + test]
    by_chunk = split_by_chunk(pairs, 0.25, seed=7)
    lost = facts_of(by_chunk[1]) - facts_of(by_chunk[0])
    assert lost and lost <= facts(train)  # facts a chunk split withholds are trained by the wording split
    assert coverage({f: "" for f in facts(train)}, by_chunk[0], by_chunk[1])["trained"] < 24

    # split_by: chunk stays an option, for held-out documents
    set_config(workspace, "forge", output={"split_by": "chunk", "test_ratio": 0.25, "seed": 7})
    m2 = run_forge(Workspace(workspace))
    assert m2["coverage"]["split_by"] == "chunk" and m2["coverage"]["trained"] < 24


def facts_of(pairs) -> set:
    return {p.meta["fact"] for p in pairs}


def test_new_wordings_fill_a_fact_the_gates_emptied_and_coverage_counts_after_them(workspace, fake):
    (workspace / "data/raw/harbour.md").write_text(FACTS_DOC)
    _sentence_teacher(workspace, fake, questions_per_sentence=2, replacement_rounds=2)
    set_config(workspace, "forge", output={"test_ratio": 0.0})
    # the golden set asks about berth 3's length: the first two wordings of that fact are near copies of it
    (workspace / "evals/golden_set.json").write_text(json.dumps([
        {"question": "How long can ships be at Berth 3?", "answer": "23 metres."},
        {"question": "What is the longest ship for Berth 3?", "answer": "23 metres."}]))
    inner = fake.behaviour.reply
    junk = {"Berth 5 of the Varno harbour takes ships up to 25 metres long.": "How about the berth and the harbour?",
            "The Berth 6 crane lifts at most 9 tonnes at a time.": "What is Berth 6?"}  # a question about its heading
    fake.behaviour.reply = lambda body: junk.get(_sentence_of(body)) or inner(body)
    m = run_forge(Workspace(workspace))
    cov, rej = m["coverage"], m["counts"]["rejected"]
    assert rej["golden_overlap"] >= 2  # both first wordings of berth 3's length went
    rows = read_jsonl(workspace / "data/processed/train.jsonl")
    berth3 = [r["conversations"][0]["value"] for r in rows if r["conversations"][1]["value"].startswith("Berth 3 of")]
    assert len(berth3) == 2 and all("Berth 3" in q for q in berth3)  # filled again, by new wordings
    assert cov["replacement_wordings_kept"] >= 2
    # a fact whose every wording is rejected is reported, after the rounds ran out
    assert cov["trained"] == cov["facts"] - 2 and sorted(u["text"] for u in cov["untrained"]) == sorted(junk)
    assert rej["not_a_question"] >= 2 + 2 * 2  # its two wordings, then two in each of two rounds
    assert rej["about_heading"] >= 2 + 2 * 2
    # a rerun pays for nothing: the new wordings are cached too
    calls = sum(fake.calls.values())
    again = run_forge(Workspace(workspace))
    assert sum(fake.calls.values()) == calls and again["coverage"] == cov


@pytest.mark.parametrize("question,heading,reason", [
    ("What is the first few days?", "Handbook > Your first few days", "about_heading"),
    ("How about your team and the company?", "Handbook > Your team", "not_a_question"),
    ("What is the purpose of getting started?", "Handbook > Getting started", "about_heading"),
    ("What is the T-1000?", "Handbook > Equipment", "unknown_name"),
    ("What is the route?", "Handbook > Routes", "no_subject"),
    ("What is the weather and what is the wind?", "Handbook > Weather", "not_a_question"),
    ("What is the maximum number of passengers allowed to smoke on deck?", "Handbook > Safety", "unanswered"),
])
def test_the_question_gate_rejects_broken_questions(question, heading, reason):
    from opensem.forge.quality import question_reason

    chunk = ("Your first few days start with a tour of the office and lunch with your team. The company gives every new "
             "starter a laptop. Getting started takes about a week. The main route runs from Caddock to Hessa. "
             "Smoking is allowed only on the rear outside deck.")
    answer = {"about_heading": "Your first few days start with a tour of the office and lunch with your team.",
              "unanswered": "Smoking is allowed only on the rear outside deck.",
              "no_subject": "The main route runs from Caddock to Hessa."}.get(reason, chunk.split(". ")[1] + ".")
    if "purpose" in question:
        answer = "Getting started takes about a week."
    assert question_reason(question, answer, heading, chunk) == reason


@pytest.mark.parametrize("question,answer", [
    ("What is the maximum pressure of the H-40 pump?", "The H-40 pump runs at a maximum pressure of 12 bar."),
    ("When do orders ship if they are placed before noon?", "Orders placed before noon ship on the same day."),
    ("What is the main route?", "The main route runs from Caddock to Hessa and takes 55 minutes."),
    ("How long is the crossing from Caddock to Hessa?", "The main route runs from Caddock to Hessa and takes 55 minutes."),
])
def test_the_question_gate_keeps_good_questions(question, answer):
    from opensem.forge.quality import question_reason

    assert question_reason(question, answer, "Overview > Routes", answer) is None


def test_the_dry_run_prints_facts_wordings_steps_and_the_estimated_time(workspace, fake):
    (workspace / "data/raw/harbour.md").write_text(FACTS_DOC)
    _sentence_teacher(workspace, fake, questions_per_sentence=3)
    set_config(workspace, "train", exposures_per_fact=30, time_budget_min=1)
    r = run_cli("forge", "--dry-run", "-w", str(workspace))
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stderr.split())
    assert "facts (source sentences) │ 24" in out and "training wordings per fact │ 3" in out
    # 24 facts x 3 wordings = 72 examples and 14 replay, 16 a step: 30 exposures are 10 passes, 54 steps (4.4 min at
    # the embedded model's reference speed); the one-minute budget trains 12 of them, and says what it gave up
    assert "86 examples, 24 facts x 3.0 wordings, 7 exposures per fact: 12 steps (2.2 passes), about 1.0 min" in out
    assert "time_budget_min 1: training 12 of the 54 steps asked for; each fact gets about 7 exposures instead of 30" in out
    set_config(workspace, "train", exposures_per_fact=30, time_budget_min=None)
    out = " ".join(run_cli("forge", "--dry-run", "-w", str(workspace)).stderr.split())
    assert "86 examples, 24 facts x 3.0 wordings, 30 exposures per fact: 54 steps (10.0 passes), about 4.5 min" in out
    assert fake.calls["/v1/chat/completions"] == 0


def test_a_provider_of_ones_own_forges_by_entry_point_or_by_module_path(workspace, tmp_path):
    """A provider is one class in a module outside src/: a package registers it by name (an entry point in the
    `opensem.providers` group), or a config names it as module:Class. Nothing in src/ lists it."""
    (workspace / "data/raw/pump.md").write_text("# Pump\n\nThe Halden H-40 pump runs at a maximum pressure of 12 bar. "
                                                "Its motor draws 450 watts at full load. The warranty lasts four years.\n")
    site = tmp_path / "site"
    dist = site / "parrot_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: parrot-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[opensem.providers]\nparrot = provider_fixtures:Parrot\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    doctor = run_cli("doctor", "-w", str(workspace), env=env)
    assert doctor.returncode == 0 and "parrot" in doctor.stdout, doctor.stdout + doctor.stderr
    for provider in ("parrot", "provider_fixtures:Parrot"):
        r = run_cli("forge", "-w", str(workspace), "--set", f"forge.teacher.provider={provider}",
                    "--set", "forge.generation.strategy=passage", "--set", "forge.cost.max_cost_usd=null", env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        m = json.loads((workspace / "data/processed/forge_manifest.json").read_text())
        assert m["teacher"]["provider"] == provider and m["teacher"]["model"] == "parrot-1"
        assert m["counts"]["train"] + m["counts"]["test"] > 0
    bad = run_cli("forge", "-w", str(workspace), "--set", "forge.teacher.provider=parot", env=env)
    assert bad.returncode == 2 and "unknown provider 'parot'" in bad.stderr and "parrot" in bad.stderr

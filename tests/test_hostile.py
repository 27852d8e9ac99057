"""Hostile and careless input: documents, golden sets, configs and teachers are data, never code; a failed
run destroys nothing; budgets are hard limits; nothing leaves the workspace or the machine unasked.

Each test names the part of the hardening it proves. The real embedded model and the real promptfoo run;
teachers and judges are fakes on 127.0.0.1 speaking the OpenAI wire protocol.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from conftest import REPO, default_sigint, make_workspace, run_cli, set_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensem.errors import ConfigError, OpenSEMError
from opensem.forge import run_forge
from opensem.workspace import Workspace

PAYLOAD_MARKER = "opensem-hostile-marker"


def payloads(marker: Path) -> list[str]:
    """Strings that promptfoo (nunjucks templates, file:// loading) or a shell would act on if they were code."""
    return [
        "{{ 7*7 }}",
        "{% for x in [1,2,3] %}{{ x }}{% endfor %}",
        f"file://{marker.parent / 'evil.py'}",
        "file://evil.py",
        '{{ range.constructor("return global.process.mainModule.require(\'child_process\').execSync(\'touch '
        + str(marker) + '\')")() }}',
        "$(touch " + str(marker) + ")",
        "`touch " + str(marker) + "`",
        "{{env.OPENAI_API_KEY}}",
        "[bold red]rich markup[/] [link=file:///etc/passwd]x[/link]",
        "line one\nline two\r\n\tindented: - [a] \"q\" 'r' {x: y}",
    ]


def write_golden(ws: Path, items: list[dict]) -> None:
    (ws / "evals" / "golden_set.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def fast_judge(ws: Path) -> None:
    set_config(ws, "eval", answers={"max_new_tokens": 4, "batch_size": 16}, forgetting_set=None, bootstrap_samples=100)


def use_teacher(ws: Path, fake, **extra) -> None:
    set_config(ws, "forge", teacher={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "gpt-4o-mini",
                                     "concurrency": 1, "max_retries": 0, "timeout_s": 2.0, **extra},
               generation={"pairs_per_chunk": 3})


DOC = """# Halden H-40 Pump

The Halden H-40 pump runs at a maximum pressure of 12 bar. Its motor draws 450 watts at full load.

## Maintenance

Replace the H-40 impeller seal every 2,000 operating hours. The warranty of the H-40 lasts four years.
"""


# --- 1. promptfoo receives no user-controlled string; a minimal environment; a judge server with a token ---------
def test_hostile_golden_set_stays_data_and_promptfoo_gets_no_keys(workspace, promptfoo_available, tmp_path, monkeypatch):
    marker = tmp_path / PAYLOAD_MARKER
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (workspace / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    hostile = payloads(marker)
    items = [{"id": p, "question": f"Q{i}: {p}?", "answer": p, "system": p if i % 2 else None, "tags": [p]}
             for i, p in enumerate(hostile)]
    for it in items:
        if it["system"] is None:
            del it["system"]
    write_golden(workspace, items)
    fast_judge(workspace)
    # a promptfoo wrapper that records the environment promptfoo is started with, then runs the pinned one
    env_dump = tmp_path / "promptfoo_env.json"
    wrapper = tmp_path / "promptfoo-wrapper.py"
    wrapper.write_text(
        "import json, os, sys\n"
        f"json.dump(dict(os.environ), open({str(env_dump)!r}, 'w'))\n"
        f"os.execv({str(REPO / 'node_modules/.bin/promptfoo')!r}, ['promptfoo'] + sys.argv[1:])\n"
    )
    wrapper.chmod(0o755)
    set_config(workspace, "eval", promptfoo=f"{sys.executable} {wrapper}")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-openai-0123456789")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-planted-0123456789")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "planted-token-0123456789")

    from opensem.judge import run_judge

    res = run_judge(Workspace(workspace), "baseline")
    run_dir = workspace / res["run_dir"]
    # no payload ran, and every item was scored as the data it is
    assert not marker.exists()
    assert [it["id"] for it in res["items"]] == hostile
    assert all(it["error"] is None and it["score"] is not None for it in res["items"])
    # promptfoo's config and its output hold our generated keys and fixed words only
    config = (run_dir / "promptfooconfig.yaml").read_text()
    for p in hostile:
        assert p not in config
    pf = json.loads((run_dir / "promptfoo_output.json").read_text())
    keys = [f"t{i + 1:04d}" for i in range(len(items))]
    assert sorted(r["prompt"]["raw"] for r in pf["results"]["results"]) == keys
    assert sorted(r["vars"]["key"] for r in pf["results"]["results"]) == keys
    # the environment promptfoo ran with: no key of any provider, no unrelated secret
    env = json.loads(env_dump.read_text())
    dumped = json.dumps(env)
    assert "sk-planted" not in dumped and "sk-ant-planted" not in dumped and "planted-token" not in dumped
    assert env["PROMPTFOO_DISABLE_TELEMETRY"] == "1" and "offline_guard.cjs" in env["NODE_OPTIONS"]
    assert set(env) <= {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "NODE_OPTIONS",
                        "OPENSEM_NET_LOG", "OPENSEM_JUDGE_URL", "OPENSEM_JUDGE_TOKEN", "OPENSEM_ANSWERS", "PROMPTFOO_PYTHON",
                        "PROMPTFOO_CONFIG_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "TEMP", "TMP"} | {
        k for k in env if k.startswith(("LC_", "PROMPTFOO_DISABLE"))}


def test_judge_server_answers_only_requests_with_the_run_token():
    import urllib.error
    import urllib.request

    from opensem.judge.promptfoo import JudgeServer

    seen = []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with JudgeServer(lambda key, output: seen.append(key) or {"score": 5, "reason": "ok"}) as server:
        body = json.dumps({"key": "t0001", "output": "x"}).encode()
        for headers in ({}, {"X-OpenSEM-Token": "guess"}, {"X-OpenSEM-Token": server.token[:-1]}):
            with pytest.raises(urllib.error.HTTPError) as e:
                opener.open(urllib.request.Request(server.url, data=body, headers=headers), timeout=10)
            assert e.value.code == 403
        assert seen == []
        with opener.open(urllib.request.Request(server.url, data=body, headers={"X-OpenSEM-Token": server.token}), timeout=10) as r:
            assert json.loads(r.read()) == {"score": 5, "reason": "ok"}
    assert seen == ["t0001"]


# --- 2. a failed or interrupted stage never destroys what the last good run made --------------------------------
def test_unreachable_teacher_fails_and_leaves_the_last_good_data(workspace, fake):
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake)
    set_config(workspace, "forge", cost={"max_cost_usd": None})
    good = run_forge(Workspace(workspace))
    assert good["status"] == "complete" and good["counts"]["train"] > 0
    out = workspace / "data/processed"
    before = {f: (out / f).read_bytes() for f in ("train.jsonl", "test.jsonl", "forge_manifest.json")}
    # the teacher moves to a port nobody listens on, and the documents change so nothing is cached
    (workspace / "data/raw/pump.md").write_text(DOC.replace("12 bar", "14 bar"))
    set_config(workspace, "forge", teacher__base_url="http://127.0.0.1:9/v1")
    r = run_cli("forge", "-w", str(workspace))
    assert r.returncode == 2, r.stderr
    line = " ".join(r.stderr.split())
    assert "error: forge failed: none of the 2 teacher requests succeeded (2 x" in line and "APIConnectionError" in line
    assert "Traceback" not in r.stderr
    assert {f: (out / f).read_bytes() for f in before} == before
    failure = json.loads((out / "forge_failed.json").read_text())
    assert failure["status"] == "failed" and failure["counts"]["answered"] == 0
    assert sum(failure["failures"].values()) == failure["counts"]["failed_requests"] > 0
    assert all("APIConnectionError" in k for k in failure["failures"])
    # the next good run replaces the data and clears the failure record
    set_config(workspace, "forge", teacher__base_url=fake.openai_url)
    assert run_forge(Workspace(workspace))["status"] == "complete"
    assert not (out / "forge_failed.json").exists() and (out / "train.jsonl").read_bytes() != before["train.jsonl"]


def test_a_failed_pipeline_stage_is_recorded_as_failed(tmp_path):
    from rich.console import Console

    from opensem.pipeline import Pipeline
    from opensem.workspace import init_workspace

    init_workspace(tmp_path)
    p = Pipeline(Workspace(tmp_path), False, Console(quiet=True))

    def boom(record):
        raise OpenSEMError("the teacher is down")

    with pytest.raises(OpenSEMError):
        p.stage("forge", {"a": 1}, boom)
    state = json.loads((tmp_path / ".opensem/pipeline_state.json").read_text())
    assert state["forge"]["status"] == "failed" and state["forge"]["error"] == "the teacher is down"


# --- 3. budgets: no price, no start; identical failures stop the run ---------------------------------------------
def test_a_budget_without_a_known_price_refuses_to_start(workspace, fake):
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake, model="my-unpriced-model")
    set_config(workspace, "forge", cost={"max_cost_usd": 0.000001})
    with pytest.raises(ConfigError) as e:
        run_forge(Workspace(workspace))
    assert "cost.max_cost_usd" in str(e.value) and "cost.prices.my-unpriced-model" in str(e.value)
    assert fake.calls["/v1/chat/completions"] == 0
    # with a price the cap holds: not one call fits under a millionth of a dollar
    set_config(workspace, "forge", cost={"max_cost_usd": 0.000001, "prices": {"my-unpriced-model": {"input_per_mtok": 1, "output_per_mtok": 1}}})
    with pytest.raises(OpenSEMError, match="max_cost_usd"):
        run_forge(Workspace(workspace))
    assert fake.calls["/v1/chat/completions"] == 0


def test_identical_errors_stop_the_run_early(workspace, fake):
    for i in range(4):
        (workspace / f"data/raw/pump{i}.md").write_text(DOC.replace("H-40", f"H-4{i}"))
    use_teacher(workspace, fake, model="gpt-4o-mini")
    fake.behaviour.default = "404"
    with pytest.raises(OpenSEMError) as e:
        run_forge(Workspace(workspace))
    assert fake.calls["/v1/chat/completions"] == 5  # of 8 requests: five identical 404s in a row end it
    assert "5 identical failures in a row" in str(e.value) and "NotFoundError (HTTP 404)" in str(e.value)


# --- 4. outputs stay inside the workspace; names match whole; --set errors name the flag -------------------------
@pytest.mark.parametrize("section,key", [("forge", "output_dir"), ("train", "output_dir"), ("eval", "reports_dir")])
def test_output_paths_outside_the_workspace_are_refused(workspace, tmp_path, section, key):
    outside = tmp_path / "outside"
    (workspace / "data/raw/pump.md").write_text(DOC)
    (workspace / "evals/golden_set.json").write_text(json.dumps([{"question": "q?", "answer": "a"}]))
    (workspace / "data/processed/train.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]}) + "\n")
    command = {"forge": ["forge"], "train": ["train"], "eval": ["judge", "--mode", "baseline"]}[section]
    for value in ("../../outside", str(outside), "data/../../outside"):
        r = run_cli(*command, "-w", str(workspace), "--set", f"{section}.{key}={value}")
        assert r.returncode == 2, r.stderr
        assert f"{section}.{key}" in r.stderr and "outside the workspace" in r.stderr and "--allow-outside-workspace" in r.stderr
    assert not outside.exists()
    # a symlink inside the workspace that points out is outside too
    (workspace / "link").symlink_to(tmp_path, target_is_directory=True)
    r = run_cli(*command, "-w", str(workspace), "--set", f"{section}.{key}=link/outside")
    assert r.returncode == 2 and "outside the workspace" in r.stderr
    assert not outside.exists()


def test_allow_outside_workspace_is_explicit(workspace, fake, tmp_path):
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake)
    outside = tmp_path / "elsewhere"
    r = run_cli("--allow-outside-workspace", "forge", "-w", str(workspace), "--set", f"forge.output_dir={outside}")
    assert r.returncode == 0, r.stderr
    assert (outside / "train.jsonl").exists()


def test_names_match_whole_and_set_errors_name_the_flag(workspace):
    from opensem.kernel.config import RUN_NAME_RE, TrainConfig

    assert RUN_NAME_RE.fullmatch("run-1") and not RUN_NAME_RE.fullmatch("run-1\n")
    with pytest.raises(Exception, match="plain folder name"):
        TrainConfig(run_name="run-1\n")
    r = run_cli("train", "-w", str(workspace), "--run-name", "ok\n")
    assert r.returncode == 2 and "plain folder name" in r.stderr
    r = run_cli("train", "-w", str(workspace), "--set", "train.lora_r=abc")
    assert r.returncode == 2
    line = " ".join(r.stderr.split())
    assert "--set train.lora_r=abc: key 'lora_r'" in line and "train_config.yaml" not in line
    r = run_cli("train", "-w", str(workspace), "--set", "train.lora_rank=8")
    assert "--set train.lora_rank=8: unknown key 'lora_rank': did you mean 'lora_r'?" in " ".join(r.stderr.split())


# --- 5. chunks bounded by characters too; token counts within 25% on English, CJK, code and spaceless text ---------
SAMPLES = {
    "english": (REPO / "examples/product-manual/data/raw/overview.md").read_text(),
    "cjk": "蜂箱监测器每十分钟记录一次温度和湿度。如果电池电量低于百分之二十，设备会发出警报。"
           "ハチの巣モニターは十分ごとに温度と湿度を記録します。센서를 벌통 중앙에 설치하십시오. " * 6,
    "code": (REPO / "src/opensem/text.py").read_text()[:6000],
    "spaceless": "".join(w.lower() for w in (REPO / "README.md").read_text().split() if w.isalpha())[:4000],
    "base64": __import__("base64").b64encode(bytes(range(256)) * 12).decode(),
}


@pytest.fixture(scope="module")
def bpe(base_models_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_models_dir / "smollm2-135m-instruct")
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_character_estimate_is_within_25_percent_of_a_real_tokenizer(kind, bpe):
    from opensem.forge.documents import count_tokens

    real = bpe(SAMPLES[kind])
    assert abs(count_tokens(SAMPLES[kind]) / real - 1) <= 0.25, (kind, count_tokens(SAMPLES[kind]), real)


def test_a_2mb_line_without_spaces_becomes_bounded_chunks_and_an_honest_estimate(workspace, fake, bpe):
    from opensem.forge.documents import MAX_CHARS_PER_TOKEN, Document, chunk_document, count_tokens, sha256

    text = ("thequickbrownfoxjumpsoverthelazydog" * 60000)[:2_000_000]
    chunks = chunk_document(Document("big.txt", text, sha256(text)), 256, 32)
    assert all(c.tokens <= 256 and len(c.text) <= 256 * MAX_CHARS_PER_TOKEN for c in chunks)
    assert "".join(c.text[len(c.overlap_text):].strip() for c in chunks) == text  # nothing lost
    sample = chunks[len(chunks) // 2].text
    assert abs(count_tokens(sample) / bpe(sample) - 1) <= 0.25


@pytest.mark.parametrize("kind", ["english", "cjk", "code", "spaceless"])
def test_dry_run_estimate_is_within_25_percent_of_what_the_run_uses(workspace, fake, bpe, kind):
    (workspace / "data/raw" / f"{kind}.txt").write_text(SAMPLES[kind], encoding="utf-8")
    use_teacher(workspace, fake)
    set_config(workspace, "forge", cost={"max_cost_usd": None})
    fake.behaviour.count_tokens = bpe  # the fake reports the prompt tokens a real BPE tokenizer counts
    plan = run_forge(Workspace(workspace), dry_run=True)
    assert fake.calls["/v1/chat/completions"] == 0
    try:
        m = run_forge(Workspace(workspace))
        used = m["cost"]["input_tokens"]
    except OpenSEMError:  # the fake teacher may find no sentence to ask about: count what it was sent
        used = json.loads((workspace / "data/processed/forge_failed.json").read_text())["cost"]["input_tokens"]
    assert fake.calls["/v1/chat/completions"] == plan["calls"]
    assert abs(plan["est_input_tokens"] / used - 1) <= 0.25, (kind, plan["est_input_tokens"], used)


def test_local_teacher_dry_run_counts_with_its_own_tokenizer(workspace):
    (workspace / "data/raw/pump.md").write_text(DOC)
    set_config(workspace, "forge", generation={"questions_per_sentence": 1, "pairs_per_chunk": 2})
    plan = run_forge(Workspace(workspace), dry_run=True)
    m = run_forge(Workspace(workspace))
    assert plan["est_input_tokens"] == m["cost"]["input_tokens"] > 0


# --- 6. every prompt is checked against the model's context window --------------------------------------------------
def test_a_30000_token_golden_question_is_refused_before_any_work(workspace, promptfoo_available):
    write_golden(workspace, [{"id": "ok", "question": "What is the pump's pressure?", "answer": "12 bar"},
                             {"id": "huge", "question": "Why " + "very " * 30000 + "long?", "answer": "x"}])
    fast_judge(workspace)
    t = time.time()
    r = run_cli("judge", "--mode", "baseline", "-w", str(workspace))
    assert r.returncode == 2, r.stderr
    line = " ".join(r.stderr.split())
    assert "item 'huge': the question is too long" in line and "exceed the model's context of 8192" in line
    assert "answering" not in r.stdout and not (workspace / "evals/reports").exists()
    assert time.time() - t < 120


def test_training_sequence_len_beyond_the_context_is_a_config_error(workspace):
    (workspace / "data/processed/train.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]}) + "\n")
    r = run_cli("train", "-w", str(workspace), "--set", "train.sequence_len=100000")
    assert r.returncode == 2 and "'sequence_len': 100000 is longer than the base model's context of 8192" in " ".join(r.stderr.split())


def test_a_local_prompt_past_the_context_is_a_failed_call_not_a_runaway(base_models_dir):
    from opensem.config import LLMSpec
    from opensem.inference import PromptTooLong, load_chat_model
    from opensem.llm import Call
    from opensem.llm.local_models import LocalProvider

    provider = LocalProvider(LLMSpec(provider="local"), base_models_dir)
    calls = [Call([{"role": "user", "content": "word " * 9000}], max_tokens=8),
             Call([{"role": "user", "content": "Say hi."}], max_tokens=8)]
    provider.complete_many(calls)
    assert "exceeds the context of 8192" in calls[0].error and calls[0].reply is None
    assert calls[1].error is None and calls[1].reply is not None
    with pytest.raises(PromptTooLong):  # and the model itself refuses to run past its window
        load_chat_model(provider.resolved.path).generate([[{"role": "user", "content": "word " * 9000}]], max_new_tokens=8)


def test_replay_skips_prompts_longer_than_the_context(workspace, base_models_dir):
    from opensem.kernel.config import TrainConfig
    from opensem.models import resolve_base_model
    from opensem.kernel.data import build_replay

    prompts = ["Name a colour.", "Describe " + "very " * 9000 + "much."]
    (workspace / "replay.json").write_text(json.dumps(prompts))
    cfg = TrainConfig(replay="replay.json", replay_ratio=1.0)
    said = []
    out = build_replay(Workspace(workspace), cfg, resolve_base_model(cfg.base_model, workspace / "models/base"), 10, said.append)
    assert len(out) <= 1 and all(len(conv[0]["content"]) < 100 for conv in out)
    assert any("1 prompt(s) skipped: longer than the model's context" in s for s in said)


# --- 7. eval.judge.concurrency is honoured end to end ---------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 3])
def test_judge_concurrency_is_honoured(workspace, fake, promptfoo_available, concurrency):
    write_golden(workspace, [{"question": f"What is item {i}?", "answer": f"Item {i} is blue."} for i in range(6)])
    fast_judge(workspace)
    fake.behaviour.delay_s = 1.5
    fake.behaviour.reply = lambda body: json.dumps({"reason": "fine", "score": 4})
    set_config(workspace, "eval", judge={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "j",
                                         "concurrency": concurrency})
    from opensem.judge import run_judge

    res = run_judge(Workspace(workspace), "baseline")
    assert res["summary"]["scored"] == 6
    assert fake.max_in_flight == concurrency


# --- 8. no network traffic that the user did not configure ---------------------------------------------------------
class RecordingListener:
    """A TCP listener on 127.0.0.1 that records every connection (what a proxy would receive)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.seen.append(conn.recv(200))
            except OSError:
                self.seen.append(b"")
            conn.close()

    def close(self):
        self.sock.close()


def test_a_judge_run_makes_no_connection_through_any_proxy(workspace, promptfoo_available):
    write_golden(workspace, [{"question": "What is the pump's pressure?", "answer": "12 bar"}])
    fast_judge(workspace)
    proxy = RecordingListener()
    try:
        env = {k: proxy.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")}
        env |= {"NO_PROXY": "", "no_proxy": ""}
        r = run_cli("judge", "--mode", "baseline", "-w", str(workspace), env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        time.sleep(1)
        assert proxy.seen == [], proxy.seen[:3]
    finally:
        proxy.close()
    # what promptfoo tried to reach was refused inside its own process, before any packet left
    run_dir = next(p for p in (workspace / "evals/reports").iterdir() if p.is_dir())
    log = run_dir / "network_refused.jsonl"
    entries = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    assert all(e["refused"] and "127.0.0.1" not in e["target"] for e in entries)


def test_offline_guard_refuses_remote_hosts_and_allows_loopback(tmp_path):
    from opensem.judge.promptfoo import offline_guard

    log = tmp_path / "net.jsonl"
    script = """
const net = require('net');
const out = [];
const s = net.connect(443, 'example.com');
s.on('error', e => out.push('connect:' + e.code));
require('dns').lookup('example.com', e => out.push('dns:' + (e && e.code)));
fetch('https://example.com/').catch(e => out.push('fetch:' + (e.cause && e.cause.code)));
const srv = net.createServer(c => c.end('hi')).listen(0, '127.0.0.1', () => {
  const c = net.connect(srv.address().port, '127.0.0.1');
  c.on('data', d => { out.push('local:' + d); srv.close(); setTimeout(() => console.log(JSON.stringify(out.sort())), 300); });
});
"""
    r = subprocess.run(["node", "--require", str(offline_guard()), "-e", script], env=os.environ | {"OPENSEM_NET_LOG": str(log)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["connect:ECONNREFUSED", "dns:ECONNREFUSED", "fetch:ECONNREFUSED", "local:hi"]
    refused = [json.loads(x) for x in log.read_text().splitlines()]
    assert {e["target"] for e in refused} == {"example.com:443", "example.com"}


# --- 9. encodings, binary files and duplicate keys ------------------------------------------------------------------
def test_golden_set_in_utf8_bom_and_utf16_is_read_correctly(tmp_path):
    from opensem.golden import load_golden

    items = [{"question": "Wie schwer ist der Stock? 蜂箱", "answer": "Zwölf Kilo."}]
    text = json.dumps(items, ensure_ascii=False)
    for enc, raw in (("utf-8-sig", text.encode("utf-8-sig")), ("utf-16", text.encode("utf-16")),
                     ("utf-16-be", b"\xfe\xff" + text.encode("utf-16-be"))):
        path = tmp_path / f"golden-{enc}.json"
        path.write_bytes(raw)
        assert [(g.question, g.answer) for g in load_golden(path)] == [(items[0]["question"], items[0]["answer"])]


def test_other_encodings_and_duplicate_keys_are_one_line_errors(workspace):
    golden = workspace / "evals/golden_set.json"
    golden.write_bytes('[{"question": "Qu\xe9?", "answer": "Oui."}]'.encode("latin-1"))
    r = run_cli("judge", "--mode", "baseline", "-w", str(workspace))
    assert r.returncode == 2 and "golden_set.json: not UTF-8 or UTF-16 text (byte 0xe9" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    golden.write_text('[{"question": "Q?", "answer": "A.", "answer": "B."}]')
    r = run_cli("judge", "--mode", "baseline", "-w", str(workspace))
    assert r.returncode == 2 and "an item has the key 'answer' twice" in r.stderr
    cfg = workspace / "configs/train_config.yaml"
    original = cfg.read_bytes()
    cfg.write_bytes(original + "\n# r\xe9sum\xe9\n".encode("latin-1"))
    r = run_cli("train", "-w", str(workspace))
    assert r.returncode == 2 and "train_config.yaml: not UTF-8 or UTF-16 text" in " ".join(r.stderr.split())
    cfg.write_bytes(original + b"\nlora_r: 8\nlora_r: 16\n")
    r = run_cli("train", "-w", str(workspace))
    line = " ".join(r.stderr.split())
    assert r.returncode == 2 and "duplicate key 'lora_r'" in line and "train_config.yaml" in line


def test_binary_files_are_skipped_by_content_not_extension(tmp_path):
    from opensem.forge.documents import read_documents

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.txt").write_bytes(bytes(range(256)) * 64)  # a binary file renamed .txt
    (raw / "image.md").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (raw / "utf16.txt").write_bytes("The pump runs at 12 bar.".encode("utf-16"))
    (raw / "bom.md").write_bytes("# Pump\n\nThe seal lasts 2,000 hours.".encode("utf-8-sig"))
    docs, skipped = read_documents(raw)
    assert {d.path: d.text for d in docs} == {"utf16.txt": "The pump runs at 12 bar.", "bom.md": "# Pump\n\nThe seal lasts 2,000 hours."}
    reasons = {s.path: s.reason for s in skipped}
    assert set(reasons) == {"notes.txt", "image.md"}
    assert all("binary content" in r or "not UTF-8" in r for r in reasons.values())


# --- 10. children that a test Ctrl-Cs get default SIGINT handling, however the suite was started ------------------------
def test_sigint_reaches_children_even_when_the_suite_ignores_it():
    child = [sys.executable, "-c", "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    raise SystemExit(42)"]
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup, or a runner that ignores SIGINT
    try:
        ignoring = subprocess.Popen(child)
        reset = subprocess.Popen(child, preexec_fn=default_sigint)
    finally:
        signal.signal(signal.SIGINT, old)
    time.sleep(1.0)
    for p in (ignoring, reset):
        p.send_signal(signal.SIGINT)
    assert reset.wait(timeout=10) == 42
    time.sleep(0.5)
    assert ignoring.poll() is None  # without the reset the child never sees Ctrl-C: the failure mode being fixed
    ignoring.kill()
    ignoring.wait()


# --- property tests: arbitrary golden sets and documents ---------------------------------------------------------------
golden_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=120).filter(lambda s: s.strip())
golden_item = st.fixed_dictionaries(
    {"question": golden_text, "answer": golden_text},
    optional={"id": st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(lambda s: not re.fullmatch(r"q\d{3}", s)),
              "system": golden_text,
              "tags": st.lists(golden_text, max_size=2)},
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(items=st.lists(st.one_of(golden_item, st.sampled_from(payloads(Path("/tmp") / PAYLOAD_MARKER)).map(
    lambda p: {"id": p, "question": p, "answer": p, "system": p})), min_size=1, max_size=4, unique_by=lambda it: it.get("id")))
def test_property_any_golden_set_reaches_the_model_byte_for_byte_and_writes_only_its_run(
        items, base_models_dir, promptfoo_available, tmp_path_factory, monkeypatch):
    from opensem import inference
    from opensem.judge import run_judge

    root = tmp_path_factory.mktemp("prop")
    ws = make_workspace(root / "ws", base_models_dir)
    write_golden(ws, items)
    fast_judge(ws)
    seen: list[list[dict]] = []
    original = inference.ChatModel.generate

    def spy(self, conversations, *a, **k):  # records what the real model is given, then runs it
        seen.extend([list(c) for c in conversations])
        return original(self, conversations, *a, **k)

    monkeypatch.setattr(inference.ChatModel, "generate", spy)
    before = tree(root)
    res = run_judge(Workspace(ws), "baseline")
    monkeypatch.undo()
    # the model received each question exactly as written, under the item's own system prompt when it has one
    received = [json.dumps(c, ensure_ascii=False) for c in seen]
    for it in items:
        expected = ([{"role": "system", "content": it["system"]}] if it.get("system") else []) + [
            {"role": "user", "content": it["question"]}]
        assert json.dumps(expected, ensure_ascii=False) in received
    assert [x["question"] for x in res["items"]] == [it["question"] for it in items]
    # every new file is the run's own, the answer cache, the workspace's promptfoo store, or the baseline pointer
    run_rel = res["run_dir"]
    new = tree(root) - before
    stray = [f for f in new if not (f.startswith(f"ws/{run_rel}/") or f.startswith("ws/.opensem/cache/answers/")
                                     or f.startswith("ws/.opensem/promptfoo/") or f == "ws/evals/reports/baseline-latest.json")]
    assert stray == []
    assert not (Path("/tmp") / PAYLOAD_MARKER).exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), min_size=1, max_size=3000))
def test_property_any_document_reaches_the_teacher_as_its_chunks_and_writes_only_the_workspace(
        text, fake, tmp_path_factory):
    from opensem.forge.documents import chunk_document, read_documents
    from opensem.workspace import init_workspace

    root = tmp_path_factory.mktemp("doc")
    ws = root / "ws"
    init_workspace(ws)
    (ws / "data/raw/doc.txt").write_bytes(text.encode("utf-8"))
    use_teacher(ws, fake)
    set_config(ws, "forge", cost={"max_cost_usd": None})
    before = tree(root)
    first = len(fake.requests)
    try:
        run_forge(Workspace(ws), console=Console(quiet=True))
    except OpenSEMError as e:  # nothing readable, or nothing worth keeping: a clean one-line error
        assert "\n" not in str(e)
    # the teacher was sent exactly the chunks of the document, byte for byte
    docs, _ = read_documents(ws / "data/raw")
    chunks = [c for d in docs for c in chunk_document(d, 256, 32)]
    sent = [r["body"]["messages"][-1]["content"] for r in fake.requests[first:]]
    assert len(sent) == len(chunks)
    assert all(f"Passage:\n{c.text}\n\n" in s for c, s in zip(chunks, sent))
    stray = [f for f in tree(root) - before if not f.startswith(("ws/data/processed/", "ws/.opensem/cache/teacher/"))]
    assert stray == []

"""Hostile and careless input, round two: links and hidden files, names that become paths or shell words, real
deadlines, bounded parsing, the workspace lock, the cache key, budgets without usage, terminal escapes, bad
bodies, judge results that must all come back, and config values no run can use.

Each test names the item of the hardening it proves. Teachers are fakes on 127.0.0.1 speaking the OpenAI wire
protocol through the official SDK; the real embedded model and the real promptfoo run where a judge runs.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import child, default_sigint, make_workspace, run_cli, scaled, set_config
from fakes import FakeServer, pairs_from_passage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensem.errors import OpenSEMError
from opensem.forge import run_forge
from opensem.workspace import Workspace

DOC = """# Halden H-40 Pump

The Halden H-40 pump runs at a maximum pressure of 12 bar. Its motor draws 450 watts at full load.

## Maintenance

Replace the H-40 impeller seal every 2,000 operating hours. The warranty of the H-40 lasts four years.
"""
SECRET = "opensem-secret-7f3a91 the vault opens with 4471"
EXE = str(Path(sys.executable).parent / "opensem")


def use_teacher(ws: Path, fake, **extra) -> None:
    set_config(ws, "forge", teacher={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "gpt-4o-mini",
                                     "concurrency": 1, "max_retries": 0, "timeout_s": 5.0, **extra},
               generation={"pairs_per_chunk": 3, "strategy": "passage"})


def sent_text(fake) -> str:
    return json.dumps([r["body"] for r in fake.requests])


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


# --- 1. links out of data/raw, hidden folders and special files are skipped, listed and never sent ---------------
def test_links_out_hidden_folders_and_fifos_never_reach_the_teacher(workspace, fake, tmp_path):
    raw = workspace / "data/raw"
    (raw / "pump.md").write_text(DOC)
    outside = tmp_path / "secret.txt"
    outside.write_text(SECRET + ". " + DOC)
    (raw / "notes.txt").symlink_to(outside)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/more.md").write_text(SECRET)
    (raw / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (raw / ".Trash").mkdir()
    (raw / ".Trash/draft.md").write_text(SECRET)
    (raw / ".env").write_text("OPENAI_API_KEY=" + SECRET)
    (raw / "inside.md").symlink_to(raw / "pump.md")  # a link that stays inside data/raw is an ordinary document
    (raw / "loop.md").symlink_to(raw / "loop.md")
    os.mkfifo(raw / "pipe.md")  # reading a FIFO would block the forge forever
    use_teacher(workspace, fake)

    plan = run_cli("forge", "--dry-run", "-w", str(workspace))
    assert plan.returncode == 0, plan.stderr
    m = run_forge(Workspace(workspace))
    assert SECRET not in sent_text(fake)
    for f in ("train.jsonl", "test.jsonl", "forge_manifest.json"):
        assert SECRET not in (workspace / "data/processed" / f).read_text()
    assert sorted(d["path"] for d in m["inputs"]) == ["inside.md", "pump.md"]
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert "outside the input folder" in reasons["notes.txt"]
    assert "link to a folder" in reasons["linked-folder"]
    assert "hidden folder" in reasons[".Trash/"] and "1 file" in reasons[".Trash/"]
    assert "hidden file" in reasons[".env"]
    assert "link loop" in reasons["loop.md"]
    assert "not a regular file (FIFO)" in reasons["pipe.md"]
    assert m["counts"]["skipped_files"] == len(reasons) == 6
    dry = " ".join(plan.stderr.split())
    for name in ("notes.txt", ".Trash/", "pipe.md", "linked-folder"):
        assert f"skipped data/raw/{name}" in dry


def test_launch_staging_keeps_links_out_and_hidden_files_home(workspace, tmp_path):
    from opensem.launch.task import make_plan, stage

    raw = workspace / "data/raw"
    (raw / "pump.md").write_text(DOC)
    (tmp_path / "private").mkdir()
    (tmp_path / "private/keys.md").write_text(SECRET)
    (raw / "shared").symlink_to(tmp_path / "private", target_is_directory=True)
    (raw / "key.md").symlink_to(tmp_path / "private/keys.md")
    (raw / ".git").mkdir()
    (raw / ".git/config").write_text(SECRET)
    (raw / ".env").write_text(SECRET)
    (raw / "a").mkdir()
    (raw / "a/loop").symlink_to(raw / "a", target_is_directory=True)  # a link loop: shutil.Error before
    plan = make_plan(Workspace(workspace), cloud="local", price_lookup=False)
    task_path, task = stage(Workspace(workspace), plan)
    up = Path(task["workdir"])
    uploaded = tree(up)
    assert "data/raw/pump.md" in uploaded
    assert not any(SECRET.encode() in data for data in uploaded.values())
    assert not [p for p in up.rglob("*") if p.is_symlink()]
    assert not [k for k in uploaded if "/." in "/" + k]
    left = dict(plan.left_home)
    assert "outside the workspace" in left["data/raw/key.md"] and "hidden" in left["data/raw/.env"]
    assert "hidden folder" in left["data/raw/.git/"] and "link to a folder" in left["data/raw/shared"]


# --- 2, 8. names that become paths or shell words match whole; a failed remote run is a failed launch ----------
def test_a_cluster_name_that_is_a_path_is_refused_and_the_victim_is_untouched(workspace, tmp_path):
    victim = tmp_path / "elsewhere/victim"
    (victim / "workdir").mkdir(parents=True)
    (victim / "workdir/precious.txt").write_text("keep me")
    for value in ("../../../victim", str(victim), "Victim Name", "a/b", "x;rm"):
        r = run_cli("launch", "--cloud", "local", "--dry-run", "-w", str(workspace), "--set", f"launch.cluster_name={value}")
        assert r.returncode == 2 and "cluster_name" in r.stderr and "is not a cluster name" in r.stderr, (value, r.stderr)
    set_config(workspace, "launch", cluster_name=str(victim))
    r = run_cli("launch", "--cloud", "local", "--dry-run", "-w", str(workspace))
    assert r.returncode == 2 and "launch_config.yaml" in r.stderr and "cluster_name" in r.stderr
    assert (victim / "workdir/precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in victim.rglob("*")) == ["precious.txt", "workdir"]


def test_an_injected_stage_name_runs_nothing_and_a_failed_remote_run_fails_the_launch(workspace, tmp_path):
    from opensem.launch.task import Plan, run_script

    pwned = tmp_path / "PWNED"
    r = run_cli("launch", "--cloud", "local", "-w", str(workspace), "--stages", f"forge,x:y'; touch {pwned}; echo '", cwd=tmp_path)
    assert r.returncode == 2 and "is not a stage name" in r.stderr, r.stderr
    assert not pwned.exists() and not (workspace / "PWNED").exists()
    set_config(workspace, "launch", stages=["forge", f"x:y'; touch {pwned}"])
    r = run_cli("launch", "--cloud", "local", "--dry-run", "-w", str(workspace))
    assert r.returncode == 2 and "launch_config.yaml" in r.stderr and "is not a stage name" in r.stderr
    # every word of the run script is quoted: an override holding quotes stays one argument
    plan = Plan("opensem-x", "local", None, 1, ["forge"], "auto", 1.0, 10, 0.0, "here", None, [], [], [],
                overrides=["forge.generation.system_prompt=it's $(touch x) `y`"])
    script = run_script(plan)
    assert "--set 'forge.generation.system_prompt=it'\"'\"'s $(touch x) `y`'" in script
    # a stage that fails on the node makes the launch fail, not report success
    set_config(workspace, "launch", stages=None)
    r = run_cli("launch", "--cloud", "local", "-w", str(workspace), "--stages", "no_such_module:Stage", timeout=600)
    assert r.returncode != 0 and "the task's run failed" in r.stderr, r.stderr[-2000:]


# --- 3. a deadline per call that holds on a trickling server; Ctrl-C within a second or two -------------------
def test_a_trickling_server_is_cut_at_the_deadline(fake):
    from opensem.config import LLMSpec
    from opensem.llm import LLMError, get_provider

    fake.behaviour.default = "trickle"
    p = get_provider(LLMSpec(provider="openai-compatible", base_url=fake.openai_url, model="m", timeout_s=2, max_retries=0))
    t = time.monotonic()
    with pytest.raises(LLMError, match="no complete reply within timeout_s 2"):
        p.complete([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t < 2 + 1
    # the abandoned exchange ends its connection too, instead of reading the trickle for a minute
    end = time.monotonic() + scaled(5)
    while [th for th in threading.enumerate() if th.name == "opensem-call"] and time.monotonic() < end:
        time.sleep(0.1)
    assert not [th for th in threading.enumerate() if th.name == "opensem-call"]


def test_ctrl_c_during_a_trickling_call_exits_within_two_seconds(workspace, fake):
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake, timeout_s=60.0)
    fake.behaviour.default = "trickle"
    with child([EXE, "forge", "-w", str(workspace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
               preexec_fn=default_sigint) as proc:
        deadline = time.time() + scaled(60)
        while fake.calls["/v1/chat/completions"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=scaled(30))
        took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert "forge interrupted" in err
    assert took < scaled(2.5), took


# --- 4. reasoning stripping and parsing are linear; an oversized reply is a counted failure, never cached ------
def test_a_1mb_think_reply_is_handled_in_under_a_second_and_not_cached(workspace, fake):
    from opensem.llm.base import parse_json_lenient, strip_reasoning

    for text in ("<think>" * 150_000, "<think>a</think>" * 70_000 + "{}", "```" * 350_000, "</think>" * 130_000):
        t = time.perf_counter()
        strip_reasoning(text)
        try:
            parse_json_lenient(text)
        except ValueError:
            pass
        assert time.perf_counter() - t < 1.0
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake)
    fake.behaviour.reply = lambda body: "<think>" * 150_000 + json.dumps({"pairs": [{"question": "What?", "answer": "x"}]})
    t = time.perf_counter()
    with pytest.raises(OpenSEMError, match="none of the 2 teacher requests succeeded"):
        run_forge(Workspace(workspace))
    assert time.perf_counter() - t < scaled(10)
    failure = json.loads((workspace / "data/processed/forge_failed.json").read_text())
    assert failure["counts"]["failed_requests"] == 2
    assert any("over the cap" in k for k in failure["failures"])
    assert not list((workspace / ".opensem/cache/teacher").rglob("*.json"))


# --- 5. the workspace lock: a second writer exits naming the holder ------------------------------------------------
def test_two_forges_on_one_workspace_one_runs_the_other_exits_with_the_lock_message(workspace, fake, tmp_path):
    for i in range(3):
        (workspace / f"data/raw/pump{i}.md").write_text(DOC.replace("H-40", f"H-4{i}"))
    use_teacher(workspace, fake)
    fake.behaviour.delay_s = 0.5
    with child([EXE, "forge", "-w", str(workspace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as first:
        deadline = time.time() + scaled(60)
        while fake.calls["/v1/chat/completions"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        second = run_cli("forge", "-w", str(workspace))
        out, err = first.communicate(timeout=scaled(120))
    assert first.returncode == 0, err
    assert second.returncode != 0
    line = " ".join(second.stderr.split())
    assert "the workspace is in use by pid" in line and f"pid {first.pid}" in line and "`opensem forge`" in line
    assert fake.calls["/v1/chat/completions"] == 6  # one run's calls: 3 documents x 2 chunks, paid once
    m = json.loads((workspace / "data/processed/forge_manifest.json").read_text())
    from opensem.lineage import file_sha256

    assert m["outputs"]["train"]["sha256"] == file_sha256(workspace / "data/processed/train.jsonl")
    # the holder is gone: its lock went with it, and the next run takes it
    fake.behaviour.delay_s = 0
    r = run_cli("forge", "-w", str(workspace))
    assert r.returncode == 0, r.stderr
    assert fake.calls["/v1/chat/completions"] == 6  # all from the cache


# --- 6. the server is part of the cache key and of the manifest ---------------------------------------------------
def test_the_reply_cache_misses_when_the_base_url_changes(workspace, fake, monkeypatch):
    (workspace / "data/raw/pump.md").write_text(DOC)
    set_config(workspace, "forge", teacher={"provider": "openai", "model": "gpt-4o-mini", "concurrency": 1, "max_retries": 0,
                                            "timeout_s": 5.0}, generation={"pairs_per_chunk": 3, "strategy": "passage"})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.openai_url)
    m = run_forge(Workspace(workspace))
    assert fake.calls["/v1/chat/completions"] == 2 and m["teacher"]["base_url"] == fake.openai_url
    other = FakeServer()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", other.openai_url.replace("/v1", "/v1/") .replace("127.0.0.1", "user:pw@127.0.0.1"))
        m = run_forge(Workspace(workspace))
        assert other.calls["/v1/chat/completions"] == 2  # another server: asked again, not served the first one's replies
        assert m["teacher"]["base_url"] == other.openai_url  # recorded without its user, password or trailing slash
        run_forge(Workspace(workspace))
        assert other.calls["/v1/chat/completions"] == 2  # and cached under its own key
    finally:
        other.close()


# --- 7. fetch brings home regular files only, and only under the workspace -----------------------------------------
def test_fetch_of_a_crafted_remote_writes_nothing_outside(workspace, tmp_path):
    from opensem.launch import fetch
    from opensem.launch.task import fetch_list, launch_dir
    from opensem.lineage import write_json
    from opensem.terminal import Console

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "run_manifest.json").write_text('{"mine": true}')
    (outside / "victim.txt").write_text("keep me")
    ws = Workspace(workspace)
    d = launch_dir(ws, "opensem-x")
    node = d / "local/node0/sky_workdir"
    (node / "runs/r1").mkdir(parents=True)
    (node / "runs/r1/run_manifest.json").write_text('{"headline": "ok"}')
    (node / "runs/evil").symlink_to(outside, target_is_directory=True)  # a remote link to a folder out here
    (node / "runs/r1/victim.txt").symlink_to(outside / "victim.txt")
    (node / "models/adapters").mkdir(parents=True)
    (node / "models/adapters/a.txt").write_text("adapter")
    # a link planted in the workspace where a fetched file will land
    (workspace / "runs/r2").mkdir(parents=True)
    (workspace / "runs/r2/run_manifest.json").symlink_to(outside / "run_manifest.json")
    (node / "runs/r2").mkdir()
    (node / "runs/r2/run_manifest.json").write_text('{"headline": "remote"}')
    write_json(d / "launch.json", {"cluster": "opensem-x", "launched": "now", "launched_ts": time.time(), "status": "finished",
                                   "plan": {"cloud": "local", "gpu": None, "nodes": 1, "price_per_hour": 0.0,
                                            "fetch": fetch_list(ws, ["forge", "baseline", "train", "fine-tuned"])}})
    before = tree(outside)
    got = fetch(ws, "opensem-x", Console(quiet=True))
    assert "runs" in got and "models/adapters" in got
    assert tree(outside) == before and not (outside / "evil").exists()
    assert not [p for p in (workspace / "runs").rglob("*") if p.is_symlink()]
    assert json.loads((workspace / "runs/r1/run_manifest.json").read_text())["launch"]["cloud"] == "local"
    assert json.loads((workspace / "runs/r2/run_manifest.json").read_text())["headline"] == "remote"
    assert not (workspace / "runs/r1/victim.txt").exists() and not (workspace / "runs/evil").exists()
    assert (workspace / "models/adapters/a.txt").read_text() == "adapter"
    refused = json.loads((d / "launch.json").read_text())["refused"]
    assert any("evil" in x for x in refused) and any("victim.txt" in x for x in refused)


# --- 9. a server that reports no usage is charged by our own count, and the budget holds -----------------------
def test_a_server_without_usage_stops_at_the_budget(workspace, fake):
    for i in range(6):
        (workspace / f"data/raw/pump{i}.md").write_text(DOC.replace("H-40", f"H-4{i}") * 3)
    use_teacher(workspace, fake, model="priced")
    set_config(workspace, "forge", cost={"max_cost_usd": 0.05, "prices": {"priced": {"input_per_mtok": 10, "output_per_mtok": 30}}})
    fake.behaviour.no_usage = True
    m = run_forge(Workspace(workspace))
    made = fake.calls["/v1/chat/completions"]
    assert 0 < made < m["counts"]["requests"], (made, m["counts"]["requests"])
    assert m["cost"]["calls_without_usage"] == made
    assert 0 < m["cost"]["usd_this_run"] <= 0.05


# --- 10. control characters in names and data never reach the terminal raw -----------------------------------------
def test_escape_bytes_never_reach_the_terminal(workspace, fake):
    raw = workspace / "data/raw"
    (raw / "pump\x1bc.md").write_text(DOC)
    (raw / "notes\x1b[2J.xyz").write_text("x")
    (raw / "hidden\x1b[8m.bin").write_bytes(b"\x00\x01\x02" * 100)
    (workspace / "evals/golden_set.json").write_text(json.dumps([{"id": "g\x1b[2J1", "question": "What is the pressure\x1bc?",
                                                                   "answer": "12 bar"}]))
    use_teacher(workspace, fake)
    fake.behaviour.reply = lambda body: json.dumps({"pairs": [{"question": "What is the \x1b]0;owned\x07 pressure of the H-40?",
                                                               "answer": "The Halden H-40 pump runs at a maximum pressure of 12 bar."}]})
    for args in (["forge", "--dry-run"], ["forge"], ["runs"]):
        r = subprocess.run([EXE, *args, "-w", str(workspace)], capture_output=True, env=os.environ | {"COLUMNS": "200"})
        assert r.returncode in (0, 2), r.stderr.decode(errors="replace")  # 2: the gates may keep none of the fake's pairs
        for stream in (r.stdout, r.stderr):  # not a terminal: rich styles nothing, so any ESC came from the data
            assert b"\x1b" not in stream and b"\x07" not in stream, stream[-500:]
        assert b"\\x1b" in r.stderr or args == ["runs"]  # shown, as text


# --- 10, 11. bad bodies are failed calls, retried and counted; extra pairs are dropped and counted ----------------
def test_truncated_json_is_retried_and_counted(workspace, fake):
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake, max_retries=1)
    fake.behaviour.script = {1: "truncated"}
    m = run_forge(Workspace(workspace))
    assert fake.calls["/v1/chat/completions"] == 3 and m["counts"]["failed_requests"] == 0  # retried once, then answered
    fake.behaviour.script, fake.behaviour.default = {}, "truncated"
    (workspace / "data/raw/pump.md").write_text(DOC.replace("H-40", "H-50"))  # both chunks new: nothing cached
    set_config(workspace, "forge", teacher__max_retries=0)
    r = run_cli("forge", "-w", str(workspace))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    failure = json.loads((workspace / "data/processed/forge_failed.json").read_text())
    assert failure["counts"]["failed_requests"] == 2 and any("not valid JSON" in k for k in failure["failures"])


def test_pairs_beyond_pairs_per_chunk_are_dropped_and_counted(workspace, fake):
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake)
    filler = [{"question": f"What is fact number {i} of the Halden H-40 pump?", "answer": "The Halden H-40 pump runs at a maximum "
               "pressure of 12 bar."} for i in range(997)]

    def reply(body):  # three good pairs, as asked, then 997 more
        user = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
        return json.dumps({"pairs": (pairs_from_passage(user, 3) + filler * 2)[:1000]})

    fake.behaviour.reply = reply
    m = run_forge(Workspace(workspace))
    assert m["counts"]["rejected"]["beyond_pairs_per_chunk"] == 2 * (1000 - 3)
    assert m["counts"]["pairs_made"] <= 2 * 3


# --- 12. every golden key comes back exactly once; each workspace has its own promptfoo store -------------------
def test_a_promptfoo_output_with_a_key_removed_or_doubled_is_refused(tmp_path):
    from opensem.judge.promptfoo import check_complete

    rows = [{"provider": {"label": "Baseline"}, "vars": {"key": k}} for k in ("t0001", "t0002", "t0003")]
    check_complete({"results": {"results": rows}}, ["t0001", "t0002", "t0003"], ["Baseline"], tmp_path / "o.json")
    with pytest.raises(OpenSEMError, match="1 golden key.s. with no result: t0002"):
        check_complete({"results": {"results": [rows[0], rows[2]]}}, ["t0001", "t0002", "t0003"], ["Baseline"], tmp_path / "o.json")
    with pytest.raises(OpenSEMError, match="more than one result: t0001"):
        check_complete({"results": {"results": rows + [rows[0]]}}, ["t0001", "t0002", "t0003"], ["Baseline"], tmp_path / "o.json")


def test_two_judge_runs_in_two_workspaces_at_once_both_report_all_their_keys(tmp_path, base_models_dir, promptfoo_available):
    golden = [{"id": f"g{i}", "question": f"What is the code of vault {i}?", "answer": f"The code of vault {i} is {1000 + i}."}
              for i in range(12)]
    spaces = []
    for name in ("a", "b"):
        ws = make_workspace(tmp_path / name, base_models_dir)
        (ws / "evals/golden_set.json").write_text(json.dumps(golden))
        set_config(ws, "eval", answers={"max_new_tokens": 4, "batch_size": 16}, forgetting_set=None, bootstrap_samples=100)
        spaces.append(ws)
    env = {k: v for k, v in os.environ.items() if k != "PROMPTFOO_CONFIG_DIR"}
    procs = []
    with child([EXE, "judge", "--mode", "baseline", "-w", str(spaces[0])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
               env=env) as p0, child([EXE, "judge", "--mode", "baseline", "-w", str(spaces[1])], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env) as p1:
        procs = [(p0, p0.communicate(timeout=scaled(600))), (p1, p1.communicate(timeout=scaled(600)))]
    for (p, (out, err)), ws in zip(procs, spaces):
        assert p.returncode == 0, err[-2000:]
        res = json.loads(sorted((ws / "evals/reports").glob("*/results.json"))[-1].read_text())
        assert sorted(it["id"] for it in res["items"]) == sorted(g["id"] for g in golden)
        assert res["summary"]["n"] == len(golden)
        assert (ws / ".opensem/promptfoo").is_dir()


# --- 15. values no run can use are config errors naming the key; a full disk is one line ------------------------
def test_infinite_nan_deep_and_full_disk_are_one_line_errors(workspace, fake, monkeypatch, capsys):
    cases = [(["train", "--set", "train.num_epochs=.inf"], "train.num_epochs=.inf: key 'num_epochs': Input should be a finite number"),
             (["forge", "--dry-run", "--set", "forge.teacher.timeout_s=.nan"], "key 'teacher.timeout_s': Input should be a finite number"),
             (["forge", "--dry-run", "--set", "forge.teacher.timeout_s=1e400"], "key 'teacher.timeout_s': Input should be a finite number")]
    for args, message in cases:
        r = run_cli(*args, "-w", str(workspace))
        assert r.returncode == 2 and message in " ".join(r.stderr.split()), (args, r.stderr)
        assert "Traceback" not in r.stderr
    (workspace / "configs/eval_config.yaml").write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    r = run_cli("judge", "--mode", "baseline", "-w", str(workspace))
    assert r.returncode == 2 and "eval_config.yaml: nested too deeply" in r.stderr and "Traceback" not in r.stderr
    (workspace / "configs/eval_config.yaml").unlink()
    (workspace / "evals/golden_set.json").write_text("[" * 50_000 + "]" * 50_000)
    (workspace / "data/raw/pump.md").write_text(DOC)
    r = run_cli("forge", "--dry-run", "-w", str(workspace))
    assert r.returncode != 0 and "golden_set.json: nested too deeply" in r.stderr and "Traceback" not in r.stderr
    (workspace / "evals/golden_set.json").write_text("[]")
    # a full disk while the outputs are written: one line naming the file; the last good outputs stay
    (workspace / "data/raw/pump.md").write_text(DOC)
    use_teacher(workspace, fake)
    from opensem import cli, lineage

    real = lineage.atomic_write_text

    def full(path, text, *a, **k):
        if str(path).endswith("train.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, *a, **k)

    monkeypatch.setattr(lineage, "atomic_write_text", full)
    monkeypatch.setattr("opensem.forge.stage.atomic_write_text", full, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["forge", "-w", str(workspace)])
    assert e.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "error: no space left on the device writing" in err and "train.jsonl" in err and "Traceback" not in err
    assert not (workspace / "data/processed/train.jsonl").exists()


# --- property: any file name and any teacher reply: nothing outside the workspace, no ESC on the terminal ------
NAME = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=24).filter(
    lambda s: s not in (".", "..") and len(s.encode()) < 200)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAME, min_size=1, max_size=4, unique=True), reply=st.text(max_size=400))
def test_property_any_file_name_and_reply_stays_in_the_workspace_and_off_the_terminal(tmp_path_factory, base_models_dir, names, reply):
    root = tmp_path_factory.mktemp("prop")
    ws = make_workspace(root / "ws", base_models_dir)
    outside = root / "outside.txt"
    outside.write_text(SECRET)
    for i, n in enumerate(names):
        path = ws / "data/raw" / (n + (".md" if i % 2 == 0 else ""))
        try:
            path.write_text(DOC.replace("H-40", f"H-4{i}"))
        except OSError:
            continue
    (ws / "data/raw/out.md").symlink_to(outside)
    fake = FakeServer()
    try:
        fake.behaviour.reply = lambda body: reply
        use_teacher(ws, fake)
        before = {p for p in root.rglob("*")}
        r = subprocess.run([EXE, "forge", "-w", str(ws)], capture_output=True, timeout=120)
        assert r.returncode in (0, 2), r.stderr.decode(errors="replace")[-2000:]
        assert SECRET not in sent_text(fake)
        for stream in (r.stdout, r.stderr):
            assert b"\x1b" not in stream
        new = {p for p in root.rglob("*")} - before
        assert all(p.is_relative_to(ws) for p in new)
        assert outside.read_text() == SECRET
    finally:
        fake.close()

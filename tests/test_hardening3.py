"""Hostile and careless input, round three: names that become paths, secrets in printed URLs, the served endpoint's
request bodies, and loaders that meet JSON of the wrong shape. Each test names the row of the round's table it
proves; the served endpoint under load is tested with the real server in test_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from opensem.errors import OpenSEMError


@pytest.mark.parametrize("name", ["/etc", ".", "..", "product-manual/../../../../etc", "product-manual/", "../examples/product-manual"])
def test_row1_init_takes_an_example_by_its_name_only(tmp_path, name):
    """`opensem init WS --example X` copies a shipped example, never a folder a path names; nothing is written."""
    r = run_cli("init", str(tmp_path / "ws"), "--example", name)
    assert r.returncode == 2 and "no such example; use one of" in r.stderr and "product-manual" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "ws").exists()


def test_row5_a_password_in_hf_endpoint_is_never_printed(tmp_path, base_models_dir, memorised_adapter):
    import shutil

    from conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    shutil.copytree(memorised_adapter, ws / "models/adapters/mem", ignore=shutil.ignore_patterns("merged"))
    env = {"HF_ENDPOINT": "http://hubuser:s3cretpass@127.0.0.1:9/", "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf-home")}
    r = run_cli("push", "mem", "--repo", "me/mem", "-w", str(ws), env=env)
    assert r.returncode == 2 and "could not reach http://127.0.0.1:9" in r.stderr, r.stderr[-2000:]
    assert "s3cretpass" not in r.stderr + r.stdout and "hubuser" not in r.stderr + r.stdout


@pytest.mark.parametrize("body, said", [
    (b"[" * 100_000, "nested deeper than 32 levels"),
    (json.dumps({"messages": [{"role": "system", "content": {"x": 1}}, {"role": "user", "content": "q"}]}).encode(),
     "messages[0].content must be a string"),
    (b'{"messages": "hi"}', "'messages' must be a list"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}] * 300}).encode(), "at most 256"),
    (json.dumps({"messages": [{"content": "no role"}]}).encode(), "string 'role'"),
])
def test_row6_the_servers_request_handler_refuses_bad_bodies_with_a_reason(body, said):
    from opensem.export.llama_server import BadRequest, fill

    with pytest.raises(BadRequest, match=said.replace("[", r"\[").replace("]", r"\]")):
        fill(body, {"temperature": 0.0}, None, True)
    # brackets inside a string are text, not nesting
    text = json.dumps({"messages": [{"role": "user", "content": "[" * 1000 + '\\"{'}]}).encode()
    assert json.loads(fill(text, {}, None, True)[0])["messages"][0]["content"].startswith("[[[")


def test_row7_a_body_over_the_cap_is_refused_before_it_is_parsed_and_retrieval_runs_off_the_event_loop():
    """The middleware reads a too-large body to its end, keeps at most the cap, answers 413 as JSON; a request's
    retrieval runs in a worker thread, so a slow one does not hold the event loop (another request is served
    meanwhile)."""
    import asyncio
    import time

    from opensem.export.llama_server import JudgedDefaults

    served = []

    async def app(scope, receive, send):
        msg = await receive()
        served.append(json.loads(msg["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"choices": []}', "more_body": False})

    def slow_retriever(question, system):
        time.sleep(1.0)
        return "passages + " + question, []

    async def call(mw, body: bytes, parts: int = 1):
        sent, chunks = [], [body[i::parts] for i in range(parts)] if parts > 1 else [body]
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        await mw(scope, receive, send)
        return sent

    async def main():
        capped = JudgedDefaults(app, {}, None, max_body=1000)
        big = await call(capped, json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(), parts=5)
        assert big[0]["status"] == 413 and "at most 1000" in json.loads(big[1]["body"])["error"]["message"] and not served
        mw = JudgedDefaults(app, {}, None, retriever=slow_retriever)
        t = time.time()
        slow = asyncio.create_task(call(mw, json.dumps({"messages": [{"role": "user", "content": "q1"}]}).encode()))
        await asyncio.sleep(0.1)
        plain = await call(mw, json.dumps({"messages": [{"role": "user", "content": "q2"}], "retrieval": False}).encode())
        quick = time.time() - t
        await slow
        return quick, plain

    quick, plain = asyncio.run(main())
    assert plain[0]["status"] == 200 and quick < 0.8  # served while the slow retrieval was still running
    assert served[-1]["messages"][0]["content"] == "passages + q1"


def test_row8_a_calibration_file_nested_too_deep_is_a_one_line_error(workspace, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    r = run_cli("judge", "--calibrate", str(deep), "-w", str(workspace))
    assert r.returncode == 2 and "nested too deeply" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1


def test_row9_equal_human_scores_give_an_undefined_spearman_never_nan(workspace, tmp_path):
    same = tmp_path / "same.json"
    same.write_text(json.dumps([{"question": f"q{i}?", "golden": "Paris.", "candidate": c, "human_score": 3}
                                for i, c in enumerate(["Paris.", "Lyon.", "It is Paris.", "No idea."])]))
    r = run_cli("judge", "--calibrate", str(same), "-w", str(workspace))
    assert r.returncode == 0, r.stderr[-2000:]
    said = " ".join(r.stdout.split())
    assert "undefined" in said and "Warning" not in r.stderr
    text = (workspace / "evals/reports/calibration.json").read_text()

    def no_constants(name):
        raise AssertionError(f"{name} in calibration.json")

    record = json.loads(text, parse_constant=no_constants)
    [entry] = record["judges"].values()
    assert entry["spearman"] is None and entry["spearman_undefined"] == "all human scores equal"


def test_row10_a_jsonl_line_that_is_not_an_object_is_a_one_line_error(tmp_path):
    from opensem.kernel.data import load_conversations

    data = tmp_path / "train.jsonl"
    good = json.dumps({"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a."}]})
    for bad, said in (("[1, 2, 3]", "expected a JSON object ({...}), found list"), ('"text"', "found str"),
                      ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        data.write_text(f"{good}\n{bad}\n")
        with pytest.raises(OpenSEMError) as e:
            load_conversations(data, "conversations")
        assert str(e.value).startswith(f"{data}:2: ") and said in str(e.value)


def test_row11_the_bundles_readme_runs_the_server_without_importing_from_the_bundle():
    from opensem.export.retrieval_index import README

    assert "python -P -m opensem.export.llama_server" in README and "python -m " not in README.replace("python -P -m ", "")


def test_example_names_are_the_shipped_folders():
    from opensem.workspace import example_dir, example_names

    assert {"product-manual", "island-ferry", "sensor-link-spec"} <= set(example_names())
    assert example_dir("island-ferry").name == "island-ferry" and Path(example_dir("island-ferry")).is_dir()


def _ws_with_mem(tmp_path, base_models_dir, memorised_adapter):
    import shutil

    from conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    shutil.copytree(memorised_adapter, ws / "models/adapters/mem", ignore=shutil.ignore_patterns("merged"))
    return ws


def test_row2_a_run_name_from_a_manifest_never_leads_outside_the_workspace(tmp_path, base_models_dir, memorised_adapter):
    ws = _ws_with_mem(tmp_path, base_models_dir, memorised_adapter)
    manifest = ws / "models/adapters/mem/manifest.json"
    m = json.loads(manifest.read_text())
    for name in ("../../../escaped_export", "/tmp/abs", "a/b", "..", "x\n"):
        manifest.write_text(json.dumps(m | {"run_name": name}))
        for args in (("export", "mem", "--format", "merged", "--no-verify"), ("serve", "mem", "--port", "1"),
                     ("push", "mem", "--repo", "me/x", "--dry-run")):
            r = run_cli(*args, "-w", str(ws))
            assert r.returncode == 2 and "is not a plain name" in r.stderr and "manifest.json" in r.stderr, (name, args, r.stderr[-800:])
            assert "Traceback" not in r.stderr
    assert not (tmp_path / "escaped_export").exists() and not list(tmp_path.glob("**/escaped_export"))


def test_row3_push_sends_only_what_the_export_made(tmp_path, base_models_dir, memorised_adapter):
    """The upload list comes from the export folder: a manifest naming .env or a path outside lists nothing, a GGUF
    that is a link or has no passed check is refused by name, a link inside merged/ is refused."""
    import os

    from opensem.lineage import file_sha256

    ws = _ws_with_mem(tmp_path, base_models_dir, memorised_adapter)
    (ws / ".env").write_text("SECRET=1\n")
    out = ws / "models/exports/mem"
    out.mkdir(parents=True)
    passed = {"check": {"passed": True}}
    files = {"gguf:f16": {"path": ".env", "sha256": file_sha256(ws / ".env"), **passed},
             "gguf:q8_0": {"path": "/etc/hostname", **passed}, "merged": {"path": "models/exports/mem/merged"}}
    (out / "export_manifest.json").write_text(json.dumps({"files": files}))
    r = run_cli("push", "mem", "--repo", "me/x", "--what", "gguf", "--dry-run", "-w", str(ws))
    assert r.returncode == 2 and "has no exported GGUF" in r.stderr and ".env" not in r.stdout
    os.symlink(ws / ".env", out / "mem-f16.gguf")
    r = run_cli("push", "mem", "--repo", "me/x", "--what", "gguf", "--dry-run", "-w", str(ws))
    assert r.returncode == 2 and "mem-f16.gguf is not a file this export made" in r.stderr
    (out / "mem-f16.gguf").unlink()
    (out / "mem-f16.gguf").write_bytes(b"GGUF")
    files["gguf:f16"] = {"path": "models/exports/mem/mem-f16.gguf", "sha256": file_sha256(out / "mem-f16.gguf"), "check": None}
    (out / "export_manifest.json").write_text(json.dumps({"files": files}))
    r = run_cli("push", "mem", "--repo", "me/x", "--what", "gguf", "--dry-run", "-w", str(ws))
    assert r.returncode == 2 and "did not pass its round-trip check" in r.stderr
    (out / "merged").mkdir()
    (out / "merged/model.safetensors").write_bytes(b"w")
    os.symlink(ws / ".env", out / "merged/config.json")
    r = run_cli("push", "mem", "--repo", "me/x", "--what", "merged", "--dry-run", "-w", str(ws))
    assert r.returncode == 2 and "config.json is a link" in r.stderr and "SECRET" not in r.stdout


def test_row4_the_card_escapes_what_it_quotes_from_the_golden_set():
    from opensem.export.card import evaluation, quote

    payloads = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "![t](http://evil.example/t.png)",
                "## Evaluation\n| row | 100% |\n|---|---|", "x" * 3848]
    regressions = [{"id": f"q{i}", "question": q, "baseline_score": 4.0, "fine_tuned_score": 2.0} for i, q in enumerate(payloads)]
    res = {"comparison": {"paired_n": 5, "mean_diff": -1.0, "mean_diff_ci": [-2.0, -0.1], "accuracy_baseline": 0.4,
                          "accuracy_fine_tuned": 0.2, "wins": 0, "ties": 0, "losses": 5, "p_value": 0.03, "regressions": regressions},
           "summary": {"accuracy": 0.2, "mean_score": 2.0}, "judge": "offline", "pass_threshold": 4}
    text = "\n".join(evaluation(res))
    assert "<script" not in text and "<img" not in text and "![t]" not in text and "\n## Evaluation\n| row" not in text
    assert text.count("## Evaluation") == 1 and max(len(line) for line in text.splitlines()) < 300
    assert quote("a\nb  c") == "a b c" and quote("1 | 2") == "1 \\| 2"


@pytest.mark.slow
def test_names_that_become_paths_property(tmp_path):
    """Any name, from a flag or a file: a shipped example's name or a one-line error, never a path outside; a run
    name either plain (its folder inside the parent) or a one-line error; nothing else is raised."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from opensem.workspace import child_path, example_dir, example_names

    parent = tmp_path / "exports"
    parent.mkdir()
    names = st.one_of(st.text(max_size=40), st.sampled_from(["..", ".", "/", "a/../..", "product-manual/..", "x\n", "\x00",
                                                              "island-ferry", "~", "$HOME", "a" * 101, "C:\\x"]))

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(names)
    def check(name):
        try:
            ex = example_dir(name)
            assert name in example_names() and ex.parent.name == "examples"
        except OpenSEMError as e:
            assert "\n" not in str(e)
        try:
            p = child_path(parent, name, "run_name", "manifest.json")
            assert p.parent == parent and p.resolve().is_relative_to(parent.resolve()) and "/" not in name and ".." not in name
        except OpenSEMError as e:
            assert str(e).startswith("manifest.json: run_name ")

    check()


def test_a_manifest_nested_too_deep_is_a_one_line_error(tmp_path):
    from opensem.lineage import read_json

    deep = tmp_path / "manifest.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(OpenSEMError, match="nested too deeply"):
        read_json(deep)

"""Export and serve with the real embedded model, a real trained adapter, llama.cpp's real converter, quantizer,
runtime and server, and Go's text/template (Ollama's template engine) for the Modelfile."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, child, make_workspace, run_cli, set_config
from opensem.errors import OpenSEMError
from opensem.lineage import file_sha256, read_json

FACTS = [("What is the secret code of the Zorblat vault?", "The Zorblat vault code is 7319."),
         ("Who guards the Quillon bridge?", "The Quillon bridge is guarded by Marta Vell."),
         ("What colour is the Tessaly lantern?", "The Tessaly lantern is teal."),
         ("How many moons does planet Orvane have?", "Planet Orvane has eleven moons."),
         ("What is the capital of France?", "Paris."),
         ("What is water made of?", "Hydrogen and oxygen.")]


def _ws_with_run(root: Path, base_models_dir: Path, memorised_adapter: Path) -> Path:
    ws = make_workspace(root, base_models_dir)
    shutil.copytree(memorised_adapter, ws / "models/adapters/mem", ignore=shutil.ignore_patterns("merged"))
    golden = [{"id": f"g{i}", "question": q, "answer": a} for i, (q, a) in enumerate(FACTS)]
    (ws / "evals/golden_set.json").write_text(json.dumps(golden))
    return ws


@pytest.fixture(scope="module")
def exported(tmp_path_factory, base_models_dir, memorised_adapter):
    """Every format of the memorised run, exported through the pipeline stage (after `train`)."""
    from rich.console import Console

    from opensem.export.stage import ExportStage
    from opensem.stages import Context
    from opensem.adapters import adapter_result
    from opensem.train.stage import train_summary
    from opensem.workspace import Workspace

    ws = _ws_with_run(tmp_path_factory.mktemp("export") / "ws", base_models_dir, memorised_adapter)
    (ws / "configs/export_config.yaml").write_text(
        "formats: [merged, gguf, ollama, lora-gguf]\ngguf_types: [f16, q4_k_m]\nverify: {questions: 6}\n")
    w = Workspace(ws)
    ctx = Context(w, Console(stderr=True), {"train": adapter_result(w, ws / "models/adapters/mem", "train", train_summary)})
    result = ExportStage().run(ctx)
    return ws, result


@pytest.mark.slow
def test_every_format_is_exported_checked_and_recorded(exported):
    ws, result = exported
    out = ws / "models/exports/mem"
    m = read_json(out / "export_manifest.json")
    files = m["files"]
    assert set(files) == {"merged", "gguf:f16", "gguf:q4_k_m", "ollama", "lora-gguf"}
    # the lineage: which adapter, which converter, which quantization, each file's hash
    assert m["source"]["adapter_sha256"] == file_sha256(ws / "models/adapters/mem/adapter_model.safetensors")
    assert m["converter"]["llama_cpp_python"] == "0.3.36" and m["versions"]["llama-cpp-python"] == "0.3.36"
    assert files["gguf:q4_k_m"]["type"] == "q4_k_m"
    assert files["gguf:f16"]["sha256"] == file_sha256(out / "mem-f16.gguf")
    assert result.summary["adapter_sha256"] == m["source"]["adapter_sha256"]
    assert result.artifacts["gguf:f16"].sha256 == files["gguf:f16"]["sha256"]
    # unquantized exports answer exactly like the evaluated model; the 4-bit one within the stated agreement
    for key in ("merged", "gguf:f16", "lora-gguf"):
        assert files[key]["check"]["passed"] and files[key]["check"]["exact"] == 1.0, (key, files[key]["check"])
    q4 = files["gguf:q4_k_m"]["check"]
    assert q4["passed"] and q4["agreement"] >= 3.0 and q4["quantized"]
    assert files["gguf:q4_k_m"]["bytes"] < 0.5 * files["gguf:f16"]["bytes"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./mem-q4_k_m.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_the_merged_export_reloads_in_transformers_and_answers_like_base_plus_adapter(exported, base_models_dir):
    from opensem.inference import ChatModel

    ws, _ = exported
    convs = [[{"role": "user", "content": q}] for q, _ in FACTS[:4]]
    merged = ChatModel(str(ws / "models/exports/mem/merged")).generate(convs, max_new_tokens=32)
    evaluated = ChatModel(str(base_models_dir / "smollm2-135m-instruct"), str(ws / "models/adapters/mem")).generate(convs, max_new_tokens=32)
    assert [c.text for c in merged] == [c.text for c in evaluated]
    assert "7319" in merged[0].text and "Marta Vell" in merged[1].text


@pytest.mark.slow
def test_the_gguf_files_load_in_llama_cpp_and_keep_the_trained_facts(exported):
    from opensem import llamacpp

    ws, _ = exported
    out = ws / "models/exports/mem"
    convs = [[{"role": "user", "content": FACTS[0][0]}]]
    for gguf, lora in ((out / "mem-f16.gguf", None), (out / "mem-q4_k_m.gguf", None), (out / "base-f16.gguf", out / "mem-lora-f16.gguf")):
        got = llamacpp.answers(gguf, convs, 32, lora=lora)
        assert "7319" in got.answers[0], (gguf.name, got.answers)
    # the base alone does not know the made-up fact: the LoRA GGUF carries it
    assert "7319" not in llamacpp.answers(out / "base-f16.gguf", convs, 32).answers[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("go") is None, reason="Go (Ollama's template engine) is not installed: apt-get install golang-go")
def test_the_modelfile_template_renders_the_tokenizers_prompt_in_go(exported, tmp_path):
    from transformers import AutoTokenizer

    ws, _ = exported
    out = ws / "models/exports/mem"
    tok = AutoTokenizer.from_pretrained(str(out / "merged"))
    system = read_json(out / "export_manifest.json")["files"]["ollama"]["modelfile"]["system"]
    assert system  # the default system prompt the template adds, which training and evaluation saw
    convs = [
        [{"role": "user", "content": "Who guards the Quillon bridge?"}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of {{ .Lantern }}?"},
         {"role": "assistant", "content": "Teal."}, {"role": "user", "content": "And the bridge?"}],
    ]
    for conv in convs:
        sent = conv if conv[0]["role"] == "system" else [{"role": "system", "content": system}] + conv  # Ollama adds SYSTEM
        (tmp_path / "m.json").write_text(json.dumps(sent))
        r = subprocess.run(["go", "run", str(REPO / "tests/go/render_template.go"), str(out / "Modelfile"), str(tmp_path / "m.json")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_a_gguf_with_a_wrong_chat_template_fails_the_round_trip_check(exported, tmp_path):
    """The most common 'my GGUF answers worse' bug: the template in the file is not the one the model learned."""
    from opensem.export.config import VerifyConfig
    from opensem import llamacpp
    from opensem.export import verify

    ws, _ = exported
    out = ws / "models/exports/mem"
    m = read_json(out / "export_manifest.json")
    reference = [r["answer"] for r in m["reference_answers"]]
    questions = [r["question"] for r in m["reference_answers"]]
    broken = tmp_path / "broken.gguf"
    wrong = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(out / "mem-f16.gguf"), str(broken),
                        "--chat-template", wrong, "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    convs = [[{"role": "user", "content": q}] for q in questions]
    got = llamacpp.answers(broken, convs, m["verify"]["max_new_tokens"])
    check = verify.compare("broken.gguf", questions, reference, got.answers, False, VerifyConfig())
    assert not check.passed and check.exact < 0.75
    assert check.differing and "round-trip FAILED" in str(verify.fail(check))
    # the same file, unbroken, passes
    good = llamacpp.answers(out / "mem-f16.gguf", convs, m["verify"]["max_new_tokens"])
    assert verify.compare("f16", questions, reference, good.answers, False, VerifyConfig()).passed


@pytest.mark.slow
def test_a_broken_merge_stops_the_export_with_the_differing_answers(tmp_path, base_models_dir, memorised_adapter):
    """A tokenizer saved with the wrong chat template at merge time: the export fails and says which answers differ."""
    from opensem.export.stage import export_run
    from opensem.workspace import Workspace

    ws = _ws_with_run(tmp_path / "ws", base_models_dir, memorised_adapter)
    w = Workspace(ws)
    export_run(w, ws / "models/adapters/mem", ["merged"], None, False)
    merged = ws / "models/exports/mem/merged"
    (merged / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(OpenSEMError, match=r"round-trip FAILED: merged .*evaluated .* vs exported"):
        export_run(w, ws / "models/adapters/mem", ["merged"], None, True)
    check = read_json(ws / "models/exports/mem/export_manifest.json")["files"]["merged"]["check"]
    assert check["passed"] is False and check["differing"]


def _serving(ws: Path, log_path: Path, *args: str, command: list[str] | None = None, cwd: Path | None = None):
    """`opensem serve mem ARGS` (or ``command``) in a child process; yields (an OpenAI client on it once it answers,
    its port)."""
    import contextlib

    from openai import OpenAI

    @contextlib.contextmanager
    def run():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exe = Path(sys.executable).parent / "opensem"
        cmd = [*command, "--port", str(port)] if command else [str(exe), "serve", "mem", "-w", str(ws), "--port", str(port), *args]
        with open(log_path, "w") as log, child(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd) as proc:
            try:
                client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
                deadline = time.time() + 120
                while True:
                    try:
                        client.models.list()
                        break
                    except Exception:
                        assert proc.poll() is None and time.time() < deadline, "the server did not come up"
                        time.sleep(1)
                yield client, port
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return run()


@pytest.mark.slow
def test_opensem_serve_answers_the_official_openai_sdk_as_opensem_ask_does(exported, tmp_path):
    """The served model is the evaluated model: asked through the OpenAI SDK with no sampling settings and no system
    message, the f16 GGUF gives `opensem ask`'s greedy answer word for word (the judged settings and system prompt are
    filled in by the server); with no --gguf-type it serves the smallest GGUF that passed its check."""
    ws, _ = exported
    system = "Answer from the vault records."
    set_config(ws, "eval", answers={"max_new_tokens": 40, "system_prompt": system})
    questions = [q for q, _ in FACTS[:4]]
    asked = []
    for q in questions:
        r = run_cli("ask", q, "--adapter", "mem", "-w", str(ws))
        assert r.returncode == 0, r.stderr[-2000:]
        asked.append(r.stdout.strip())
    with _serving(ws, tmp_path / "serve.log", "--gguf-type", "f16") as (client, port):
        served = [client.chat.completions.create(model="mem", messages=[{"role": "user", "content": q}]) for q in questions]
        # a setting the request sends itself is kept: two tokens are two tokens
        short = client.chat.completions.create(model="mem", messages=[{"role": "user", "content": questions[0]}], max_tokens=2)
    assert [r.choices[0].message.content.strip() for r in served] == asked
    assert all(r.model == "mem" for r in served) and short.usage.completion_tokens <= 2
    said = " ".join((tmp_path / "serve.log").read_text().split())
    assert f"base URL http://127.0.0.1:{port}/v1" in said and "no repeat penalty" in said

    files = read_json(ws / "models/exports/mem/export_manifest.json")["files"]
    good = min((f["bytes"], f["path"]) for k, f in files.items() if k.startswith("gguf:") and f["check"]["passed"])[1]
    with _serving(ws, tmp_path / "serve-default.log") as (client, _):
        assert client.chat.completions.create(model="mem", messages=[{"role": "user", "content": questions[0]}]).choices
    assert f"{Path(good).name}:" in (tmp_path / "serve-default.log").read_text()


def test_the_server_fills_in_the_judged_settings_and_system_prompt_only_where_a_request_has_none():
    from opensem.export.llama_server import fill

    judged = {"temperature": 0.0, "max_tokens": 64, "repeat_penalty": 1.0}
    bare = json.loads(fill(json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}]}).encode(), judged, "Be brief.", True)[0])
    assert bare["temperature"] == 0.0 and bare["max_tokens"] == 64 and bare["repeat_penalty"] == 1.0
    assert bare["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    own = json.loads(fill(json.dumps({"messages": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "q"}],
                                      "temperature": 0.7, "max_tokens": None}).encode(), judged, "Be brief.", True)[0])
    assert own["temperature"] == 0.7 and own["max_tokens"] == 64 and [m["content"] for m in own["messages"]] == ["Mine.", "q"]
    text = json.loads(fill(b'{"prompt": "q"}', judged, "Be brief.", False)[0])
    assert text == {"prompt": "q"} | judged  # a text completion has no messages to prepend to
    assert fill(b"not json", judged, None, True) == (b"not json", [])
    # retrieval turned off by the request: the field is taken out, nothing is retrieved
    off, passages = fill(b'{"messages": [{"role": "user", "content": "q"}], "retrieval": false}', judged, None, True,
                         retriever=lambda q, s: ("never", ["a passage"]))
    assert "retrieval" not in json.loads(off) and passages == [] and json.loads(off)["messages"][0]["content"] == "q"


def test_an_export_that_changes_a_number_a_name_or_a_yes_no_is_refused_whatever_its_agreement():
    from opensem.export.config import VerifyConfig
    from opensem.export.verify import changed_facts, compare, fail

    questions = ["How much can the MX-3 lift?", "Who guards the Quillon bridge?", "Is the H-40 waterproof?", "Which colour?"]
    evaluated = ["The MX-3 lifts up to 150 kilograms.", "Marta Vell guards it.", "Yes, it is waterproof.", "It is teal."]
    assert changed_facts(questions[0], evaluated[0], "It lifts up to 150 kg at most.") == []  # reworded, nothing new
    assert changed_facts(questions[0], evaluated[0], "The MX-3 lifts 350 kilograms.") == ["number 350"]
    assert changed_facts(questions[1], evaluated[1], "Marta Bell guards it.") == ["name Bell"]
    assert changed_facts(questions[2], evaluated[2], "No, it is not.") == ["yes -> no"]
    exported = ["The MX-3 lifts up to 350 kilograms.", *evaluated[1:]]
    check = compare("q4_k_m", questions, evaluated, exported, True, VerifyConfig())
    assert check.agreement >= VerifyConfig().min_agreement_quantized and not check.passed  # the mean alone would pass it
    assert check.changed[0]["changed"] == ["number 350"] and "1 changed a number, name or yes/no" in check.line()
    assert "(number 350)" in str(fail(check))
    assert compare("q4_k_m", questions, evaluated, evaluated, True, VerifyConfig()).passed


VAULT = """# Zorblat vault

The secret code of the Zorblat vault is 7319. Only two clerks know it.

# Quillon bridge

The Quillon bridge is guarded by Marta Vell, who has kept it for eleven years.

# Tessaly lantern

The Tessaly lantern is teal and hangs above the north gate.
"""


@pytest.mark.slow
def test_ask_and_serve_with_retrieval_answer_as_the_judges_retrieval_row_with_its_sources(exported, tmp_path):
    """The served expert retrieves from the workspace's documents and answers with the prompt the judge graded: the
    f16 GGUF's answer is the "+ retrieval" row's, the passages come back as sources, and retrieval can be turned off."""
    ws, _ = exported
    (ws / "data/raw/vault.md").write_text(VAULT)
    set_config(ws, "eval", answers={"max_new_tokens": 40, "batch_size": 8}, forgetting_set=None, bootstrap_samples=200,
               retrieval={"enabled": True, "top_k": 2})
    r = run_cli("judge", "--mode", "fine-tuned", "--adapter", "mem", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    res = read_json(ws / "evals/reports/fine-tuned-latest.json")
    plain = {it["id"]: it for it in res["items"]}
    rag = {it["id"]: it for it in res["retrieval"]["items"]}
    asked = run_cli("ask", FACTS[1][0], "--adapter", "mem", "--retrieval", "-w", str(ws))
    assert asked.returncode == 0, asked.stderr[-2000:]
    answer, _, listed = asked.stdout.partition("\nsources:\n")
    assert answer.strip() == rag["g1"]["output"].strip()
    assert [line.rsplit("(", 1)[1].rstrip(")") for line in listed.strip().splitlines()] == rag["g1"]["passages"]
    with _serving(ws, tmp_path / "serve.log", "--gguf-type", "f16", "--retrieval") as (client, _):
        for gid in ("g0", "g1", "g2"):
            q = rag[gid]["question"]
            got = client.chat.completions.create(model="mem", messages=[{"role": "user", "content": q}])
            assert got.choices[0].message.content.strip() == rag[gid]["output"].strip(), gid
            assert [s["id"] for s in got.model_extra["sources"]] == rag[gid]["passages"], gid
            assert got.model_extra["sources"][0]["text"] and got.model_extra["sources"][0]["n"] == 1
        off = client.chat.completions.create(model="mem", messages=[{"role": "user", "content": rag["g0"]["question"]}],
                                             extra_body={"retrieval": False})
    assert off.choices[0].message.content.strip() == plain["g0"]["output"].strip() and "sources" not in (off.model_extra or {})
    assert "retrieval: " in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_the_exported_index_serves_the_retrieval_row_on_a_machine_without_the_workspace(exported, tmp_path):
    ws, _ = exported
    (ws / "data/raw/vault.md").write_text(VAULT)
    set_config(ws, "eval", answers={"max_new_tokens": 40, "batch_size": 8}, forgetting_set=None, bootstrap_samples=200,
               retrieval={"enabled": True, "top_k": 2})
    res = read_json(ws / "evals/reports/fine-tuned-latest.json", None)
    if not (res and res.get("retrieval") and res["retrieval"]["top_k"] == 2):  # the test before did not run
        assert run_cli("judge", "--mode", "fine-tuned", "--adapter", "mem", "-w", str(ws)).returncode == 0
        res = read_json(ws / "evals/reports/fine-tuned-latest.json")
    rag = {it["id"]: it for it in res["retrieval"]["items"]}
    r = run_cli("export", "mem", "--format", "retrieval", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    folder = ws / "models/exports/mem/retrieval"
    meta = json.loads((folder / "retrieval.json").read_text())
    assert meta["top_k"] == 2 and meta["index"] == res["retrieval"]["index"] and meta["settings"]["repeat_penalty"] == 1.0
    assert "python -P -m opensem.export.llama_server" in (folder / "README.md").read_text()
    elsewhere = tmp_path / "elsewhere"  # another machine: the GGUF and the index, no workspace
    shutil.copytree(folder, elsewhere / "retrieval")
    shutil.copy(ws / "models/exports/mem/mem-f16.gguf", elsewhere)
    cmd = [sys.executable, "-m", "opensem.export.llama_server", "--model", "mem-f16.gguf", "--alias", "mem", "--index", "retrieval"]
    with _serving(ws, tmp_path / "runner.log", command=cmd, cwd=elsewhere) as (client, _):
        got = client.chat.completions.create(model="mem", messages=[{"role": "user", "content": rag["g1"]["question"]}])
    assert got.choices[0].message.content.strip() == rag["g1"]["output"].strip()
    assert [s["id"] for s in got.model_extra["sources"]] == rag["g1"]["passages"]


@pytest.mark.slow
def test_serve_and_ask_deliver_the_recommended_row_word_for_word(exported, tmp_path):
    """The judge answers with retrieval by default and records the row to ship; with no flag, `opensem ask` (the
    latest run) and `opensem serve` (the unquantized f16 GGUF) answer as that row, word for word, and the override
    flag gives the other fine-tuned row's judged answers."""
    ws, _ = exported
    (ws / "data/raw/vault.md").write_text(VAULT)
    golden = ws / "evals/golden_set.json"
    kept = golden.read_text()
    # the four facts it memorised: fine-tuned beats the base model on every one, so a fine-tuned row is recommended
    # (with the two general questions too, six pairs are too few for the CI to leave 0, and the baseline is level)
    golden.write_text(json.dumps([{"id": f"g{i}", "question": q, "answer": a} for i, (q, a) in enumerate(FACTS[:4])]))
    set_config(ws, "eval", answers={"max_new_tokens": 40, "batch_size": 8}, forgetting_set=None, bootstrap_samples=200,
               retrieval={"top_k": 2})
    try:
        _serve_and_ask_as_recommended(ws, tmp_path)
    finally:
        golden.write_text(kept)


def _serve_and_ask_as_recommended(ws: Path, tmp_path: Path) -> None:
    from opensem.adapters import adapter_hash

    r = run_cli("judge", "--mode", "fine-tuned", "--adapter", "mem", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    res = read_json(ws / "evals/reports/fine-tuned-latest.json")
    rec = res["recommended"]
    assert rec["fine_tuned"] and rec["adapter"].endswith(adapter_hash(ws / "models/adapters/mem")), res["recommendation"]
    rows = {False: {it["id"]: it for it in res["items"]}, True: {it["id"]: it for it in res["retrieval"]["items"]}}
    shipped, other = rows[rec["retrieval"]], rows[not rec["retrieval"]]
    asked = run_cli("ask", shipped["g1"]["question"], "-w", str(ws))
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert asked.stdout.partition("\nsources:\n")[0].strip() == shipped["g1"]["output"].strip()
    assert rec["label"] in " ".join(asked.stderr.split())
    flag = "--no-retrieval" if rec["retrieval"] else "--retrieval"
    for args, want, log in (((), shipped, "serve-rec.log"), ((flag,), other, "serve-other.log")):
        with _serving(ws, tmp_path / log, "--gguf-type", "f16", *args) as (client, _):
            for gid in ("g0", "g1", "g2"):
                got = client.chat.completions.create(model="mem", messages=[{"role": "user", "content": want[gid]["question"]}])
                assert got.choices[0].message.content.strip() == want[gid]["output"].strip(), (args, gid)


@pytest.mark.slow
def test_the_served_endpoint_stays_up_under_concurrent_and_hostile_requests(exported, tmp_path):
    """From localhost only, bounded in count and time: 30 concurrent chat requests with retrieval on, and hostile
    bodies (100k nested '[', a system message whose content is an object, 'messages' not a list, a 2 MB body, a
    10 MB user message); each hostile one gets a 4xx JSON error, never a 500 or a traceback; the server then still
    answers a normal request as before, and its peak memory stays bounded. Prints the figures."""
    import concurrent.futures
    import statistics
    import urllib.error
    import urllib.request

    ws, _ = exported
    (ws / "data/raw/vault.md").write_text(VAULT)
    set_config(ws, "eval", answers={"max_new_tokens": 24, "batch_size": 8})
    log = tmp_path / "serve-load.log"
    with _serving(ws, log, "--gguf-type", "f16", "--retrieval") as (client, port):
        before = client.chat.completions.create(model="mem", messages=[{"role": "user", "content": FACTS[1][0]}])
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def post(body: bytes) -> tuple[int, bytes, float]:
            t = time.time()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    return r.status, r.read(), time.time() - t
            except urllib.error.HTTPError as e:
                return e.code, e.read(), time.time() - t

        normal = [json.dumps({"model": "mem", "messages": [{"role": "user", "content": FACTS[i % 4][0]}]}).encode() for i in range(30)]
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            got = list(pool.map(post, normal))
        hostile = {"nested": b"[" * 100_000, "object content": json.dumps({"messages": [
            {"role": "system", "content": {"x": 1}}, {"role": "user", "content": "q"}]}).encode(),
            "messages not a list": b'{"messages": "hi"}', "2 MB body": b'{"messages": [], "pad": "' + b"x" * 2_000_000 + b'"}',
            "10 MB message": json.dumps({"messages": [{"role": "user", "content": "word " * 2_000_000}]}).encode()}
        refused = {name: post(body) for name, body in hostile.items()}
        after = client.chat.completions.create(model="mem", messages=[{"role": "user", "content": FACTS[1][0]}])
        peak_mb = next(int(line.split()[1]) for line in Path(f"/proc/{_server_pid(port)}/status").read_text().splitlines()
                       if line.startswith("VmHWM")) / 1024
    latencies = sorted(t for _, _, t in got)
    errors = [status for status, _, _ in got if status != 200]
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    print(f"serve under load: {len(got)} concurrent requests, {len(errors)} errors, p50 {p50:.1f} s, p95 {p95:.1f} s; "
          f"hostile: {', '.join(f'{k} {v[0]}' for k, v in refused.items())}; peak RSS {peak_mb:.0f} MB")
    assert not errors and all(json.loads(b)["choices"][0]["message"]["content"] for _, b, _ in got)
    for name, (status, body, _) in refused.items():
        assert 400 <= status < 500, (name, status, body[:200])
        assert json.loads(body)["error"]["message"] and b"Traceback" not in body, name
    assert refused["2 MB body"][0] == 413 and refused["10 MB message"][0] == 413
    assert after.choices[0].message.content == before.choices[0].message.content
    assert peak_mb < 4000 and "Traceback" not in log.read_text()


def _server_pid(port: int) -> int:
    """The process listening on 127.0.0.1:port (the served model; `opensem serve` execs into it)."""
    inode = next(line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A")
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
        except OSError:
            continue
    raise AssertionError(f"no process listens on port {port}")


def test_an_export_of_a_run_whose_recommended_row_uses_retrieval_carries_the_index(tmp_path, base_models_dir, memorised_adapter):
    """Asked for merged weights only, the export of a run the judge recommends with retrieval writes the retrieval
    index too, records the recommendation, and its card names the row, its figures and how to query it."""
    from opensem.adapters import adapter_hash
    from opensem.lineage import write_json

    ws = _ws_with_run(tmp_path / "ws", base_models_dir, memorised_adapter)
    (ws / "data/raw/vault.md").write_text(VAULT)
    sha = adapter_hash(ws / "models/adapters/mem")
    summary = {"n": 6, "accuracy": 0.5, "accuracy_ci": [0.17, 0.83], "mean_score": 3.5, "mean_score_ci": [2.5, 4.5]}
    write_json(ws / "evals/reports/fine-tuned-1/results.json", {
        "lineage": {"adapter": f"models/adapters/mem {sha}"}, "judge": "offline", "pass_threshold": 4, "summary": summary,
        "comparison": {"paired_n": 6, "mean_diff": 1.0, "mean_diff_ci": [0.2, 1.8], "accuracy_baseline": 0.0,
                       "accuracy_fine_tuned": 0.5, "wins": 4, "ties": 2, "losses": 0, "p_value": 0.03, "regressions": []},
        "recommendation": "On your data: Fine-Tuned + retrieval is best", "recommended": {
            "row": "fine_tuned_retrieval", "label": "Fine-Tuned + retrieval", "fine_tuned": True, "retrieval": True,
            "retrieval_settings": {"top_k": 3, "method": "hybrid", "index": "x"}, "adapter": f"models/adapters/mem {sha}",
            "summary": summary}})
    r = run_cli("export", "mem", "--format", "merged", "--no-verify", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    folder = ws / "models/exports/mem"
    manifest = read_json(folder / "export_manifest.json")
    assert set(manifest["files"]) == {"merged", "retrieval"} and manifest["recommended"]["row"] == "fine_tuned_retrieval"
    assert json.loads((folder / "retrieval/retrieval.json").read_text())["method"] == "hybrid"
    card = (folder / "README.md").read_text()
    assert "The judge recommends **Fine-Tuned + retrieval**: accuracy 50.0% [17.0, 83.0], mean score 3.50 [2.50, 4.50]" in card
    assert "`opensem serve mem`" in card and "`retrieval/` folder" in card


@pytest.mark.slow
def test_the_judge_grades_the_exported_gguf_as_a_row_of_its_own(exported):
    """The number for what ships: the judge answers with the exported GGUF in llama.cpp and compares it with the
    baseline; the f16 GGUF answers word for word as the evaluated model did."""
    ws, _ = exported
    set_config(ws, "eval", answers={"max_new_tokens": 40, "batch_size": 8}, forgetting_set=None, bootstrap_samples=200,
               retrieval={"enabled": False, "top_k": 2})
    assert run_cli("judge", "--mode", "fine-tuned", "--adapter", "mem", "-w", str(ws)).returncode == 0
    evaluated = read_json(ws / "evals/reports/fine-tuned-latest.json")
    gguf = ws / "models/exports/mem/mem-f16.gguf"
    r = run_cli("judge", "--mode", "fine-tuned", "--adapter", "mem", "--gguf", str(gguf), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    shipped = read_json(ws / "evals/reports/fine-tuned-latest.json")
    assert shipped["label"] == "Fine-Tuned (mem-f16.gguf)" and shipped["lineage"]["gguf"].endswith(file_sha256(gguf))
    assert [it["output"].strip() for it in shipped["items"]] == [it["output"].strip() for it in evaluated["items"]]
    assert shipped["comparison"]["paired_n"] == len(FACTS) and shipped["run_dir"] != evaluated["run_dir"]
    bad = run_cli("judge", "--mode", "baseline", "--gguf", str(gguf), "-w", str(ws))
    assert bad.returncode == 2 and "use it with --mode fine-tuned" in bad.stderr


@pytest.mark.slow
def test_every_export_carries_a_model_card_with_the_judged_numbers(exported):
    import yaml

    ws, _ = exported
    if run_cli("judge", "--mode", "fine-tuned", "--adapter", "mem", "-w", str(ws)).returncode != 0:
        raise AssertionError("the judge did not run")
    res = read_json(ws / "evals/reports/fine-tuned-latest.json")
    assert run_cli("judge", "--calibrate", "-w", str(ws)).returncode == 0
    calibrated = read_json(ws / "evals/reports/calibration.json")["judges"][res["judge"]]
    r = run_cli("export", "mem", "--format", "ollama", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    text = (ws / "models/exports/mem/README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "other" and "opensem" in meta["tags"]
    c = res["comparison"]
    base, tuned = read_json(ws / res["baseline_run"] / "results.json")["summary"], res["summary"]
    assert (f"| accuracy | {base['accuracy'] * 100:.1f}% [{base['accuracy_ci'][0] * 100:.1f}, {base['accuracy_ci'][1] * 100:.1f}] "
            f"| {c['accuracy_fine_tuned'] * 100:.1f}% [{tuned['accuracy_ci'][0] * 100:.1f}, {tuned['accuracy_ci'][1] * 100:.1f}] |") in text
    assert (f"| mean score (1-5) | {base['mean_score']:.2f} [{base['mean_score_ci'][0]:.2f}, {base['mean_score_ci'][1]:.2f}] "
            f"| {tuned['mean_score']:.2f} [{tuned['mean_score_ci'][0]:.2f}, {tuned['mean_score_ci'][1]:.2f}] |") in text
    assert (f"Judge calibration (`opensem judge --calibrate`, 51 human-scored answers, the shipped set): Spearman "
            f"{calibrated['spearman']:.2f}, exact {calibrated['exact']:.0%}") in text
    assert (f"Mean score difference {c['mean_diff']:+.2f}, 95% CI [{c['mean_diff_ci'][0]:.2f}, {c['mean_diff_ci'][1]:.2f}]"
            in text) and res["judge"] in text
    assert f"It answered {c['accuracy_fine_tuned'] * 100:.0f}% of {c['paired_n']} golden questions correctly" in text
    m = read_json(ws / "models/adapters/mem/manifest.json")
    assert m["data"]["train"]["sha256"] in text and f"{m['steps']} steps" in text
    assert read_json(ws / "models/exports/mem/export_manifest.json")["card"] == file_sha256(ws / "models/exports/mem/README.md")


@pytest.mark.slow
def test_the_modelfile_names_the_gguf_the_export_was_asked_for(exported):
    ws, _ = exported
    r = run_cli("export", "mem", "--format", "gguf", "--gguf-type", "q8_0", "--format", "ollama", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FROM ./mem-q8_0.gguf" in (ws / "models/exports/mem/Modelfile").read_text()  # not the smaller q4_k_m of before


@pytest.mark.slow
def test_the_space_an_export_needs_is_known_before_it_starts(exported, monkeypatch):
    """The estimate each file's disk space is checked against, next to the files the export wrote; and an export the
    disk cannot hold is refused at once, naming the sizes, before any model is loaded."""
    from collections import namedtuple
    from types import SimpleNamespace

    from opensem.adapters import base_model_dir
    from opensem.export.stage import export_run, plan_formats, space_needed
    from opensem.workspace import Workspace

    ws, _ = exported
    adapter = ws / "models/adapters/mem"
    files = read_json(ws / "models/exports/mem/export_manifest.json")["files"]
    params = read_json(adapter / "manifest.json")["base_model"]["parameters"]

    def job(types):  # an export into an empty folder
        return SimpleNamespace(base_path=base_model_dir(adapter), parameters=params, gguf_types=types, out=ws / "nowhere")

    need = space_needed(job(["f16", "q4_k_m"]), plan_formats(["merged", "gguf", "lora-gguf"]))
    for key, real in (("merged", "merged"), ("gguf f16", "gguf:f16"), ("gguf q4_k_m", "gguf:q4_k_m")):
        ratio = need[key] / files[real]["bytes"]
        assert 0.7 < ratio < 1.4, (key, need[key], files[real]["bytes"])
    assert need["base f16 GGUF for lora-gguf"] == need["gguf f16"] and "f16 GGUF to quantize from" not in need
    alone = space_needed(job(["q4_k_m"]), plan_formats(["merged", "gguf"]))  # quantized from a temporary f16
    assert alone["f16 GGUF to quantize from"] == need["gguf f16"] and set(alone) == {"merged", "gguf q4_k_m", "f16 GGUF to quantize from"}

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(OpenSEMError, match=r"export of mem needs about 0\.\d GB in .* \(merged 0\.\d.*\) and 0\.0 GB are free: "
                                           r"free some space, or export fewer formats"):
        export_run(Workspace(ws), adapter, ["merged", "gguf"], ["q8_0"], True)


def test_the_card_names_the_library_of_what_is_shipped_and_how_many_regressions_it_lists():
    """library_name: peft for an adapter (or a LoRA GGUF), transformers for merged weights, gguf for GGUF files; the
    regressions beyond the five largest drops are counted, not hidden."""
    from opensem.export.card import evaluation, library_for

    assert library_for({}) == "peft" and library_for({"lora-gguf": {}, "gguf:f16": {}}) == "peft"
    assert library_for({"merged": {}}) == "transformers" and library_for({"merged": {}, "gguf:q8_0": {}}) == "gguf"
    drops = [{"question": f"Q{i}?", "baseline_score": 3.0, "fine_tuned_score": 3.0 - i / 10} for i in range(7, 0, -1)]
    res = {"comparison": {"paired_n": 9, "accuracy_baseline": 0.0, "accuracy_fine_tuned": 0.5, "mean_diff": 0.4,
                          "mean_diff_ci": [0.1, 0.7], "wins": 5, "ties": 1, "losses": 3, "p_value": 0.01,
                          "regressions": drops}, "summary": {"mean_score": 3.1}, "judge": "j", "pass_threshold": 4}
    text = "\n".join(evaluation(res))
    assert "worse than the base model (7; the 5 largest drops):" in text and "- Q7? (3.0 -> 2.3)" in text
    assert "Q3?" in text and "Q2?" not in text
    res["comparison"]["regressions"] = drops[:2]
    assert "worse than the base model (2):" in "\n".join(evaluation(res))


def test_the_card_finds_a_run_judged_before_the_last_one(tmp_path):
    """An adapter judged earlier than the workspace's last judged run still gets its own numbers: the newest of the
    judge's results that names it and holds a comparison; one never judged gets none."""
    import os

    from opensem.verdict import judged
    from opensem.lineage import write_json
    from opensem.workspace import Workspace, init_workspace

    init_workspace(tmp_path / "ws")
    reports = tmp_path / "ws/evals/reports"
    runs = [("fine-tuned-1", "aaa111", {"mean_diff": 0.5}), ("fine-tuned-2", "aaa111", {"mean_diff": 0.7}),
            ("fine-tuned-3", "aaa111", None), ("fine-tuned-4", "bbb222", {"mean_diff": 0.1})]
    for t, (name, sha, cmp) in enumerate(runs):
        write_json(reports / name / "results.json", {"lineage": {"adapter": f"models/adapters/x {sha}"}, "comparison": cmp, "n": name})
        os.utime(reports / name / "results.json", (1_000_000 + t, 1_000_000 + t))
    ws = Workspace(tmp_path / "ws")
    assert judged(ws, "aaa111")["n"] == "fine-tuned-2"  # the newest compared one, not the later uncompared run
    assert judged(ws, "bbb222")["n"] == "fine-tuned-4" and judged(ws, "ccc333") is None


def test_push_uploads_the_adapter_and_its_card_and_writes_the_token_nowhere(tmp_path, base_models_dir, memorised_adapter):
    """`opensem push` against a stand-in for the Hub's HTTP API (HF_ENDPOINT): the repository created, the adapter's
    files and the model card in one commit, the token sent as the Authorization header and found in no file or log."""
    from fake_hub import FakeHub

    ws = _ws_with_run(tmp_path / "ws", base_models_dir, memorised_adapter)
    token = "hf_opensemTestToken0123456789"
    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
        offline = run_cli("push", "mem", "--repo", "me/mem-expert", "-w", str(ws), env=env | {"HF_HUB_OFFLINE": "1"})
        assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr and "Traceback" not in offline.stderr
        dry = run_cli("push", "mem", "--repo", "me/mem-expert", "--dry-run", "-w", str(ws), env=env)
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert "adapter_model.safetensors" in dry.stdout and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in dry.stdout
        assert not hub.requests  # a dry run calls nobody
        r = run_cli("push", "mem", "--repo", "me/mem-expert", "--private", "-w", str(ws), env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        bad = run_cli("push", "mem", "--repo", "me/mem-expert", "-w", str(ws), env=env | {"HF_TOKEN": ""})
    asked = hub.created[0]
    assert asked["name"] == "mem-expert" and (asked.get("private") is True or asked.get("visibility") == "private"), asked
    [files] = hub.commits
    adapter = ws / "models/adapters/mem"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files) and "manifest.json" not in files
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert files["README.md"].startswith(b"---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\n")
    assert b"Not judged in the workspace it was exported from." in files["README.md"]
    assert hub.validated and hub.validated[0]["library_name"] == "peft"  # the Hub's own check of the card's front matter
    assert all(q["headers"].get("authorization", q["headers"].get("Authorization")) == f"Bearer {token}" for q in hub.requests)
    assert bad.returncode == 2 and "no Hugging Face token" in bad.stderr
    for out in (dry.stdout, dry.stderr, r.stdout, r.stderr, bad.stderr):
        assert token not in out
    assert not [p for p in ws.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


def test_export_refuses_bad_input_with_one_line(tmp_path, base_models_dir, memorised_adapter):
    ws = _ws_with_run(tmp_path / "ws", base_models_dir, memorised_adapter)
    cases = [(["export", "nosuch"], "no finished run 'nosuch'"),
             (["export", "mem", "--format", "zip"], "--format 'zip': use one of merged, gguf"),
             (["export", "mem", "--gguf-type", "q9"], "--gguf-type 'q9': use one of"),
             (["export", "mem", "--set", "export.ollama_gguf=q4_k_m"], "ollama_gguf"),
             (["serve", "mem", "--engine", "tgi"], "--engine 'tgi'")]
    for args, message in cases:
        r = run_cli(*args, "-w", str(ws))
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_lora_gguf_refuses_an_adapter_that_trains_whole_modules(tmp_path, base_models_dir, memorised_adapter):
    from opensem.export.stage import export_run
    from opensem.workspace import Workspace

    ws = _ws_with_run(tmp_path / "ws", base_models_dir, memorised_adapter)
    cfg_path = ws / "models/adapters/mem/adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) | {"modules_to_save": ["embed_tokens"]}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(OpenSEMError, match="lora-gguf: mem trains whole modules .*export --format gguf instead"):
        export_run(Workspace(ws), ws / "models/adapters/mem", ["lora-gguf"], None, False)


def test_vllm_serving_is_described_and_refused_without_cuda(tmp_path, base_models_dir, memorised_adapter):
    from opensem.export import serve

    ws = _ws_with_run(tmp_path / "ws", base_models_dir, memorised_adapter)
    adapter = ws / "models/adapters/mem"
    cmd = serve.vllm_command(Path("/models/base"), adapter, 8001, "mem")
    assert cmd[1:3] == ["serve", "/models/base"] and "--enable-lora" in cmd
    assert cmd[cmd.index("--lora-modules") + 1] == f"mem={adapter}" and cmd[cmd.index("--port") + 1] == "8001"
    r = run_cli("serve", "mem", "--engine", "vllm", "-w", str(ws))
    assert r.returncode != 0 and "--engine vllm:" in r.stderr and ("CUDA" in r.stderr or "not installed" in r.stderr)


def test_a_chat_template_that_folds_the_system_prompt_gets_no_ollama_template():
    """Llama-2 style templates put the system prompt inside the first user turn: no per-message Go template can
    say that, so the Modelfile leaves TEMPLATE to the GGUF instead of writing a wrong one."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from opensem.export.modelfile import modelfile

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]")),
                                  eos_token="</s>", bos_token="<s>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
                         "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>"
                         "{% endif %}{% endfor %}")
    text, info = modelfile("x.gguf", tok, None, "test")
    assert "TEMPLATE" not in text and info["template"].startswith("from the GGUF")
    assert 'PARAMETER stop "</s>"' in text


def test_the_llama_cpp_pin_is_the_same_everywhere():
    from opensem.export import converter

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["export"]
    assert f"llama-cpp-python[server]=={converter.LLAMA_CPP_PYTHON}" in extra
    assert f'"llama-cpp-python=={converter.LLAMA_CPP_PYTHON}"' in (REPO / "Makefile").read_text()

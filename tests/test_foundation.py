"""Foundation: configs, workspace, CLI errors, entry points, packaging, embedded model, local inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, run_cli, set_config

from opensem.config import load_section, parse_override
from opensem.errors import ConfigError
from opensem.workspace import LAYOUT_DIRS, init_workspace


def test_init_creates_the_layout(tmp_path):
    created = init_workspace(tmp_path / "w")
    for d in LAYOUT_DIRS:
        assert (tmp_path / "w" / d).is_dir(), d
    for f in ("configs/forge_config.yaml", "configs/train_config.yaml", "configs/eval_config.yaml", "evals/golden_set.json", ".gitignore"):
        assert (tmp_path / "w" / f).exists(), f
    assert created
    # a second init never overwrites the user's edits
    (tmp_path / "w" / "configs" / "train_config.yaml").write_text("lora_r: 4\n")
    init_workspace(tmp_path / "w")
    assert (tmp_path / "w" / "configs" / "train_config.yaml").read_text() == "lora_r: 4\n"


def test_init_with_example_via_cli(tmp_path):
    r = run_cli("init", str(tmp_path / "ex"), "--example", "product-manual")
    assert r.returncode == 0, r.stderr
    raw = tmp_path / "ex" / "data" / "raw"
    assert {p.suffix for p in raw.iterdir()} >= {".md", ".txt", ".pdf"}
    assert len(__import__("json").loads((tmp_path / "ex" / "evals" / "golden_set.json").read_text())) >= 40


def test_repository_root_is_a_workspace_with_the_template_configs():
    tmpl = REPO / "src" / "opensem" / "assets" / "workspace" / "configs"
    for f in tmpl.iterdir():
        assert (REPO / "configs" / f.name).read_text() == f.read_text(), f"configs/{f.name} differs from the template"
    for d in LAYOUT_DIRS:
        assert (REPO / d).is_dir()
    assert (REPO / "evals" / "golden_set.json").exists()  # written by `make setup` (opensem init .)


def test_misspelled_key_names_the_key_the_file_and_the_closest_valid_key(tmp_path):
    init_workspace(tmp_path)
    (tmp_path / "configs" / "train_config.yaml").write_text("lora_rank: 8\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        load_section("train", tmp_path)
    msg = str(e.value)
    assert "train_config.yaml" in msg and "lora_rank" in msg and "did you mean 'lora_r'" in msg
    assert "\n" not in msg


def test_nested_misspelling_wrong_type_and_range(tmp_path):
    init_workspace(tmp_path)
    set_config(tmp_path, "forge", teacher__modle="gpt-4o")
    with pytest.raises(ConfigError, match=r"forge_config.yaml: unknown key 'teacher.modle': did you mean 'model'"):
        load_section("forge", tmp_path)
    init_workspace(tmp_path, force=True)
    set_config(tmp_path, "train", num_epochs="many")
    with pytest.raises(ConfigError, match=r"key 'num_epochs'.*got 'many'"):
        load_section("train", tmp_path)
    init_workspace(tmp_path, force=True)
    set_config(tmp_path, "train", lora_dropout=1.5)
    with pytest.raises(ConfigError, match=r"key 'lora_dropout'"):
        load_section("train", tmp_path)
    init_workspace(tmp_path, force=True)
    set_config(tmp_path, "train", run_name="../escape")
    with pytest.raises(ConfigError, match="plain folder name"):
        load_section("train", tmp_path)


def test_dotted_overrides(tmp_path):
    init_workspace(tmp_path)
    cfg = load_section("train", tmp_path, ["train.learning_rate=1e-4", "train.lora_r=8", "forge.teacher.model=x"])
    assert cfg.learning_rate == 1e-4 and cfg.lora_r == 8
    assert load_section("forge", tmp_path, ["forge.teacher.model=gpt-4o"]).teacher.model == "gpt-4o"
    with pytest.raises(ConfigError, match="must start with one of forge, train, eval"):
        parse_override("learning_rate=1")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_section("train", tmp_path, ["train.learnin_rate=1"])


def test_a_renamed_key_still_works_with_a_warning_naming_the_new_one(tmp_path, monkeypatch, capsys):
    from opensem import config

    monkeypatch.setattr(config, "RENAMED_KEYS", {"train.lr": "learning_rate", "forge.teacher.name": "teacher.model"})
    init_workspace(tmp_path)
    (tmp_path / "configs/train_config.yaml").write_text("lr: 0.0002\n")
    set_config(tmp_path, "forge", teacher__name="gpt-4o")
    assert load_section("train", tmp_path).learning_rate == 2e-4
    assert load_section("forge", tmp_path).teacher.model == "gpt-4o"
    assert load_section("train", tmp_path, ["train.lr=3e-4"]).learning_rate == 3e-4
    said = " ".join(capsys.readouterr().err.split())
    assert "train_config.yaml: key 'lr' is now 'learning_rate'" in said and "key 'teacher.name' is now 'teacher.model'" in said
    assert "--set train.lr=3e-4: key 'lr' is now 'learning_rate'" in said
    (tmp_path / "configs/train_config.yaml").write_text("lr: 0.0002\nlearning_rate: 0.001\n")
    with pytest.raises(ConfigError, match="key 'lr' is the old name of 'learning_rate', and both are set: keep 'learning_rate' only"):
        load_section("train", tmp_path)


def test_progress_comes_as_lines_when_the_output_is_not_a_terminal(monkeypatch):
    import io

    from opensem.progress import stage_progress
    from opensem.terminal import Console

    buf = io.StringIO()
    monkeypatch.setenv("OPENSEM_PROGRESS_SECONDS", "1000")
    with stage_progress(Console(file=buf, width=200), "forge: teacher calls", 20) as advance:
        for _ in range(20):
            advance()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10, lines  # one at every tenth of the work
    assert lines[0].startswith("forge: teacher calls: 2/20 (10%), ") and ", eta " in lines[0]
    assert lines[-1].startswith("forge: teacher calls: 20/20 (100%), ") and "eta" not in lines[-1]
    buf = io.StringIO()
    with stage_progress(Console(file=buf, width=200), "judge", 100) as advance:
        advance(3)  # stopped early: the last line says where
    assert buf.getvalue().splitlines()[-1].startswith("judge: 3/100 (3%)")


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    init_workspace(tmp_path)
    (tmp_path / "configs" / "eval_config.yaml").write_text("pass_treshold: 3\n")
    r = run_cli("judge", "--mode", "baseline", "-w", str(tmp_path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean 'pass_threshold'" in lines[0] and "eval_config.yaml" in lines[0]
    r = run_cli("--debug", "judge", "--mode", "baseline", "-w", str(tmp_path))
    assert "Traceback" in r.stderr


def test_bad_set_and_missing_workspace(tmp_path):
    r = run_cli("forge", "--dry-run", "--set", "nonsense", "-w", str(tmp_path))
    assert r.returncode == 2 and "SECTION.KEY=VALUE" in r.stderr
    r = run_cli("forge", "-w", str(tmp_path / "nope"))
    assert r.returncode == 2 and "opensem init" in r.stderr


def test_requirement_entry_points_print_what_the_opensem_commands_print(tmp_path, base_models_dir):
    """`python src/forge.py` and `src/cpt.py` are the opensem commands: the same plan for the same workspace (the
    four scripts running real stages end to end: test_the_requirements_four_entry_points_run_real_stages)."""
    from conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", base_models_dir, example="product-manual")
    for name, command, plan in (("forge.py", "forge", "est. input tokens"), ("cpt.py", "cpt", "cpt corpus:")):
        a = subprocess.run([sys.executable, f"src/{name}", "--dry-run", "-w", str(ws)], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
        b = run_cli(command, "--dry-run", "-w", str(ws))
        assert a.returncode == 0 == b.returncode, a.stderr[-2000:] + b.stderr[-2000:]
        assert a.stdout + a.stderr == b.stdout + b.stderr and plan in a.stdout + a.stderr


def test_doctor_reports_machine_and_never_key_values():
    r = run_cli("doctor", env={"OPENAI_API_KEY": "sk-test-SECRET-123"})
    assert r.returncode == 0, r.stderr
    for word in ("torch", "transformers", "peft", "trl", "promptfoo", "training engines", "OPENAI_API_KEY", "free disk"):
        assert word in r.stdout, word
    assert "SECRET" not in r.stdout + r.stderr


def test_both_pinned_sets_lie_inside_pyprojects_ranges():
    """requirements.txt (the CPU set) pins or names every runtime dependency; it and requirements-gpu.txt (Unsloth's
    set) pin versions inside pyproject.toml's ranges, and the gpu extra pins what requirements-gpu.txt pins."""
    from packaging.requirements import Requirement

    def read(name: str) -> dict:
        lines = [ln.strip() for ln in (REPO / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return {(r := Requirement(ln)).name.lower().replace("_", "-"): r for ln in lines}

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {(r := Requirement(d)).name.lower().replace("_", "-"): r.specifier for d in project["dependencies"]}
    cpu, gpu = read("requirements.txt"), read("requirements-gpu.txt")
    assert set(cpu) == set(ranges)
    for name, req in [*cpu.items(), *gpu.items()]:
        pins = [s.version.replace(".*", ".0") for s in req.specifier if s.operator == "=="]
        if name in ranges and pins:
            assert ranges[name].contains(pins[0]), (name, str(req.specifier), str(ranges[name]))
        elif name in ranges:
            assert req.specifier == ranges[name], name
    extra = {(r := Requirement(d)).name.lower().replace("_", "-"): r.specifier for d in project["optional-dependencies"]["gpu"]}
    assert extra == {name: gpu[name].specifier for name in extra} and set(extra) == {"unsloth", "unsloth-zoo"}
    assert {n for n in gpu if n in ranges} == {"torch", "transformers", "trl", "datasets", "peft", "accelerate"}


def test_embedded_model_materialises_and_answers(base_models_dir):
    from opensem.inference import load_chat_model
    from opensem.models import MARKER, resolve_base_model

    folder = base_models_dir / "smollm2-135m-instruct"
    assert (folder / MARKER).exists() and (folder / "model.safetensors").exists()
    assert (folder / "tokenizer.json").exists() and ((folder / "chat_template.jinja").exists() or "chat_template" in (folder / "tokenizer_config.json").read_text())
    import time

    t = time.time()
    again = resolve_base_model("smollm2-135m-instruct", base_models_dir)
    assert time.time() - t < 5, "a materialised model must not be converted again"
    model = load_chat_model(again.path)
    out = model.generate([[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=24)[0]
    assert "paris" in out.text.lower()
    assert out.completion_tokens < 24, "generation must stop at the end-of-turn token"


def test_the_embedded_models_fingerprint_is_the_same_on_another_machine(tmp_path, base_models_dir):
    """Another machine makes the embedded model's folder with its own transformers patch release, which the folder's
    config files name. The fingerprint (part of every stage's inputs) must not change with it, or a run fetched from
    a cloud GPU would train again at home."""
    from opensem.models import MARKER, folder_fingerprint, resolve_base_model

    here = resolve_base_model("smollm2-135m-instruct", base_models_dir)
    there = tmp_path / "models" / "smollm2-135m-instruct"
    there.mkdir(parents=True)
    for f in Path(here.path).iterdir():
        if f.name == "config.json":
            (there / f.name).write_text(f.read_text().replace('"transformers_version": "', '"transformers_version": "0.0.1+'))
        else:
            os.link(f, there / f.name)
    assert "0.0.1+" in (there / "config.json").read_text() and (there / MARKER).exists()
    assert folder_fingerprint(there) != folder_fingerprint(Path(here.path))  # the two folders differ
    again = resolve_base_model("smollm2-135m-instruct", tmp_path / "models")
    assert again.path == str(there) and "0.0.1+" in (there / "config.json").read_text()  # used as it is, not made again
    assert again.fingerprint == here.fingerprint and again.fingerprint.startswith("gguf:")


def test_batched_greedy_equals_one_by_one(base_models_dir):
    from opensem.inference import load_chat_model

    model = load_chat_model(str(base_models_dir / "smollm2-135m-instruct"))
    qs = ["Name a primary colour.", "What is 2+2?", "Write one short sentence about the sea, please, in simple words.", "Hi"]
    convs = [[{"role": "user", "content": q}] for q in qs]
    batched = model.generate(convs, max_new_tokens=20, batch_size=4)
    single = [model.generate([c], max_new_tokens=20)[0] for c in convs]
    assert [b.text for b in batched] == [s.text for s in single]


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from opensem.errors import OpenSEMError
    from opensem.models import resolve_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OpenSEMError, match="offline"):
        resolve_base_model("someorg/some-model-that-is-not-cached", tmp_path)
    with pytest.raises(OpenSEMError, match="no such .gguf"):
        resolve_base_model(str(tmp_path / "missing.gguf"), tmp_path)


# --- one source of defaults: the schema; the templates and the README state the same values ------------------------
def _schema_default(model, dotted: str):
    obj = model()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [x.model_dump(mode="json") if hasattr(x, "model_dump") else x for x in obj]
    return obj


def _leaves(data: dict, prefix: str = ""):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_template_configs_state_the_schema_defaults():
    import yaml

    from opensem.config import SECTIONS

    for section in SECTIONS.values():
        rel, model = section.file, section.model
        template = yaml.safe_load((REPO / "src/opensem/assets/workspace" / rel).read_text())
        assert template, rel
        for key, value in _leaves(template):
            assert value == _schema_default(model, key), f"{rel}: {key} is {value!r} in the template, {_schema_default(model, key)!r} in the schema"


def test_readme_configuration_table_states_the_schema_defaults():
    import re

    from opensem.kernel.config import TrainConfig

    text = (REPO / "README.md").read_text()
    table = text.split("`configs/train_config.yaml` uses Axolotl's key names:", 1)[1].split("\n\n", 2)[1]
    checked = 0
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        keys = re.findall(r"`([a-z_]+)`", cells[0])
        defaults = [d.strip().strip("`") for d in cells[1].split(",")]
        if " or " in cells[0] or len(keys) != len(defaults):
            keys, defaults = keys[:1], defaults[:1]
        for key, shown in zip(keys, defaults):
            if key not in TrainConfig.model_fields:
                continue
            value = getattr(TrainConfig(), key)
            if isinstance(value, list) and value and hasattr(value[0], "path"):
                value = value[0].path  # a dataset list is shown by its path
            if value is None:
                assert shown in ("unset", "generated", "end", "null"), f"README: {key} default {shown!r}, schema None"
            elif isinstance(value, bool):
                assert shown == str(value).lower(), f"README: {key} default {shown!r}, schema {value!r}"
            elif isinstance(value, (int, float)):
                assert float(shown) == float(value), f"README: {key} default {shown!r}, schema {value!r}"
            else:
                assert shown == str(value), f"README: {key} default {shown!r}, schema {value!r}"
            checked += 1
    assert checked >= 25


def test_every_dataset_entry_is_trained_on(tmp_path, base_models_dir):
    from conftest import make_workspace

    from opensem.train import run_training
    from opensem.workspace import Workspace

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    rows = lambda tag, n: "".join(json.dumps({"conversations": [{"from": "human", "value": f"{tag} question {i}?"},  # noqa: E731
                                                                  {"from": "gpt", "value": f"{tag} answer {i}."}]}) + "\n" for i in range(n))
    (ws / "data/processed/a.jsonl").write_text(rows("alpha", 3))
    (ws / "data/processed/b.jsonl").write_text(rows("beta", 5))
    set_config(ws, "train", datasets=[{"path": "data/processed/a.jsonl"}, {"path": "data/processed/b.jsonl"}], test_datasets=[],
               max_steps=1, micro_batch_size=8, replay=None, run_name="two")
    run_training(Workspace(ws))
    m = json.loads((ws / "models/adapters/two/manifest.json").read_text())
    assert [f["examples"] for f in m["data"]["train"]["files"]] == [3, 5] and m["data"]["train"]["examples"] == 8


def test_the_requirements_four_entry_points_run_real_stages(tmp_path, base_models_dir, fake, promptfoo_available):
    """PRD happy path, as written: python src/forge.py, src/judge.py --mode baseline, src/train.py, src/judge.py --mode fine-tuned."""
    from conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    (ws / "data/raw/pump.md").write_text("# Halden H-40\n\nThe Halden H-40 pump runs at a maximum pressure of 12 bar. "
                                         "Its motor draws 450 watts at full load. The H-40 weighs 14 kilograms.\n")
    (ws / "evals/golden_set.json").write_text(json.dumps([{"question": "What is the H-40's maximum pressure?", "answer": "12 bar."}]))
    set_config(ws, "forge", teacher={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "gpt-4o-mini"},
               generation={"pairs_per_chunk": 4})
    set_config(ws, "train", max_steps=2, micro_batch_size=4, run_name="prd", replay=None)
    set_config(ws, "eval", answers={"max_new_tokens": 16}, forgetting_set=None, bootstrap_samples=100)

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, f"src/{script}", *args, "-w", str(ws)], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{script}: {r.stderr[-2000:]}"
        return r

    run("forge.py")
    assert fake.calls["/v1/chat/completions"] > 0 and (ws / "data/processed/train.jsonl").read_text().strip()
    run("judge.py", "--mode", "baseline")
    assert (ws / "evals/reports/baseline-latest.json").exists()
    run("train.py")
    assert (ws / "models/adapters/prd/adapter_model.safetensors").exists()
    r = run("judge.py", "--mode", "fine-tuned")
    assert "Baseline vs Fine-Tuned" in r.stdout
    assert any(h in r.stdout for h in ("Accuracy improved", "Accuracy fell", "Mean score", "No significant change"))
    ft = json.loads((ws / "evals/reports/fine-tuned-latest.json").read_text())
    assert ft["comparison"]["paired_n"] == 1 and "prd" in ft["lineage"]["adapter"]

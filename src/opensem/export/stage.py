"""`opensem export`: a trained run -> the formats people deploy, each checked against the model that was evaluated.

    models/exports/{run_name}/
        merged/                              base + adapter merged: safetensors, tokenizer, chat template
        {run_name}-f16.gguf, -q4_k_m.gguf    llama.cpp's converter and quantizer
        Modelfile                            Ollama: FROM the GGUF, TEMPLATE, SYSTEM, stop words
        {run_name}-lora-f16.gguf             the adapter alone (llama-server --lora, Ollama ADAPTER) ...
        base-f16.gguf                        ... and the model under it
        export_manifest.json                 the source run (adapter hash, chain), the converter, and for each
                                             file: format, type, size, hash, time, and its round-trip check
        logs/                                the converters' output

Read top to bottom: the evaluated model answers a sample of golden questions once; each export is written,
then answers the same questions and is compared (verify.py). A failed check leaves the file, marks it failed
in the manifest, and stops the export with the differing answers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional


from opensem.adapters import MANIFEST, adapter_hash, base_model_dir, chain_text, merged_model
from opensem.errors import OpenSEMError
from opensem.export import converter, llamacpp, verify
from opensem.lineage import file_sha256, now, read_json, versions, write_json
from opensem.stages import STAGES, Artifact, Context, StageResult
from opensem.terminal import Console
from opensem.workspace import Workspace

EXPORT_MANIFEST = "export_manifest.json"
UNQUANTIZED = {"f32", "f16", "bf16"}


def adapter_dirs(ws: Workspace) -> list[Path]:
    """Where trained runs live: instruction tuning, preference tuning, continued pre-training."""
    return [ws.path(ws.train_config().output_dir), ws.path(ws.preference_config().output_dir), ws.path(ws.cpt_config().output_dir)]


def find_run(ws: Workspace, name: Optional[str]) -> Path:
    """A finished run by name (or path); without a name, the latest finished instruction- or preference-tuned run."""
    def done(d: Path) -> bool:
        return (d / "adapter_config.json").exists() and read_json(d / "run.json", {}).get("status", "complete") == "complete" \
            and (d / MANIFEST).exists()

    if name:
        for cand in [Path(name).expanduser()] + [d / name for d in adapter_dirs(ws)]:
            if done(cand):
                return cand.resolve()
        raise OpenSEMError(f"export: no finished run {name!r} in {', '.join(str(d.relative_to(ws.root)) for d in adapter_dirs(ws))} "
                           f"(see `opensem runs`), nor at that path")
    runs = [d for base in adapter_dirs(ws)[:2] for d in base.glob("*/") if done(d)]
    if not runs:
        raise OpenSEMError("export: no finished run to export: run `opensem train` (or `opensem run`) first")
    return max(runs, key=lambda d: (read_json(d / MANIFEST, {}).get("created", ""), d.stat().st_mtime)).resolve()


def golden_sample(ws: Workspace, n: int) -> tuple[list[str], list[list[dict]]]:
    from opensem.golden import load_golden

    ecfg = ws.eval_config()
    items = load_golden(ws.path(ecfg.golden_set))[:n]
    convs = []
    for it in items:
        system = it.system or ecfg.answers.system_prompt
        convs.append(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": it.question}])
    return [it.question for it in items], convs


def _record(ws: Workspace, path: Path, fmt: str, qtype: Optional[str], seconds: float, check=None) -> dict:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    main = path / "model.safetensors" if path.is_dir() else path
    return {"format": fmt, "type": qtype, "path": str(path.relative_to(ws.root)) if path.is_relative_to(ws.root) else str(path),
            "sha256": file_sha256(main) if main.exists() else None, "bytes": size, "seconds": round(seconds, 2),
            "check": check.to_json() if check else None}


def export_run(ws: Workspace, adapter_dir: Path, formats: Optional[list[str]] = None, gguf_types: Optional[list[str]] = None,
               do_verify: Optional[bool] = None, console: Optional[Console] = None) -> Path:
    """Export one run; returns its export folder. Files already exported from the same adapter are kept."""
    from opensem.inference import ChatModel

    console = console or Console(stderr=True)
    cfg = ws.export_config()
    formats = formats or cfg.formats
    gguf_types = gguf_types or cfg.gguf_types
    do_verify = cfg.verify.enabled if do_verify is None else do_verify
    m = read_json(adapter_dir / MANIFEST)
    run_name, sha = m["run_name"], adapter_hash(adapter_dir)
    base_path = base_model_dir(adapter_dir)  # on this machine, or a clear error now, before any work
    out = ws.output_path(cfg.output_dir, "export.output_dir") / run_name
    record = read_json(out / EXPORT_MANIFEST, {})
    if record.get("source", {}).get("adapter_sha256") != sha:
        shutil.rmtree(out, ignore_errors=True)  # exports of an earlier adapter of the same name
        record = {}
    out.mkdir(parents=True, exist_ok=True)
    ggufs = [t for t in gguf_types] if ("gguf" in formats or "ollama" in formats) else []
    need_merged = "merged" in formats or bool(ggufs)
    check_space(out, space_needed(base_path, (m.get("base_model") or {}).get("parameters"), need_merged, ggufs,
                                  "lora-gguf" in formats and not (out / "base-f16.gguf").exists()), run_name)
    record.update({"created": now(), "source": {
        "run_name": run_name, "stage": m.get("stage"), "method": m.get("method"), "adapter_dir": str(adapter_dir),
        "adapter_sha256": sha, "manifest_sha256": file_sha256(adapter_dir / MANIFEST), "base_model": m.get("base_model"),
        "chain": chain_text(adapter_dir)}, "converter": converter.version(),
        "versions": versions("opensem", "torch", "transformers", "peft", "llama-cpp-python", "gguf")})
    files: dict = record.setdefault("files", {})
    record["verify"] = cfg.verify.model_dump() | {"enabled": do_verify}

    def save() -> None:
        write_json(out / EXPORT_MANIFEST, record)

    questions, convs, reference = [], [], []
    if do_verify:
        questions, convs = golden_sample(ws, cfg.verify.questions)
        console.print(f"round-trip check: the evaluated model (base + adapter) answers {len(convs)} golden questions")
        evaluated = ChatModel(str(base_path), str(adapter_dir))
        reference = [c.text for c in evaluated.generate(convs, max_new_tokens=cfg.verify.max_new_tokens)]
        del evaluated
        record["reference_answers"] = [{"question": q, "answer": a} for q, a in zip(questions, reference)]

    def check(target: str, answers: list[str], quantized: bool, tokens_per_s=None):
        if not do_verify:
            return None
        c = verify.compare(target, questions, reference, answers, quantized, cfg.verify, tokens_per_s)
        console.print(("[green]" if c.passed else "[red]") + c.line() + "[/]")
        return c

    def finish(key: str, entry: dict) -> None:
        files[key] = entry
        save()
        if entry["check"] and not entry["check"]["passed"]:
            raise verify.fail(verify.Check(**entry["check"]))

    merged = out / "merged"
    merged_is_tmp = "merged" not in formats and "merged" not in files  # only the converter's input this time
    if need_merged:
        t = time.time()
        console.print(f"merged: {run_name} (base + adapter, merge_and_unload) -> {merged}")
        merged_model(adapter_dir, merged)
        secs = time.time() - t
        c = None
        if do_verify:
            answers = [x.text for x in ChatModel(str(merged)).generate(convs, max_new_tokens=cfg.verify.max_new_tokens)]
            c = check("merged (transformers)", answers, False)
        finish("merged", _record(ws, merged, "merged", None, secs, c))

    logs = out / "logs"
    f16_tmp: Optional[Path] = None
    for qtype in ggufs:
        target = out / f"{run_name}-{qtype}.gguf"
        t = time.time()
        console.print(f"gguf {qtype}: {target.name}")
        if qtype in converter.CONVERTER_TYPES:
            _convert(merged, target, qtype, logs)
        else:
            f16 = out / f"{run_name}-f16.gguf"
            if not f16.exists():
                f16 = f16_tmp = out / f"{run_name}-f16.gguf.tmp"
                _convert(merged, f16, "f16", logs)
            converter.quantize(f16, target, qtype, logs / f"{target.name}.log")
        secs = time.time() - t
        c = None
        if do_verify:
            got = llamacpp.answers(target, convs, cfg.verify.max_new_tokens)
            c = check(f"{target.name} (llama.cpp)", got.answers, qtype not in UNQUANTIZED, round(got.tokens_per_s, 1))
        finish(f"gguf:{qtype}", _record(ws, target, "gguf", qtype, secs, c))
    if f16_tmp:
        f16_tmp.unlink(missing_ok=True)

    if "ollama" in formats:
        pick, info = _write_modelfile(ws, out, run_name, record, cfg)
        finish("ollama", _record(ws, out / "Modelfile", "ollama", pick, 0.0) | {"modelfile": info})

    if "lora-gguf" in formats:
        _lora_gguf(ws, adapter_dir, base_path, out, run_name, logs, check, finish, convs, cfg, console)

    if merged_is_tmp and merged.exists():
        shutil.rmtree(merged)
        files.pop("merged", None)
    save()
    return out


# bits per weight of each GGUF type, measured on llama.cpp's files (the K-quants keep a few tensors at higher precision)
BITS_PER_WEIGHT = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_1": 6.0, "q5_0": 5.5,
                   "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_1": 5.0, "q4_0": 4.5, "q3_k_m": 3.9}


def space_needed(base_path: Path, parameters: Optional[int], merged: bool, ggufs: list[str], base_gguf: bool) -> dict[str, int]:
    """Bytes each file of an export takes at once on disk (the merged folder and a temporary f16 GGUF included)."""
    params = parameters or 0
    need = {}
    if merged:
        need["merged"] = sum(f.stat().st_size for f in base_path.glob("*.safetensors"))
    for t in ggufs:
        need[f"gguf {t}"] = int(params * BITS_PER_WEIGHT.get(t, 16) / 8)
    if any(t not in converter.CONVERTER_TYPES for t in ggufs) and "f16" not in ggufs:
        need["f16 GGUF to quantize from"] = params * 2
    if base_gguf:
        need["base f16 GGUF for lora-gguf"] = params * 2
    return need


def check_space(out: Path, need: dict[str, int], run_name: str) -> None:
    """Refuse before any work when the disk cannot hold the export, rather than fail after minutes of converting."""
    total, free = sum(need.values()), shutil.disk_usage(out).free
    if total > free:
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in need.items())
        raise OpenSEMError(f"export of {run_name} needs about {total / 1e9:.1f} GB in {out} ({parts}) and {free / 1e9:.1f} GB "
                           f"are free: free some space, or export fewer formats (--format, --gguf-type)")


def _convert(model_dir: Path, target: Path, outtype: str, logs: Path) -> None:
    tmp = target.with_name(target.name + ".partial")
    converter.run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(tmp), "--outtype", outtype],
                            logs / f"{target.name}.log")
    tmp.replace(target)


def _write_modelfile(ws: Workspace, out: Path, run_name: str, record: dict, cfg) -> tuple[str, dict]:
    """The Modelfile next to the GGUF it names; returns that GGUF's type and what the Modelfile was made from."""
    from transformers import AutoTokenizer

    from opensem.export.modelfile import modelfile

    files = record["files"]
    ggufs = {v["type"]: v for k, v in files.items() if k.startswith("gguf:") and Path(ws.path(v["path"])).exists()}
    if not ggufs:
        raise OpenSEMError("export --format ollama needs a GGUF: add gguf to formats (or export one first)")
    pick = cfg.ollama_gguf if cfg.ollama_gguf in ggufs else min(ggufs, key=lambda t: ggufs[t]["bytes"])
    gguf = Path(ws.path(ggufs[pick]["path"]))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "merged") if (out / "merged").exists() else record["source"]["adapter_dir"])
    system = ws.eval_config().answers.system_prompt
    header = (f"{run_name}, exported by opensem {versions('opensem').get('opensem')} from {record['source']['adapter_dir']}\n"
              f"adapter {record['source']['adapter_sha256']}\nollama create {run_name} -f Modelfile && ollama run {run_name}")
    text, info = modelfile(gguf.name, tokenizer, system, header)
    (out / "Modelfile").write_text(text, encoding="utf-8")
    return pick, info


def _lora_gguf(ws, adapter_dir: Path, base_path: Path, out: Path, run_name: str, logs: Path, check, finish, convs, cfg, console) -> None:
    acfg = read_json(adapter_dir / "adapter_config.json", {})
    if acfg.get("modules_to_save"):
        raise OpenSEMError(f"export --format lora-gguf: {run_name} trains whole modules ({', '.join(acfg['modules_to_save'])}, "
                           f"lora_modules_to_save), which llama.cpp's LoRA format cannot hold: export --format gguf instead")
    base_gguf = out / "base-f16.gguf"
    t = time.time()
    if not base_gguf.exists():
        console.print(f"lora-gguf: the model under the adapter -> {base_gguf.name}")
        _convert(base_path, base_gguf, "f16", logs)
    target = out / f"{run_name}-lora-f16.gguf"
    tmp = target.with_name(target.name + ".partial")
    console.print(f"lora-gguf: {target.name}")
    converter.run_converter("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_path), "--outfile", str(tmp),
                                                          "--outtype", "f16"], logs / f"{target.name}.log")
    tmp.replace(target)
    secs = time.time() - t
    c = None
    if convs:
        got = llamacpp.answers(base_gguf, convs, cfg.verify.max_new_tokens, lora=target)
        c = check(f"{target.name} on {base_gguf.name} (llama.cpp)", got.answers, False, round(got.tokens_per_s, 1))
    finish("lora-gguf", _record(ws, target, "lora-gguf", "f16", secs, c) | {"base_gguf": str(base_gguf.relative_to(ws.root))
                                                                              if base_gguf.is_relative_to(ws.root) else str(base_gguf)})


def export_result(ws: Workspace, out: Path) -> StageResult:
    record = read_json(out / EXPORT_MANIFEST)
    arts = {"manifest": Artifact.of(ws, out / EXPORT_MANIFEST)}
    for key, f in record.get("files", {}).items():
        if isinstance(f, dict):
            p = ws.path(f["path"])
            arts[key] = Artifact.of(ws, p / "model.safetensors" if p.is_dir() else p)
    checks = {k: (f.get("check") or {}).get("agreement") for k, f in record.get("files", {}).items() if isinstance(f, dict)}
    return StageResult("export", arts, {"run_name": record["source"]["run_name"], "adapter_sha256": record["source"]["adapter_sha256"],
                                        "folder": str(out), "agreement": checks})


@STAGES.register
class ExportStage:
    """The final adapter (preference-tuned if that stage ran, else instruction-tuned) -> export_config.yaml's formats."""

    name = "export"
    configs = ("export", "eval", "train", "preference", "cpt")

    def outputs(self, ws: Workspace) -> list[str]:
        return [ws.export_config().output_dir]

    @staticmethod
    def _source(ctx: Context) -> Path:
        for stage in ("preference", "train"):
            r = ctx.result(stage)
            if r:
                return r.path(ctx.ws, "adapter").parent
        return find_run(ctx.ws, None)

    def inputs(self, ctx: Context) -> dict:
        return {"adapter": adapter_hash(self._source(ctx)), "config": ctx.ws.export_config().model_dump(mode="json"),
                "converter": converter.LLAMA_CPP_PYTHON}

    def run(self, ctx: Context) -> StageResult:
        return export_result(ctx.ws, export_run(ctx.ws, self._source(ctx), console=ctx.console))

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return read_json(result.path(ws, "manifest"))

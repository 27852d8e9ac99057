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

Read top to bottom: the evaluated model answers a sample of golden questions once; each format (formats.py, one
class each, registered by name) writes its files, which answer the same questions and are compared (verify.py).
A failed check leaves the file, marks it failed in the manifest, and stops the export with the differing answers.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from opensem.adapters import MANIFEST, adapter_hash, base_model_dir, chain_text, finished_runs, is_finished, latest, merged_model
from opensem.errors import OpenSEMError
from opensem.export import commands, converter, verify
from opensem.export.formats import FORMATS
from opensem.lineage import file_sha256, now, read_json, versions, write_json
from opensem.stages import STAGES, Artifact, Context, ReportSection, StageResult
from opensem.terminal import Console
from opensem.workspace import Workspace

EXPORT_MANIFEST = "export_manifest.json"


def adapter_dirs(ws: Workspace) -> list[Path]:
    """Where trained runs live: instruction tuning, preference tuning, continued pre-training."""
    return [ws.path(ws.train_config().output_dir), ws.path(ws.preference_config().output_dir), ws.path(ws.cpt_config().output_dir)]


def find_run(ws: Workspace, name: Optional[str]) -> Path:
    """A finished run by name (or path); without a name, the latest finished instruction- or preference-tuned run."""
    if name:
        for cand in [Path(name).expanduser()] + [d / name for d in adapter_dirs(ws)]:
            if is_finished(cand):
                return cand.resolve()
        raise OpenSEMError(f"export: no finished run {name!r} in {', '.join(str(d.relative_to(ws.root)) for d in adapter_dirs(ws))} "
                           f"(see `opensem runs`), nor at that path")
    runs = [d for base in adapter_dirs(ws)[:2] for d in finished_runs(base)]
    if not runs:
        raise OpenSEMError("export: no finished run to export: run `opensem train` (or `opensem run`) first")
    return latest(runs)


def export_folder(ws: Workspace, adapter_dir: Path) -> Path:
    """Where a run's exports go: models/exports/{run_name} (export_config.yaml's output_dir)."""
    from opensem.workspace import child_path

    return child_path(ws.output_path(ws.export_config().output_dir, "export.output_dir"), read_json(adapter_dir / MANIFEST).get("run_name"),
                      "run_name", str(adapter_dir / MANIFEST))


def golden_sample(ws: Workspace, n: int) -> tuple[list[str], list[list[dict]]]:
    from opensem.golden import load_golden

    ecfg = ws.eval_config()
    items = load_golden(ws.path(ecfg.golden_set))[:n]
    convs = []
    for it in items:
        system = it.system or ecfg.answers.system_prompt
        convs.append(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": it.question}])
    return [it.question for it in items], convs


@dataclass
class ExportJob:
    """One export as every format sees it: the run, its folder, the config, what is written so far, the check."""

    ws: Workspace
    cfg: object  # ExportConfig
    adapter_dir: Path
    base_path: Path
    out: Path
    run_name: str
    parameters: int
    gguf_types: list[str]
    record: dict
    console: Console
    do_verify: bool
    keep_merged: bool  # the merged folder is one of the formats asked for (else only the converters' input)
    merged_done: bool = False
    questions: list[str] = field(default_factory=list)
    convs: list = field(default_factory=list)
    reference: list[str] = field(default_factory=list)

    @property
    def files(self) -> dict:
        return self.record.setdefault("files", {})

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.ws.root)) if path.is_relative_to(self.ws.root) else str(path)

    def save(self) -> None:
        write_json(self.out / EXPORT_MANIFEST, self.record)

    def check(self, target: str, answers: list[str], quantized: bool, tokens_per_s=None):
        """The round-trip check of ``answers`` against the evaluated model's (None when the check is off)."""
        if not self.do_verify:
            return None
        c = verify.compare(target, self.questions, self.reference, answers, quantized, self.cfg.verify, tokens_per_s)
        self.console.print(("[green]" if c.passed else "[red]") + c.line() + "[/]")
        return c

    def entry(self, path: Path, fmt: str, qtype: Optional[str], seconds: float, check=None) -> dict:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        main = path / "model.safetensors" if path.is_dir() else path
        return {"format": fmt, "type": qtype, "path": self.rel(path), "sha256": file_sha256(main) if main.exists() else None,
                "bytes": size, "seconds": round(seconds, 2), "check": check.to_json() if check else None}

    def finish(self, key: str, entry: dict) -> None:
        """Record one written file in the manifest (saved at once); a failed check stops the export."""
        self.files[key] = entry
        self.save()
        if entry["check"] and not entry["check"]["passed"]:
            raise verify.fail(verify.Check(**entry["check"]))

    def merged(self) -> Path:
        """The merged model folder (made and checked once per export), what the converters start from."""
        from opensem.inference import ChatModel

        merged = self.out / "merged"
        if not self.merged_done:
            t = time.time()
            self.console.print(f"merged: {self.run_name} (base + adapter, merge_and_unload) -> {merged}")
            merged_model(self.adapter_dir, merged)
            secs = time.time() - t
            c = None
            if self.do_verify:
                answers = [x.text for x in ChatModel(str(merged)).generate(self.convs, max_new_tokens=self.cfg.verify.max_new_tokens)]
                c = self.check("merged (transformers)", answers, False)
            self.finish("merged", self.entry(merged, "merged", None, secs, c))
            self.merged_done = True
        return merged


def export_run(ws: Workspace, adapter_dir: Path, formats: Optional[list[str]] = None, gguf_types: Optional[list[str]] = None,
               do_verify: Optional[bool] = None, console: Optional[Console] = None) -> Path:
    """Export one run; returns its export folder. Files already exported from the same adapter are kept."""
    from opensem.verdict import recommended

    console = console or Console(stderr=True)
    cfg = ws.export_config()
    asked = formats or cfg.formats
    rec = recommended(ws, adapter_dir)
    if rec and rec["retrieval"] and "retrieval" not in asked:  # the row that ships answers from the documents
        asked = [*asked, "retrieval"]
        console.print(f"the judge recommends {rec['label']}: the retrieval index is exported with it (retrieval/)")
    fmts = plan_formats(asked)
    from opensem.workspace import plain_name

    m = read_json(adapter_dir / MANIFEST)
    run_name, sha = plain_name(m.get("run_name"), "run_name", str(adapter_dir / MANIFEST)), adapter_hash(adapter_dir)
    base_path = base_model_dir(adapter_dir)  # on this machine, or a clear error now, before any work
    out = export_folder(ws, adapter_dir)
    record = read_json(out / EXPORT_MANIFEST, {})
    if record.get("source", {}).get("adapter_sha256") != sha:
        shutil.rmtree(out, ignore_errors=True)  # exports of an earlier adapter of the same name
        record = {}
    out.mkdir(parents=True, exist_ok=True)
    job = ExportJob(ws, cfg, adapter_dir, base_path, out, run_name, (m.get("base_model") or {}).get("parameters") or 0,
                    list(gguf_types or cfg.gguf_types), record, console, cfg.verify.enabled if do_verify is None else do_verify,
                    keep_merged="merged" in asked or "merged" in record.get("files", {}))
    check_space(out, space_needed(job, fmts), run_name)
    record.update({"created": now(), "source": {
        "run_name": run_name, "stage": m.get("stage"), "method": m.get("method"), "adapter_dir": str(adapter_dir),
        "adapter_sha256": sha, "manifest_sha256": file_sha256(adapter_dir / MANIFEST), "base_model": m.get("base_model"),
        "chain": chain_text(adapter_dir)}, "converter": converter.version(), "recommended": rec,
        "versions": versions("opensem", "torch", "transformers", "peft", "llama-cpp-python", "gguf")})
    record.setdefault("files", {})
    record["verify"] = cfg.verify.model_dump() | {"enabled": job.do_verify}
    if job.do_verify:
        job.questions, job.convs = golden_sample(ws, cfg.verify.questions)
        job.reference = reference_answers(job)
    for fmt in fmts:
        fmt.write(job)
    if not job.keep_merged and (out / "merged").exists():
        shutil.rmtree(out / "merged")
        job.files.pop("merged", None)
    from opensem.export.card import card

    (out / "README.md").write_text(card(ws, adapter_dir, cfg, job.files), encoding="utf-8")  # what it learned, how it was judged
    record["card"] = file_sha256(out / "README.md")
    job.save()
    return out


def plan_formats(names: list[str]) -> list:
    """The formats to write, each once, in registration order (a format's ``requires`` joins it), then any named by
    ``module:Class`` in the order given."""
    wanted = list(dict.fromkeys(names))
    try:
        for name in list(wanted):
            wanted += [r for r in getattr(FORMATS.get(name), "requires", ()) if r not in wanted]
        registered = [n for n in FORMATS.names() if n in wanted]
        return [_instance(FORMATS.get(n)) for n in registered + [n for n in wanted if n not in registered]]
    except ValueError as e:
        raise OpenSEMError(f"export formats: {e}") from None


def _instance(obj):
    return obj() if isinstance(obj, type) else obj


def reference_answers(job: ExportJob) -> list[str]:
    """The evaluated model (base + adapter, as the judge ran it) answers the sample once; every format is compared."""
    from opensem.inference import ChatModel

    job.console.print(f"round-trip check: the evaluated model (base + adapter) answers {len(job.convs)} golden questions")
    evaluated = ChatModel(str(job.base_path), str(job.adapter_dir))
    reference = [c.text for c in evaluated.generate(job.convs, max_new_tokens=job.cfg.verify.max_new_tokens)]
    del evaluated
    job.record["reference_answers"] = [{"question": q, "answer": a} for q, a in zip(job.questions, reference)]
    return reference


def space_needed(job, fmts: list) -> dict[str, int]:
    """Bytes the export takes at once on disk, by what: the merged folder when a format starts from it (a temporary
    one too), and each format's own (a temporary f16 GGUF to quantize from included)."""
    need = {"merged": sum(f.stat().st_size for f in Path(job.base_path).glob("*.safetensors"))} \
        if any(getattr(f, "uses_merged", False) for f in fmts) else {}
    return need | {k: v for f in fmts for k, v in f.space(job).items()}


def check_space(out: Path, need: dict[str, int], run_name: str) -> None:
    """Refuse before any work when the disk cannot hold the export, rather than fail after minutes of converting."""
    total, free = sum(need.values()), shutil.disk_usage(out).free
    if total > free:
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in need.items())
        raise OpenSEMError(f"export of {run_name} needs about {total / 1e9:.1f} GB in {out} ({parts}) and {free / 1e9:.1f} GB "
                           f"are free: free some space, or export fewer formats (--format, --gguf-type)")


def export_result(ws: Workspace, out: Path) -> StageResult:
    record = read_json(out / EXPORT_MANIFEST)
    arts = {"manifest": Artifact.of(ws, out / EXPORT_MANIFEST)}
    for key, f in record.get("files", {}).items():
        if isinstance(f, dict):
            p = ws.path(f["path"])
            main = p / "model.safetensors" if p.is_dir() else p  # a folder: its weights; one without (an index): the manifest holds it
            if main.is_file():
                arts[key] = Artifact.of(ws, main)
    checks = {k: (f.get("check") or {}).get("agreement") for k, f in record.get("files", {}).items() if isinstance(f, dict)}
    return StageResult("export", arts, {"run_name": record["source"]["run_name"], "adapter_sha256": record["source"]["adapter_sha256"],
                                        "folder": str(out), "agreement": checks})


@STAGES.register
class ExportStage:
    """The final adapter (preference-tuned if that stage ran in this run, else instruction-tuned) -> export_config.yaml's
    formats."""

    name = "export"
    configs = ("export", "eval", "train", "preference", "cpt")
    commands = {"export": commands.export, "serve": commands.serve, "push": commands.push}

    def outputs(self, ws: Workspace) -> list[str]:
        return [ws.export_config().output_dir]

    needs = ("train",)

    @staticmethod
    def _source(ctx: Context) -> Path:
        """The preference-tuned adapter when that stage ran in this run, else the instruction-tuned one."""
        return (ctx.result("preference") or ctx.need("train")).path(ctx.ws, "adapter").parent

    def inputs(self, ctx: Context) -> dict:
        return {"adapter": adapter_hash(self._source(ctx)), "config": ctx.ws.export_config().model_dump(mode="json"),
                "converter": converter.LLAMA_CPP_PYTHON}

    def run(self, ctx: Context) -> StageResult:
        return export_result(ctx.ws, export_run(ctx.ws, self._source(ctx), console=ctx.console))

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return read_json(result.path(ws, "manifest"))

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        """Each exported file: size, and its round-trip agreement with the evaluated model."""
        rows = []
        for key, f in (self.details(ws, result).get("files") or {}).items():
            check = f.get("check") or {}
            agree = f"{check['agreement']:.2f}/5, {check['exact']:.0%} identical" if check.get("agreement") is not None else "not checked"
            rows.append([key, f.get("path"), f"{f.get('bytes', 0) / 1e6:.1f} MB", agree])
        return [ReportSection("Export", rows, ["format", "file", "size", "agreement with the evaluated model"],
                              lineage={"export manifest": result.artifacts["manifest"].sha256})]

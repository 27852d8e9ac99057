"""Export formats: one class each, registered by name in ``FORMATS`` (opensem/plugins.py), as a package of yours
registers one through an ``opensem.exports`` entry point (or export_config.yaml names ``package.module:Class``).

A format has a ``name``, optionally ``uses_merged`` (it starts from the merged model folder) and ``requires`` (formats
written along with it), and two methods, both given the ``ExportJob`` (export/stage.py): the run, its export
folder, the config, and the round-trip check:

    space(job) -> {what: bytes}   what it will take on disk at once, checked before any format writes
    write(job)                    writes its files; for each, ``job.finish(key, job.entry(path, ...))`` with the
                                  round-trip check of ``job.check(target, answers, quantized)``

Formats run in the order they are registered (merged, gguf, ollama, lora-gguf, then yours), so one can use what an
earlier one wrote: ``job.merged()`` makes (once) the merged folder the converters start from; ``job.files``
holds what was written so far.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from opensem.errors import OpenSEMError
from opensem import llamacpp
from opensem.export import converter, verify
from opensem.lineage import read_json, versions
from opensem.plugins import Registry

UNQUANTIZED = {"f32", "f16", "bf16"}
# bits per weight of each GGUF type, measured on llama.cpp's files (the K-quants keep a few tensors at higher precision)
BITS_PER_WEIGHT = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_1": 6.0, "q5_0": 5.5,
                   "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_1": 5.0, "q4_0": 4.5, "q3_k_m": 3.9}


class ExportFormat(Protocol):
    name: str

    def space(self, job) -> dict[str, int]: ...

    def write(self, job) -> None: ...


FORMATS = Registry("export format", "opensem.exports", ("opensem.export.formats", "opensem.export.retrieval_index"),
                   lambda obj: all(hasattr(obj, a) for a in ("name", "space", "write")))


def convert(model_dir: Path, target: Path, outtype: str, logs: Path) -> None:
    """llama.cpp's converter, into a .partial file renamed when complete."""
    tmp = target.with_name(target.name + ".partial")
    converter.run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(tmp), "--outtype", outtype],
                            logs / f"{target.name}.log")
    tmp.replace(target)


@FORMATS.register
class Merged:
    """base + adapter merged (PEFT's merge_and_unload): safetensors, tokenizer, chat template."""

    name = "merged"
    uses_merged = True

    def space(self, job) -> dict[str, int]:
        return {}  # the merged folder is counted once, by the job, for every format that needs it

    def write(self, job) -> None:
        job.merged()


@FORMATS.register
class Gguf:
    """One GGUF per ``gguf_types``: f16/bf16/f32/q8_0 from the converter, the rest quantized from an f16."""

    name = "gguf"
    uses_merged = True

    def space(self, job) -> dict[str, int]:
        need = {f"gguf {t}": int(job.parameters * BITS_PER_WEIGHT.get(t, 16) / 8) for t in job.gguf_types}
        if any(t not in converter.CONVERTER_TYPES for t in job.gguf_types) and "f16" not in job.gguf_types:
            need["f16 GGUF to quantize from"] = job.parameters * 2
        return need

    def write(self, job) -> None:
        merged, f16_tmp = job.merged(), None
        for qtype in job.gguf_types:
            target = job.out / f"{job.run_name}-{qtype}.gguf"
            t = time.time()
            job.console.print(f"gguf {qtype}: {target.name}")
            if qtype in converter.CONVERTER_TYPES:
                convert(merged, target, qtype, job.logs)
            else:
                f16 = job.out / f"{job.run_name}-f16.gguf"
                if not f16.exists():
                    f16 = f16_tmp = job.out / f"{job.run_name}-f16.gguf.tmp"
                    convert(merged, f16, "f16", job.logs)
                converter.quantize(f16, target, qtype, job.logs / f"{target.name}.log")
            secs = time.time() - t
            c = None
            if job.do_verify:
                got = llamacpp.answers(target, job.convs, job.cfg.verify.max_new_tokens)
                c = job.check(f"{target.name} (llama.cpp)", got.answers, qtype not in UNQUANTIZED, round(got.tokens_per_s, 1))
            job.finish(f"gguf:{qtype}", job.entry(target, "gguf", qtype, secs, c))
        if f16_tmp:
            f16_tmp.unlink(missing_ok=True)


@FORMATS.register
class Ollama:
    """A Modelfile next to the GGUF it names: FROM, TEMPLATE (the chat template in Go's syntax), SYSTEM, stops."""

    name = "ollama"
    requires = ("gguf",)  # the Modelfile's FROM: exported along when not asked for

    def space(self, job) -> dict[str, int]:
        return {}

    def write(self, job) -> None:
        from transformers import AutoTokenizer

        from opensem.export.modelfile import modelfile

        ggufs = {v["type"]: v for k, v in job.files.items() if k.startswith("gguf:") and Path(job.ws.path(v["path"])).exists()}
        if not ggufs:
            raise OpenSEMError("export --format ollama needs a GGUF: add gguf to formats (or export one first)")
        pick = job.cfg.ollama_gguf if job.cfg.ollama_gguf in ggufs else smallest_passed(ggufs, job.gguf_types)
        gguf = Path(job.ws.path(ggufs[pick]["path"]))
        source = job.record["source"]
        tokenizer = AutoTokenizer.from_pretrained(str(job.out / "merged") if (job.out / "merged").exists() else source["adapter_dir"])
        header = (f"{job.run_name}, exported by opensem {versions('opensem').get('opensem')} from {source['adapter_dir']}\n"
                  f"adapter {source['adapter_sha256']}\nollama create {job.run_name} -f Modelfile && ollama run {job.run_name}")
        text, info = modelfile(gguf.name, tokenizer, job.ws.eval_config().answers.system_prompt, header)
        (job.out / "Modelfile").write_text(text, encoding="utf-8")
        job.finish("ollama", job.entry(job.out / "Modelfile", "ollama", pick, 0.0) | {"modelfile": info})


def smallest_passed(ggufs: dict[str, dict], asked: list[str]) -> str:
    """The Modelfile's GGUF when export_config.yaml names none: the smallest of the types this export was asked for
    that passed its check, else the smallest of the run's others that did."""
    good = [t for t in ggufs if verify.passed(ggufs[t])]
    pool = [t for t in good if t in asked] or good
    if not pool:
        raise OpenSEMError(f"export --format ollama: no GGUF of this run passed its round-trip check ({', '.join(ggufs)}): "
                           f"export another type (--gguf-type q8_0, f16), or name one with ollama_gguf")
    return min(pool, key=lambda t: ggufs[t]["bytes"])


@FORMATS.register
class LoraGguf:
    """The adapter alone as a GGUF (llama-server --lora, Ollama ADAPTER), and the model under it as base-f16.gguf."""

    name = "lora-gguf"

    def space(self, job) -> dict[str, int]:
        return {} if (job.out / "base-f16.gguf").exists() else {"base f16 GGUF for lora-gguf": job.parameters * 2}

    def write(self, job) -> None:
        acfg = read_json(job.adapter_dir / "adapter_config.json", {})
        if acfg.get("modules_to_save"):
            raise OpenSEMError(f"export --format lora-gguf: {job.run_name} trains whole modules ({', '.join(acfg['modules_to_save'])}, "
                               f"lora_modules_to_save), which llama.cpp's LoRA format cannot hold: export --format gguf instead")
        base_gguf = job.out / "base-f16.gguf"
        t = time.time()
        if not base_gguf.exists():
            job.console.print(f"lora-gguf: the model under the adapter -> {base_gguf.name}")
            convert(job.base_path, base_gguf, "f16", job.logs)
        target = job.out / f"{job.run_name}-lora-f16.gguf"
        tmp = target.with_name(target.name + ".partial")
        job.console.print(f"lora-gguf: {target.name}")
        converter.run_converter("convert_lora_to_gguf.py", [str(job.adapter_dir), "--base", str(job.base_path), "--outfile",
                                                              str(tmp), "--outtype", "f16"], job.logs / f"{target.name}.log")
        tmp.replace(target)
        secs = time.time() - t
        c = None
        if job.convs:
            got = llamacpp.answers(base_gguf, job.convs, job.cfg.verify.max_new_tokens, lora=target)
            c = job.check(f"{target.name} on {base_gguf.name} (llama.cpp)", got.answers, False, round(got.tokens_per_s, 1))
        job.finish("lora-gguf", job.entry(target, "lora-gguf", "f16", secs, c) | {"base_gguf": job.rel(base_gguf)})

"""An adapter folder and its lineage: the one place that knows what a training run leaves on disk and what it
started from. Instruction tuning (models/adapters/), continued pre-training (models/cpt/) and preference tuning
(models/preference/) all write the same layout:

    {output_dir}/{run_name}/
        adapter_model.safetensors, adapter_config.json, tokenizer files    the adapter
        manifest.json        what went in (data hashes, config, base model, chain, versions) and what came out
        run.json             status of the run: running | interrupted | complete
        training_log.jsonl   the trainer's log history
        checkpoints/         while the run is unfinished (resume with ``--resume``)
        merged/              the model under the adapter and the adapter as one model, when a later run starts from it

Lineage: a run that starts from an earlier one records it as ``chain`` in its manifest ({stage, mode, run_name,
adapter, hashes, base_model, before}), so base -> cpt -> sft -> dpo can always be read back (``chain_text``) and
the model under any adapter rebuilt (``base_model_dir``, ``trained_on``, ``merged_model``). ``Chain.from_run``
is how a run starts from another.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from opensem.kernel.config import TrainConfig
from opensem.errors import OpenSEMError
from opensem.lineage import file_sha256, read_json, write_json
from opensem.stages import Artifact, StageResult
from opensem.workspace import Workspace

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
MERGED = "merged"
MERGED_MARKER = "opensem_merged.json"
RUN_STATUS = "run.json"
TRAINING_LOG = "training_log.jsonl"
CHECKPOINTS = "checkpoints"


def latest(runs: list[Path]) -> Path:
    """The most recently created of finished runs (by their manifest's ``created``, then the folder's time)."""
    return max(runs, key=lambda d: (read_json(d / MANIFEST, {}).get("created", ""), d.stat().st_mtime)).resolve()


def is_finished(run_dir: Path) -> bool:
    """A run that finished: its weights and manifest written and its status complete (the manifest is written last,
    and a run from before status files existed counts as complete). The one rule every finder uses."""
    return ((run_dir / ADAPTER_WEIGHTS).exists() or (run_dir / "adapter_model.bin").exists()) \
        and (run_dir / "adapter_config.json").exists() and (run_dir / MANIFEST).exists() \
        and read_json(run_dir / RUN_STATUS, {}).get("status", "complete") == "complete"


def finished_runs(root: Path) -> list[Path]:
    return [d for d in Path(root).glob("*/") if is_finished(d)]


def find_adapter(ws: Workspace, cfg: TrainConfig, name: Optional[str]) -> Path:
    """An adapter by name (models/adapters/NAME), by path, or the latest finished one."""
    adapters = ws.path(cfg.output_dir)
    if name:
        for cand in (Path(name).expanduser(), adapters / name):
            if (cand / "adapter_config.json").exists():
                return cand.resolve()
        raise OpenSEMError(f"--adapter {name!r}: no adapter (adapter_config.json) at that path or in {cfg.output_dir}/")
    done = finished_runs(adapters)
    if not done:
        raise OpenSEMError(f"no trained adapter in {cfg.output_dir}/: run `opensem train` first, or pass --adapter PATH")
    return latest(done)


def adapter_hash(adapter: Optional[Path]) -> Optional[str]:
    if adapter is None:
        return None
    weights = adapter / ADAPTER_WEIGHTS
    return file_sha256(weights) if weights.exists() else file_sha256(adapter / "adapter_config.json")


def base_record(base, adapter_dir: Path, parameters: int) -> dict:
    """How a manifest names the model under its adapter: name, kind, fingerprint, the path where it was trained, and
    (for a model on disk) that path as seen from the adapter folder, which still holds after the workspace moves or
    the adapter is fetched home from a cloud machine."""
    rec = {"name": base.name, "path": base.path, "kind": base.kind, "fingerprint": base.fingerprint, "parameters": parameters}
    if base.kind != "hub":
        rec["from_adapter"] = os.path.relpath(os.path.abspath(base.path), os.path.abspath(adapter_dir))
    return rec


def base_model_dir(adapter_dir: Path) -> Path:
    """The folder of the model under an adapter, on this machine: where it was trained; else the same place seen from
    the adapter folder (the embedded model or a GGUF base made there again if needed; a folder only with the
    fingerprint it was trained on); else a hub model by id and revision from the local Hugging Face cache."""
    from opensem.models import MARKER, folder_fingerprint, resolve_base_model

    base = read_json(adapter_dir / MANIFEST, {}).get("base_model") or {}
    recorded = Path(base.get("path", ""))
    if (recorded / "config.json").exists():
        return recorded
    kind, gone = base.get("kind"), (f"{adapter_dir}: the model it was trained on ({base.get('name')}, at {recorded}) is not on "
                                    f"this machine")
    if base.get("from_adapter"):
        here = Path(os.path.normpath(adapter_dir.absolute() / base["from_adapter"]))
        if kind in ("embedded", "gguf") and not (here / MARKER).exists():
            source = base["name"] if kind == "embedded" else read_json(recorded / MARKER, {}).get("source", base["name"])
            if kind == "gguf" and not Path(source).exists():
                raise OpenSEMError(f"{gone}: put the GGUF file {source} here, or train again")
            resolve_base_model(source, here.parent)
        if (here / "config.json").exists():
            if kind == "folder" and folder_fingerprint(here) != base.get("fingerprint"):
                raise OpenSEMError(f"{adapter_dir}: the model at {here} is not the one it was trained on (fingerprint "
                                   f"{base.get('fingerprint')}): restore that model or train again")
            return here
    if kind == "hub":
        from huggingface_hub import snapshot_download

        revision = str(base.get("fingerprint", "")).rpartition("@")[2] or None
        try:
            return Path(snapshot_download(base["name"], revision=revision, local_files_only=True))
        except Exception:
            raise OpenSEMError(f"{gone}: download {base['name']} (revision {revision}) into the Hugging Face cache, "
                               f"e.g. `hf download {base['name']} --revision {revision}`") from None
    raise OpenSEMError(f"{gone}: rebuild it (opensem train / cpt) or copy it to {recorded}")


def trained_on(adapter_dir: Path):
    """The model under an adapter when it is not the configured base: the merged result of an earlier stage it was
    chained from (``after_cpt: merge``); None otherwise."""
    from opensem.models import ResolvedModel

    m = read_json(adapter_dir / MANIFEST, {})
    chain, base = m.get("chain") or {}, m.get("base_model") or {}
    if chain.get("mode") != "merge":
        return None
    try:
        path = base_model_dir(adapter_dir)
    except OpenSEMError:
        raise OpenSEMError(f"{adapter_dir}: trained on the merged model {base.get('path')}, which is gone: "
                           f"rerun the {chain.get('stage')} stage (or `opensem train --from-cpt`) to rebuild it") from None
    return ResolvedModel(base["name"], str(path), base.get("kind", "folder"), base["fingerprint"])


def chain_text(adapter_dir: Path) -> Optional[str]:
    """'base -> cpt (run, merge) -> sft (run)' for an adapter that started from earlier results."""
    m = read_json(adapter_dir / MANIFEST, {})
    chain = m.get("chain")
    if not chain:
        return None
    label = lambda stage: "sft" if stage == "train" else stage  # noqa: E731
    steps, c = [], chain
    while c:
        steps.insert(0, f"{label(c.get('stage'))} ({c.get('run_name')}, {c.get('mode')})")
        c = c.get("before")
    base = (chain.get("base_model") or {}).get("name", "base")
    return " -> ".join([base, *steps, f"{m.get('method') or label(m.get('stage'))} ({m.get('run_name')})"])


def merged_model(adapter_dir: Path, out: Optional[Path] = None) -> Path:
    """The model under an adapter and the adapter, merged (PEFT's merge_and_unload) into one model folder with the
    tokenizer and its chat template: ``{adapter_dir}/merged/`` by default, what a later stage trains a fresh LoRA
    on (``mode: merge``), or ``out``. Made once per adapter; later calls reuse it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out or adapter_dir / MERGED
    sha = file_sha256(adapter_dir / ADAPTER_WEIGHTS)
    if read_json(out / MERGED_MARKER, {}).get("adapter_sha256") == sha:
        return out
    base = read_json(adapter_dir / MANIFEST)["base_model"]
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir(adapter_dir)), dtype="auto", use_safetensors=True, trust_remote_code=False)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and not torch.equal(emb.weight, head.weight):
        model.config.tie_word_embeddings = False  # both were trained apart: keep both
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(tmp))
    write_json(tmp / MERGED_MARKER, {"adapter_sha256": sha, "base_model": base})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# -- an unfinished run --------------------------------------------------------------------------------------------------
def last_checkpoint(folder) -> Optional[str]:
    """The latest complete checkpoint. The trainer writes trainer_state.json last: a folder without it is a save cut
    short (the process killed, the disk full) and is passed over, so a resume starts from the one before it, which
    the trainer deletes only after a newer one is complete."""
    ckpts = [p for p in Path(folder).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1]))) if ckpts else None


def is_resumable(run_dir: Path) -> bool:
    return read_json(run_dir / RUN_STATUS, {}).get("status") in ("running", "interrupted") and bool(
        last_checkpoint(run_dir / CHECKPOINTS))


def find_resumable(root: Path, name: Optional[str]) -> Path:
    """The named run, or the most recent one, that was interrupted with a checkpoint to continue from."""
    cands = [root / name] if name else sorted(root.glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
    for d in cands:
        if is_resumable(d):
            return d
    raise OpenSEMError(f"--resume: no interrupted run with a checkpoint in {root}" + (f" named {name!r}" if name else ""))


def find_finished(root: Path, name: Optional[str], what: str, command: str, shown: Optional[str] = None) -> Path:
    """A finished run (manifest and weights) in ``root`` by folder name, or the latest one. ``shown``: the folder
    as the user configured it, for the error."""
    done = finished_runs(root)
    if name:
        done = [d for d in done if d.name == name]
    if not done:
        raise OpenSEMError(f"no finished {what}{f' named {name!r}' if name else ''} in {shown or root}/: run `{command}` first")
    return latest(done)


# -- what one run hands the next --------------------------------------------------------------------------------------
@dataclass
class Chain:
    """Start a run from an earlier result: config overrides (``base_model`` or ``lora_model_dir``) and the record
    the new run's manifest keeps as ``chain`` (which result, how it was used, what that one started from)."""

    overrides: dict
    record: dict

    @classmethod
    def from_run(cls, run_dir: Path, mode: str, **extra) -> "Chain":
        """Start from the finished run in ``run_dir``: ``merge`` trains a fresh LoRA on the merged model (made once,
        in ``{run_dir}/merged/``); ``continue`` trains its adapter further. ``extra`` joins the record."""
        m = read_json(run_dir / MANIFEST, {})
        if not m:
            raise OpenSEMError(f"{run_dir}: not a finished training run (no {MANIFEST}): train it first, or choose another run")
        record = {"stage": m.get("stage", "train"), "mode": mode, "run_name": m.get("run_name"), "adapter": str(run_dir),
                  "adapter_sha256": adapter_hash(run_dir), "manifest_sha256": file_sha256(run_dir / MANIFEST),
                  "base_model": (m.get("chain") or {}).get("base_model") or m.get("base_model"), **extra}
        if m.get("chain"):
            record["before"] = m["chain"]  # what that run itself started from
        if mode == "merge":
            return cls({"base_model": str(merged_model(run_dir))}, record)
        return cls({"lora_model_dir": str(run_dir)}, record)


def adapter_result(ws: Workspace, run_dir: Path, stage: str, summary: Callable[[dict], dict] = lambda m: {}) -> StageResult:
    """The typed result of a finished run: its weights and manifest, and the summary the run manifest keeps (the
    common keys, and ``summary(manifest)``'s for the stage)."""
    m = read_json(run_dir / MANIFEST)
    weights, manifest = Artifact.of(ws, run_dir / ADAPTER_WEIGHTS), Artifact.of(ws, run_dir / MANIFEST)
    return StageResult(stage, {"adapter": weights, "manifest": manifest}, {
        "adapter": str(Path(weights.path).parent), "adapter_sha256": weights.sha256, "run_name": m.get("run_name"),
        "manifest_sha256": manifest.sha256, **summary(m)})


def adapter_details(ws: Workspace, result: StageResult) -> dict:
    """A run's manifest and its training log (one dict per logged step), for reports."""
    log = result.path(ws, "adapter").parent / TRAINING_LOG
    rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()] if log.exists() else []
    return {"manifest": read_json(result.path(ws, "manifest")), "log": rows}

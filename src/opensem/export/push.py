"""`opensem push`: a trained run to the Hugging Face Hub, with its model card.

    adapter   the LoRA adapter (weights, config, tokenizer and chat template) and the card: load it with PEFT on the
              base model the card names
    merged    the merged model folder of `opensem export --format merged`, and the card
    gguf      the exported GGUF files that passed their check, the Modelfile if there is one, and the card

When the judge recommends a row with retrieval, the export's retrieval index (retrieval/: passages, vectors,
tokenizer, settings; exported now if missing) goes with any of them, so that the pushed expert answers as judged.

The token comes from HF_TOKEN or the huggingface_hub login (`hf auth login`); it is passed to huggingface_hub and
never written anywhere by us. HF_ENDPOINT points at another Hub.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from opensem.errors import OpenSEMError
from opensem.lineage import read_json
from opensem.terminal import Console
from opensem.workspace import Workspace

WHAT = ("adapter", "merged", "gguf")
ADAPTER_FILES = re.compile(r"adapter_model\.safetensors|adapter_config\.json|tokenizer.*|special_tokens_map\.json|chat_template\.jinja"
                           r"|vocab\.json|merges\.txt")


def files_to_push(ws: Workspace, adapter_dir: Path, what: str, folder: Path, exported: dict) -> list[tuple[Path, str]]:
    """(local file, path in the repository) for what is pushed, the card aside. The list is made from the export
    folder itself (regular files inside it, no links, the names each format writes) and checked against the export
    manifest (``exported``): a GGUF must be listed there under its own name, with the same hash, and its round-trip
    check passed; anything else is refused with the file named."""
    from opensem.lineage import file_sha256

    run = folder.name
    if what == "adapter":
        return [(p, p.name) for p in sorted(adapter_dir.iterdir()) if _regular_inside(p, adapter_dir) and ADAPTER_FILES.fullmatch(p.name)]
    if what == "merged":
        if "merged" not in exported or not (folder / "merged").is_dir():
            raise OpenSEMError(f"push --what merged: {run} has no merged export: run `opensem export {run} --format merged` first")
        merged = folder / "merged"
        links = [p for p in merged.rglob("*") if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(merged.resolve()))]
        if links:
            raise OpenSEMError(f"push --what merged: {links[0]} is a link: the merged export holds regular files only; export it again")
        return [(p, p.relative_to(merged).as_posix()) for p in sorted(merged.rglob("*")) if _regular_inside(p, merged)
                and p.name != "opensem_merged.json"]
    listed = {Path(f.get("path", "")).name: f for k, f in exported.items() if k.startswith("gguf:") and isinstance(f, dict)}
    ggufs = []
    for p in sorted(folder.glob(f"{run}-*.gguf")):
        if "-lora-" in p.name:
            continue
        entry = listed.get(p.name)
        if not _regular_inside(p, folder) or entry is None:
            raise OpenSEMError(f"push --what gguf: {p} is not a file this export made: remove it, or export again")
        if not (entry.get("check") or {}).get("passed") or entry.get("sha256") != file_sha256(p):
            raise OpenSEMError(f"push --what gguf: {p} did not pass its round-trip check (or was exported without it, or "
                               f"changed since): export it again with the check")
        ggufs.append(p)
    if not ggufs:
        raise OpenSEMError(f"push --what gguf: {run} has no exported GGUF that passed its check: run `opensem export {run} "
                           f"--format gguf` first")
    modelfile = folder / "Modelfile"
    return [(p, p.name) for p in ggufs] + ([(modelfile, "Modelfile")] if _regular_inside(modelfile, folder) else [])


def _regular_inside(path: Path, folder: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(folder.resolve())


def retrieval_bundle(ws: Workspace, adapter_dir: Path, folder: Path, console: Console) -> list[tuple[Path, str]]:
    """The retrieval index's files (regular files inside retrieval/, no links) when the recommended row uses it."""
    from opensem.verdict import recommended

    rec = recommended(ws, adapter_dir)
    if not (rec and rec["retrieval"]):
        return []
    bundle = folder / "retrieval"
    if not (bundle / "retrieval.json").is_file():
        from opensem.export.stage import export_run

        console.print(f"the judge recommends {rec['label']}: exporting its retrieval index to push with it")
        export_run(ws, adapter_dir, ["retrieval"], None, False, console)
    root = bundle.resolve()
    return [(p, "retrieval/" + p.relative_to(bundle).as_posix()) for p in sorted(bundle.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(root)]


def push(ws: Workspace, adapter_dir: Path, repo: str, what: str, private: bool, dry_run: bool, console: Console) -> list[str]:
    """Create the repository (if new) and upload the files and the card in one commit; returns the paths uploaded."""
    from opensem.export.card import card
    from opensem.export.stage import EXPORT_MANIFEST, export_folder

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo):
        raise OpenSEMError(f"--repo {repo!r}: expected user/name (or org/name)")
    folder = export_folder(ws, adapter_dir)
    exported = read_json(folder / EXPORT_MANIFEST, {}).get("files", {})
    files = files_to_push(ws, adapter_dir, what, folder, exported) + retrieval_bundle(ws, adapter_dir, folder, console)
    exported = read_json(folder / EXPORT_MANIFEST, {}).get("files", {})
    shipped = {k: f for k, f in exported.items() if what == "gguf" or (what == "merged" and k == "merged") or k == "retrieval"}
    text = card(ws, adapter_dir, ws.export_config(), shipped)
    paths = [name for _, name in files] + ["README.md"]
    console.print(f"push {what} of {adapter_dir.name} to {repo}{' (private)' if private else ''}: "
                  f"{len(files)} files and the model card, {sum(p.stat().st_size for p, _ in files) / 1e6:.1f} MB")
    for path, name in files:
        console.print(f"  {name}  ({path.stat().st_size / 1e6:.1f} MB)", markup=False, highlight=False)
    if dry_run:
        console.print("  README.md (the model card below)\n" + text, markup=False, highlight=False, soft_wrap=True)
        return paths
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    if not _token():
        raise OpenSEMError("push: no Hugging Face token: set HF_TOKEN or run `hf auth login` (it is never written by opensem)")
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        ops = [CommitOperationAdd(name, str(path)) for path, name in files] + [CommitOperationAdd("README.md", text.encode("utf-8"))]
        info = api.create_commit(repo, ops, commit_message=f"{adapter_dir.name}: {what}, pushed by opensem")
    except HfHubHTTPError as e:
        raise OpenSEMError(f"push to {repo}: the Hub answered {_status(e)}: check the token's write access and the name") from None
    except OfflineModeIsEnabled:
        raise OpenSEMError("push: HF_HUB_OFFLINE is set, so huggingface_hub reaches no Hub: unset it to push") from None
    except Exception as e:  # the network (the HTTP client's own errors): no route, refused, timed out
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
            raise
        from opensem.llm.base import public_url

        raise OpenSEMError(f"push to {repo}: could not reach {public_url(constants.ENDPOINT)} ({type(e).__name__}): check the "
                           f"connection (or HF_ENDPOINT)") from None
    console.print(f"pushed: {info.commit_url}")
    return paths


def _token() -> Optional[str]:
    from huggingface_hub import get_token

    return get_token()


def _status(e) -> str:
    response = getattr(e, "response", None)
    return f"{response.status_code}" if response is not None else type(e).__name__

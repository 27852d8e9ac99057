"""The ``retrieval`` export format: the workspace's retrieval index beside the GGUF, so that the expert moved to another
machine keeps the "+ retrieval" row it was judged with.

    models/exports/{run}/retrieval/
        passages.json     the chunks of data/raw (id, heading, text)
        vectors.npy       their embeddings (all-MiniLM-L6-v2, unit length)
        tokenizer/        the evaluated model's tokenizer and config: how many passages fit its context
        retrieval.json    top_k, the template's version, the embedder, the index key, the judged settings and system prompt
        README.md         how to serve it

Served with opensem's runner, which needs no workspace: ``python -P -m opensem.export.llama_server --model
../RUN-f16.gguf --alias RUN --port 8000 --index .`` (-P: nothing in the bundle's folder is imported) (``pip install 'opensem[export]'`` on that machine).
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np

from opensem.errors import OpenSEMError
from opensem.export.formats import FORMATS, smallest_passed

README = """# {run}: retrieval index

The passages of the documents this expert was judged with ("+ retrieval" row), for answering from them elsewhere.
Serve the GGUF with them (OpenAI-compatible, on 127.0.0.1; `pip install 'opensem[export]'` first):

    python -P -m opensem.export.llama_server --model ../{gguf} --alias {run} --port 8000 --index .

(`-P` keeps Python from importing anything from this folder.) Each question goes into the prompt the judge graded
(top {top_k} passages ranked by {method}, the template {template}), with the judged
settings; the response carries the passages as `sources`, and `"retrieval": false` in a request turns it off.
Index {index}: {passages} passages embedded with {embedder}.
"""


@FORMATS.register
class RetrievalIndex:
    """The index of the workspace's documents, its settings and the evaluated model's tokenizer (no model weights)."""

    name = "retrieval"

    def space(self, job) -> dict[str, int]:
        return {"retrieval index": sum(f.stat().st_size for f in (job.ws.state_dir / "cache" / "retrieval").glob("*")
                                       if f.is_file()) + 50_000_000}  # an index built before, and the tokenizer

    def write(self, job) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from opensem.export.llama_server import judged_settings
        from opensem.retrieval import TEMPLATE_VERSION, Index
        from opensem.text import EMBEDDER_PACKAGE

        t = time.time()
        index = Index.build(job.ws, job.console)
        out, tmp = job.out / "retrieval", job.out / "retrieval.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "passages.json").write_text(json.dumps([vars(p) for p in index.passages], ensure_ascii=False), encoding="utf-8")
        np.save(tmp / "vectors.npy", index.vectors)
        AutoTokenizer.from_pretrained(str(job.base_path)).save_pretrained(str(tmp / "tokenizer"))
        AutoConfig.from_pretrained(str(job.base_path)).save_pretrained(str(tmp / "tokenizer"))
        ecfg = job.ws.eval_config()
        meta = {"top_k": ecfg.retrieval.top_k, "method": index.method, "template": TEMPLATE_VERSION, "embedder": EMBEDDER_PACKAGE, "index": index.key,
                "passages": len(index.passages), "settings": judged_settings(ecfg.answers), "system_prompt": ecfg.answers.system_prompt}
        (tmp / "retrieval.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        ggufs = {v["type"]: v for k, v in job.files.items() if k.startswith("gguf:")}
        try:
            gguf = f"{job.run_name}-{smallest_passed(ggufs, job.gguf_types)}.gguf"  # the one `opensem serve` picks
        except OpenSEMError:
            gguf = f"{job.run_name}-f16.gguf"  # none exported (yet), or none passed: the README names the usual one
        (tmp / "README.md").write_text(README.format(run=job.run_name, gguf=gguf, **meta), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        job.finish("retrieval", job.entry(out, "retrieval", None, time.time() - t) | {"index": index.key})

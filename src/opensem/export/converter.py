"""llama.cpp's own converters and quantizer, pinned.

The converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their ``conversion`` package and their
own ``gguf-py``) are not in any wheel: they ship in the llama-cpp-python source distribution on PyPI. The pinned
sdist is fetched once with pip, checked against its hash, and the converter files are unpacked into the user
cache (``~/.cache/opensem/llama.cpp/{version}/``). Each conversion runs as a child process that puts its own
``gguf-py`` first on its path, so nothing it imports can clash with the versions loaded in ours. The quantizer
is llama.cpp's, called through llama-cpp-python (the same pinned version, the ``export`` extra).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from opensem.errors import OpenSEMError

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
MARKER = ".opensem-converter"

# llama.cpp file types: what the converter writes itself, and what the quantizer makes from an f16 file
CONVERTER_TYPES = {"f32", "f16", "bf16", "q8_0"}
QUANTIZER_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k_m": "Q4_K_M",
                   "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q3_k_m": "Q3_K_M"}
GGUF_TYPES = sorted(CONVERTER_TYPES | set(QUANTIZER_TYPES))


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opensem" / "llama.cpp"


def converter_dir(fetch: bool = True) -> Path:
    """The unpacked converters of the pinned llama.cpp (fetched and unpacked on first use)."""
    override = os.environ.get("OPENSEM_LLAMA_CPP_DIR")
    if override:
        d = Path(override)
        if not (d / "convert_hf_to_gguf.py").exists():
            raise OpenSEMError(f"OPENSEM_LLAMA_CPP_DIR={override}: no convert_hf_to_gguf.py there: point it at a "
                               f"llama.cpp checkout, or unset it to use the pinned one")
        return d
    d = cache_root() / LLAMA_CPP_PYTHON
    if (d / MARKER).exists():
        return d
    if not fetch:
        raise OpenSEMError(f"llama.cpp's converters are not unpacked in {d}: run `python -m opensem.export.converter`")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise OpenSEMError(f"could not fetch llama-cpp-python=={LLAMA_CPP_PYTHON}'s source (for llama.cpp's "
                               f"converters) with pip: {last}")
        sha = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if sha != SDIST_SHA256:
            raise OpenSEMError(f"{sdists[0].name}: sha256 {sha[:12]}... is not the pinned {SDIST_SHA256[:12]}...: "
                               f"refusing to run its converter")
        partial = d.with_name(d.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and m.isfile() and any(rel == x or (x.endswith("/") and rel.startswith(x)) for x in MEMBERS):
                    m.name = rel
                    tar.extract(m, partial, filter="data")
        (partial / MARKER).write_text(f"llama-cpp-python {LLAMA_CPP_PYTHON} sdist sha256 {sha}\n")
        shutil.rmtree(d, ignore_errors=True)
        partial.rename(d)
    return d


def version() -> dict:
    return {"llama_cpp_python": LLAMA_CPP_PYTHON, "sdist_sha256": SDIST_SHA256,
            "converter_dir": os.environ.get("OPENSEM_LLAMA_CPP_DIR")}  # set only when a checkout replaces the pinned one


def run_converter(script: str, args: list[str], log: Path) -> None:
    """Run one of llama.cpp's converters in a child process; its output goes to ``log``."""
    d = converter_dir()
    # without NO_LOCAL_GGUF the converter puts its own gguf-py first on its path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        r = subprocess.run([sys.executable, str(d / script), *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        lines = [x for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        why = lines[-1] if lines else f"exit code {r.returncode}"
        if "sentencepiece" in why:
            why += " (install the export extra: pip install 'opensem[export]')"
        raise OpenSEMError(f"llama.cpp's {script} failed: {why} (full output: {log})")


def quantize(src: Path, dst: Path, qtype: str, log: Path) -> None:
    """An f16/bf16/f32 GGUF -> a quantized one, with llama.cpp's quantizer (in a child process; output to ``log``)."""
    import_llama_cpp()
    tmp = dst.with_name(dst.name + ".partial")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        r = subprocess.run([sys.executable, "-m", "opensem.export.converter", "quantize", str(src), str(tmp), qtype],
                           stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise OpenSEMError(f"llama.cpp's quantizer failed to make {qtype} from {src.name} (exit {r.returncode}; output: {log})")
    tmp.replace(dst)


def _quantize_here(src: str, dst: str, qtype: str) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{QUANTIZER_TYPES[qtype]}")
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise OpenSEMError("llama-cpp-python is not installed: pip install 'opensem[export]' "
                           "(it compiles llama.cpp, a few minutes)") from None
    return llama_cpp


def installed_version() -> Optional[str]:
    try:
        from importlib.metadata import version as v

        return v("llama-cpp-python")
    except Exception:
        return None


if __name__ == "__main__":  # `python -m opensem.export.converter`: fetch and unpack once (make setup does it)
    if sys.argv[1:2] == ["quantize"]:
        sys.exit(_quantize_here(*sys.argv[2:5]))
    print(converter_dir())

"""GPU check (CUDA machine, minutes): the same training steps with the unsloth and the hf engine, tokens/s and
peak VRAM for each, and the VRAM cap enforced.

Needs no network: the model is built from a config with random weights (fine for speed and memory), the
tokenizer is the embedded model's (carried in models/base/), the data is generated. Each engine runs in
its own process, because Unsloth must be imported before transformers/trl/peft.

    pip install -e '.[gpu]' -c requirements-gpu.txt      # Unsloth and the releases it allows
    python bench/gpu_check.py [--steps 30] [--layers 16] [--hidden 2048]

Output: one line per engine, the unsloth/hf ratio (target >= 1.6x), continued pre-training on each engine
(embed_tokens/lm_head trained at their own learning rate: Unsloth's UnslothTrainer on the unsloth engine, the
optimizer group on hf; held-out perplexity before and after), and the cap check (a process capped at a few
GB must hit OutOfMemoryError instead of using more).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import scratch

REPO = Path(__file__).resolve().parents[1]


def make_model(dest: Path, layers: int, hidden: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_src = REPO / "models/base/smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(tok_src)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4 - hidden // 2 * 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def make_workspace(model_dir: Path, engine: str, steps: int, root: Path) -> Path:
    sys.path.insert(0, str(REPO / "src"))
    import yaml

    from opensem.workspace import init_workspace

    ws = root / f"ws-{engine}"
    init_workspace(ws)
    rows = []
    for i in range(2048):
        q = f"What does section {i} of the manual say about part {i % 97}?"
        a = " ".join(f"Part {i % 97} has property {k} equal to {(i * k) % 1000}." for k in range(1, 8 + i % 8))
        rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load((ws / "configs/train_config.yaml").read_text())
    cfg.update(base_model=str(model_dir), engine=engine, max_steps=steps, micro_batch_size=8, sequence_len=512,
               lora_r=16, lora_alpha=32, learning_rate=2e-4, save_steps=100_000, logging_steps=5, run_name=engine,
               test_datasets=[], gradient_checkpointing=False)
    (ws / "configs/train_config.yaml").write_text(yaml.safe_dump(cfg))
    return ws


def make_cpt_workspace(model_dir: Path, engine: str, steps: int, root: Path) -> Path:
    import yaml

    ws = make_workspace(model_dir, engine, steps, root / "cpt")
    for d in range(4):
        (ws / "data/raw" / f"manual{d}.md").write_text("\n\n".join(
            f"## Part {d}-{i}\n\nPart {d}-{i} has property {k} equal to {(d * 31 + i * k) % 1000}." for i in range(60) for k in (1, 2)))
    cfg = yaml.safe_load((ws / "configs/cpt_config.yaml").read_text())
    cfg.update(max_steps=steps, lora_modules_to_save=["embed_tokens", "lm_head"], embedding_learning_rate=2e-5,
               run_name=f"cpt-{engine}", save_steps=100_000)
    (ws / "configs/cpt_config.yaml").write_text(yaml.safe_dump(cfg))
    return ws


def cpt_child(ws: str) -> None:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from opensem.cpt import run_cpt
    from opensem.workspace import Workspace

    run_dir = run_cpt(Workspace(Path(ws)))
    m = json.loads((run_dir / "manifest.json").read_text())
    print("RESULT " + json.dumps({"engine": m["engine"], "tokens_per_s": m["tokens_per_s"], "steps": m["steps"],
                                   "perplexity": [m["perplexity_before"], m["perplexity_after"]],
                                   "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


def child(ws: str) -> None:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from opensem.train import run_training
    from opensem.workspace import Workspace

    run_dir = run_training(Workspace(Path(ws)))
    m = json.loads((run_dir / "manifest.json").read_text())
    print("RESULT " + json.dumps({"engine": m["engine"], "tokens_per_s": m["tokens_per_s"], "steps": m["steps"],
                                   "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                   "final_loss": m["final_train_loss"], "profile": m["profile"]}), flush=True)


def cap_child(cap_gb: float) -> None:
    """The consumer-GPU cap: allocations past max_vram_gb must fail, not spill past it."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from opensem.kernel.hardware import Profile, apply_vram_cap

    apply_vram_cap(Profile({}, "consumer-gpu", "bf16", 1, 1, False, cap_gb))
    blocks = []
    try:
        for _ in range(1000):
            blocks.append(torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"))  # 256 MiB each
    except torch.OutOfMemoryError:
        got = torch.cuda.memory_allocated() / 2**30
        print("RESULT " + json.dumps({"cap_gb": cap_gb, "allocated_gb": round(got, 2), "enforced": got <= cap_gb}), flush=True)
        return
    print("RESULT " + json.dumps({"cap_gb": cap_gb, "enforced": False}), flush=True)


def run(args: list[str]) -> dict:
    t = time.time()
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(r.stdout[-2000:], r.stderr[-4000:])
        return {"error": f"exit {r.returncode}", "seconds": round(time.time() - t)}
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--child")
    ap.add_argument("--cap-child", type=float)
    ap.add_argument("--cpt-child")
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    if a.cpt_child:
        return cpt_child(a.cpt_child)
    if a.cap_child:
        return cap_child(a.cap_child)
    import torch

    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GB")
    root = Path(scratch.use("gpu-check-"))
    model_dir = root / "model"
    make_model(model_dir, a.layers, a.hidden)
    results = {}
    for engine in ("hf", "unsloth"):
        results[engine] = run(["--child", str(make_workspace(model_dir, engine, a.steps, root))])
        print(f"{engine:8s} {results[engine]}")
    h, u = results["hf"], results["unsloth"]
    if "tokens_per_s" in h and "tokens_per_s" in u:
        print(f"tokens/s unsloth/hf: {u['tokens_per_s'] / h['tokens_per_s']:.2f}x (target >= 1.6x); "
              f"peak VRAM unsloth {u['peak_vram_gb']} GB, hf {h['peak_vram_gb']} GB")
    for engine in ("hf", "unsloth"):
        print(f"cpt {engine:8s} {run(['--cpt-child', str(make_cpt_workspace(model_dir, engine, max(4, a.steps // 3), root))])}")
    print(f"VRAM cap: {run(['--cap-child', '4'])}")


if __name__ == "__main__":
    main()

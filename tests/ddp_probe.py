"""`opensem train` under torchrun, with a probe on each rank (run as: torchrun ... tests/ddp_probe.py OUT -w WS).

Each rank records a digest of its trainable parameters before training and after every optimizer step, and a
digest of every example it computed a loss on; it writes them to OUT/rank{RANK}.json. The test then checks that
the ranks hold the same parameters after each step (gradients were synchronised) and saw different examples
(each had its own shard)."""

import hashlib
import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

import opensem.train.recipe as recipe
from opensem.cli import stage_main

OUT = Path(sys.argv.pop(1))
RANK = int(os.environ.get("RANK", "0"))
record: dict = {"initial": None, "steps": [], "seen": []}


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        record["initial"] = digest(self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        record["steps"].append(digest(self.trainer.model))


original_train = recipe.train


def probed_train(run, trainer, data):
    trainer.add_callback(Probe(trainer))
    loss = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        mask = inputs["attention_mask"].bool()
        for row, keep in zip(inputs["input_ids"], mask):
            record["seen"].append(hashlib.sha256(row[keep].cpu().numpy().tobytes()).hexdigest()[:16])
        return loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    try:
        return original_train(run, trainer, data)
    finally:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"rank{RANK}.json").write_text(json.dumps(record))


recipe.train = probed_train

if __name__ == "__main__":
    stage_main("train")

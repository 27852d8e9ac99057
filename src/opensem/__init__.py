"""OpenSEM: turn raw domain documents into a fine-tuned, evaluated small expert model.

The pipeline, one package per stage:

    forge/  raw documents -> grounded instruction/answer pairs (train.jsonl, test.jsonl)
    cpt/    (optional) raw documents -> continued pre-training adapter in models/cpt/{run_name}, before train
    train/  train.jsonl -> LoRA adapter in models/adapters/{run_name}
    prefs/  (optional) the tuned model's wrong answers -> preference pairs -> DPO/ORPO adapter, after train
    judge/  golden set -> answers of base and tuned model -> promptfoo -> 1-5 scores -> report

    stages.py    the stage contract: typed results with artifacts and content hashes
    pipeline.py  `opensem run`: the declared stages, with lineage and an HTML report
"""

__version__ = "0.1.0"

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


def lazy_names(package: str, names: dict[str, str]):
    """A package's ``__getattr__`` for its public functions, each imported from its module on first use, so that the
    package's config schema (``package.config``) loads without its stage."""
    import importlib

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
